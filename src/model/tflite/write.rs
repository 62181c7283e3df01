//! [`Graph`] → TFLite flatbuffer bytes.

use super::super::graph::*;
use anyhow::{Result, bail};
use flatbuffers::{FlatBufferBuilder, UnionWIPOffset, WIPOffset};
use tract_tflite::tflite;
use tract_tflite::tflite::{
    ActivationFunctionType as Act, BuiltinOperator as B, BuiltinOptions as O,
};

/// How to lay the file out. The default is what every TFLite reader understands; the other
/// layouts exist in published files, and tests build them to exercise the importer.
#[derive(Clone, Copy, Debug, Default)]
pub struct WriteOptions {
    /// Op codes only in `deprecated_builtin_code`, as files written before TF 2.4.
    pub legacy_opcodes: bool,
    /// Constants appended after the flatbuffer and referenced by `Buffer.offset/size`, as
    /// the converter does for models over 2 GiB.
    pub external_buffers: bool,
}

pub fn write_graph(graph: &Graph, options: WriteOptions) -> Result<Vec<u8>> {
    if !options.external_buffers {
        return build(graph, options, None).map(|(bytes, _)| bytes);
    }
    // Offsets are absolute file positions, known only once the flatbuffer's size is; the
    // size does not depend on their values, so a first pass with zeros measures it.
    let (probe, _) = build(graph, options, Some(0))?;
    let base = probe.len().next_multiple_of(16) as u64;
    let (mut bytes, blobs) = build(graph, options, Some(base))?;
    debug_assert_eq!(bytes.len(), probe.len());
    bytes.resize(base as usize, 0);
    for blob in blobs {
        bytes.resize(bytes.len().next_multiple_of(16), 0);
        bytes.extend_from_slice(&blob);
    }
    Ok(bytes)
}

/// One pass over the graph. With `external_base`, constants go after the flatbuffer starting
/// at that offset and are returned in file order.
/// A flatbuffer and the constants that follow it in the file.
type Built = (Vec<u8>, Vec<bytes::Bytes>);

