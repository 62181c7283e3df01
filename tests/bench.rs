//! `memaflow bench`: a tiny plan end to end (runs in cgroups when the host allows, CSV,
//! table, SVGs consistent with each other), the budget-only fallback when no cgroup can
//! be limited, and the status quo `batch --status-quo` it compares against. CI also runs
//! `benches/quick.toml` through the same checks (the ignored test at the end).
#![cfg(feature = "bench")]

mod common;
use common::*;
use memaflow::bench::child::Status;
use memaflow::bench::plan::{BASELINE, Combo, ExperimentPlan, MemoryLevel};
use memaflow::bench::report::{LimitMode, RunRecord, read_csv};
use std::path::Path;
use std::time::Duration;

/// Runs `bench` and checks what every bench must produce: one CSV row per run of the
/// plan's expansion, in order, every column parsed; a table naming every combination and
/// level whose speed-ups are the CSV's; non-empty SVGs for every level. Returns the rows
/// and the bench's stderr.
fn bench_checked(plan_path: &Path, out: &Path, extra: &[&str]) -> (Vec<RunRecord>, String) {
    require_child_exec();
    let mut args = vec![
        "bench",
        "--plan",
        plan_path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let run = run_cli(&args, Duration::from_secs(600));
    let stderr = String::from_utf8_lossy(&run.stderr).to_string();
    assert!(
        run.status.success(),
        "bench failed: {}\n{stderr}",
        run.status
    );

    let plan = ExperimentPlan::read(plan_path).unwrap();
    let expected = plan.expand();
    let csv = std::fs::read_to_string(out.join("runs.csv")).unwrap();
    let records = read_csv(&csv).unwrap_or_else(|e| panic!("runs.csv: {e:#}\n{csv}"));
    assert_eq!(records.len(), expected.len(), "one row per run:\n{csv}");
    for (r, spec) in records.iter().zip(&expected) {
        assert_eq!(
            (r.run, r.memory, r.combo, r.parallel),
            (spec.id, spec.memory, spec.combo, spec.parallel)
        );
        assert_eq!(r.workload, plan.workloads[spec.workload].name);
        match r.status {
            Status::Ok => assert!(
                r.makespan_ms.is_some_and(|m| m > 0.0) && r.peak_rss.is_some_and(|p| p > 0),
                "{r:?}"
            ),
            _ => assert!(
                !r.error.is_empty(),
                "a run that did not finish says why: {r:?}"
            ),
        }
        if r.status == Status::OomKilled {
            assert_eq!(r.limit, LimitMode::Cgroup, "only a cgroup limit OOM-kills");
        }
    }

    let table = std::fs::read_to_string(out.join("table.md")).unwrap();
    for r in &records {
        assert!(table.contains(&format!("| {} |", r.combo)), "{}", r.combo);
    }
    for level in &plan.memory {
        assert!(table.contains(&format!(" {level} |")), "{level}");
    }
    // Each group's speed-up in the table is the CSV's bulk+fcfs mean over its own.
    for spec in &expected {
        let group = |c: Combo| -> Vec<f64> {
            records
                .iter()
                .filter(|r| {
                    r.memory == spec.memory
                        && r.combo == c
                        && r.workload == plan.workloads[spec.workload].name
                        && (c == Combo::StatusQuo || r.parallel == spec.parallel)
                })
                .filter_map(|r| r.makespan_ms)
                .collect()
        };
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (base, own) = (group(BASELINE), group(spec.combo));
        if spec.combo == Combo::StatusQuo || base.is_empty() || own.is_empty() {
            continue;
        }
        let line = format!(
            "| {} | {} | {} | {} |",
            spec.memory, plan.workloads[spec.workload].name, spec.parallel, spec.combo
        );
        let row = table
            .lines()
            .find(|l| l.starts_with(&line))
            .unwrap_or_else(|| panic!("no detail row {line}"));
        let want = format!("| {:.2} |", mean(&base) / mean(&own));
        assert!(row.contains(&want), "{row} lacks {want}");
    }

    let mut svgs = vec!["speedup.svg".to_string(), "peak-rss.svg".to_string()];
    for level in &plan.memory {
        svgs.push(format!("makespan-{level}.svg"));
        svgs.push(format!("layers-{level}.svg"));
    }
    for svg in svgs {
        let text = std::fs::read_to_string(out.join(&svg)).unwrap_or_else(|e| panic!("{svg}: {e}"));
        assert!(
            text.contains("<svg") && text.trim_end().ends_with("</svg>") && text.len() > 500,
            "{svg} is not a drawn SVG"
        );
    }
    (records, stderr)
}

const TINY: &str = r#"
memory = ["none", "64M"]
combos = ["bulk+fcfs", "partial+mema"]
parallel = [1]
status_quo = true
timeout_secs = 120

[[workload]]
name = "age"
models = ["agenet"]
"#;

#[test]
fn tiny_plan_writes_consistent_csv_table_and_plots() {
    let dir = scratch("bench-tiny");
    let plan = dir.join("tiny.toml");
    std::fs::write(&plan, TINY).unwrap();
    let (records, stderr) = bench_checked(&plan, &dir.join("out"), &[]);
    // 2 levels × (status quo + 2 combinations).
    assert_eq!(records.len(), 6);
    let cgroup = stderr.contains("memory limits enforced by cgroup");
    for r in &records {
        let want = match (r.memory, cgroup) {
            (MemoryLevel::Unlimited, _) => LimitMode::Unlimited,
            (_, true) => LimitMode::Cgroup,
            (_, false) => LimitMode::BudgetOnly,
        };
        assert_eq!(r.limit, want, "{r:?}");
        if r.memory == MemoryLevel::Unlimited {
            assert_eq!(r.status, Status::Ok, "{r:?}");
        }
    }
    if cgroup {
        // The limited runs were really limited: the cgroup's peak stayed within it.
        for r in records.iter().filter(|r| r.limit == LimitMode::Cgroup) {
            let peak = r.cgroup_peak.expect("a cgroup run reports its peak");
            assert!(peak <= 64 << 20, "{r:?}");
        }
        // AgeNet whole in tract needs about twice 64 MiB: the kernel kills it, and the
        // bench says so.
        let sq = records
            .iter()
            .find(|r| r.combo == Combo::StatusQuo && r.limit == LimitMode::Cgroup)
            .unwrap();
        assert_eq!(sq.status, Status::OomKilled, "{sq:?}");
        assert!(
            sq.oom_kills.unwrap() >= 1 && sq.error.contains("OOM killer"),
            "{sq:?}"
        );
    } else {
        skip(
            "tiny_plan_writes_consistent_csv_table_and_plots",
            "no writable memory cgroup: limits ran budget-only",
        );
    }
    // --replot rebuilds the same table from runs.csv and the copied plan.
    let table = std::fs::read_to_string(dir.join("out/table.md")).unwrap();
    std::fs::remove_file(dir.join("out/table.md")).unwrap();
    std::fs::remove_file(dir.join("out/speedup.svg")).unwrap();
    cli_ok(&["bench", "--replot", dir.join("out").to_str().unwrap()]);
    let again = std::fs::read_to_string(dir.join("out/table.md")).unwrap();
    assert_eq!(
        again.lines().skip(1).collect::<Vec<_>>(),
        table.lines().skip(1).collect::<Vec<_>>(),
        "the table from runs.csv differs (first line names the plan)"
    );
    assert!(dir.join("out/speedup.svg").exists());
    // Successful runs leave no per-run directory; others keep their stderr.
    for r in &records {
        let kept = dir
            .join(format!("out/runs/{:04}/stderr.txt", r.run))
            .exists();
        assert_eq!(kept, r.status != Status::Ok, "{r:?}");
    }
}

#[test]
fn without_cgroup_access_levels_become_budgets_and_rows_say_so() {
    let dir = scratch("bench-budget-only");
    let plan = dir.join("plan.toml");
    std::fs::write(
        &plan,
        "memory = [\"96M\"]\nloading = [\"partial\"]\nscheduling = [\"mema\"]\nparallel = [1]\n\
         [[workload]]\nname = \"age\"\nmodels = [\"agenet\"]\n",
    )
    .unwrap();
    // A parent directory outside any cgroup hierarchy: as on a host without access.
    let (records, stderr) = bench_checked(
        &plan,
        &dir.join("out"),
        &["--cgroup-parent", "/proc/self/no-such-cgroup"],
    );
    assert!(
        stderr.contains("memory limits cannot be enforced here")
            && stderr.contains("not inside a memory cgroup hierarchy")
            && stderr.contains("budget-only"),
        "{stderr}"
    );
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].limit, LimitMode::BudgetOnly);
    assert_eq!(records[0].status, Status::Ok, "{:?}", records[0]);
    assert_eq!(records[0].oom_kills, None);
    let table = std::fs::read_to_string(dir.join("out/table.md")).unwrap();
    assert!(table.contains("1 runs are budget-only"), "{table}");
}

