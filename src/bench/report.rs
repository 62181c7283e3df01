//! Results: one record per run, `runs.csv` (written and read back), and `table.md` with
//! speed-ups relative to bulk+fcfs in the shape of the paper's Table 3.

use super::child::{Exit, Status};
use super::plan::{BASELINE, Combo, MemoryLevel};
use anyhow::{Context, Result, bail, ensure};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

/// How a run's memory level was applied (its names: `crate::names`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LimitMode {
    /// A cgroup limit (the kernel enforces it; exceeding it means an OOM kill).
    Cgroup,
    /// No cgroup could be limited here: the child got `--budget` with the level, so only
    /// the scheduler's ledger held to it and nothing was enforced.
    BudgetOnly,
    /// The unconstrained level.
    Unlimited,
}

/// One row of `runs.csv`.
#[derive(Clone, Debug, PartialEq)]
pub struct RunRecord {
    /// The run's number (1-based, execution order).
    pub run: usize,
    pub(crate) repetition: usize,
    /// The memory level it ran under.
    pub memory: MemoryLevel,
    /// How the level was enforced (a cgroup, or only a `--budget`).
    pub limit: LimitMode,
    /// The workload's name.
    pub workload: String,
    /// Model names joined by `+`.
    pub models: String,
    /// Frames each model ran on.
    pub frames: usize,
    /// Layers executed by the whole batch (all models × frames): the x axis of Figure 9.
    pub layers: usize,
    /// What ran.
    pub combo: Combo,
    /// Inferences in flight at once.
    pub parallel: usize,
    /// Workers of the child.
    pub workers: usize,
    /// The verdict.
    pub status: Status,
    pub(crate) exit: Exit,
    /// From the child's report; only for runs that finished.
    pub makespan_ms: Option<f64>,
    /// Spawn to reaping, as the bench saw it (process start and model decoding included).
    pub(crate) wall_ms: f64,
    /// CPU time (user + system) the child used: unlike the makespan, barely changed by
    /// other load on the machine.
    pub(crate) cpu_ms: Option<f64>,
    /// The machine's 1-minute load average when the run started (other users' load).
    pub(crate) load1: Option<f64>,
    /// The child's VmHWM from its report.
    pub peak_rss: Option<u64>,
    /// The cgroup's peak usage (page cache included).
    pub cgroup_peak: Option<u64>,
    /// OOM kills in the run's cgroup.
    pub oom_kills: Option<u64>,
    /// The ledger's highest value, from the child's report.
    pub ledger_high_water: Option<u64>,
    /// Times the ledger went beyond the budget, from the child's report.
    pub overdrafts: Option<u64>,
    /// Why a run did not finish: the last line the child wrote to stderr.
    pub error: String,
}

pub(crate) const HEADER: [&str; 27] = [
    "run",
    "repetition",
    "memory",
    "memory_bytes",
    "limit",
    "workload",
    "models",
    "frames",
    "layers",
    "combo",
    "loading",
    "scheduling",
    "parallel",
    "workers",
    "status",
    "oom_killed",
    "exit",
    "makespan_ms",
    "wall_ms",
    "cpu_ms",
    "load1",
    "peak_rss_bytes",
    "cgroup_peak_bytes",
    "oom_kills",
    "ledger_high_water_bytes",
    "overdrafts",
    "error",
];

/// Columns a `runs.csv` may lack: written by benches before they existed.
const OPTIONAL: [&str; 2] = ["cpu_ms", "load1"];

pub(crate) fn header_line() -> String {
    HEADER.join(",")
}

/// A CSV field: quoted (quotes doubled) when it holds a comma, quote or line break.
fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

