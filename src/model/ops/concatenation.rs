//! CONCATENATION along one axis.

use super::{Activation, Op, OpFamily, OptionsWriter, Registry, WrittenOptions, misrouted};
use crate::model::graph::{OpInputs, normalise_axes};
use anyhow::{Context, Result, ensure};
use tract_tflite::tflite::{self, BuiltinOperator, BuiltinOptions};

pub(super) struct Concatenation;

impl OpFamily for Concatenation {
    fn register(&self, registry: &mut Registry) {
        registry.add(BuiltinOperator::CONCATENATION, |reader| {
            let options =
                reader.options(tflite::Operator::builtin_options_as_concatenation_options)?;
            let rank = reader.input_shape(0).context("no inputs")?.len();
            let op = Op::Concatenation {
                axis: normalise_axes(&[options.axis() as i64], rank)?[0],
                activation: Activation::from_tflite(options.fused_activation_function())?,
            };
            reader.node(op)
        });
    }

    fn output_shape(&self, op: &Op, inputs: &OpInputs) -> Result<Vec<usize>> {
        let (axis, _) = options(op)?;
        ensure!(inputs.len() > 0, "CONCATENATION needs inputs");
        let first = inputs.shape(0);
        ensure!(
            axis < first.len(),
            "CONCATENATION axis {} out of rank {}",
            axis,
            first.len()
        );
        let mut shape = first.to_vec();
        shape[axis] = 0;
        for other in inputs.shapes() {
            ensure!(
                other.len() == first.len(),
                "CONCATENATION ranks differ: {:?} vs {:?}",
                first,
                other
            );
            for d in 0..other.len() {
                ensure!(
                    d == axis || other[d] == first[d],
                    "CONCATENATION shapes {:?} and {:?}",
                    first,
                    other
                );
            }
            shape[axis] += other[axis];
        }
        Ok(shape)
    }

    fn write_options(&self, op: &Op, writer: &mut OptionsWriter) -> Result<WrittenOptions> {
        let (axis, activation) = options(op)?;
        let options = tflite::ConcatenationOptions::create(
            writer.builder,
            &tflite::ConcatenationOptionsArgs {
                axis: axis as i32,
                fused_activation_function: activation.to_tflite(),
            },
        );
        Ok(WrittenOptions::table(
            BuiltinOptions::ConcatenationOptions,
            options,
        ))
    }

    fn fused_activation<'op>(&self, op: &'op mut Op) -> Option<&'op mut Activation> {
        match op {
            Op::Concatenation { activation, .. } => Some(activation),
            _ => None,
        }
    }
}

/// The axis and the fused activation.
fn options(op: &Op) -> Result<(usize, Activation)> {
    match op {
        Op::Concatenation { axis, activation } => Ok((*axis, *activation)),
        other => Err(misrouted("concatenation", other)),
    }
}
