//! Corrupt input gives an error value and exit status 2: never a panic, never a hang.

mod common;
use common::*;
use flatbuffers::FlatBufferBuilder;
use memaflow::model::tflite::{WriteOptions, read_graph, write_graph};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::time::Duration;
use tract_tflite::tflite;

fn expect_clean_failure(args: &[&str], what: &str) -> String {
    let out = run_cli(args, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{what}: exit status {:?}, stderr: {stderr}",
        out.status
    );
    assert!(stderr.starts_with("memaflow: error: "), "{what}: {stderr}");
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    stderr
}

fn import_fails(file: &Path, what: &str) -> String {
    let out = file.with_extension("pkg");
    let err = expect_clean_failure(
        &[
            "import",
            file.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        what,
    );
    assert!(
        err.contains(&file.display().to_string()),
        "{what}: the error names the file: {err}"
    );
    assert!(
        !out.exists(),
        "{what}: a failed import leaves nothing behind"
    );
    err
}

/// A flatbuffer that verifies as a TFLite model but whose indices point nowhere.
fn model_with(opcode_index: u32, op_inputs: &[i32], tensor_buffer: u32) -> Vec<u8> {
    let mut fb = FlatBufferBuilder::new();
    let shape = fb.create_vector(&[1i32, 4]);
    let name = fb.create_string("x");
    let tensor = tflite::Tensor::create(
        &mut fb,
        &tflite::TensorArgs {
            shape: Some(shape),
            type_: tflite::TensorType::FLOAT32,
            buffer: tensor_buffer,
            name: Some(name),
            ..Default::default()
        },
    );
    let tensors = fb.create_vector(&[tensor]);
    let io = fb.create_vector(&[0i32]);
    let ins = fb.create_vector(op_inputs);
    let outs = fb.create_vector(&[0i32]);
    let op = tflite::Operator::create(
        &mut fb,
        &tflite::OperatorArgs {
            opcode_index,
            inputs: Some(ins),
            outputs: Some(outs),
            ..Default::default()
        },
    );
    let ops = fb.create_vector(&[op]);
    let sg = tflite::SubGraph::create(
        &mut fb,
        &tflite::SubGraphArgs {
            tensors: Some(tensors),
            inputs: Some(io),
            outputs: Some(io),
            operators: Some(ops),
            ..Default::default()
        },
    );
    let sgs = fb.create_vector(&[sg]);
    let code = tflite::OperatorCode::create(
        &mut fb,
        &tflite::OperatorCodeArgs {
            deprecated_builtin_code: 0,
            builtin_code: tflite::BuiltinOperator::ADD,
            version: 1,
            ..Default::default()
        },
    );
    let codes = fb.create_vector(&[code]);
    let empty = tflite::Buffer::create(&mut fb, &tflite::BufferArgs { data: None });
    let buffers = fb.create_vector(&[empty]);
    let model = tflite::Model::create(
        &mut fb,
        &tflite::ModelArgs {
            version: 3,
            operator_codes: Some(codes),
            subgraphs: Some(sgs),
            buffers: Some(buffers),
            ..Default::default()
        },
    );
    tflite::finish_model_buffer(&mut fb, model);
    fb.finished_data().to_vec()
}

#[test]
fn corrupt_models_fail_cleanly() {
    let dir = scratch("corrupt-models");
    let good = std::fs::read(shared().join("models/hand_recrop.tflite")).unwrap();
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("zero bytes".into(), vec![]),
        ("four bytes".into(), vec![0x1c, 0, 0, 0]),
        (
            "not a model".into(),
            b"this is a text file, not a TFLite model\n".to_vec(),
        ),
        (
            "tensor index out of range".into(),
            model_with(0, &[0, 57], 0),
        ),
        ("negative tensor index".into(), model_with(0, &[0, -7], 0)),
        (
            "opcode index out of range".into(),
            model_with(9, &[0, 0], 0),
        ),
        (
            "buffer index out of range".into(),
            model_with(0, &[0, 0], 40),
        ),
    ];
    for cut in [8, 100, good.len() / 3, good.len() / 2, good.len() - 16] {
        cases.push((format!("truncated to {cut} bytes"), good[..cut].to_vec()));
    }
    for seed in 0..4u64 {
        let noise = random_tensor(&[4096 * (seed as usize + 1)], seed, 0.0, 256.0);
        cases.push((
            format!("random bytes #{seed}"),
            noise.data.iter().map(|&v| v as u8).collect(),
        ));
    }
    for (k, (what, bytes)) in cases.iter().enumerate() {
        let file = dir.join(format!("case{k}.tflite"));
        std::fs::write(&file, bytes).unwrap();
        import_fails(&file, what);
    }
    expect_clean_failure(
        &[
            "import",
            dir.join("missing.tflite").to_str().unwrap(),
            "--out",
            dir.join("x").to_str().unwrap(),
        ],
        "missing file",
    );
    expect_clean_failure(
        &[
            "import",
            dir.to_str().unwrap(),
            "--out",
            dir.join("y").to_str().unwrap(),
        ],
        "a directory",
    );
}

