//! Runs a package under a tiling [`TilingConfig`]: untiled layers as `run_layerwise` does (load,
//! run, free), each group tile by tile. A group's tiles are run in batches of equal
//! geometry, so that one tract plan (and one copy of the group's weights) exists at a time
//! and each distinct tile shape is planned once.

use super::group::{Geometry, Group, Region};
use super::region::split;
use super::slice::{channel_slice, sliceable_channels};
use super::{GroupConfig, TilingConfig};
use crate::model::Package;
use crate::model::split::stitch;
use crate::model::tflite::{WriteOptions, write_graph};
use crate::runtime::{FloatTensor, Plan, RunStats, Walk, load_layer};
use anyhow::{Context, Result, ensure};
use std::collections::HashMap;
use std::ops::Range;
use std::time::Instant;

/// What a tiled run did, beside its outputs.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct TiledStats {
    /// Load and exec time.
    pub run: RunStats,
    /// Tract plans built for tiles (distinct tile geometries, summed over groups) and
    /// channel slices.
    pub plans: usize,
    /// Tiles run, summed over groups.
    pub tiles: usize,
}

/// A tiled run's outputs and what it did.
#[derive(Clone, Debug)]
pub struct TiledRun {
    /// In the order of the manifest's outputs.
    pub outputs: Vec<FloatTensor>,
    /// What it did.
    pub stats: TiledStats,
}

/// The activations a run of `layers` reads from before them and hands on after them.
pub(crate) fn group_io(pkg: &Package, layers: &Range<usize>) -> (Vec<String>, Vec<String>) {
    let m = &pkg.manifest;
    let produced_in = |name: &str| {
        m.layers[layers.clone()]
            .iter()
            .any(|l| l.outputs.iter().any(|o| o.name == name))
    };
    let mut inputs: Vec<String> = vec![];
    for l in &m.layers[layers.clone()] {
        for t in &l.inputs {
            if !produced_in(&t.name) && !inputs.contains(&t.name) {
                inputs.push(t.name.clone());
            }
        }
    }
    let needed_after = |name: &str| {
        m.layers[layers.end..]
            .iter()
            .any(|l| l.inputs.iter().any(|t| t.name == name))
            || m.outputs.iter().any(|o| o.name == name)
    };
    let outputs = m.layers[layers.clone()]
        .iter()
        .flat_map(|l| &l.outputs)
        .filter(|o| needed_after(&o.name))
        .map(|o| o.name.clone())
        .collect();
    (inputs, outputs)
}

/// Layers `layers` of `pkg` joined into one tileable graph.
pub fn load_group(pkg: &Package, layers: &Range<usize>) -> Result<Group> {
    ensure!(
        layers.start < layers.end && layers.end <= pkg.manifest.layers.len(),
        "{}: no layers {}..{}",
        pkg.name(),
        layers.start,
        layers.end
    );
    let ctx = || {
        format!(
            "{}: layers {}-{} as a tiled group",
            pkg.name(),
            layers.start,
            layers.end - 1
        )
    };
    let graphs = layers
        .clone()
        .map(|i| pkg.read_layer(i).map(|(_, g)| g))
        .collect::<Result<Vec<_>>>()?;
    let (inputs, outputs) = group_io(pkg, layers);
    let graph = stitch(&graphs, &inputs, &outputs).with_context(ctx)?;
    Group::new(graph).with_context(ctx)
}

/// The output tiles of a `rows × cols` grid, row-major.
pub(crate) fn tiles(group: &Group, rows: usize, cols: usize) -> Result<Vec<Region>> {
    let [_, h, w, _] = group.output_shape();
    let (hs, ws) = (split(h, rows)?, split(w, cols)?);
    Ok(hs
        .iter()
        .flat_map(|&h| ws.iter().map(move |&w| Region { h, w }))
        .collect())
}

/// Each tile's geometry, in batches of equal plan key (in order of first appearance).
pub fn batches(group: &Group, rows: usize, cols: usize) -> Result<Vec<Vec<(Region, Geometry)>>> {
    let mut order: Vec<Vec<usize>> = vec![];
    let mut by_key: HashMap<Vec<usize>, Vec<(Region, Geometry)>> = HashMap::new();
    for tile in tiles(group, rows, cols)? {
        let geo = group
            .geometry(tile)
            .with_context(|| format!("tile {tile:?}"))?;
        let key = geo.key();
        if !by_key.contains_key(&key) {
            order.push(key.clone());
        }
        by_key.entry(key).or_default().push((tile, geo));
    }
    Ok(order
        .into_iter()
        .map(|k| by_key.remove(&k).expect("every key has tiles"))
        .collect())
}

