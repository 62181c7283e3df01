//! The models in `../shared/models`: import, layer-by-layer equals whole bit for bit, and
//! both match the reference interpreter on the shared frames and on a constant 0.5 input.

mod common;
use common::*;
use memaflow::runtime::{FloatTensor, npy};
use std::path::Path;
use std::time::Duration;

fn read_outputs(dir: &Path) -> Vec<FloatTensor> {
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("outputs.json")).unwrap()).unwrap();
    let names = index["outputs"]
        .as_array()
        .expect("outputs.json lists the outputs");
    (0..names.len())
        .map(|n| FloatTensor::from(npy::read(&dir.join(format!("{n:02}.npy"))).unwrap()))
        .collect()
}

fn frames() -> Vec<std::path::PathBuf> {
    let mut frames: Vec<_> = std::fs::read_dir(shared().join("frames"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    frames.sort();
    assert!(
        frames.len() >= 4,
        "expected the shared frames in {}",
        shared().join("frames").display()
    );
    frames
}

/// For each input: the layer-by-layer outputs, after checking they equal `--whole` exactly.
fn run_and_check_identity(
    pkg: &Path,
    scratch_dir: &Path,
    inputs: &[(String, Option<&Path>)],
) -> Vec<(FloatTensor, Vec<FloatTensor>)> {
    let pkg = pkg.to_str().unwrap();
    let mut results = vec![];
    for (k, (label, image)) in inputs.iter().enumerate() {
        let input = scratch_dir.join(format!("input{k}.npy"));
        let layers = scratch_dir.join(format!("layers{k}"));
        let whole = scratch_dir.join(format!("whole{k}"));
        let input_s = input.to_str().unwrap();
        // An image is preprocessed by infer, which saves the tensor it fed; a constant
        // input was written beforehand. Either way --whole gets the very same tensor.
        let source: Vec<&str> = match image {
            Some(img) => vec![img.to_str().unwrap(), "--save-input", input_s],
            None => vec!["--input-npy", input_s],
        };
        let mut args = vec![
            "infer",
            "--model",
            pkg,
            "--npy-out",
            layers.to_str().unwrap(),
        ];
        args.extend(source);
        cli_ok(&args);
        cli_ok(&[
            "infer",
            "--model",
            pkg,
            "--input-npy",
            input_s,
            "--whole",
            "--npy-out",
            whole.to_str().unwrap(),
        ]);
        let (l, w) = (read_outputs(&layers), read_outputs(&whole));
        assert_eq!(l.len(), w.len());
        for (n, (a, b)) in l.iter().zip(&w).enumerate() {
            assert!(
                a.bit_identical(b),
                "{pkg} on {label}: output {n} layer by layer differs from --whole"
            );
        }
        results.push((FloatTensor::from(npy::read(&input).unwrap()), l));
    }
    results
}

#[test]
fn shared_models_are_bit_identical_and_match_the_reference() {
    for name in SHARED_SUPPORTED {
        let dir = scratch(&format!("shared-{name}"));
        let model = shared().join(format!("models/{name}.tflite"));
        let pkg = dir.join("pkg");
        cli_ok(&[
            "import",
            model.to_str().unwrap(),
            "--out",
            pkg.to_str().unwrap(),
        ]);
        let manifest = memaflow::model::Package::open(&pkg).unwrap().manifest;
        let half = FloatTensor::filled(manifest.inputs[0].shape.clone(), 0.5);
        let frames = frames();
        let mut inputs: Vec<(String, Option<&Path>)> = frames
            .iter()
            .map(|f| (f.display().to_string(), Some(f.as_path())))
            .collect();
        npy::write(
            &dir.join(format!("input{}.npy", inputs.len())),
            &half.shape,
            &half.data,
        )
        .unwrap();
        inputs.push(("constant 0.5".into(), None));
        let results = run_and_check_identity(&pkg, &dir, &inputs);

        let fed: Vec<FloatTensor> = results.iter().map(|(i, _)| i.clone()).collect();
        let Some(reference) = litert(&format!("shared-{name}"), &model, &fed) else {
            continue;
        };
        for ((label, _), ((_, ours), theirs)) in inputs.iter().zip(results.iter().zip(&reference)) {
            assert_eq!(ours.len(), theirs.len(), "{name}: output count");
            for (n, (a, b)) in ours.iter().zip(theirs).enumerate() {
                let err = relative_error(a, b);
                assert!(
                    err <= 1e-3,
                    "{name} on {label}: output {n} is off the reference by {err:.2e} of its largest value"
                );
            }
        }
    }
}

#[test]
fn selfie_segmentation_is_rejected_naming_the_custom_op() {
    let dir = scratch("selfie");
    let model = shared().join("models/selfie_segmentation.tflite");
    let out = run_cli(
        &[
            "import",
            model.to_str().unwrap(),
            "--out",
            dir.join("pkg").to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("Convolution2DTransposeBias"), "{stderr}");
    assert!(
        stderr.contains("selfie_segmentation.tflite"),
        "the error names the file: {stderr}"
    );
    assert!(
        stderr.contains("operator #"),
        "the error names the operator index: {stderr}"
    );
    assert!(
        !dir.join("pkg").exists(),
        "a failed import leaves no package behind"
    );
}