/// Every single-byte change of a small real model either imports or is refused: the reader,
/// normalisation and tract never panic on it.
#[test]
fn flipped_bytes_never_panic() {
    let good = std::fs::read(shared().join("models/hand_recrop.tflite")).unwrap();
    let noise = random_tensor(&[3000], 7, 0.0, 1.0);
    let mut refused = 0;
    for (k, r) in noise.data.chunks(2).enumerate() {
        let mut bytes = good.clone();
        // Most of the file is weights: bias the positions towards the flatbuffer tables.
        let pos = if k % 2 == 0 {
            (r[0] * 4096.0) as usize
        } else {
            (r[0] * good.len() as f32) as usize
        } % good.len();
        bytes[pos] ^= 1 + (r[1] * 254.0) as u8;
        let outcome = catch_unwind(AssertUnwindSafe(|| -> anyhow::Result<()> {
            let mut graph = read_graph(&bytes)?;
            graph.check_shapes()?;
            memaflow::model::normalise::normalise(&mut graph)?;
            let written = write_graph(&graph, WriteOptions::default())?;
            memaflow::runtime::Plan::from_tflite(written)?;
            Ok(())
        }));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(_)) => refused += 1,
            Err(_) => panic!("byte {pos} flipped: panicked instead of returning an error"),
        }
    }
    assert!(refused > 0, "some corruptions must be detected");
}

#[test]
fn corrupt_packages_and_images_fail_cleanly() {
    let dir = scratch("corrupt-packages");
    let pkg = import_shared("hand_recrop", &dir);
    let p = pkg.to_str().unwrap();
    let frame = shared().join("frames/chelsea.png");
    let frame = frame.to_str().unwrap();

    // Images: empty, truncated, garbage.
    let png = std::fs::read(frame).unwrap();
    for (what, bytes) in [
        ("empty image", vec![]),
        ("truncated image", png[..png.len() / 2].to_vec()),
        ("garbage image", b"GIF89a not really".to_vec()),
    ] {
        let f = dir.join("bad.png");
        std::fs::write(&f, bytes).unwrap();
        expect_clean_failure(&["infer", "--model", p, f.to_str().unwrap()], what);
    }
    // A tensor of the wrong shape.
    let npy = dir.join("wrong.npy");
    memaflow::runtime::npy::write(&npy, &[1, 3], &[0.0; 3]).unwrap();
    expect_clean_failure(
        &["infer", "--model", p, "--input-npy", npy.to_str().unwrap()],
        "wrong input shape",
    );

    // A layer file truncated, then replaced by another layer's bytes, then removed.
    let layer = pkg.join("layers/003.tflite");
    let original = std::fs::read(&layer).unwrap();
    std::fs::write(&layer, &original[..original.len() / 2]).unwrap();
    let err = expect_clean_failure(&["infer", "--model", p, frame], "truncated layer");
    assert!(err.contains("layer 3"), "{err}");
    std::fs::copy(pkg.join("layers/004.tflite"), &layer).unwrap();
    expect_clean_failure(&["infer", "--model", p, frame], "swapped layer");
    expect_clean_failure(
        &["infer", "--model", p, "--whole", frame],
        "swapped layer, whole",
    );
    std::fs::remove_file(&layer).unwrap();
    expect_clean_failure(&["infer", "--model", p, frame], "missing layer");
    std::fs::write(&layer, &original).unwrap();
    cli_ok(&["infer", "--model", p, frame]);

    // A manifest that is not TOML, or lies about the layers.
    let manifest = pkg.join("model.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, "format = 1\nname = [").unwrap();
    expect_clean_failure(&["inspect", p], "corrupt manifest");
    std::fs::write(&manifest, text.replacen("index = 2", "index = 7", 1)).unwrap();
    expect_clean_failure(
        &["infer", "--model", p, frame],
        "manifest with wrong layer index",
    );
    expect_clean_failure(
        &[
            "infer",
            "--model",
            dir.join("nothing").to_str().unwrap(),
            frame,
        ],
        "no package",
    );
}
