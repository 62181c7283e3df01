//! SLICE and STRIDED_SLICE by constant bounds.

use super::{Op, OpFamily, OptionsWriter, Registry, WrittenOptions, misrouted};
use crate::model::graph::{Node, OpInputs, TensorId};
use crate::model::normalise::Rewriter;
use crate::model::tflite::raw_u64_field;
use anyhow::{Result, ensure};
use tract_tflite::tflite::{self, BuiltinOperator, BuiltinOptions};

/// The masks of STRIDED_SLICE; begin, end and strides are constant inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StridedSliceParams {
    pub(crate) begin_mask: u32,
    pub(crate) end_mask: u32,
    pub(crate) shrink_axis_mask: u32,
}

impl StridedSliceParams {
    /// Resolved [begin, end) of axis `d`, of extent `n`, under these masks.
    fn axis_bounds(
        &self,
        d: usize,
        n: usize,
        begin: i64,
        end: i64,
        stride: i64,
    ) -> Result<(i64, i64)> {
        let masked = |mask: u32| mask >> d & 1 == 1;
        strided_bounds(
            n,
            begin,
            end,
            stride,
            masked(self.begin_mask),
            masked(self.end_mask),
        )
    }
}

/// Resolved [begin, end) of one strided-slice axis of extent `n`, clamped as TFLite does.
pub(crate) fn strided_bounds(
    n: usize,
    begin: i64,
    end: i64,
    stride: i64,
    begin_masked: bool,
    end_masked: bool,
) -> Result<(i64, i64)> {
    ensure!(stride != 0, "STRIDED_SLICE stride is zero");
    let n = n as i64;
    let from_end = |v: i64| if v < 0 { v + n } else { v };
    Ok(if stride > 0 {
        (
            if begin_masked {
                0
            } else {
                from_end(begin).clamp(0, n)
            },
            if end_masked {
                n
            } else {
                from_end(end).clamp(0, n)
            },
        )
    } else {
        (
            if begin_masked {
                n - 1
            } else {
                from_end(begin).clamp(-1, n - 1)
            },
            if end_masked {
                -1
            } else {
                from_end(end).clamp(-1, n - 1)
            },
        )
    })
}

pub(super) struct Slice;

impl OpFamily for Slice {
    fn register(&self, registry: &mut Registry) {
        registry.add_plain(BuiltinOperator::SLICE, Op::Slice);
    }

    fn output_shape(&self, _op: &Op, inputs: &OpInputs) -> Result<Vec<usize>> {
        inputs.arity(3..=3)?;
        let x = inputs.shape(0);
        let (begin, size) = (inputs.const_ints(1)?, inputs.const_ints(2)?);
        ensure!(
            begin.len() == x.len() && size.len() == x.len(),
            "SLICE arguments do not match rank {}",
            x.len()
        );
        (0..x.len())
            .map(|d| {
                let extent = if size[d] == -1 {
                    x[d] as i64 - begin[d]
                } else {
                    size[d]
                };
                ensure!(
                    begin[d] >= 0 && extent >= 0 && begin[d] + extent <= x[d] as i64,
                    "SLICE [{}, +{}) out of extent {}",
                    begin[d],
                    extent,
                    x[d]
                );
                Ok(extent as usize)
            })
            .collect()
    }

    fn write_options(&self, _op: &Op, writer: &mut OptionsWriter) -> Result<WrittenOptions> {
        Ok(writer.empty_table(BuiltinOptions::SliceOptions))
    }

    fn takes_integer_arguments(&self) -> bool {
        true
    }

    /// Explicit sizes: tract reads a size of -1 as a huge unsigned extent.
    fn normalise(&self, node: Node, rewriter: &mut Rewriter) -> Result<Option<&'static str>> {
        let x = node.inputs[0];
        let shape = rewriter.shape(x).to_vec();
        let begin = rewriter.graph.tensors[node.inputs[1]].int_values()?;
        let size = rewriter.graph.tensors[node.inputs[2]].int_values()?;
        let size: Vec<i32> = (0..shape.len())
            .map(|d| {
                if size[d] == -1 {
                    (shape[d] as i64 - begin[d]) as i32
                } else {
                    size[d] as i32
                }
            })
            .collect();
        let begin: Vec<i32> = begin.iter().map(|&v| v as i32).collect();
        let begin = rewriter.ints("begin", &begin, vec![shape.len()]);
        let size = rewriter.ints("size", &size, vec![shape.len()]);
        rewriter.emit_output(Op::Slice, vec![x, begin, size])?;
        Ok(None)
    }
}

pub(super) struct StridedSlice;

impl OpFamily for StridedSlice {
    fn register(&self, registry: &mut Registry) {
        registry.add(BuiltinOperator::STRIDED_SLICE, |reader| {
            let options =
                reader.options(tflite::Operator::builtin_options_as_strided_slice_options)?;
            ensure!(
                options.ellipsis_mask() == 0 && options.new_axis_mask() == 0,
                "ellipsis and new-axis masks are not supported"
            );
            // `offset` (slot 14) is newer than tract's schema; it changes what `end` means.
            ensure!(
                raw_u64_field(&options._tab, 14).unwrap_or(0) == 0,
                "offset mode is not supported"
            );
            reader.node(Op::StridedSlice(StridedSliceParams {
                begin_mask: options.begin_mask() as u32,
                end_mask: options.end_mask() as u32,
                shrink_axis_mask: options.shrink_axis_mask() as u32,
            }))
        });
    }

