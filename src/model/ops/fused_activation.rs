//! Activations fused into an op (`fused_activation_function`).

use anyhow::{Result, bail};
use tract_tflite::tflite::ActivationFunctionType;

/// Fused activations. tract reads `None`, `Relu` and `Relu6`; normalisation turns the
/// others into separate ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// None: the op's own output.
    None,
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, 0), 6)`.
    Relu6,
    /// `min(max(x, -1), 1)`.
    ReluN1To1,
    /// The hyperbolic tangent.
    Tanh,
}

impl Activation {
    pub(crate) fn from_tflite(activation: ActivationFunctionType) -> Result<Activation> {
        Ok(match activation {
            ActivationFunctionType::NONE => Activation::None,
            ActivationFunctionType::RELU => Activation::Relu,
            ActivationFunctionType::RELU6 => Activation::Relu6,
            ActivationFunctionType::RELU_N1_TO_1 => Activation::ReluN1To1,
            ActivationFunctionType::TANH => Activation::Tanh,
            other => bail!(
                "fused activation {} is not supported",
                other.variant_name().unwrap_or("?")
            ),
        })
    }

    pub(crate) fn to_tflite(self) -> ActivationFunctionType {
        match self {
            Activation::None => ActivationFunctionType::NONE,
            Activation::Relu => ActivationFunctionType::RELU,
            Activation::Relu6 => ActivationFunctionType::RELU6,
            Activation::ReluN1To1 => ActivationFunctionType::RELU_N1_TO_1,
            Activation::Tanh => ActivationFunctionType::TANH,
        }
    }

    /// Whether tract-tflite 0.23 reads it fused.
    pub(crate) fn is_runnable(self) -> bool {
        matches!(
            self,
            Activation::None | Activation::Relu | Activation::Relu6
        )
    }
}
