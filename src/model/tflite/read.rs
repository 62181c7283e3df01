//! TFLite flatbuffer → [`Graph`], validating everything tract would otherwise trust.

use super::super::graph::*;
use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use tract_tflite::tflite;
use tract_tflite::tflite::{
    ActivationFunctionType as Act, BuiltinOperator as B, Padding as FbPadding,
};

/// Parses a TFLite model. Errors name the operator (index and TFLite name) or tensor at fault.
/// Reads a model held in `bytes`, copying its constants out.
pub fn read_graph(bytes: &[u8]) -> Result<Graph> {
    read_graph_shared(&Bytes::copy_from_slice(bytes))
}

/// Reads a model whose constants stay slices of `bytes`: no second copy of the weights.
pub fn read_graph_shared(bytes: &Bytes) -> Result<Graph> {
    ensure!(
        bytes.len() >= 8,
        "file is {} bytes long: too short to be a TFLite model",
        bytes.len()
    );
    let opts = flatbuffers::VerifierOptions {
        max_depth: 64,
        max_tables: 10_000_000,
        max_apparent_size: 1 << 32,
        ignore_missing_null_terminator: true,
    };
    let model = tflite::root_as_model_with_opts(&opts, bytes)
        .map_err(|e| anyhow::anyhow!("not a valid TFLite flatbuffer: {e}"))?;
    let subgraphs = model.subgraphs().context("model has no subgraphs")?;
    ensure!(!subgraphs.is_empty(), "model has no subgraphs");
    let sg = subgraphs.get(0);
    let buffers = model.buffers();
    let fb_tensors = sg.tensors().context("subgraph 0 has no tensor table")?;

    let mut graph = Graph::default();
    for (ix, t) in fb_tensors.iter().enumerate() {
        let tensor = read_tensor(bytes, &buffers, &t, ix)
            .with_context(|| format!("tensor #{ix} ('{}')", t.name().unwrap_or("?")))?;
        graph.tensors.push(tensor);
    }
    dedupe_names(&mut graph);

    let n = graph.tensors.len();
    let tensor_ids = |v: Option<flatbuffers::Vector<i32>>, what: &str| -> Result<Vec<TensorId>> {
        v.map(|v| v.iter().collect::<Vec<i32>>())
            .unwrap_or_default()
            .into_iter()
            .map(|i| {
                ensure!(
                    i >= 0 && (i as usize) < n,
                    "{what} refers to tensor {i}, but there are {n}"
                );
                Ok(i as usize)
            })
            .collect()
    };
    graph.inputs = tensor_ids(sg.inputs(), "subgraph input")?;
    graph.outputs = tensor_ids(sg.outputs(), "subgraph output")?;

    let codes = model
        .operator_codes()
        .context("model has no operator code table")?;
    let mut unsupported: Vec<String> = vec![];
    for (ix, op) in sg
        .operators()
        .context("subgraph 0 has no operators")?
        .iter()
        .enumerate()
    {
        let opcode_ix = op.opcode_index() as usize;
        ensure!(
            opcode_ix < codes.len(),
            "operator #{ix} uses opcode {opcode_ix}, but there are {}",
            codes.len()
        );
        let code = codes.get(opcode_ix);
        // The same rule as TFLite's GetBuiltinCode: old files only fill the byte field.
        let builtin = B((code.deprecated_builtin_code() as i32).max(code.builtin_code().0));
        let name = if builtin == B::CUSTOM {
            format!("custom op '{}'", code.custom_code().unwrap_or("?"))
        } else {
            builtin
                .variant_name()
                .map(str::to_string)
                .unwrap_or_else(|| format!("builtin op {}", builtin.0))
        };
        let raw_inputs: Vec<i32> = op.inputs().map(|v| v.iter().collect()).unwrap_or_default();
        let raw_outputs: Vec<i32> = op.outputs().map(|v| v.iter().collect()).unwrap_or_default();
        for &i in raw_inputs.iter().chain(&raw_outputs) {
            ensure!(
                i >= -1 && (i as i64) < n as i64,
                "operator #{ix} ({name}) refers to tensor {i}, but there are {n}"
            );
        }
        let result = read_op(&mut graph, builtin, &op, &raw_inputs, &raw_outputs);
        match result {
            Ok(Some(node)) => graph.nodes.push(node),
            Ok(None) => unsupported.push(format!("operator #{ix} ({name}): not supported")),
            Err(e) => unsupported.push(format!("operator #{ix} ({name}): {e:#}")),
        }
    }
    if let Some(first) = unsupported.first() {
        let more = match unsupported.len() {
            1 => String::new(),
            k => format!(" (and {} more unsupported operators)", k - 1),
        };
        bail!("{first}{more}");
    }
    graph.check_structure()?;
    check_float_activations(&graph)?;
    Ok(graph)
}

