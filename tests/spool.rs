//! The spool daemon (`memaflow run`): results equal `memaflow infer`; bad input of every
//! kind gets a reason and never stops it; SIGKILL at random moments loses no frame and
//! leaves no half-written result; a frame in flight at every stop is failed after
//! `spool.max_attempts`, alone; SIGTERM stops it cleanly; inotify wakes it.

mod common;
use common::*;
use image::{DynamicImage, Rgb, RgbImage};
use memaflow::runtime::{FloatTensor, npy};
use memaflow::spool::schema::{
    FailureRecord, FrameResult, ModelOutcome, ModelStage, OutputSummary, Outputs,
};
use serde_json::Value;
use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const DETECTOR: &str = "face_detection_short_range";
const LANDMARKS: &str = "face_landmark_f32";

/// The daemon's command line, through the cross-test runner when CI sets one.
fn daemon(config: &Path, extra: &[&str]) -> Command {
    let mut c = cli_command();
    c.args(["run", "--config", config.to_str().unwrap()])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    c
}

/// Runs to completion (a hang is a failure), returning the output.
fn finish(mut c: Command, limit: Duration) -> Output {
    Running::spawn(&mut c).wait(limit, "the daemon")
}

fn once_ok(config: &Path) -> String {
    let out = finish(daemon(config, &["--once"]), Duration::from_secs(300));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "run --once failed: {stderr}");
    stderr
}

fn json(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", path.display()))
}

fn result(path: &Path) -> FrameResult {
    FrameResult::read(path).unwrap_or_else(|e| panic!("{e:#}"))
}

fn failure(path: &Path) -> FailureRecord {
    FailureRecord::read(path).unwrap_or_else(|e| panic!("{e:#}"))
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn shared_frames() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(shared().join("frames"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    assert!(v.len() >= 4, "expected the shared frames");
    v
}

fn write_config(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// A scratch directory with the shared face detector imported, an empty spool, and a
/// configuration running the detector on it: `[spool]` keys beyond the root, and `[run]`.
struct Fixture {
    spool: PathBuf,
    config: PathBuf,
}

fn detector_spool(test: &str, spool_keys: &str, run_keys: &str) -> Fixture {
    let dir = scratch(test);
    let det = import_shared(DETECTOR, &dir.join("models"));
    let spool = dir.join("spool");
    std::fs::create_dir_all(spool.join("incoming")).unwrap();
    let config = dir.join("memaflow.toml");
    write_config(
        &config,
        &format!(
            "[spool]\nroot = \"spool\"\n{spool_keys}\n[run]\n{run_keys}\n\
             [[model]]\npath = {det:?}\n"
        ),
    );
    Fixture { spool, config }
}

/// A small deterministic frame, encoded as `format`.
fn frame_bytes(seed: u32, format: image::ImageFormat) -> Vec<u8> {
    let img = RgbImage::from_fn(48, 36, |x, y| {
        Rgb([
            (x * 5 + seed * 7) as u8,
            (y * 7 + seed * 3) as u8,
            ((x + y) * 3 + seed) as u8,
        ])
    });
    let mut out = vec![];
    DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), format)
        .unwrap();
    out
}

/// Drops a frame into `incoming/` as producers should: written beside it, then renamed.
fn drop_frame(spool: &Path, name: &str, bytes: &[u8]) {
    let tmp = spool.join("incoming").join(format!(".{name}.part"));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, spool.join("incoming").join(name)).unwrap();
}

