//! [`Graph`] → TFLite flatbuffer bytes.

use super::super::graph::*;
use super::super::ops::OptionsWriter;
use anyhow::Result;
use flatbuffers::{FlatBufferBuilder, WIPOffset};
use tract_tflite::tflite::{self, BuiltinOperator};

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

/// Writes `graph` as a TFLite flatbuffer (layer files, the whole normalised model for
/// tract, tile graphs), which [`read_graph`](super::read_graph) reads back as the same graph.
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

/// A flatbuffer and the constants that follow it in the file.
type Built = (Vec<u8>, Vec<bytes::Bytes>);

/// One pass over the graph. With `external_base`, constants go after the flatbuffer starting
/// at that offset and are returned in file order.
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
    let mut builder = FlatBufferBuilder::with_capacity(capacity.min(1 << 31));
    let mut buffers = Buffers {
        tables: vec![tflite::Buffer::create(
            &mut builder,
            &tflite::BufferArgs { data: None },
        )],
        external: external_base.map(|base| (base, vec![])),
    };
    let tensors: Vec<_> = graph
        .tensors
        .iter()
        .map(|t| write_tensor(&mut builder, &mut buffers, t))
        .collect();
    let (operators, codes) = write_operators(&mut builder, graph)?;
    let ids = |v: &[TensorId]| v.iter().map(|&i| i as i32).collect::<Vec<i32>>();
    let tensors = builder.create_vector(&tensors);
    let operators = builder.create_vector(&operators);
    let inputs = builder.create_vector(&ids(&graph.inputs));
    let outputs = builder.create_vector(&ids(&graph.outputs));
    let name = builder.create_string("main");
    let subgraph = tflite::SubGraph::create(
        &mut builder,
        &tflite::SubGraphArgs {
            tensors: Some(tensors),
            inputs: Some(inputs),
            outputs: Some(outputs),
            operators: Some(operators),
            name: Some(name),
        },
    );
    let subgraphs = builder.create_vector(&[subgraph]);
    let codes = write_operator_codes(&mut builder, &codes, options.legacy_opcodes);
    let buffer_tables = builder.create_vector(&buffers.tables);
    let description = builder.create_string("memaflow");
    let model = tflite::Model::create(
        &mut builder,
        &tflite::ModelArgs {
            version: 3,
            operator_codes: Some(codes),
            subgraphs: Some(subgraphs),
            description: Some(description),
            buffers: Some(buffer_tables),
            ..Default::default()
        },
    );
    builder.finish(model, Some("TFL3"));
    let (vec, head) = builder.collapse();
    // The builder fills its buffer from the back: move the model to the front in place
    // rather than copying it (a layer file can be hundreds of MiB).
    let mut bytes = vec;
    bytes.drain(..head);
    let blobs = buffers.external.map(|(_, blobs)| blobs).unwrap_or_default();
    Ok((bytes, blobs))
}

/// The model's buffer table as it is built, and with external buffers, the next offset
/// after the flatbuffer and the constants to put there.
struct Buffers<'builder> {
    tables: Vec<WIPOffset<tflite::Buffer<'builder>>>,
    external: Option<(u64, Vec<bytes::Bytes>)>,
}

impl<'builder> Buffers<'builder> {
    /// Adds the buffer of one constant; returns its index.
    fn add(&mut self, builder: &mut FlatBufferBuilder<'builder>, data: &bytes::Bytes) -> u32 {
        let table = match &mut self.external {
            None => {
                let v = builder.create_vector(data);
                tflite::Buffer::create(builder, &tflite::BufferArgs { data: Some(v) })
            }
            Some((next_offset, blobs)) => {
                *next_offset = next_offset.next_multiple_of(16);
                let start = builder.start_table();
                builder.push_slot_always::<u64>(6, *next_offset);
                builder.push_slot_always::<u64>(8, data.len() as u64);
                *next_offset += data.len() as u64;
                blobs.push(data.clone());
                WIPOffset::new(builder.end_table(start).value())
            }
        };
        self.tables.push(table);
        (self.tables.len() - 1) as u32
    }
}

