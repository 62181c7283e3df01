//! SOFTMAX over the last axis.

use super::{BinaryKind, Op, OpFamily, OptionsWriter, Registry, WrittenOptions, misrouted};
use crate::model::graph::{Node, OpInputs};
use crate::model::normalise::Rewriter;
use anyhow::Result;
use tract_tflite::tflite::{self, BuiltinOperator, BuiltinOptions};

pub(super) struct Softmax;

impl OpFamily for Softmax {
    fn register(&self, registry: &mut Registry) {
        registry.add(BuiltinOperator::SOFTMAX, |reader| {
            let options = reader.operator.builtin_options_as_softmax_options();
            let beta = options.map_or(1.0, |o| o.beta());
            reader.node(Op::Softmax { beta })
        });
    }

    fn output_shape(&self, _op: &Op, inputs: &OpInputs) -> Result<Vec<usize>> {
        inputs.elementwise_shape()
    }

    fn write_options(&self, op: &Op, writer: &mut OptionsWriter) -> Result<WrittenOptions> {
        let options = tflite::SoftmaxOptions::create(
            writer.builder,
            &tflite::SoftmaxOptionsArgs { beta: beta(op)? },
        );
        Ok(WrittenOptions::table(
            BuiltinOptions::SoftmaxOptions,
            options,
        ))
    }

    /// tract reads beta = 1 only: TFLite's exp(beta·x) normalised is a MUL by beta first.
    fn normalise(&self, node: Node, rewriter: &mut Rewriter) -> Result<Option<&'static str>> {
        let beta = beta(&node.op)?;
        if beta == 1.0 {
            rewriter.keep(node);
            return Ok(None);
        }
        let beta = rewriter.scalar("beta", beta);
        let scaled = rewriter.emit(BinaryKind::Mul.op(), vec![node.inputs[0], beta], "scaled")?;
        rewriter.emit_output(Op::Softmax { beta: 1.0 }, vec![scaled])?;
        Ok(Some("softmax-beta"))
    }

    fn unrunnable(&self, op: &Op) -> Option<String> {
        let beta = beta(op).ok()?;
        (beta != 1.0).then(|| format!("has beta {beta}"))
    }
}

fn beta(op: &Op) -> Result<f32> {
    match op {
        Op::Softmax { beta } => Ok(*beta),
        other => Err(misrouted("softmax", other)),
    }
}