#[test]
fn once_on_shared_frames_equals_infer() {
    let dir = scratch("spool-equals-infer");
    let det = import_shared(DETECTOR, &dir.join("models"));
    let lm = import_shared(LANDMARKS, &dir.join("models"));
    let spool = dir.join("spool");
    std::fs::create_dir_all(spool.join("incoming")).unwrap();
    let frames = shared_frames();
    for f in &frames {
        std::fs::copy(f, spool.join("incoming").join(f.file_name().unwrap())).unwrap();
    }
    let config = dir.join("memaflow.toml");
    write_config(
        &config,
        &format!(
            "[spool]\nroot = \"spool\"\n[run]\nparallel = 2\nthreads = 2\n\
             [[model]]\npath = {det:?}\n[[model]]\npath = {lm:?}\n\
             [[model]]\npath = {det:?}\nreport = \"raw\"\n"
        ),
    );
    let log = once_ok(&config);
    assert_eq!(
        log.lines().filter(|l| l.contains("moved to done/")).count(),
        frames.len(),
        "one info line per frame:\n{log}"
    );
    for f in &frames {
        let name = f.file_name().unwrap().to_str().unwrap();
        let result = result(&spool.join("out").join(format!("{name}.json")));
        assert_eq!(result.frame, name);
        assert!(spool.join("done").join(name).is_file());
        let models = &result.models;
        assert_eq!(models.len(), 3);
        for (k, pkg) in [&det, &lm].iter().enumerate() {
            let infer: Value = serde_json::from_str(&cli_ok(&[
                "infer",
                "--model",
                pkg.to_str().unwrap(),
                f.to_str().unwrap(),
            ]))
            .unwrap();
            let Some(Outputs::Summary(summary)) = models[k].outputs() else {
                panic!("{name}: model {k} is summarised: {:?}", models[k]);
            };
            let infer_outputs: Vec<OutputSummary> =
                serde_json::from_value(infer["outputs"].clone()).unwrap();
            assert_eq!(
                summary, &infer_outputs,
                "{name}: {} differs from memaflow infer",
                infer["model"]
            );
        }
        // Each model's share of the scheduler's ledger: none above the frame's high-water
        // mark, together at least that (two models in flight at once may overlap).
        let frame_hw = result.memory.ledger_high_water_bytes;
        let shares: Vec<u64> = models
            .iter()
            .map(|m| match &m.outcome {
                ModelOutcome::Ran(run) => run.memory.unwrap().ledger_high_water_bytes,
                ModelOutcome::Failed { error } => panic!("{name}: {error:?}"),
            })
            .collect();
        assert!(
            shares.iter().all(|&s| s > 0 && s <= frame_hw),
            "{shares:?} vs {frame_hw}"
        );

        // Raw values equal infer's tensors bit for bit.
        let npy_dir = dir.join(format!("npy-{name}"));
        cli_ok(&[
            "infer",
            "--model",
            det.to_str().unwrap(),
            f.to_str().unwrap(),
            "--npy-out",
            npy_dir.to_str().unwrap(),
        ]);
        let Some(Outputs::Raw(raw)) = models[2].outputs() else {
            panic!("{name}: the third model is raw");
        };
        for (n, out) in raw.iter().enumerate() {
            let want = FloatTensor::from(npy::read(&npy_dir.join(format!("{n:02}.npy"))).unwrap());
            let got = FloatTensor::new(want.shape.clone(), out.values.clone()).unwrap();
            assert!(got.bit_identical(&want), "{name}: raw output {n} differs");
        }
    }
    let status = json(&spool.join("status.json"));
    assert_eq!(status["frames_done"], frames.len());
    assert_eq!(status["frames_failed"], 0);
    assert_eq!(status["state"], "stopped");
    // Layers stay resident across frames: with memory to spare, each configured model
    // reads each of its layers once over the whole run (frames in flight together share
    // a layer being loaded), and status.json shows them all resident.
    for (k, pkg) in [&det, &lm, &det].iter().enumerate() {
        let layers = memaflow::model::Package::open(pkg)
            .unwrap()
            .manifest
            .layers
            .len() as u64;
        let loaded: u64 = frames
            .iter()
            .map(|f| {
                let name = f.file_name().unwrap().to_str().unwrap();
                let result = result(&spool.join("out").join(format!("{name}.json")));
                match &result.models[k].outcome {
                    ModelOutcome::Ran(run) => u64::from(run.layers.unwrap().loaded),
                    ModelOutcome::Failed { error } => panic!("{name}: {error:?}"),
                }
            })
            .sum();
        assert_eq!(
            loaded,
            layers,
            "model {k}: layer loads over {} frames",
            frames.len()
        );
        let cached = &status["cache"]["models"][k];
        assert_eq!(cached["resident_layers"].as_u64(), Some(layers), "{cached}");
        assert!(cached["resident_bytes"].as_u64().unwrap() > 0, "{cached}");
    }
}

/// A PNG header claiming `w`×`h` pixels, with valid CRCs, and a token of data.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut v = (data.len() as u32).to_be_bytes().to_vec();
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        v.extend_from_slice(&body);
        v.extend_from_slice(&crc32(&body).to_be_bytes());
        v
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    png.extend(chunk(b"IEND", &[]));
    png
}

fn bmp_header(w: i32, h: i32) -> Vec<u8> {
    let mut v = b"BM".to_vec();
    v.extend_from_slice(&(54u32 + 64).to_le_bytes());
    v.extend_from_slice(&[0; 4]);
    v.extend_from_slice(&54u32.to_le_bytes());
    v.extend_from_slice(&40u32.to_le_bytes());
    v.extend_from_slice(&w.to_le_bytes());
    v.extend_from_slice(&h.to_le_bytes());
    v.extend_from_slice(&1u16.to_le_bytes());
    v.extend_from_slice(&24u16.to_le_bytes());
    v.extend_from_slice(&[0; 24]);
    v.extend_from_slice(&[7; 64]);
    v
}

