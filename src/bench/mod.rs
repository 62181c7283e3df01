//! Experiments (`memaflow bench`): an experiment plan expanded into runs, each a fresh
//! `memaflow batch` child inside a memory cgroup with the run's limit, recorded in
//! `runs.csv`, summarised as speed-ups relative to bulk+fcfs (`table.md`, the shape of
//! the paper's Table 3) and drawn as SVG plots. See `docs/bench.md`.
//!
//! `status_quo` (each model whole in tract, one after another) is always built: `batch
//! --status-quo` uses it. The rest needs the `bench` feature (cgroups-rs, plotters,
//! indicatif).

pub(crate) mod status_quo;

#[cfg(feature = "bench")]
mod cgroup;
#[cfg(feature = "bench")]
pub mod child;
#[cfg(feature = "bench")]
pub mod plan;
#[cfg(feature = "bench")]
mod plot;
#[cfg(feature = "bench")]
pub mod report;

#[cfg(feature = "bench")]
pub use run::{BenchOptions, BenchSummary, replot, run};

#[cfg(feature = "bench")]
mod run {
    use super::cgroup::{BenchCgroups, CgroupStats};
    use super::child::{self, Status};
    use super::plan::{Combo, ExperimentPlan, MemoryLevel, RunSpec};
    use super::report::{self, LimitMode, RunRecord};
    use super::{plot, report::header_line};
    use crate::memory::Bytes;
    use crate::model::{OutdatedFormat, Package, zoo};
    use crate::runtime::LayerCache;
    use anyhow::{Context, Result, bail};
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    /// What `memaflow bench` is told: the plan, where results go, and where models, frames
    /// and cgroups come from.
    pub struct BenchOptions {
        /// The experiment plan (TOML).
        pub plan: PathBuf,
        /// Where `runs.csv`, `table.md` and the plots go.
        pub out: PathBuf,
        /// Model packages by name (`DIR/NAME`); zoo networks missing there are generated.
        /// Default: `OUT/models`.
        pub models: Option<PathBuf>,
        /// Frames to use (sorted by name, reused in turn when a workload needs more);
        /// default: deterministic 500×500 frames generated into `OUT/frames`.
        pub frames: Option<PathBuf>,
        /// Where run cgroups are made (default: `memaflow-bench` in our own cgroup).
        pub cgroup_parent: Option<PathBuf>,
        /// Do not use cgroups at all: every limited level becomes a `--budget`.
        pub no_cgroup: bool,
        /// Run only these workloads of the plan (all when empty).
        pub workloads: Vec<String>,
        /// The `memaflow` binary the children run.
        pub program: PathBuf,
    }

    /// What a bench did, for its last lines of output.
    #[derive(Debug, Default)]
    pub struct BenchSummary {
        /// Child runs made.
        pub runs: usize,
        /// Runs per verdict.
        pub by_status: Vec<(Status, usize)>,
        /// No cgroups were used: limits were only `--budget`s (not comparable with the paper).
        pub budget_only: bool,
        /// Files written.
        pub files: Vec<PathBuf>,
    }

    /// What the child's `--report` JSON holds that the bench reads (layer-wise batches
    /// and the status quo both write `makespan_ms` and `peak_rss`).
    #[derive(serde::Deserialize)]
    struct ChildReport {
        makespan_ms: f64,
        peak_rss: u64,
        ledger_high_water: Option<u64>,
        overdrafts: Option<u64>,
    }

