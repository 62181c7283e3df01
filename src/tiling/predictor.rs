//! Peak memory and latency of a tiling configuration, predicted from shapes: no layer is
//! planned or run. The run is a sequence of steps (an untiled layer, or a group); a step's
//! peak is the activations alive across it plus what the step itself holds at its worst
//! moment, and the configuration's peak is the largest step's. The terms follow
//! `execute.rs` allocation by allocation; the constants in [`Calibration`] are measured
//! (see `docs/tiling.md` for how).

use super::execute::{batches, group_io};
use super::group::Group;
use super::region::split;
use super::slice::{channel_slice, sliceable_channels};
use super::{GroupConfig, TilingConfig};
use crate::memory::Bytes;
use crate::model::Package;
use crate::model::graph::{Graph, Op, Padding};
use crate::model::split::stitch;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::ops::Range;

/// Machine- and tract-dependent constants of the model.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Calibration {
    /// What the process keeps resident once tract has planned and run anything (its
    /// kernels' scratch space, the allocator's arenas): paid once per run.
    pub(crate) runtime_bytes: u64,
    /// What a plan allocates while it runs beyond the values [`exec_peak`] follows (the
    /// matrix products' per-thread panel scratch, state built on a plan's first run):
    /// the residual of running steps once their values are modelled.
    pub(crate) run_bytes: u64,
    /// Peak while tract parses a plan, in multiples of its weights (the file and two
    /// copies).
    pub(crate) parse_copies: f64,
    /// Extra copies of one op's weights while tract optimises it (the kernel folded
    /// through layouts before the packed one remains); ops are optimised one by one.
    pub(crate) optimise_copies: f64,
    /// Execution time per floating-point operation (multiply-add = 2).
    pub(crate) secs_per_flop: f64,
    /// Fixed cost of running one tile: cropping, tract's per-run set-up, pasting.
    pub(crate) secs_per_tile: f64,
    /// Planning time per plan (writing, parsing, optimising; a sliced layer also reads
    /// its file again) and per byte of its weights (tract repacks them for every plan).
    pub(crate) secs_per_plan: f64,
    pub(crate) plan_secs_per_weight_byte: f64,
}

/// Latency terms fitted to CPU time by `python3 benches/tiling.py calibrate` on the
/// development machine (x86-64, 2 cores shared with other jobs), except `secs_per_plan`,
/// from the CPU time of configurations with 10–19 extra plans (channel slices; the fit
/// over few-plan configurations could not separate it from noise); the memory terms are
/// tract's and glibc's, measured as `docs/tiling.md` describes.
pub const CALIBRATION: Calibration = Calibration {
    runtime_bytes: 5 << 20,
    run_bytes: 1 << 20,
    parse_copies: 3.0,
    optimise_copies: 3.0,
    secs_per_flop: 3.2e-11,
    secs_per_tile: 0.0,
    secs_per_plan: 6.0e-3,
    plan_secs_per_weight_byte: 1.0e-8,
};

/// A configuration and its prediction: one line of `memaflow tile predict`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Prediction {
    /// The configuration, as `--tiling` takes it.
    pub config: String,
    /// What it would cost.
    pub estimate: Estimate,
}

/// Prediction for one step or a whole configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Estimate {
    /// Peak resident bytes above the process's resident set before the run.
    pub peak_bytes: u64,
    /// Predicted duration, seconds.
    pub secs: f64,
    /// Floating-point operations, halos recomputed included.
    pub flops: u64,
    /// Plans tract builds (layers and distinct tile geometries) and their weights: the
    /// planning-time terms.
    pub plans: usize,
    pub(crate) plan_weight_bytes: u64,
    /// Tiles run.
    pub tiles: usize,
}

impl Estimate {
    pub(crate) fn then(self, o: Estimate) -> Estimate {
        Estimate {
            peak_bytes: self.peak_bytes.max(o.peak_bytes),
            secs: self.secs + o.secs,
            flops: self.flops + o.flops,
            plans: self.plans + o.plans,
            plan_weight_bytes: self.plan_weight_bytes + o.plan_weight_bytes,
            tiles: self.tiles + o.tiles,
        }
    }
}

