//! Every command in README.md and docs/*.md that a user would type, run as written.
//!
//! The commands are the lines of the ```sh blocks (a trailing `\` joins the next line;
//! `# …` comments are dropped). Each `memaflow …` line runs with the binary under test for
//! `memaflow`, in one fresh directory for all, in document order; nothing else of the line
//! is rewritten. The directory holds the files the commands name, copied in before:
//! `face_detection_short_range.tflite` (from `../shared/models`), `frame.jpg`, `a.jpg` and
//! `b.jpg` (the shared `rocket.jpg`), `x.npy` (a 416×416×3 tensor of 0.5), `benches/`,
//! `memaflow.toml` and `face.toml` (a spool beside them and the default pipeline,
//! `models/pipeline.toml`, over packages `models/build` makes in `target/models` — a
//! recorded skip without the fixtures), and `../shared` (a link to the shared directory).
//!
//! Every other line must be in [`NOT_RUN`] with the reason it is not run here (root,
//! QEMU, the cross build, the network, hours of running, a daemon that runs forever); a
//! line in neither fails the test, so a new command in the docs gets run or explained.

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;

/// Lines not run here (a prefix of the command), with why.
const NOT_RUN: &[(&str, &str)] = &[
    ("cargo run --release -- demo", "builds memaflow; tests/spool.rs runs the demo"),
    ("bash tests/run", "the whole test suite, this test included"),
    ("board/build-firmware", "the aarch64 cross build (docs/firmware.md)"),
    ("bash tests/qemu/run", "boots QEMU"),
    ("bash tests/qemu/binfmt", "needs root"),
    ("rustup target add", "changes the toolchain"),
    ("apt-get install", "needs root and the network"),
    ("B=target/aarch64-unknown-linux-musl", "the cross-built binary"),
    ("qemu-aarch64-static", "the cross-built binary under QEMU"),
    ("qemu-system-aarch64", "boots QEMU"),
    ("target/release/memaflow", "the host half of a host/QEMU comparison; tests/qemu/run"),
    ("MEMAFLOW_TEST_RUNNER=qemu-aarch64-static", "the test suite under QEMU"),
    ("memaflow run --config /etc/memaflow/memaflow.toml", "watches the installed spool forever"),
    ("memaflow publish --config /etc/memaflow/memaflow.toml", "needs an MQTT broker; tests/publish.rs"),
    ("memaflow bench --plan benches/headline.toml", "minutes of runs; by hand (docs/results.md)"),
    ("memaflow bench --plan benches/large.toml", "minutes of runs; by hand (docs/results.md)"),
    ("memaflow bench --plan benches/five.toml", "half an hour; by hand (docs/results.md)"),
    ("memaflow bench --plan benches/paper.toml", "hours; by hand (docs/results.md)"),
    ("bitbake-config-build", "a Yocto build directory"),
    ("echo 'MEMAFLOW_PUBLISH_HOST", "a Yocto build directory"),
    ("MEMAFLOW_CONFIG=", "paths.env's contents, not a command"),
    ("bash tests/fetch-fixtures", "the network (PyPI); run before the tests by tests/run"),
    ("models/build", "tests/models.rs runs it (and this test, to make the packages)"),
    ("printf '[spool]", "writes face.toml, which this test writes the same way"),
    ("MEMAFLOW_SPOOL=", "paths.env's contents, not a command"),
];

/// Commands that fail by design, with what their error says.
const FAILS: &[(&str, &str)] = &[(
    "memaflow batch --models pkgs/yolov2_16 --input-npy x.npy x.npy --budget 20M --tiling off",
    "layer 8 needs",
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
    std::fs::create_dir(dir.join("benches")).unwrap();
    for e in std::fs::read_dir(repo().join("benches")).unwrap().flatten() {
        std::fs::copy(e.path(), dir.join("benches").join(e.file_name())).unwrap();
    }
    let fixtures = repo().join("target/fixtures/mediapipe");
    if !fixtures.join(".complete").exists() {
        skip("readme", "no target/fixtures/mediapipe (run tests/fetch-fixtures): the default pipeline cannot be built");
        return false;
    }
    let built = std::process::Command::new("python3")
        .arg(repo().join("models/build"))
        .args(["--from", fixtures.to_str().unwrap(), "--out"])
        .arg(dir.join("target/models"))
        .args(["--memaflow", bin()])
        .status()
        .unwrap();
    assert!(built.success(), "models/build failed");
    let pipeline = std::fs::read_to_string(repo().join("models/pipeline.toml")).unwrap();
    std::fs::create_dir_all(dir.join("spool/incoming")).unwrap();
    std::fs::copy(shared.join("frames/astronaut.png"), dir.join("spool/incoming/astronaut.png"))
        .unwrap();
    let config = format!("[spool]\nroot = \"spool\"\n[models]\ndir = \"target/models\"\n{pipeline}");
    std::fs::write(dir.join("memaflow.toml"), &config).unwrap();
    std::fs::write(dir.join("face.toml"), &config).unwrap();
    true
}

#[test]
fn documented_commands_run_as_written() {
    let dir = scratch("readme").join("work");
    std::fs::create_dir_all(&dir).unwrap();
    if !prepare(&dir) {
        return;
    }
    let mut ran = 0;
    for (file, command) in documented() {
        if let Some((_, why)) = NOT_RUN.iter().find(|(p, _)| command.starts_with(p)) {
            skip("readme", &format!("{file}: `{command}` not run: {why}"));
            continue;
        }
        let args: Vec<&str> = command.split_whitespace().collect();
        assert_eq!(
            args[0], "memaflow",
            "{file}: `{command}` is neither run nor listed in NOT_RUN with a reason"
        );
        let out = Running::spawn(cli_command().args(&args[1..]).current_dir(&dir))
            .wait(Duration::from_secs(600), &command);
        let stderr = String::from_utf8_lossy(&out.stderr);
        match FAILS.iter().find(|(c, _)| *c == command) {
            Some((_, says)) => assert!(
                out.status.code() == Some(2) && stderr.contains(says),
                "{file}: `{command}` should fail saying '{says}': {stderr}"
            ),
            None => assert!(out.status.success(), "{file}: `{command}` failed: {stderr}"),
        }
        ran += 1;
    }
    assert!(ran >= 15, "only {ran} commands ran");
    // The default pipeline ran on the frame `memaflow run … --once` found.
    let result = std::fs::read_to_string(dir.join("spool/out/astronaut.png.json")).unwrap();
    assert!(!result.contains("\"error\""), "{result}");
}
