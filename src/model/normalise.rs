//! Rewrites a graph read from a published TFLite file into ops tract-tflite 0.23 reads and
//! computes correctly. Each rewrite is exact or within float rounding of TFLite's reference
//! kernels; `tests/normalise.rs` checks the results against ai-edge-litert.
//!
//! The passes here are generic: what each op needs (folding a decoded constant, its
//! rewrite, why it would not run) lives with its family in `model/ops/`.

use super::graph::*;
use anyhow::{Context, Result, bail, ensure};
use std::collections::BTreeMap;

/// What normalisation changed, by rewrite, for the manifest and the log.
pub type Rewrites = BTreeMap<&'static str, usize>;

/// Makes an imported graph one tract 0.23 runs: folds the nodes that only decode a
/// constant, turns weights into f32, rewrites each op tract cannot read (or reads wrongly)
/// through its family's rewrite, then checks structure, shapes and that every op is one
/// tract runs. Returns what was done, by rewrite, for the manifest.
pub fn normalise(graph: &mut Graph) -> Result<Rewrites> {
    let mut report = Rewrites::new();
    fold_constants(graph, &mut report)?;
    weights_to_f32(graph, &mut report)?;
    rewrite_ops(graph, &mut report)?;
    graph.canonicalise();
    graph.check_structure().context("after normalisation")?;
    graph.check_shapes().context("after normalisation")?;
    check_runnable(graph)?;
    Ok(report)
}

/// Nodes that only decode a constant (DENSIFY, DEQUANTIZE) become the decoded constant.
fn fold_constants(graph: &mut Graph, report: &mut Rewrites) -> Result<()> {
    let nodes = std::mem::take(&mut graph.nodes);
    for (ix, node) in nodes.into_iter().enumerate() {
        let folded = node
            .op
            .family()
            .fold_constant(graph, &node)
            .with_context(|| format!("operator #{ix} ({})", node.op.name()))?;
        match folded {
            Some(kind) => *report.entry(kind).or_default() += 1,
            None => graph.nodes.push(node),
        }
    }
    Ok(())
}

/// Weights stored as f16 or int8 with a scale, read without a DEQUANTIZE op, become f32.
fn weights_to_f32(graph: &mut Graph, report: &mut Rewrites) -> Result<()> {
    let mut to_float = vec![];
    for node in &graph.nodes {
        for &i in &node.inputs {
            let t = &graph.tensors[i];
            let int_argument = matches!(t.dtype, DType::I32 | DType::I64) && t.quant.is_none();
            if t.is_const() && t.dtype != DType::F32 && !int_argument {
                to_float.push(i);
            }
        }
    }
    to_float.sort_unstable();
    to_float.dedup();
    for i in to_float {
        let t = &graph.tensors[i];
        ensure!(
            t.sparsity.is_none(),
            "constant '{}' is sparse but no DENSIFY reads it",
            t.name
        );
        let values = super::ops::dequantize(t).with_context(|| format!("constant '{}'", t.name))?;
        let t = &mut graph.tensors[i];
        t.data = Some(f32_bytes(&values));
        t.dtype = DType::F32;
        t.quant = None;
        *report.entry("weights-to-f32").or_default() += 1;
    }
    Ok(())
}

/// Emits the nodes that replace a graph's nodes, one node at a time. New tensors are named
/// after the output of the node being replaced, and its replacement ends by writing that
/// output, so that nothing downstream changes.
pub(crate) struct Rewriter<'g> {
    pub graph: &'g mut Graph,
    out: Vec<Node>,
    /// The output of the node being replaced.
    output: TensorId,
}

impl Rewriter<'_> {
    /// Keeps `node` as it is.
    pub fn keep(&mut self, node: Node) {
        self.out.push(node);
    }

    /// Emits `op` on `inputs` into a new tensor, named `suffix` after the output.
    pub(crate) fn emit(&mut self, op: Op, inputs: Vec<TensorId>, suffix: &str) -> Result<TensorId> {
        let shapes = self.graph.output_shapes(&op, &inputs)?;
        let name = self.fresh_name(suffix);
        let t = self
            .graph
            .add_tensor(Tensor::activation(name, shapes[0].clone(), DType::F32));
        self.out.push(Node {
            op,
            inputs,
            outputs: vec![t],
        });
        Ok(t)
    }

    /// Emits `op` on `inputs` into the output, which must keep its shape: the end of the
    /// replacement.
    pub(crate) fn emit_output(&mut self, op: Op, inputs: Vec<TensorId>) -> Result<()> {
        let shapes = self.graph.output_shapes(&op, &inputs)?;
        let output = &self.graph.tensors[self.output];
        ensure!(
            shapes[0] == output.shape,
            "rewrite of '{}' gives {:?}",
            output.name,
            shapes[0]
        );
        self.out.push(Node {
            op,
            inputs,
            outputs: vec![self.output],
        });
        Ok(())
    }

    /// A new f32 constant of one value, named `suffix` after the output.
    pub(crate) fn scalar(&mut self, suffix: &str, v: f32) -> TensorId {
        let name = self.fresh_name(suffix);
        self.graph
            .add_tensor(Tensor::f32_constant(name, vec![1], &[v]))
    }

    /// A new i32 constant of `shape`, named `suffix` after the output.
    pub(crate) fn ints(&mut self, suffix: &str, v: &[i32], shape: Vec<usize>) -> TensorId {
        let mut t = Tensor::i32_constant(self.fresh_name(suffix), v);
        t.shape = shape;
        self.graph.add_tensor(t)
    }

    /// `x` reshaped to `shape` in a new tensor, named `suffix` after the output.
    pub(crate) fn reshape(
        &mut self,
        x: TensorId,
        shape: &[usize],
        suffix: &str,
    ) -> Result<TensorId> {
        let target: Vec<i32> = shape.iter().map(|&d| d as i32).collect();
        let s = self.ints(&format!("{suffix}/shape"), &target, vec![target.len()]);
        self.emit(Op::Reshape, vec![x, s], suffix)
    }

    /// `x` reshaped into the output, to its shape.
    pub(crate) fn reshape_output(&mut self, x: TensorId) -> Result<()> {
        let target: Vec<i32> = self.shape(self.output).iter().map(|&d| d as i32).collect();
        let shape = self.ints("shape", &target, vec![target.len()]);
        self.emit_output(Op::Reshape, vec![x, shape])
    }

    /// Keeps `node` with its second input, an integer argument, as the i32 vector tract
    /// reads (files also store them as i64).
    pub(crate) fn keep_with_i32_argument(&mut self, node: Node) -> Result<()> {
        let values = self.i32_values(node.inputs[1])?;
        let mut inputs = node.inputs;
        inputs[1] = self.ints("arg", &values, vec![values.len()]);
        self.emit_output(node.op, inputs)
    }

    /// The values of an integer constant, as i32.
    pub(crate) fn i32_values(&self, t: TensorId) -> Result<Vec<i32>> {
        Ok(self.graph.tensors[t]
            .int_values()?
            .iter()
            .map(|&v| v as i32)
            .collect())
    }

    pub fn shape(&self, t: TensorId) -> &[usize] {
        &self.graph.tensors[t].shape
    }

    /// A tensor name not used yet: `suffix` after the output's name.
    fn fresh_name(&self, suffix: &str) -> String {
        let output = &self.graph.tensors[self.output].name;
        self.graph.fresh_name(&format!("{output}/{suffix}"))
    }
}