fn dedupe_names(graph: &mut Graph) {
    let mut seen = std::collections::HashSet::new();
    for ix in 0..graph.tensors.len() {
        let mut name = graph.tensors[ix].name.clone();
        if name.is_empty() {
            name = format!("t{ix}");
        }
        if seen.contains(&name) {
            name = (1..)
                .map(|k| format!("{name}_{k}"))
                .find(|c| !seen.contains(c))
                .expect("unbounded");
        }
        seen.insert(name.clone());
        graph.tensors[ix].name = name;
    }
}

/// Quantised (int8/uint8) or other non-float activations: the runtime is float only.
fn check_float_activations(graph: &Graph) -> Result<()> {
    // Tensors computed from constants only (DENSIFY → DEQUANTIZE chains of sparse fp16
    // weights) are folded by normalisation, so their dtype is not an activation dtype.
    let mut from_consts: Vec<bool> = graph.tensors.iter().map(Tensor::is_const).collect();
    for node in &graph.nodes {
        if !node.inputs.is_empty() && node.inputs.iter().all(|&t| from_consts[t]) {
            for &t in &node.outputs {
                from_consts[t] = true;
            }
        }
    }
    for (ix, node) in graph.nodes.iter().enumerate() {
        for &t in node.inputs.iter().chain(&node.outputs) {
            let tensor = &graph.tensors[t];
            if from_consts[t] {
                continue;
            }
            let shape_arg = matches!(
                node.op,
                Op::Reshape
                    | Op::Pad
                    | Op::PadV2
                    | Op::Reduce { .. }
                    | Op::ResizeBilinear { .. }
                    | Op::ResizeNearest { .. }
                    | Op::StridedSlice(_)
                    | Op::Slice
                    | Op::Transpose
            ) && node.inputs.first() != Some(&t)
                && !node.outputs.contains(&t);
            if tensor.is_const() || shape_arg {
                continue;
            }
            ensure!(
                tensor.dtype == DType::F32,
                "operator #{ix} ({}): tensor '{}' is {}{}: only float32 activations are supported (int8 models are not)",
                node.op.name(),
                tensor.name,
                tensor.dtype.name(),
                if tensor.quant.is_some() {
                    " quantised"
                } else {
                    ""
                }
            );
        }
    }
    for &t in graph.inputs.iter().chain(&graph.outputs) {
        let tensor = &graph.tensors[t];
        ensure!(
            tensor.dtype == DType::F32,
            "model input/output '{}' is {}: only float32 models are supported",
            tensor.name,
            tensor.dtype.name()
        );
    }
    Ok(())
}