/// Runs a group on its whole input, tile by tile; returns its whole output.
pub fn run_group(
    group: &Group,
    rows: usize,
    cols: usize,
    input: &FloatTensor,
    stats: &mut TiledStats,
) -> Result<FloatTensor> {
    let shape = group.shape(group.input);
    ensure!(
        input.shape == shape,
        "group input is {:?}, expected {:?}",
        input.shape,
        shape
    );
    let out_shape = group.output_shape();
    let mut out = FloatTensor::filled(out_shape.to_vec(), 0.0);
    for batch in batches(group, rows, cols)? {
        let t = Instant::now();
        let graph = group.tile_graph(&batch[0].1)?;
        let bytes = write_graph(&graph, WriteOptions::default())?;
        drop(graph);
        let plan =
            Plan::from_tflite(bytes).with_context(|| format!("planning tile {:?}", batch[0].0))?;
        // Planning frees its transient copies into glibc's heap; not handed back, they
        // stay resident under the tiles' run (2.6 MiB for the plan of `2-7:1x1`).
        crate::memory::release_free_heap();
        stats.run.load += t.elapsed();
        stats.plans += 1;
        let t = Instant::now();
        for (tile, geo) in &batch {
            let region = geo.regions[group.input].context("the input has no region")?;
            let x = crop(input, region);
            let mut y = plan
                .run_owned(vec![x])
                .with_context(|| format!("tile {tile:?}"))?;
            ensure!(y.len() == 1, "a tile plan gave {} outputs", y.len());
            paste(&mut out, &y.remove(0), *tile)?;
            stats.tiles += 1;
        }
        stats.run.exec += t.elapsed();
        drop(plan);
        crate::memory::release_free_heap();
    }
    Ok(out)
}

/// Runs layer `index` as `parts` plans over slices of its output channels. Each slice is
/// cut from a fresh read of the layer file, which is dropped before tract plans the slice:
/// at no time is more than the file and one slice's plan resident.
fn run_sliced(
    pkg: &Package,
    index: usize,
    parts: usize,
    input: &FloatTensor,
    stats: &mut TiledStats,
) -> Result<FloatTensor> {
    let (_, graph) = pkg.read_layer(index)?;
    let channels = sliceable_channels(&graph)?;
    let mut shape = graph.tensors[graph.outputs[0]].shape.clone();
    drop(graph);
    let mut out = FloatTensor::filled(shape.clone(), 0.0);
    for span in split(channels, parts)? {
        let t = Instant::now();
        let (file, graph) = pkg.read_layer(index)?;
        let part = channel_slice(&graph, span)?;
        drop((file, graph));
        let bytes = write_graph(&part, WriteOptions::default())?;
        drop(part);
        let plan = Plan::from_tflite(bytes)?;
        // As after planning a tile (`run_group`).
        crate::memory::release_free_heap();
        stats.run.load += t.elapsed();
        stats.plans += 1;
        let t = Instant::now();
        let y = plan
            .run_owned(vec![input.clone()])?
            .pop()
            .context("a slice gave no output")?;
        shape[3] = span.len();
        ensure!(
            y.shape == shape,
            "slice output {:?}, expected {:?}",
            y.shape,
            shape
        );
        // Channels are innermost: each pixel's slice is one contiguous run.
        for (dst, src) in out
            .data
            .chunks_exact_mut(channels)
            .zip(y.data.chunks_exact(span.len()))
        {
            dst[span.start..span.end].copy_from_slice(src);
        }
        stats.run.exec += t.elapsed();
        drop(plan);
        crate::memory::release_free_heap();
    }
    Ok(out)
}

/// Copies `region` (over H and W, all of N and C) out of an NHWC tensor.
fn crop(x: &FloatTensor, r: Region) -> FloatTensor {
    let [n, _, w, c] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
    let mut data = Vec::with_capacity(n * r.area() * c);
    for b in 0..n {
        for row in r.h.start..r.h.end {
            let at = ((b * x.shape[1] + row) * w + r.w.start) * c;
            data.extend_from_slice(&x.data[at..at + r.w.len() * c]);
        }
    }
    FloatTensor {
        shape: vec![n, r.h.len(), r.w.len(), c],
        data,
    }
}

