//! A fused group: consecutive layers joined into one graph that reads one activation and
//! produces one, made only of ops a tile can run on a region of the feature map. For a
//! tile of the output, [`Group::geometry`] walks the graph backwards to the region each
//! tensor must be computed on, and [`Group::tile_graph`] writes the graph that computes the
//! tile from its input region alone.

use super::region::{Need, Span, Window};
use crate::model::graph::{DType, Graph, Op, Padding, Tensor, TensorId};
use anyhow::{Context, Result, bail, ensure};
use std::collections::HashMap;

/// How a node maps output regions to input regions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Reach {
    /// Each output position reads the same position of its inputs (activations, adds,
    /// channel padding, channel concatenation).
    Pointwise,
    /// A sliding window over H and W, and what its padding reads as.
    Window { h: Window, w: Window, pad: PadValue },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum PadValue {
    /// Convolutions read zeros.
    Zero,
    /// Max pools ignore padding: the lowest float never wins a window that holds at least
    /// one real element, and every window does (padding is less than the window).
    Lowest,
}

/// One rectangle of a feature map, rows × columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Region {
    pub(crate) h: Span,
    pub(crate) w: Span,
}

impl Region {
    pub(crate) fn hull(self, o: Region) -> Region {
        Region {
            h: self.h.hull(o.h),
            w: self.w.hull(o.w),
        }
    }

    pub(crate) fn area(self) -> usize {
        self.h.len() * self.w.len()
    }
}

/// What a node reads from one activation input: a region and padding on each side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Read {
    pub(crate) h: Need,
    pub(crate) w: Need,
}

impl Read {
    fn region(&self) -> Region {
        Region {
            h: self.h.span,
            w: self.w.span,
        }
    }

    fn padded(&self) -> bool {
        self.h.pad_before + self.h.pad_after + self.w.pad_before + self.w.pad_after > 0
    }
}

/// Consecutive layers as one graph of convolutions and pools (and elementwise ops), with
/// what each op's output reads of its input, so that any tile can be cut out of it.
#[derive(Clone, Debug)]
pub struct Group {
    pub(crate) graph: Graph,
    pub(crate) input: TensorId,
    pub(crate) output: TensorId,
    pub(crate) reach: Vec<Reach>,
}

/// Where one tile's tensors live in the whole feature maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Per tensor of the group graph, the region computed for this tile (constants: none).
    pub(crate) regions: Vec<Option<Region>>,
    /// Per node, per input: what it reads (constants: none).
    pub(crate) reads: Vec<Vec<Option<Read>>>,
    /// Per node, per input: the region of the tensor it reads from (constants: none).
    sources: Vec<Vec<Option<Region>>>,
}

impl Geometry {
    /// Identifies the tile graph: tiles with equal keys run the same plan. It holds every
    /// extent, offset and pad relative to the tile, not where the tile is.
    pub(crate) fn key(&self) -> Vec<usize> {
        let mut key = vec![];
        for r in self.regions.iter().flatten() {
            key.extend([r.h.len(), r.w.len()]);
        }
        for (node, reads) in self.reads.iter().enumerate() {
            for (slot, read) in reads.iter().enumerate() {
                let Some(read) = read else { continue };
                // The tensor read is an input of node `node`; its region is known.
                let from = self.source_region(node, slot);
                key.extend([
                    read.h.span.start - from.h.start,
                    read.h.span.len(),
                    read.h.pad_before,
                    read.h.pad_after,
                    read.w.span.start - from.w.start,
                    read.w.span.len(),
                    read.w.pad_before,
                    read.w.pad_after,
                ]);
            }
        }
        key
    }

    fn source_region(&self, node: usize, slot: usize) -> Region {
        self.sources[node][slot].expect("activation inputs have regions")
    }
}