#[test]
fn bad_inputs_get_a_reason_and_never_stop_the_daemon() {
    let dir = scratch("spool-bad-inputs");
    let models = dir.join("models");
    let det = import_shared(DETECTOR, &models);
    // Two damaged copies of the detector and a package that is not there.
    let copy = |name: &str| {
        let to = models.join(name);
        std::fs::create_dir_all(to.join("layers")).unwrap();
        std::fs::copy(det.join("model.toml"), to.join("model.toml")).unwrap();
        for e in std::fs::read_dir(det.join("layers")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join("layers").join(e.file_name())).unwrap();
        }
        to
    };
    let missing_layer = copy("missing_layer");
    std::fs::remove_file(missing_layer.join("layers/005.tflite")).unwrap();
    let corrupt_layer = copy("corrupt_layer");
    let victim = corrupt_layer.join("layers/003.tflite");
    let len = std::fs::metadata(&victim).unwrap().len() as usize;
    std::fs::write(&victim, vec![0xA5u8; len]).unwrap();
    let no_package = models.join("no_such_package");

    let spool = dir.join("spool");
    let incoming = spool.join("incoming");
    std::fs::create_dir_all(&incoming).unwrap();
    let put = |name: &str, bytes: &[u8]| std::fs::write(incoming.join(name), bytes).unwrap();
    let png = frame_bytes(1, image::ImageFormat::Png);
    let jpg = frame_bytes(2, image::ImageFormat::Jpeg);
    let outside = dir.join("outside.png");
    std::fs::write(&outside, &png).unwrap();

    // Good frames, sorted between the bad ones; one PNG under a .jpg name (decoded by
    // content, so it is good).
    let good = ["a-good.png", "m-good.jpg", "s-png-named.jpg", "z-good.ppm"];
    put("a-good.png", &png);
    put("m-good.jpg", &jpg);
    put("s-png-named.jpg", &png);
    put("z-good.ppm", &frame_bytes(3, image::ImageFormat::Pnm));

    // name → (stage, words the reason must contain)
    let mut bad: Vec<(&str, &str, &str)> = vec![];
    let mut add = |name: &'static str, bytes: Option<&[u8]>, stage, words| {
        if let Some(b) = bytes {
            put(name, b);
        }
        bad.push((name, stage, words));
    };
    add("b-empty.jpg", Some(b""), "decode", "empty");
    add("b-empty.png", Some(b""), "decode", "empty");
    add(
        "c-truncated.jpg",
        Some(&jpg[..jpg.len() / 2]),
        "decode",
        "jpeg",
    );
    // Cut inside the scan: the decoder alone would grey the missing rows and succeed.
    add(
        "c-cut-scan.jpg",
        Some(&jpg[..jpg.len() - 40]),
        "decode",
        "end-of-image",
    );
    add(
        "c-truncated.png",
        Some(&png[..png.len() / 2]),
        "decode",
        "decoding png",
    );
    add(
        "c-header-only.png",
        Some(&png[..40]),
        "decode",
        "decoding png",
    );
    // Whole in structure (segments, scan, end marker), but its Huffman table counts more
    // codes than exist: the decoder itself must refuse it.
    let mut corrupt = jpg.clone();
    let dht = corrupt.windows(2).position(|w| w == [0xFF, 0xC4]).unwrap();
    corrupt[dht + 5..dht + 21].fill(0xFF);
    add("d-corrupt.jpg", Some(&corrupt), "decode", "decoding jpeg");
    let mut corrupt = jpg.clone();
    for b in corrupt.iter_mut().skip(200).step_by(3) {
        *b = 0xFF;
    }
    add("d-scrambled.jpg", Some(&corrupt), "decode", "jpeg");
    let mut corrupt = png.clone();
    for b in corrupt.iter_mut().skip(40) {
        *b ^= 0x5A;
    }
    add("d-corrupt.png", Some(&corrupt), "decode", "decoding png");
    add(
        "d-soi-eoi.jpg",
        Some(b"\xFF\xD8\xFF\xD9"),
        "decode",
        "end-of-image",
    );
    add(
        "e-huge.png",
        Some(&png_header(30000, 30000)),
        "decode",
        "limit",
    );
    add(
        "e-huge.ppm",
        Some(b"P6\n30000 30000\n255\nxxxxxxxx"),
        "decode",
        "limit",
    );
    add(
        "e-huge.bmp",
        Some(&bmp_header(30000, 30000)),
        "decode",
        "limit",
    );
    add("e-zero.ppm", Some(b"P6\n0 0\n255\n"), "decode", "no pixels");
    add(
        "f-truncated.pgm",
        Some(b"P5\n64 64\n255\nabc"),
        "decode",
        "decoding pnm",
    );
    add(
        "f-truncated.bmp",
        Some(&bmp_header(64, 64)[..60]),
        "decode",
        "decoding bmp",
    );
    add(
        "g-text.jpg",
        Some(b"this is not a picture\n"),
        "decode",
        "not a jpeg, png",
    );
    add(
        "g-noise.png",
        Some(&[0x13u8; 999]),
        "decode",
        "not a jpeg, png",
    );
    add(
        "g-gif.gif",
        Some(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"),
        "decode",
        "not",
    );
    add(
        "g-webp.jpg",
        Some(b"RIFF\x1a\x00\x00\x00WEBPVP8 "),
        "decode",
        "not",
    );
    add(
        "h-oversized.png",
        Some(&vec![0u8; 3 << 20]),
        "read",
        "max_frame_bytes",
    );
    std::fs::create_dir(incoming.join("i-dir.jpg")).unwrap();
    std::fs::write(incoming.join("i-dir.jpg/inner.png"), &png).unwrap();
    add("i-dir.jpg", None, "read", "directory");
    std::fs::create_dir(incoming.join("i-empty-dir")).unwrap();
    add("i-empty-dir", None, "read", "directory");
    nix::unistd::mkfifo(&incoming.join("j-fifo.png"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    add("j-fifo.png", None, "read", "fifo");
    let _socket = std::os::unix::net::UnixListener::bind(incoming.join("j-socket")).unwrap();
    add("j-socket", None, "read", "socket");
    std::os::unix::fs::symlink(&outside, incoming.join("k-link.png")).unwrap();
    add("k-link.png", None, "read", "symbolic link");
    std::os::unix::fs::symlink("/etc/passwd", incoming.join("k-passwd.png")).unwrap();
    add("k-passwd.png", None, "read", "symbolic link");
    std::os::unix::fs::symlink("/nonexistent/x.png", incoming.join("k-dangling.png")).unwrap();
    add("k-dangling.png", None, "read", "symbolic link");
    std::fs::hard_link(&outside, incoming.join("l-hardlink.png")).unwrap();
    add("l-hardlink.png", None, "read", "hard links");
    put("n-unreadable.png", &png);
    add("n-unreadable.png", None, "read", "permission denied");
    assert!(bad.len() >= 25, "{} bad inputs", bad.len());

    let config = dir.join("memaflow.toml");
    write_config(
        &config,
        &format!(
            "[spool]\nroot = \"spool\"\nmax_frame_bytes = \"2M\"\n\
             [[model]]\npath = {det:?}\n[[model]]\npath = {missing_layer:?}\n\
             [[model]]\npath = {corrupt_layer:?}\n[[model]]\npath = {no_package:?}\n"
        ),
    );
    let mut command = daemon(&config, &["--once"]);
    // The daemon runs unprivileged; as root the test drops to nobody, for whom a mode-000
    // file really is unreadable.
    // Files this test creates belong to its effective user.
    if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&dir).unwrap()) == 0 {
        chown_tree(&spool, 65534);
        command.uid(65534).gid(65534);
    }
    std::fs::set_permissions(
        incoming.join("n-unreadable.png"),
        std::os::unix::fs::PermissionsExt::from_mode(0o000),
    )
    .unwrap();
    let out = finish(command, Duration::from_secs(120));
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "the daemon stopped: {log}");

    assert!(
        names(&incoming).is_empty(),
        "left in incoming: {:?}",
        names(&incoming)
    );
    assert!(names(&spool.join("work")).is_empty());
    for name in good {
        let r = result(&spool.join("out").join(format!("{name}.json")));
        let models = &r.models;
        assert_eq!(models.len(), 4, "{name}: {r:?}");
        assert!(
            matches!(models[0].outputs(), Some(Outputs::Summary(_))),
            "{name}: the good model ran: {r:?}"
        );
        let error = |k: usize| models[k].error().unwrap().clone();
        assert_eq!(error(1).stage, ModelStage::Package);
        assert_eq!(error(1).layer, Some(5), "{name}: {:?}", error(1));
        assert!(error(1).reason.contains("005.tflite"));
        assert_eq!(error(2).layer, Some(3), "{name}: {:?}", error(2));
        assert!(error(3).reason.contains("not a model package"));
        assert!(spool.join("done").join(name).exists());
    }
    let mut report = String::new();
    let mut wrong = vec![];
    for (name, stage, words) in &bad {
        let record = failure(&spool.join("failed").join(format!("{name}.error.json")));
        let reason = record.reason.to_lowercase();
        report += &format!("{name}: {} {reason}\n", record.stage.name());
        assert_eq!(record.frame, *name);
        assert!(
            std::fs::symlink_metadata(spool.join("failed").join(name)).is_ok(),
            "{name} itself is kept in failed/"
        );
        if record.stage.name() != *stage || !reason.contains(words) {
            wrong.push(format!(
                "{name}: expected stage {stage} and '{words}' in the reason"
            ));
        }
    }
    eprintln!("{report}");
    assert!(wrong.is_empty(), "{wrong:#?}");
    // The link was moved, never followed: its target is untouched.
    assert_eq!(std::fs::read(&outside).unwrap(), png);
    let status = json(&spool.join("status.json"));
    assert_eq!(status["frames_done"], good.len());
    assert_eq!(status["frames_failed"], bad.len());
}