fn build(graph: &Graph, options: WriteOptions, external_base: Option<u64>) -> Result<Built> {
    let weight_bytes: usize = graph
        .tensors
        .iter()
        .filter_map(|t| t.data.as_ref().map(|d| d.len()))
        .sum();
    let capacity = if external_base.is_some() {
        1 << 16
    } else {
        weight_bytes + (1 << 16)
    };
    let mut fb = FlatBufferBuilder::with_capacity(capacity.min(1 << 31));
    let mut buffers = vec![tflite::Buffer::create(
        &mut fb,
        &tflite::BufferArgs { data: None },
    )];
    let mut blobs = vec![];
    let mut next_offset = external_base.unwrap_or(0);
    let mut tensors = vec![];
    for t in &graph.tensors {
        let buffer = match &t.data {
            None => 0,
            Some(data) => {
                let b = match external_base {
                    None => {
                        let v = fb.create_vector(data);
                        tflite::Buffer::create(&mut fb, &tflite::BufferArgs { data: Some(v) })
                    }
                    Some(_) => {
                        next_offset = next_offset.next_multiple_of(16);
                        let start = fb.start_table();
                        fb.push_slot_always::<u64>(6, next_offset);
                        fb.push_slot_always::<u64>(8, data.len() as u64);
                        next_offset += data.len() as u64;
                        blobs.push(data.clone());
                        WIPOffset::new(fb.end_table(start).value())
                    }
                };
                buffers.push(b);
                (buffers.len() - 1) as u32
            }
        };
        let shape: Vec<i32> = t.shape.iter().map(|&d| d as i32).collect();
        let shape = fb.create_vector(&shape);
        let name = fb.create_string(&t.name);
        let quantization = t.quant.as_ref().map(|q| {
            let scale = fb.create_vector(&q.scale);
            let zero_point = fb.create_vector(&q.zero_point);
            tflite::QuantizationParameters::create(
                &mut fb,
                &tflite::QuantizationParametersArgs {
                    scale: Some(scale),
                    zero_point: Some(zero_point),
                    quantized_dimension: q.axis as i32,
                    ..Default::default()
                },
            )
        });
        let sparsity = t.sparsity.as_ref().map(|s| write_sparsity(&mut fb, s));
        tensors.push(tflite::Tensor::create(
            &mut fb,
            &tflite::TensorArgs {
                shape: Some(shape),
                type_: tensor_type(t.dtype),
                buffer,
                name: Some(name),
                quantization,
                sparsity,
                has_rank: true,
                ..Default::default()
            },
        ));
    }

    let mut codes: Vec<B> = vec![];
    let mut operators = vec![];
    for node in &graph.nodes {
        let (code, options_type, opts) = write_op(&mut fb, graph, node)?;
        let opcode_index = match codes.iter().position(|c| *c == code) {
            Some(i) => i,
            None => {
                codes.push(code);
                codes.len() - 1
            }
        } as u32;
        let ids = |v: &[TensorId]| v.iter().map(|&i| i as i32).collect::<Vec<i32>>();
        let inputs = fb.create_vector(&ids(&node.inputs));
        let outputs = fb.create_vector(&ids(&node.outputs));
        operators.push(tflite::Operator::create(
            &mut fb,
            &tflite::OperatorArgs {
                opcode_index,
                inputs: Some(inputs),
                outputs: Some(outputs),
                builtin_options_type: options_type,
                builtin_options: opts,
                ..Default::default()
            },
        ));
    }
    let ids = |v: &[TensorId]| v.iter().map(|&i| i as i32).collect::<Vec<i32>>();
    let tensors = fb.create_vector(&tensors);
    let operators = fb.create_vector(&operators);
    let inputs = fb.create_vector(&ids(&graph.inputs));
    let outputs = fb.create_vector(&ids(&graph.outputs));
    let name = fb.create_string("main");
    let subgraph = tflite::SubGraph::create(
        &mut fb,
        &tflite::SubGraphArgs {
            tensors: Some(tensors),
            inputs: Some(inputs),
            outputs: Some(outputs),
            operators: Some(operators),
            name: Some(name),
        },
    );
    let subgraphs = fb.create_vector(&[subgraph]);
    let codes: Vec<_> = codes
        .iter()
        .map(|&code| {
            let (deprecated, builtin) = match (code.0 < 127, options.legacy_opcodes) {
                (true, true) => (code.0 as i8, B(0)),
                (true, false) => (code.0 as i8, code),
                (false, _) => (127, code),
            };
            tflite::OperatorCode::create(
                &mut fb,
                &tflite::OperatorCodeArgs {
                    deprecated_builtin_code: deprecated,
                    custom_code: None,
                    version: 1,
                    builtin_code: builtin,
                },
            )
        })
        .collect();
    let codes = fb.create_vector(&codes);
    let buffers = fb.create_vector(&buffers);
    let description = fb.create_string("memaflow");
    let model = tflite::Model::create(
        &mut fb,
        &tflite::ModelArgs {
            version: 3,
            operator_codes: Some(codes),
            subgraphs: Some(subgraphs),
            description: Some(description),
            buffers: Some(buffers),
            ..Default::default()
        },
    );
    fb.finish(model, Some("TFL3"));
    let (vec, head) = fb.collapse();
    // The builder fills its buffer from the back: move the model to the front in place
    // rather than copying it (a layer file can be hundreds of MiB).
    let mut bytes = vec;
    bytes.drain(..head);
    Ok((bytes, blobs))
}

fn tensor_type(dt: DType) -> tflite::TensorType {
    match dt {
        DType::F32 => tflite::TensorType::FLOAT32,
        DType::F16 => tflite::TensorType::FLOAT16,
        DType::I32 => tflite::TensorType::INT32,
        DType::I64 => tflite::TensorType::INT64,
        DType::I16 => tflite::TensorType::INT16,
        DType::I8 => tflite::TensorType::INT8,
        DType::U8 => tflite::TensorType::UINT8,
        DType::Bool => tflite::TensorType::BOOL,
    }
}

