//! Experiment plans: the TOML a user writes, validated once into typed values, and its
//! expansion into the list of runs (the paper's Table 1 as a cross product).

use crate::memory::Bytes;
use crate::runtime::{LoadingPolicy, SchedulingPolicy};
use anyhow::{Context, Result, bail, ensure};
use std::fmt;
use std::path::Path;

/// A memory level of the plan: a cgroup limit, or none at all (the "own unconstrained
/// time" every limited level is compared with).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MemoryLevel {
    /// No limit: the reference every limited level is compared with.
    Unlimited,
    /// A memory cgroup limit of that many bytes.
    Limit(Bytes),
}

impl MemoryLevel {
    pub(crate) fn bytes(self) -> Option<u64> {
        match self {
            MemoryLevel::Unlimited => None,
            MemoryLevel::Limit(b) => Some(b.0),
        }
    }
}

impl fmt::Display for MemoryLevel {
    /// `none`, or the size the way the paper writes it (`256M`, `1G`, `1536M`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryLevel::Unlimited => write!(f, "none"),
            MemoryLevel::Limit(Bytes(b)) => {
                let b = *b;
                if b >= 1 << 30 && b % (1 << 30) == 0 {
                    write!(f, "{}G", b >> 30)
                } else if b >= 1 << 20 && b % (1 << 20) == 0 {
                    write!(f, "{}M", b >> 20)
                } else if b % (1 << 10) == 0 && b > 0 {
                    write!(f, "{}K", b >> 10)
                } else {
                    write!(f, "{b}")
                }
            }
        }
    }
}

impl std::str::FromStr for MemoryLevel {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<MemoryLevel> {
        if s.trim().eq_ignore_ascii_case("none") {
            return Ok(MemoryLevel::Unlimited);
        }
        let b: Bytes = s.parse()?;
        // A limit below a few MiB cannot even hold the binary: certainly a typo.
        ensure!(
            b.0 >= 8 << 20,
            "memory level '{s}' is below 8 MiB (write e.g. 256M or none)"
        );
        Ok(MemoryLevel::Limit(b))
    }
}

/// What runs: one of the 16 layer-wise combinations as the paper ran them (every
/// inference loads its own layers), the same with layers kept resident across inferences
/// (`LOADING+SCHEDULING+cache`), or the status quo (each model run whole in tract, one
/// after another).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Combo {
    /// Layer by layer, every inference loading its own layers (the paper's runs).
    Layerwise(LoadingPolicy, SchedulingPolicy),
    /// Layer by layer with layers kept resident across inferences.
    Cached(LoadingPolicy, SchedulingPolicy),
    /// Each model whole in tract, one after another.
    StatusQuo,
}

/// The paper's baseline, against which every speed-up is computed.
pub const BASELINE: Combo = Combo::Layerwise(LoadingPolicy::Bulk, SchedulingPolicy::Fcfs);

impl Combo {
    /// Status quo first, then the paper's table order (loading, then scheduling), then
    /// the cached rows in the same order.
    pub(crate) fn sort_key(self) -> (usize, usize) {
        let position = |l: LoadingPolicy, s: SchedulingPolicy| {
            (
                1 + LoadingPolicy::ALL.iter().position(|x| *x == l).unwrap_or(0),
                SchedulingPolicy::ALL
                    .iter()
                    .position(|x| *x == s)
                    .unwrap_or(0),
            )
        };
        match self {
            Combo::StatusQuo => (0, 0),
            Combo::Layerwise(l, s) => position(l, s),
            Combo::Cached(l, s) => {
                let (row, column) = position(l, s);
                (row + LoadingPolicy::ALL.len(), column)
            }
        }
    }

    /// The policies of a layer-wise combination.
    pub(crate) fn policies(self) -> Option<(LoadingPolicy, SchedulingPolicy)> {
        match self {
            Combo::Layerwise(l, s) | Combo::Cached(l, s) => Some((l, s)),
            Combo::StatusQuo => None,
        }
    }
}

impl fmt::Display for Combo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Combo::StatusQuo => write!(f, "status-quo"),
            Combo::Layerwise(l, s) => write!(f, "{l}+{s}"),
            Combo::Cached(l, s) => write!(f, "{l}+{s}+cache"),
        }
    }
}