fn chown_tree(path: &Path, id: u32) {
    std::os::unix::fs::lchown(path, Some(id), Some(id)).unwrap();
    if std::fs::symlink_metadata(path).unwrap().is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            chown_tree(&e.unwrap().path(), id);
        }
    }
}

#[test]
fn sigkill_at_random_moments_loses_nothing() {
    // The kills are the test's, not the frames' fault: no frame may run out of attempts
    // (a frame in flight at three kills in a row would be failed as unfinished).
    let Fixture { spool, config } = detector_spool(
        "spool-sigkill",
        "rescan_secs = 0.2\nsettle_secs = 0\nmax_attempts = 1000",
        "threads = 1",
    );
    // With a cascade: the detector's boxes (every anchor a candidate, so that even these
    // small generated frames give crops) feed the landmark model, two crops a frame.
    let lm = import_shared(LANDMARKS, &spool.join("../models"));
    let mut text = std::fs::read_to_string(&config).unwrap();
    text += &format!(
        "report = \"boxes\"\n[model.boxes]\nboxes = \"regressors\"\nscores = \"classificators\"\n\
         input_size = [128, 128]\nstrides = [8, 16, 16, 16]\nkeypoints = 6\n\
         score_threshold = 0.0\nmax_boxes = 2\nnms = \"weighted\"\n\
         [[model]]\npath = {lm:?}\nreport = \"landmarks\"\n[model.input]\n\
         from = \"{DETECTOR}\"\nrotate_by = [0, 1]\nscale = 1.5\nsquare = true\nmax = 2\n\
         [model.landmarks]\npoints = \"conv2d_20\"\npresence = \"conv2d_30\"\nsigmoid = true\n"
    );
    std::fs::write(&config, text).unwrap();
    // The kill schedule is reproducible.
    let mut rng = SplitMix64(4);
    let mut sent: Vec<(String, bool)> = vec![];
    let formats = [
        ("png", image::ImageFormat::Png),
        ("jpg", image::ImageFormat::Jpeg),
        ("ppm", image::ImageFormat::Pnm),
    ];
    let t0 = Instant::now();
    // Emulated, a daemon spends most of a short life starting and the frames left over
    // run afterwards at a fiftieth of the speed: fewer cycles there (CI's time), the same
    // schedule.
    let cycles = if emulated() { 30 } else { 100 };
    for cycle in 0..cycles {
        // Frames keep arriving: one while it runs, sometimes one before it starts; one in
        // ten is bad.
        let send = |sent: &mut Vec<(String, bool)>| {
            let k = sent.len();
            let (ext, format) = formats[k % 3];
            let good = k % 10 != 7;
            let name = format!("f{k:04}.{ext}");
            let bytes = if good {
                frame_bytes(k as u32, format)
            } else {
                b"garbage".to_vec()
            };
            drop_frame(&spool, &name, &bytes);
            sent.push((name, good));
        };
        if rng.below(3) == 0 {
            send(&mut sent);
        }
        let mut child = daemon(&config, &[])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let arrive = Duration::from_millis(rng.below(300));
        let life = arrive + Duration::from_millis(rng.below(300));
        std::thread::sleep(arrive);
        send(&mut sent);
        std::thread::sleep(life - arrive);
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(
            status.code().is_none() || status.success(),
            "cycle {cycle}: the daemon exited on its own with {status}"
        );
    }
    let killing = t0.elapsed();
    once_ok(&config);
    eprintln!(
        "{cycles} SIGKILL cycles in {killing:?}; {} frames sent",
        sent.len()
    );
    assert!(sent.len() >= cycles, "only {} frames sent", sent.len());

    assert!(names(&spool.join("incoming")).is_empty());
    assert!(names(&spool.join("work")).is_empty());
    let out = names(&spool.join("out"));
    let failed = names(&spool.join("failed"));
    let mut expected_out = BTreeSet::new();
    let mut expected_failed = BTreeSet::new();
    for (name, good) in &sent {
        if *good {
            let r = result(&spool.join("out").join(format!("{name}.json")));
            assert_eq!(r.frame, name.as_str());
            let boxes = r.models[0].detections().expect("the detector ran");
            assert_eq!(boxes.detections.len(), 2, "{name}: {r:?}");
            // Each detection has its crop's landmarks.
            assert!(
                boxes
                    .detections
                    .iter()
                    .all(|d| d.crops.len() == 1 && d.crops[0].roi.is_some()),
                "{name}: {r:?}"
            );
            assert!(
                matches!(r.models[1].outputs(), Some(Outputs::Landmarks(c)) if c.crops == 2),
                "{name}: {r:?}"
            );
            assert!(
                spool.join("done").join(name).is_file(),
                "{name} is in done/"
            );
            expected_out.insert(format!("{name}.json"));
        } else {
            let e = failure(&spool.join("failed").join(format!("{name}.error.json")));
            assert_eq!(e.stage.name(), "decode", "{name}: {e:?}");
            expected_failed.insert(name.clone());
            expected_failed.insert(format!("{name}.error.json"));
        }
    }
    // Exactly one record per frame: no duplicates (a `~N` name would mean a frame was
    // claimed twice), no temp files left behind.
    assert_eq!(out, expected_out);
    assert_eq!(failed, expected_failed);
}

