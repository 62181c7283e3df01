//! TFLite flatbuffer → [`Graph`], validating everything tract would otherwise trust.

use super::super::graph::*;
use super::super::ops::{OperatorReader, registry};
use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use tract_tflite::tflite::{self, BuiltinOperator};

/// Parses a TFLite model held in `bytes`, copying its constants out. Errors name the
/// operator (index and TFLite name) or tensor at fault.
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
    let subgraph = subgraphs.get(0);
    let buffers = model.buffers();
    let tensor_tables = subgraph
        .tensors()
        .context("subgraph 0 has no tensor table")?;

    let mut graph = Graph::default();
    for (ix, t) in tensor_tables.iter().enumerate() {
        let tensor = read_tensor(bytes, &buffers, &t)
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
    graph.inputs = tensor_ids(subgraph.inputs(), "subgraph input")?;
    graph.outputs = tensor_ids(subgraph.outputs(), "subgraph output")?;

    read_operators(&model, &subgraph, &mut graph)?;
    graph.check_structure()?;
    check_float_activations(&graph)?;
    Ok(graph)
}

/// Reads every operator of `subgraph` into `graph`, through the reader its opcode has in
/// the registry. Fails naming the first operator that cannot be read, and counting the
/// others.
fn read_operators(
    model: &tflite::Model,
    subgraph: &tflite::SubGraph,
    graph: &mut Graph,
) -> Result<()> {
    let codes = model
        .operator_codes()
        .context("model has no operator code table")?;
    let operators = subgraph
        .operators()
        .context("subgraph 0 has no operators")?;
    let n = graph.tensors.len();
    let mut unsupported: Vec<String> = vec![];
    for (ix, operator) in operators.iter().enumerate() {
        let opcode_ix = operator.opcode_index() as usize;
        ensure!(
            opcode_ix < codes.len(),
            "operator #{ix} uses opcode {opcode_ix}, but there are {}",
            codes.len()
        );
        let code = codes.get(opcode_ix);
        // The same rule as TFLite's GetBuiltinCode: old files only fill the byte field.
        let opcode =
            BuiltinOperator((code.deprecated_builtin_code() as i32).max(code.builtin_code().0));
        let name = if opcode == BuiltinOperator::CUSTOM {
            format!("custom op '{}'", code.custom_code().unwrap_or("?"))
        } else {
            opcode
                .variant_name()
                .map(str::to_string)
                .unwrap_or_else(|| format!("builtin op {}", opcode.0))
        };
        let raw_inputs: Vec<i32> = operator
            .inputs()
            .map(|v| v.iter().collect())
            .unwrap_or_default();
        let raw_outputs: Vec<i32> = operator
            .outputs()
            .map(|v| v.iter().collect())
            .unwrap_or_default();
        for &i in raw_inputs.iter().chain(&raw_outputs) {
            ensure!(
                i >= -1 && (i as i64) < n as i64,
                "operator #{ix} ({name}) refers to tensor {i}, but there are {n}"
            );
        }
        let mut reader = OperatorReader {
            graph,
            opcode,
            operator: &operator,
            raw_inputs: &raw_inputs,
            raw_outputs: &raw_outputs,
        };
        match registry().read(&mut reader) {
            Some(Ok(node)) => graph.nodes.push(node),
            Some(Err(e)) => unsupported.push(format!("operator #{ix} ({name}): {e:#}")),
            None => unsupported.push(format!("operator #{ix} ({name}): not supported")),
        }
    }
    if let Some(first) = unsupported.first() {
        let more = match unsupported.len() {
            1 => String::new(),
            k => format!(" (and {} more unsupported operators)", k - 1),
        };
        bail!("{first}{more}");
    }
    Ok(())
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
            let shape_arg = node.op.family().takes_integer_arguments()
                && node.inputs.first() != Some(&t)
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
pub(crate) fn raw_u64_field(tab: &flatbuffers::Table, slot: usize) -> Option<u64> {
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
