//! Many inferences at once: every loading policy × scheduler at parallel 1, 2 and 3 gives
//! outputs bit-identical to the whole model, and MEMA keeps its ledger within the budget.

mod common;
use common::*;
use memaflow::memory::SystemMemory;
use memaflow::model::{ImportOptions, Package, import, zoo};
use memaflow::runtime::{
    BatchOptions, Eviction, FloatTensor, Job, LayerCache, LoadingPolicy, SchedulingPolicy,
    run_batch, run_whole,
};
use std::sync::{Arc, Mutex, MutexGuard};

/// The executor measures a layer's load by the process's resident set (only when nothing
/// else of it runs): tests running batches in one process at once would measure each
/// other's allocations, and a tight budget would then be overdrawn by phantom bytes. Each
/// test here holds this while it runs.
fn alone() -> MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

const LOADINGS: [LoadingPolicy; 4] = LoadingPolicy::ALL;
const SCHEDULERS: [SchedulingPolicy; 4] = SchedulingPolicy::ALL;

fn packages(test: &str) -> Vec<Arc<Package>> {
    let dir = scratch(&format!("{test}-packages"));
    let mut out = vec![];
    for name in SHARED_SUPPORTED {
        let pkg = dir.join(name);
        import(
            &shared().join(format!("models/{name}.tflite")),
            &pkg,
            &ImportOptions::default(),
        )
        .unwrap();
        out.push(Arc::new(Package::open(pkg).unwrap()));
    }
    for name in ["sos_googlenet", "agenet"] {
        zoo::entry(name)
            .unwrap()
            .write(&dir.join(name), true)
            .unwrap();
        out.push(Arc::new(Package::open(dir.join(name)).unwrap()));
    }
    out
}

#[test]
fn every_policy_and_scheduler_equals_whole() {
    let _alone = alone();
    let packages = packages("policies");
    let mut jobs = vec![];
    let mut expected = vec![];
    for (k, pkg) in packages.iter().enumerate() {
        for seed in 0..2 {
            let input = random_tensor(
                &pkg.manifest.inputs[0].shape,
                (k * 2 + seed) as u64,
                -1.0,
                1.0,
            );
            expected.push(run_whole(pkg, &input).unwrap().outputs);
            let costs = memaflow::profile::estimate(&pkg.manifest).into();
            jobs.push(Job::layered(pkg.clone(), input, costs));
        }
    }
    let system = SystemMemory::detect();
    for cache in [LayerCache::Off, LayerCache::Keep] {
        for loading in LOADINGS {
            for scheduling in SCHEDULERS {
                for parallel in 1..=3 {
                    let options = BatchOptions {
                        loading,
                        scheduling,
                        parallel,
                        budget: Some(256 << 20),
                        reserve: 0,
                        workers: 2,
                        cache,
                        eviction: Eviction::FurthestAhead,
                    };
                    let what = format!("{cache:?}/{loading:?}/{scheduling:?}/parallel {parallel}");
                    let report = run_batch(jobs.clone(), &options, &system)
                        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
                    for (k, (got, want)) in report.outputs.iter().zip(&expected).enumerate() {
                        for (a, b) in got.iter().zip(want) {
                            assert!(
                                a.bit_identical(b),
                                "{what}: inference {k} differs from whole"
                            );
                        }
                    }
                    assert_eq!(report.inferences.len(), jobs.len());
                    if scheduling == SchedulingPolicy::Mema && loading != LoadingPolicy::Bulk {
                        assert!(report.ledger_high_water <= 256 << 20, "{what}");
                    }
                }
            }
        }
    }
}

