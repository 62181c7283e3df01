//! CONV_2D and DEPTHWISE_CONV_2D: the weighted ops most layers are built around.

use super::window::{conv_out, positive};
use super::{
    Activation, Op, OpFamily, OperatorReader, OptionsWriter, Padding, Registry, WrittenOptions,
    misrouted,
};
use crate::model::graph::{Graph, Node, OpInputs};
use crate::model::split::LayerKind;
use anyhow::{Result, ensure};
use tract_tflite::tflite::{self, BuiltinOperator, BuiltinOptions};

/// Options shared by CONV_2D and DEPTHWISE_CONV_2D.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConvParams {
    /// SAME or VALID.
    pub padding: Padding,
    /// Strides along height and width.
    pub stride: [usize; 2],
    /// Dilations along height and width.
    pub dilation: [usize; 2],
    /// The fused activation.
    pub activation: Activation,
}

/// [`ConvParams`] from the options of either convolution: two generated types with the
/// same fields.
macro_rules! conv_params {
    ($options:expr) => {{
        let options = $options;
        let positive_or_one = |v: i32, what| positive(v.max(1), what);
        ConvParams {
            padding: Padding::from_tflite(options.padding())?,
            stride: [
                positive(options.stride_h(), "stride")?,
                positive(options.stride_w(), "stride")?,
            ],
            dilation: [
                positive_or_one(options.dilation_h_factor(), "dilation")?,
                positive_or_one(options.dilation_w_factor(), "dilation")?,
            ],
            activation: Activation::from_tflite(options.fused_activation_function())?,
        }
    }};
}

/// The options of either convolution (`$args`, a generated type) from [`ConvParams`], and
/// any fields only one of them has.
macro_rules! conv_options {
    ($args:ident, $params:expr $(, $field:ident: $value:expr)*) => {{
        let params: &ConvParams = $params;
        tflite::$args {
            padding: params.padding.to_tflite(),
            stride_w: params.stride[1] as i32,
            stride_h: params.stride[0] as i32,
            fused_activation_function: params.activation.to_tflite(),
            dilation_w_factor: params.dilation[1] as i32,
            dilation_h_factor: params.dilation[0] as i32,
            $($field: $value,)*
        }
    }};
}

pub(super) struct Conv;

impl OpFamily for Conv {
    fn register(&self, registry: &mut Registry) {
        registry.add(BuiltinOperator::CONV_2D, read_conv2d);
        registry.add(BuiltinOperator::DEPTHWISE_CONV_2D, read_depthwise_conv2d);
    }

    fn output_shape(&self, op: &Op, inputs: &OpInputs) -> Result<Vec<usize>> {
        match op {
            Op::Conv2d(params) => conv2d_shape(params, inputs),
            Op::DepthwiseConv2d {
                conv,
                depth_multiplier,
            } => depthwise_shape(conv, *depth_multiplier, inputs),
            other => Err(misrouted("conv", other)),
        }
    }

    fn write_options(&self, op: &Op, writer: &mut OptionsWriter) -> Result<WrittenOptions> {
        Ok(match op {
            Op::Conv2d(params) => {
                let args = conv_options!(Conv2DOptionsArgs, params);
                let options = tflite::Conv2DOptions::create(writer.builder, &args);
                WrittenOptions::table(BuiltinOptions::Conv2DOptions, options)
            }
            Op::DepthwiseConv2d {
                conv,
                depth_multiplier,
            } => {
                let multiplier = *depth_multiplier as i32;
                let args =
                    conv_options!(DepthwiseConv2DOptionsArgs, conv, depth_multiplier: multiplier);
                let options = tflite::DepthwiseConv2DOptions::create(writer.builder, &args);
                WrittenOptions::table(BuiltinOptions::DepthwiseConv2DOptions, options)
            }
            other => return Err(misrouted("conv", other)),
        })
    }

    fn flops(&self, graph: &Graph, node: &Node) -> u64 {
        let out = super::output_elements(graph, node);
        let filter = &graph.tensors[node.inputs[1]].shape;
        let per_output = match node.op {
            Op::Conv2d(_) => filter[1] * filter[2] * filter[3],
            _ => filter[1] * filter[2],
        };
        2 * out * per_output as u64
    }