impl std::str::FromStr for Combo {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Combo> {
        if s == "status-quo" {
            return Ok(Combo::StatusQuo);
        }
        let (policies, cached) = match s.strip_suffix("+cache") {
            Some(p) => (p, true),
            None => (s, false),
        };
        let Some((l, sch)) = policies.split_once('+') else {
            bail!("'{s}' is not LOADING+SCHEDULING[+cache] or status-quo");
        };
        let in_combo = |e: anyhow::Error| anyhow::anyhow!("{e} in '{s}'");
        let loading: LoadingPolicy = l.parse().map_err(in_combo)?;
        let scheduling: SchedulingPolicy = sch.parse().map_err(in_combo)?;
        Ok(if cached {
            Combo::Cached(loading, scheduling)
        } else {
            Combo::Layerwise(loading, scheduling)
        })
    }
}

/// The plan file as written.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    #[serde(default = "one")]
    repetitions: usize,
    memory: Vec<String>,
    #[serde(default)]
    loading: Vec<LoadingPolicy>,
    #[serde(default)]
    scheduling: Vec<SchedulingPolicy>,
    combos: Option<Vec<String>>,
    parallel: Vec<usize>,
    #[serde(default)]
    status_quo: bool,
    workers: Option<usize>,
    reserve: Option<String>,
    #[serde(default = "default_timeout")]
    timeout_secs: u64,
    #[serde(rename = "workload")]
    workloads: Vec<RawWorkload>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    name: String,
    models: Vec<String>,
    #[serde(default = "one")]
    frames: usize,
    loading: Option<Vec<LoadingPolicy>>,
    scheduling: Option<Vec<SchedulingPolicy>>,
    combos: Option<Vec<String>>,
    status_quo: Option<bool>,
}

/// `["bulk+fcfs", "partial+mema"]` into combinations.
fn parse_combos(list: &[String]) -> Result<Vec<Combo>> {
    list.iter().map(|c| c.parse()).collect()
}

/// A cross product of loading × scheduling.
fn cross(loading: &[LoadingPolicy], scheduling: &[SchedulingPolicy]) -> Vec<Combo> {
    loading
        .iter()
        .flat_map(|&l| scheduling.iter().map(move |&s| Combo::Layerwise(l, s)))
        .collect()
}

fn one() -> usize {
    1
}

fn default_timeout() -> u64 {
    600
}

/// One batch: these models, each on every one of `frames` frames.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// Its name in the plan (and in `runs.csv`).
    pub name: String,
    /// Model packages by name, in submission order.
    pub models: Vec<String>,
    /// Frames each model runs on.
    pub frames: usize,
    /// The combinations this workload runs (the plan's cross product unless it narrows it).
    pub(crate) combos: Vec<Combo>,
}

/// A validated plan.
#[derive(Clone, Debug, PartialEq)]
pub struct ExperimentPlan {
    pub(crate) repetitions: usize,
    /// The memory levels, in plan order.
    pub memory: Vec<MemoryLevel>,
    /// The parallelisms (inferences in flight) tried.
    pub parallel: Vec<usize>,
    /// Workers of each child (its default when absent).
    pub workers: Option<usize>,
    /// The children's `--reserve` (their default when absent).
    pub reserve: Option<Bytes>,
    pub(crate) timeout_secs: u64,
    /// The workloads, in plan order.
    pub workloads: Vec<Workload>,
}

/// One child run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSpec {
    /// 1-based, in execution order.
    pub id: usize,
    pub(crate) repetition: usize,
    /// The memory level it runs under.
    pub memory: MemoryLevel,
    /// Index into `ExperimentPlan::workloads`.
    pub workload: usize,
    /// What it runs.
    pub combo: Combo,
    /// Inferences in flight; the status quo runs one at a time and has 1.
    pub parallel: usize,
}