#[test]
fn mema_under_a_tight_budget_stays_within_it() {
    let _alone = alone();
    let packages = packages("tight");
    let agenet = packages
        .iter()
        .find(|p| p.name() == "agenet")
        .unwrap()
        .clone();
    let costs: Arc<[_]> = memaflow::profile::estimate(&agenet.manifest).into();
    let largest = costs.iter().map(|c| c.footprint()).max().unwrap();
    let total: u64 = costs.iter().map(|c| c.load_bytes).sum();
    // Room for the largest layer with the activations and a little more: less than the
    // model.
    let budget = largest + memaflow::runtime::held_bytes(&agenet)[0] + (2 << 20);
    assert!(budget < total);
    let input = FloatTensor::filled(agenet.manifest.inputs[0].shape.clone(), 0.5);
    let want = run_whole(&agenet, &input).unwrap().outputs;
    let jobs: Vec<Job> = (0..3)
        .map(|_| Job::layered(agenet.clone(), input.clone(), costs.clone()))
        .collect();
    let loadings = [
        LoadingPolicy::Linear,
        LoadingPolicy::DeepEye,
        LoadingPolicy::Partial,
    ];
    for (cache, loading) in [LayerCache::Off, LayerCache::Keep]
        .into_iter()
        .flat_map(|c| loadings.map(|l| (c, l)))
    {
        let options = BatchOptions {
            loading,
            scheduling: SchedulingPolicy::Mema,
            parallel: 2,
            budget: Some(budget),
            reserve: 0,
            workers: 2,
            cache,
            eviction: Eviction::FurthestAhead,
        };
        let report = run_batch(jobs.clone(), &options, &SystemMemory::detect()).unwrap();
        assert!(
            report.ledger_high_water <= budget,
            "{cache:?}/{loading:?}: ledger {} over budget {budget} ({} overdrafts)",
            report.ledger_high_water,
            report.overdrafts
        );
        assert_eq!(report.overdrafts, 0);
        for outs in &report.outputs {
            assert!(outs[0].bit_identical(&want[0]));
        }
    }
    // A budget below the largest layer is refused up front, naming model and layer.
    let options = BatchOptions {
        loading: LoadingPolicy::Partial,
        scheduling: SchedulingPolicy::Mema,
        parallel: 1,
        budget: Some(largest - 1),
        reserve: 0,
        workers: 1,
        cache: LayerCache::Keep,
        eviction: Eviction::FurthestAhead,
    };
    let jobs = vec![Job::layered(agenet.clone(), input, costs)];
    let err = format!(
        "{:#}",
        run_batch(jobs, &options, &SystemMemory::detect()).unwrap_err()
    );
    assert!(
        err.contains("agenet: layer") && err.contains("budget"),
        "{err}"
    );
}

#[test]
fn batch_cli_writes_outputs_and_report() {
    let _alone = alone();
    let dir = scratch("batch-cli");
    let pkg = import_shared("hand_recrop", &dir);
    let frames: Vec<String> = ["astronaut.png", "rocket.jpg"]
        .iter()
        .map(|f| shared().join("frames").join(f).display().to_string())
        .collect();
    let out = dir.join("out");
    let report = dir.join("report.json");
    let mut args = vec![
        "batch",
        "--models",
        pkg.to_str().unwrap(),
        "--loading",
        "deepeye",
        "--scheduling",
        "mema",
        "--parallel",
        "2",
        "--budget",
        "64M",
        "--npy-out",
        out.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--images",
    ];
    args.extend(frames.iter().map(|s| s.as_str()));
    let stdout = cli_ok(&args);
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["inferences"].as_array().unwrap().len(), 2);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(report["makespan_ms"].as_f64().unwrap() > 0.0);
    // Every Init, load and exec is in the timeline; the second inference's layers were
    // kept from the first (its loads served by the cache are not tasks).
    let (hits, misses) = (
        summary["layers"]["hits"].as_u64().unwrap(),
        summary["layers"]["misses"].as_u64().unwrap(),
    );
    assert_eq!(hits + misses, 2 * 33, "{summary}");
    assert!(hits > 0, "{summary}");
    assert_eq!(
        report["tasks"].as_array().unwrap().len() as u64,
        2 * (1 + 33) + misses
    );
    // The batch outputs equal `infer` on the same frame.
    for (k, frame) in frames.iter().enumerate() {
        let single = dir.join(format!("single{k}"));
        cli_ok(&[
            "infer",
            "--model",
            pkg.to_str().unwrap(),
            frame,
            "--npy-out",
            single.to_str().unwrap(),
        ]);
        let a = std::fs::read(single.join("00.npy")).unwrap();
        let b = std::fs::read(out.join(format!("{k:02}-hand_recrop/00.npy"))).unwrap();
        assert!(a == b, "batch output {k} differs from infer");
    }
}

