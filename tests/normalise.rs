//! Each normalisation on a small model built here: the imported package runs (layer by
//! layer equal to whole, bit for bit) and computes what the original op computes, checked
//! against an exact equivalent or a direct computation, and against the reference
//! interpreter when it is installed.

mod common;
use common::*;
use memaflow::model::graph::*;
use memaflow::model::tflite::{WriteOptions, write_graph};
use memaflow::model::{ImportOptions, Package, import};
use memaflow::runtime::{FloatTensor, run_layerwise, run_whole};
use std::path::PathBuf;

fn normalised(pkg: &Package, kind: &str) -> usize {
    pkg.manifest.normalisation.get(kind).copied().unwrap_or(0)
}

fn f32c(graph: &mut Graph, name: &str, shape: &[usize], seed: u64) -> TensorId {
    let v = random_tensor(shape, seed, -1.0, 1.0);
    graph.add_tensor(Tensor::f32_constant(name, shape.to_vec(), &v.data))
}

fn conv(activation: Activation) -> Op {
    Op::Conv2d(ConvParams {
        padding: Padding::Same,
        stride: [1, 1],
        dilation: [1, 1],
        activation,
    })
}

/// Round to a value float16 holds exactly, and its bits (normal range only: the weights
/// here are in [-1, 1] and rounded to multiples of 2^-10).
fn f16_exact(v: f32) -> (f32, u16) {
    let v = (v * 1024.0).round() / 1024.0;
    if v == 0.0 {
        return (0.0, 0);
    }
    let bits = v.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    let mant = ((bits >> 13) & 0x3ff) as u16;
    assert!((1..31).contains(&exp));
    (v, sign | ((exp as u16) << 10) | mant)
}

/// Two conv layers whose weights and biases are built by `weights(graph, name, shape, seed)`.
/// Makes a weight tensor: graph, name, shape, seed.
type WeightMaker<'a> = dyn FnMut(&mut Graph, &str, &[usize], u64) -> TensorId + 'a;
/// Makes a quantised weight: graph, name, shape, seed, per channel; returns its f32 values too.
type QuantMaker<'a> = dyn FnMut(&mut Graph, &str, &[usize], u64, bool) -> (Vec<f32>, TensorId) + 'a;

fn two_convs(weights: &mut WeightMaker) -> Graph {
    let mut g = Graph::default();
    let x = input(&mut g, &[1, 6, 6, 3]);
    let w1 = weights(&mut g, "w1", &[4, 3, 3, 3], 1);
    let b1 = weights(&mut g, "b1", &[4], 2);
    let y = g
        .add_node(conv(Activation::Relu), vec![x, w1, b1], &["conv1"])
        .unwrap()[0];
    let w2 = weights(&mut g, "w2", &[2, 1, 1, 4], 3);
    let b2 = weights(&mut g, "b2", &[2], 4);
    let z = g
        .add_node(conv(Activation::None), vec![y, w2, b2], &["conv2"])
        .unwrap()[0];
    g.outputs.push(z);
    g
}

#[test]
fn float16_weights_behind_dequantize_fold_to_the_same_f32_model() {
    let mut f16_graph = two_convs(&mut |g, name, shape, seed| {
        let v = random_tensor(shape, seed, -1.0, 1.0);
        let bits: Vec<u8> = v
            .data
            .iter()
            .flat_map(|&x| f16_exact(x).1.to_le_bytes())
            .collect();
        let h = g.add_tensor(Tensor::constant(
            format!("{name}_f16"),
            shape.to_vec(),
            DType::F16,
            bits,
        ));
        g.add_node(Op::Dequantize, vec![h], &[name]).unwrap()[0]
    });
    let f32_graph = two_convs(&mut |g, name, shape, seed| {
        let v = random_tensor(shape, seed, -1.0, 1.0);
        let exact: Vec<f32> = v.data.iter().map(|&x| f16_exact(x).0).collect();
        g.add_tensor(Tensor::f32_constant(name, shape.to_vec(), &exact))
    });
    // DEQUANTIZE nodes come first in converted models; keep the graph order valid.
    f16_graph
        .nodes
        .sort_by_key(|n| !matches!(n.op, Op::Dequantize));
    let x = random_tensor(&[1, 6, 6, 3], 11, -1.0, 1.0);
    let (a, pkg, file) = import_and_run("f16", &f16_graph, WriteOptions::default(), &x);
    let (b, _, _) = import_and_run("f16-as-f32", &f32_graph, WriteOptions::default(), &x);
    assert_eq!(normalised(&pkg, "dequantize-f16"), 4);
    assert!(a[0].bit_identical(&b[0]), "fp16 weights must widen exactly");
    assert_reference("f16", &file, &x, &a, 1e-5);

    // The same model with opcodes only in `deprecated_builtin_code`, and with buffers after
    // the flatbuffer (`Buffer.offset/size`), reads the same.
    let (c, _, file) = import_and_run(
        "f16-legacy",
        &f16_graph,
        WriteOptions {
            legacy_opcodes: true,
            ..Default::default()
        },
        &x,
    );
    assert!(a[0].bit_identical(&c[0]), "legacy opcodes");
    assert_reference("f16-legacy", &file, &x, &c, 1e-5);
    let (d, _, file) = import_and_run(
        "f16-external",
        &f16_graph,
        WriteOptions {
            external_buffers: true,
            ..Default::default()
        },
        &x,
    );
    assert!(a[0].bit_identical(&d[0]), "external buffers");
    assert_reference("f16-external", &file, &x, &d, 1e-5);
}

