//! RESIZE_BILINEAR and RESIZE_NEAREST_NEIGHBOR to a constant size.

use super::{Op, OpFamily, OperatorReader, OptionsWriter, Registry, WrittenOptions, misrouted};
use crate::model::graph::{Node, OpInputs};
use crate::model::normalise::Rewriter;
use anyhow::{Result, ensure};
use tract_tflite::tflite::{self, BuiltinOperator, BuiltinOptions};

pub(super) struct Resize;

impl OpFamily for Resize {
    fn register(&self, registry: &mut Registry) {
        registry.add(BuiltinOperator::RESIZE_BILINEAR, read);
        registry.add(BuiltinOperator::RESIZE_NEAREST_NEIGHBOR, read);
    }

    fn output_shape(&self, op: &Op, inputs: &OpInputs) -> Result<Vec<usize>> {
        inputs.arity(2..=2)?;
        let [n, _, _, c] = inputs.rank4(0)?;
        let size = inputs.const_ints(1)?;
        ensure!(
            size.len() == 2 && size.iter().all(|&s| (1..1 << 16).contains(&s)),
            "{} size {:?} is not two positive extents",
            op.name(),
            size
        );
        Ok(vec![n, size[0] as usize, size[1] as usize, c])
    }

    fn write_options(&self, op: &Op, writer: &mut OptionsWriter) -> Result<WrittenOptions> {
        Ok(match *op {
            Op::ResizeBilinear {
                align_corners,
                half_pixel_centers,
            } => WrittenOptions::table(
                BuiltinOptions::ResizeBilinearOptions,
                tflite::ResizeBilinearOptions::create(
                    writer.builder,
                    &tflite::ResizeBilinearOptionsArgs {
                        align_corners,
                        half_pixel_centers,
                    },
                ),
            ),
            Op::ResizeNearest {
                align_corners,
                half_pixel_centers,
            } => WrittenOptions::table(
                BuiltinOptions::ResizeNearestNeighborOptions,
                tflite::ResizeNearestNeighborOptions::create(
                    writer.builder,
                    &tflite::ResizeNearestNeighborOptionsArgs {
                        align_corners,
                        half_pixel_centers,
                    },
                ),
            ),
            ref other => return Err(misrouted("resize", other)),
        })
    }

    fn takes_integer_arguments(&self) -> bool {
        true
    }

    fn normalise(&self, node: Node, rewriter: &mut Rewriter) -> Result<Option<&'static str>> {
        rewriter.keep_with_i32_argument(node)?;
        Ok(None)
    }
}

/// Both resizes, with `align_corners` and `half_pixel_centers` (both false when the
/// operator has no options).
fn read(reader: &mut OperatorReader) -> Result<Node> {
    let operator = reader.operator;
    let bilinear = reader.opcode == BuiltinOperator::RESIZE_BILINEAR;
    let (align_corners, half_pixel_centers) = if bilinear {
        let options = operator.builtin_options_as_resize_bilinear_options();
        options.map(|o| (o.align_corners(), o.half_pixel_centers()))
    } else {
        let options = operator.builtin_options_as_resize_nearest_neighbor_options();
        options.map(|o| (o.align_corners(), o.half_pixel_centers()))
    }
    .unwrap_or((false, false));
    reader.node(if bilinear {
        Op::ResizeBilinear {
            align_corners,
            half_pixel_centers,
        }
    } else {
        Op::ResizeNearest {
            align_corners,
            half_pixel_centers,
        }
    })
}
