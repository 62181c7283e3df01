//! The TFLite ops the model layer knows, one family to a file.
//!
//! A family owns everything about its ops: how an operator is read from a TFLite file
//! ([`OpFamily::register`]), written back ([`OpFamily::write_options`]), what shape its
//! output has ([`OpFamily::output_shape`]) and how normalisation rewrites it into what
//! tract-tflite 0.23 reads and computes correctly ([`OpFamily::normalise`]). Every other
//! hook has a default. Reading looks an operator's opcode up in the [`Registry`] the
//! families fill, and an opcode no family registers fails naming it; everything else finds
//! an op's family through [`Op::family`].
//!
//! Where an op lives: `ops/<name>.rs`, the TFLite name in lower case, except for the
//! families that share one file: `elementwise.rs` (every unary and binary arithmetic op,
//! LEAKY_RELU, PRELU), `conv.rs` (CONV_2D, DEPTHWISE_CONV_2D), `pool.rs` (MAX_POOL_2D,
//! AVERAGE_POOL_2D), `reduce.rs` (MEAN, SUM, REDUCE_MAX, REDUCE_MIN), `reshape.rs`
//! (RESHAPE, SQUEEZE, EXPAND_DIMS), `slice.rs` (SLICE, STRIDED_SLICE), `pad.rs` (PAD,
//! PADV2) and `resize.rs` (RESIZE_BILINEAR, RESIZE_NEAREST_NEIGHBOR).

mod batch_matmul;
mod concatenation;
mod conv;
mod densify;
mod depth_to_space;
mod dequantize;
mod elementwise;
mod fully_connected;
mod fused_activation;
mod local_response_norm;
mod pad;
mod pool;
mod reduce;
mod registry;
mod reshape;
mod resize;
mod slice;
mod softmax;
mod transpose;
mod window;

pub use conv::ConvParams;
pub use elementwise::{BinaryKind, UnaryKind};
pub use fused_activation::Activation;
pub use pool::PoolParams;
pub use reduce::ReduceKind;
pub use slice::StridedSliceParams;
pub use window::Padding;

pub(crate) use dequantize::dequantize;
pub(crate) use registry::{OperatorReader, OptionsWriter, Registry, WrittenOptions, registry};

use super::graph::{DType, Graph, Node, OpInputs};
use super::normalise::Rewriter;
use super::split::LayerKind;
use anyhow::Result;
use tract_tflite::tflite::BuiltinOperator;