impl RunRecord {
    pub(crate) fn csv_line(&self) -> String {
        let (loading, scheduling) = match self.combo.policies() {
            Some((l, s)) => (l.to_string(), s.to_string()),
            None => (String::new(), String::new()),
        };
        let fields: Vec<String> = vec![
            self.run.to_string(),
            self.repetition.to_string(),
            self.memory.to_string(),
            opt(self.memory.bytes()),
            self.limit.to_string(),
            self.workload.clone(),
            self.models.clone(),
            self.frames.to_string(),
            self.layers.to_string(),
            self.combo.to_string(),
            loading,
            scheduling,
            self.parallel.to_string(),
            self.workers.to_string(),
            self.status.to_string(),
            if self.status == Status::OomKilled {
                "yes"
            } else {
                "no"
            }
            .into(),
            self.exit.to_string(),
            opt(self.makespan_ms.map(|v| format!("{v:.1}"))),
            format!("{:.1}", self.wall_ms),
            opt(self.cpu_ms.map(|v| format!("{v:.1}"))),
            opt(self.load1.map(|v| format!("{v:.2}"))),
            opt(self.peak_rss),
            opt(self.cgroup_peak),
            opt(self.oom_kills),
            opt(self.ledger_high_water),
            opt(self.overdrafts),
            self.error.clone(),
        ];
        fields
            .iter()
            .map(|f| field(f))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Splits CSV text into records of fields (RFC 4180: quoted fields may hold commas,
/// doubled quotes and line breaks).
fn parse_csv(text: &str) -> Result<Vec<Vec<String>>> {
    let mut rows = vec![];
    let mut row = vec![];
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    let mut at_start = true;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    cur.push('"');
                }
                '"' => quoted = false,
                _ => cur.push(c),
            }
            continue;
        }
        match c {
            '"' if at_start => {
                quoted = true;
                at_start = false;
            }
            ',' => {
                row.push(std::mem::take(&mut cur));
                at_start = true;
            }
            '\r' => {}
            '\n' => {
                row.push(std::mem::take(&mut cur));
                rows.push(std::mem::take(&mut row));
                at_start = true;
            }
            _ => {
                cur.push(c);
                at_start = false;
            }
        }
    }
    ensure!(!quoted, "unterminated quoted field");
    if !cur.is_empty() || !row.is_empty() {
        row.push(cur);
        rows.push(row);
    }
    Ok(rows)
}

/// Reads `runs.csv` back into records (for re-plotting and for checking a bench's output).
/// Columns are found by name; only those in `OPTIONAL` may be missing.
pub fn read_csv(text: &str) -> Result<Vec<RunRecord>> {
    let rows = parse_csv(text)?;
    let Some((head, body)) = rows.split_first() else {
        bail!("empty CSV");
    };
    for name in HEADER {
        ensure!(
            head.iter().any(|h| h == name) || OPTIONAL.contains(&name),
            "no column '{name}' in the header: {}",
            head.join(",")
        );
    }
    body.iter()
        .enumerate()
        .map(|(k, r)| parse_record(head, r).with_context(|| format!("runs.csv line {}", k + 2)))
        .collect()
}

fn parse_record(head: &[String], r: &[String]) -> Result<RunRecord> {
    ensure!(
        r.len() == head.len(),
        "{} fields, the header has {}",
        r.len(),
        head.len()
    );
    let get = |name: &str| -> &str {
        head.iter()
            .position(|h| h == name)
            .map_or("", |i| r[i].as_str())
    };
    fn num<T: std::str::FromStr>(s: &str, what: &str) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        s.parse().map_err(|e| anyhow::anyhow!("{what} '{s}': {e}"))
    }
    fn maybe<T: std::str::FromStr>(s: &str, what: &str) -> Result<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        if s.is_empty() {
            Ok(None)
        } else {
            num(s, what).map(Some)
        }
    }
    let record = RunRecord {
        run: num(get("run"), "run")?,
        repetition: num(get("repetition"), "repetition")?,
        memory: get("memory").parse()?,
        limit: get("limit").parse()?,
        workload: get("workload").to_string(),
        models: get("models").to_string(),
        frames: num(get("frames"), "frames")?,
        layers: num(get("layers"), "layers")?,
        combo: get("combo").parse()?,
        parallel: num(get("parallel"), "parallel")?,
        workers: num(get("workers"), "workers")?,
        status: get("status").parse()?,
        exit: get("exit").parse()?,
        makespan_ms: maybe(get("makespan_ms"), "makespan_ms")?,
        wall_ms: num(get("wall_ms"), "wall_ms")?,
        cpu_ms: maybe(get("cpu_ms"), "cpu_ms")?,
        load1: maybe(get("load1"), "load1")?,
        peak_rss: maybe(get("peak_rss_bytes"), "peak_rss_bytes")?,
        cgroup_peak: maybe(get("cgroup_peak_bytes"), "cgroup_peak_bytes")?,
        oom_kills: maybe(get("oom_kills"), "oom_kills")?,
        ledger_high_water: maybe(get("ledger_high_water_bytes"), "ledger_high_water_bytes")?,
        overdrafts: maybe(get("overdrafts"), "overdrafts")?,
        error: get("error").to_string(),
    };
    ensure!(
        opt(record.memory.bytes()) == get("memory_bytes"),
        "memory_bytes {} does not match memory {}",
        get("memory_bytes"),
        get("memory")
    );
    ensure!(
        (get("oom_killed") == "yes") == (record.status == Status::OomKilled),
        "oom_killed '{}' contradicts status '{}'",
        get("oom_killed"),
        get("status")
    );
    ensure!(
        record.status != Status::Ok || record.makespan_ms.is_some(),
        "an ok run without makespan"
    );
    Ok(record)
}