fn read_tensor(
    bytes: &Bytes,
    buffers: &Option<flatbuffers::Vector<flatbuffers::ForwardsUOffset<tflite::Buffer>>>,
    t: &tflite::Tensor,
    ix: usize,
) -> Result<Tensor> {
    let shape: Vec<usize> = t
        .shape()
        .map(|s| s.iter().collect::<Vec<i32>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| {
            ensure!(d >= 0, "negative extent {d} in shape");
            Ok(d as usize)
        })
        .collect::<Result<_>>()?;
    ensure!(
        shape.len() <= 8,
        "rank {} is beyond what vision models use",
        shape.len()
    );
    let elements = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .context("shape overflows")?;
    ensure!(
        elements <= 1 << 32,
        "tensor of {elements} elements is implausibly large"
    );
    let dtype = match t.type_() {
        tflite::TensorType::FLOAT32 => DType::F32,
        tflite::TensorType::FLOAT16 => DType::F16,
        tflite::TensorType::INT32 => DType::I32,
        tflite::TensorType::INT64 => DType::I64,
        tflite::TensorType::INT16 => DType::I16,
        tflite::TensorType::INT8 => DType::I8,
        tflite::TensorType::UINT8 => DType::U8,
        tflite::TensorType::BOOL => DType::Bool,
        other => bail!(
            "element type {} is not supported",
            other.variant_name().unwrap_or("?")
        ),
    };
    let name = t.name().unwrap_or("").to_string();
    let data = match t.buffer() as usize {
        0 => None,
        b => {
            let buffers = buffers
                .as_ref()
                .context("tensor refers to a buffer, but the model has none")?;
            ensure!(
                b < buffers.len(),
                "buffer {b} out of range ({} buffers)",
                buffers.len()
            );
            buffer_bytes(bytes, &buffers.get(b)).with_context(|| format!("buffer {b}"))?
        }
    };
    let quant = t.quantization().and_then(|q| {
        let scale: Vec<f32> = q.scale()?.iter().collect();
        let zero_point: Vec<i64> = q
            .zero_point()
            .map(|z| z.iter().collect())
            .unwrap_or_default();
        (!scale.is_empty()).then_some(Quant {
            scale,
            zero_point,
            axis: q.quantized_dimension().max(0) as usize,
        })
    });
    let sparsity = t
        .sparsity()
        .map(|s| read_sparsity(&s))
        .transpose()
        .context("sparsity parameters")?;
    let _ = ix;
    Ok(Tensor {
        name,
        shape,
        dtype,
        data,
        quant,
        sparsity,
    })
}

/// A buffer's bytes: inline (`data`), or after the flatbuffer (`offset`/`size`, the layout
/// TFLite uses for models over 2 GiB, which tract's schema does not know about).
fn buffer_bytes(file: &Bytes, b: &tflite::Buffer) -> Result<Option<Bytes>> {
    if let Some(d) = b.data()
        && !d.is_empty()
    {
        // The verifier placed the vector inside `file`: share it.
        return Ok(Some(file.slice_ref(d.bytes())));
    }
    let offset = raw_u64_field(&b._tab, 6).unwrap_or(0);
    let size = raw_u64_field(&b._tab, 8).unwrap_or(0);
    if offset > 1 {
        let end = offset
            .checked_add(size)
            .context("buffer offset + size overflows")?;
        ensure!(
            end <= file.len() as u64,
            "buffer [{offset}, {end}) lies beyond the end of the {}-byte file",
            file.len()
        );
        return Ok(Some(file.slice(offset as usize..end as usize)));
    }
    Ok(None)
}

/// Reads a scalar field by vtable slot with explicit bounds checks: the generated verifier
/// only checks the fields tract's schema lists, so nothing else may be trusted.
pub(super) fn raw_u64_field(tab: &flatbuffers::Table, slot: usize) -> Option<u64> {
    let buf = tab.buf();
    let loc = tab.loc();
    let rd = |at: usize, n: usize| buf.get(at..at.checked_add(n)?);
    let soffset = i32::from_le_bytes(rd(loc, 4)?.try_into().ok()?);
    let vtable = (loc as i64).checked_sub(soffset as i64)?;
    if vtable < 0 {
        return None;
    }
    let vtable = vtable as usize;
    let vt_len = u16::from_le_bytes(rd(vtable, 2)?.try_into().ok()?) as usize;
    if slot + 2 > vt_len {
        return None;
    }
    let field = u16::from_le_bytes(rd(vtable + slot, 2)?.try_into().ok()?) as usize;
    if field == 0 {
        return None;
    }
    let tbl_len = u16::from_le_bytes(rd(vtable + 2, 2)?.try_into().ok()?) as usize;
    if field + 8 > tbl_len {
        // A field narrower than 8 bytes (a bool or byte).
        return rd(loc + field, 1).map(|b| b[0] as u64);
    }
    Some(u64::from_le_bytes(rd(loc + field, 8)?.try_into().ok()?))
}