#[test]
fn status_quo_batch_gives_the_layerwise_outputs() {
    let dir = scratch("bench-status-quo");
    let pkg = dir.join("agenet");
    cli_ok(&["zoo", "--out", dir.to_str().unwrap(), "--only", "agenet"]);
    let frame = shared().join("frames/rocket.jpg");
    let mut outs = vec![];
    for (name, extra) in [("layers", vec![]), ("whole", vec!["--status-quo"])] {
        let report = dir.join(format!("{name}.json"));
        let npy = dir.join(name);
        let mut args = vec![
            "batch",
            "--models",
            pkg.to_str().unwrap(),
            "--images",
            frame.to_str().unwrap(),
            frame.to_str().unwrap(),
            "--npy-out",
            npy.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ];
        args.extend(extra);
        cli_ok(&args);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        assert!(json["makespan_ms"].as_f64().unwrap() > 0.0, "{json}");
        assert!(json["peak_rss"].as_u64().unwrap() > 0, "{json}");
        outs.push(npy);
    }
    for k in ["00-agenet", "01-agenet"] {
        let a = std::fs::read(outs[0].join(k).join("00.npy")).unwrap();
        let b = std::fs::read(outs[1].join(k).join("00.npy")).unwrap();
        assert_eq!(a, b, "{k}: status quo and layer-wise outputs differ");
    }
    let bad = run_cli(
        &[
            "batch",
            "--status-quo",
            "--loading",
            "bulk",
            "--models",
            pkg.to_str().unwrap(),
            "--images",
            frame.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert_eq!(bad.status.code(), Some(2), "--status-quo with --loading");
}

/// CI's smoke test of `benches/quick.toml` (minutes, so not in the default run):
/// `cargo test --release --test bench -- --ignored quick_plan`.
#[test]
#[ignore]
fn quick_plan_produces_consistent_outputs() {
    let out = repo().join("target/bench-quick");
    let _ = std::fs::remove_dir_all(out.join("runs"));
    let (records, _) = bench_checked(&repo().join("benches/quick.toml"), &out, &[]);
    assert!(records.iter().any(|r| r.status == Status::Ok));
}

#[test]
fn workload_flag_selects_one_part_of_the_plan() {
    let plan = repo().join("benches/paper.toml");
    let plan = plan.to_str().unwrap();
    let part = cli_ok(&[
        "bench",
        "--plan",
        plan,
        "--dry-run",
        "--workload",
        "large-8",
    ]);
    assert!(
        part.starts_with("large-8 ") && part.lines().count() == 2,
        "only large-8 and the total: {part}"
    );
    assert!(part.contains("64 runs:"), "{part}");
    let wrong = run_cli(
        &[
            "bench",
            "--plan",
            plan,
            "--dry-run",
            "--workload",
            "large-16",
        ],
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        !wrong.status.success() && stderr.contains("no workload 'large-16' (it has: small-3"),
        "{stderr}"
    );
}