/// Runs of one combination in one comparable group (memory level, workload, parallelism).
#[derive(Clone, Debug, Default)]
pub(crate) struct Outcomes {
    /// Makespans of the runs that finished, ms.
    pub(crate) makespans: Vec<f64>,
    pub peak_rss: Vec<u64>,
    /// Run numbers of the runs OOM-killed, and of those that failed or timed out.
    pub(crate) oom_killed: Vec<usize>,
    pub failed: Vec<usize>,
    pub runs: usize,
}

impl Outcomes {
    pub(crate) fn mean_ms(&self) -> Option<f64> {
        mean(&self.makespans)
    }
}

pub(crate) fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// The parallelisms of the layer-wise runs, ascending, each once (the status quo has none).
fn parallelisms(records: &[RunRecord]) -> Vec<usize> {
    let mut p: Vec<usize> = records
        .iter()
        .filter(|r| r.combo != Combo::StatusQuo)
        .map(|r| r.parallel)
        .collect();
    p.sort_unstable();
    p.dedup();
    p
}

/// Key of a comparable group: memory level, workload, parallelism.
pub(crate) type GroupKey = (MemoryLevel, String, usize);

/// Every combination's outcomes per group. The status quo runs once per memory level and
/// workload (it has no parallelism), so it joins every parallelism's group of those.
pub(crate) fn group(records: &[RunRecord]) -> BTreeMap<GroupKey, BTreeMap<ComboKey, Outcomes>> {
    let parallels: Vec<usize> = {
        let p = parallelisms(records);
        if p.is_empty() { vec![1] } else { p }
    };
    let mut groups: BTreeMap<GroupKey, BTreeMap<ComboKey, Outcomes>> = BTreeMap::new();
    for r in records {
        let ps: &[usize] = if r.combo == Combo::StatusQuo {
            &parallels
        } else {
            std::slice::from_ref(&r.parallel)
        };
        for &p in ps {
            let o = groups
                .entry((r.memory, r.workload.clone(), p))
                .or_default()
                .entry(ComboKey(r.combo))
                .or_default();
            o.runs += 1;
            match r.status {
                Status::Ok => {
                    o.makespans.extend(r.makespan_ms);
                    o.peak_rss.extend(r.peak_rss);
                }
                Status::OomKilled => o.oom_killed.push(r.run),
                Status::Failed | Status::Timeout => o.failed.push(r.run),
            }
        }
    }
    groups
}

/// `Combo` ordered as the paper's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ComboKey(pub Combo);

impl Ord for ComboKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.sort_key().cmp(&other.0.sort_key())
    }
}

impl PartialOrd for ComboKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// One cell of a speed-up table: the mean over the groups at that memory level where
/// both the baseline and the combination finished, and why the other groups have none.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Cell {
    pub(crate) ratios: Vec<f64>,
    /// Groups where no reference run finished (all OOM-killed or failed), and of those
    /// the groups where at least one reference run was OOM-killed.
    pub(crate) baseline_missing: usize,
    pub(crate) baseline_oom: usize,
    /// Groups where no run of this combination finished.
    pub(crate) combo_missing: usize,
    /// Runs of this combination that were OOM-killed, and that failed otherwise (by run
    /// number: the status quo joins the groups of every parallelism, yet is one run).
    pub(crate) oom_killed: BTreeSet<usize>,
    pub failed: BTreeSet<usize>,
}

impl Cell {
    pub(crate) fn value(&self) -> Option<f64> {
        mean(&self.ratios)
    }
}

