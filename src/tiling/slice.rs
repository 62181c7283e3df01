//! A layer planned as several plans over slices of its output channels. Tract's planning
//! peak is about four copies of an op's kernel (see `predictor.rs`); for a layer with a
//! large kernel that peak, not any activation, bounds memory once the early layers are
//! tiled. A slice of output channels needs only its rows of the kernel (OHWI: contiguous).

use super::region::Span;
use crate::model::graph::{Graph, Op, Tensor, TensorId};
use anyhow::{Context, Result, bail, ensure};
use std::collections::HashMap;

/// The layer's output channel count, if the layer can be sliced: one CONV_2D reading the
/// layer's input, followed only by ops that work per channel and hold no constants.
pub fn sliceable_channels(g: &Graph) -> Result<usize> {
    ensure!(
        g.inputs.len() == 1 && g.outputs.len() == 1,
        "a sliced layer reads one activation and produces one"
    );
    let Some((first, rest)) = g.nodes.split_first() else {
        bail!("the layer has no ops");
    };
    ensure!(
        matches!(first.op, Op::Conv2d(_)) && first.inputs[0] == g.inputs[0],
        "a sliced layer starts with the CONV_2D that reads its input"
    );
    for node in rest {
        ensure!(
            matches!(
                node.op,
                Op::Unary(_) | Op::LeakyRelu { .. } | Op::MaxPool2d(_) | Op::AvgPool2d(_)
            ) && node.inputs.iter().all(|&t| !g.tensors[t].is_const()),
            "{} after the convolution does not work per channel",
            node.op.name()
        );
    }
    let out = &g.tensors[g.outputs[0]].shape;
    ensure!(out.len() == 4, "output {:?} is not NHWC", out);
    Ok(out[3])
}

/// The layer computing only output channels `channels`: the kernel's and bias's rows for
/// them (shared with the layer's buffers, not copied), the ops after unchanged.
pub(crate) fn channel_slice(g: &Graph, channels: Span) -> Result<Graph> {
    let total = sliceable_channels(g)?;
    ensure!(
        !channels.is_empty() && channels.end <= total,
        "channels {}..{} outside 0..{total}",
        channels.start,
        channels.end
    );
    let mut out = Graph::default();
    let mut map: HashMap<TensorId, TensorId> = HashMap::new();
    let x = out.add_tensor(g.tensors[g.inputs[0]].clone());
    out.inputs = vec![x];
    map.insert(g.inputs[0], x);
    for (ix, node) in g.nodes.iter().enumerate() {
        let mut inputs = vec![];
        for (slot, &t) in node.inputs.iter().enumerate() {
            if ix == 0 && slot > 0 {
                inputs.push(out.add_tensor(rows(&g.tensors[t], channels, total)?));
            } else {
                inputs.push(*map.get(&t).context("an op reads a tensor of another op")?);
            }
        }
        let name = &g.tensors[node.outputs[0]].name;
        let id = out.add_node(node.op.clone(), inputs, &[name])?[0];
        map.insert(node.outputs[0], id);
    }
    out.outputs = vec![map[&g.outputs[0]]];
    Ok(out)
}

/// Rows `channels` of a constant whose first axis is the output channel (kernel, bias).
fn rows(t: &Tensor, channels: Span, total: usize) -> Result<Tensor> {
    ensure!(
        t.shape.first() == Some(&total) && t.quant.is_none() && t.sparsity.is_none(),
        "'{}' {:?} is not a plain constant of {total} rows",
        t.name,
        t.shape
    );
    let data = t.data.as_ref().context("weights are not constant")?;
    let row = data.len() / total;
    let mut shape = t.shape.clone();
    shape[0] = channels.len();
    Ok(Tensor {
        shape,
        data: Some(data.slice(channels.start * row..channels.end * row)),
        ..t.clone()
    })
}
