//! Elementwise arithmetic: the unary ops (one table), the binary ops with broadcasting,
//! LEAKY_RELU, and PRELU (rewritten into binary ops).
//!
//! A weightless unary op tract-tflite reads is one row of `unary_ops!` below and its test.

use super::{Activation, Op, OpFamily, OperatorReader, OptionsWriter, Registry, WrittenOptions};
use crate::model::graph::{Node, OpInputs};
use crate::model::normalise::Rewriter;
use anyhow::{Context, Result, bail, ensure};
use tract_tflite::tflite::{self, ActivationFunctionType, BuiltinOperator, BuiltinOptions};

/// Declares [`UnaryKind`] and each kind's opcode from one list.
macro_rules! unary_ops {
    ($($(#[$doc:meta])* $kind:ident => $opcode:ident,)*) => {
        /// An elementwise function of one tensor, without options.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum UnaryKind {
            $($(#[$doc])* $kind,)*
        }

        impl UnaryKind {
            pub(super) const ALL: &[UnaryKind] = &[$(UnaryKind::$kind,)*];

            pub(super) fn opcode(self) -> BuiltinOperator {
                match self {
                    $(UnaryKind::$kind => BuiltinOperator::$opcode,)*
                }
            }
        }
    };
}

unary_ops! {
    /// `max(x, 0)`.
    Relu => RELU,
    /// `min(max(x, 0), 6)`.
    Relu6 => RELU6,
    /// The sigmoid, `1 / (1 + e^-x)`.
    Logistic => LOGISTIC,
    /// The hyperbolic tangent.
    Tanh => TANH,
    /// `x · relu6(x + 3) / 6`.
    HardSwish => HARD_SWISH,
    /// `e^x`.
    Exp => EXP,
    /// The natural logarithm.
    Log => LOG,
    /// The square root.
    Sqrt => SQRT,
    /// `1 / sqrt(x)`.
    Rsqrt => RSQRT,
    /// `x²`.
    Square => SQUARE,
    /// `|x|`.
    Abs => ABS,
    /// Rounded down.
    Floor => FLOOR,
    /// Rounded up.
    Ceil => CEIL,
    /// The sine (radians).
    Sin => SIN,
}

/// An elementwise function of two tensors, broadcast against each other as NumPy does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryKind {
    /// ADD: `a + b`.
    Add,
    /// SUB: `a - b`.
    Sub,
    /// MUL: `a · b`.
    Mul,
    /// DIV: `a / b`.
    Div,
    /// MAXIMUM: the larger of the two.
    Maximum,
    /// MINIMUM: the smaller of the two.
    Minimum,
}

impl BinaryKind {
    pub(super) const ALL: [BinaryKind; 6] = [
        BinaryKind::Add,
        BinaryKind::Sub,
        BinaryKind::Mul,
        BinaryKind::Div,
        BinaryKind::Maximum,
        BinaryKind::Minimum,
    ];

    /// The op without a fused activation.
    pub fn op(self) -> Op {
        Op::Binary {
            kind: self,
            activation: Activation::None,
        }
    }

    pub(super) fn opcode(self) -> BuiltinOperator {
        match self {
            BinaryKind::Add => BuiltinOperator::ADD,
            BinaryKind::Sub => BuiltinOperator::SUB,
            BinaryKind::Mul => BuiltinOperator::MUL,
            BinaryKind::Div => BuiltinOperator::DIV,
            BinaryKind::Maximum => BuiltinOperator::MAXIMUM,
            BinaryKind::Minimum => BuiltinOperator::MINIMUM,
        }
    }
}

/// Numpy-style broadcast of two shapes.
pub(crate) fn broadcast(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    let get = |s: &[usize], i: usize| {
        if i + s.len() >= r {
            s[i + s.len() - r]
        } else {
            1
        }
    };
    (0..r)
        .map(|i| match (get(a, i), get(b, i)) {
            (x, y) if x == y => Ok(x),
            (1, y) => Ok(y),
            (x, 1) => Ok(x),
            (x, y) => bail!("{:?} and {:?} differ at axis {} ({} vs {})", a, b, i, x, y),
        })
        .collect()
}

/// The ops of one input, each element mapped on its own: the [`UnaryKind`]s and
/// LEAKY_RELU.
pub(super) struct UnaryOps;

impl OpFamily for UnaryOps {
    fn register(&self, registry: &mut Registry) {
        for &kind in UnaryKind::ALL {
            registry.add_plain(kind.opcode(), Op::Unary(kind));
        }
        registry.add(BuiltinOperator::LEAKY_RELU, |reader| {
            let options = reader.operator.builtin_options_as_leaky_relu_options();
            let alpha = options.map_or(0.2, |o| o.alpha());
            reader.node(Op::LeakyRelu { alpha })
        });
    }

    fn output_shape(&self, _op: &Op, inputs: &OpInputs) -> Result<Vec<usize>> {
        inputs.elementwise_shape()
    }

    fn write_options(&self, op: &Op, writer: &mut OptionsWriter) -> Result<WrittenOptions> {
        let Op::LeakyRelu { alpha } = *op else {
            return Ok(WrittenOptions::none());
        };
        let args = tflite::LeakyReluOptionsArgs { alpha };
        let options = tflite::LeakyReluOptions::create(writer.builder, &args);
        Ok(WrittenOptions::table(
            BuiltinOptions::LeakyReluOptions,
            options,
        ))
    }
}

pub(super) struct BinaryOps;

impl OpFamily for BinaryOps {
    fn register(&self, registry: &mut Registry) {
        for kind in BinaryKind::ALL {
            registry.add(kind.opcode(), read_binary);
        }
    }

    fn output_shape(&self, op: &Op, inputs: &OpInputs) -> Result<Vec<usize>> {
        inputs.arity(2..=2)?;
        broadcast(inputs.shape(0), inputs.shape(1))
            .with_context(|| format!("{}: shapes do not broadcast", op.name()))
    }

    fn write_options(&self, op: &Op, writer: &mut OptionsWriter) -> Result<WrittenOptions> {
        let Op::Binary { kind, activation } = *op else {
            return Err(super::misrouted("binary", op));
        };
        let fused_activation_function = activation.to_tflite();
        let builder = &mut *writer.builder;
        Ok(match kind {
            BinaryKind::Add => WrittenOptions::table(
                BuiltinOptions::AddOptions,
                tflite::AddOptions::create(
                    builder,
                    &tflite::AddOptionsArgs {
                        fused_activation_function,
                        pot_scale_int16: false,
                    },
                ),
            ),
            BinaryKind::Sub => WrittenOptions::table(
                BuiltinOptions::SubOptions,
                tflite::SubOptions::create(
                    builder,
                    &tflite::SubOptionsArgs {
                        fused_activation_function,
                        pot_scale_int16: false,
                    },
                ),
            ),
            BinaryKind::Mul => WrittenOptions::table(
                BuiltinOptions::MulOptions,
                tflite::MulOptions::create(
                    builder,
                    &tflite::MulOptionsArgs {
                        fused_activation_function,
                    },
                ),
            ),
            BinaryKind::Div => WrittenOptions::table(
                BuiltinOptions::DivOptions,
                tflite::DivOptions::create(
                    builder,
                    &tflite::DivOptionsArgs {
                        fused_activation_function,
                    },
                ),
            ),
            BinaryKind::Maximum | BinaryKind::Minimum => {
                if activation != Activation::None {
                    bail!("{} cannot carry a fused activation", op.name());
                }
                writer.empty_table(BuiltinOptions::MaximumMinimumOptions)
            }
        })
    }

    fn fused_activation<'op>(&self, op: &'op mut Op) -> Option<&'op mut Activation> {
        match op {
            Op::Binary { activation, .. } => Some(activation),
            _ => None,
        }
    }
}

