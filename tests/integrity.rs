//! Packages are tamper- and rot-evident: each layer file's SHA-256 is in `model.toml` and
//! checked whenever the layer is read. A single flipped bit in a weight fails that model,
//! naming the layer, in `infer`, `batch` and the daemon (at start and on a reload), while
//! the other models run; a cascade fed by it fails with the source's reason.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// `(file, sha256)` of every layer, read from the manifest as plain TOML.
fn manifest_digests(pkg: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(pkg.join("model.toml")).unwrap();
    let manifest: toml::Value = toml::from_str(&text).unwrap();
    assert_eq!(manifest["format"].as_integer(), Some(2));
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["file"].as_str().unwrap().to_string(),
                l["sha256"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The digest as coreutils computes it: independent of memaflow's code.
fn sha256sum(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum (coreutils)");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// Flips one exponent bit of one weight of the layer with the most weight bytes. The file
/// still parses and has the manifest's size, inputs and outputs: only the digest tells.
/// Returns the layer's index and path.
fn flip_weight_bit(pkg: &Path) -> (usize, PathBuf) {
    let package = memaflow::model::Package::open(pkg).unwrap();
    let layer = (0..package.manifest.layers.len())
        .max_by_key(|&i| package.manifest.layers[i].weight_bytes)
        .unwrap();
    let path = pkg.join(&package.manifest.layers[layer].file);
    let bytes = bytes::Bytes::from(std::fs::read(&path).unwrap());
    let graph = memaflow::model::tflite::read_graph_shared(&bytes).unwrap();
    let weights = graph
        .tensors
        .iter()
        .filter_map(|t| t.data.as_ref())
        .max_by_key(|d| d.len())
        .unwrap();
    // The constant shares the file's buffer: its offset in the file is the distance.
    let offset = (weights.as_ptr() as usize)
        .checked_sub(bytes.as_ptr() as usize)
        .filter(|o| o + weights.len() <= bytes.len())
        .expect("the weights share the file's buffer");
    let middle = offset + (weights.len() / 8) * 4 + 3; // most significant byte of an f32
    let tensors = graph.tensors.len();
    drop(graph);
    let mut flipped = bytes.to_vec();
    flipped[middle] ^= 0x40;
    let reread = memaflow::model::tflite::read_graph(&flipped).unwrap();
    assert_eq!(reread.tensors.len(), tensors);
    std::fs::write(&path, &flipped).unwrap();
    (layer, path)
}

fn fails(args: &[&str], what: &str) -> String {
    let out = run_cli(args, Duration::from_secs(300));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    stderr
}

fn assert_names_layer(text: &str, layer: usize, what: &str) {
    assert!(
        text.contains(&format!("layer {layer} ")) && text.contains("SHA-256"),
        "{what}: the reason does not name layer {layer} and its digest: {text}"
    );
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The result entry of model `name` in a frame's result.
fn entry<'a>(result: &'a Value, name: &str) -> &'a Value {
    result["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {result}"))
}

/// Whether a model's result entry has outputs (the summary report's list) and no error.
fn has_outputs(entry: &Value) -> bool {
    entry.get("error").is_none() && entry["outputs"].as_array().is_some_and(|o| !o.is_empty())
}

/// A spool and configuration in `dir` running the two packages; `run` adds `[run]` keys.
fn daemon_config(dir: &Path, run: &str, models: &[&Path]) -> (PathBuf, PathBuf) {
    let spool = dir.join("spool");
    std::fs::create_dir_all(spool.join("incoming")).unwrap();
    let mut text =
        format!("[spool]\nroot = \"spool\"\nrescan_secs = 0.2\nsettle_secs = 0.1\n[run]\n{run}\n");
    for m in models {
        text += &format!("[[model]]\npath = {m:?}\n");
    }
    let config = dir.join("memaflow.toml");
    std::fs::write(&config, text).unwrap();
    (spool, config)
}

fn drop_frame(spool: &Path, name: &str) {
    let tmp = spool.join(format!(".{name}"));
    std::fs::copy(shared().join("frames/chelsea.png"), &tmp).unwrap();
    std::fs::rename(&tmp, spool.join("incoming").join(name)).unwrap();
}

fn wait_for(path: &Path, daemon: &mut Child) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            daemon.try_wait().unwrap().is_none(),
            "the daemon exited before writing {}",
            path.display()
        );
        assert!(
            start.elapsed() < hang_limit(Duration::from_secs(120)),
            "no {} within the limit",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn layer_digests_in_the_manifest_match_the_files() {
    let dir = scratch("integrity-digests");
    let pkg = import_shared("hand_recrop", &dir);
    let digests = manifest_digests(&pkg);
    assert!(digests.len() > 1);
    for (file, digest) in digests {
        assert_eq!(sha256sum(&pkg.join(&file)), digest, "{file}");
    }
}

#[test]
fn a_flipped_weight_bit_fails_its_model_naming_the_layer() {
    let dir = scratch("integrity-flip");
    let bad = import_shared("face_detection_short_range", &dir);
    let good = import_shared("hand_recrop", &dir);
    let (b, g) = (bad.to_str().unwrap(), good.to_str().unwrap());
    let frame = shared().join("frames/chelsea.png");
    let frame = frame.to_str().unwrap();
    let before = cli_ok(&["infer", "--model", b, frame]);
    let (layer, path) = flip_weight_bit(&bad);

    let err = fails(&["infer", "--model", b, frame], "infer");
    assert_names_layer(&err, layer, "infer");
    let err = fails(&["infer", "--model", b, "--whole", frame], "infer --whole");
    assert_names_layer(&err, layer, "infer --whole");
    cli_ok(&["infer", "--model", g, frame]);
    // A batch runs every inference to its end, then fails naming the broken one.
    let models = format!("{g},{b}");
    let err = fails(&["batch", "--models", &models, "--images", frame], "batch");
    assert_names_layer(&err, layer, "batch");
    assert!(err.contains("face_detection_short_range"), "{err}");

    // The daemon: that model fails at start, naming the layer; the other runs.
    let (spool, config) = daemon_config(&dir.join("daemon"), "", &[&bad, &good]);
    drop_frame(&spool, "cat.png");
    cli_ok(&["run", "--config", config.to_str().unwrap(), "--once"]);
    let result = json(&spool.join("out/cat.png.json"));
    let broken = &entry(&result, "face_detection_short_range")["error"];
    assert_eq!(broken["layer"], layer, "{broken}");
    assert_names_layer(broken["reason"].as_str().unwrap(), layer, "daemon");
    assert!(has_outputs(entry(&result, "hand_recrop")), "{result}");

    // Without the digest the same file runs, silently giving other numbers: what the
    // check prevents.
    let manifest = bad.join("model.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let old = &manifest_digests(&bad)[layer].1;
    std::fs::write(&manifest, text.replace(old, &sha256sum(&path))).unwrap();
    let after = cli_ok(&["infer", "--model", b, frame]);
    assert_ne!(before, after, "the flipped bit changed nothing");
}

#[test]
fn a_cascade_whose_source_is_damaged_fails_naming_the_source_and_its_layer() {
    let dir = scratch("integrity-cascade");
    let bad = import_shared("face_detection_short_range", &dir);
    let landmarks = import_shared("face_landmark_f32", &dir);
    let good = import_shared("hand_recrop", &dir);
    let (layer, _) = flip_weight_bit(&bad);
    let (spool, config) = daemon_config(&dir.join("daemon"), "", &[&bad]);
    // The detector reports boxes; the landmark model takes its crops.
    let mut text = std::fs::read_to_string(&config).unwrap();
    text += &format!(
        "report = \"boxes\"\n[model.boxes]\nboxes = \"regressors\"\n\
         scores = \"classificators\"\ninput_size = [128, 128]\nstrides = [8, 16, 16, 16]\n\
         keypoints = 6\n[[model]]\npath = {landmarks:?}\nreport = \"landmarks\"\n\
         [model.input]\nfrom = \"face_detection_short_range\"\nrotate_by = [0, 1]\n\
         [model.landmarks]\npoints = \"conv2d_20\"\npresence = \"conv2d_30\"\nsigmoid = true\n\
         [[model]]\npath = {good:?}\n"
    );
    std::fs::write(&config, text).unwrap();
    drop_frame(&spool, "cat.png");
    cli_ok(&["run", "--config", config.to_str().unwrap(), "--once"]);
    let result = json(&spool.join("out/cat.png.json"));
    let cascade = &entry(&result, "face_landmark_f32")["error"];
    assert_eq!(cascade["stage"], "source", "{result}");
    let reason = cascade["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("face_detection_short_range failed: "),
        "{reason}"
    );
    assert_names_layer(reason, layer, "the cascade's reason");
    // The model that does not depend on it runs.
    assert!(has_outputs(entry(&result, "hand_recrop")), "{result}");
}

#[test]
fn a_layer_damaged_while_the_daemon_runs_fails_on_its_reload() {
    let dir = scratch("integrity-reload");
    let bad = import_shared("face_detection_short_range", &dir);
    let good = import_shared("hand_recrop", &dir);
    // No layer cache: every inference reads its layers again.
    let (spool, config) = daemon_config(&dir.join("daemon"), "cache = \"off\"", &[&bad, &good]);
    let log = dir.join("daemon.log");
    let mut daemon = cli_command()
        .args(["run", "--config", config.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    drop_frame(&spool, "first.png");
    wait_for(&spool.join("out/first.png.json"), &mut daemon);
    let (layer, _) = flip_weight_bit(&bad);
    drop_frame(&spool, "second.png");
    wait_for(&spool.join("out/second.png.json"), &mut daemon);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = daemon.wait().unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );

    let first = json(&spool.join("out/first.png.json"));
    assert!(
        has_outputs(entry(&first, "face_detection_short_range")),
        "{first}"
    );
    let second = json(&spool.join("out/second.png.json"));
    let broken = &entry(&second, "face_detection_short_range")["error"];
    assert_names_layer(broken["reason"].as_str().unwrap(), layer, "reload");
    assert_eq!(
        entry(&first, "hand_recrop")["outputs"],
        entry(&second, "hand_recrop")["outputs"],
        "the other model's results changed"
    );
}

/// Rewrites a package's manifest as an older memaflow wrote it: format 1, no digests.
fn downgrade_to_format_1(pkg: &Path) {
    let manifest = pkg.join("model.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let old: String = text
        .lines()
        .filter(|l| !l.starts_with("sha256 = "))
        .map(|l| if l == "format = 2" { "format = 1" } else { l })
        .collect::<Vec<_>>()
        .join("\n");
    assert_ne!(old, text);
    std::fs::write(&manifest, old).unwrap();
}

#[test]
fn packages_without_digests_are_refused_with_re_import() {
    let dir = scratch("integrity-format-1");
    let pkg = import_shared("hand_recrop", &dir);
    downgrade_to_format_1(&pkg);
    let err = fails(&["inspect", pkg.to_str().unwrap()], "format 1");
    assert!(
        err.contains("format 1") && err.contains("re-import"),
        "{err}"
    );
}

/// The demo keeps its packages between runs: one an older memaflow left (format 1) is
/// imported again, and the demo runs.
#[test]
fn the_demo_imports_again_a_cached_package_of_format_1() {
    let dir = scratch("integrity-demo");
    let pkg = import_shared("face_detection_short_range", &dir.join("models"));
    downgrade_to_format_1(&pkg);
    // The demo finds ../shared/models from the repository, where the tests run.
    let out = cli_ok(&["demo", "--dir", dir.to_str().unwrap()]);
    assert!(
        out.contains("demo: importing") && out.contains("face_detection_short_range"),
        "{out}"
    );
    let package = memaflow::model::Package::open(&pkg).unwrap();
    assert_eq!(package.manifest.format, 2);
}

/// After a layer's first read (SHA-256) later reads compare a fast hash of the bytes: one
/// flipped bit between two reads in the same process still fails the second with the
/// manifest's digest named, and the restored file reads again.
#[test]
fn a_layer_damaged_between_two_reads_of_one_package_fails_the_second() {
    let dir = scratch("integrity-reread");
    let pkg = import_shared("face_detection_short_range", &dir);
    let package = memaflow::model::Package::open(&pkg).unwrap();
    let layer = (0..package.manifest.layers.len())
        .max_by_key(|&i| package.manifest.layers[i].weight_bytes)
        .unwrap();
    let path = pkg.join(&package.manifest.layers[layer].file);
    let good = std::fs::read(&path).unwrap();
    package.read_layer(layer).expect("the imported layer reads");
    package.read_layer(layer).expect("and reads again");
    let (flipped, _) = flip_weight_bit(&pkg);
    assert_eq!(flipped, layer);
    let err = format!("{:#}", package.read_layer(layer).unwrap_err());
    assert!(
        err.contains("SHA-256") && err.contains("re-import"),
        "{err}"
    );
    std::fs::write(&path, &good).unwrap();
    package.read_layer(layer).expect("the restored layer reads");
}