fn write_sparsity<'a>(
    fb: &mut FlatBufferBuilder<'a>,
    s: &Sparsity,
) -> WIPOffset<tflite::SparsityParameters<'a>> {
    let as_i32 = |v: &[usize]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
    let mut dims = vec![];
    for d in &s.dim_metadata {
        dims.push(match d {
            DimMeta::Dense { size } => tflite::DimensionMetadata::create(
                fb,
                &tflite::DimensionMetadataArgs {
                    format: tflite::DimensionType::DENSE,
                    dense_size: *size as i32,
                    ..Default::default()
                },
            ),
            DimMeta::Csr { segments, indices } => {
                let seg = fb.create_vector(&as_i32(segments));
                let seg =
                    tflite::Int32Vector::create(fb, &tflite::Int32VectorArgs { values: Some(seg) });
                let ind = fb.create_vector(&as_i32(indices));
                let ind =
                    tflite::Int32Vector::create(fb, &tflite::Int32VectorArgs { values: Some(ind) });
                tflite::DimensionMetadata::create(
                    fb,
                    &tflite::DimensionMetadataArgs {
                        format: tflite::DimensionType::SPARSE_CSR,
                        dense_size: 0,
                        array_segments_type: tflite::SparseIndexVector::Int32Vector,
                        array_segments: Some(seg.as_union_value()),
                        array_indices_type: tflite::SparseIndexVector::Int32Vector,
                        array_indices: Some(ind.as_union_value()),
                    },
                )
            }
        });
    }
    let traversal_order = fb.create_vector(&as_i32(&s.traversal_order));
    let block_map = fb.create_vector(&as_i32(&s.block_map));
    let dim_metadata = fb.create_vector(&dims);
    tflite::SparsityParameters::create(
        fb,
        &tflite::SparsityParametersArgs {
            traversal_order: Some(traversal_order),
            block_map: Some(block_map),
            dim_metadata: Some(dim_metadata),
        },
    )
}

fn act(a: Activation) -> Act {
    match a {
        Activation::None => Act::NONE,
        Activation::Relu => Act::RELU,
        Activation::Relu6 => Act::RELU6,
        Activation::ReluN1To1 => Act::RELU_N1_TO_1,
        Activation::Tanh => Act::TANH,
    }
}

fn pad(p: Padding) -> tflite::Padding {
    match p {
        Padding::Same => tflite::Padding::SAME,
        Padding::Valid => tflite::Padding::VALID,
    }
}

type OpOut = (B, O, Option<WIPOffset<UnionWIPOffset>>);

fn u<T>(o: WIPOffset<T>) -> Option<WIPOffset<UnionWIPOffset>> {
    Some(o.as_union_value())
}