/// One operator of a graph, with its options. The set is closed: an op is one tract runs
/// (after normalisation) or one normalisation removes.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// CONV_2D: input, filter `[out, kh, kw, in]`, bias.
    Conv2d(ConvParams),
    /// DEPTHWISE_CONV_2D: input, filter `[1, kh, kw, in·multiplier]`, bias.
    DepthwiseConv2d {
        /// Strides, dilations, padding and the fused activation.
        conv: ConvParams,
        /// Output channels per input channel.
        depth_multiplier: usize,
    },
    /// FULLY_CONNECTED: input, weights `[out, in]`, optional bias.
    FullyConnected {
        /// The fused activation.
        activation: Activation,
        /// Keep the input's leading dimensions instead of flattening them.
        keep_num_dims: bool,
    },
    /// BATCH_MATMUL of two inputs (the second a constant once split into layers).
    BatchMatMul {
        /// Transpose the first input's last two axes.
        adj_x: bool,
        /// Transpose the second input's last two axes.
        adj_y: bool,
    },
    /// MAX_POOL_2D.
    MaxPool2d(PoolParams),
    /// AVERAGE_POOL_2D (padding excluded from the average, as TFLite does).
    AvgPool2d(PoolParams),
    /// An elementwise op of two inputs with NumPy broadcasting (ADD, MUL, …).
    Binary {
        /// Which op.
        kind: BinaryKind,
        /// The fused activation (NONE for ops without the option).
        activation: Activation,
    },
    /// An elementwise op of one input (LOGISTIC, RELU, TANH, …).
    Unary(UnaryKind),
    /// LEAKY_RELU: `x` where positive, `alpha·x` elsewhere.
    LeakyRelu {
        /// The slope below zero.
        alpha: f32,
    },
    /// SOFTMAX over the last axis.
    Softmax {
        /// Inputs are scaled by it before the exponential.
        beta: f32,
    },
    /// CONCATENATION of every input along `axis`.
    Concatenation {
        /// The axis, made non-negative when read.
        axis: usize,
        /// The fused activation.
        activation: Activation,
    },
    /// Target shape is the second input, a constant (SQUEEZE and EXPAND_DIMS are read as this).
    Reshape,
    /// PAD with zeros; the paddings are the second input, a constant.
    Pad,
    /// PADV2: PAD with the value of the third input, a constant.
    PadV2,
    /// A reduction over the axes of the second input, a constant (MEAN, SUM, MAX, …).
    Reduce {
        /// Which reduction.
        kind: ReduceKind,
        /// Keep the reduced axes with size 1.
        keep_dims: bool,
    },
    /// RESIZE_BILINEAR to the size of the second input, a constant.
    ResizeBilinear {
        /// TFLite's option of that name (corner pixels map onto corner pixels).
        align_corners: bool,
        /// TFLite's option of that name (pixel centres at half-integers).
        half_pixel_centers: bool,
    },
    /// RESIZE_NEAREST_NEIGHBOR to the size of the second input, a constant.
    ResizeNearest {
        /// TFLite's option of that name (corner pixels map onto corner pixels).
        align_corners: bool,
        /// TFLite's option of that name (pixel centres at half-integers).
        half_pixel_centers: bool,
    },
    /// STRIDED_SLICE with constant begin, end and strides.
    StridedSlice(StridedSliceParams),
    /// SLICE with constant begin and size.
    Slice,
    /// TRANSPOSE by the permutation of the second input, a constant.
    Transpose,
    /// DEQUANTIZE of float16 weights: folded into f32 constants by normalisation
    /// (tract 0.23 cannot read this and the ops below; none of them reaches a layer file).
    Dequantize,
    /// DENSIFY of a sparse constant: folded into a dense constant by normalisation.
    Densify,
    /// PRELU: expanded by normalisation into ops tract runs.
    Prelu,
    /// DEPTH_TO_SPACE: rewritten by normalisation as reshapes and a transpose.
    DepthToSpace {
        /// The block size.
        block: usize,
    },
    /// LOCAL_RESPONSE_NORMALIZATION across channels: rewritten by normalisation.
    LocalResponseNorm {
        /// Channels on each side of the one normalised.
        radius: usize,
        /// Added to the scaled sum of squares.
        bias: f32,
        /// Scale of the sum of squares.
        alpha: f32,
        /// Exponent of the denominator.
        beta: f32,
    },
}

/// Every family, in the order their readers are registered.
const FAMILIES: &[&dyn OpFamily] = &[
    &conv::Conv,
    &fully_connected::FullyConnected,
    &batch_matmul::BatchMatMul,
    &pool::Pool,
    &elementwise::BinaryOps,
    &elementwise::UnaryOps,
    &elementwise::Prelu,
    &softmax::Softmax,
    &concatenation::Concatenation,
    &reshape::Reshape,
    &pad::Pad,
    &reduce::Reduce,
    &resize::Resize,
    &slice::Slice,
    &slice::StridedSlice,
    &transpose::Transpose,
    &dequantize::Dequantize,
    &densify::Densify,
    &depth_to_space::DepthToSpace,
    &local_response_norm::LocalResponseNorm,
];

impl Op {
    /// The family that knows how to read, write, shape and normalise this op, and the
    /// TFLite builtin operator it is written as.
    fn family_and_opcode(&self) -> (&'static dyn OpFamily, BuiltinOperator) {
        match self {
            Op::Conv2d(_) => (&conv::Conv, BuiltinOperator::CONV_2D),
            Op::DepthwiseConv2d { .. } => (&conv::Conv, BuiltinOperator::DEPTHWISE_CONV_2D),
            Op::FullyConnected { .. } => (
                &fully_connected::FullyConnected,
                BuiltinOperator::FULLY_CONNECTED,
            ),
            Op::BatchMatMul { .. } => (&batch_matmul::BatchMatMul, BuiltinOperator::BATCH_MATMUL),
            Op::MaxPool2d(_) => (&pool::Pool, BuiltinOperator::MAX_POOL_2D),
            Op::AvgPool2d(_) => (&pool::Pool, BuiltinOperator::AVERAGE_POOL_2D),
            Op::Binary { kind, .. } => (&elementwise::BinaryOps, kind.opcode()),
            Op::Unary(kind) => (&elementwise::UnaryOps, kind.opcode()),
            Op::LeakyRelu { .. } => (&elementwise::UnaryOps, BuiltinOperator::LEAKY_RELU),
            Op::Prelu => (&elementwise::Prelu, BuiltinOperator::PRELU),
            Op::Softmax { .. } => (&softmax::Softmax, BuiltinOperator::SOFTMAX),
            Op::Concatenation { .. } => (
                &concatenation::Concatenation,
                BuiltinOperator::CONCATENATION,
            ),
            Op::Reshape => (&reshape::Reshape, BuiltinOperator::RESHAPE),
            Op::Pad => (&pad::Pad, BuiltinOperator::PAD),
            Op::PadV2 => (&pad::Pad, BuiltinOperator::PADV2),
            Op::Reduce { kind, .. } => (&reduce::Reduce, kind.opcode()),
            Op::ResizeBilinear { .. } => (&resize::Resize, BuiltinOperator::RESIZE_BILINEAR),
            Op::ResizeNearest { .. } => (&resize::Resize, BuiltinOperator::RESIZE_NEAREST_NEIGHBOR),
            Op::Slice => (&slice::Slice, BuiltinOperator::SLICE),
            Op::StridedSlice(_) => (&slice::StridedSlice, BuiltinOperator::STRIDED_SLICE),
            Op::Transpose => (&transpose::Transpose, BuiltinOperator::TRANSPOSE),
            Op::Dequantize => (&dequantize::Dequantize, BuiltinOperator::DEQUANTIZE),
            Op::Densify => (&densify::Densify, BuiltinOperator::DENSIFY),
            Op::DepthToSpace { .. } => (
                &depth_to_space::DepthToSpace,
                BuiltinOperator::DEPTH_TO_SPACE,
            ),
            Op::LocalResponseNorm { .. } => (
                &local_response_norm::LocalResponseNorm,
                BuiltinOperator::LOCAL_RESPONSE_NORMALIZATION,
            ),
        }
    }

