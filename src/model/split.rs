//! Splitting a normalised graph into layers, and putting layers back together.
//!
//! A layer is one weighted op (conv, depthwise conv, fully connected, matmul with a constant
//! operand) and the weightless ops that follow it in the graph's order; ops before the first
//! weighted op join the first layer. A layer reads any tensors produced earlier (residual
//! adds, concatenations) and hands on every tensor a later layer or the caller needs.

use super::graph::*;
use anyhow::{Context, Result, ensure};
use std::collections::HashMap;

/// What a layer's weighted op is: the scheduler's estimates and DeepEye's pools depend
/// on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerKind {
    /// CONV_2D.
    Conv,
    /// DEPTHWISE_CONV_2D.
    DwConv,
    /// FULLY_CONNECTED or BATCH_MATMUL with constant weights.
    Fc,
    /// No weighted op: the weightless ops before the model's first weighted one.
    Other,
}

impl LayerKind {
    /// The kind of layer `node` starts: `None` for a weightless op, which joins the layer
    /// before it.
    pub fn of(graph: &Graph, node: &Node) -> Option<LayerKind> {
        node.op.family().weighted_layer(graph, node)
    }

    /// The name manifests and profiles use.
    pub fn name(self) -> &'static str {
        match self {
            LayerKind::Conv => "conv",
            LayerKind::DwConv => "dwconv",
            LayerKind::Fc => "fc",
            LayerKind::Other => "other",
        }
    }
}

/// One layer of a graph: which nodes, and what crosses its boundary.
#[derive(Clone, Debug)]
pub(crate) struct LayerPlan {
    pub kind: LayerKind,
    pub nodes: std::ops::Range<usize>,
    /// Activations read from earlier layers or the graph inputs, in order of first use.
    pub inputs: Vec<TensorId>,
    /// Activations a later layer or the caller reads, in order of production.
    pub outputs: Vec<TensorId>,
}

pub(crate) fn plan_layers(graph: &Graph) -> Vec<LayerPlan> {
    let mut bounds: Vec<(usize, LayerKind)> = vec![];
    for (ix, node) in graph.nodes.iter().enumerate() {
        if let Some(kind) = LayerKind::of(graph, node) {
            match bounds.last_mut() {
                // Leading weightless ops belong to the first weighted op.
                Some((_, k @ LayerKind::Other)) => *k = kind,
                _ => bounds.push((ix, kind)),
            }
        } else if bounds.is_empty() {
            bounds.push((0, LayerKind::Other));
        }
    }
    let layer_of_node: Vec<usize> = {
        let mut v = vec![0; graph.nodes.len()];
        for (l, w) in bounds.iter().enumerate() {
            let end = bounds.get(l + 1).map(|b| b.0).unwrap_or(graph.nodes.len());
            v[w.0..end].iter_mut().for_each(|x| *x = l);
        }
        v
    };
    let mut producer_layer: HashMap<TensorId, usize> = HashMap::new();
    for (ix, node) in graph.nodes.iter().enumerate() {
        for &o in &node.outputs {
            producer_layer.insert(o, layer_of_node[ix]);
        }
    }
    let mut plans: Vec<LayerPlan> = bounds
        .iter()
        .enumerate()
        .map(|(l, &(start, kind))| {
            let end = bounds.get(l + 1).map(|b| b.0).unwrap_or(graph.nodes.len());
            LayerPlan {
                kind,
                nodes: start..end,
                inputs: vec![],
                outputs: vec![],
            }
        })
        .collect();
    for (ix, node) in graph.nodes.iter().enumerate() {
        let here = layer_of_node[ix];
        for &i in &node.inputs {
            if graph.tensors[i].is_const() {
                continue;
            }
            let from = producer_layer.get(&i).copied();
            if from != Some(here) && !plans[here].inputs.contains(&i) {
                plans[here].inputs.push(i);
            }
            if let Some(from) = from.filter(|&f| f != here)
                && !plans[from].outputs.contains(&i)
            {
                plans[from].outputs.push(i);
            }
        }
    }
    for &o in &graph.outputs {
        if let Some(&from) = producer_layer.get(&o)
            && !plans[from].outputs.contains(&o)
        {
            plans[from].outputs.push(o);
        }
    }
    // Production order, so a layer's outputs read the same way every time.
    for p in &mut plans {
        let order: HashMap<TensorId, usize> = graph.nodes[p.nodes.clone()]
            .iter()
            .enumerate()
            .flat_map(|(k, n)| n.outputs.iter().map(move |&o| (o, k)))
            .collect();
        p.outputs.sort_by_key(|o| order[o]);
    }
    plans
}