/// Rows (combinations, table order) × columns (memory levels, plan order) of `f(group
/// outcomes of the combination, group outcomes of the reference)`.
pub(crate) struct Table {
    pub(crate) levels: Vec<MemoryLevel>,
    pub rows: Vec<(Combo, Vec<Cell>)>,
}

/// Speed-up relative to bulk+fcfs: in each group, mean baseline makespan / mean makespan
/// of the combination; averaged over the groups at each memory level (optionally one
/// parallelism only).
pub(crate) fn speedup_table(
    records: &[RunRecord],
    levels: &[MemoryLevel],
    parallel: Option<usize>,
) -> Table {
    table_from(records, levels, parallel, Reference::Baseline)
}

/// Slow-down relative to the combination's own unconstrained time: in each group, mean
/// makespan at the level / mean makespan at `none` (same workload and parallelism).
pub(crate) fn slowdown_table(
    records: &[RunRecord],
    levels: &[MemoryLevel],
    parallel: Option<usize>,
) -> Table {
    table_from(records, levels, parallel, Reference::Unconstrained)
}

/// What a table's cells compare a combination's makespan with.
#[derive(Clone, Copy)]
enum Reference {
    /// bulk+fcfs in the same group: reference / own (a speed-up).
    Baseline,
    /// The same combination at `none`, same workload and parallelism: own / reference (a
    /// slow-down).
    Unconstrained,
}

fn table_from(
    records: &[RunRecord],
    levels: &[MemoryLevel],
    parallel: Option<usize>,
    reference_of: Reference,
) -> Table {
    let groups = group(records);
    let reference = |(level, workload, p): &GroupKey, combo: Combo| {
        let (key, combo) = match reference_of {
            Reference::Baseline => ((*level, workload.clone(), *p), BASELINE),
            Reference::Unconstrained => ((MemoryLevel::Unlimited, workload.clone(), *p), combo),
        };
        groups.get(&key)?.get(&ComboKey(combo)).cloned()
    };
    let ratio = |reference: f64, own: f64| match reference_of {
        Reference::Baseline => reference / own,
        Reference::Unconstrained => own / reference,
    };
    let mut combos: Vec<ComboKey> = groups.values().flat_map(|g| g.keys().copied()).collect();
    combos.sort();
    combos.dedup();
    let rows = combos
        .into_iter()
        .map(|ComboKey(combo)| {
            let cells = levels
                .iter()
                .map(|level| {
                    let mut cell = Cell::default();
                    for (key, g) in &groups {
                        if key.0 != *level || parallel.is_some_and(|p| p != key.2) {
                            continue;
                        }
                        let Some(own) = g.get(&ComboKey(combo)) else {
                            continue;
                        };
                        // A reference the plan never ran (no bulk+fcfs, no `none` level)
                        // says nothing; one that ran and never finished is noted.
                        let Some(reference) = reference(key, combo) else {
                            continue;
                        };
                        cell.oom_killed.extend(&own.oom_killed);
                        cell.failed.extend(&own.failed);
                        match (reference.mean_ms(), own.mean_ms()) {
                            (None, _) => {
                                cell.baseline_missing += 1;
                                if !reference.oom_killed.is_empty() {
                                    cell.baseline_oom += 1;
                                }
                            }
                            (Some(_), None) => cell.combo_missing += 1,
                            (Some(r), Some(c)) => cell.ratios.push(ratio(r, c)),
                        }
                    }
                    cell
                })
                .collect();
            (combo, cells)
        })
        .collect();
    Table {
        levels: levels.to_vec(),
        rows,
    }
}

impl Table {
    /// Markdown; `reference` names what the cells were divided by, for the notes.
    pub(crate) fn markdown(&self, reference: &str) -> String {
        let mut s = String::new();
        let _ = write!(s, "| loading+scheduling |");
        for l in &self.levels {
            let _ = write!(s, " {l} |");
        }
        s.push('\n');
        s.push_str("|---|");
        for _ in &self.levels {
            s.push_str("---:|");
        }
        s.push('\n');
        for (combo, cells) in &self.rows {
            let _ = write!(s, "| {combo} |");
            for c in cells {
                let _ = write!(s, " {} |", c.render(reference));
            }
            s.push('\n');
        }
        s
    }
}