/// Writes a tile into its place in the whole output.
fn paste(out: &mut FloatTensor, tile: &FloatTensor, r: Region) -> Result<()> {
    let [n, h, w, c] = [out.shape[0], out.shape[1], out.shape[2], out.shape[3]];
    ensure!(
        tile.shape == [n, r.h.len(), r.w.len(), c],
        "tile output is {:?}, expected {:?}",
        tile.shape,
        [n, r.h.len(), r.w.len(), c]
    );
    let row = r.w.len() * c;
    for b in 0..n {
        for (i, y) in (r.h.start..r.h.end).enumerate() {
            let at = ((b * h + y) * w + r.w.start) * c;
            let from = (b * r.h.len() + i) * row;
            out.data[at..at + row].copy_from_slice(&tile.data[from..from + row]);
        }
    }
    Ok(())
}

/// Runs one input through the package under `config`. With no groups this is the
/// layer-by-layer run.
pub fn run_tiled(pkg: &Package, input: FloatTensor, config: &TilingConfig) -> Result<TiledRun> {
    let m = &pkg.manifest;
    config.check(m.layers.len())?;
    ensure!(
        m.inputs.len() == 1 && input.shape == m.inputs[0].shape,
        "{}: input is {:?}, the package takes {:?}",
        pkg.name(),
        input.shape,
        m.inputs[0].shape
    );
    let mut live = Walk::start(pkg, input);
    let mut stats = TiledStats::default();
    let groups: HashMap<usize, &GroupConfig> =
        config.groups.iter().map(|g| (g.layers.start, g)).collect();
    let mut index = 0;
    while index < m.layers.len() {
        index = if let Some(g) = groups.get(&index) {
            run_group_step(pkg, g, &mut live, &mut stats)?
        } else if let Some(&parts) = config.slices.get(&index) {
            let x = live.get(index, &m.layers[index].inputs[0].name)?;
            let y = run_sliced(pkg, index, parts, x, &mut stats)
                .with_context(|| format!("{}: layer {index} in {parts} slices", pkg.name()))?;
            live.store(pkg, index, [y])?;
            index + 1
        } else {
            run_layer_step(pkg, index, &mut live, &mut stats)?
        };
        crate::memory::release_free_heap();
        if let Ok(mem) = crate::memory::process_memory() {
            log::debug!(
                "{}: through layer {}: RSS {}, peak {}",
                pkg.name(),
                index - 1,
                crate::memory::Bytes(mem.rss),
                crate::memory::Bytes(mem.peak_rss)
            );
        }
    }
    let outputs = live.take_outputs(pkg)?;
    Ok(TiledRun { outputs, stats })
}

/// Runs group `g` tile by tile on the walk's values; returns the next layer.
fn run_group_step(
    pkg: &Package,
    g: &GroupConfig,
    live: &mut Walk<FloatTensor>,
    stats: &mut TiledStats,
) -> Result<usize> {
    let t = Instant::now();
    let group = load_group(pkg, &g.layers)?;
    stats.run.load += t.elapsed();
    let x = live
        .get(g.layers.start, &group.graph.tensors[group.input].name)
        .with_context(|| format!("{}: group {g}", pkg.name()))?;
    let y = run_group(&group, g.rows, g.cols, x, stats)
        .with_context(|| format!("{}: group {g}", pkg.name()))?;
    live.store_named(&group.graph.tensors[group.output].name, y, g.layers.end);
    Ok(g.layers.end)
}

/// Loads layer `index`, runs it whole on the walk's values (moving the buffers it is the
/// last to read into tract) and frees it; returns the next layer.
fn run_layer_step(
    pkg: &Package,
    index: usize,
    live: &mut Walk<FloatTensor>,
    stats: &mut TiledStats,
) -> Result<usize> {
    let t = Instant::now();
    let layer = load_layer(pkg, index)?;
    // As after planning a tile (`run_group`).
    crate::memory::release_free_heap();
    stats.run.load += t.elapsed();
    let t = Instant::now();
    let entry = &pkg.manifest.layers[index];
    let inputs = live.take_inputs(pkg, index)?;
    let outs = layer
        .plan
        .run_owned(inputs)
        .with_context(|| format!("{}: layer {index} ({})", pkg.name(), entry.ops.join("+")))?;
    drop(layer);
    live.store(pkg, index, outs)?;
    stats.run.exec += t.elapsed();
    Ok(index + 1)
}