    fn output_shape(&self, op: &Op, inputs: &OpInputs) -> Result<Vec<usize>> {
        let params = params(op)?;
        inputs.arity(4..=4)?;
        let x = inputs.shape(0);
        let (begin, end, strides) = (
            inputs.const_ints(1)?,
            inputs.const_ints(2)?,
            inputs.const_ints(3)?,
        );
        ensure!(
            begin.len() == x.len() && end.len() == x.len() && strides.len() == x.len(),
            "STRIDED_SLICE arguments do not match rank {}",
            x.len()
        );
        let mut out = vec![];
        for d in 0..x.len() {
            let (lo, hi) = params.axis_bounds(d, x[d], begin[d], end[d], strides[d])?;
            let (span, step) = if strides[d] > 0 {
                ((hi - lo).max(0), strides[d])
            } else {
                ((lo - hi).max(0), -strides[d])
            };
            let n = (span + step - 1) / step;
            if params.shrink_axis_mask >> d & 1 == 1 {
                ensure!(n == 1, "STRIDED_SLICE shrinks axis {} of extent {}", d, n);
            } else {
                out.push(n as usize);
            }
        }
        Ok(out)
    }

    fn write_options(&self, op: &Op, writer: &mut OptionsWriter) -> Result<WrittenOptions> {
        let params = params(op)?;
        let options = tflite::StridedSliceOptions::create(
            writer.builder,
            &tflite::StridedSliceOptionsArgs {
                begin_mask: params.begin_mask as i32,
                end_mask: params.end_mask as i32,
                shrink_axis_mask: params.shrink_axis_mask as i32,
                ..Default::default()
            },
        );
        Ok(WrittenOptions::table(
            BuiltinOptions::StridedSliceOptions,
            options,
        ))
    }

    fn takes_integer_arguments(&self) -> bool {
        true
    }

    /// Resolves the masks and negative bounds tract reads differently, slices without
    /// shrinking, and reshapes to the shrunk shape.
    fn normalise(&self, node: Node, rewriter: &mut Rewriter) -> Result<Option<&'static str>> {
        let params = params(&node.op)?;
        let x = node.inputs[0];
        let shape = rewriter.shape(x).to_vec();
        let argument = |k: usize| rewriter.graph.tensors[node.inputs[k]].int_values();
        let (begin, end, strides) = (argument(1)?, argument(2)?, argument(3)?);
        let bounds = (0..shape.len())
            .map(|d| params.axis_bounds(d, shape[d], begin[d], end[d], strides[d]))
            .collect::<Result<Vec<_>>>()?;
        let sliced = if strides.iter().all(|&s| s == 1) {
            plain_slice(rewriter, x, &bounds)?
        } else {
            unmasked_strided_slice(rewriter, x, &bounds, &strides)?
        };
        rewriter.reshape_output(sliced)?;
        Ok(Some("strided-slice"))
    }

    fn unrunnable(&self, op: &Op) -> Option<String> {
        let params = params(op).ok()?;
        (params.shrink_axis_mask != 0).then(|| "still shrinks axes".into())
    }
}

fn params(op: &Op) -> Result<StridedSliceParams> {
    match op {
        Op::StridedSlice(params) => Ok(*params),
        other => Err(misrouted("strided slice", other)),
    }
}

/// tract's SLICE is the plain case of its strided slice, and has none of the mask rules.
fn plain_slice(rewriter: &mut Rewriter, x: TensorId, bounds: &[(i64, i64)]) -> Result<TensorId> {
    let begin: Vec<i32> = bounds.iter().map(|&(lo, _)| lo as i32).collect();
    let size: Vec<i32> = bounds
        .iter()
        .map(|&(lo, hi)| (hi - lo).max(0) as i32)
        .collect();
    let rank = bounds.len();
    let begin = rewriter.ints("begin", &begin, vec![rank]);
    let size = rewriter.ints("size", &size, vec![rank]);
    rewriter.emit(Op::Slice, vec![x, begin, size], "unshrunk")
}

/// A strided slice with bounds resolved: an end mask only where the slice runs past the
/// start of a reversed axis (an end of -1 would read as "from the end").
fn unmasked_strided_slice(
    rewriter: &mut Rewriter,
    x: TensorId,
    bounds: &[(i64, i64)],
    strides: &[i64],
) -> Result<TensorId> {
    let mut end_mask = 0u32;
    let begin: Vec<i32> = bounds.iter().map(|&(lo, _)| lo as i32).collect();
    let end: Vec<i32> = bounds
        .iter()
        .enumerate()
        .map(|(d, &(_, hi))| {
            if hi < 0 {
                end_mask |= 1 << d;
            }
            hi as i32
        })
        .collect();
    let strides: Vec<i32> = strides.iter().map(|&s| s as i32).collect();
    let rank = bounds.len();
    let begin = rewriter.ints("begin", &begin, vec![rank]);
    let end = rewriter.ints("end", &end, vec![rank]);
    let strides = rewriter.ints("strides", &strides, vec![rank]);
    let params = StridedSliceParams {
        begin_mask: 0,
        end_mask,
        shrink_axis_mask: 0,
    };
    rewriter.emit(
        Op::StridedSlice(params),
        vec![x, begin, end, strides],
        "unshrunk",
    )
}