impl Group {
    /// Checks that `graph` can be tiled: one activation in, one out, every node pointwise
    /// or a window over H and W, every activation rank 4.
    pub fn new(graph: Graph) -> Result<Group> {
        ensure!(
            graph.inputs.len() == 1 && graph.outputs.len() == 1,
            "a tiled group reads one activation and produces one; this one reads {} and produces {}",
            graph.inputs.len(),
            graph.outputs.len()
        );
        let (input, output) = (graph.inputs[0], graph.outputs[0]);
        let reach = graph
            .nodes
            .iter()
            .enumerate()
            .map(|(ix, node)| {
                reach_of(&graph, ix).with_context(|| format!("operator #{ix} ({})", node.op.name()))
            })
            .collect::<Result<Vec<_>>>()?;
        for node in &graph.nodes {
            ensure!(
                node.outputs.len() == 1,
                "{} has {} outputs",
                node.op.name(),
                node.outputs.len()
            );
        }
        Ok(Group {
            graph,
            input,
            output,
            reach,
        })
    }

    /// `[n, h, w, c]` of a tensor.
    pub fn shape(&self, t: TensorId) -> [usize; 4] {
        let s = &self.graph.tensors[t].shape;
        [s[0], s[1], s[2], s[3]]
    }

    /// The NHWC shape of the group's output.
    pub fn output_shape(&self) -> [usize; 4] {
        self.shape(self.output)
    }

    /// The regions each tensor is computed on for the output tile `tile`, from the output
    /// back to the input: a tensor read by several nodes is computed on the hull of what
    /// they read.
    pub(crate) fn geometry(&self, tile: Region) -> Result<Geometry> {
        let g = &self.graph;
        let [_, oh, ow, _] = self.output_shape();
        ensure!(
            tile.h.end <= oh && tile.w.end <= ow && tile.area() > 0,
            "tile {tile:?} outside the {oh}×{ow} output"
        );
        let mut regions: Vec<Option<Region>> = vec![None; g.tensors.len()];
        let mut reads: Vec<Vec<Option<Read>>> =
            g.nodes.iter().map(|n| vec![None; n.inputs.len()]).collect();
        regions[self.output] = Some(tile);
        for (ix, node) in g.nodes.iter().enumerate().rev() {
            let Some(out) = regions[node.outputs[0]] else {
                continue;
            };
            for (slot, &t) in node.inputs.iter().enumerate() {
                if g.tensors[t].is_const() {
                    continue;
                }
                let read = match self.reach[ix] {
                    Reach::Pointwise => Read {
                        h: unpadded(out.h),
                        w: unpadded(out.w),
                    },
                    Reach::Window { h, w, .. } => Read {
                        h: h.needs(out.h)?,
                        w: w.needs(out.w)?,
                    },
                };
                reads[ix][slot] = Some(read);
                regions[t] = Some(match regions[t] {
                    Some(r) => r.hull(read.region()),
                    None => read.region(),
                });
            }
        }
        let sources = g
            .nodes
            .iter()
            .map(|n| n.inputs.iter().map(|&t| regions[t]).collect())
            .collect();
        ensure!(
            regions[self.input].is_some(),
            "the group's output does not depend on its input"
        );
        Ok(Geometry {
            regions,
            reads,
            sources,
        })
    }

    /// The graph that computes the tile of `geo` from its input region: each read is a
    /// SLICE of the region computed when that is larger, then the border padding as an
    /// explicit PAD, then the op with VALID padding.
    pub(crate) fn tile_graph(&self, geo: &Geometry) -> Result<Graph> {
        let g = &self.graph;
        let mut tile = Graph::default();
        let mut map: HashMap<TensorId, TensorId> = HashMap::new();
        let region_of = |t: TensorId| geo.regions[t].context("tensor outside the tile's reach");
        let [n, _, _, c] = self.shape(self.input);
        let r = region_of(self.input)?;
        let x = tile.add_tensor(Tensor::activation(
            g.tensors[self.input].name.clone(),
            vec![n, r.h.len(), r.w.len(), c],
            DType::F32,
        ));
        tile.inputs = vec![x];
        map.insert(self.input, x);
        for (ix, node) in g.nodes.iter().enumerate() {
            let mut inputs = Vec::with_capacity(node.inputs.len());
            for (slot, &t) in node.inputs.iter().enumerate() {
                if g.tensors[t].is_const() {
                    let id = *map
                        .entry(t)
                        .or_insert_with(|| tile.add_tensor(g.tensors[t].clone()));
                    inputs.push(id);
                    continue;
                }
                let read = geo.reads[ix][slot].context("activation read without a region")?;
                let id = *map.get(&t).with_context(|| {
                    format!("'{}' read before it is computed", g.tensors[t].name)
                })?;
                inputs.push(self.tile_read(&mut tile, ix, t, id, read, region_of(t)?)?);
            }
            let out = node.outputs[0];
            let id = tile.add_node(valid_op(&node.op), inputs, &[&g.tensors[out].name])?[0];
            let want = region_of(out)?;
            ensure!(
                tile.tensors[id].shape[1..3] == [want.h.len(), want.w.len()],
                "operator #{ix} ({}) computes {:?} on the tile, expected {}×{}",
                node.op.name(),
                tile.tensors[id].shape,
                want.h.len(),
                want.w.len()
            );
            map.insert(out, id);
        }
        tile.outputs = vec![map[&self.output]];
        Ok(tile)
    }

