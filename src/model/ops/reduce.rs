//! Reductions over constant axes: MEAN, SUM, REDUCE_MAX, REDUCE_MIN.

use super::{
    Activation, BinaryKind, Op, OpFamily, OptionsWriter, Padding, PoolParams, Registry,
    WrittenOptions, misrouted,
};
use crate::model::graph::{Graph, Node, OpInputs, TensorId, normalise_axes};
use crate::model::normalise::Rewriter;
use anyhow::{Context, Result};
use tract_tflite::tflite::{self, BuiltinOperator, BuiltinOptions};

/// A reduction over some axes of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceKind {
    /// MEAN (tract 0.23 rounds its f32 MEAN: normalisation rewrites it as a sum and a scale).
    Mean,
    /// SUM.
    Sum,
    /// REDUCE_MAX.
    Max,
    /// REDUCE_MIN.
    Min,
}

impl ReduceKind {
    pub(super) const ALL: [ReduceKind; 4] = [
        ReduceKind::Mean,
        ReduceKind::Sum,
        ReduceKind::Max,
        ReduceKind::Min,
    ];

    pub(super) fn opcode(self) -> BuiltinOperator {
        match self {
            ReduceKind::Mean => BuiltinOperator::MEAN,
            ReduceKind::Sum => BuiltinOperator::SUM,
            ReduceKind::Max => BuiltinOperator::REDUCE_MAX,
            ReduceKind::Min => BuiltinOperator::REDUCE_MIN,
        }
    }
}

pub(super) struct Reduce;

impl OpFamily for Reduce {
    fn register(&self, registry: &mut Registry) {
        for kind in ReduceKind::ALL {
            registry.add(kind.opcode(), |reader| {
                let kind = ReduceKind::ALL
                    .into_iter()
                    .find(|kind| kind.opcode() == reader.opcode)
                    .context("not a reduction")?;
                let keep_dims = reader
                    .operator
                    .builtin_options_as_reducer_options()
                    .map(|o| o.keep_dims())
                    .unwrap_or(false);
                reader.node(Op::Reduce { kind, keep_dims })
            });
        }
    }

    fn output_shape(&self, op: &Op, inputs: &OpInputs) -> Result<Vec<usize>> {
        let (_, keep_dims) = options(op)?;
        inputs.arity(2..=2)?;
        let x = inputs.shape(0);
        let axes = normalise_axes(&inputs.const_ints(1)?, x.len())?;
        Ok(x.iter()
            .enumerate()
            .filter_map(|(d, &n)| match (axes.contains(&d), keep_dims) {
                (true, true) => Some(1),
                (true, false) => None,
                (false, _) => Some(n),
            })
            .collect())
    }

    fn write_options(&self, op: &Op, writer: &mut OptionsWriter) -> Result<WrittenOptions> {
        let (_, keep_dims) = options(op)?;
        let options = tflite::ReducerOptions::create(
            writer.builder,
            &tflite::ReducerOptionsArgs { keep_dims },
        );
        Ok(WrittenOptions::table(
            BuiltinOptions::ReducerOptions,
            options,
        ))
    }

    fn flops(&self, graph: &Graph, node: &Node) -> u64 {
        graph.tensors[node.inputs[0]].elements() as u64
    }

    fn takes_integer_arguments(&self) -> bool {
        true
    }

    fn normalise(&self, node: Node, rewriter: &mut Rewriter) -> Result<Option<&'static str>> {
        let (kind, keep_dims) = options(&node.op)?;
        let x = node.inputs[0];
        let axes = normalise_axes(
            &rewriter.graph.tensors[node.inputs[1]].int_values()?,
            rewriter.shape(x).len(),
        )?;
        if kind == ReduceKind::Mean {
            return mean(rewriter, x, &axes, keep_dims);
        }
        let axes = axes_tensor(rewriter, &axes);
        rewriter.emit_output(node.op, vec![x, axes])?;
        Ok(None)
    }

    fn unrunnable(&self, op: &Op) -> Option<String> {
        match options(op) {
            Ok((ReduceKind::Mean, _)) => super::survived_normalisation(),
            _ => None,
        }
    }
}

/// The kind and `keep_dims`.
fn options(op: &Op) -> Result<(ReduceKind, bool)> {
    match op {
        Op::Reduce { kind, keep_dims } => Ok((*kind, *keep_dims)),
        other => Err(misrouted("reduce", other)),
    }
}

/// The axes as tract reads them: i32, non-negative.
fn axes_tensor(rewriter: &mut Rewriter, axes: &[usize]) -> TensorId {
    let values: Vec<i32> = axes.iter().map(|&a| a as i32).collect();
    rewriter.ints("axes", &values, vec![axes.len()])
}

/// tract 0.23's f32 MEAN multiplies by the reciprocal count with an integer rounding
/// `scale` op; a SUM and a true division match the reference kernel.
fn mean(
    rewriter: &mut Rewriter,
    x: TensorId,
    axes: &[usize],
    keep_dims: bool,
) -> Result<Option<&'static str>> {
    let shape = rewriter.shape(x).to_vec();
    if shape.len() == 4 && axes == [1, 2] {
        // Global average pooling. As one pooling op it also keeps tract from folding the
        // division into the next layer's matmul in a whole-model plan, which would make
        // layer-by-layer results differ in the last bits.
        let pool = Op::AvgPool2d(PoolParams {
            padding: Padding::Valid,
            stride: [1, 1],
            filter: [shape[1], shape[2]],
            activation: Activation::None,
        });
        if keep_dims {
            rewriter.emit_output(pool, vec![x])?;
        } else {
            let pooled = rewriter.emit(pool, vec![x], "pooled")?;
            rewriter.reshape_output(pooled)?;
        }
        return Ok(Some("mean"));
    }
    let count: usize = axes.iter().map(|&a| shape[a]).product();
    let axes = axes_tensor(rewriter, axes);
    let sum = rewriter.emit(
        Op::Reduce {
            kind: ReduceKind::Sum,
            keep_dims,
        },
        vec![x, axes],
        "sum",
    )?;
    let count = rewriter.scalar("count", count as f32);
    rewriter.emit_output(BinaryKind::Div.op(), vec![sum, count])?;
    Ok(Some("mean"))
}
