//! The generated benchmark networks: sizes as in the paper, and layer-by-layer execution
//! bit-identical to the whole model.

mod common;
use common::*;
use memaflow::model::Package;
use memaflow::runtime::{run_layerwise, run_whole};

const MIB: f64 = 1024.0 * 1024.0;

#[test]
fn zoo_sizes_follow_the_paper_and_layers_equal_whole() {
    let dir = scratch("zoo");
    cli_ok(&["zoo", "--out", dir.to_str().unwrap()]);
    let paper = [
        ("agenet", 43.5),
        ("gendernet", 43.5),
        ("facenet", 217.0),
        ("sos", 217.0),
        ("sos_googlenet", 22.8),
        ("yolov2_16", 0.0),
    ];
    for (name, mib) in paper {
        let pkg = Package::open(dir.join(name)).unwrap();
        let weights = pkg.manifest.weight_bytes() as f64 / MIB;
        if mib > 0.0 {
            assert!(
                (weights / mib - 1.0).abs() <= 0.10,
                "{name}: {weights:.1} MiB of weights, the paper says {mib} MiB"
            );
        }
        let table = cli_ok(&["inspect", dir.join(name).to_str().unwrap()]);
        assert!(table.contains("total"), "inspect prints totals: {table}");
        let input = random_tensor(&pkg.manifest.inputs[0].shape, name.len() as u64, -1.0, 1.0);
        let layers = run_layerwise(&pkg, &input).unwrap();
        let whole = run_whole(&pkg, &input).unwrap();
        assert_eq!(layers.outputs.len(), whole.outputs.len());
        for (a, b) in layers.outputs.iter().zip(&whole.outputs) {
            assert!(
                a.bit_identical(b),
                "{name}: layer-by-layer output differs from the whole model"
            );
            assert!(
                a.data.iter().all(|v| v.is_finite()),
                "{name}: non-finite outputs"
            );
        }
    }
}

#[test]
fn zoo_is_deterministic() {
    let a = scratch("zoo-a");
    let b = scratch("zoo-b");
    cli_ok(&[
        "zoo",
        "--out",
        a.to_str().unwrap(),
        "--only",
        "sos_googlenet",
    ]);
    cli_ok(&[
        "zoo",
        "--out",
        b.to_str().unwrap(),
        "--only",
        "sos_googlenet",
    ]);
    let pa = Package::open(a.join("sos_googlenet")).unwrap();
    for i in 0..pa.manifest.layers.len() {
        let fa = std::fs::read(pa.layer_path(i)).unwrap();
        let fb = std::fs::read(b.join("sos_googlenet").join(&pa.manifest.layers[i].file)).unwrap();
        assert!(fa == fb, "layer {i} differs between two generations");
    }
}

/// Import holds one copy of the weights plus the largest layer file being written: its
/// peak stays under 2× the weights + 50 MiB, on the largest network (217 MiB of weights).
#[test]
fn import_peak_rss_stays_below_twice_the_weights() {
    let dir = scratch("zoo-import-rss");
    cli_ok(&["zoo", "--out", dir.to_str().unwrap(), "--only", "facenet"]);
    let pkg = Package::open(dir.join("facenet")).unwrap();
    let model = dir.join("facenet.tflite");
    let bytes =
        memaflow::model::tflite::write_graph(&pkg.whole_graph().unwrap(), Default::default())
            .unwrap();
    std::fs::write(&model, bytes).unwrap();
    drop(pkg);
    let out = cli_ok(&[
        "import",
        model.to_str().unwrap(),
        "--out",
        dir.join("reimported").to_str().unwrap(),
    ]);
    let peak: f64 = out
        .split("peak RSS ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect(&out);
    let weights = Package::open(dir.join("reimported"))
        .unwrap()
        .manifest
        .weight_bytes() as f64
        / MIB;
    assert!(
        peak < 2.0 * weights + 50.0,
        "import peaked at {peak} MiB for {weights:.1} MiB of weights"
    );
}