    fn fused_activation<'op>(&self, op: &'op mut Op) -> Option<&'op mut Activation> {
        match op {
            Op::Conv2d(c) | Op::DepthwiseConv2d { conv: c, .. } => Some(&mut c.activation),
            _ => None,
        }
    }

    fn weighted_layer(&self, _graph: &Graph, node: &Node) -> Option<LayerKind> {
        match node.op {
            Op::Conv2d(_) => Some(LayerKind::Conv),
            _ => Some(LayerKind::DwConv),
        }
    }
}

/// OHWI filters: the output channels are the first extent.
fn first_extent(filter: &[usize]) -> Option<usize> {
    filter.first().copied()
}

/// 1HWC filters: the output channels are the last extent.
fn last_extent(filter: &[usize]) -> Option<usize> {
    filter.last().copied()
}

fn read_conv2d(reader: &mut OperatorReader) -> Result<Node> {
    let params =
        conv_params!(reader.options(tflite::Operator::builtin_options_as_conv_2_doptions)?);
    reader.node_with_optional_bias(Op::Conv2d(params), first_extent)
}

fn read_depthwise_conv2d(reader: &mut OperatorReader) -> Result<Node> {
    let options = reader.options(tflite::Operator::builtin_options_as_depthwise_conv_2_doptions)?;
    let conv = conv_params!(options);
    // Some converters leave the multiplier at 0 and let the filter shape speak.
    let multiplier = options.depth_multiplier().max(0) as usize;
    let (Some(input), Some(filter)) = (reader.input_shape(0), reader.input_shape(1)) else {
        anyhow::bail!("missing input or filter");
    };
    let (cin, cout) = (
        input.last().copied().unwrap_or(0),
        filter.last().copied().unwrap_or(0),
    );
    ensure!(
        cin > 0 && cout % cin == 0,
        "filter has {cout} channels for {cin} input channels"
    );
    ensure!(
        multiplier == 0 || multiplier == cout / cin,
        "depth_multiplier {multiplier} disagrees with {cout} filter channels over {cin} input channels"
    );
    let op = Op::DepthwiseConv2d {
        conv,
        depth_multiplier: cout / cin,
    };
    reader.node_with_optional_bias(op, last_extent)
}

fn conv2d_shape(params: &ConvParams, inputs: &OpInputs) -> Result<Vec<usize>> {
    inputs.arity(3..=3)?;
    let [n, h, w, c] = inputs.rank4(0)?;
    let k = inputs.shape(1);
    ensure!(k.len() == 4, "CONV_2D filter must be OHWI, got {:?}", k);
    ensure!(
        k[3] == c,
        "CONV_2D filter has {} input channels, input has {}",
        k[3],
        c
    );
    inputs.check_bias(2, k[0])?;
    let (oh, ow) = conv_out(
        h,
        w,
        [k[1], k[2]],
        params.stride,
        params.dilation,
        params.padding,
    )?;
    Ok(vec![n, oh, ow, k[0]])
}

fn depthwise_shape(
    conv: &ConvParams,
    depth_multiplier: usize,
    inputs: &OpInputs,
) -> Result<Vec<usize>> {
    inputs.arity(3..=3)?;
    let [n, h, w, c] = inputs.rank4(0)?;
    let k = inputs.shape(1);
    ensure!(
        k.len() == 4 && k[0] == 1,
        "DEPTHWISE_CONV_2D filter must be 1HWC, got {:?}",
        k
    );
    ensure!(
        k[3] == c * depth_multiplier,
        "DEPTHWISE_CONV_2D filter has {} channels, input {} × multiplier {}",
        k[3],
        c,
        depth_multiplier
    );
    inputs.check_bias(2, k[3])?;
    let (oh, ow) = conv_out(h, w, [k[1], k[2]], conv.stride, conv.dilation, conv.padding)?;
    Ok(vec![n, oh, ow, k[3]])
}
