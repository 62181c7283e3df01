//! PAD (zeros) and PADV2 (a given value).

use super::{Op, OpFamily, OptionsWriter, Registry, WrittenOptions};
use crate::model::graph::{Node, OpInputs};
use crate::model::normalise::Rewriter;
use anyhow::{Context, Result, ensure};
use tract_tflite::tflite::{BuiltinOperator, BuiltinOptions};

pub(super) struct Pad;

impl OpFamily for Pad {
    fn register(&self, registry: &mut Registry) {
        registry.add_plain(BuiltinOperator::PAD, Op::Pad);
        registry.add_plain(BuiltinOperator::PADV2, Op::PadV2);
    }

    fn output_shape(&self, _op: &Op, inputs: &OpInputs) -> Result<Vec<usize>> {
        inputs.arity(2..=3)?;
        let x = inputs.shape(0);
        let pads = inputs
            .const_ints(1)
            .context("PAD needs constant paddings")?;
        ensure!(
            pads.len() == 2 * x.len(),
            "PAD paddings {:?} do not match rank {}",
            pads,
            x.len()
        );
        ensure!(
            pads.iter().all(|&p| (0..1 << 20).contains(&p)),
            "PAD paddings {:?} out of range",
            pads
        );
        Ok(x.iter()
            .enumerate()
            .map(|(d, &n)| n + pads[2 * d] as usize + pads[2 * d + 1] as usize)
            .collect())
    }

    fn write_options(&self, op: &Op, writer: &mut OptionsWriter) -> Result<WrittenOptions> {
        Ok(match op {
            Op::PadV2 => writer.empty_table(BuiltinOptions::PadV2Options),
            _ => writer.empty_table(BuiltinOptions::PadOptions),
        })
    }

    fn takes_integer_arguments(&self) -> bool {
        true
    }

    /// tract reads paddings as an i32 [rank, 2] matrix only, and PADV2's value as one f32.
    fn normalise(&self, node: Node, rewriter: &mut Rewriter) -> Result<Option<&'static str>> {
        let rank = rewriter.shape(node.inputs[0]).len();
        let pads = rewriter.i32_values(node.inputs[1])?;
        let mut inputs = node.inputs.clone();
        inputs[1] = rewriter.ints("paddings", &pads, vec![rank, 2]);
        if node.op == Op::PadV2 {
            let value = rewriter.graph.tensors[inputs[2]]
                .f32_values()
                .context("PADV2 value")?;
            ensure!(value.len() == 1, "PADV2 needs one padding value");
            inputs[2] = rewriter.scalar("pad_value", value[0]);
        }
        rewriter.emit_output(node.op, inputs)?;
        Ok(None)
    }
}