/// FaceNet + SoS + AgeNet (≈ 480 MiB of weights) under a 128 MiB budget: MEMA completes
/// and the process's peak RSS stays within the budget plus the documented fixed overhead
/// of 40 MiB (binary, tract, allocator, activations outside the ledger).
#[test]
fn three_large_networks_run_in_128_mib() {
    let _alone = alone();
    let dir = scratch("batch-128m");
    cli_ok(&[
        "zoo",
        "--out",
        dir.to_str().unwrap(),
        "--only",
        "facenet",
        "--only",
        "sos",
        "--only",
        "agenet",
    ]);
    let models = ["facenet", "sos", "agenet"]
        .map(|m| dir.join(m).display().to_string())
        .join(",");
    let frame = shared().join("frames/astronaut.png");
    let stdout = cli_ok(&[
        "batch",
        "--models",
        &models,
        "--images",
        frame.to_str().unwrap(),
        "--loading",
        "partial",
        "--scheduling",
        "mema",
        "--parallel",
        "2",
        "--budget",
        "128M",
    ]);
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let peak = summary["peak_rss_bytes"].as_u64().unwrap();
    let weights: u64 = ["facenet", "sos", "agenet"]
        .iter()
        .map(|m| Package::open(dir.join(m)).unwrap().manifest.weight_bytes())
        .sum();
    assert!(
        weights > 450 << 20,
        "the models hold {weights} bytes of weights"
    );
    assert!(peak <= (128 + 40) << 20, "peak RSS {} MiB", peak >> 20);
    assert!(summary["ledger_high_water_bytes"].as_u64().unwrap() <= 128 << 20);
    assert_eq!(summary["inferences"].as_array().unwrap().len(), 3);
}

#[test]
fn measured_profiles_drive_the_scheduler() {
    let _alone = alone();
    let dir = scratch("batch-profile");
    let pkg = import_shared("hand_recrop", &dir);
    let agenet = dir.join("agenet");
    zoo::entry("agenet").unwrap().write(&agenet, true).unwrap();
    let profile = dir.join("profile.json");
    cli_ok(&[
        "profile",
        pkg.to_str().unwrap(),
        agenet.to_str().unwrap(),
        "--runs",
        "2",
        "--out",
        profile.to_str().unwrap(),
    ]);
    let measured = memaflow::profile::Profile::read(&profile).unwrap();
    let p = Package::open(&pkg).unwrap();
    let costs = measured.costs_for(&p);
    assert_eq!(costs.len(), p.manifest.layers.len());
    for (c, l) in costs.iter().zip(&p.manifest.layers) {
        assert!(c.load_bytes >= l.weight_bytes && c.load_secs > 0.0 && c.exec_secs > 0.0);
    }
    // Planning copies the weights: the profile must see that transient, or the ledger
    // undercounts every load (it once did, by 16 MiB in a 42 MiB cgroup). AgeNet's
    // largest layer is a 12 MiB fully-connected block.
    let a = Package::open(&agenet).unwrap();
    let (c, l) = measured
        .costs_for(&a)
        .into_iter()
        .zip(&a.manifest.layers)
        .max_by_key(|(_, l)| l.weight_bytes)
        .unwrap();
    assert!(
        c.plan_bytes >= l.weight_bytes / 2,
        "largest layer: {} weights, {} measured for planning",
        l.weight_bytes,
        c.plan_bytes
    );
    let frame = shared().join("frames/chelsea.png");
    let out = dir.join("out");
    cli_ok(&[
        "batch",
        "--models",
        pkg.to_str().unwrap(),
        "--images",
        frame.to_str().unwrap(),
        "--profile",
        profile.to_str().unwrap(),
        "--npy-out",
        out.to_str().unwrap(),
    ]);
    let single = dir.join("single");
    cli_ok(&[
        "infer",
        "--model",
        pkg.to_str().unwrap(),
        frame.to_str().unwrap(),
        "--npy-out",
        single.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read(out.join("00-hand_recrop/00.npy")).unwrap()
            == std::fs::read(single.join("00.npy")).unwrap()
    );
    // A profile of another version of the package is not used.
    let mut stale = measured.clone();
    stale.models.get_mut("hand_recrop").unwrap().weight_bytes += 1;
    assert_eq!(stale.costs_for(&p), memaflow::profile::estimate_package(&p));
}