    /// Runs every child of the plan in turn (each in a fresh cgroup with its level's limit),
    /// appends each to `runs.csv` as it ends, then writes the tables and plots.
    pub fn run(o: &BenchOptions) -> Result<BenchSummary> {
        let plan = ExperimentPlan::read(&o.plan)?.only_workloads(&o.workloads)?;
        let runs = plan.expand();
        std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
        std::fs::copy(&o.plan, o.out.join("plan.toml"))
            .with_context(|| format!("copying the plan into {}", o.out.display()))?;
        let models_dir = o.models.clone().unwrap_or_else(|| o.out.join("models"));
        let mut layers = std::collections::HashMap::new();
        for name in plan.models() {
            let dir = prepare_model(&models_dir, name)?;
            let pkg = Package::open(&dir)?;
            layers.insert(name.to_string(), (dir, pkg.manifest.layers.len()));
        }
        let frames = match &o.frames {
            Some(dir) => frames_in(dir, plan.max_frames())?,
            None => generate_frames(&o.out.join("frames"), plan.max_frames())?,
        };

        let cgroups = prepare_cgroups(o);

        let csv_path = o.out.join("runs.csv");
        let mut csv = std::fs::File::create(&csv_path)
            .with_context(|| format!("creating {}", csv_path.display()))?;
        writeln!(csv, "{}", header_line())?;
        let workers = plan
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let progress = progress_bar(runs.len());
        let mut records = vec![];
        for spec in &runs {
            let w = &plan.workloads[spec.workload];
            progress.set_message(format!(
                "{} {} p{} {}",
                spec.memory, w.name, spec.parallel, spec.combo
            ));
            let record = run_one(o, &plan, spec, &layers, &frames, cgroups.as_ref(), workers)
                .with_context(|| format!("run {}", spec.id))?;
            writeln!(csv, "{}", record.csv_line())?;
            csv.flush()?;
            let line = format!(
                "run {}/{}: {} {} p{} {}: {}{}",
                spec.id,
                runs.len(),
                spec.memory,
                w.name,
                spec.parallel,
                spec.combo,
                record.status,
                record
                    .makespan_ms
                    .map(|m| format!(" {:.2} s", m / 1e3))
                    .unwrap_or_default()
            );
            if progress.is_hidden() {
                eprintln!("memaflow bench: {line}");
            } else {
                progress.println(line);
            }
            progress.inc(1);
            records.push(record);
        }
        progress.finish_and_clear();
        let budget_only = cgroups.is_none();
        if let Some(c) = cgroups {
            c.finish();
        }

        let mut files = vec![csv_path];
        files.extend(summarise(
            &records,
            &plan.memory,
            &o.plan.display().to_string(),
            &o.out,
        )?);
        Ok(BenchSummary {
            runs: records.len(),
            by_status: count_by_status(&records),
            budget_only,
            files,
        })
    }

    /// The cgroups the runs are limited by, or `None` (with a warning) where no cgroup can
    /// be limited or `--no-cgroup` says not to.
    fn prepare_cgroups(o: &BenchOptions) -> Option<BenchCgroups> {
        if o.no_cgroup {
            eprintln!(
                "memaflow bench: --no-cgroup: memory levels are passed as --budget only and not enforced; rows are marked limit=budget-only"
            );
            return None;
        }
        match BenchCgroups::prepare(o.cgroup_parent.as_deref()) {
            Ok(c) => {
                eprintln!(
                    "memaflow bench: memory limits enforced by cgroup {:?} under {}",
                    c.version(),
                    c.parent().display()
                );
                Some(c)
            }
            Err(e) => {
                eprintln!(
                    "memaflow bench: WARNING: memory limits cannot be enforced here: {e:#}\n\
                     memaflow bench: running every level with --budget only (the scheduler's ledger, nothing enforced); rows are marked limit=budget-only"
                );
                None
            }
        }
    }

    /// Runs per status, statuses in order of first appearance.
    fn count_by_status(records: &[RunRecord]) -> Vec<(Status, usize)> {
        let mut by_status: Vec<(Status, usize)> = vec![];
        for r in records {
            match by_status.iter_mut().find(|(s, _)| *s == r.status) {
                Some((_, n)) => *n += 1,
                None => by_status.push((r.status, 1)),
            }
        }
        by_status
    }