/// Reads ADD, SUB, MUL and DIV, which may fuse an activation, and MAXIMUM and MINIMUM.
fn read_binary(reader: &mut OperatorReader) -> Result<Node> {
    let kind = BinaryKind::ALL
        .into_iter()
        .find(|kind| kind.opcode() == reader.opcode)
        .context("not a binary op")?;
    let operator = reader.operator;
    let fused_activation = match kind {
        BinaryKind::Add => operator
            .builtin_options_as_add_options()
            .map(|o| o.fused_activation_function()),
        BinaryKind::Sub => operator
            .builtin_options_as_sub_options()
            .map(|o| o.fused_activation_function()),
        BinaryKind::Mul => operator
            .builtin_options_as_mul_options()
            .map(|o| o.fused_activation_function()),
        BinaryKind::Div => operator
            .builtin_options_as_div_options()
            .map(|o| o.fused_activation_function()),
        BinaryKind::Maximum | BinaryKind::Minimum => None,
    };
    let activation =
        Activation::from_tflite(fused_activation.unwrap_or(ActivationFunctionType::NONE))?;
    reader.node(Op::Binary { kind, activation })
}

pub(super) struct Prelu;

impl OpFamily for Prelu {
    fn register(&self, registry: &mut Registry) {
        registry.add_plain(BuiltinOperator::PRELU, Op::Prelu);
    }

