//! MemA's promise under a real memory limit: the daemon is never OOM-killed. Below what a
//! model needs, that model is refused with a reason and the others run; above it, every
//! frame finishes. Four real MediaPipe models (two detectors, two landmark models) in a
//! memory cgroup (v1 on the host, v2 in the QEMU guest), at every limit from 16 to 64 MiB
//! and with the limit lowered while the daemon holds a full cache of resident layers.

mod common;
use common::cgroup::TestCgroup;
use common::*;
use memaflow::spool::schema::{FailureRecord, FrameResult, ModelOutcome, Outputs};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const MODELS: [&str; 4] = [
    "face_detection/face_detection_short_range",
    "face_landmark/face_landmark",
    "palm_detection/palm_detection_full",
    "hand_landmark/hand_landmark_full",
];

/// The four packages, imported once per test run; `None` (with the skip recorded) without
/// the MediaPipe fixtures.
fn packages(test: &str) -> Option<PathBuf> {
    let fixtures = repo().join("target/fixtures/mediapipe");
    if !fixtures.join(".complete").exists() {
        let reason = "no MediaPipe models in target/fixtures/mediapipe: run tests/fetch-fixtures";
        assert!(
            std::env::var("MEMAFLOW_REQUIRE_REFERENCE").as_deref() != Ok("1"),
            "{reason}"
        );
        skip(test, reason);
        return None;
    }
    let dir = scratch(&format!("{test}-packages"));
    for m in MODELS {
        let name = Path::new(m).file_name().unwrap().to_str().unwrap();
        let model = fixtures.join(format!("{m}.tflite"));
        cli_ok(&[
            "import",
            model.to_str().unwrap(),
            "--out",
            dir.join(name).to_str().unwrap(),
        ]);
    }
    Some(dir)
}

fn cgroup_or_skip(test: &str, limit: u64) -> Option<TestCgroup> {
    match TestCgroup::create(test, limit) {
        Ok(cg) => Some(cg),
        Err(why) => {
            assert!(
                std::env::var("CI").is_err(),
                "CI runs as root with a memory cgroup: {why}"
            );
            skip(test, &format!("no memory cgroup of our own: {why}"));
            None
        }
    }
}

/// A spool with `frames` copies of two shared photos and a configuration for it.
fn spool(dir: &Path, packages: &Path, frames_in_flight: usize) -> PathBuf {
    spool_with(dir, packages, frames_in_flight, "")
}

/// `spool` with more lines for its `[run]` table.
fn spool_with(dir: &Path, packages: &Path, frames_in_flight: usize, run: &str) -> PathBuf {
    let root = dir.join("spool");
    std::fs::create_dir_all(root.join("incoming")).unwrap();
    let config = dir.join("memaflow.toml");
    std::fs::write(
        &config,
        format!(
            "[spool]\nroot = {root:?}\nrescan_secs = 0.2\nsettle_secs = 0.1\n\
             [run]\nthreads = 1\nparallel = 2\nreserve = \"4M\"\nframes_in_flight = {frames_in_flight}\n{run}\
             [models]\ndir = {packages:?}\n"
        ),
    )
    .unwrap();
    config
}