impl ExperimentPlan {
    /// Reads and validates a plan file.
    pub fn read(path: &Path) -> Result<ExperimentPlan> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        ExperimentPlan::parse(&text).with_context(|| format!("plan {}", path.display()))
    }

    /// Validates a plan's text: every level, policy and workload checked, so that a plan
    /// fails before its first run rather than in the middle.
    pub fn parse(text: &str) -> Result<ExperimentPlan> {
        let raw: RawPlan = toml::from_str(text)?;
        ensure!(raw.repetitions >= 1, "repetitions must be at least 1");
        ensure!(!raw.memory.is_empty(), "memory lists no level");
        let mut memory = vec![];
        for m in &raw.memory {
            let level: MemoryLevel = m.parse().with_context(|| format!("memory '{m}'"))?;
            ensure!(
                !memory.contains(&level),
                "memory level {level} is listed twice"
            );
            memory.push(level);
        }
        ensure!(!raw.parallel.is_empty(), "parallel lists no value");
        ensure!(
            raw.parallel.iter().all(|&p| p >= 1),
            "parallel values must be at least 1"
        );
        ensure!(raw.workers != Some(0), "workers must be at least 1");
        ensure!(raw.timeout_secs >= 1, "timeout_secs must be at least 1");
        let reserve = raw
            .reserve
            .as_deref()
            .map(|r| r.parse::<Bytes>().with_context(|| format!("reserve '{r}'")))
            .transpose()?;
        ensure!(!raw.workloads.is_empty(), "the plan has no [[workload]]");
        let plan_combos = match &raw.combos {
            Some(list) => {
                ensure!(
                    raw.loading.is_empty() && raw.scheduling.is_empty(),
                    "give combos or loading × scheduling, not both"
                );
                parse_combos(list)?
            }
            None => cross(&raw.loading, &raw.scheduling),
        };
        let mut workloads: Vec<Workload> = vec![];
        for w in raw.workloads {
            ensure!(
                !w.name.is_empty()
                    && w.name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
                "workload name '{}' must be non-empty letters, digits, '-', '_' or '.'",
                w.name
            );
            ensure!(
                workloads.iter().all(|x| x.name != w.name),
                "workload '{}' is listed twice",
                w.name
            );
            ensure!(!w.models.is_empty(), "workload '{}' has no models", w.name);
            ensure!(w.frames >= 1, "workload '{}': frames must be ≥ 1", w.name);
            // The workload's own list, else its own loading/scheduling crossed with the
            // plan's, else the plan's list, else the plan's cross product.
            let listed = match (&w.combos, &w.loading, &w.scheduling) {
                (Some(list), None, None) => parse_combos(list)?,
                (Some(_), _, _) => bail!(
                    "workload '{}': give combos or loading/scheduling, not both",
                    w.name
                ),
                (None, None, None) => plan_combos.clone(),
                (None, l, s) => cross(
                    l.as_deref().unwrap_or(&raw.loading),
                    s.as_deref().unwrap_or(&raw.scheduling),
                ),
            };
            let mut combos = vec![];
            if w.status_quo.unwrap_or(raw.status_quo) {
                combos.push(Combo::StatusQuo);
            }
            for c in listed {
                if !combos.contains(&c) {
                    combos.push(c);
                }
            }
            ensure!(
                !combos.is_empty(),
                "workload '{}' runs nothing (no loading × scheduling and no status quo)",
                w.name
            );
            workloads.push(Workload {
                name: w.name,
                models: w.models,
                frames: w.frames,
                combos,
            });
        }
        Ok(ExperimentPlan {
            repetitions: raw.repetitions,
            memory,
            parallel: raw.parallel,
            workers: raw.workers,
            reserve,
            timeout_secs: raw.timeout_secs,
            workloads,
        })
    }

    /// Every run, repetitions outermost so that slow drift of the machine (other load,
    /// page cache) spreads over all combinations instead of biasing the last ones. The
    /// status quo ignores parallelism and runs once per memory level and workload.
    pub fn expand(&self) -> Vec<RunSpec> {
        let mut runs = vec![];
        for repetition in 1..=self.repetitions {
            for &memory in &self.memory {
                for (workload, w) in self.workloads.iter().enumerate() {
                    let mut push = |combo, parallel| {
                        runs.push(RunSpec {
                            id: runs.len() + 1,
                            repetition,
                            memory,
                            workload,
                            combo,
                            parallel,
                        })
                    };
                    if w.combos.contains(&Combo::StatusQuo) {
                        push(Combo::StatusQuo, 1);
                    }
                    for &parallel in &self.parallel {
                        for &combo in w.combos.iter().filter(|c| **c != Combo::StatusQuo) {
                            push(combo, parallel);
                        }
                    }
                }
            }
        }
        runs
    }

    /// The plan narrowed to the named workloads (`bench --workload`): re-running one part
    /// of a plan, or adding a workload's rows to an earlier run's CSV. No names: all.
    pub fn only_workloads(mut self, names: &[String]) -> Result<ExperimentPlan> {
        if names.is_empty() {
            return Ok(self);
        }
        for name in names {
            ensure!(
                self.workloads.iter().any(|w| &w.name == name),
                "the plan has no workload '{name}' (it has: {})",
                self.workloads
                    .iter()
                    .map(|w| w.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        self.workloads.retain(|w| names.contains(&w.name));
        Ok(self)
    }

    /// Every model name any workload uses, once, in first-use order.
    pub fn models(&self) -> Vec<&str> {
        let mut out: Vec<&str> = vec![];
        for w in &self.workloads {
            for m in &w.models {
                if !out.contains(&m.as_str()) {
                    out.push(m);
                }
            }
        }
        out
    }

    pub(crate) fn max_frames(&self) -> usize {
        self.workloads.iter().map(|w| w.frames).max().unwrap_or(1)
    }

    /// What `bench --dry-run` prints: the runs per workload and in total.
    pub fn summary(&self) -> String {
        let runs = self.expand();
        let mut s = String::new();
        for (k, w) in self.workloads.iter().enumerate() {
            let n = runs.iter().filter(|r| r.workload == k).count();
            s += &format!(
                "{:<16} {} × {} frame(s), {} combination(s): {n} runs\n",
                w.name,
                w.models.join("+"),
                w.frames,
                w.combos.len()
            );
        }
        let levels: Vec<String> = self.memory.iter().map(|m| m.to_string()).collect();
        s += &format!(
            "{} runs: {} repetition(s) × memory [{}] × parallel {:?}\n",
            runs.len(),
            self.repetitions,
            levels.join(", "),
            self.parallel
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: &str = r#"
        repetitions = 2
        memory = ["none", "256M", "1G"]
        loading = ["bulk", "partial"]
        scheduling = ["fcfs", "mema"]
        parallel = [1, 2]
        status_quo = true

        [[workload]]
        name = "small"
        models = ["agenet", "gendernet", "sos_googlenet"]

        [[workload]]
        name = "large-2"
        models = ["agenet"]
        frames = 2
        loading = ["partial"]
        status_quo = false
    "#;

    #[test]
    fn expands_the_cross_product() {
        let plan = ExperimentPlan::parse(PLAN).unwrap();
        assert_eq!(
            plan.memory,
            vec![
                MemoryLevel::Unlimited,
                MemoryLevel::Limit(Bytes(256 << 20)),
                MemoryLevel::Limit(Bytes(1 << 30))
            ]
        );
        let runs = plan.expand();
        // Per repetition and memory level: small = 1 status quo + 2 parallel × 4 combos,
        // large-2 = 2 parallel × (partial × 2 schedulers).
        assert_eq!(runs.len(), 2 * 3 * ((1 + 2 * 4) + 2 * 2));
        assert!(runs.iter().enumerate().all(|(k, r)| r.id == k + 1));
        let sq: Vec<_> = runs
            .iter()
            .filter(|r| r.combo == Combo::StatusQuo)
            .collect();
        assert_eq!(sq.len(), 2 * 3);
        assert!(sq.iter().all(|r| r.parallel == 1 && r.workload == 0));
        assert!(
            runs.iter()
                .filter(|r| r.workload == 1)
                .all(|r| matches!(r.combo, Combo::Layerwise(LoadingPolicy::Partial, _)))
        );
        assert_eq!(runs.last().unwrap().repetition, 2);
        assert_eq!(plan.models(), vec!["agenet", "gendernet", "sos_googlenet"]);
        assert!(
            plan.summary().ends_with(
                "78 runs: 2 repetition(s) × memory [none, 256M, 1G] × parallel [1, 2]\n"
            )
        );
        assert!(plan.summary().starts_with("small            agenet+gendernet+sos_googlenet × 1 frame(s), 5 combination(s): 54 runs\n"), "{}", plan.summary());
        assert_eq!(plan.max_frames(), 2);
    }

    #[test]
    fn rejects_bad_plans_with_the_reason() {
        let bad = |text: &str, want: &str| {
            let e = format!("{:#}", ExperimentPlan::parse(text).unwrap_err());
            assert!(e.contains(want), "{e:?} does not mention {want:?}");
        };
        let base = |extra: &str| {
            format!(
                "memory = [\"256M\"]\nloading = [\"bulk\"]\nscheduling = [\"fcfs\"]\nparallel = [1]\n{extra}\n[[workload]]\nname = \"w\"\nmodels = [\"agenet\"]\n"
            )
        };
        assert!(ExperimentPlan::parse(&base("")).is_ok());
        bad(
            &base("").replace("256M", "256Q"),
            "unknown size unit 'q' in '256Q'",
        );
        bad(&base("").replace("256M", "1M"), "below 8 MiB");
        bad(&base("").replace("\"bulk\"", "\"bulky\""), "bulky");
        bad(&base("").replace("[1]", "[0]"), "at least 1");
        bad(&base("colour = 1"), "colour");
        bad(&base("combos = [\"bulk+fcfs\"]"), "not both");
        bad(
            &base("").replace(
                "loading = [\"bulk\"]\nscheduling = [\"fcfs\"]",
                "combos = [\"bulk+lifo\"]",
            ),
            "unknown scheduling policy 'lifo'",
        );
        let listed = ExperimentPlan::parse(&base("").replace(
            "loading = [\"bulk\"]\nscheduling = [\"fcfs\"]",
            "combos = [\"bulk+fcfs\", \"partial+mema\"]",
        ))
        .unwrap();
        assert_eq!(
            listed.workloads[0].combos,
            vec![
                Combo::Layerwise(LoadingPolicy::Bulk, SchedulingPolicy::Fcfs),
                Combo::Layerwise(LoadingPolicy::Partial, SchedulingPolicy::Mema)
            ]
        );
        bad(&base("repetitions = 0"), "repetitions");
        bad(
            &base("").replace("name = \"w\"", "name = \"a b\""),
            "workload name 'a b'",
        );
    }

    #[test]
    fn narrows_to_named_workloads() {
        let text = "memory = [\"none\"]\nloading = [\"bulk\"]\nscheduling = [\"fcfs\"]\nparallel = [1, 2]\n\
                    [[workload]]\nname = \"a\"\nmodels = [\"agenet\"]\n\
                    [[workload]]\nname = \"b\"\nmodels = [\"gendernet\"]\nframes = 3\n";
        let plan = ExperimentPlan::parse(text).unwrap();
        let b = plan.clone().only_workloads(&["b".to_string()]).unwrap();
        assert_eq!(b.workloads.len(), 1);
        assert_eq!(b.workloads[0].name, "b");
        assert_eq!(b.models(), vec!["gendernet"]);
        assert_eq!(b.expand().len(), 2);
        assert_eq!(plan.clone().only_workloads(&[]).unwrap(), plan);
        let e = format!("{:#}", plan.only_workloads(&["c".to_string()]).unwrap_err());
        assert!(e.contains("no workload 'c' (it has: a, b)"), "{e}");
    }

    #[test]
    fn names_round_trip() {
        for l in LoadingPolicy::ALL {
            for s in SchedulingPolicy::ALL {
                let c = Combo::Layerwise(l, s);
                assert_eq!(c.to_string().parse::<Combo>().unwrap(), c);
            }
        }
        assert_eq!("status-quo".parse::<Combo>().unwrap(), Combo::StatusQuo);
        assert!("bulk-fcfs".parse::<Combo>().is_err());
        for level in ["none", "256M", "1G", "1536M", "12345678"] {
            assert_eq!(
                level.parse::<MemoryLevel>().unwrap().to_string(),
                level,
                "{level}"
            );
        }
    }
}