#[test]
fn int8_per_channel_weights_dequantize_like_tflite() {
    let scales = [0.02f32, 0.005, 0.011, 0.0375];
    let mut quantised =
        |g: &mut Graph, name: &str, shape: &[usize], seed: u64, per_channel: bool| {
            let v = random_tensor(shape, seed, -127.0, 127.0);
            let q: Vec<i8> = v.data.iter().map(|x| x.round() as i8).collect();
            let inner: usize = shape[1..].iter().product();
            let scale = |i: usize| if per_channel { scales[i / inner] } else { 0.01 };
            (
                q.iter()
                    .enumerate()
                    .map(|(i, &q)| q as f32 * scale(i))
                    .collect::<Vec<f32>>(),
                {
                    let mut t = Tensor::constant(
                        format!("{name}_q"),
                        shape.to_vec(),
                        DType::I8,
                        q.iter().map(|&q| q as u8).collect::<Vec<u8>>(),
                    );
                    t.quant = Some(Quant {
                        scale: if per_channel {
                            scales.to_vec()
                        } else {
                            vec![0.01]
                        },
                        zero_point: vec![0; if per_channel { 4 } else { 1 }],
                        axis: 0,
                    });
                    g.add_tensor(t)
                },
            )
        };
    let build = |as_f32: bool, quantised: &mut QuantMaker| {
        let mut g = Graph::default();
        let x = input(&mut g, &[1, 5, 5, 3]);
        let (wf, wq) = quantised(&mut g, "w", &[4, 3, 3, 3], 5, true);
        let w = if as_f32 {
            g.add_tensor(Tensor::f32_constant("w", vec![4, 3, 3, 3], &wf))
        } else {
            g.add_node(Op::Dequantize, vec![wq], &["w"]).unwrap()[0]
        };
        let b = f32c(&mut g, "b", &[4], 6);
        let y = g
            .add_node(conv(Activation::None), vec![x, w, b], &["y"])
            .unwrap()[0];
        g.outputs.push(y);
        g
    };
    let x = random_tensor(&[1, 5, 5, 3], 12, -1.0, 1.0);
    let (a, pkg, file) = import_and_run(
        "int8",
        &build(false, &mut quantised),
        WriteOptions::default(),
        &x,
    );
    let (b, _, _) = import_and_run(
        "int8-as-f32",
        &build(true, &mut quantised),
        WriteOptions::default(),
        &x,
    );
    assert_eq!(normalised(&pkg, "dequantize-int"), 1);
    assert!(
        a[0].bit_identical(&b[0]),
        "(q - zero_point) * scale per output channel"
    );
    assert_reference("int8", &file, &x, &a, 1e-5);
}