/// The layer as a graph of its own.
pub(crate) fn extract_layer(graph: &Graph, plan: &LayerPlan) -> Graph {
    let mut sub = Graph::default();
    let mut map: HashMap<TensorId, TensorId> = HashMap::new();
    let mut take = |sub: &mut Graph, t: TensorId| {
        *map.entry(t)
            .or_insert_with(|| sub.add_tensor(graph.tensors[t].clone()))
    };
    sub.inputs = plan.inputs.iter().map(|&t| take(&mut sub, t)).collect();
    for node in &graph.nodes[plan.nodes.clone()] {
        let inputs = node.inputs.iter().map(|&t| take(&mut sub, t)).collect();
        let outputs = node.outputs.iter().map(|&t| take(&mut sub, t)).collect();
        sub.nodes.push(Node {
            op: node.op.clone(),
            inputs,
            outputs,
        });
    }
    sub.outputs = plan.outputs.iter().map(|&t| take(&mut sub, t)).collect();
    sub
}

/// Rebuilds the whole graph from its layers, joining tensors by name.
pub(crate) fn stitch(layers: &[Graph], inputs: &[String], outputs: &[String]) -> Result<Graph> {
    let mut whole = Graph::default();
    let mut by_name: HashMap<String, TensorId> = HashMap::new();
    for (l, layer) in layers.iter().enumerate() {
        let mut local = Vec::with_capacity(layer.tensors.len());
        for t in &layer.tensors {
            let id = match by_name.get(&t.name) {
                Some(&id) => {
                    let e = &whole.tensors[id];
                    ensure!(
                        e.shape == t.shape && e.dtype == t.dtype,
                        "layer {l}: tensor '{}' is {:?} {} here but {:?} {} in an earlier layer",
                        t.name,
                        t.shape,
                        t.dtype.name(),
                        e.shape,
                        e.dtype.name()
                    );
                    id
                }
                None => {
                    let id = whole.add_tensor(t.clone());
                    by_name.insert(t.name.clone(), id);
                    id
                }
            };
            local.push(id);
        }
        for node in &layer.nodes {
            let inputs = node.inputs.iter().map(|&t| local[t]).collect();
            let outputs = node.outputs.iter().map(|&t| local[t]).collect();
            whole.nodes.push(Node {
                op: node.op.clone(),
                inputs,
                outputs,
            });
        }
    }
    let find = |name: &String| {
        by_name
            .get(name)
            .copied()
            .with_context(|| format!("no layer mentions tensor '{name}'"))
    };
    whole.inputs = inputs.iter().map(find).collect::<Result<_>>()?;
    whole.outputs = outputs.iter().map(find).collect::<Result<_>>()?;
    whole.canonicalise();
    whole.check_structure()?;
    Ok(whole)
}

