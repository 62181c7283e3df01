//! Layer-by-layer execution in layer order, one inference at a time: load a layer, run it,
//! drop its weights, drop every activation no later layer reads.

use super::FloatTensor;
use super::engine::{LoadedLayer, Plan, from_tvalue, load_layer, to_tvalue};
use crate::model::Package;
use crate::model::tflite::{WriteOptions, write_graph};
use anyhow::{Context, Result, ensure};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tract_core::prelude::{TValue, TVec};

/// Where a run's time went.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct RunStats {
    /// Reading, parsing and optimising layer files (or the whole model).
    pub load: Duration,
    /// Running them.
    pub(crate) exec: Duration,
}

/// The outputs of one run and what it took.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// In the order of the manifest's outputs.
    pub outputs: Vec<FloatTensor>,
    /// Load and exec time.
    pub stats: RunStats,
}

fn check_input(pkg: &Package, input: &FloatTensor) -> Result<()> {
    let spec = &pkg.manifest.inputs[0];
    ensure!(
        pkg.manifest.inputs.len() == 1,
        "{} has {} inputs; one input is supported",
        pkg.name(),
        pkg.manifest.inputs.len()
    );
    ensure!(
        input.shape == spec.shape,
        "{}: input '{}' is {:?}, got a tensor of shape {:?}",
        pkg.name(),
        spec.name,
        spec.shape,
        input.shape
    );
    Ok(())
}

/// Runs one input through the package layer by layer, each layer loaded just before it runs
/// and freed right after.
pub fn run_layerwise(pkg: &Package, input: &FloatTensor) -> Result<RunResult> {
    check_input(pkg, input)?;
    let mut stats = RunStats::default();
    let mut walk = Activations::new(pkg, input)?;
    for index in 0..pkg.manifest.layers.len() {
        let t = Instant::now();
        let layer = load_layer(pkg, index)?;
        stats.load += t.elapsed();
        let t = Instant::now();
        walk.step(pkg, &layer)?;
        stats.exec += t.elapsed();
    }
    Ok(RunResult {
        outputs: walk.finish(pkg)?,
        stats,
    })
}

/// Runs one input through layers that are already loaded (for measuring execution alone).
pub fn run_layers_preloaded(
    pkg: &Package,
    layers: &[LoadedLayer],
    input: &FloatTensor,
) -> Result<RunResult> {
    check_input(pkg, input)?;
    ensure!(
        layers.len() == pkg.manifest.layers.len(),
        "{} of {} layers loaded",
        layers.len(),
        pkg.manifest.layers.len()
    );
    let t = Instant::now();
    let mut walk = Activations::new(pkg, input)?;
    for layer in layers {
        walk.step(pkg, layer)?;
    }
    let outputs = walk.finish(pkg)?;
    Ok(RunResult {
        outputs,
        stats: RunStats {
            load: Duration::ZERO,
            exec: t.elapsed(),
        },
    })
}

/// Runs the whole normalised model (the layers joined back together) as one tract model.
pub fn run_whole(pkg: &Package, input: &FloatTensor) -> Result<RunResult> {
    check_input(pkg, input)?;
    let t = Instant::now();
    let graph = pkg.whole_graph()?;
    let bytes = write_graph(&graph, WriteOptions::default())?;
    drop(graph);
    let plan = Plan::from_tflite(bytes).with_context(|| format!("{}: whole model", pkg.name()))?;
    let load = t.elapsed();
    let t = Instant::now();
    let outs = plan.run(TVec::from_iter([to_tvalue(input)?]))?;
    let exec = t.elapsed();
    let outputs = outs.iter().map(from_tvalue).collect::<Result<Vec<_>>>()?;
    Ok(RunResult {
        outputs,
        stats: RunStats { load, exec },
    })
}

