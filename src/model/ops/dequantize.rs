//! DEQUANTIZE of float16 and affine-quantised integer constants, folded at import into
//! float32 constants.

use super::{Op, OpFamily, OptionsWriter, Registry, WrittenOptions};
use crate::model::graph::{DType, Graph, Node, OpInputs, Quant, Tensor, f32_bytes};
use anyhow::{Context, Result, bail, ensure};
use tract_core::prelude::f16;
use tract_tflite::tflite::{BuiltinOperator, BuiltinOptions};

pub(super) struct Dequantize;

impl OpFamily for Dequantize {
    fn register(&self, registry: &mut Registry) {
        registry.add_plain(BuiltinOperator::DEQUANTIZE, Op::Dequantize);
    }

    fn output_shape(&self, _op: &Op, inputs: &OpInputs) -> Result<Vec<usize>> {
        inputs.elementwise_shape()
    }

    fn write_options(&self, _op: &Op, writer: &mut OptionsWriter) -> Result<WrittenOptions> {
        Ok(writer.empty_table(BuiltinOptions::DequantizeOptions))
    }

    fn output_dtype(&self, _op: &Op, _first_input: DType) -> DType {
        DType::F32
    }

    fn flops(&self, _graph: &Graph, _node: &Node) -> u64 {
        0
    }

    fn fold_constant(&self, graph: &mut Graph, node: &Node) -> Result<Option<&'static str>> {
        let source = &graph.tensors[node.inputs[0]];
        ensure!(
            source.is_const(),
            "dequantising a computed tensor means int8 activations, which are not supported"
        );
        let values = dequantize(source)?;
        let kind = if source.dtype == DType::F16 {
            "dequantize-f16"
        } else {
            "dequantize-int"
        };
        ensure!(
            graph.tensors[node.outputs[0]].shape == source.shape,
            "output shape differs from input"
        );
        let out = &mut graph.tensors[node.outputs[0]];
        out.data = Some(f32_bytes(&values));
        out.dtype = DType::F32;
        Ok(Some(kind))
    }

    fn unrunnable(&self, _op: &Op) -> Option<String> {
        super::survived_normalisation()
    }
}

/// float16 or affine-quantised integer constant → f32 values.
pub fn dequantize(t: &Tensor) -> Result<Vec<f32>> {
    let data = t.data.as_ref().context("not a constant")?;
    let n = t.elements();
    let q = t.quant.clone().unwrap_or(Quant {
        scale: vec![1.0],
        zero_point: vec![0],
        axis: 0,
    });
    let channel = |i: usize| -> usize {
        if q.scale.len() <= 1 || t.shape.is_empty() {
            return 0;
        }
        let inner: usize = t.shape[q.axis.min(t.shape.len() - 1) + 1..]
            .iter()
            .product();
        (i / inner.max(1)) % t.shape[q.axis.min(t.shape.len() - 1)]
    };
    if q.scale.len() > 1 {
        ensure!(
            q.axis < t.shape.len() && q.scale.len() == t.shape[q.axis],
            "{} scales for axis {} of {:?}",
            q.scale.len(),
            q.axis,
            t.shape
        );
    }
    let zero_point = |c: usize| {
        q.zero_point
            .get(c)
            .or(q.zero_point.first())
            .copied()
            .unwrap_or(0) as f32
    };
    let affine = |i: usize, v: f32| (v - zero_point(channel(i))) * q.scale[channel(i)];
    let need = n * t.dtype.size();
    ensure!(
        data.len() == need,
        "{} bytes where {} are needed",
        data.len(),
        need
    );
    Ok(match t.dtype {
        DType::F16 => data
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::I8 => data
            .iter()
            .enumerate()
            .map(|(i, &b)| affine(i, b as i8 as f32))
            .collect(),
        DType::U8 => data
            .iter()
            .enumerate()
            .map(|(i, &b)| affine(i, b as f32))
            .collect(),
        DType::I16 => data
            .chunks_exact(2)
            .enumerate()
            .map(|(i, c)| affine(i, i16::from_le_bytes([c[0], c[1]]) as f32))
            .collect(),
        dt => bail!("cannot turn {} into float", dt.name()),
    })
}