    /// `table.md` and the plots of `records` into `out`.
    fn summarise(
        records: &[RunRecord],
        levels: &[MemoryLevel],
        plan_name: &str,
        out: &Path,
    ) -> Result<Vec<PathBuf>> {
        let table_path = out.join("table.md");
        std::fs::write(
            &table_path,
            report::table_markdown(records, levels, plan_name),
        )
        .with_context(|| format!("writing {}", table_path.display()))?;
        let mut files = vec![table_path];
        files.extend(plot::write_all(records, levels, out)?);
        Ok(files)
    }

    /// Rewrites `table.md` and the plots of a bench's output directory from its
    /// `runs.csv` and `plan.toml` (after a partial run, or with a newer memaflow).
    pub fn replot(dir: &Path) -> Result<Vec<PathBuf>> {
        let plan_path = dir.join("plan.toml");
        let plan = ExperimentPlan::read(&plan_path)?;
        let csv_path = dir.join("runs.csv");
        let text = std::fs::read_to_string(&csv_path)
            .with_context(|| format!("reading {}", csv_path.display()))?;
        let records = report::read_csv(&text).with_context(|| csv_path.display().to_string())?;
        summarise(
            &records,
            &plan.memory,
            &plan_path.display().to_string(),
            dir,
        )
    }

    fn progress_bar(len: usize) -> indicatif::ProgressBar {
        let bar = indicatif::ProgressBar::new(len as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} runs, ETA {eta_precise}  {msg}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    }

    /// `DIR/NAME`, generated from the zoo when absent (deterministic, so a cache), and
    /// generated again when it is of an older package format (made by an older memaflow).
    /// Any other package there is used as it is, its errors reported by the caller.
    fn prepare_model(dir: &Path, name: &str) -> Result<PathBuf> {
        let pkg = dir.join(name);
        let outdated = match Package::open(&pkg) {
            Ok(_) => return Ok(pkg),
            Err(e) if OutdatedFormat::is_cause_of(&e) => Some(e),
            Err(_) if pkg.join("model.toml").exists() => return Ok(pkg),
            Err(_) => None,
        };
        let entry = match (zoo::entry(name), outdated) {
            (Ok(entry), _) => entry,
            (Err(_), Some(outdated)) => return Err(outdated),
            (Err(e), None) => {
                return Err(e.context(format!(
                    "model '{name}' is neither a package in {} nor a zoo network",
                    dir.display()
                )));
            }
        };
        eprintln!(
            "memaflow bench: generating zoo network {name} into {}",
            pkg.display()
        );
        entry.write(&pkg, true)?;
        Ok(pkg)
    }