    /// What node `ix` reads of activation `t` (`id` in the tile graph, computed over
    /// `have`): the slice it reads when `have` is larger, padded at the borders.
    fn tile_read(
        &self,
        tile: &mut Graph,
        ix: usize,
        t: TensorId,
        mut id: TensorId,
        read: Read,
        have: Region,
    ) -> Result<TensorId> {
        let name = self.graph.tensors[t].name.clone();
        if read.region() != have {
            let [n, _, _, c] = self.shape(t);
            let begin = tile.add_tensor(Tensor::i32_constant(
                tile.fresh_name(&format!("{name}/tile_begin")),
                &[
                    0,
                    (read.h.span.start - have.h.start) as i32,
                    (read.w.span.start - have.w.start) as i32,
                    0,
                ],
            ));
            let size = tile.add_tensor(Tensor::i32_constant(
                tile.fresh_name(&format!("{name}/tile_size")),
                &[
                    n as i32,
                    read.h.span.len() as i32,
                    read.w.span.len() as i32,
                    c as i32,
                ],
            ));
            id = tile.add_node(
                Op::Slice,
                vec![id, begin, size],
                &[&format!("{name}/tile_slice")],
            )?[0];
        }
        if !read.padded() {
            return Ok(id);
        }
        let Reach::Window { pad, .. } = self.reach[ix] else {
            bail!("a pointwise op reads padding");
        };
        let pads = tile.add_tensor(Tensor::constant(
            tile.fresh_name(&format!("{name}/tile_pads")),
            vec![4, 2],
            DType::I32,
            [
                0,
                0,
                read.h.pad_before as i32,
                read.h.pad_after as i32,
                read.w.pad_before as i32,
                read.w.pad_after as i32,
                0,
                0,
            ]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
        ));
        let padded = match pad {
            PadValue::Zero => {
                tile.add_node(Op::Pad, vec![id, pads], &[&format!("{name}/tile_pad")])?
            }
            PadValue::Lowest => {
                let value = tile.add_tensor(Tensor::f32_constant(
                    tile.fresh_name(&format!("{name}/tile_pad_value")),
                    vec![],
                    &[f32::MIN],
                ));
                tile.add_node(
                    Op::PadV2,
                    vec![id, pads, value],
                    &[&format!("{name}/tile_pad")],
                )?
            }
        };
        Ok(padded[0])
    }
}

/// `op` with VALID padding: on a tile the padding is explicit.
fn valid_op(op: &Op) -> Op {
    match op {
        Op::Conv2d(p) => Op::Conv2d(valid(*p)),
        Op::DepthwiseConv2d {
            conv,
            depth_multiplier,
        } => Op::DepthwiseConv2d {
            conv: valid(*conv),
            depth_multiplier: *depth_multiplier,
        },
        Op::MaxPool2d(p) => Op::MaxPool2d(crate::model::graph::PoolParams {
            padding: Padding::Valid,
            ..*p
        }),
        Op::AvgPool2d(p) => Op::AvgPool2d(crate::model::graph::PoolParams {
            padding: Padding::Valid,
            ..*p
        }),
        op => op.clone(),
    }
}

fn unpadded(span: Span) -> Need {
    Need {
        span,
        pad_before: 0,
        pad_after: 0,
    }
}

fn valid(p: crate::model::graph::ConvParams) -> crate::model::graph::ConvParams {
    crate::model::graph::ConvParams {
        padding: Padding::Valid,
        ..p
    }
}

