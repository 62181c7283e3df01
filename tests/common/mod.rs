//! Shared by the integration tests: scratch directories, the CLI, the shared fixtures and
//! the reference interpreter. Skips are never silent: each one is printed and appended to
//! `target/test-skips.txt`, which the test script prints at the end; with
//! `MEMAFLOW_REQUIRE_REFERENCE=1` (set by CI) a missing reference fails instead.
#![allow(dead_code)]

pub mod cgroup;

use memaflow::model::graph::{DType, Graph, Tensor, TensorId};
use memaflow::model::tflite::{WriteOptions, write_graph};
use memaflow::model::{ImportOptions, Package, import};
use memaflow::runtime::{FloatTensor, npy, run_layerwise, run_whole};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
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

/// Whether the tests run under a cross-target runner (QEMU user mode).
pub fn emulated() -> bool {
    runner().is_some()
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

/// A child process whose stdout and stderr are read on threads from the start, so that a
/// chatty child never blocks on a full pipe; [`Running::wait`] is the hang guard.
pub struct Running {
    child: Child,
    stdout: std::thread::JoinHandle<Vec<u8>>,
    stderr: std::thread::JoinHandle<Vec<u8>>,
}

impl Running {
    /// Starts `command` with its stdout and stderr piped to the test.
    pub fn spawn(command: &mut Command) -> Running {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the child");
        let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
            std::thread::spawn(move || {
                let mut v = vec![];
                pipe.read_to_end(&mut v).ok();
                v
            })
        };
        let stdout = drain(Box::new(child.stdout.take().expect("piped")));
        let stderr = drain(Box::new(child.stderr.take().expect("piped")));
        Running {
            child,
            stdout,
            stderr,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the child to exit. A hang is a failure, not a stuck test run: after
    /// `limit` (see [`hang_limit`]) the child is killed and the test fails, showing what
    /// `what` wrote to stderr.
    pub fn wait(mut self, limit: Duration, what: &str) -> Output {
        let limit = hang_limit(limit);
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > limit {
                self.child.kill().ok();
                self.child.wait().ok();
                let stderr = self.stderr.join().unwrap_or_default();
                panic!(
                    "{what} did not finish within {limit:?}:\n{}",
                    String::from_utf8_lossy(&stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Output {
            status,
            stdout: self.stdout.join().unwrap(),
            stderr: self.stderr.join().unwrap(),
        }
    }
}

/// Runs the CLI and kills it after `limit`: a hang is a failure, not a stuck test run.
pub fn run_cli(args: &[&str], limit: Duration) -> Output {
    Running::spawn(cli_command().args(args)).wait(limit, &format!("memaflow {args:?}"))
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

/// `models/build` (the default model set's packages, as the image has them) from `from`
/// (the wheel or its unpacked modules) into `out`, with `manifest`.
pub fn models_build(from: &Path, out: &Path, manifest: &Path) -> Output {
    Running::spawn(
        Command::new("python3")
            .arg(repo().join("models/build"))
            .args(["--manifest", manifest.to_str().unwrap()])
            .args(["--from", from.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap()])
            .args(["--memaflow", bin()]),
    )
    .wait(Duration::from_secs(600), "models/build")
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

/// The tests' one pseudo-random generator (SplitMix64): small, and the same stream on every
/// machine, so that inputs and schedules are reproducible. The state is the seed.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in [lo, hi), in steps of (hi - lo) / 2^24.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
}

/// A deterministic pseudo-random tensor in [lo, hi).
pub fn random_tensor(shape: &[usize], seed: u64, lo: f32, hi: f32) -> FloatTensor {
    let mut rng = SplitMix64(seed);
    // Every tensor the tests compare against was drawn from the second value on.
    rng.next();
    let n: usize = shape.iter().product();
    let data = (0..n).map(|_| rng.uniform(lo, hi)).collect();
    FloatTensor::new(shape.to_vec(), data).unwrap()
}

/// Writes `graph` as a .tflite, imports it, runs `input` layer by layer and whole (checking
/// they agree exactly); returns the outputs, the package and the model file.
pub fn import_and_run(
    test: &str,
    graph: &Graph,
    options: WriteOptions,
    input: &FloatTensor,
) -> (Vec<FloatTensor>, Package, PathBuf) {
    let dir = scratch(test);
    let file = dir.join(format!("{test}.tflite"));
    std::fs::write(&file, write_graph(graph, options).unwrap()).unwrap();
    import(&file, &dir.join("pkg"), &ImportOptions::default())
        .unwrap_or_else(|e| panic!("{test}: import: {e:#}"));
    let pkg = Package::open(dir.join("pkg")).unwrap();
    let layers = run_layerwise(&pkg, input).unwrap_or_else(|e| panic!("{test}: {e:#}"));
    let whole = run_whole(&pkg, input).unwrap_or_else(|e| panic!("{test}: {e:#}"));
    for (a, b) in layers.outputs.iter().zip(&whole.outputs) {
        assert!(
            a.bit_identical(b),
            "{test}: layer by layer differs from whole"
        );
    }
    (layers.outputs, pkg, file)
}

/// Checks `ours` against the reference interpreter's outputs for the model `file`: each
/// within `tolerance` of the largest reference magnitude (a recorded skip without it).
pub fn assert_reference(
    test: &str,
    file: &std::path::Path,
    input: &FloatTensor,
    ours: &[FloatTensor],
    tolerance: f64,
) {
    if let Some(reference) = litert(test, file, std::slice::from_ref(input)) {
        for (n, (a, b)) in ours.iter().zip(&reference[0]).enumerate() {
            let err = relative_error(a, b);
            assert!(
                err <= tolerance,
                "{test}: output {n} off the reference by {err:.2e}"
            );
        }
    }
}

/// Adds a float graph input of `shape`.
pub fn input(graph: &mut Graph, shape: &[usize]) -> TensorId {
    let t = graph.add_tensor(Tensor::activation("input", shape.to_vec(), DType::F32));
    graph.inputs.push(t);
    t
}

/// `NAME{labels} value` lines of a Prometheus text file, by name and labels.
pub fn samples(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap();
            (key.to_string(), value.parse().unwrap())
        })
        .collect()
}

/// A tmpfs mounted for a test (a small disk to fill), unmounted when dropped. As root
/// `mount` runs directly, otherwise through `sudo -n` (CI's user), the file system then
/// owned by the user. `Err` says why there is none, for the test to record as a skip.
pub struct Tmpfs(pub PathBuf, bool);

impl Tmpfs {
    /// `options`: tmpfs' own, e.g. `size=3m,nr_inodes=256`.
    pub fn mount(dir: &Path, options: &str) -> Result<Tmpfs, String> {
        use std::os::unix::fs::MetadataExt;
        std::fs::create_dir_all(dir).unwrap();
        // The test's own user and group: those of the directory it just made.
        let meta = std::fs::metadata(dir).unwrap();
        let (uid, gid) = (meta.uid(), meta.gid());
        let sudo = uid != 0;
        let options = format!("{options},uid={uid},gid={gid},mode=0700");
        let out = privileged(sudo, "mount")
            .args(["-t", "tmpfs", "-o", &options, "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{}mount -t tmpfs failed: {}",
                if sudo { "sudo -n " } else { "" },
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs(dir.to_path_buf(), sudo))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = privileged(self.1, "umount").arg("-l").arg(&self.0).status();
    }
}

fn privileged(sudo: bool, program: &str) -> Command {
    if sudo {
        let mut c = Command::new("sudo");
        c.args(["-n", program]);
        c
    } else {
        Command::new(program)
    }
}

/// Writes `path` until the file system has no block left.
pub fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x55u8; 16 << 10];
    loop {
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => return,
            Err(e) => panic!("filling: {e}"),
        }
    }
}

/// Creates empty files in the directory `dir` (created first) until the file system has
/// no inode left: then not even an empty file fits. Returns how many were made.
pub fn fill_inodes(dir: &Path) -> usize {
    std::fs::create_dir(dir).unwrap();
    let mut n = 0;
    loop {
        match std::fs::File::create(dir.join(n.to_string())) {
            Ok(_) => n += 1,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => return n,
            Err(e) => panic!("filling inodes: {e}"),
        }
    }
}

/// Bytes free for an unprivileged writer on the file system of `path`.
pub fn free_bytes(path: &Path) -> u64 {
    let v = nix::sys::statvfs::statvfs(path).unwrap();
    v.blocks_available() as u64 * v.fragment_size() as u64
}