#[test]
fn densify_restores_sparse_weights() {
    // A [4, 8] fully-connected weight with most values zero, stored as CSR over its rows.
    let dense = random_tensor(&[4, 8], 21, -1.0, 1.0)
        .data
        .iter()
        .enumerate()
        .map(|(i, &v)| if i % 3 == 0 { v } else { 0.0 })
        .collect::<Vec<f32>>();
    let mut segments = vec![0];
    let mut indices = vec![];
    let mut values = vec![];
    for r in 0..4 {
        for c in 0..8 {
            if dense[r * 8 + c] != 0.0 {
                indices.push(c);
                values.push(dense[r * 8 + c]);
            }
        }
        segments.push(indices.len());
    }
    let build = |sparse: bool| {
        let mut g = Graph::default();
        let x = input(&mut g, &[1, 8]);
        let w = if sparse {
            let mut t = Tensor::constant("w_sparse", vec![4, 8], DType::F32, f32_bytes(&values));
            t.sparsity = Some(Sparsity {
                traversal_order: vec![0, 1],
                block_map: vec![],
                dim_metadata: vec![
                    DimMeta::Dense { size: 4 },
                    DimMeta::Csr {
                        segments: segments.clone(),
                        indices: indices.clone(),
                    },
                ],
            });
            let t = g.add_tensor(t);
            g.add_node(Op::Densify, vec![t], &["w"]).unwrap()[0]
        } else {
            g.add_tensor(Tensor::f32_constant("w", vec![4, 8], &dense))
        };
        let b = f32c(&mut g, "b", &[4], 22);
        let y = g
            .add_node(
                Op::FullyConnected {
                    activation: Activation::None,
                    keep_num_dims: false,
                },
                vec![x, w, b],
                &["y"],
            )
            .unwrap()[0];
        g.outputs.push(y);
        g
    };
    let x = random_tensor(&[1, 8], 23, -1.0, 1.0);
    let (a, pkg, file) = import_and_run("densify", &build(true), WriteOptions::default(), &x);
    let (b, _, _) = import_and_run("densify-dense", &build(false), WriteOptions::default(), &x);
    assert_eq!(normalised(&pkg, "densify"), 1);
    assert!(a[0].bit_identical(&b[0]));
    assert_reference("densify", &file, &x, &a, 1e-5);
}

/// A conv followed by `op` on its output; returns the conv output too (from a conv-only
/// model) so that the test can compute what `op` should give.
fn conv_then(
    test: &str,
    op: Op,
    extra: &mut dyn FnMut(&mut Graph) -> Vec<TensorId>,
    x: &FloatTensor,
) -> (FloatTensor, Vec<FloatTensor>, Package, PathBuf) {
    let build = |with_op: bool, extra: &mut dyn FnMut(&mut Graph) -> Vec<TensorId>| {
        let mut g = Graph::default();
        let c = x.shape[3];
        let xi = input(&mut g, &x.shape);
        let w = f32c(&mut g, "w", &[8, 3, 3, c], 31);
        let b = f32c(&mut g, "b", &[8], 32);
        let y = g
            .add_node(conv(Activation::None), vec![xi, w, b], &["y"])
            .unwrap()[0];
        if with_op {
            let mut inputs = vec![y];
            inputs.extend(extra(&mut g));
            let z = g.add_node(op.clone(), inputs, &["z"]).unwrap()[0];
            g.outputs.push(z);
        } else {
            g.outputs.push(y);
        }
        g
    };
    let (y, _, _) = import_and_run(
        &format!("{test}-conv"),
        &build(false, extra),
        WriteOptions::default(),
        x,
    );
    let (z, pkg, file) = import_and_run(test, &build(true, extra), WriteOptions::default(), x);
    (y.into_iter().next().unwrap(), z, pkg, file)
}

#[test]
fn prelu_expands_exactly() {
    let x = random_tensor(&[1, 5, 5, 3], 41, -1.0, 1.0);
    // Slopes at most 1 (one form), at least 1 (another), and mixed (a third, equal in value).
    let cases: [(&str, [f32; 8], bool); 3] = [
        (
            "prelu-below-one",
            [0.25, -0.5, 0.1, 0.0, 1.0, 0.3, 0.7, 0.05],
            true,
        ),
        (
            "prelu-above-one",
            [1.25, 2.0, 1.0, 3.5, 1.5, 1.1, 7.0, 1.01],
            true,
        ),
        (
            "prelu-mixed",
            [0.25, -0.5, 0.1, 0.0, 1.5, 0.3, 0.7, 0.05],
            false,
        ),
    ];
    for (test, alpha, bit_exact) in cases {
        let (y, z, pkg, file) = conv_then(
            test,
            Op::Prelu,
            &mut |g| vec![g.add_tensor(Tensor::f32_constant("alpha", vec![1, 1, 8], &alpha))],
            &x,
        );
        assert_eq!(normalised(&pkg, "prelu"), 1);
        assert!(y.data.iter().any(|&v| v < 0.0) && y.data.iter().any(|&v| v > 0.0));
        for (i, (&v, &got)) in y.data.iter().zip(&z[0].data).enumerate() {
            let want = if v >= 0.0 { v } else { alpha[i % 8] * v };
            if bit_exact {
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{test}: element {i}: prelu({v}) = {want}, got {got}"
                );
            } else {
                assert_eq!(got, want, "{test}: element {i}: prelu({v})");
            }
        }
        assert_reference(test, &file, &x, &z, 1e-6);
    }
}