fn rewrite_ops(graph: &mut Graph, report: &mut Rewrites) -> Result<()> {
    let nodes = std::mem::take(&mut graph.nodes);
    let mut rewriter = Rewriter {
        graph,
        out: Vec::with_capacity(nodes.len()),
        output: 0,
    };
    for (ix, node) in nodes.into_iter().enumerate() {
        let name = node.op.name();
        let kind = rewrite_node(&mut rewriter, node)
            .with_context(|| format!("operator #{ix} ({name})"))?;
        if let Some(kind) = kind {
            *report.entry(kind).or_default() += 1;
        }
    }
    let out = rewriter.out;
    graph.nodes = out;
    Ok(())
}

/// Rewrites one node if it needs it; returns the name of the rewrite applied.
fn rewrite_node(rewriter: &mut Rewriter, node: Node) -> Result<Option<&'static str>> {
    let enclosing = std::mem::replace(&mut rewriter.output, node.outputs[0]);
    let result = rewrite_activation_or_op(rewriter, node);
    rewriter.output = enclosing;
    result
}

fn rewrite_activation_or_op(
    rewriter: &mut Rewriter,
    mut node: Node,
) -> Result<Option<&'static str>> {
    let family = node.op.family();
    match family.fused_activation(&mut node.op) {
        // A fused TANH is ignored by every float TFLite kernel (their activation range for
        // it is unbounded), so the model's meaning is the op without it: drop it, and say so.
        Some(activation @ Activation::Tanh) => {
            *activation = Activation::None;
            let output = &rewriter.graph.tensors[rewriter.output].name;
            log::warn!("'{output}': fused TANH activation ignored, as TFLite's kernels ignore it");
            rewrite_node(rewriter, node)?;
            Ok(Some("ignored-fused-tanh"))
        }
        // Fused activations tract does not read become ops of their own.
        Some(activation @ Activation::ReluN1To1) => {
            *activation = Activation::None;
            split_relu_n1_to_1(rewriter, node)?;
            Ok(Some("split-fused-activation"))
        }
        _ => family.normalise(node, rewriter),
    }
}

/// The op into a new tensor, then MAXIMUM with -1 and MINIMUM with 1 into the output.
fn split_relu_n1_to_1(rewriter: &mut Rewriter, mut node: Node) -> Result<()> {
    let pre = rewriter.fresh_name("pre_activation");
    let shape = rewriter.shape(rewriter.output).to_vec();
    let pre = rewriter
        .graph
        .add_tensor(Tensor::activation(pre, shape, DType::F32));
    node.outputs = vec![pre];
    rewrite_node(rewriter, node)?;
    let lo = rewriter.scalar("minus_one", -1.0);
    let hi = rewriter.scalar("one", 1.0);
    let floored = rewriter.emit(BinaryKind::Maximum.op(), vec![pre, lo], "floor")?;
    rewriter.emit_output(BinaryKind::Minimum.op(), vec![floored, hi])
}

/// The contract with the runtime: only ops and forms tract-tflite 0.23 reads correctly.
pub(crate) fn check_runnable(graph: &Graph) -> Result<()> {
    for (ix, node) in graph.nodes.iter().enumerate() {
        let name = node.op.name();
        let family = node.op.family();
        if let Some(reason) = family.unrunnable(&node.op) {
            bail!("operator #{ix} ({name}) {reason}");
        }
        let mut op = node.op.clone();
        if let Some(a) = family.fused_activation(&mut op) {
            ensure!(
                a.is_runnable(),
                "operator #{ix} ({name}) keeps fused {:?}",
                a
            );
        }
        for &i in &node.inputs {
            let t = &graph.tensors[i];
            ensure!(
                t.sparsity.is_none() && t.quant.is_none(),
                "operator #{ix} ({name}) reads encoded constant '{}'",
                t.name
            );
            ensure!(
                matches!(t.dtype, DType::F32 | DType::I32),
                "operator #{ix} ({name}) reads {} tensor '{}'",
                t.dtype.name(),
                t.name
            );
        }
    }
    Ok(())
}