/// The daemon watching its spool, its output captured.
fn watch(config: &Path) -> (Running, nix::unistd::Pid) {
    let child = Running::spawn(&mut daemon(config, &[]));
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    (child, pid)
}

fn frame_count(spool: &Path) -> usize {
    names(&spool.join("out")).len()
}

#[test]
fn sigterm_stops_cleanly_and_inotify_wakes_the_daemon() {
    // A rescan only every minute: frames are seen through inotify or not at all.
    let Fixture { spool, config } =
        detector_spool("spool-sigterm", "rescan_secs = 60\ndone = \"delete\"", "");
    let (child, pid) = watch(&config);
    std::thread::sleep(Duration::from_millis(500));
    for k in 0..3 {
        drop_frame(
            &spool,
            &format!("w{k}.png"),
            &frame_bytes(k, image::ImageFormat::Png),
        );
    }
    let seen = Instant::now();
    while frame_count(&spool) < 3 {
        assert!(
            seen.elapsed() < hang_limit(Duration::from_secs(20)),
            "inotify did not wake the daemon"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Same name again: a second result, the first kept.
    drop_frame(&spool, "w0.png", &frame_bytes(9, image::ImageFormat::Png));
    while frame_count(&spool) < 4 {
        assert!(seen.elapsed() < hang_limit(Duration::from_secs(20)));
        std::thread::sleep(Duration::from_millis(20));
    }
    // A stream of frames, then SIGTERM in the middle of it.
    for k in 0..20 {
        drop_frame(
            &spool,
            &format!("s{k:02}.png"),
            &frame_bytes(k, image::ImageFormat::Png),
        );
    }
    std::thread::sleep(Duration::from_millis(100));
    let term = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = child.wait(Duration::from_secs(5), "the daemon");
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "exit status {}: {log}", out.status);
    assert!(term.elapsed() < Duration::from_secs(5));
    assert!(log.contains("SIGTERM: stopping"), "{log}");
    assert_eq!(json(&spool.join("status.json"))["state"], "stopped");
    assert!(
        names(&spool.join("work")).is_empty(),
        "nothing left claimed"
    );
    // What was not done is still there for the next run, which does it.
    once_ok(&config);
    let out = names(&spool.join("out"));
    for k in 0..20 {
        assert!(
            out.contains(&format!("s{k:02}.png.json")),
            "s{k:02} lost: {out:?}"
        );
    }
    assert!(
        out.contains("w0.png.json") && out.contains("w0~1.png.json"),
        "{out:?}"
    );
    assert_ne!(
        result(&spool.join("out/w0.png.json")).models,
        result(&spool.join("out/w0~1.png.json")).models,
        "two different frames named w0.png, two different results"
    );
    assert!(names(&spool.join("done")).is_empty(), "done = \"delete\"");
    assert!(names(&spool.join("incoming")).is_empty());
}

#[test]
fn sigterm_puts_the_frame_in_flight_back() {
    let dir = scratch("spool-requeue");
    let models = dir.join("models");
    cli_ok(&["zoo", "--out", models.to_str().unwrap(), "--only", "agenet"]);
    let spool = dir.join("spool");
    std::fs::create_dir_all(spool.join("incoming")).unwrap();
    let config = dir.join("memaflow.toml");
    write_config(
        &config,
        "[spool]\nroot = \"spool\"\nrescan_secs = 60\nstop_grace_secs = 0\n\
         [run]\nthreads = 1\n[models]\ndir = \"models\"\n",
    );
    let (child, pid) = watch(&config);
    for k in 0..2 {
        drop_frame(
            &spool,
            &format!("r{k}.png"),
            &frame_bytes(k, image::ImageFormat::Png),
        );
    }
    let t = Instant::now();
    let in_flight = loop {
        // work/ appears when the daemon has opened the spool.
        if let Some(name) = std::fs::read_dir(spool.join("work"))
            .into_iter()
            .flatten()
            .flatten()
            .next()
        {
            break name.file_name().to_string_lossy().into_owned();
        }
        assert!(
            t.elapsed() < hang_limit(Duration::from_secs(20)),
            "no frame was claimed"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let out = child.wait(Duration::from_secs(5), "the daemon");
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "exit status {}: {log}", out.status);
    assert!(log.contains("put back into incoming/"), "{log}");
    assert!(names(&spool.join("work")).is_empty());
    assert!(
        names(&spool.join("incoming")).contains(&in_flight),
        "{in_flight} is back in incoming/"
    );
    assert!(!spool.join("out").join(format!("{in_flight}.json")).exists());
    once_ok(&config);
    assert_eq!(
        names(&spool.join("out")),
        BTreeSet::from(["r0.png.json".to_string(), "r1.png.json".to_string()])
    );
}

#[test]
fn restart_finishes_work_without_running_a_frame_twice() {
    let Fixture { spool, config } = detector_spool("spool-recovery", "", "");
    for d in ["work", "out", "failed"] {
        std::fs::create_dir_all(spool.join(d)).unwrap();
    }
    let png = frame_bytes(5, image::ImageFormat::Png);
    // As a crash leaves them: a frame whose result is complete, one whose result is
    // not there, one whose failure is recorded, and a temp file of an interrupted write.
    std::fs::write(spool.join("work/done-already.png"), &png).unwrap();
    let marker = "{\"frame\": \"done-already.png\", \"marker\": \"from the earlier run\"}";
    std::fs::write(spool.join("out/done-already.png.json"), marker).unwrap();
    std::fs::write(spool.join("work/unfinished.png"), &png).unwrap();
    std::fs::write(
        spool.join("out/.unfinished.png.json.tmp"),
        "{\"frame\": \"unf",
    )
    .unwrap();
    std::fs::write(spool.join("work/bad.png"), b"junk").unwrap();
    std::fs::write(
        spool.join("failed/bad.png.error.json"),
        "{\"frame\": \"bad.png\", \"stage\": \"decode\", \"reason\": \"earlier\"}",
    )
    .unwrap();
    let log = once_ok(&config);
    assert_eq!(
        std::fs::read_to_string(spool.join("out/done-already.png.json")).unwrap(),
        marker,
        "a complete result is not produced again"
    );
    assert!(
        log.contains("done-already.png: result already written"),
        "{log}"
    );
    let r = result(&spool.join("out/unfinished.png.json"));
    assert!(
        matches!(r.models[0].outputs(), Some(Outputs::Summary(_))),
        "{r:?}"
    );
    assert_eq!(
        json(&spool.join("failed/bad.png.error.json"))["reason"],
        "earlier"
    );
    assert!(spool.join("failed/bad.png").is_file());
    assert_eq!(
        names(&spool.join("done")),
        BTreeSet::from(["done-already.png".to_string(), "unfinished.png".to_string()])
    );
    assert!(names(&spool.join("work")).is_empty());
    assert_eq!(
        names(&spool.join("out")),
        BTreeSet::from([
            "done-already.png.json".to_string(),
            "unfinished.png.json".to_string()
        ]),
        "no temp file left"
    );
}

#[test]
fn a_frame_written_in_place_is_taken_once_complete() {
    let Fixture { spool, config } =
        detector_spool("spool-settle", "rescan_secs = 0.2\nsettle_secs = 5", "");
    let (child, pid) = watch(&config);
    // A producer writing straight into incoming/: half now, the rest a second later.
    let png = frame_bytes(3, image::ImageFormat::Png);
    let path = spool.join("incoming/slow.png");
    let mut f = std::fs::File::create(&path).unwrap();
    std::io::Write::write_all(&mut f, &png[..png.len() / 2]).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(path.exists(), "a file still being written was taken");
    std::io::Write::write_all(&mut f, &png[png.len() / 2..]).unwrap();
    drop(f);
    let t = Instant::now();
    let written = spool.join("out/slow.png.json");
    while !written.exists() {
        assert!(
            t.elapsed() < hang_limit(Duration::from_secs(4)),
            "the closed file was not taken on IN_CLOSE_WRITE"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = result(&written);
    assert_eq!((r.width, r.height), (48, 36));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait(Duration::from_secs(5), "the daemon");
    assert!(out.status.success());
}

/// Waits until `path` exists (a hang is a failure).
fn wait_for_path(path: &Path, what: &str) {
    let t = Instant::now();
    while std::fs::symlink_metadata(path).is_err() {
        assert!(
            t.elapsed() < hang_limit(Duration::from_secs(60)),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_frame_that_stops_the_daemon_every_time_is_failed_after_max_attempts() {
    let dir = scratch("spool-attempts");
    let lm = import_shared(LANDMARKS, &dir.join("models"));
    let spool = dir.join("spool");
    std::fs::create_dir_all(spool.join("incoming")).unwrap();
    let config = dir.join("memaflow.toml");
    // Slow frames (twelve models, no layer cache, one thread: a few hundred ms each),
    // so that a kill right after a frame is dispatched finds it in flight; two frames in
    // flight at once.
    write_config(
        &config,
        &format!(
            "[spool]\nroot = \"spool\"\nrescan_secs = 0.2\nsettle_secs = 0\nmax_attempts = 3\n\
             [run]\nthreads = 1\ncache = \"off\"\nframes_in_flight = 2\n{}",
            format!("[[model]]\npath = {lm:?}\n").repeat(12)
        ),
    );
    // `poison` stands for a frame that crashes the daemon: the test SIGKILLs it whenever
    // that frame is in flight. `innocent` is in flight beside it the first time.
    let (poison, innocent, later) = ("0-poison.png", "1-innocent.png", "2-later.png");
    for (k, name) in [poison, innocent, later].into_iter().enumerate() {
        drop_frame(
            &spool,
            name,
            &frame_bytes(k as u32, image::ImageFormat::Png),
        );
    }
    let work = spool.join("work");
    let kill_when = |path: PathBuf, what: &str, run: usize| {
        let log = std::fs::File::create(dir.join(format!("run{run}.log"))).unwrap();
        let mut child = daemon(&config, &[])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_for_path(&path, what);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            names(&spool.join("out")).is_empty(),
            "run {run}: a frame finished before the kill (frames too fast for this test)"
        );
    };
    // The first stop: both frames in flight.
    kill_when(work.join(innocent), "both frames claimed", 1);
    assert!(work.join(poison).is_file());
    // Attempts 2 and 3: the poison frame is retried first, alone, and stops the daemon.
    for attempt in 2..=3 {
        kill_when(
            work.join(format!(".{poison}.attempt-{attempt}")),
            &format!("attempt {attempt}"),
            attempt,
        );
    }
    // The fourth start fails it without running it; the others are done.
    let log = once_ok(&config);
    let e = failure(&spool.join(format!("failed/{poison}.error.json")));
    assert_eq!(e.stage.name(), "unfinished", "{e:?}");
    assert_eq!(e.attempts, Some(3), "{e:?}");
    assert!(e.reason.contains("never finished in 3 attempt"), "{e:?}");
    assert!(spool.join("failed").join(poison).is_file());
    assert!(
        log.contains(&format!("{poison}: failed (unfinished)")),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "{innocent}: claimed by an earlier run that did not finish; retrying, alone (attempt 2 of 3)"
        )),
        "{log}"
    );
    for name in [innocent, later] {
        let r = result(&spool.join("out").join(format!("{name}.json")));
        assert_eq!(r.models.len(), 12);
        assert!(r.models.iter().all(|m| m.outputs().is_some()), "{r:?}");
        assert!(spool.join("done").join(name).is_file());
    }
    assert!(names(&work).is_empty(), "markers left: {:?}", names(&work));
    assert!(names(&spool.join("incoming")).is_empty());
    let status = json(&spool.join("status.json"));
    assert_eq!(status["frames_failed"], 1, "{status}");
    assert_eq!(status["last_error"]["stage"], "unfinished", "{status}");
}