fn mean_of(y: &FloatTensor, axes: &[usize]) -> Vec<f64> {
    let s = &y.shape;
    let mut out_shape = s.clone();
    for &a in axes {
        out_shape[a] = 1;
    }
    let n: usize = out_shape.iter().product();
    let count: usize = axes.iter().map(|&a| s[a]).product();
    let mut sums = vec![0f64; n];
    for (i, &v) in y.data.iter().enumerate() {
        let mut rem = i;
        let mut idx = [0; 4];
        for d in (0..4).rev() {
            idx[d] = rem % s[d];
            rem /= s[d];
        }
        let mut o = 0;
        for d in 0..4 {
            o = o * out_shape[d] + if axes.contains(&d) { 0 } else { idx[d] };
        }
        sums[o] += v as f64;
    }
    sums.iter().map(|s| s / count as f64).collect()
}

#[test]
fn mean_is_a_true_average() {
    let x = random_tensor(&[1, 7, 5, 3], 51, -1.0, 1.0);
    for (test, axes, keep_dims) in [
        ("mean-hw", vec![1usize, 2], false),
        ("mean-hw-keep", vec![1, 2], true),
        ("mean-c", vec![3], true),
    ] {
        let axes_i32: Vec<i32> = axes.iter().map(|&a| a as i32).collect();
        let (y, z, pkg, file) = conv_then(
            test,
            Op::Reduce {
                kind: ReduceKind::Mean,
                keep_dims,
            },
            &mut |g| vec![g.add_tensor(Tensor::i32_constant("axes", &axes_i32))],
            &x,
        );
        assert_eq!(normalised(&pkg, "mean"), 1, "{test}");
        let want = mean_of(&y, &axes);
        assert_eq!(z[0].data.len(), want.len(), "{test}");
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (got, want) in z[0].data.iter().zip(&want) {
            assert!(
                (*got as f64 - want).abs() <= 1e-6 * scale,
                "{test}: {got} vs {want}"
            );
        }
        assert_reference(test, &file, &x, &z, 1e-5);
    }
    // Means well below 1: tract 0.23's own f32 MEAN rounds these to whole numbers.
    let mut g = Graph::default();
    let xi = input(&mut g, &[1, 4, 4, 2]);
    let axes = g.add_tensor(Tensor::i32_constant("axes", &[1, 2]));
    let z = g
        .add_node(
            Op::Reduce {
                kind: ReduceKind::Mean,
                keep_dims: false,
            },
            vec![xi, axes],
            &["z"],
        )
        .unwrap()[0];
    g.outputs.push(z);
    let quarter = FloatTensor::filled(vec![1, 4, 4, 2], 0.25);
    let (z, _, _) = import_and_run("mean-small", &g, WriteOptions::default(), &quarter);
    assert_eq!(z[0].data, vec![0.25, 0.25]);
}

#[test]
fn depth_to_space_moves_channels_into_blocks() {
    let (h, w, c, b) = (2, 3, 8, 2);
    let mut g = Graph::default();
    let xi = input(&mut g, &[1, h, w, c]);
    let z = g
        .add_node(Op::DepthToSpace { block: b }, vec![xi], &["z"])
        .unwrap()[0];
    g.outputs.push(z);
    let x = random_tensor(&[1, h, w, c], 61, -1.0, 1.0);
    let (out, pkg, file) = import_and_run("depth-to-space", &g, WriteOptions::default(), &x);
    assert_eq!(normalised(&pkg, "depth-to-space"), 1);
    let oc = c / (b * b);
    assert_eq!(out[0].shape, vec![1, h * b, w * b, oc]);
    for y in 0..h * b {
        for xx in 0..w * b {
            for k in 0..oc {
                let src = ((y / b) * w + xx / b) * c + ((y % b) * b + xx % b) * oc + k;
                assert_eq!(out[0].data[(y * w * b + xx) * oc + k], x.data[src]);
            }
        }
    }
    assert_reference("depth-to-space", &file, &x, &out, 0.0);
}