/// Per layer `l` of `pkg`, the most activation bytes an inference holds from layer `l` to
/// its end (the values alive while a layer runs: what it reads and what it produces), and
/// a last entry of 0. The first also counts the input twice (the caller's tensor and the
/// copy the walk starts from). What the scheduler reserves for an inference, released
/// as it passes each layer.
pub fn held_bytes(pkg: &Package) -> Vec<u64> {
    let manifest = &pkg.manifest;
    let input = manifest.inputs[0].shape.iter().product::<usize>() as u64 * 4;
    let last_reader = manifest.last_reader();
    let is_output = |name: &str| manifest.outputs.iter().any(|o| o.name == name);
    let mut live: HashMap<&str, u64> = HashMap::from([(manifest.inputs[0].name.as_str(), input)]);
    let mut during = vec![];
    for layer in &manifest.layers {
        for t in &layer.outputs {
            live.insert(t.name.as_str(), t.bytes);
        }
        during.push(live.values().sum::<u64>());
        live.retain(|name, _| {
            last_reader.get(name).is_some_and(|&l| l > layer.index) || is_output(name)
        });
    }
    let mut held = vec![0; during.len() + 1];
    for l in (0..during.len()).rev() {
        held[l] = held[l + 1].max(during[l]);
    }
    held[0] += input;
    held
}

/// The values alive between layers of one inference, and when each goes: a value is
/// dropped once no later layer reads it (unless it is a model output).
///
/// The one walker of a package's layers: `V` is tract's value for the layer-by-layer runs
/// ([`Activations`]), a [`FloatTensor`] for the tiled executor, which hands buffers to
/// tract by move ([`Walk::take_inputs`]) and runs groups and channel slices on them.
#[derive(Clone)]
pub(crate) struct Walk<V> {
    live: HashMap<String, V>,
    last_reader: HashMap<String, usize>,
    outputs: Vec<String>,
}

impl<V: Clone> Walk<V> {
    /// The walk's start: the package's input alone is alive.
    pub(crate) fn start(pkg: &Package, input: V) -> Walk<V> {
        let live = HashMap::from([(pkg.manifest.inputs[0].name.clone(), input)]);
        let last_reader = pkg
            .manifest
            .last_reader()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let outputs = pkg
            .manifest
            .outputs
            .iter()
            .map(|o| o.name.clone())
            .collect();
        Walk {
            live,
            last_reader,
            outputs,
        }
    }

    /// The value `name`, which layer `index` reads.
    pub(crate) fn get(&self, index: usize, name: &str) -> Result<&V> {
        self.live
            .get(name)
            .with_context(|| format!("layer {index} needs '{name}', which is not available"))
    }

    /// The values layer `index` reads, those it is the last reader of moved out (so that
    /// the caller may hand their buffers on), the others copied.
    pub(crate) fn take_inputs(&mut self, pkg: &Package, index: usize) -> Result<Vec<V>> {
        let entry = &pkg.manifest.layers[index];
        let mut values = Vec::with_capacity(entry.inputs.len());
        for t in &entry.inputs {
            let value = if self.last_reader.get(&t.name) == Some(&index) && !self.is_output(&t.name)
            {
                self.live.remove(&t.name)
            } else {
                self.live.get(&t.name).cloned()
            };
            values.push(value.with_context(|| {
                format!("layer {index} needs '{}', which is not available", t.name)
            })?);
        }
        Ok(values)
    }

    /// Stores what layer `index` produced and drops every value no later layer reads.
    pub(crate) fn store<I>(&mut self, pkg: &Package, index: usize, outs: I) -> Result<()>
    where
        I: IntoIterator<Item = V>,
        I::IntoIter: ExactSizeIterator,
    {
        let entry = &pkg.manifest.layers[index];
        let outs = outs.into_iter();
        ensure!(
            outs.len() == entry.outputs.len(),
            "layer {} gave {} outputs, expected {}",
            entry.index,
            outs.len(),
            entry.outputs.len()
        );
        for (spec, value) in entry.outputs.iter().zip(outs) {
            self.live.insert(spec.name.clone(), value);
        }
        self.retire(index + 1);
        Ok(())
    }