    fn frames_in(dir: &Path, n: usize) -> Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading frames directory {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                    ["jpg", "jpeg", "png", "ppm", "pgm", "bmp"]
                        .contains(&e.to_ascii_lowercase().as_str())
                })
            })
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("no JPEG, PNG, PPM/PGM or BMP frames in {}", dir.display());
        }
        Ok(files.iter().cycle().take(n).cloned().collect())
    }

    /// `n` deterministic 500×500 frames (the paper's input size): smooth gradients with a
    /// frame-dependent phase, so that frames differ but every bench makes the same ones.
    fn generate_frames(dir: &Path, n: usize) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        (0..n)
            .map(|k| {
                let path = dir.join(format!("frame-{k:02}.png"));
                if !path.exists() {
                    let phase = k as f32 * 0.7;
                    let img = image::RgbImage::from_fn(500, 500, |x, y| {
                        let (fx, fy) = (x as f32 / 500.0, y as f32 / 500.0);
                        let v = |a: f32| ((a.sin() * 0.5 + 0.5) * 255.0) as u8;
                        image::Rgb([
                            v(fx * 6.0 + phase),
                            v(fy * 5.0 - phase),
                            v((fx + fy) * 4.0 + 2.0 * phase),
                        ])
                    });
                    img.save(&path)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                Ok(path)
            })
            .collect()
    }

    /// The `memaflow batch` arguments of run `spec` of workload `w`, and how its memory
    /// level is applied.
    fn child_args(
        plan: &ExperimentPlan,
        spec: &RunSpec,
        models: &[String],
        frames: &[PathBuf],
        cgroups: Option<&BenchCgroups>,
        workers: usize,
    ) -> (Vec<String>, LimitMode) {
        let mut args = vec!["batch".to_string(), "--models".into(), models.join(",")];
        args.push("--images".into());
        args.extend(frames.iter().map(|f| f.display().to_string()));
        if let Some((l, s)) = spec.combo.policies() {
            let cache = if matches!(spec.combo, Combo::Cached(..)) {
                LayerCache::Keep
            } else {
                LayerCache::Off
            };
            args.extend([
                "--loading".into(),
                l.to_string(),
                "--scheduling".into(),
                s.to_string(),
                "--parallel".into(),
                spec.parallel.to_string(),
                "--workers".into(),
                workers.to_string(),
                "--cache".into(),
                cache.to_string(),
            ]);
            if let Some(r) = plan.reserve {
                args.extend(["--reserve".into(), r.0.to_string()]);
            }
        } else {
            args.push("--status-quo".into());
        }
        let limit = match (spec.memory, cgroups) {
            (MemoryLevel::Unlimited, _) => LimitMode::Unlimited,
            (MemoryLevel::Limit(_), Some(_)) => LimitMode::Cgroup,
            (MemoryLevel::Limit(Bytes(b)), None) => {
                // The gate must find the cgroup limit by itself; only where no cgroup can
                // be limited does the level become a budget (layer-wise runs only: the
                // status quo has no scheduler to hold it).
                if spec.combo.policies().is_some() {
                    args.extend(["--budget".into(), b.to_string()]);
                }
                LimitMode::BudgetOnly
            }
        };
        (args, limit)
    }

    /// What ran: the child's end, its cgroup's readings, its report (if it finished).
    struct Outcome {
        ended: child::Ended,
        stats: Option<CgroupStats>,
        report: Option<ChildReport>,
    }

    /// Runs the child in its own cgroup (when there are cgroups), then reads and removes
    /// the cgroup whatever happened to the child.
    fn run_child(
        o: &BenchOptions,
        plan: &ExperimentPlan,
        spec: &RunSpec,
        args: &[String],
        dir: &Path,
        cgroups: Option<&BenchCgroups>,
    ) -> Result<Outcome> {
        let cgroup = match cgroups {
            Some(c) => Some(c.create(
                &format!("run-{}-{:04}", std::process::id(), spec.id),
                spec.memory.bytes(),
            )?),
            None => None,
        };
        let ended = child::run(
            &o.program,
            args,
            &dir.join("stderr.txt"),
            cgroup.as_ref(),
            Duration::from_secs(plan.timeout_secs),
        );
        let stats: Option<CgroupStats> = match cgroup {
            Some(cg) => {
                let stats = cg.stats();
                if let Err(e) = cg.remove() {
                    log::warn!("{e:#}");
                }
                Some(stats?)
            }
            None => None,
        };
        let ended = ended?;
        let report: Option<ChildReport> = if ended.exit == child::Exit::Code(0) {
            std::fs::read_to_string(dir.join("report.json"))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
        } else {
            None
        };
        Ok(Outcome {
            ended,
            stats,
            report,
        })
    }

    fn run_one(
        o: &BenchOptions,
        plan: &ExperimentPlan,
        spec: &RunSpec,
        layers: &std::collections::HashMap<String, (PathBuf, usize)>,
        frames: &[PathBuf],
        cgroups: Option<&BenchCgroups>,
        workers: usize,
    ) -> Result<RunRecord> {
        let w = &plan.workloads[spec.workload];
        let dir = o.out.join("runs").join(format!("{:04}", spec.id));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let models: Vec<String> = w
            .models
            .iter()
            .map(|m| layers[m].0.display().to_string())
            .collect();
        let (mut args, limit) =
            child_args(plan, spec, &models, &frames[..w.frames], cgroups, workers);
        args.extend([
            "--report".into(),
            dir.join("report.json").display().to_string(),
        ]);
        let load1 = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok());
        let Outcome {
            ended,
            stats,
            report,
        } = run_child(o, plan, spec, &args, &dir, cgroups)?;
        let status = child::classify(&ended, stats.as_ref(), report.is_some());
        let error = match status {
            Status::Ok => String::new(),
            Status::Timeout => format!("killed after {} s", plan.timeout_secs),
            Status::OomKilled => format!(
                "killed by the kernel's OOM killer at the {} cgroup limit",
                spec.memory
            ),
            Status::Failed => last_line(&dir.join("stderr.txt"))
                .unwrap_or_else(|| format!("exit {} with no message", ended.exit)),
        };
        if status == Status::Ok {
            // Everything of use is in the row; failed runs keep their stderr and report.
            std::fs::remove_dir_all(&dir).ok();
        }
        Ok(RunRecord {
            run: spec.id,
            repetition: spec.repetition,
            memory: spec.memory,
            limit,
            workload: w.name.clone(),
            models: w.models.join("+"),
            frames: w.frames,
            layers: w.frames * w.models.iter().map(|m| layers[m].1).sum::<usize>(),
            combo: spec.combo,
            parallel: spec.parallel,
            workers,
            status,
            exit: ended.exit,
            makespan_ms: report.as_ref().map(|r| tenth(r.makespan_ms)),
            wall_ms: tenth(ended.wall.as_secs_f64() * 1e3),
            cpu_ms: ended.cpu.map(|c| tenth(c.as_secs_f64() * 1e3)),
            load1: load1.map(|l| (l * 100.0).round() / 100.0),
            peak_rss: report.as_ref().map(|r| r.peak_rss),
            cgroup_peak: stats.and_then(|s| s.peak),
            oom_kills: stats.map(|s| s.oom_kills),
            ledger_high_water: report.as_ref().and_then(|r| r.ledger_high_water),
            overdrafts: report.as_ref().and_then(|r| r.overdrafts),
            error,
        })
    }

    /// Milliseconds to the 0.1 ms that runs.csv keeps, so that tables made now and from
    /// the CSV later (`--replot`) are the same.
    fn tenth(ms: f64) -> f64 {
        (ms * 10.0).round() / 10.0
    }

    /// The last non-empty line of a child's stderr, shortened.
    fn last_line(path: &Path) -> Option<String> {
        let text = std::fs::read_to_string(path).ok()?;
        let line = text.lines().rev().find(|l| !l.trim().is_empty())?.trim();
        Some(line.chars().take(300).collect())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn cached_zoo_packages_of_an_older_format_are_generated_again() {
            let dir =
                std::env::temp_dir().join(format!("memaflow-bench-cache-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let pkg = prepare_model(&dir, "agenet").unwrap();
            let manifest = pkg.join("model.toml");
            let current = std::fs::read_to_string(&manifest).unwrap();
            // What an older memaflow left: format 1, no digests.
            let old: String = current
                .lines()
                .filter(|l| !l.starts_with("sha256 = "))
                .map(|l| {
                    if l.starts_with("format = ") {
                        "format = 1"
                    } else {
                        l
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            std::fs::write(&manifest, old).unwrap();
            assert!(Package::open(&pkg).is_err());
            assert_eq!(prepare_model(&dir, "agenet").unwrap(), pkg);
            assert_eq!(std::fs::read_to_string(&manifest).unwrap(), current);
            // An outdated package that is no zoo network is reported, not replaced.
            std::fs::rename(&pkg, dir.join("mine")).unwrap();
            std::fs::write(dir.join("mine/model.toml"), "format = 1\n").unwrap();
            let err = prepare_model(&dir, "mine").unwrap_err();
            assert!(OutdatedFormat::is_cause_of(&err), "{err:#}");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}
