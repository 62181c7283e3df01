//! Cheaper reloads (runtime/reload.rs): a layer reloaded through its template is the very
//! plan of a full load — same graph, same packed weights bit for bit — and gives the same
//! outputs; every layer of the shared models gets a template.

mod common;
use common::*;
use memaflow::model::Package;
use memaflow::runtime::{Activations, LoadPhases, load_layer, load_with_template, reload};
use std::path::PathBuf;

fn packages() -> Vec<PathBuf> {
    let dir = scratch("reload-packages");
    let mut out = vec![
        import_shared("face_detection_short_range", &dir),
        import_shared("face_landmark_f32", &dir),
    ];
    let fixtures = repo().join("target/fixtures/mediapipe");
    for m in [
        "palm_detection/palm_detection_full",
        "hand_landmark/hand_landmark_full",
    ] {
        let model = fixtures.join(format!("{m}.tflite"));
        if !model.exists() {
            skip(
                "reload",
                &format!("{} missing: run tests/fetch-fixtures", model.display()),
            );
            continue;
        }
        let name = m.split('/').next_back().unwrap();
        cli_ok(&[
            "import",
            model.to_str().unwrap(),
            "--out",
            dir.join(name).to_str().unwrap(),
        ]);
        out.push(dir.join(name));
    }
    out
}

#[test]
fn a_reloaded_layer_is_the_full_load_bit_for_bit() {
    for dir in packages() {
        let pkg = Package::open(&dir).unwrap();
        let input = random_tensor(&pkg.manifest.inputs[0].shape, 15, -1.0, 1.0);
        let (mut full, mut again) = (
            Activations::new(&pkg, &input).unwrap(),
            Activations::new(&pkg, &input).unwrap(),
        );
        for i in 0..pkg.manifest.layers.len() {
            let mut phases = LoadPhases::default();
            let (first, template) = load_with_template(&pkg, i, &mut phases).unwrap();
            let template =
                template.unwrap_or_else(|e| panic!("{}: no template: {e:#}", pkg.name()));
            let reloaded = reload(&pkg, i, &template, &mut phases).unwrap();
            let plain = load_layer(&pkg, i).unwrap();
            // Packing leaves padding uninitialised in a plain load, so the plans are
            // compared where they are defined: the template's first load and the reload.
            if let Some(d) = reloaded.plan_difference(&first) {
                panic!(
                    "{} layer {i}: the reload differs from the full load: {d}",
                    pkg.name()
                );
            }
            full.step(&pkg, &plain).unwrap();
            again.step(&pkg, &reloaded).unwrap();
        }
        let (a, b) = (full.finish(&pkg).unwrap(), again.finish(&pkg).unwrap());
        assert_eq!(a.len(), b.len());
        for (n, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                x.bit_identical(y),
                "{}: output {n} differs after reloads",
                pkg.name()
            );
        }
    }
}

#[test]
fn a_changed_layer_file_is_not_reloaded_through_an_old_template() {
    let dir = scratch("reload-changed");
    let pkg_dir = import_shared("face_detection_short_range", &dir);
    let pkg = Package::open(&pkg_dir).unwrap();
    let (_, template) = load_with_template(&pkg, 0, &mut LoadPhases::default()).unwrap();
    let template = template.unwrap();
    // Same size and still a valid layer: one letter of a weight tensor's name changed,
    // which only the template's fingerprint can tell.
    let path = pkg.layer_path(0);
    let mut bytes = std::fs::read(&path).unwrap();
    let (_, graph) = pkg.read_layer(0).unwrap();
    let name = graph
        .tensors
        .iter()
        .find(|t| t.data.is_some() && t.name.len() > 3)
        .map(|t| t.name.clone())
        .expect("layer 0 has a named weight");
    let at = bytes
        .windows(name.len())
        .position(|w| w == name.as_bytes())
        .expect("the name is in the file");
    bytes[at] = if bytes[at] == b'x' { b'y' } else { b'x' };
    std::fs::write(&path, &bytes).unwrap();
    // Its digest in the manifest too: the change is not damage but a new file (the digest
    // check would refuse it before the template's own check is reached).
    let old_digest = pkg.manifest.layers[0].sha256.to_string();
    let new_digest = memaflow::model::package::Sha256::of(&bytes).to_string();
    let manifest = pkg_dir.join("model.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    assert!(text.contains(&old_digest));
    std::fs::write(&manifest, text.replace(&old_digest, &new_digest)).unwrap();
    let pkg = Package::open(&pkg_dir).unwrap();
    pkg.read_layer(0)
        .expect("the changed file is still a valid layer");
    let err = reload(&pkg, 0, &template, &mut LoadPhases::default())
        .expect_err("a changed file must not be reloaded through the old template");
    assert!(
        format!("{err:#}").contains("changed since its template"),
        "{err:#}"
    );
}

#[test]
fn a_damaged_layer_file_is_refused_on_a_reload_through_its_template() {
    // A reload skips the flatbuffer parse (the template was made from bytes checked in
    // full) but not the digest: one flipped bit in a weight, the manifest unchanged, must
    // fail the reload naming the layer, not run with other numbers.
    let dir = scratch("reload-damaged");
    let pkg_dir = import_shared("face_detection_short_range", &dir);
    let pkg = Package::open(&pkg_dir).unwrap();
    let layer = (0..pkg.manifest.layers.len())
        .max_by_key(|&i| pkg.manifest.layers[i].weight_bytes)
        .unwrap();
    let (_, template) = load_with_template(&pkg, layer, &mut LoadPhases::default()).unwrap();
    let template = template.expect("the layer with the most weights gets a template");
    reload(&pkg, layer, &template, &mut LoadPhases::default()).expect("the intact file reloads");
    let path = pkg.layer_path(layer);
    let mut bytes = std::fs::read(&path).unwrap();
    // The middle of the file lies in the weights (they are most of its bytes).
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let err = reload(&pkg, layer, &template, &mut LoadPhases::default())
        .expect_err("a damaged file must not be reloaded");
    let text = format!("{err:#}");
    assert!(
        text.contains("SHA-256") && text.contains(&format!("layer {layer}")),
        "{text}"
    );
}