    /// Stores `value` as `name`, produced by layers before `next` (a group run as one),
    /// and drops every value no layer from `next` on reads.
    pub(crate) fn store_named(&mut self, name: &str, value: V, next: usize) {
        self.live.insert(name.to_string(), value);
        self.retire(next);
    }

    fn is_output(&self, name: &str) -> bool {
        self.outputs.iter().any(|o| o == name)
    }

    /// Drops every value no layer from `next` on reads, outputs kept.
    fn retire(&mut self, next: usize) {
        let (last, outputs) = (&self.last_reader, &self.outputs);
        self.live.retain(|name, _| {
            last.get(name.as_str()).is_some_and(|&l| l >= next) || outputs.contains(name)
        });
    }

    /// The model's outputs, in manifest order.
    pub(crate) fn take_outputs(mut self, pkg: &Package) -> Result<Vec<V>> {
        pkg.manifest
            .outputs
            .iter()
            .map(|o| {
                self.live
                    .remove(&o.name)
                    .with_context(|| format!("output '{}' was never produced", o.name))
            })
            .collect()
    }
}

/// The activations of one layer-by-layer inference, between its layers: a [`Walk`] over
/// tract's values, which stay tract's (no copy between layers) and out of this type's
/// API. Owned, so that a scheduler can keep one per inference in flight and run its
/// layers on any worker; `Clone` is cheap (tract's values are shared), which lets a
/// benchmark run one layer many times on the same inputs.
#[derive(Clone)]
pub struct Activations(Walk<TValue>);

impl Activations {
    /// The start of an inference: `input` alone is alive (its shape is not checked here;
    /// [`run_layerwise`] checks it against the manifest).
    pub fn new(pkg: &Package, input: &FloatTensor) -> Result<Activations> {
        Ok(Activations(Walk::start(pkg, to_tvalue(input)?)))
    }

    /// Bytes of the values alive now.
    pub(crate) fn live_bytes(&self) -> u64 {
        self.0
            .live
            .values()
            .map(|v| (v.len() * v.datum_type().size_of()) as u64)
            .sum()
    }

    /// Runs one loaded layer on the values it reads and keeps what it produces; what no
    /// later layer reads is dropped. Layers must come in the package's order.
    pub fn step(&mut self, pkg: &Package, layer: &LoadedLayer) -> Result<()> {
        let inputs = self.take_inputs(pkg, layer.index)?;
        let outs = run_layer(pkg, layer, inputs)?;
        self.store(pkg, layer.index, outs)
    }

    /// The values layer `index` reads, for a worker to run it away from the walk's owner;
    /// those it reads last are moved out, so that tract holds the only reference and may
    /// reuse their buffers in place (a shared value is deep-copied by the first op that
    /// writes or reshapes it: a copy and fresh pages of every layer's input, each frame).
    pub(crate) fn take_inputs(&mut self, pkg: &Package, index: usize) -> Result<TVec<TValue>> {
        Ok(self.0.take_inputs(pkg, index)?.into_iter().collect())
    }

    /// Stores what layer `index` produced (run on [`Activations::take_inputs`]).
    pub(crate) fn store(&mut self, pkg: &Package, index: usize, outs: TVec<TValue>) -> Result<()> {
        self.0.store(pkg, index, outs)
    }

    /// The model's outputs, in manifest order; fails if a layer has not run.
    pub fn finish(self, pkg: &Package) -> Result<Vec<FloatTensor>> {
        self.0.take_outputs(pkg)?.iter().map(from_tvalue).collect()
    }
}

/// Runs one loaded layer, naming it in errors.
pub(super) fn run_layer(
    pkg: &Package,
    layer: &LoadedLayer,
    inputs: TVec<TValue>,
) -> Result<TVec<TValue>> {
    let entry = &pkg.manifest.layers[layer.index];
    layer.plan.run(inputs).with_context(|| {
        format!(
            "{}: layer {} ({})",
            pkg.name(),
            entry.index,
            entry.ops.join("+")
        )
    })
}