impl Cell {
    /// `2.31`, with notes for what is left out of the mean: `2.31 (1/3 groups: bulk+fcfs
    /// OOM-killed)`, or why there is no value at all.
    pub(crate) fn render(&self, reference: &str) -> String {
        let groups = self.ratios.len() + self.baseline_missing + self.combo_missing;
        if groups == 0 {
            return "–".into();
        }
        let mut notes = vec![];
        if self.baseline_missing > 0 {
            let why = if self.baseline_oom == self.baseline_missing {
                "OOM-killed"
            } else {
                "did not finish"
            };
            notes.push(format!(
                "{reference} {why} in {}/{groups} groups",
                self.baseline_missing
            ));
        }
        if !self.oom_killed.is_empty() {
            notes.push(format!("{} OOM-killed", runs(self.oom_killed.len())));
        }
        if !self.failed.is_empty() {
            notes.push(format!("{} failed", runs(self.failed.len())));
        }
        let notes = if notes.is_empty() {
            String::new()
        } else {
            format!(" ({})", notes.join("; "))
        };
        match self.value() {
            Some(v) => format!("{v:.2}{notes}"),
            None if self.combo_missing > 0 => format!("none finished{notes}"),
            None => format!("–{notes}"),
        }
    }
}

fn runs(n: usize) -> String {
    format!("{n} run{}", if n == 1 { "" } else { "s" })
}

/// Mean makespan and peak RSS of every combination in every group, with its failures.
pub(crate) fn detail_markdown(records: &[RunRecord]) -> String {
    let groups = group(records);
    let mut s = String::from(
        "| memory | workload | parallel | loading+scheduling | runs | finished | OOM-killed | failed | mean makespan (s) | speed-up vs bulk+fcfs | mean peak RSS (MiB) |\n|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for ((level, workload, p), g) in &groups {
        let baseline = g.get(&ComboKey(BASELINE));
        let base = baseline.and_then(|o| o.mean_ms());
        for (ComboKey(combo), o) in g {
            let m = o.mean_ms();
            let rss = mean(&o.peak_rss.iter().map(|&b| b as f64).collect::<Vec<_>>());
            let _ = writeln!(
                s,
                "| {level} | {workload} | {p} | {combo} | {} | {} | {} | {} | {} | {} | {} |",
                o.runs,
                o.makespans.len(),
                o.oom_killed.len(),
                o.failed.len(),
                m.map(|v| format!("{:.2}", v / 1e3)).unwrap_or("–".into()),
                match (base, m) {
                    (Some(b), Some(c)) => format!("{:.2}", b / c),
                    (None, Some(_)) if baseline.is_none() => "no bulk+fcfs in this workload".into(),
                    (None, Some(_)) => "bulk+fcfs did not finish".into(),
                    _ => "–".into(),
                },
                rss.map(|v| format!("{:.0}", v / 1048576.0))
                    .unwrap_or("–".into()),
            );
        }
    }
    s
}