fn write_tensor<'builder>(
    builder: &mut FlatBufferBuilder<'builder>,
    buffers: &mut Buffers<'builder>,
    t: &Tensor,
) -> WIPOffset<tflite::Tensor<'builder>> {
    let buffer = t.data.as_ref().map_or(0, |data| buffers.add(builder, data));
    let shape: Vec<i32> = t.shape.iter().map(|&d| d as i32).collect();
    let shape = builder.create_vector(&shape);
    let name = builder.create_string(&t.name);
    let quantization = t.quant.as_ref().map(|q| {
        let scale = builder.create_vector(&q.scale);
        let zero_point = builder.create_vector(&q.zero_point);
        tflite::QuantizationParameters::create(
            builder,
            &tflite::QuantizationParametersArgs {
                scale: Some(scale),
                zero_point: Some(zero_point),
                quantized_dimension: q.axis as i32,
                ..Default::default()
            },
        )
    });
    let sparsity = t.sparsity.as_ref().map(|s| write_sparsity(builder, s));
    tflite::Tensor::create(
        builder,
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
    )
}

/// The operators, each with its options from its family, and the opcodes they use in order
/// of first use.
type Operators<'builder> = (
    Vec<WIPOffset<tflite::Operator<'builder>>>,
    Vec<BuiltinOperator>,
);

fn write_operators<'builder>(
    builder: &mut FlatBufferBuilder<'builder>,
    graph: &Graph,
) -> Result<Operators<'builder>> {
    let mut codes: Vec<BuiltinOperator> = vec![];
    let mut operators = vec![];
    for node in &graph.nodes {
        let code = node.op.opcode();
        let options = node.op.family().write_options(
            &node.op,
            &mut OptionsWriter {
                builder,
                graph,
                node,
            },
        )?;
        let opcode_index = match codes.iter().position(|c| *c == code) {
            Some(i) => i,
            None => {
                codes.push(code);
                codes.len() - 1
            }
        } as u32;
        let ids = |v: &[TensorId]| v.iter().map(|&i| i as i32).collect::<Vec<i32>>();
        let inputs = builder.create_vector(&ids(&node.inputs));
        let outputs = builder.create_vector(&ids(&node.outputs));
        operators.push(tflite::Operator::create(
            builder,
            &tflite::OperatorArgs {
                opcode_index,
                inputs: Some(inputs),
                outputs: Some(outputs),
                builtin_options_type: options.kind,
                builtin_options: options.table,
                ..Default::default()
            },
        ));
    }
    Ok((operators, codes))
}

/// The opcode table. Codes below 127 also go in `deprecated_builtin_code`, as TFLite
/// writes them; with `legacy`, only there.
fn write_operator_codes<'builder>(
    builder: &mut FlatBufferBuilder<'builder>,
    codes: &[BuiltinOperator],
    legacy: bool,
) -> WIPOffset<
    flatbuffers::Vector<'builder, flatbuffers::ForwardsUOffset<tflite::OperatorCode<'builder>>>,
> {
    let codes: Vec<_> = codes
        .iter()
        .map(|&code| {
            let (deprecated, builtin) = match (code.0 < 127, legacy) {
                (true, true) => (code.0 as i8, BuiltinOperator(0)),
                (true, false) => (code.0 as i8, code),
                (false, _) => (127, code),
            };
            tflite::OperatorCode::create(
                builder,
                &tflite::OperatorCodeArgs {
                    deprecated_builtin_code: deprecated,
                    custom_code: None,
                    version: 1,
                    builtin_code: builtin,
                },
            )
        })
        .collect();
    builder.create_vector(&codes)
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
    builder: &mut FlatBufferBuilder<'a>,
    s: &Sparsity,
) -> WIPOffset<tflite::SparsityParameters<'a>> {
    let as_i32 = |v: &[usize]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
    let mut dims = vec![];
    for d in &s.dim_metadata {
        dims.push(match d {
            DimMeta::Dense { size } => tflite::DimensionMetadata::create(
                builder,
                &tflite::DimensionMetadataArgs {
                    format: tflite::DimensionType::DENSE,
                    dense_size: *size as i32,
                    ..Default::default()
                },
            ),
            DimMeta::Csr { segments, indices } => {
                let seg = builder.create_vector(&as_i32(segments));
                let seg = tflite::Int32Vector::create(
                    builder,
                    &tflite::Int32VectorArgs { values: Some(seg) },
                );
                let ind = builder.create_vector(&as_i32(indices));
                let ind = tflite::Int32Vector::create(
                    builder,
                    &tflite::Int32VectorArgs { values: Some(ind) },
                );
                tflite::DimensionMetadata::create(
                    builder,
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
    let traversal_order = builder.create_vector(&as_i32(&s.traversal_order));
    let block_map = builder.create_vector(&as_i32(&s.block_map));
    let dim_metadata = builder.create_vector(&dims);
    tflite::SparsityParameters::create(
        builder,
        &tflite::SparsityParametersArgs {
            traversal_order: Some(traversal_order),
            block_map: Some(block_map),
            dim_metadata: Some(dim_metadata),
        },
    )
}
