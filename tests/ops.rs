//! One test per op, the way an op joins its family: written by our writer, it reads back
//! as itself; imported, it runs layer by layer bit-identical to whole and computes what
//! the op computes, checked against a formula on known inputs and against the reference
//! interpreter when it is installed. (The ops the MediaPipe models use are also covered
//! model by model in `tests/mediapipe.rs`.)

mod common;
use common::*;
use memaflow::model::graph::*;
use memaflow::model::tflite::{WriteOptions, read_graph, write_graph};
use std::f32::consts::{FRAC_PI_2, PI};

/// `input → op → output` on an input of `shape`.
fn one_op(op: Op, shape: &[usize]) -> Graph {
    let mut graph = Graph::default();
    let x = input(&mut graph, shape);
    let y = graph.add_node(op, vec![x], &["y"]).unwrap()[0];
    graph.outputs.push(y);
    graph
}

/// Writing `graph` and reading it back gives the same ops, and writing that gives the same
/// bytes.
fn assert_round_trip(graph: &Graph) {
    let bytes = write_graph(graph, WriteOptions::default()).unwrap();
    let read = read_graph(&bytes).unwrap();
    let ops = |g: &Graph| g.nodes.iter().map(|n| n.op.clone()).collect::<Vec<_>>();
    assert_eq!(ops(&read), ops(graph));
    assert_eq!(write_graph(&read, WriteOptions::default()).unwrap(), bytes);
}

#[test]
fn hard_swish_reads_back_and_follows_its_formula() {
    let shape = [1, 4, 4, 8];
    let graph = one_op(Op::Unary(UnaryKind::HardSwish), &shape);
    assert_round_trip(&graph);
    // Both bends (-3 and 3) and the flat and linear parts around them.
    let mut x = random_tensor(&shape, 102, -5.0, 5.0);
    x.data[..3].copy_from_slice(&[-3.0, 0.0, 3.0]);
    let (out, pkg, file) = import_and_run("hard-swish", &graph, WriteOptions::default(), &x);
    assert_eq!(pkg.manifest.layers[0].ops, ["HARD_SWISH"]);
    for (&v, &got) in x.data.iter().zip(&out[0].data) {
        let want = v * (v + 3.0).clamp(0.0, 6.0) / 6.0;
        assert!(
            (got - want).abs() <= 1e-6 * want.abs().max(1.0),
            "hard_swish({v}) = {want}, got {got}"
        );
    }
    assert_eq!(out[0].data[..3], [0.0, 0.0, 3.0]);
    assert_reference("hard-swish", &file, &x, &out, 1e-6);
}

#[test]
fn sin_reads_back_and_computes_the_sine() {
    let shape = [1, 4, 4, 8];
    let graph = one_op(Op::Unary(UnaryKind::Sin), &shape);
    assert_round_trip(&graph);
    // Several periods of both signs, and the points where the sine is exactly 0 or ±1.
    let mut x = random_tensor(&shape, 101, -10.0, 10.0);
    x.data[..4].copy_from_slice(&[0.0, FRAC_PI_2, -FRAC_PI_2, PI]);
    let (out, pkg, file) = import_and_run("sin", &graph, WriteOptions::default(), &x);
    assert_eq!(pkg.manifest.layers[0].ops, ["SIN"]);
    for (&v, &got) in x.data.iter().zip(&out[0].data) {
        assert!(
            (got - v.sin()).abs() <= 1e-6,
            "sin({v}) = {}, got {got}",
            v.sin()
        );
    }
    assert_eq!(out[0].data[..3], [0.0, 1.0, -1.0]);
    assert_reference("sin", &file, &x, &out, 1e-6);
}