/// `table.md`: counts, the speed-up tables (all runs, then per parallelism), the slow-down
/// against each combination's own unconstrained time, and the per-group details.
pub(crate) fn table_markdown(records: &[RunRecord], levels: &[MemoryLevel], plan: &str) -> String {
    let mut s = format!("# memaflow bench: {plan}\n\n");
    let count = |st: Status| records.iter().filter(|r| r.status == st).count();
    let _ = writeln!(
        s,
        "{} runs: {} finished, {} OOM-killed, {} failed, {} timed out.",
        records.len(),
        count(Status::Ok),
        count(Status::OomKilled),
        count(Status::Failed),
        count(Status::Timeout)
    );
    let budget_only = records
        .iter()
        .filter(|r| r.limit == LimitMode::BudgetOnly)
        .count();
    if budget_only > 0 {
        let _ = writeln!(
            s,
            "\n**{budget_only} runs are budget-only**: no cgroup could be limited on this host, so their \
             memory level was passed as `--budget` and nothing enforced it (no OOM kill was possible)."
        );
    }
    s.push_str(
        "\n## Speed-up relative to bulk+fcfs\n\nThe shape of the paper's Table 3. In every group of runs \
         (memory level, workload, parallelism) the mean makespan of bulk+fcfs divided by the \
         combination's mean makespan; a cell is the mean over the groups at that level. \
         Groups where bulk+fcfs never finished (OOM-killed or failed) cannot be divided and are \
         counted in the note instead; OOM-killed and failed runs of the combination are counted \
         too. The status quo (each model whole in tract, one after another) has no parallelism \
         and is compared with bulk+fcfs at every parallelism.\n\n",
    );
    s.push_str(&speedup_table(records, levels, None).markdown("bulk+fcfs"));
    let parallels = parallelisms(records);
    if parallels.len() > 1 {
        for p in &parallels {
            let _ = writeln!(s, "\n### Parallel {p}\n");
            s.push_str(&speedup_table(records, levels, Some(*p)).markdown("bulk+fcfs"));
        }
    }
    if levels.contains(&MemoryLevel::Unlimited) {
        s.push_str(
            "\n## Slow-down relative to the combination's own unconstrained time\n\n\
             Mean makespan at the level divided by the same combination's mean makespan at \
             `none` (same workload and parallelism); 1.00 means the limit cost nothing.\n\n",
        );
        s.push_str(&slowdown_table(records, levels, None).markdown("the unconstrained run"));
        if parallels.len() > 1 {
            for p in &parallels {
                let _ = writeln!(s, "\n### Parallel {p}\n");
                s.push_str(
                    &slowdown_table(records, levels, Some(*p)).markdown("the unconstrained run"),
                );
            }
        }
    }
    s.push_str("\n## Every group\n\n");
    s.push_str(&detail_markdown(records));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Bytes;
    use crate::runtime::{LoadingPolicy, SchedulingPolicy};

    pub(crate) fn record(
        run: usize,
        memory: MemoryLevel,
        combo: Combo,
        parallel: usize,
        status: Status,
        makespan: Option<f64>,
    ) -> RunRecord {
        RunRecord {
            run,
            repetition: 1,
            memory,
            limit: if memory == MemoryLevel::Unlimited {
                LimitMode::Unlimited
            } else {
                LimitMode::Cgroup
            },
            workload: "w".into(),
            models: "agenet+gendernet".into(),
            frames: 1,
            layers: 40,
            combo,
            parallel,
            workers: 2,
            status,
            exit: match status {
                Status::Ok => Exit::Code(0),
                Status::OomKilled => Exit::Signal(9),
                _ => Exit::Code(2),
            },
            makespan_ms: makespan,
            wall_ms: makespan.unwrap_or(5.0) + 100.0,
            cpu_ms: Some(1500.0),
            load1: Some(0.25),
            peak_rss: makespan.map(|_| 100 << 20),
            cgroup_peak: Some(120 << 20),
            oom_kills: Some(u64::from(status == Status::OomKilled)),
            ledger_high_water: None,
            overdrafts: None,
            error: if status == Status::Failed {
                "memaflow: error: bad, \"quoted\"\nthing".into()
            } else {
                String::new()
            },
        }
    }

    const PM: Combo = Combo::Layerwise(LoadingPolicy::Partial, SchedulingPolicy::Mema);

    #[test]
    fn csv_round_trips() {
        let m = MemoryLevel::Limit(Bytes(256 << 20));
        let records = vec![
            record(1, m, BASELINE, 2, Status::OomKilled, None),
            record(2, m, PM, 2, Status::Ok, Some(1234.5)),
            record(
                3,
                MemoryLevel::Unlimited,
                Combo::StatusQuo,
                1,
                Status::Failed,
                None,
            ),
        ];
        let mut text = header_line() + "\n";
        for r in &records {
            text += &(r.csv_line() + "\n");
        }
        assert_eq!(read_csv(&text).unwrap(), records);
        assert!(read_csv("run,x\n").is_err());
        // A file from before cpu_ms and load1 existed still reads.
        let old: String = parse_csv(&text)
            .unwrap()
            .iter()
            .map(|f| {
                let kept: Vec<String> = f
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !matches!(HEADER[*i], "cpu_ms" | "load1"))
                    .map(|(_, v)| field(v))
                    .collect();
                kept.join(",") + "\n"
            })
            .collect();
        let back = read_csv(&old).unwrap();
        assert!(back.iter().all(|r| r.cpu_ms.is_none() && r.load1.is_none()));
        assert_eq!(back[1].makespan_ms, Some(1234.5));
        let bad = text.replace(",oom-killed,yes,", ",oom-killed,no,");
        assert!(format!("{:#}", read_csv(&bad).unwrap_err()).contains("contradicts"));
    }

    #[test]
    fn speedups_follow_the_baseline_and_say_when_it_is_missing() {
        let m256 = MemoryLevel::Limit(Bytes(256 << 20));
        let none = MemoryLevel::Unlimited;
        let records = vec![
            // Unconstrained: baseline 2 s and 4 s (mean 3), partial+mema 1.5 s → 2.0.
            record(1, none, BASELINE, 2, Status::Ok, Some(2000.0)),
            record(2, none, BASELINE, 2, Status::Ok, Some(4000.0)),
            record(3, none, PM, 2, Status::Ok, Some(1500.0)),
            record(4, none, Combo::StatusQuo, 1, Status::Ok, Some(6000.0)),
            // 256M: the baseline was OOM-killed; partial+mema took 1.8 s.
            record(5, m256, BASELINE, 2, Status::OomKilled, None),
            record(6, m256, PM, 2, Status::Ok, Some(1800.0)),
            record(7, m256, Combo::StatusQuo, 1, Status::OomKilled, None),
        ];
        let levels = [none, m256];
        let t = speedup_table(&records, &levels, None);
        let row = |c: Combo| &t.rows.iter().find(|(x, _)| *x == c).unwrap().1;
        assert_eq!(t.rows[0].0, Combo::StatusQuo, "status quo first");
        assert_eq!(row(PM)[0].value(), Some(2.0));
        assert_eq!(row(Combo::StatusQuo)[0].value(), Some(0.5));
        assert_eq!(row(BASELINE)[0].value(), Some(1.0));
        assert_eq!(row(PM)[1].value(), None);
        assert_eq!(row(PM)[1].baseline_missing, 1);
        assert_eq!(
            row(PM)[1].render("bulk+fcfs"),
            "– (bulk+fcfs OOM-killed in 1/1 groups)"
        );
        assert_eq!(
            row(BASELINE)[1].render("bulk+fcfs"),
            "– (bulk+fcfs OOM-killed in 1/1 groups; 1 run OOM-killed)"
        );
        // Parallel 1 and 2 groups both hold the one status-quo run: it counts once.
        let mut two = records.clone();
        two.push(record(8, m256, BASELINE, 1, Status::OomKilled, None));
        let t2 = speedup_table(&two, &levels, None);
        let sq = &t2
            .rows
            .iter()
            .find(|(x, _)| *x == Combo::StatusQuo)
            .unwrap()
            .1;
        assert_eq!(
            sq[1].render("bulk+fcfs"),
            "– (bulk+fcfs OOM-killed in 2/2 groups; 1 run OOM-killed)"
        );
        let md = t.markdown("bulk+fcfs");
        assert!(md.starts_with("| loading+scheduling | none | 256M |\n"));
        assert!(md.contains("| partial+mema | 2.00 |"), "{md}");
        // Only parallel 1 runs: the status quo alone, with no baseline.
        let t1 = speedup_table(&records, &levels, Some(1));
        assert!(
            t1.rows
                .iter()
                .all(|(_, cells)| cells.iter().all(|c| c.ratios.is_empty()))
        );

        let s = slowdown_table(&records, &levels, None);
        let row = |c: Combo| &s.rows.iter().find(|(x, _)| *x == c).unwrap().1;
        assert_eq!(row(PM)[0].value(), Some(1.0));
        assert!((row(PM)[1].value().unwrap() - 1.2).abs() < 1e-9);
        assert_eq!(row(BASELINE)[1].value(), None);
        assert_eq!(row(BASELINE)[1].combo_missing, 1);

        let detail = detail_markdown(&records);
        assert!(detail.contains("| 256M | w | 2 | partial+mema | 1 | 1 | 0 | 0 | 1.80 | bulk+fcfs did not finish | 100 |"), "{detail}");
        // A workload that never runs bulk+fcfs (the paper's large batches) says so.
        let mut lone = record(9, m256, PM, 2, Status::Ok, Some(900.0));
        lone.workload = "large".into();
        let detail = detail_markdown(&[lone]);
        assert!(
            detail.contains("| no bulk+fcfs in this workload |"),
            "{detail}"
        );
    }
}
