//! Every command in README.md and docs/*.md that a user would type, run as written.
//!
//! The commands are the lines of the ```sh blocks (a trailing `\` joins the next line;
//! `# …` comments are dropped). They run in one fresh directory for all, in document
//! order, and nothing of a line is rewritten but the program: `memaflow …` and `cargo run
//! --release -- …` run the binary under test (the release build cargo would run), and the
//! lines of [`SHELL`] run under `sh -c` as they are. The directory holds the files the
//! commands name, copied in before: `face_detection_short_range.tflite` (from
//! `../shared/models`), `frame.jpg`, `a.jpg` and `b.jpg` (the shared `rocket.jpg`), `x.npy`
//! (a 416×416×3 tensor of 0.5), `benches/`, `models/` (the checkout's), `target/fixtures`
//! and `target/release/memaflow` (links to the unpacked wheel and the binary under test),
//! `memaflow.toml` (a spool beside it and the default pipeline, `models/pipeline.toml`,
//! over packages `models/build` makes in `target/models` — a recorded skip without the
//! fixtures), and `../shared` (a link to the shared directory). Before each `memaflow run
//! … --once`, a frame (`astronaut.png`) is dropped into `spool/incoming/`, and its result
//! must come out without an error. The demo's `$TMPDIR` is the directory's `tmp/`; it must
//! show one face with 468 landmarks on `astronaut.png` (the default pipeline ran).
//!
//! Every other line must be in [`NOT_RUN`] with the reason it is not run here (root,
//! QEMU, the cross build, the network, hours of running, a daemon that runs forever, the
//! same command run by another test in CI); a line in none of them fails the test, so a
//! new command in the docs gets run or explained.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Lines not run here (a prefix of the command), with why.
const NOT_RUN: &[(&str, &str)] = &[
    ("bash tests/run", "the whole test suite, this test included"),
    (
        "board/build-firmware",
        "the aarch64 cross build (docs/firmware.md)",
    ),
    ("bash tests/qemu/run", "boots QEMU"),
    (
        "git worktree add",
        "builds an older commit beside the checkout: docs/results.md's before/after procedure, run by hand",
    ),
    (
        "cp -a target/release /work/wt-split-old",
        "docs/results.md's before/after procedure, run by hand",
    ),
    (
        "(cd /work/wt-split-old",
        "docs/results.md's before/after procedure, run by hand",
    ),
    (
        "cargo bench --bench split",
        "a benchmark, run by hand when the machine is quiet",
    ),
    (
        "python3 benches/stream.py",
        "a benchmark of many minutes that makes memory cgroups (root)",
    ),
    (
        "benches/daemon_ab.sh",
        "a benchmark of two binaries in alternating pairs (minutes), run by hand with the \
         binary from before a change",
    ),
    (
        "python3 benches/face_pipeline.py",
        "a benchmark (a minute of both cores), run by hand when the machine is quiet \
         (docs/results.md)",
    ),
    (
        "memaflow show spool/out/cam.jpg.json",
        "needs a frame named cam.jpg done by a daemon; tests/cascade.rs runs `memaflow show` on a daemon's result, with and without --frame",
    ),
    (
        "node_exporter ",
        "Prometheus' exporter, not installed here; tests/fleet.rs checks the file it reads with promtool",
    ),
    ("bash tests/qemu/binfmt", "needs root"),
    ("rustup target add", "changes the toolchain"),
    ("apt-get install", "needs root and the network"),
    (
        "B=target/aarch64-unknown-linux-musl",
        "the cross-built binary",
    ),
    ("qemu-aarch64-static", "the cross-built binary under QEMU"),
    ("qemu-system-aarch64", "boots QEMU"),
    (
        "target/release/memaflow",
        "the host half of a host/QEMU comparison; tests/qemu/run",
    ),
    (
        "MEMAFLOW_TEST_RUNNER=qemu-aarch64-static",
        "the test suite under QEMU",
    ),
    (
        "memaflow run --config /etc/memaflow/memaflow.toml",
        "watches the installed spool forever",
    ),
    (
        "memaflow publish --config /etc/memaflow/memaflow.toml",
        "needs an MQTT broker; tests/publish.rs",
    ),
    (
        "memaflow bench --plan benches/quick.toml --out target/bench-quick",
        "minutes; the same command (benches/quick.toml into target/bench-quick) is CI's \
         `cargo test --release --test bench -- --ignored quick_plan` (.ci/run)",
    ),
    (
        "memaflow bench --plan benches/headline.toml",
        "minutes of runs; by hand (docs/results.md)",
    ),
    (
        "memaflow bench --plan benches/large.toml",
        "minutes of runs; by hand (docs/results.md)",
    ),
    (
        "memaflow bench --plan benches/five.toml",
        "half an hour; by hand (docs/results.md)",
    ),
    (
        "memaflow bench --plan benches/paper.toml",
        "hours; by hand (docs/results.md)",
    ),
    (
        "cargo bench --bench",
        "a measurement, run by hand on a quiet host",
    ),
    ("bitbake-config-build", "a Yocto build directory"),
    ("echo 'MEMAFLOW_PUBLISH_HOST", "a Yocto build directory"),
    ("MEMAFLOW_CONFIG=", "paths.env's contents, not a command"),
    (
        "bash tests/fetch-fixtures",
        "the network (PyPI); tests/run runs it before the tests",
    ),
    (
        "models/build --from mediapipe-0.10.14-",
        "the published wheel (the network; tests/fetch-fixtures keeps only its models); \
         tests/models.rs runs models/build --from on a wheel made of the same models",
    ),
    ("MEMAFLOW_SPOOL=", "paths.env's contents, not a command"),
];