    /// The family that knows how to read, write, shape and normalise this op.
    pub(crate) fn family(&self) -> &'static dyn OpFamily {
        self.family_and_opcode().0
    }

    /// The TFLite builtin operator this op is written as.
    pub(crate) fn opcode(&self) -> BuiltinOperator {
        self.family_and_opcode().1
    }

    /// TFLite's name for the op, as users see it in converters and error messages.
    pub fn name(&self) -> &'static str {
        self.opcode().variant_name().unwrap_or("unnamed builtin op")
    }
}

/// What the model layer knows about a family of TFLite ops. The first three methods are
/// required; the others default to what most ops need.
pub(crate) trait OpFamily: Sync {
    /// Adds a reader for each opcode the family reads.
    fn register(&self, registry: &mut Registry);

    /// The shape of the op's one output, checking that its inputs make sense.
    fn output_shape(&self, op: &Op, inputs: &OpInputs) -> Result<Vec<usize>>;

    /// The op's builtin options, as the TFLite schema lays them out.
    fn write_options(&self, op: &Op, writer: &mut OptionsWriter) -> Result<WrittenOptions>;

    /// The element type of the output, given the first input's.
    fn output_dtype(&self, _op: &Op, first_input: DType) -> DType {
        first_input
    }

    /// Floating-point operations of one node (a multiply-add counts as two).
    fn flops(&self, graph: &Graph, node: &Node) -> u64 {
        output_elements(graph, node)
    }

    /// The op's fused activation, for the ops that carry one.
    fn fused_activation<'op>(&self, _op: &'op mut Op) -> Option<&'op mut Activation> {
        None
    }

    /// Whether every input after the first is an integer argument (a shape, axes,
    /// paddings) rather than data: such inputs need not be float.
    fn takes_integer_arguments(&self) -> bool {
        false
    }

    /// The kind of layer the node starts when it carries the layer's weights.
    fn weighted_layer(&self, _graph: &Graph, _node: &Node) -> Option<LayerKind> {
        None
    }

    /// Replaces a node that only decodes a constant by the decoded constant; returns the
    /// name of the rewrite, or `None` to keep the node.
    fn fold_constant(&self, _graph: &mut Graph, _node: &Node) -> Result<Option<&'static str>> {
        Ok(None)
    }

    /// Emits what replaces `node` in a graph tract-tflite 0.23 runs correctly; returns the
    /// name of the rewrite, or `None` when the op stays as it is.
    fn normalise(&self, node: Node, rewriter: &mut Rewriter) -> Result<Option<&'static str>> {
        rewriter.keep(node);
        Ok(None)
    }

    /// Why the op, as it stands, is not one normalisation leaves behind (`None`: it is).
    fn unrunnable(&self, _op: &Op) -> Option<String> {
        None
    }
}

/// Elements written by a node: the flop count of ops that compute each output once.
pub(crate) fn output_elements(graph: &Graph, node: &Node) -> u64 {
    node.outputs
        .iter()
        .map(|&o| graph.tensors[o].elements() as u64)
        .sum()
}