/// An elementwise op's reach (pointwise), if its inputs line up with its output `out`
/// over H and W (constants broadcast over them).
fn elementwise_reach(g: &Graph, inputs: &[TensorId], out: &[usize]) -> Result<Reach> {
    for &t in inputs {
        let s = g.tensors[t].shape.as_slice();
        if g.tensors[t].is_const() {
            // Aligned right against NHWC: H and W must broadcast.
            let r = s.len();
            ensure!(
                (r < 3 || s[r - 3] == 1) && (r < 2 || s[r - 2] == 1) && r <= 4,
                "constant {:?} varies over H or W",
                s
            );
        } else {
            ensure!(
                s[1..3] == out[1..3],
                "input {:?} does not match output {:?} over H and W",
                s,
                out
            );
        }
    }
    Ok(Reach::Pointwise)
}

/// How node `ix` reaches back into its inputs, or why it cannot be tiled.
fn reach_of(g: &Graph, ix: usize) -> Result<Reach> {
    let node = &g.nodes[ix];
    let shape = |t: TensorId| g.tensors[t].shape.as_slice();
    let activations: Vec<TensorId> = node
        .inputs
        .iter()
        .copied()
        .filter(|&t| !g.tensors[t].is_const())
        .collect();
    let out = shape(node.outputs[0]);
    ensure!(out.len() == 4, "output {:?} is not NHWC", out);
    for &a in &activations {
        ensure!(shape(a).len() == 4, "input {:?} is not NHWC", shape(a));
    }
    let window = |kh: usize, kw: usize, stride: [usize; 2], dilation: [usize; 2], padding| {
        ensure!(
            activations == [node.inputs[0]],
            "only the first input of a window op may be an activation"
        );
        let x = shape(node.inputs[0]);
        Ok::<_, anyhow::Error>((
            Window::new(x[1], kh, stride[0], dilation[0], padding)?,
            Window::new(x[2], kw, stride[1], dilation[1], padding)?,
        ))
    };
    Ok(match &node.op {
        Op::Conv2d(p) | Op::DepthwiseConv2d { conv: p, .. } => {
            let k = shape(node.inputs[1]);
            ensure!(k.len() == 4, "filter {:?} is not rank 4", k);
            let (h, w) = window(k[1], k[2], p.stride, p.dilation, p.padding)?;
            Reach::Window {
                h,
                w,
                pad: PadValue::Zero,
            }
        }
        Op::MaxPool2d(p) => {
            let (h, w) = window(p.filter[0], p.filter[1], p.stride, [1, 1], p.padding)?;
            Reach::Window {
                h,
                w,
                pad: PadValue::Lowest,
            }
        }
        Op::AvgPool2d(p) => {
            let (h, w) = window(p.filter[0], p.filter[1], p.stride, [1, 1], p.padding)?;
            // TFLite divides by the number of real elements in the window: no padding value
            // gives that, so only pools that never pad can be tiled.
            ensure!(
                h.pad_before == 0
                    && w.pad_before == 0
                    && (h.output - 1) * h.stride + h.kernel <= h.input
                    && (w.output - 1) * w.stride + w.kernel <= w.input,
                "an average pool that pads cannot be tiled"
            );
            Reach::Window {
                h,
                w,
                pad: PadValue::Zero,
            }
        }
        Op::Unary(_) | Op::LeakyRelu { .. } | Op::Binary { .. } => {
            elementwise_reach(g, &node.inputs, out)?
        }
        Op::Pad | Op::PadV2 => {
            let pads = g.tensors[node.inputs[1]].int_values()?;
            ensure!(
                pads.len() == 8 && pads[2..6].iter().all(|&p| p == 0),
                "padding {:?} is not on channels only",
                pads
            );
            ensure!(activations == [node.inputs[0]], "padding is not constant");
            Reach::Pointwise
        }
        Op::Concatenation { axis: 3, .. } => {
            ensure!(
                activations.len() == node.inputs.len(),
                "a constant is concatenated"
            );
            for &a in &activations {
                ensure!(
                    shape(a)[1..3] == out[1..3],
                    "input {:?} does not match output {:?} over H and W",
                    shape(a),
                    out
                );
            }
            Reach::Pointwise
        }
        op => bail!("{} cannot be tiled", op.name()),
    })
}