/// Lines that are not `memaflow` commands, run under `sh -c` as written (a prefix).
const SHELL: &[&str] = &[
    "models/build --memaflow target/release/memaflow",
    "printf '[spool]",
];

/// Commands that fail by design, with what their error says.
const FAILS: &[(&str, &str)] = &[(
    "memaflow batch --models pkgs/yolov2_16 --input-npy x.npy x.npy --budget 20M --tiling off",
    "more than the whole budget of 20.0 MiB",
)];

/// The ```sh lines of a Markdown text, continuations joined, comments dropped.
fn commands(text: &str) -> Vec<String> {
    let mut out = vec![];
    let mut in_sh = false;
    let mut pending = String::new();
    for line in text.lines() {
        if line.starts_with("```") {
            in_sh = !in_sh && line.trim() == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        let code = line.split(" #").next().unwrap_or("").trim();
        if code.starts_with('#') || code.is_empty() {
            continue;
        }
        match code.strip_suffix('\\') {
            Some(head) => pending += &format!("{} ", head.trim()),
            None => {
                out.push(format!("{pending}{code}"));
                pending.clear();
            }
        }
    }
    out
}

fn documented() -> Vec<(String, String)> {
    let mut files = vec![repo().join("README.md")];
    let mut docs: Vec<_> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
        .iter()
        .flat_map(|f| {
            let name = f.strip_prefix(repo()).unwrap().display().to_string();
            commands(&std::fs::read_to_string(f).unwrap())
                .into_iter()
                .map(move |c| (name.clone(), c))
        })
        .collect()
}

/// The files the commands name, in `dir`; false (a recorded skip) without the packages of
/// the default pipeline.
fn prepare(dir: &Path) -> bool {
    let shared = shared().canonicalize().unwrap();
    std::os::unix::fs::symlink(&shared, dir.parent().unwrap().join("shared")).unwrap();
    std::fs::copy(
        shared.join("models/face_detection_short_range.tflite"),
        dir.join("face_detection_short_range.tflite"),
    )
    .unwrap();
    for name in ["frame.jpg", "a.jpg", "b.jpg"] {
        std::fs::copy(shared.join("frames/rocket.jpg"), dir.join(name)).unwrap();
    }
    let x = vec![0.5f32; 416 * 416 * 3];
    memaflow::runtime::npy::write(&dir.join("x.npy"), &[1, 416, 416, 3], &x).unwrap();
    for sub in ["benches", "models"] {
        std::fs::create_dir(dir.join(sub)).unwrap();
        for e in std::fs::read_dir(repo().join(sub)).unwrap().flatten() {
            if e.path().is_file() {
                std::fs::copy(e.path(), dir.join(sub).join(e.file_name())).unwrap();
            }
        }
    }
    std::fs::create_dir_all(dir.join("target/release")).unwrap();
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    std::os::unix::fs::symlink(bin(), dir.join("target/release/memaflow")).unwrap();
    let fixtures = repo().join("target/fixtures");
    std::os::unix::fs::symlink(&fixtures, dir.join("target/fixtures")).unwrap();
    if !fixtures.join("mediapipe/.complete").exists() {
        let reason = "no target/fixtures/mediapipe (run tests/fetch-fixtures): the default \
                      pipeline cannot be built";
        // CI fetches the fixtures: there a missing model set is a failure, not a skip.
        assert!(
            std::env::var("MEMAFLOW_REQUIRE_REFERENCE").as_deref() != Ok("1"),
            "{reason}"
        );
        skip("readme", reason);
        return false;
    }
    // README's `memaflow run --config memaflow.toml` comes before docs/models.md builds
    // the packages: they are built here first, as that page says.
    let built = Running::spawn(
        Command::new(dir.join("models/build"))
            .args(["--memaflow", "target/release/memaflow"])
            .current_dir(dir),
    )
    .wait(Duration::from_secs(300), "models/build");
    assert!(
        built.status.success(),
        "models/build failed: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let pipeline = std::fs::read_to_string(repo().join("models/pipeline.toml")).unwrap();
    let config =
        format!("[spool]\nroot = \"spool\"\n[models]\ndir = \"target/models\"\n{pipeline}");
    std::fs::write(dir.join("memaflow.toml"), &config).unwrap();
    true
}

/// The process that runs a documented line in `dir`, or why the line is not run.
fn command_for(line: &str, dir: &Path) -> Result<Command, &'static str> {
    if let Some((_, why)) = NOT_RUN.iter().find(|(p, _)| line.starts_with(p)) {
        return Err(why);
    }
    let mut command = if SHELL.iter().any(|p| line.starts_with(p)) {
        let mut sh = Command::new("sh");
        sh.args(["-c", line]);
        sh
    } else {
        let args = line
            .strip_prefix("memaflow ")
            .or_else(|| line.strip_prefix("cargo run --release -- "))
            .unwrap_or_else(|| {
                panic!("`{line}` is neither run nor listed in NOT_RUN with a reason")
            });
        let mut memaflow = cli_command();
        memaflow.args(args.split_whitespace());
        memaflow
    };
    command.current_dir(dir).env("TMPDIR", dir.join("tmp"));
    Ok(command)
}

#[test]
fn documented_commands_run_as_written() {
    let dir = scratch("readme").join("work");
    std::fs::create_dir_all(&dir).unwrap();
    if !prepare(&dir) {
        return;
    }
    let (mut ran, mut frames) = (0, 0);
    for (file, line) in documented() {
        let mut command = match command_for(&line, &dir) {
            Ok(command) => command,
            Err(why) => {
                skip("readme", &format!("{file}: `{line}` not run: {why}"));
                continue;
            }
        };
        let daemon_once = line.starts_with("memaflow run ") && line.contains(" --once");
        if daemon_once {
            frames += 1;
            std::fs::create_dir_all(dir.join("spool/incoming")).unwrap();
            let frame = dir.join(format!("spool/incoming/astronaut-{frames}.png"));
            std::fs::copy(shared().join("frames/astronaut.png"), frame).unwrap();
        }
        let out = Running::spawn(&mut command).wait(Duration::from_secs(600), &line);
        let stderr = String::from_utf8_lossy(&out.stderr);
        match FAILS.iter().find(|(c, _)| *c == line) {
            Some((_, says)) => assert!(
                out.status.code() == Some(2) && stderr.contains(says),
                "{file}: `{line}` should fail saying '{says}': {stderr}"
            ),
            None => assert!(out.status.success(), "{file}: `{line}` failed: {stderr}"),
        }
        if line.ends_with(" demo") {
            // The demo runs the default pipeline on the shared photos: the astronaut's face
            // and its mesh, not only the timing workloads.
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                stdout
                    .lines()
                    .any(|l| l.starts_with("astronaut.png")
                        && l.contains("1 face(s), 468 landmarks")),
                "{file}: `{line}` found no face on astronaut.png: {stdout}"
            );
        }
        if daemon_once {
            let result = dir.join(format!("spool/out/astronaut-{frames}.png.json"));
            let result = std::fs::read_to_string(&result)
                .unwrap_or_else(|e| panic!("{file}: `{line}` wrote no {}: {e}", result.display()));
            assert!(!result.contains("\"error\""), "{file}: `{line}`: {result}");
        }
        ran += 1;
    }
    assert!(ran >= 15, "only {ran} commands ran");
    assert!(frames >= 2, "only {frames} `memaflow run … --once` ran");
}