fn read_sparsity(s: &tflite::SparsityParameters) -> Result<Sparsity> {
    let ints = |v: Option<flatbuffers::Vector<i32>>| -> Result<Vec<usize>> {
        v.map(|v| v.iter().collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .map(|x| {
                ensure!(x >= 0, "negative value {x}");
                Ok(x as usize)
            })
            .collect()
    };
    let traversal_order = ints(s.traversal_order())?;
    let block_map = ints(s.block_map())?;
    let mut dim_metadata = vec![];
    for dm in s.dim_metadata().context("no dim_metadata")?.iter() {
        dim_metadata.push(match dm.format() {
            tflite::DimensionType::DENSE => {
                ensure!(dm.dense_size() >= 0, "negative dense size");
                DimMeta::Dense {
                    size: dm.dense_size() as usize,
                }
            }
            tflite::DimensionType::SPARSE_CSR => DimMeta::Csr {
                segments: index_vector(dm.array_segments_type(), dm.array_segments())
                    .context("array_segments")?,
                indices: index_vector(dm.array_indices_type(), dm.array_indices())
                    .context("array_indices")?,
            },
            other => bail!("dimension format {:?}", other),
        });
    }
    ensure!(
        dim_metadata.len() == traversal_order.len(),
        "{} dim_metadata for {} traversed dimensions",
        dim_metadata.len(),
        traversal_order.len()
    );
    Ok(Sparsity {
        traversal_order,
        block_map,
        dim_metadata,
    })
}

fn index_vector(
    kind: tflite::SparseIndexVector,
    table: Option<flatbuffers::Table>,
) -> Result<Vec<usize>> {
    let table = table.context("missing")?;
    // SAFETY: `table` comes from a union field whose type tag is `kind`, and the verifier
    // checked the union member against that tag before we got here.
    Ok(match kind {
        tflite::SparseIndexVector::Int32Vector => {
            let v = unsafe { tflite::Int32Vector::init_from_table(table) };
            let vals: Vec<i32> = v.values().map(|v| v.iter().collect()).unwrap_or_default();
            ensure!(vals.iter().all(|&x| x >= 0), "negative index");
            vals.into_iter().map(|x| x as usize).collect()
        }
        tflite::SparseIndexVector::Uint16Vector => {
            let v = unsafe { tflite::Uint16Vector::init_from_table(table) };
            v.values()
                .map(|v| v.iter().map(|x| x as usize).collect())
                .unwrap_or_default()
        }
        tflite::SparseIndexVector::Uint8Vector => {
            let v = unsafe { tflite::Uint8Vector::init_from_table(table) };
            v.values()
                .map(|v| v.iter().map(|x| x as usize).collect())
                .unwrap_or_default()
        }
        other => bail!("index vector type {:?}", other),
    })
}

fn activation(a: Act) -> Result<Activation> {
    Ok(match a {
        Act::NONE => Activation::None,
        Act::RELU => Activation::Relu,
        Act::RELU6 => Activation::Relu6,
        Act::RELU_N1_TO_1 => Activation::ReluN1To1,
        Act::TANH => Activation::Tanh,
        other => bail!(
            "fused activation {} is not supported",
            other.variant_name().unwrap_or("?")
        ),
    })
}

fn padding(p: FbPadding) -> Result<Padding> {
    Ok(match p {
        FbPadding::SAME => Padding::Same,
        FbPadding::VALID => Padding::Valid,
        other => bail!("padding {:?} is not supported", other),
    })
}

fn positive(v: i32, what: &str) -> Result<usize> {
    ensure!(v > 0, "{what} is {v}");
    Ok(v as usize)
}

/// Builds the node for one operator, or `Ok(None)` when the op is outside what we run.
fn read_op(
    graph: &mut Graph,
    code: B,
    op: &tflite::Operator,
    raw_in: &[i32],
    raw_out: &[i32],
) -> Result<Option<Node>> {
    macro_rules! opts {
        ($getter:ident, $what:literal) => {
            op.$getter().context(concat!("missing ", $what))?
        };
    }
    let conv =
        |padding_: FbPadding, sh: i32, sw: i32, dh: i32, dw: i32, act: Act| -> Result<ConvParams> {
            Ok(ConvParams {
                padding: padding(padding_)?,
                stride: [positive(sh, "stride")?, positive(sw, "stride")?],
                dilation: [
                    positive(dh.max(1), "dilation")?,
                    positive(dw.max(1), "dilation")?,
                ],
                activation: activation(act)?,
            })
        };
    let pool = || -> Result<PoolParams> {
        let o = opts!(builtin_options_as_pool_2_doptions, "Pool2DOptions");
        Ok(PoolParams {
            padding: padding(o.padding())?,
            stride: [
                positive(o.stride_h(), "stride")?,
                positive(o.stride_w(), "stride")?,
            ],
            filter: [
                positive(o.filter_height(), "filter")?,
                positive(o.filter_width(), "filter")?,
            ],
            activation: activation(o.fused_activation_function())?,
        })
    };
    let bin = |kind: BinaryKind, act: Act| -> Result<Op> {
        Ok(Op::Binary {
            kind,
            activation: activation(act)?,
        })
    };
    let reducer = |kind: ReduceKind| -> Result<Op> {
        let keep_dims = op
            .builtin_options_as_reducer_options()
            .map(|o| o.keep_dims())
            .unwrap_or(false);
        Ok(Op::Reduce { kind, keep_dims })
    };
    let mut optional_bias = false;
    let built = match code {
        B::CONV_2D => {
            let o = opts!(builtin_options_as_conv_2_doptions, "Conv2DOptions");
            optional_bias = true;
            Op::Conv2d(conv(
                o.padding(),
                o.stride_h(),
                o.stride_w(),
                o.dilation_h_factor(),
                o.dilation_w_factor(),
                o.fused_activation_function(),
            )?)
        }
        B::DEPTHWISE_CONV_2D => {
            let o = opts!(
                builtin_options_as_depthwise_conv_2_doptions,
                "DepthwiseConv2DOptions"
            );
            optional_bias = true;
            let c = conv(
                o.padding(),
                o.stride_h(),
                o.stride_w(),
                o.dilation_h_factor(),
                o.dilation_w_factor(),
                o.fused_activation_function(),
            )?;
            // Some converters leave the multiplier at 0 and let the filter shape speak.
            let multiplier = o.depth_multiplier().max(0) as usize;
            let (x, k) = (
                raw_in.first().copied().unwrap_or(-1),
                raw_in.get(1).copied().unwrap_or(-1),
            );
            ensure!(x >= 0 && k >= 0, "missing input or filter");
            let (cin, cout) = (
                graph.tensors[x as usize].shape.last().copied().unwrap_or(0),
                graph.tensors[k as usize].shape.last().copied().unwrap_or(0),
            );
            ensure!(
                cin > 0 && cout % cin == 0,
                "filter has {cout} channels for {cin} input channels"
            );
            ensure!(
                multiplier == 0 || multiplier == cout / cin,
                "depth_multiplier {multiplier} disagrees with {cout} filter channels over {cin} input channels"
            );
            Op::DepthwiseConv2d {
                conv: c,
                depth_multiplier: cout / cin,
            }
        }
        B::FULLY_CONNECTED => {
            optional_bias = true;
            let (act, keep) = match op.builtin_options_as_fully_connected_options() {
                Some(o) => {
                    ensure!(
                        o.weights_format() == tflite::FullyConnectedOptionsWeightsFormat::DEFAULT,
                        "shuffled weight format is not supported"
                    );
                    ensure!(
                        !o.asymmetric_quantize_inputs(),
                        "asymmetric input quantisation is not supported"
                    );
                    (o.fused_activation_function(), o.keep_num_dims())
                }
                None => (Act::NONE, false),
            };
            Op::FullyConnected {
                activation: activation(act)?,
                keep_num_dims: keep,
            }
        }
        B::BATCH_MATMUL => {
            let (x, y) = op
                .builtin_options_as_batch_mat_mul_options()
                .map(|o| (o.adj_x(), o.adj_y()))
                .unwrap_or((false, false));
            Op::BatchMatMul { adj_x: x, adj_y: y }
        }
        B::MAX_POOL_2D => Op::MaxPool2d(pool()?),
        B::AVERAGE_POOL_2D => Op::AvgPool2d(pool()?),
        B::ADD => bin(
            BinaryKind::Add,
            op.builtin_options_as_add_options()
                .map(|o| o.fused_activation_function())
                .unwrap_or(Act::NONE),
        )?,
        B::SUB => bin(
            BinaryKind::Sub,
            op.builtin_options_as_sub_options()
                .map(|o| o.fused_activation_function())
                .unwrap_or(Act::NONE),
        )?,
        B::MUL => bin(
            BinaryKind::Mul,
            op.builtin_options_as_mul_options()
                .map(|o| o.fused_activation_function())
                .unwrap_or(Act::NONE),
        )?,
        B::DIV => bin(
            BinaryKind::Div,
            op.builtin_options_as_div_options()
                .map(|o| o.fused_activation_function())
                .unwrap_or(Act::NONE),
        )?,
        B::MAXIMUM => bin(BinaryKind::Maximum, Act::NONE)?,
        B::MINIMUM => bin(BinaryKind::Minimum, Act::NONE)?,
        B::RELU => Op::Unary(UnaryKind::Relu),
        B::RELU6 => Op::Unary(UnaryKind::Relu6),
        B::LOGISTIC => Op::Unary(UnaryKind::Logistic),
        B::TANH => Op::Unary(UnaryKind::Tanh),
        B::HARD_SWISH => Op::Unary(UnaryKind::HardSwish),
        B::EXP => Op::Unary(UnaryKind::Exp),
        B::LOG => Op::Unary(UnaryKind::Log),
        B::SQRT => Op::Unary(UnaryKind::Sqrt),
        B::RSQRT => Op::Unary(UnaryKind::Rsqrt),
        B::SQUARE => Op::Unary(UnaryKind::Square),
        B::ABS => Op::Unary(UnaryKind::Abs),
        B::FLOOR => Op::Unary(UnaryKind::Floor),
        B::CEIL => Op::Unary(UnaryKind::Ceil),
        B::LEAKY_RELU => Op::LeakyRelu {
            alpha: op
                .builtin_options_as_leaky_relu_options()
                .map(|o| o.alpha())
                .unwrap_or(0.2),
        },
        B::SOFTMAX => Op::Softmax {
            beta: op
                .builtin_options_as_softmax_options()
                .map(|o| o.beta())
                .unwrap_or(1.0),
        },
        B::CONCATENATION => {
            let o = opts!(
                builtin_options_as_concatenation_options,
                "ConcatenationOptions"
            );
            let rank = raw_in
                .first()
                .filter(|&&i| i >= 0)
                .map(|&i| graph.tensors[i as usize].shape.len())
                .context("no inputs")?;
            let axis = normalise_axes(&[o.axis() as i64], rank)?[0];
            Op::Concatenation {
                axis,
                activation: activation(o.fused_activation_function())?,
            }
        }
        B::RESHAPE | B::SQUEEZE | B::EXPAND_DIMS => {
            return read_reshape(graph, code, op, raw_in, raw_out).map(Some);
        }
        B::PAD => Op::Pad,
        B::PADV2 => Op::PadV2,
        B::MEAN => reducer(ReduceKind::Mean)?,
        B::SUM => reducer(ReduceKind::Sum)?,
        B::REDUCE_MAX => reducer(ReduceKind::Max)?,
        B::REDUCE_MIN => reducer(ReduceKind::Min)?,
        B::RESIZE_BILINEAR => {
            let (a, h) = op
                .builtin_options_as_resize_bilinear_options()
                .map(|o| (o.align_corners(), o.half_pixel_centers()))
                .unwrap_or((false, false));
            Op::ResizeBilinear {
                align_corners: a,
                half_pixel_centers: h,
            }
        }
        B::RESIZE_NEAREST_NEIGHBOR => {
            let (a, h) = op
                .builtin_options_as_resize_nearest_neighbor_options()
                .map(|o| (o.align_corners(), o.half_pixel_centers()))
                .unwrap_or((false, false));
            Op::ResizeNearest {
                align_corners: a,
                half_pixel_centers: h,
            }
        }
        B::STRIDED_SLICE => {
            let o = opts!(
                builtin_options_as_strided_slice_options,
                "StridedSliceOptions"
            );
            ensure!(
                o.ellipsis_mask() == 0 && o.new_axis_mask() == 0,
                "ellipsis and new-axis masks are not supported"
            );
            // `offset` (slot 14) is newer than tract's schema; it changes what `end` means.
            ensure!(
                raw_u64_field(&o._tab, 14).unwrap_or(0) == 0,
                "offset mode is not supported"
            );
            Op::StridedSlice(StridedSliceParams {
                begin_mask: o.begin_mask() as u32,
                end_mask: o.end_mask() as u32,
                shrink_axis_mask: o.shrink_axis_mask() as u32,
            })
        }
        B::SLICE => Op::Slice,
        B::TRANSPOSE => Op::Transpose,
        B::DEQUANTIZE => Op::Dequantize,
        B::DENSIFY => Op::Densify,
        B::PRELU => Op::Prelu,
        B::DEPTH_TO_SPACE => {
            let o = opts!(
                builtin_options_as_depth_to_space_options,
                "DepthToSpaceOptions"
            );
            Op::DepthToSpace {
                block: positive(o.block_size(), "block size")?,
            }
        }
        B::LOCAL_RESPONSE_NORMALIZATION => {
            let o = opts!(
                builtin_options_as_local_response_normalization_options,
                "LocalResponseNormalizationOptions"
            );
            ensure!(o.radius() >= 0, "negative radius");
            Op::LocalResponseNorm {
                radius: o.radius() as usize,
                bias: o.bias(),
                alpha: o.alpha(),
                beta: o.beta(),
            }
        }
        _ => return Ok(None),
    };
    let mut inputs = vec![];
    for (slot, &i) in raw_in.iter().enumerate() {
        if i >= 0 {
            inputs.push(i as usize);
        } else if optional_bias && slot == 2 {
            inputs.push(zero_bias(graph, raw_in, raw_out, &built)?);
        } else {
            bail!("input {slot} is omitted, which only a bias may be");
        }
    }
    if optional_bias && inputs.len() == 2 {
        inputs.push(zero_bias(graph, raw_in, raw_out, &built)?);
    }
    let outputs = raw_out
        .iter()
        .map(|&o| {
            ensure!(o >= 0, "omitted output");
            Ok(o as usize)
        })
        .collect::<Result<Vec<_>>>()?;
    ensure!(
        outputs.len() == 1,
        "{} outputs where one is expected",
        outputs.len()
    );
    Ok(Some(Node {
        op: built,
        inputs,
        outputs,
    }))
}

/// A missing bias is a zero bias: tract's readers insist on one.
fn zero_bias(graph: &mut Graph, raw_in: &[i32], raw_out: &[i32], op: &Op) -> Result<TensorId> {
    let k = *raw_in
        .get(1)
        .filter(|&&k| k >= 0)
        .context("missing filter")? as usize;
    let kshape = &graph.tensors[k].shape;
    let channels = match op {
        Op::FullyConnected { .. } | Op::Conv2d(_) => *kshape.first().context("scalar filter")?,
        _ => *kshape.last().context("scalar filter")?,
    };
    let out = raw_out
        .first()
        .filter(|&&o| o >= 0)
        .map(|&o| graph.tensors[o as usize].name.clone())
        .unwrap_or_default();
    let name = graph.fresh_name(&format!("{out}/zero_bias"));
    Ok(graph.add_tensor(Tensor::f32_constant(
        name,
        vec![channels],
        &vec![0.0; channels],
    )))
}

/// RESHAPE, SQUEEZE and EXPAND_DIMS all become RESHAPE to a constant target, computed from
/// the op's own arguments (not from the declared output, which is checked against it later).
fn read_reshape(
    graph: &mut Graph,
    code: B,
    op: &tflite::Operator,
    raw_in: &[i32],
    raw_out: &[i32],
) -> Result<Node> {
    ensure!(!raw_in.is_empty() && raw_in[0] >= 0, "missing input");
    ensure!(raw_out.len() == 1 && raw_out[0] >= 0, "expects one output");
    let x = raw_in[0] as usize;
    let in_shape = graph.tensors[x].shape.clone();
    let target: Vec<i64> = match code {
        B::RESHAPE => {
            let from_input = raw_in
                .get(1)
                .filter(|&&i| i >= 0)
                .map(|&i| &graph.tensors[i as usize]);
            match from_input {
                Some(t) if t.is_const() => t.int_values()?,
                Some(t) if t.shape.iter().product::<usize>() == 0 => op
                    .builtin_options_as_reshape_options()
                    .and_then(|o| o.new_shape())
                    .map(|v| v.iter().map(|d| d as i64).collect())
                    .unwrap_or_default(),
                Some(_) => {
                    // A computed shape (from SHAPE etc.): the declared output is all we have,
                    // and check_shapes will verify the element count.
                    graph.tensors[raw_out[0] as usize]
                        .shape
                        .iter()
                        .map(|&d| d as i64)
                        .collect()
                }
                None => op
                    .builtin_options_as_reshape_options()
                    .and_then(|o| o.new_shape())
                    .map(|v| v.iter().map(|d| d as i64).collect())
                    .context("RESHAPE has neither a shape input nor new_shape")?,
            }
        }
        B::SQUEEZE => {
            let dims: Vec<i64> = op
                .builtin_options_as_squeeze_options()
                .and_then(|o| o.squeeze_dims())
                .map(|v| v.iter().map(|d| d as i64).collect())
                .unwrap_or_default();
            let dims = normalise_axes(&dims, in_shape.len())?;
            in_shape
                .iter()
                .enumerate()
                .filter(|(d, n)| {
                    if dims.is_empty() {
                        **n != 1
                    } else {
                        !dims.contains(d)
                    }
                })
                .map(|(_, &n)| n as i64)
                .collect()
        }
        B::EXPAND_DIMS => {
            let axis_t = raw_in
                .get(1)
                .filter(|&&i| i >= 0)
                .context("EXPAND_DIMS without axis")?;
            let axis = graph.tensors[*axis_t as usize].int_values()?;
            ensure!(axis.len() == 1, "EXPAND_DIMS axis must be one value");
            let axis = normalise_axes(&axis, in_shape.len() + 1)?[0];
            let mut s: Vec<i64> = in_shape.iter().map(|&d| d as i64).collect();
            s.insert(axis, 1);
            s
        }
        _ => unreachable!("only reshape-like codes reach here"),
    };
    let resolved = {
        let total: usize = in_shape.iter().product();
        let known: i64 = target.iter().filter(|&&d| d != -1).product();
        target
            .iter()
            .map(|&d| {
                if d == -1 && known > 0 {
                    (total as i64) / known
                } else {
                    d
                }
            })
            .collect::<Vec<_>>()
    };
    let name = graph.fresh_name(&format!(
        "{}/shape",
        graph.tensors[raw_out[0] as usize].name
    ));
    let shape_t = graph.add_tensor(Tensor::i32_constant(
        name,
        &resolved.iter().map(|&d| d as i32).collect::<Vec<_>>(),
    ));
    Ok(Node {
        op: Op::Reshape,
        inputs: vec![x, shape_t],
        outputs: vec![raw_out[0] as usize],
    })
}