/// The error of a family handed an op of another family. [`Op::family`] routes each op to
/// its own, so this reports a bug, never bad input.
fn misrouted(family: &str, op: &Op) -> anyhow::Error {
    anyhow::anyhow!("{} was handed to the {family} family", op.name())
}

/// [`OpFamily::unrunnable`] of the ops normalisation always removes.
fn survived_normalisation() -> Option<String> {
    Some("survived normalisation".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::graph::{Sparsity, Tensor, TensorId};
    use crate::model::tflite::{WriteOptions, read_graph, write_graph};
    use tract_tflite::tflite;

    /// Builds a graph around one NHWC input; each op added becomes an output.
    struct EveryOp {
        graph: Graph,
        x: TensorId,
    }

    impl EveryOp {
        fn new() -> EveryOp {
            let mut graph = Graph::default();
            let x = graph.add_tensor(Tensor::activation("x", vec![1, 4, 4, 4], DType::F32));
            graph.inputs = vec![x];
            EveryOp { graph, x }
        }

        fn floats(&mut self, shape: &[usize]) -> TensorId {
            let name = self.graph.fresh_name("f");
            let n = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|i| i as f32 / n as f32).collect();
            let constant = Tensor::f32_constant(name, shape.to_vec(), &values);
            self.graph.add_tensor(constant)
        }

        fn ints(&mut self, values: &[i32]) -> TensorId {
            let name = self.graph.fresh_name("i");
            self.graph.add_tensor(Tensor::i32_constant(name, values))
        }

        fn add(&mut self, op: Op, inputs: Vec<TensorId>) {
            let out = self.graph.add_node(op, inputs, &["y"]).unwrap()[0];
            self.graph.outputs.push(out);
        }
    }

    /// One of each op, with options other than the defaults where there are any.
    fn every_op() -> Graph {
        let mut g = EveryOp::new();
        add_compute_ops(&mut g);
        add_layout_ops(&mut g);
        g.graph
    }

    /// The weighted ops, pooling and elementwise arithmetic.
    fn add_compute_ops(g: &mut EveryOp) {
        let x = g.x;
        let conv = ConvParams {
            padding: Padding::Same,
            stride: [1, 2],
            dilation: [2, 1],
            activation: Activation::Relu6,
        };
        let (w, b) = (g.floats(&[4, 3, 3, 4]), g.floats(&[4]));
        g.add(Op::Conv2d(conv), vec![x, w, b]);
        let depthwise = Op::DepthwiseConv2d {
            conv,
            depth_multiplier: 2,
        };
        let (w, b) = (g.floats(&[1, 3, 3, 8]), g.floats(&[8]));
        g.add(depthwise, vec![x, w, b]);
        let fully_connected = Op::FullyConnected {
            activation: Activation::Relu,
            keep_num_dims: true,
        };
        let (w, b) = (g.floats(&[2, 4]), g.floats(&[2]));
        g.add(fully_connected, vec![x, w, b]);
        let y = g.floats(&[1, 4, 4, 4]);
        let matmul = Op::BatchMatMul {
            adj_x: true,
            adj_y: false,
        };
        g.add(matmul, vec![x, y]);
        let pool = PoolParams {
            padding: Padding::Valid,
            stride: [2, 1],
            filter: [2, 3],
            activation: Activation::Relu,
        };
        g.add(Op::MaxPool2d(pool), vec![x]);
        g.add(Op::AvgPool2d(pool), vec![x]);
        for kind in BinaryKind::ALL {
            g.add(kind.op(), vec![x, y]);
        }
        let add_relu = Op::Binary {
            kind: BinaryKind::Add,
            activation: Activation::Relu,
        };
        g.add(add_relu, vec![x, y]);
        for &kind in UnaryKind::ALL {
            g.add(Op::Unary(kind), vec![x]);
        }
        g.add(Op::LeakyRelu { alpha: 0.125 }, vec![x]);
        let alpha = g.floats(&[4]);
        g.add(Op::Prelu, vec![x, alpha]);
        g.add(Op::Softmax { beta: 0.5 }, vec![x]);
    }

    /// Shapes, reductions, resizing, slicing and the ops normalisation removes.
    fn add_layout_ops(g: &mut EveryOp) {
        let x = g.x;
        let concatenation = Op::Concatenation {
            axis: 2,
            activation: Activation::None,
        };
        g.add(concatenation, vec![x, x]);
        let shape = g.ints(&[1, 16, 4]);
        g.add(Op::Reshape, vec![x, shape]);
        let pads = g.ints(&[0, 0, 1, 2, 0, 1, 0, 0]);
        g.add(Op::Pad, vec![x, pads]);
        let value = g.floats(&[1]);
        g.add(Op::PadV2, vec![x, pads, value]);
        let axes = g.ints(&[1, 2]);
        for kind in ReduceKind::ALL {
            g.add(
                Op::Reduce {
                    kind,
                    keep_dims: kind == ReduceKind::Sum,
                },
                vec![x, axes],
            );
        }
        let size = g.ints(&[8, 6]);
        let resize = Op::ResizeBilinear {
            align_corners: true,
            half_pixel_centers: false,
        };
        g.add(resize, vec![x, size]);
        let resize = Op::ResizeNearest {
            align_corners: false,
            half_pixel_centers: true,
        };
        g.add(resize, vec![x, size]);
        let (begin, end, strides) = (
            g.ints(&[0, 0, 1, 0]),
            g.ints(&[1, 4, 4, 3]),
            g.ints(&[1, 2, 1, 1]),
        );
        let strided = Op::StridedSlice(StridedSliceParams {
            begin_mask: 0b1000,
            end_mask: 0b0010,
            shrink_axis_mask: 0b0001,
        });
        g.add(strided, vec![x, begin, end, strides]);
        let (begin, size) = (g.ints(&[0, 1, 0, 2]), g.ints(&[1, 2, -1, 2]));
        g.add(Op::Slice, vec![x, begin, size]);
        let permutation = g.ints(&[0, 3, 1, 2]);
        g.add(Op::Transpose, vec![x, permutation]);
        g.add(Op::DepthToSpace { block: 2 }, vec![x]);
        let lrn = Op::LocalResponseNorm {
            radius: 2,
            bias: 1.5,
            alpha: 0.25,
            beta: 0.75,
        };
        g.add(lrn, vec![x]);
        let half = g.graph.add_tensor(Tensor::constant(
            "half",
            vec![2],
            DType::F16,
            vec![0x00, 0x38, 0x00, 0xbc],
        ));
        g.add(Op::Dequantize, vec![half]);
        let mut sparse = Tensor::f32_constant("sparse", vec![3], &[1.0, 2.0, 3.0]);
        sparse.sparsity = Some(Sparsity {
            traversal_order: vec![0],
            block_map: vec![],
            dim_metadata: vec![crate::model::graph::DimMeta::Dense { size: 3 }],
        });
        let sparse = g.graph.add_tensor(sparse);
        g.add(Op::Densify, vec![sparse]);
    }

    #[test]
    fn every_op_reads_back_as_itself() {
        let graph = every_op();
        graph.check_shapes().unwrap();
        let read = read_graph(&write_graph(&graph, WriteOptions::default()).unwrap()).unwrap();
        read.check_shapes().unwrap();
        assert_eq!(read.nodes.len(), graph.nodes.len());
        for (ix, (got, want)) in read.nodes.iter().zip(&graph.nodes).enumerate() {
            assert_eq!(got.op, want.op, "operator #{ix}");
            assert_eq!(
                read.tensors[got.outputs[0]].shape,
                graph.tensors[want.outputs[0]].shape,
                "operator #{ix} ({})",
                want.op.name()
            );
        }
    }

    #[test]
    fn op_names_are_tflite_names() {
        let names: Vec<&str> = every_op().nodes.iter().map(|n| n.op.name()).collect();
        for name in [
            "CONV_2D",
            "RESIZE_NEAREST_NEIGHBOR",
            "LOCAL_RESPONSE_NORMALIZATION",
        ] {
            assert!(names.contains(&name), "{name} in {names:?}");
        }
        assert!(names.iter().all(|n| !n.contains("unnamed")), "{names:?}");
    }

    #[test]
    fn an_opcode_no_family_reads_fails_naming_it() {
        let mut graph = every_op();
        graph.nodes.truncate(1);
        graph.outputs = graph.nodes[0].outputs.clone();
        let mut bytes = write_graph(&graph, WriteOptions::default()).unwrap();
        // CONV_2D (3) becomes CUMSUM (128), which no family reads.
        let model = tflite::root_as_model(&bytes).unwrap();
        let code = model.operator_codes().unwrap().get(0);
        assert_eq!(code.builtin_code(), BuiltinOperator::CONV_2D);
        let field = code
            ._tab
            .vtable()
            .get(tflite::OperatorCode::VT_BUILTIN_CODE) as usize;
        let at = code._tab.loc() + field;
        bytes[at..at + 4].copy_from_slice(&BuiltinOperator::CUMSUM.0.to_le_bytes());
        let err = read_graph(&bytes).unwrap_err().to_string();
        assert!(err.contains("operator #0 (CUMSUM): not supported"), "{err}");
    }
}
