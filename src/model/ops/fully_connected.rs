//! FULLY_CONNECTED: the weighted op of classifier heads.

use super::{Activation, Op, OpFamily, OperatorReader, OptionsWriter, Registry, WrittenOptions};
use crate::model::graph::{Graph, Node, OpInputs};
use crate::model::normalise::Rewriter;
use crate::model::split::LayerKind;
use anyhow::{Result, ensure};
use tract_tflite::tflite::{
    self, ActivationFunctionType, BuiltinOperator, BuiltinOptions,
    FullyConnectedOptionsWeightsFormat,
};

pub(super) struct FullyConnected;

impl OpFamily for FullyConnected {
    fn register(&self, registry: &mut Registry) {
        registry.add(BuiltinOperator::FULLY_CONNECTED, read);
    }

    fn output_shape(&self, op: &Op, inputs: &OpInputs) -> Result<Vec<usize>> {
        let (_, keep_num_dims) = options(op);
        inputs.arity(3..=3)?;
        let x = inputs.shape(0);
        let weights = inputs.shape(1);
        ensure!(
            weights.len() == 2,
            "FULLY_CONNECTED weights must be [out, in], got {:?}",
            weights
        );
        let elements: usize = x.iter().product();
        ensure!(
            weights[1] > 0 && elements.is_multiple_of(weights[1]),
            "FULLY_CONNECTED input {:?} does not divide into rows of {}",
            x,
            weights[1]
        );
        inputs.check_bias(2, weights[0])?;
        if !keep_num_dims {
            return Ok(vec![elements / weights[1], weights[0]]);
        }
        ensure!(
            x.last() == Some(&weights[1]),
            "FULLY_CONNECTED keep_num_dims needs last dim {}",
            weights[1]
        );
        let mut shape = x.to_vec();
        *shape.last_mut().expect("ends in weights[1]") = weights[0];
        Ok(shape)
    }

    fn write_options(&self, op: &Op, writer: &mut OptionsWriter) -> Result<WrittenOptions> {
        let (activation, keep_num_dims) = options(op);
        let options = tflite::FullyConnectedOptions::create(
            writer.builder,
            &tflite::FullyConnectedOptionsArgs {
                fused_activation_function: activation.to_tflite(),
                keep_num_dims,
                ..Default::default()
            },
        );
        Ok(WrittenOptions::table(
            BuiltinOptions::FullyConnectedOptions,
            options,
        ))
    }

    fn flops(&self, graph: &Graph, node: &Node) -> u64 {
        let inner = graph.tensors[node.inputs[1]].shape[1];
        2 * super::output_elements(graph, node) * inner as u64
    }

    fn fused_activation<'op>(&self, op: &'op mut Op) -> Option<&'op mut Activation> {
        match op {
            Op::FullyConnected { activation, .. } => Some(activation),
            _ => None,
        }
    }

    fn weighted_layer(&self, _graph: &Graph, _node: &Node) -> Option<LayerKind> {
        Some(LayerKind::Fc)
    }

    /// tract reads a rank-2 input only, without `keep_num_dims`: the rows are flattened
    /// before and the output reshaped after.
    fn normalise(&self, node: Node, rewriter: &mut Rewriter) -> Result<Option<&'static str>> {
        let (activation, keep_num_dims) = options(&node.op);
        let (x, weights, bias) = (node.inputs[0], node.inputs[1], node.inputs[2]);
        let out = node.outputs[0];
        if rewriter.shape(x).len() == 2 && !keep_num_dims {
            rewriter.keep(node);
            return Ok(None);
        }
        let cols = rewriter.shape(weights)[1];
        let rows = rewriter.graph.tensors[x].elements() / cols;
        let out_shape = rewriter.shape(out).to_vec();
        let flat = rewriter.reshape(x, &[rows, cols], "rows")?;
        let rank2 = Op::FullyConnected {
            activation,
            keep_num_dims: false,
        };
        if out_shape.len() == 2 {
            rewriter.emit_output(rank2, vec![flat, weights, bias])?;
        } else {
            let y = rewriter.emit(rank2, vec![flat, weights, bias], "flat")?;
            rewriter.reshape_output(y)?;
        }
        Ok(Some("fully-connected-rank"))
    }
}

/// The fused activation and `keep_num_dims`.
fn options(op: &Op) -> (Activation, bool) {
    match op {
        Op::FullyConnected {
            activation,
            keep_num_dims,
        } => (*activation, *keep_num_dims),
        _ => (Activation::None, false),
    }
}

fn read(reader: &mut OperatorReader) -> Result<Node> {
    let (activation, keep_num_dims) =
        match reader.operator.builtin_options_as_fully_connected_options() {
            Some(options) => {
                ensure!(
                    options.weights_format() == FullyConnectedOptionsWeightsFormat::DEFAULT,
                    "shuffled weight format is not supported"
                );
                ensure!(
                    !options.asymmetric_quantize_inputs(),
                    "asymmetric input quantisation is not supported"
                );
                (options.fused_activation_function(), options.keep_num_dims())
            }
            None => (ActivationFunctionType::NONE, false),
        };
    let op = Op::FullyConnected {
        activation: Activation::from_tflite(activation)?,
        keep_num_dims,
    };
    reader.node_with_optional_bias(op, |filter| filter.first().copied())
}
