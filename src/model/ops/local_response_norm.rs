//! LOCAL_RESPONSE_NORMALIZATION across channels, rewritten as
//! x · (bias + alpha · Σ x²)^-beta with SQUARE (a MUL), PAD, SLICEs, ADDs and LOG/MUL/EXP.

use super::{BinaryKind, Op, OpFamily, OptionsWriter, Registry, UnaryKind, WrittenOptions};
use crate::model::graph::{Node, OpInputs, TensorId};
use crate::model::normalise::Rewriter;
use anyhow::{Result, ensure};
use tract_tflite::tflite::{self, BuiltinOperator, BuiltinOptions};

pub(super) struct LocalResponseNorm;

/// The options of one LOCAL_RESPONSE_NORMALIZATION.
#[derive(Clone, Copy)]
struct Params {
    radius: usize,
    bias: f32,
    alpha: f32,
    beta: f32,
}

impl OpFamily for LocalResponseNorm {
    fn register(&self, registry: &mut Registry) {
        registry.add(BuiltinOperator::LOCAL_RESPONSE_NORMALIZATION, |reader| {
            let options = reader.options(
                tflite::Operator::builtin_options_as_local_response_normalization_options,
            )?;
            ensure!(options.radius() >= 0, "negative radius");
            reader.node(Op::LocalResponseNorm {
                radius: options.radius() as usize,
                bias: options.bias(),
                alpha: options.alpha(),
                beta: options.beta(),
            })
        });
    }

    fn output_shape(&self, _op: &Op, inputs: &OpInputs) -> Result<Vec<usize>> {
        inputs.arity(1..=1)?;
        Ok(inputs.rank4(0)?.to_vec())
    }

    fn write_options(&self, op: &Op, writer: &mut OptionsWriter) -> Result<WrittenOptions> {
        let lrn = params(op)?;
        let options = tflite::LocalResponseNormalizationOptions::create(
            writer.builder,
            &tflite::LocalResponseNormalizationOptionsArgs {
                radius: lrn.radius as i32,
                bias: lrn.bias,
                alpha: lrn.alpha,
                beta: lrn.beta,
            },
        );
        Ok(WrittenOptions::table(
            BuiltinOptions::LocalResponseNormalizationOptions,
            options,
        ))
    }

    fn normalise(&self, node: Node, rewriter: &mut Rewriter) -> Result<Option<&'static str>> {
        let lrn = params(&node.op)?;
        let x = node.inputs[0];
        let sum = windowed_sum_of_squares(rewriter, x, lrn.radius)?;
        let alpha = rewriter.scalar("alpha", lrn.alpha);
        let bias = rewriter.scalar("bias", lrn.bias);
        let minus_beta = rewriter.scalar("neg_beta", -lrn.beta);
        let scaled = rewriter.emit(BinaryKind::Mul.op(), vec![sum, alpha], "scaled")?;
        let base = rewriter.emit(BinaryKind::Add.op(), vec![scaled, bias], "base")?;
        let log = rewriter.emit(Op::Unary(UnaryKind::Log), vec![base], "log")?;
        let power = rewriter.emit(BinaryKind::Mul.op(), vec![log, minus_beta], "log_pow")?;
        let factor = rewriter.emit(Op::Unary(UnaryKind::Exp), vec![power], "factor")?;
        rewriter.emit_output(BinaryKind::Mul.op(), vec![x, factor])?;
        Ok(Some("local-response-norm"))
    }

    fn unrunnable(&self, _op: &Op) -> Option<String> {
        super::survived_normalisation()
    }
}

fn params(op: &Op) -> Result<Params> {
    match *op {
        Op::LocalResponseNorm {
            radius,
            bias,
            alpha,
            beta,
        } => Ok(Params {
            radius,
            bias,
            alpha,
            beta,
        }),
        ref other => Err(super::misrouted("local response norm", other)),
    }
}

/// Σ x² over the channels within `radius` of each channel: the squares padded by `radius`
/// zeros on both sides of C, and the 2·radius + 1 shifted windows added.
fn windowed_sum_of_squares(
    rewriter: &mut Rewriter,
    x: TensorId,
    radius: usize,
) -> Result<TensorId> {
    let shape: Vec<i32> = rewriter.shape(x).iter().map(|&d| d as i32).collect();
    let squares = rewriter.emit(BinaryKind::Mul.op(), vec![x, x], "sq")?;
    let r = radius as i32;
    let pads = rewriter.ints("pads", &[0, 0, 0, 0, 0, 0, r, r], vec![4, 2]);
    let padded = rewriter.emit(Op::Pad, vec![squares, pads], "sq_padded")?;
    let size = rewriter.ints("size", &shape, vec![4]);
    let mut sum = shifted_window(rewriter, padded, size, 0)?;
    for k in 1..=2 * radius {
        let window = shifted_window(rewriter, padded, size, k)?;
        sum = rewriter.emit(BinaryKind::Add.op(), vec![sum, window], &format!("sum{k}"))?;
    }
    Ok(sum)
}

/// The channels `k`..`k + C` of the padded squares.
fn shifted_window(
    rewriter: &mut Rewriter,
    padded: TensorId,
    size: TensorId,
    k: usize,
) -> Result<TensorId> {
    let begin = rewriter.ints(&format!("begin{k}"), &[0, 0, 0, k as i32], vec![4]);
    rewriter.emit(Op::Slice, vec![padded, begin, size], &format!("window{k}"))
}