    fn output_shape(&self, _op: &Op, inputs: &OpInputs) -> Result<Vec<usize>> {
        inputs.arity(2..=2)?;
        let (x, alpha) = (inputs.shape(0), inputs.shape(1));
        let shape = broadcast(x, alpha)?;
        ensure!(shape == x, "PRELU alpha {:?} widens input {:?}", alpha, x);
        Ok(shape)
    }

    fn write_options(&self, _op: &Op, _writer: &mut OptionsWriter) -> Result<WrittenOptions> {
        Ok(WrittenOptions::none())
    }

    /// For slopes alpha <= 1, prelu(x) = max(x, alpha·x); for alpha >= 1, min(x, alpha·x).
    /// Both are exact, signed zeros included (TFLite computes x >= 0 ? x : alpha·x), and two
    /// ops that tract fuses into the preceding conv.
    fn normalise(&self, node: Node, rewriter: &mut Rewriter) -> Result<Option<&'static str>> {
        let (x, alpha) = (node.inputs[0], node.inputs[1]);
        let alpha_tensor = &rewriter.graph.tensors[alpha];
        let slopes = if alpha_tensor.is_const() {
            alpha_tensor.f32_values().ok()
        } else {
            None
        };
        let bound = match slopes {
            Some(a) if a.iter().all(|&v| v <= 1.0) => Some(BinaryKind::Maximum),
            Some(a) if a.iter().all(|&v| v >= 1.0) => Some(BinaryKind::Minimum),
            _ => None,
        };
        if let Some(bound) = bound {
            let scaled = rewriter.emit(BinaryKind::Mul.op(), vec![x, alpha], "scaled")?;
            rewriter.emit_output(bound.op(), vec![x, scaled])?;
            return Ok(Some("prelu"));
        }
        // Mixed slopes: max(x,0) + alpha·min(x,0), equal in value (one term is always
        // zero) but +0 where TFLite gives -0 for a negative x times a zero slope.
        let zero = rewriter.scalar("zero", 0.0);
        let positive = rewriter.emit(BinaryKind::Maximum.op(), vec![x, zero], "pos")?;
        let negative = rewriter.emit(BinaryKind::Minimum.op(), vec![x, zero], "neg")?;
        let scaled = rewriter.emit(BinaryKind::Mul.op(), vec![negative, alpha], "neg_scaled")?;
        rewriter.emit_output(BinaryKind::Add.op(), vec![positive, scaled])?;
        Ok(Some("prelu"))
    }

    fn unrunnable(&self, _op: &Op) -> Option<String> {
        super::survived_normalisation()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_follows_numpy() {
        assert_eq!(broadcast(&[1, 4, 4, 8], &[8]).unwrap(), vec![1, 4, 4, 8]);
        assert_eq!(
            broadcast(&[1, 1, 8], &[1, 4, 4, 8]).unwrap(),
            vec![1, 4, 4, 8]
        );
        assert!(broadcast(&[3], &[4]).is_err());
    }
}
