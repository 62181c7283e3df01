//! MAX_POOL_2D and AVERAGE_POOL_2D.

use super::window::{conv_out, positive};
use super::{
    Activation, Op, OpFamily, OperatorReader, OptionsWriter, Padding, Registry, WrittenOptions,
    misrouted,
};
use crate::model::graph::{Graph, Node, OpInputs};
use anyhow::Result;
use tract_tflite::tflite::{self, BuiltinOperator, BuiltinOptions};

/// Options of MAX_POOL_2D and AVERAGE_POOL_2D.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PoolParams {
    /// SAME or VALID.
    pub padding: Padding,
    /// Strides along height and width.
    pub stride: [usize; 2],
    /// Window height and width.
    pub filter: [usize; 2],
    /// The fused activation.
    pub activation: Activation,
}

pub(super) struct Pool;

impl OpFamily for Pool {
    fn register(&self, registry: &mut Registry) {
        registry.add(BuiltinOperator::MAX_POOL_2D, |reader| {
            let params = read_params(reader)?;
            reader.node(Op::MaxPool2d(params))
        });
        registry.add(BuiltinOperator::AVERAGE_POOL_2D, |reader| {
            let params = read_params(reader)?;
            reader.node(Op::AvgPool2d(params))
        });
    }

    fn output_shape(&self, op: &Op, inputs: &OpInputs) -> Result<Vec<usize>> {
        let params = params(op)?;
        inputs.arity(1..=1)?;
        let [n, h, w, c] = inputs.rank4(0)?;
        let (oh, ow) = conv_out(h, w, params.filter, params.stride, [1, 1], params.padding)?;
        Ok(vec![n, oh, ow, c])
    }

    fn write_options(&self, op: &Op, writer: &mut OptionsWriter) -> Result<WrittenOptions> {
        let params = params(op)?;
        let options = tflite::Pool2DOptions::create(
            writer.builder,
            &tflite::Pool2DOptionsArgs {
                padding: params.padding.to_tflite(),
                stride_w: params.stride[1] as i32,
                stride_h: params.stride[0] as i32,
                filter_width: params.filter[1] as i32,
                filter_height: params.filter[0] as i32,
                fused_activation_function: params.activation.to_tflite(),
            },
        );
        Ok(WrittenOptions::table(
            BuiltinOptions::Pool2DOptions,
            options,
        ))
    }

    fn flops(&self, graph: &Graph, node: &Node) -> u64 {
        let window = params(&node.op).map_or(1, |p| p.filter[0] * p.filter[1]);
        super::output_elements(graph, node) * window as u64
    }

    fn fused_activation<'op>(&self, op: &'op mut Op) -> Option<&'op mut Activation> {
        match op {
            Op::MaxPool2d(p) | Op::AvgPool2d(p) => Some(&mut p.activation),
            _ => None,
        }
    }
}

fn params(op: &Op) -> Result<&PoolParams> {
    match op {
        Op::MaxPool2d(p) | Op::AvgPool2d(p) => Ok(p),
        other => Err(misrouted("pool", other)),
    }
}

fn read_params(reader: &OperatorReader) -> Result<PoolParams> {
    let options = reader.options(tflite::Operator::builtin_options_as_pool_2_doptions)?;
    Ok(PoolParams {
        padding: Padding::from_tflite(options.padding())?,
        stride: [
            positive(options.stride_h(), "stride")?,
            positive(options.stride_w(), "stride")?,
        ],
        filter: [
            positive(options.filter_height(), "filter")?,
            positive(options.filter_width(), "filter")?,
        ],
        activation: Activation::from_tflite(options.fused_activation_function())?,
    })
}