fn drop_frames(spool: &Path, tag: &str, copies: usize) -> Vec<String> {
    let mut names = vec![];
    for k in 0..copies {
        for f in ["astronaut.png", "rocket.jpg"] {
            let name = format!("{tag}{k}-{f}");
            let tmp = spool.join("incoming").join(format!(".{name}"));
            std::fs::copy(shared().join("frames").join(f), &tmp).unwrap();
            std::fs::rename(&tmp, spool.join("incoming").join(&name)).unwrap();
            names.push(name);
        }
    }
    names
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn daemon_in(cg: &TestCgroup, config: &Path, log: &Path, once: bool) -> Child {
    let argv = cli_argv();
    let mut args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
    args.extend(["run", "--config", config.to_str().unwrap()]);
    if once {
        args.push("--once");
    }
    cg.command(&argv[0], &args)
        .env(
            "RUST_LOG",
            std::env::var("MEMAFLOW_TEST_LOG").unwrap_or("info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn wait(child: &mut Child, limit: Duration, log: &Path) -> ExitStatus {
    let limit = hang_limit(limit);
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            child.kill().ok();
            panic!(
                "the daemon did not finish within {limit:?}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Per frame and model: `Ok(outputs)` or `Err(reason)`; every frame must have a result
/// or a failure record (none lost).
fn outcomes(spool: &Path, frames: &[String]) -> Vec<Vec<Result<Outputs, String>>> {
    frames
        .iter()
        .map(|f| {
            let result = spool.join("out").join(format!("{f}.json"));
            let failed = spool.join("failed").join(format!("{f}.error.json"));
            let models = if result.exists() {
                FrameResult::read(&result).unwrap().models
            } else if failed.exists() {
                FailureRecord::read(&failed).unwrap().models
            } else {
                panic!("{f}: no result and no failure record");
            };
            models
                .into_iter()
                .map(|m| match m.outcome {
                    ModelOutcome::Failed { error } => Err(error.reason),
                    ModelOutcome::Ran(run) => Ok(run.outputs),
                })
                .collect()
        })
        .collect()
}

#[test]
fn never_oom_killed_at_any_limit_from_16_to_64_mib() {
    limit_sweep("limits", "");
}

/// Under a budget the daemon keeps some freed buffers in the heap for the next frames
/// (memory the ledger does not count); a budget above the limit leaves the reading to
/// decide, and what the heap keeps must give way to it.
#[test]
fn never_oom_killed_with_a_budget_above_the_limit() {
    limit_sweep("budget-limits", "budget = \"96M\"\n");
}

fn limit_sweep(test: &str, run: &str) {
    let Some(packages) = packages(test) else {
        return;
    };
    // What every model gives without a limit: a model that runs under one must agree.
    let dir = scratch(&format!("{test}-free"));
    let config = spool_with(&dir, &packages, 2, run);
    let frames = drop_frames(&dir.join("spool"), "f", 1);
    let out = run_cli(
        &["run", "--config", config.to_str().unwrap(), "--once"],
        Duration::from_secs(300),
    );
    assert!(out.status.success());
    let free = outcomes(&dir.join("spool"), &frames);
    let mut report = String::new();
    for mib in (16..=64).step_by(4) {
        let Some(cg) = cgroup_or_skip(test, mib << 20) else {
            return;
        };
        let dir = scratch(&format!("{test}-{mib}m"));
        let config = spool_with(&dir, &packages, 2, run);
        let log = dir.join("daemon.log");
        drop_frames(&dir.join("spool"), "f", 1);
        let mut child = daemon_in(&cg, &config, &log, true);
        let status = wait(&mut child, Duration::from_secs(300), &log);
        let log_text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(cg.oom_kills(), 0, "{mib} MiB: OOM-killed:\n{log_text}");
        assert!(status.success(), "{mib} MiB: {status}:\n{log_text}");
        let got = outcomes(&dir.join("spool"), &frames);
        let mut ran = 0;
        for (f, (models, want)) in got.iter().zip(&free).enumerate() {
            for (m, (outcome, want)) in models.iter().zip(want).enumerate() {
                match outcome {
                    Ok(outputs) => {
                        ran += 1;
                        assert_eq!(
                            Some(outputs),
                            want.as_ref().ok(),
                            "{mib} MiB: frame {f} model {m} differs from the unlimited run"
                        );
                    }
                    Err(reason) => assert!(
                        reason.contains("does not fit here")
                            || reason.contains("make room")
                            || reason.contains("can be made free"),
                        "{mib} MiB: frame {f} model {m} failed for another reason: {reason}"
                    ),
                }
            }
        }
        report += &format!("{mib} MiB: {ran} of {} inferences ran\n", frames.len() * 4);
        if mib >= 32 {
            assert_eq!(
                ran,
                frames.len() * 4,
                "{mib} MiB: every model fits\n{log_text}"
            );
        }
    }
    eprintln!("{test}:\n{report}");
}

#[test]
fn lowering_the_limit_shrinks_the_cache_and_loses_no_frame() {
    let test = "lowered";
    let Some(packages) = packages(test) else {
        return;
    };
    let Some(cg) = cgroup_or_skip(test, 256 << 20) else {
        return;
    };
    let dir = scratch(test);
    let config = spool(&dir, &packages, 2);
    let root = dir.join("spool");
    let log = dir.join("daemon.log");
    let mut child = daemon_in(&cg, &config, &log, false);
    let mut frames = drop_frames(&root, "a", 2);
    let done = |frames: &[String]| {
        frames
            .iter()
            .all(|f| root.join("out").join(format!("{f}.json")).exists())
    };
    let deadline = Instant::now() + hang_limit(Duration::from_secs(120));
    while !done(&frames) {
        assert!(
            Instant::now() < deadline,
            "frames not done:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let resident = |status: &Value| -> u64 {
        status["cache"]["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["resident_bytes"].as_u64().unwrap())
            .sum()
    };
    let full = resident(&json(&root.join("status.json")));
    assert!(full > 16 << 20, "the cache holds every layer: {full} bytes");
    // Lower the limit in steps smaller than the reserve: each step leaves the daemon
    // over its line (limit less reserve), never the kernel over its limit, and the
    // daemon shrinks its cache before the next. (A drop by more than the reserve at once
    // cannot be met after the fact: v1 refuses the write, v2 OOM-kills.)
    let target: u64 = 24 << 20;
    let mut limit: u64 = cg.usage().max(target) + (4 << 20);
    while limit > target {
        limit = limit.saturating_sub(2 << 20).max(target);
        let step = Instant::now();
        while cg.set_limit(limit).is_err() {
            assert!(
                step.elapsed() < hang_limit(Duration::from_secs(10)),
                "the cache did not shrink below {limit} (usage {}):\n{}",
                cg.usage(),
                std::fs::read_to_string(&log).unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    frames.extend(drop_frames(&root, "b", 2));
    let deadline = Instant::now() + hang_limit(Duration::from_secs(120));
    while !done(&frames) {
        assert!(
            Instant::now() < deadline,
            "frames not done at {limit}:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = wait(&mut child, Duration::from_secs(30), &log);
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}:\n{log_text}");
    assert_eq!(cg.oom_kills(), 0, "OOM-killed:\n{log_text}");
    let status = json(&root.join("status.json"));
    let shrunk = resident(&status);
    assert!(
        shrunk < full,
        "the cache shrank: {shrunk} of {full} bytes resident"
    );
    assert!(status["cache"]["cache"]["evictions"].as_u64().unwrap() > 0);
    for (f, models) in frames.iter().zip(outcomes(&root, &frames)) {
        assert!(
            models.iter().all(Result::is_ok),
            "{f}: every model fits in 24 MiB: {models:?}"
        );
    }
}
