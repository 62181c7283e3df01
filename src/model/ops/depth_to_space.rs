//! DEPTH_TO_SPACE, rewritten as RESHAPE, TRANSPOSE, RESHAPE.

use super::window::positive;
use super::{Op, OpFamily, OptionsWriter, Registry, WrittenOptions, misrouted};
use crate::model::graph::{Node, OpInputs};
use crate::model::normalise::Rewriter;
use anyhow::{Result, ensure};
use tract_tflite::tflite::{self, BuiltinOperator, BuiltinOptions};

pub(super) struct DepthToSpace;

impl OpFamily for DepthToSpace {
    fn register(&self, registry: &mut Registry) {
        registry.add(BuiltinOperator::DEPTH_TO_SPACE, |reader| {
            let options =
                reader.options(tflite::Operator::builtin_options_as_depth_to_space_options)?;
            let block = positive(options.block_size(), "block size")?;
            reader.node(Op::DepthToSpace { block })
        });
    }

    fn output_shape(&self, op: &Op, inputs: &OpInputs) -> Result<Vec<usize>> {
        let block = block(op)?;
        inputs.arity(1..=1)?;
        let [n, h, w, c] = inputs.rank4(0)?;
        ensure!(
            block > 0 && c % (block * block) == 0,
            "DEPTH_TO_SPACE block {} does not divide {} channels",
            block,
            c
        );
        Ok(vec![n, h * block, w * block, c / (block * block)])
    }

    fn write_options(&self, op: &Op, writer: &mut OptionsWriter) -> Result<WrittenOptions> {
        let options = tflite::DepthToSpaceOptions::create(
            writer.builder,
            &tflite::DepthToSpaceOptionsArgs {
                block_size: block(op)? as i32,
            },
        );
        Ok(WrittenOptions::table(
            BuiltinOptions::DepthToSpaceOptions,
            options,
        ))
    }

    /// Channels split into block × block × C', the two block axes moved beside H and W,
    /// then merged into them.
    fn normalise(&self, node: Node, rewriter: &mut Rewriter) -> Result<Option<&'static str>> {
        let b = block(&node.op)?;
        let x = node.inputs[0];
        let &[n, h, w, c] = rewriter.shape(x) else {
            anyhow::bail!("DEPTH_TO_SPACE of a tensor that is not rank 4");
        };
        let blocks = rewriter.reshape(x, &[n, h, w, b, b, c / (b * b)], "blocks")?;
        let perm = rewriter.ints("perm", &[0, 1, 3, 2, 4, 5], vec![6]);
        let moved = rewriter.emit(Op::Transpose, vec![blocks, perm], "interleaved")?;
        rewriter.reshape_output(moved)?;
        Ok(Some("depth-to-space"))
    }

    fn unrunnable(&self, _op: &Op) -> Option<String> {
        super::survived_normalisation()
    }
}

fn block(op: &Op) -> Result<usize> {
    match op {
        Op::DepthToSpace { block } => Ok(*block),
        other => Err(misrouted("depth to space", other)),
    }
}
