//! Shared by the integration tests: scratch directories, the CLI, the shared fixtures and
//! the reference interpreter. Skips are never silent: each one is printed and appended to
//! `target/test-skips.txt`, which the test script prints at the end; with
//! `MEMAFLOW_REQUIRE_REFERENCE=1` (set by CI) a missing reference fails instead.
#![allow(dead_code)]

pub mod cgroup;

use memaflow::runtime::{FloatTensor, npy};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_memaflow")
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `../shared` beside the repository (models, frames, seeds).
pub fn shared() -> PathBuf {
    repo().join("../shared")
}

pub const SHARED_SUPPORTED: [&str; 3] = [
    "face_detection_short_range",
    "face_landmark_f32",
    "hand_recrop",
];

/// A fresh, empty scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The runner of cross-target runs (`cargo test --target aarch64-unknown-linux-musl`
/// under QEMU user mode): cargo wraps the test binary in its runner, not the binary the
/// tests start, so CI names the runner here too.
fn runner() -> Option<String> {
    std::env::var("MEMAFLOW_TEST_RUNNER")
        .ok()
        .filter(|r| !r.is_empty())
}

/// The program and leading arguments that run the CLI (the cross-target runner first,
/// when there is one), for commands built by other means than `cli_command`.
pub fn cli_argv() -> Vec<String> {
    runner()
        .into_iter()
        .chain(std::iter::once(bin().to_string()))
        .collect()
}

/// A command running the CLI, through the cross-target runner when there is one.
pub fn cli_command() -> Command {
    match runner() {
        Some(runner) => {
            let mut c = Command::new(runner);
            c.arg(bin());
            c
        }
        None => Command::new(bin()),
    }
}

/// A hang guard's time limit: emulated, the CLI runs 20–50× slower (tract's kernels under
/// TCG), and the guard must still catch a hang, not a slow machine.
pub fn hang_limit(limit: Duration) -> Duration {
    if runner().is_some() {
        limit * 50
    } else {
        limit
    }
}

/// Under a cross-target runner, a command that starts memaflow again (`bench` runs every
/// run as a child `memaflow batch`) needs the kernel to run the emulated binary itself: a
/// binfmt_misc entry (`tests/qemu/binfmt` registers QEMU's). Without one every child
/// fails with "Exec format error", which says nothing about memaflow.
pub fn require_child_exec() {
    if runner().is_none() {
        return;
    }
    let entry = "/proc/sys/fs/binfmt_misc/qemu-aarch64";
    let enabled = std::fs::read_to_string(entry).is_ok_and(|s| s.starts_with("enabled"));
    assert!(
        enabled,
        "{entry} is not enabled: emulated memaflow cannot start its children; run tests/qemu/binfmt (as root)"
    );
}

/// Runs the CLI and kills it after `limit`: a hang is a failure, not a stuck test run.
pub fn run_cli(args: &[&str], limit: Duration) -> Output {
    let limit = hang_limit(limit);
    let mut child = cli_command()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn memaflow");
    let start = Instant::now();
    // Drain pipes on threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = vec![];
        std::io::Read::read_to_end(&mut out, &mut v).ok();
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = vec![];
        std::io::Read::read_to_end(&mut err, &mut v).ok();
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            child.kill().ok();
            panic!("memaflow {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// Runs the CLI, expecting success; returns stdout.
pub fn cli_ok(args: &[&str]) -> String {
    let out = run_cli(args, Duration::from_secs(600));
    assert!(
        out.status.success(),
        "memaflow {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Imports `../shared/models/NAME.tflite` with the CLI into `dir/NAME`; returns the package.
pub fn import_shared(name: &str, dir: &Path) -> PathBuf {
    let pkg = dir.join(name);
    let model = shared().join(format!("models/{name}.tflite"));
    cli_ok(&[
        "import",
        model.to_str().unwrap(),
        "--out",
        pkg.to_str().unwrap(),
    ]);
    pkg
}

/// Records a skipped check so that the test script can print it.
pub fn skip(test: &str, reason: &str) {
    let line = format!("SKIPPED {test}: {reason}");
    eprintln!("{line}");
    let path = repo().join("target/test-skips.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        writeln!(f, "{line}").ok();
    }
}

fn reference_required() -> bool {
    std::env::var("MEMAFLOW_REQUIRE_REFERENCE").is_ok_and(|v| v == "1")
}

/// The Python that has `ai_edge_litert`, or why there is none.
pub fn reference_python() -> Result<String, String> {
    let python = std::env::var("MEMAFLOW_PYTHON").unwrap_or_else(|_| "python3".into());
    match Command::new(&python)
        .args(["-c", "import ai_edge_litert, numpy"])
        .output()
    {
        Ok(o) if o.status.success() => Ok(python),
        Ok(o) => Err(format!(
            "{python} cannot import ai_edge_litert ({}); run `pip install ai-edge-litert numpy` or set MEMAFLOW_PYTHON",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )),
        Err(e) => Err(format!("cannot run {python}: {e}")),
    }
}

/// Outputs of the reference interpreter (its reference kernels, no XNNPACK) for each input,
/// or `None` (recorded as a skip) when it is not installed.
pub fn litert(test: &str, model: &Path, inputs: &[FloatTensor]) -> Option<Vec<Vec<FloatTensor>>> {
    let python = match reference_python() {
        Ok(p) => p,
        Err(reason) => {
            assert!(
                !reference_required(),
                "{test}: reference interpreter required: {reason}"
            );
            skip(test, &reason);
            return None;
        }
    };
    let dir = scratch(&format!("litert-{test}"));
    let mut args = vec![
        repo()
            .join("tests/reference/litert_run.py")
            .display()
            .to_string(),
        model.display().to_string(),
        dir.join("out").display().to_string(),
    ];
    for (k, x) in inputs.iter().enumerate() {
        let p = dir.join(format!("in{k}.npy"));
        npy::write(&p, &x.shape, &x.data).unwrap();
        args.push(p.display().to_string());
    }
    let out = Command::new(&python).args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "reference run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results = (0..inputs.len())
        .map(|k| {
            let mut outs = vec![];
            for n in 0.. {
                let p = dir.join(format!("out/{k}/{n:02}.npy"));
                if !p.exists() {
                    break;
                }
                outs.push(FloatTensor::from(npy::read(&p).unwrap()));
            }
            outs
        })
        .collect();
    Some(results)
}

/// Largest absolute difference relative to the largest absolute reference value.
pub fn relative_error(got: &FloatTensor, want: &FloatTensor) -> f64 {
    assert_eq!(
        got.data.len(),
        want.data.len(),
        "element counts differ: {:?} vs {:?}",
        got.shape,
        want.shape
    );
    let scale = want
        .data
        .iter()
        .fold(0f64, |m, v| m.max(v.abs() as f64))
        .max(1e-12);
    let diff = got
        .data
        .iter()
        .zip(&want.data)
        .fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
    diff / scale
}

/// A deterministic pseudo-random tensor in [lo, hi).
pub fn random_tensor(shape: &[usize], seed: u64, lo: f32, hi: f32) -> FloatTensor {
    let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            lo + (hi - lo) * ((z >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect();
    FloatTensor::new(shape.to_vec(), data).unwrap()
}