fn write_op(fb: &mut FlatBufferBuilder, graph: &Graph, node: &Node) -> Result<OpOut> {
    fn pool<'a>(
        fb: &mut FlatBufferBuilder<'a>,
        p: &PoolParams,
    ) -> WIPOffset<tflite::Pool2DOptions<'a>> {
        tflite::Pool2DOptions::create(
            fb,
            &tflite::Pool2DOptionsArgs {
                padding: pad(p.padding),
                stride_w: p.stride[1] as i32,
                stride_h: p.stride[0] as i32,
                filter_width: p.filter[1] as i32,
                filter_height: p.filter[0] as i32,
                fused_activation_function: act(p.activation),
            },
        )
    }
    Ok(match &node.op {
        Op::Conv2d(c) => {
            let o = tflite::Conv2DOptions::create(
                fb,
                &tflite::Conv2DOptionsArgs {
                    padding: pad(c.padding),
                    stride_w: c.stride[1] as i32,
                    stride_h: c.stride[0] as i32,
                    fused_activation_function: act(c.activation),
                    dilation_w_factor: c.dilation[1] as i32,
                    dilation_h_factor: c.dilation[0] as i32,
                },
            );
            (B::CONV_2D, O::Conv2DOptions, u(o))
        }
        Op::DepthwiseConv2d {
            conv: c,
            depth_multiplier,
        } => {
            let o = tflite::DepthwiseConv2DOptions::create(
                fb,
                &tflite::DepthwiseConv2DOptionsArgs {
                    padding: pad(c.padding),
                    stride_w: c.stride[1] as i32,
                    stride_h: c.stride[0] as i32,
                    depth_multiplier: *depth_multiplier as i32,
                    fused_activation_function: act(c.activation),
                    dilation_w_factor: c.dilation[1] as i32,
                    dilation_h_factor: c.dilation[0] as i32,
                },
            );
            (B::DEPTHWISE_CONV_2D, O::DepthwiseConv2DOptions, u(o))
        }
        Op::FullyConnected {
            activation,
            keep_num_dims,
        } => {
            let o = tflite::FullyConnectedOptions::create(
                fb,
                &tflite::FullyConnectedOptionsArgs {
                    fused_activation_function: act(*activation),
                    keep_num_dims: *keep_num_dims,
                    ..Default::default()
                },
            );
            (B::FULLY_CONNECTED, O::FullyConnectedOptions, u(o))
        }
        Op::BatchMatMul { adj_x, adj_y } => {
            let o = tflite::BatchMatMulOptions::create(
                fb,
                &tflite::BatchMatMulOptionsArgs {
                    adj_x: *adj_x,
                    adj_y: *adj_y,
                    asymmetric_quantize_inputs: false,
                },
            );
            (B::BATCH_MATMUL, O::BatchMatMulOptions, u(o))
        }
        Op::MaxPool2d(p) => (B::MAX_POOL_2D, O::Pool2DOptions, u(pool(fb, p))),
        Op::AvgPool2d(p) => (B::AVERAGE_POOL_2D, O::Pool2DOptions, u(pool(fb, p))),
        Op::Binary { kind, activation } => {
            let a = act(*activation);
            match kind {
                BinaryKind::Add => (
                    B::ADD,
                    O::AddOptions,
                    u(tflite::AddOptions::create(
                        fb,
                        &tflite::AddOptionsArgs {
                            fused_activation_function: a,
                            pot_scale_int16: false,
                        },
                    )),
                ),
                BinaryKind::Sub => (
                    B::SUB,
                    O::SubOptions,
                    u(tflite::SubOptions::create(
                        fb,
                        &tflite::SubOptionsArgs {
                            fused_activation_function: a,
                            pot_scale_int16: false,
                        },
                    )),
                ),
                BinaryKind::Mul => (
                    B::MUL,
                    O::MulOptions,
                    u(tflite::MulOptions::create(
                        fb,
                        &tflite::MulOptionsArgs {
                            fused_activation_function: a,
                        },
                    )),
                ),
                BinaryKind::Div => (
                    B::DIV,
                    O::DivOptions,
                    u(tflite::DivOptions::create(
                        fb,
                        &tflite::DivOptionsArgs {
                            fused_activation_function: a,
                        },
                    )),
                ),
                BinaryKind::Maximum | BinaryKind::Minimum => {
                    if a != Act::NONE {
                        bail!("{} cannot carry a fused activation", node.op.name());
                    }
                    let o = tflite::MaximumMinimumOptions::create(
                        fb,
                        &tflite::MaximumMinimumOptionsArgs {},
                    );
                    let code = if *kind == BinaryKind::Maximum {
                        B::MAXIMUM
                    } else {
                        B::MINIMUM
                    };
                    (code, O::MaximumMinimumOptions, u(o))
                }
            }
        }
        Op::Unary(kind) => {
            let code = match kind {
                UnaryKind::Relu => B::RELU,
                UnaryKind::Relu6 => B::RELU6,
                UnaryKind::Logistic => B::LOGISTIC,
                UnaryKind::Tanh => B::TANH,
                UnaryKind::HardSwish => B::HARD_SWISH,
                UnaryKind::Exp => B::EXP,
                UnaryKind::Log => B::LOG,
                UnaryKind::Sqrt => B::SQRT,
                UnaryKind::Rsqrt => B::RSQRT,
                UnaryKind::Square => B::SQUARE,
                UnaryKind::Abs => B::ABS,
                UnaryKind::Floor => B::FLOOR,
                UnaryKind::Ceil => B::CEIL,
            };
            (code, O::NONE, None)
        }
        Op::LeakyRelu { alpha } => (
            B::LEAKY_RELU,
            O::LeakyReluOptions,
            u(tflite::LeakyReluOptions::create(
                fb,
                &tflite::LeakyReluOptionsArgs { alpha: *alpha },
            )),
        ),
        Op::Softmax { beta } => (
            B::SOFTMAX,
            O::SoftmaxOptions,
            u(tflite::SoftmaxOptions::create(
                fb,
                &tflite::SoftmaxOptionsArgs { beta: *beta },
            )),
        ),
        Op::Concatenation { axis, activation } => {
            let o = tflite::ConcatenationOptions::create(
                fb,
                &tflite::ConcatenationOptionsArgs {
                    axis: *axis as i32,
                    fused_activation_function: act(*activation),
                },
            );
            (B::CONCATENATION, O::ConcatenationOptions, u(o))
        }
        Op::Reshape => {
            let target: Vec<i32> = graph.tensors[node.outputs[0]]
                .shape
                .iter()
                .map(|&d| d as i32)
                .collect();
            let v = fb.create_vector(&target);
            (
                B::RESHAPE,
                O::ReshapeOptions,
                u(tflite::ReshapeOptions::create(
                    fb,
                    &tflite::ReshapeOptionsArgs { new_shape: Some(v) },
                )),
            )
        }
        Op::Pad => (
            B::PAD,
            O::PadOptions,
            u(tflite::PadOptions::create(fb, &tflite::PadOptionsArgs {})),
        ),
        Op::PadV2 => (
            B::PADV2,
            O::PadV2Options,
            u(tflite::PadV2Options::create(
                fb,
                &tflite::PadV2OptionsArgs {},
            )),
        ),
        Op::Reduce { kind, keep_dims } => {
            let code = match kind {
                ReduceKind::Mean => B::MEAN,
                ReduceKind::Sum => B::SUM,
                ReduceKind::Max => B::REDUCE_MAX,
                ReduceKind::Min => B::REDUCE_MIN,
            };
            (
                code,
                O::ReducerOptions,
                u(tflite::ReducerOptions::create(
                    fb,
                    &tflite::ReducerOptionsArgs {
                        keep_dims: *keep_dims,
                    },
                )),
            )
        }
        Op::ResizeBilinear {
            align_corners,
            half_pixel_centers,
        } => {
            let o = tflite::ResizeBilinearOptions::create(
                fb,
                &tflite::ResizeBilinearOptionsArgs {
                    align_corners: *align_corners,
                    half_pixel_centers: *half_pixel_centers,
                },
            );
            (B::RESIZE_BILINEAR, O::ResizeBilinearOptions, u(o))
        }
        Op::ResizeNearest {
            align_corners,
            half_pixel_centers,
        } => {
            let o = tflite::ResizeNearestNeighborOptions::create(
                fb,
                &tflite::ResizeNearestNeighborOptionsArgs {
                    align_corners: *align_corners,
                    half_pixel_centers: *half_pixel_centers,
                },
            );
            (
                B::RESIZE_NEAREST_NEIGHBOR,
                O::ResizeNearestNeighborOptions,
                u(o),
            )
        }
        Op::StridedSlice(p) => {
            let o = tflite::StridedSliceOptions::create(
                fb,
                &tflite::StridedSliceOptionsArgs {
                    begin_mask: p.begin_mask as i32,
                    end_mask: p.end_mask as i32,
                    shrink_axis_mask: p.shrink_axis_mask as i32,
                    ..Default::default()
                },
            );
            (B::STRIDED_SLICE, O::StridedSliceOptions, u(o))
        }
        Op::Slice => (
            B::SLICE,
            O::SliceOptions,
            u(tflite::SliceOptions::create(
                fb,
                &tflite::SliceOptionsArgs {},
            )),
        ),
        Op::Transpose => (
            B::TRANSPOSE,
            O::TransposeOptions,
            u(tflite::TransposeOptions::create(
                fb,
                &tflite::TransposeOptionsArgs {},
            )),
        ),
        Op::Dequantize => (
            B::DEQUANTIZE,
            O::DequantizeOptions,
            u(tflite::DequantizeOptions::create(
                fb,
                &tflite::DequantizeOptionsArgs {},
            )),
        ),
        Op::Densify => (
            B::DENSIFY,
            O::DensifyOptions,
            u(tflite::DensifyOptions::create(
                fb,
                &tflite::DensifyOptionsArgs {},
            )),
        ),
        Op::Prelu => (B::PRELU, O::NONE, None),
        Op::DepthToSpace { block } => {
            let o = tflite::DepthToSpaceOptions::create(
                fb,
                &tflite::DepthToSpaceOptionsArgs {
                    block_size: *block as i32,
                },
            );
            (B::DEPTH_TO_SPACE, O::DepthToSpaceOptions, u(o))
        }
        Op::LocalResponseNorm {
            radius,
            bias,
            alpha,
            beta,
        } => {
            let o = tflite::LocalResponseNormalizationOptions::create(
                fb,
                &tflite::LocalResponseNormalizationOptionsArgs {
                    radius: *radius as i32,
                    bias: *bias,
                    alpha: *alpha,
                    beta: *beta,
                },
            );
            (
                B::LOCAL_RESPONSE_NORMALIZATION,
                O::LocalResponseNormalizationOptions,
                u(o),
            )
        }
    })
}