#[test]
fn local_response_norm_follows_tflite() {
    let (radius, bias, alpha, beta) = (2usize, 1.5f32, 0.3f32, 0.75f32);
    let x = random_tensor(&[1, 3, 3, 3], 71, -1.0, 1.0);
    let (y, z, pkg, file) = conv_then(
        "lrn",
        Op::LocalResponseNorm {
            radius,
            bias,
            alpha,
            beta,
        },
        &mut |_| vec![],
        &x,
    );
    assert_eq!(normalised(&pkg, "local-response-norm"), 1);
    let c = 8;
    for (i, got) in z[0].data.iter().enumerate() {
        let ch = i % c;
        let base = i - ch;
        let lo = ch.saturating_sub(radius);
        let hi = (ch + radius).min(c - 1);
        let sq: f64 = (lo..=hi).map(|k| (y.data[base + k] as f64).powi(2)).sum();
        let want = y.data[i] as f64 / (bias as f64 + alpha as f64 * sq).powf(beta as f64);
        assert!(
            (*got as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{got} vs {want}"
        );
    }
    assert_reference("lrn", &file, &x, &z, 1e-5);
}

#[test]
fn fused_tanh_is_ignored_as_tflite_does() {
    let x = random_tensor(&[1, 4, 4, 3], 81, -1.0, 1.0);
    let build = |act| {
        let mut g = Graph::default();
        let xi = input(&mut g, &[1, 4, 4, 3]);
        let w = f32c(&mut g, "w", &[8, 3, 3, 3], 31);
        let b = f32c(&mut g, "b", &[8], 32);
        let y = g.add_node(conv(act), vec![xi, w, b], &["y"]).unwrap()[0];
        g.outputs.push(y);
        g
    };
    let (z, pkg, file) = import_and_run(
        "tanh",
        &build(Activation::Tanh),
        WriteOptions::default(),
        &x,
    );
    let (y, _, _) = import_and_run(
        "tanh-none",
        &build(Activation::None),
        WriteOptions::default(),
        &x,
    );
    assert_eq!(normalised(&pkg, "ignored-fused-tanh"), 1);
    assert!(z[0].bit_identical(&y[0]));
    assert!(
        z[0].data.iter().any(|v| v.abs() > 1.0),
        "the test needs values a tanh would change"
    );
    assert_reference("tanh", &file, &x, &z, 1e-5);
}

#[test]
fn fused_relu_n1_to_1_clamps() {
    let x = random_tensor(&[1, 4, 4, 3], 82, -1.0, 1.0);
    let (y, z, pkg, file) = conv_then(
        "relu-n1-to-1",
        Op::Binary {
            kind: BinaryKind::Add,
            activation: Activation::ReluN1To1,
        },
        &mut |g| vec![g.add_tensor(Tensor::f32_constant("half", vec![1], &[0.5]))],
        &x,
    );
    assert_eq!(normalised(&pkg, "split-fused-activation"), 1);
    let want: Vec<f32> = y.data.iter().map(|v| (v + 0.5).clamp(-1.0, 1.0)).collect();
    assert!(z[0].bit_identical(&FloatTensor::new(z[0].shape.clone(), want).unwrap()));
    assert_reference("relu-n1-to-1", &file, &x, &z, 1e-6);
}

#[test]
fn large_fully_connected_layers_split_into_blocks() {
    // 96 output units × 4096 inputs = 1.5 MiB of weights, split at 512 KiB into 3 layers.
    let mut g = Graph::default();
    let x = input(&mut g, &[1, 4096]);
    let w = f32c(&mut g, "w", &[96, 4096], 91);
    let b = f32c(&mut g, "b", &[96], 92);
    let y = g
        .add_node(
            Op::FullyConnected {
                activation: Activation::Relu,
                keep_num_dims: false,
            },
            vec![x, w, b],
            &["y"],
        )
        .unwrap()[0];
    g.outputs.push(y);
    let x = random_tensor(&[1, 4096], 93, -1.0, 1.0);
    let dir = scratch("fc-split");
    let file = dir.join("fc.tflite");
    std::fs::write(&file, write_graph(&g, WriteOptions::default()).unwrap()).unwrap();
    let mut outs = vec![];
    for (name, max) in [("whole", None), ("split", Some(512 << 10))] {
        import(
            &file,
            &dir.join(name),
            &ImportOptions {
                max_layer_weights: max,
                ..Default::default()
            },
        )
        .unwrap();
        let pkg = Package::open(dir.join(name)).unwrap();
        let layers = run_layerwise(&pkg, &x).unwrap().outputs;
        assert!(layers[0].bit_identical(&run_whole(&pkg, &x).unwrap().outputs[0]));
        if max.is_some() {
            assert_eq!(pkg.manifest.layers.len(), 3);
            assert!(
                pkg.manifest
                    .layers
                    .iter()
                    .all(|l| l.weight_bytes <= (512 << 10) + 1024)
            );
        }
        outs.push(layers.into_iter().next().unwrap());
    }
    // Each output unit is the same dot product either way.
    let err = relative_error(&outs[1], &outs[0]);
    assert!(err <= 1e-6, "split differs by {err:.2e}");
    assert_reference("fc-split", &file, &x, &outs[1..], 1e-5);
}