/// What a group holds while any of its tiles runs: the activations live across it, its
/// input, and the layer files it was built from.
struct GroupHeld {
    across: u64,
    input: u64,
    files: u64,
}

/// A group's layers and grid.
type StepKey = (Range<usize>, usize, usize);

/// A package read for prediction: its layer graphs (kept, so that groups can be formed
/// from any range of them) and its activations' lifetimes.
pub struct Predictor<'a> {
    pub(crate) pkg: &'a Package,
    layers: Vec<Graph>,
    pub(crate) calibration: Calibration,
    steps: std::cell::RefCell<HashMap<StepKey, Result<Estimate, String>>>,
    /// Each activation's last reading layer (made once: the search asks thousands of times).
    last_reader: HashMap<&'a str, usize>,
}

impl<'a> Predictor<'a> {
    /// Reads every layer of `pkg` (each file checked) for prediction under `calibration`.
    pub fn new(pkg: &'a Package, calibration: Calibration) -> Result<Predictor<'a>> {
        let layers = (0..pkg.manifest.layers.len())
            .map(|i| pkg.read_layer(i).map(|(_, g)| g))
            .collect::<Result<Vec<_>>>()?;
        Ok(Predictor {
            pkg,
            layers,
            calibration,
            steps: Default::default(),
            last_reader: pkg.manifest.last_reader(),
        })
    }

    pub(crate) fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// Layers `range` as a tileable group, or why they are not one.
    pub fn group(&self, range: &Range<usize>) -> Result<Group> {
        let (inputs, outputs) = group_io(self.pkg, range);
        let graph = stitch(&self.layers[range.clone()], &inputs, &outputs)?;
        Group::new(graph)
    }

    /// Bytes of the activations in `execute`'s live map while layers `range` run, beyond
    /// those the step reads: produced before it and read after it (or a model output).
    fn live_across(&self, range: &Range<usize>, reads: &[String]) -> u64 {
        let m = &self.pkg.manifest;
        let last = &self.last_reader;
        let mut total = 0;
        let produced_before = m
            .inputs
            .iter()
            .map(|t| {
                (
                    t.name.as_str(),
                    t.shape.iter().product::<usize>() as u64 * 4,
                )
            })
            .chain(
                m.layers[..range.start]
                    .iter()
                    .flat_map(|l| l.outputs.iter().map(|t| (t.name.as_str(), t.bytes))),
            );
        for (name, bytes) in produced_before {
            let later = last.get(name).is_some_and(|&l| l >= range.end)
                || m.outputs.iter().any(|o| o.name == name);
            if later && !reads.iter().any(|r| r == name) {
                total += bytes;
            }
        }
        total
    }

    /// One untiled layer: planning (weights × factor), then running it with its inputs
    /// moved into tract, its plan resident, and its outputs copied out.
    fn layer_step(&self, index: usize) -> Result<Estimate> {
        let c = &self.calibration;
        let g = &self.layers[index];
        let entry = &self.pkg.manifest.layers[index];
        // Inputs also read later stay in the live map (tract gets a clone); the others
        // move into tract, which holds them as its graph inputs.
        let across = self.live_across(&(index..index + 1), &[]);
        let reads: Vec<String> = entry.inputs.iter().map(|t| t.name.clone()).collect();
        let kept = across - self.live_across(&(index..index + 1), &reads);
        let weights = weight_bytes(g);
        let planning = across + entry.input_bytes() - kept + planning_peak(c, g);
        let running = across + weights + c.run_bytes + exec_peak(g).max(2 * entry.output_bytes());
        let flops: u64 = g.nodes.iter().map(|n| g.flops(n)).sum();
        Ok(Estimate {
            peak_bytes: c.runtime_bytes + planning.max(running),
            secs: plan_secs(c, g) + flops as f64 * c.secs_per_flop,
            flops,
            plans: 1,
            plan_weight_bytes: weights,
            tiles: 0,
        })
    }

    /// What a group holds throughout, whatever its grid.
    fn group_held(&self, group: &Group, range: &Range<usize>) -> GroupHeld {
        let reads = [group.graph.tensors[group.input].name.clone()];
        GroupHeld {
            across: self.live_across(range, &reads),
            input: group.graph.tensors[group.input].bytes() as u64,
            files: range
                .clone()
                .map(|i| self.pkg.manifest.layers[i].file_bytes)
                .sum(),
        }
    }

    /// A lower bound of the peak of layers `range` (formed as `group`) at any grid: what
    /// it holds throughout. The search skips ranges above the budget without tiling them.
    pub(crate) fn group_floor(&self, group: &Group, range: &Range<usize>) -> u64 {
        let held = self.group_held(group, range);
        self.calibration.runtime_bytes + held.across + held.input + held.files
    }

    /// One group tile by tile: its input and whole output alive throughout with the layer
    /// files it was built from; per distinct tile geometry a plan (planning peak as for a
    /// layer); per tile the cropped input, the tile graph's own peak and the output copy.
    fn group_step(
        &self,
        group: &Group,
        range: &Range<usize>,
        rows: usize,
        cols: usize,
    ) -> Result<Estimate> {
        let c = &self.calibration;
        let output = group.graph.tensors[group.output].bytes() as u64;
        let GroupHeld {
            across,
            input,
            files,
        } = self.group_held(group, range);
        let held = across + input + files;
        let mut est = Estimate::default();
        for batch in batches(group, rows, cols)? {
            let tile = group.tile_graph(&batch[0].1)?;
            let weights = weight_bytes(&tile);
            let tile_out = tile.tensors[tile.outputs[0]].bytes() as u64;
            // The whole output is zeroed memory the kernel maps on first write: at the
            // worst moment, the last tile, all other tiles are in it.
            let planning = held + output - tile_out + planning_peak(c, &tile);
            let running = held + output - tile_out
                + weights
                + c.run_bytes
                + exec_peak(&tile).max(2 * tile_out);
            let flops: u64 = tile.nodes.iter().map(|n| tile.flops(n)).sum();
            log::trace!(
                "group {range:?} {rows}x{cols}, tile {:?}: held {} (input {}, files {}), \
                 output less the tile {}, planning {}, weights {}, tile run {}",
                batch[0].0,
                Bytes(held),
                Bytes(input),
                Bytes(files),
                Bytes(output - tile_out),
                Bytes(planning_peak(c, &tile)),
                Bytes(weights),
                Bytes(exec_peak(&tile).max(2 * tile_out))
            );
            est = est.then(Estimate {
                peak_bytes: c.runtime_bytes + planning.max(running),
                secs: plan_secs(c, &tile)
                    + batch.len() as f64 * (flops as f64 * c.secs_per_flop + c.secs_per_tile),
                flops: flops * batch.len() as u64,
                plans: 1,
                plan_weight_bytes: weights,
                tiles: batch.len(),
            });
        }
        Ok(est)
    }

    /// A group's estimate (cached: the search asks for each many times).
    pub(crate) fn group_estimate(
        &self,
        range: &Range<usize>,
        rows: usize,
        cols: usize,
    ) -> Result<Estimate> {
        match self.cached_step(range, rows, cols) {
            Some(r) => r,
            None => self.group_estimate_of(&self.group(range)?, range, rows, cols),
        }
    }

    fn cached_step(
        &self,
        range: &Range<usize>,
        rows: usize,
        cols: usize,
    ) -> Option<Result<Estimate>> {
        let key = (range.clone(), rows, cols);
        let r = self.steps.borrow().get(&key)?.clone();
        Some(r.map_err(anyhow::Error::msg))
    }

    /// `group_estimate` of layers `range` already formed as `group`: the search forms
    /// each range once for all its grids instead of stitching it again for each.
    pub(crate) fn group_estimate_of(
        &self,
        group: &Group,
        range: &Range<usize>,
        rows: usize,
        cols: usize,
    ) -> Result<Estimate> {
        if let Some(r) = self.cached_step(range, rows, cols) {
            return r;
        }
        let key = (range.clone(), rows, cols);
        let r = self
            .group_step(group, range, rows, cols)
            .map_err(|e| format!("{e:#}"));
        self.steps.borrow_mut().insert(key, r.clone());
        r.map_err(anyhow::Error::msg)
    }

    pub(crate) fn layer_estimate(&self, index: usize) -> Result<Estimate> {
        self.layer_step(index)
            .with_context(|| format!("{}: layer {index}", self.pkg.name()))
    }

    /// Layer `index` in `parts` output-channel slices, or why it cannot be sliced: its
    /// input and its whole output held throughout; per slice, the layer file (read again
    /// to cut the slice) and then tract planning and running the slice with a copy of the
    /// input.
    pub(crate) fn sliced_estimate(&self, index: usize, parts: usize) -> Result<Estimate> {
        let c = &self.calibration;
        let g = &self.layers[index];
        let channels = sliceable_channels(g)?;
        let entry = &self.pkg.manifest.layers[index];
        let reads: Vec<String> = entry.inputs.iter().map(|t| t.name.clone()).collect();
        let held = self.live_across(&(index..index + 1), &reads)
            + entry.input_bytes()
            + entry.output_bytes();
        let file = entry.file_bytes;
        let mut est = Estimate::default();
        for span in split(channels, parts)? {
            let part = channel_slice(g, span)?;
            let weights = weight_bytes(&part);
            let flops: u64 = part.nodes.iter().map(|n| part.flops(n)).sum();
            let reading = held + file + weights;
            let planning = held + planning_peak(c, &part);
            let running = held + weights + c.run_bytes + exec_peak(&part);
            est = est.then(Estimate {
                peak_bytes: c.runtime_bytes + reading.max(planning).max(running),
                secs: plan_secs(c, &part) + flops as f64 * c.secs_per_flop,
                flops,
                plans: 1,
                plan_weight_bytes: weights,
                tiles: 0,
            });
        }
        Ok(est)
    }

    /// `predict`, with the configuration it is for.
    pub fn prediction(&self, config: &TilingConfig) -> Result<Prediction> {
        Ok(Prediction {
            config: config.to_string(),
            estimate: self.predict(config)?,
        })
    }

    /// The whole run under `config`.
    pub fn predict(&self, config: &TilingConfig) -> Result<Estimate> {
        config.check(self.layers.len())?;
        let starts: HashMap<usize, &GroupConfig> =
            config.groups.iter().map(|g| (g.layers.start, g)).collect();
        let mut est = Estimate::default();
        let mut i = 0;
        while i < self.layers.len() {
            let step = if let Some(g) = starts.get(&i) {
                i = g.layers.end;
                self.group_estimate(&g.layers, g.rows, g.cols)
                    .with_context(|| format!("group {g}"))?
            } else if let Some(&parts) = config.slices.get(&i) {
                i += 1;
                self.sliced_estimate(i - 1, parts)
                    .with_context(|| format!("layer {} in {parts} slices", i - 1))?
            } else {
                i += 1;
                self.layer_estimate(i - 1)?
            };
            log::debug!(
                "{}: through layer {}: predicted peak {}",
                self.pkg.name(),
                i - 1,
                Bytes(step.peak_bytes)
            );
            est = est.then(step);
        }
        Ok(est)
    }
}

fn weight_bytes(g: &Graph) -> u64 {
    g.tensors
        .iter()
        .filter(|t| t.is_const())
        .map(|t| t.bytes() as u64)
        .sum()
}

/// Peak bytes while tract parses and optimises `g`.
fn planning_peak(c: &Calibration, g: &Graph) -> u64 {
    let weights = weight_bytes(g) as f64;
    let largest = g.nodes.iter().map(|n| g.weight_bytes(n)).max().unwrap_or(0) as f64;
    (c.parse_copies * weights).max(weights + c.optimise_copies * largest) as u64
}

fn plan_secs(c: &Calibration, g: &Graph) -> f64 {
    c.secs_per_plan + weight_bytes(g) as f64 * c.plan_secs_per_weight_byte
}

/// tract 0.23's ceiling on an eager im2col buffer on native targets, above which it reads
/// the input in place instead (`DEFAULT_LAZY_IM2COL_MAX_EAGER_BYTES`).
const EAGER_IM2COL_MAX_BYTES: u64 = 4 << 20;

/// The buffer tract's optimised convolution builds from its input before the matrix
/// product (`tract-core` 0.23, `ops/cnn/conv/conv.rs`): allocated while the input is
/// alive, alive with the output while the product runs. `padded` is the input's bytes
/// with its padding (a folded PAD's output, or SAME padding) if it has any padding.
///
/// - 1×1, stride 1, no padding: the conv becomes a matrix product (`declutter_as_einsum`)
///   whose activation operand is packed into panels at run time (`OptMatMulPack`): a copy
///   of the input, k·n values (k = input channels, n = output positions).
/// - kernel of ≥ 6 taps, or an im2col of ≥ 4 MiB (`should_use_lazy`): lazy im2col, which
///   gathers from the input in place; with padding, tract first materialises the padded
///   input (`wire_as_lazy_im2col` adds a PAD).
/// - otherwise eager im2col: a packed [k·taps, n] matrix. (tract also goes lazy for 2–5
///   taps when the output channels fit one register panel; counting the matrix instead
///   over-predicts, never under.)
///
/// Depthwise convolutions read their input in place.
fn conv_buffer(g: &Graph, node: &crate::model::graph::Node, padded: Option<u64>) -> u64 {
    let Op::Conv2d(p) = &node.op else { return 0 };
    let x = &g.tensors[node.inputs[0]];
    let kernel = &g.tensors[node.inputs[1]].shape;
    let y = &g.tensors[node.outputs[0]].shape;
    let taps = (kernel[1] * kernel[2]) as u64;
    let positions = (y[0] * y[1] * y[2]) as u64;
    let size = x.dtype.size() as u64;
    let matrix = x.shape[3] as u64 * taps * positions * size;
    if taps == 1 && p.stride == [1, 1] && padded.is_none() {
        matrix
    } else if taps >= 6 || matrix >= EAGER_IM2COL_MAX_BYTES {
        padded.unwrap_or(0)
    } else {
        matrix
    }
}

/// Bytes of a convolution's input with its SAME padding, if that pads.
fn same_padded_bytes(g: &Graph, node: &crate::model::graph::Node) -> Option<u64> {
    let Op::Conv2d(p) = &node.op else { return None };
    if p.padding != Padding::Same {
        return None;
    }
    let x = &g.tensors[node.inputs[0]];
    let kernel = &g.tensors[node.inputs[1]].shape;
    let y = &g.tensors[node.outputs[0]].shape;
    let extent = |axis: usize| {
        let e = (kernel[axis] - 1) * p.dilation[axis - 1] + 1;
        let n = x.shape[axis];
        n.max((y[axis] - 1) * p.stride[axis - 1] + e)
    };
    let bytes = (x.shape[0] * extent(1) * extent(2) * x.shape[3] * x.dtype.size()) as u64;
    (bytes > x.bytes() as u64).then_some(bytes)
}

/// Peak bytes of activations while tract runs `g`: its inputs, then each op's output
/// allocated while its inputs are alive, and every value freed after its last reader
/// (tract's flush lists). Pointwise ops whose input dies with them write in place (tract
/// fuses them into the op before, or reuses the buffer); a zero PAD read only by
/// convolutions is folded into them, and each convolution adds the buffer tract builds
/// from its input ([`conv_buffer`]).
///
/// A tile's input is a region cropped for it and handed to tract, which flushes it after
/// its last reader like any other value: run alone, the tile graph of `2-7:1x1` peaks at
/// 11.1 MiB against 10.6 predicted (the 2.6 MiB input is not held to the end).
pub(crate) fn exec_peak(g: &Graph) -> u64 {
    let mut free_at = g.last_readers();
    let mut size: Vec<u64> = g.tensors.iter().map(|t| t.bytes() as u64).collect();
    // Per node, its input's bytes with the padding of a PAD folded into it.
    let mut padded: Vec<Option<u64>> = g.nodes.iter().map(|n| same_padded_bytes(g, n)).collect();
    for (ix, node) in g.nodes.iter().enumerate() {
        let folded = node.op == Op::Pad
            && g.nodes.iter().all(|n| {
                !n.inputs.contains(&node.outputs[0])
                    || matches!(n.op, Op::Conv2d(_) | Op::DepthwiseConv2d { .. })
            });
        if folded {
            let (from, to) = (node.inputs[0], node.outputs[0]);
            for (reader, n) in g.nodes.iter().enumerate() {
                if n.inputs.first() == Some(&to) && size[to] > size[from] {
                    padded[reader] = Some(size[to]);
                }
            }
            size[to] = 0;
            free_at[from] = free_at[from].max(free_at[to]).max(Some(ix));
        }
    }
    for &t in &g.outputs {
        free_at[t] = None;
    }
    // `Plan::run_owned` copies each input into a tract tensor before dropping it.
    let mut live: u64 = g.inputs.iter().map(|&t| size[t]).sum();
    let mut peak = live + g.inputs.iter().map(|&t| size[t]).max().unwrap_or(0);
    let mut freed = vec![false; g.tensors.len()];
    let free_dead = |live: &mut u64, ix: usize, freed: &mut Vec<bool>| {
        for (t, at) in free_at.iter().enumerate() {
            if *at == Some(ix) && !g.tensors[t].is_const() && !freed[t] {
                freed[t] = true;
                *live -= size[t];
            }
        }
    };
    for (ix, node) in g.nodes.iter().enumerate() {
        let out: u64 = node.outputs.iter().map(|&t| size[t]).sum();
        let buffer = conv_buffer(g, node, padded[ix]);
        if buffer > 0 {
            // The buffer is built while the input is alive; the input is then flushed.
            live += buffer;
            peak = peak.max(live);
            free_dead(&mut live, ix, &mut freed);
        }
        let in_place = matches!(
            node.op,
            Op::Unary(_) | Op::LeakyRelu { .. } | Op::Binary { .. }
        ) && node
            .inputs
            .iter()
            .any(|&t| !g.tensors[t].is_const() && free_at[t] == Some(ix) && size[t] == out);
        live += out;
        if !in_place {
            peak = peak.max(live);
        }
        live -= buffer;
        free_dead(&mut live, ix, &mut freed);
    }
    peak
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::graph::*;

    /// The graph's input, of `shape`, padded by one on both sides of H and W.
    fn padded_input(g: &mut Graph, shape: Vec<usize>) -> TensorId {
        let x = g.add_tensor(Tensor::activation("x", shape, DType::F32));
        g.inputs = vec![x];
        let pads = g.add_tensor(Tensor::i32_constant("pads", &[0, 0, 1, 1, 1, 1, 0, 0]));
        g.add_node(Op::Pad, vec![x, pads], &["pad"]).unwrap()[0]
    }

    fn conv_chain() -> Graph {
        let mut g = Graph::default();
        let p = padded_input(&mut g, vec![1, 8, 8, 4]);
        let l = conv(&mut g, p, 3, 16, Padding::Valid);
        let pool = PoolParams {
            padding: Padding::Valid,
            stride: [2, 2],
            filter: [2, 2],
            activation: Activation::None,
        };
        let y = g.add_node(Op::MaxPool2d(pool), vec![l], &["pool"]).unwrap()[0];
        g.outputs = vec![y];
        g
    }

    /// Input 1 KiB (padded 10×10×4: 1600 B), conv output 4 KiB, pool output 1 KiB. The
    /// PAD folds into the 3×3 conv, which tract runs as lazy im2col over the padded input
    /// it materialises again: the peak is the padded input and the conv output. The leaky
    /// ReLU works in place.
    #[test]
    fn exec_peak_follows_lifetimes() {
        let g = conv_chain();
        assert_eq!(exec_peak(&g), 1600 + 4096);
        // Its input read by the pool too, the input stays alive to the end.
        let mut g = conv_chain();
        let (x, pool) = (g.inputs[0], g.nodes.len() - 1);
        g.nodes[pool].inputs = vec![x];
        g.tensors[g.nodes[pool].outputs[0]].shape = vec![1, 4, 4, 4];
        assert_eq!(exec_peak(&g), 1024 + 1600 + 4096);
    }

    fn conv(g: &mut Graph, x: TensorId, k: usize, co: usize, padding: Padding) -> TensorId {
        let ci = g.tensors[x].shape[3];
        let n = co * k * k * ci;
        let w = g.add_tensor(Tensor::f32_constant("w", vec![co, k, k, ci], &vec![0.0; n]));
        let b = g.add_tensor(Tensor::f32_constant("b", vec![co], &vec![0.0; co]));
        let params = ConvParams {
            padding,
            stride: [1, 1],
            dilation: [1, 1],
            activation: Activation::None,
        };
        let y = g
            .add_node(Op::Conv2d(params), vec![x, w, b], &["c"])
            .unwrap()[0];
        g.add_node(Op::LeakyRelu { alpha: 0.1 }, vec![y], &["l"])
            .unwrap()[0]
    }

    /// The 1×2 tile of YOLOv2-16's layers 2–3 (`2-3:1x2`): PAD, 3×3 conv 64→128, leaky,
    /// 1×1 conv 128→64, leaky, on a 104×52 tile. tract packs the 1×1 conv's input
    /// (k = 128 channels × n = 104·52 positions) into a copy before its matrix product,
    /// while that input is alive: the peak is the 3×3 conv's output twice. Without the
    /// packed copy it would be the tile input and that output (1.32 + 2.64 MiB).
    #[test]
    fn pointwise_conv_packs_a_copy_of_its_input() {
        let mut g = Graph::default();
        let p = padded_input(&mut g, vec![1, 104, 52, 64]);
        let y = conv(&mut g, p, 3, 128, Padding::Valid);
        let z = conv(&mut g, y, 1, 64, Padding::Valid);
        g.outputs = vec![z];
        let wide = 104 * 52 * 128 * 4;
        assert_eq!(exec_peak(&g), 2 * wide);
        // The buffer alone: k·n·4 bytes, as large as the conv's input.
        assert_eq!(conv_buffer(&g, &g.nodes[3], None), wide);
    }

    /// A SAME 3×3 conv: tract pads its input into a new tensor (10×10×4 floats) and runs
    /// lazy im2col over it, so the peak is the padded input and the output, not the
    /// input and the output.
    #[test]
    fn same_conv_materialises_its_padded_input() {
        let mut g = Graph::default();
        let x = g.add_tensor(Tensor::activation("x", vec![1, 8, 8, 4], DType::F32));
        g.inputs = vec![x];
        let y = conv(&mut g, x, 3, 16, Padding::Same);
        g.outputs = vec![y];
        assert_eq!(exec_peak(&g), 10 * 10 * 4 * 4 + 8 * 8 * 16 * 4);
    }

    #[test]
    fn planning_peak_is_parse_or_the_largest_op_optimised() {
        let g = conv_chain();
        // The conv's weights and bias, and the PAD's 8 integers.
        let conv = (576 + 16) * 4;
        assert_eq!(
            planning_peak(&CALIBRATION, &g),
            (conv + 32 + 3 * conv) as u64
        );
    }
}
