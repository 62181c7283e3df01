//! Several frames in flight on one executor: the same results as one frame at a time,
//! and SIGTERM at any moment exits 0 with every frame either finished or back in
//! `incoming/`, none left in `work/`.

mod common;
use common::*;
use memaflow::spool::schema::FrameResult;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A spool in `dir` and a configuration running `models` (TOML `[[model]]` entries) with
/// `run` keys; frames in flight at a stop signal get `stop_grace_secs` to finish.
fn config(dir: &Path, stop_grace_secs: f64, run: &str, models: &str) -> (PathBuf, PathBuf) {
    let spool = dir.join("spool");
    std::fs::create_dir_all(spool.join("incoming")).unwrap();
    let path = dir.join("memaflow.toml");
    std::fs::write(
        &path,
        format!(
            "[spool]\nroot = \"spool\"\nrescan_secs = 60\nstop_grace_secs = {stop_grace_secs}\n\
             [run]\n{run}\n{models}"
        ),
    )
    .unwrap();
    (spool, path)
}

/// Copies the shared photos into `incoming/` (written beside it, then renamed), `copies`
/// times each; returns their names.
fn drop_frames(spool: &Path, tag: &str, copies: usize) -> Vec<String> {
    let mut frames: Vec<PathBuf> = std::fs::read_dir(shared().join("frames"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    frames.sort();
    let mut out = vec![];
    for k in 0..copies {
        for f in &frames {
            let name = format!("{tag}{k}-{}", f.file_name().unwrap().to_str().unwrap());
            let tmp = spool.join("incoming").join(format!(".{name}"));
            std::fs::copy(f, &tmp).unwrap();
            std::fs::rename(&tmp, spool.join("incoming").join(&name)).unwrap();
            out.push(name);
        }
    }
    out
}

fn once(config: &Path) {
    let out = run_cli(
        &["run", "--config", config.to_str().unwrap(), "--once"],
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn frames_in_flight_give_the_results_of_one_frame_at_a_time() {
    let dir = scratch("fif-equal");
    let det = import_shared("face_detection_short_range", &dir.join("models"));
    let lm = import_shared("face_landmark_f32", &dir.join("models"));
    let models = format!(
        "[[model]]\npath = {det:?}\nreport = \"raw\"\n[[model]]\npath = {lm:?}\nreport = \"raw\"\n"
    );
    let one = dir.join("one");
    let (spool_one, config_one) = config(
        &one,
        0.3,
        "threads = 1\nparallel = 1\nframes_in_flight = 1",
        &models,
    );
    let many = dir.join("many");
    let (spool_many, config_many) = config(
        &many,
        0.3,
        "threads = 2\nparallel = 4\nframes_in_flight = 4",
        &models,
    );
    let frames = drop_frames(&spool_one, "f", 2);
    drop_frames(&spool_many, "f", 2);
    once(&config_one);
    once(&config_many);
    for f in &frames {
        let a = FrameResult::read(&spool_one.join("out").join(format!("{f}.json"))).unwrap();
        let b = FrameResult::read(&spool_many.join("out").join(format!("{f}.json"))).unwrap();
        for k in 0..2 {
            assert_eq!(
                a.models[k].outputs(),
                b.models[k].outputs(),
                "{f}: model {k} differs with 4 frames in flight"
            );
        }
    }
}

fn watch(config: &Path, log: &Path) -> Child {
    cli_command()
        .args(["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

#[test]
fn sigterm_at_random_moments_with_frames_in_flight_loses_nothing() {
    let dir = scratch("fif-sigterm");
    let models = dir.join("models");
    cli_ok(&["zoo", "--out", models.to_str().unwrap(), "--only", "agenet"]);
    let det = import_shared("face_detection_short_range", &models);
    // AgeNet makes a frame take long enough for the signal to land mid-frame.
    let model_list = format!(
        "[[model]]\npath = {det:?}\n[[model]]\npath = {:?}\n",
        models.join("agenet")
    );
    let run = "threads = 2\nparallel = 3\nframes_in_flight = 3";
    let (spool, config_path) = config(&dir, 0.0, run, &model_list);
    let log = dir.join("daemon.log");
    let mut dropped = vec![];
    let mut put_back = 0;
    for attempt in 0..20u64 {
        // Half the stops give no grace, so that whatever is in flight when the signal
        // lands must go back to incoming/; the others let frames finish.
        let grace = if attempt % 2 == 0 { 0.0 } else { 0.3 };
        config(&dir, grace, run, &model_list);
        dropped.extend(drop_frames(&spool, &format!("t{attempt}-"), 2));
        let mut child = watch(&config_path, &log);
        // Signals are blocked once the daemon has read its configuration; it then opens
        // the spool and checks its models, writing status.json (before that, SIGTERM has
        // its default action, as for any process).
        let up = Instant::now();
        while !std::fs::read_to_string(&log)
            .unwrap()
            .contains("models usable")
        {
            assert!(
                up.elapsed() < hang_limit(Duration::from_secs(30)),
                "no start"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        if grace == 0.0 {
            // The moment a frame is claimed: it is in flight, and without grace it must
            // go back (unless it finished in between).
            while names(&spool.join("work")).is_empty() {
                assert!(
                    up.elapsed() < hang_limit(Duration::from_secs(30)),
                    "attempt {attempt}: no frame claimed"
                );
                std::thread::yield_now();
            }
        } else {
            // Spread over claiming and the middle of frames.
            std::thread::sleep(Duration::from_millis((attempt * 53) % 400));
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let limit = hang_limit(Duration::from_secs(10));
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                start.elapsed() < limit,
                "attempt {attempt}: no exit after SIGTERM:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(status.success(), "attempt {attempt}: {status}:\n{text}");
        assert!(
            names(&spool.join("work")).is_empty(),
            "attempt {attempt}: frames left in work/:\n{text}"
        );
        put_back += text.matches("put back into incoming/").count();
        let out = names(&spool.join("out"));
        let incoming = names(&spool.join("incoming"));
        for f in &dropped {
            assert!(
                out.contains(&format!("{f}.json")) || incoming.contains(f),
                "attempt {attempt}: {f} neither finished nor back in incoming/:\n{text}"
            );
        }
    }
    assert!(put_back > 0, "no signal landed while frames were in flight");
    // What was put back is done by the next run: every frame has its one result.
    once(&config_path);
    let out = names(&spool.join("out"));
    let want: BTreeSet<String> = dropped.iter().map(|f| format!("{f}.json")).collect();
    assert_eq!(out, want, "one result per frame, no duplicates");
    assert!(names(&spool.join("incoming")).is_empty());
}