impl Graph {
    /// Renumbers tensors in order of first mention (inputs, then each node's inputs and
    /// outputs), dropping unused ones. Two graphs with the same nodes then serialise to the
    /// same bytes, whatever order their tensor tables had.
    pub(crate) fn canonicalise(&mut self) {
        let mut order: Vec<TensorId> = vec![];
        let mut seen = vec![false; self.tensors.len()];
        let mut visit = |t: TensorId, order: &mut Vec<TensorId>| {
            if !seen[t] {
                seen[t] = true;
                order.push(t);
            }
        };
        self.inputs.iter().for_each(|&t| visit(t, &mut order));
        for node in &self.nodes {
            node.inputs
                .iter()
                .chain(&node.outputs)
                .for_each(|&t| visit(t, &mut order));
        }
        self.outputs.iter().for_each(|&t| visit(t, &mut order));
        let mut remap = vec![usize::MAX; self.tensors.len()];
        for (new, &old) in order.iter().enumerate() {
            remap[old] = new;
        }
        let mut old: Vec<Option<Tensor>> = std::mem::take(&mut self.tensors)
            .into_iter()
            .map(Some)
            .collect();
        self.tensors = order
            .iter()
            .map(|&o| old[o].take().expect("visited once"))
            .collect();
        for node in &mut self.nodes {
            node.inputs
                .iter_mut()
                .chain(node.outputs.iter_mut())
                .for_each(|t| *t = remap[*t]);
        }
        self.inputs
            .iter_mut()
            .chain(self.outputs.iter_mut())
            .for_each(|t| *t = remap[*t]);
    }
}

/// Splits every fully-connected layer whose weights exceed `max_bytes` into column blocks
/// (groups of output units) joined by a CONCATENATION, so that no single layer needs more
/// memory than a small board can give it (AlexNet's fc6 alone is 144 MiB). Each block is a
/// layer of its own; its weights are a slice of the original rows, not a copy. Every output
/// value is the same dot product as before. Returns how many layers were split.
pub(crate) fn split_large_fully_connected(graph: &mut Graph, max_bytes: u64) -> Result<usize> {
    let nodes = std::mem::take(&mut graph.nodes);
    let mut out = Vec::with_capacity(nodes.len());
    let mut split = 0;
    for node in nodes {
        let Op::FullyConnected {
            activation,
            keep_num_dims: false,
        } = node.op
        else {
            out.push(node);
            continue;
        };
        let (x, w, b) = (node.inputs[0], node.inputs[1], node.inputs[2]);
        let weights = &graph.tensors[w];
        let bytes = weights.bytes() as u64;
        if bytes <= max_bytes
            || !weights.is_const()
            || weights.dtype != DType::F32
            || weights.shape.len() != 2
            || graph.tensors[x].shape.len() != 2
        {
            out.push(node);
            continue;
        }
        let (units, inner) = (weights.shape[0], weights.shape[1]);
        let blocks = (bytes.div_ceil(max_bytes) as usize).min(units);
        let row_bytes = inner * 4;
        let w_data = weights.data.clone().context("weights without data")?;
        let b_data = graph.tensors[b]
            .data
            .clone()
            .context("fully-connected bias must be constant")?;
        ensure!(
            graph.tensors[b].dtype == DType::F32 && b_data.len() == units * 4,
            "bias of '{}' is not {units} f32 values",
            weights.name
        );
        let out_name = graph.tensors[node.outputs[0]].name.clone();
        let batch = graph.tensors[x].shape[0];
        let mut parts = vec![];
        for k in 0..blocks {
            let (lo, hi) = (k * units / blocks, (k + 1) * units / blocks);
            let wk = graph.add_tensor(Tensor::constant(
                graph.fresh_name(&format!("{out_name}/weights_{k}")),
                vec![hi - lo, inner],
                DType::F32,
                w_data.slice(lo * row_bytes..hi * row_bytes),
            ));
            let bk = graph.add_tensor(Tensor::constant(
                graph.fresh_name(&format!("{out_name}/bias_{k}")),
                vec![hi - lo],
                DType::F32,
                b_data.slice(lo * 4..hi * 4),
            ));
            let yk = graph.add_tensor(Tensor::activation(
                graph.fresh_name(&format!("{out_name}/part_{k}")),
                vec![batch, hi - lo],
                DType::F32,
            ));
            out.push(Node {
                op: Op::FullyConnected {
                    activation,
                    keep_num_dims: false,
                },
                inputs: vec![x, wk, bk],
                outputs: vec![yk],
            });
            parts.push(yk);
        }
        out.push(Node {
            op: Op::Concatenation {
                axis: 1,
                activation: Activation::None,
            },
            inputs: parts,
            outputs: node.outputs.clone(),
        });
        split += 1;
    }
    graph.nodes = out;
    if split > 0 {
        graph.canonicalise();
    }
    Ok(split)
}
