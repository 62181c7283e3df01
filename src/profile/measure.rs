//! `memaflow profile`: measured per-layer costs. Each run loads every layer fresh and runs
//! it on a constant input; per layer the median over runs is kept.

use crate::memory::{process_memory, reset_peak};
use crate::model::Package;
use crate::runtime::{FloatTensor, LayerCost, load_layer};
use anyhow::{Context, Result, ensure};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// Measured costs of one package's layers.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelProfile {
    /// Layers of the package when profiled: a changed package is not matched.
    pub layers: usize,
    /// Total weight bytes of the package when profiled: a changed package is not matched.
    pub weight_bytes: u64,
    /// Measured costs, per layer.
    pub costs: Vec<LayerCost>,
}

/// Profiles by package name, as written to and read from a JSON file.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Profile {
    /// The profiled packages, by name.
    pub models: BTreeMap<String, ModelProfile>,
}

impl Profile {
    /// Reads a profile written by `memaflow profile`.
    pub fn read(path: &Path) -> Result<Profile> {
        let bytes = crate::model::package::read_limited_bytes(path, 64 << 20)?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not a memaflow profile", path.display()))
    }

    /// Writes the profile as pretty JSON.
    pub fn write(&self, path: &Path) -> Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// The measured costs of `pkg` if this profile has them for the same package, else the
    /// estimate from its manifest.
    pub fn costs_for(&self, pkg: &Package) -> Vec<LayerCost> {
        match self.models.get(pkg.name()) {
            Some(m)
                if m.layers == pkg.manifest.layers.len()
                    && m.weight_bytes == pkg.manifest.weight_bytes() =>
            {
                m.costs.clone()
            }
            Some(_) => {
                log::warn!(
                    "{}: the profile was made for another version of this package; estimating",
                    pkg.name()
                );
                super::estimate_package(pkg)
            }
            None => super::estimate_package(pkg),
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `pkg` `runs` times layer by layer, measuring each layer's load and exec time, the
/// resident bytes its load adds (weights and plan), and the peak its exec adds.
pub fn profile_package(pkg: &Package, runs: usize) -> Result<ModelProfile> {
    ensure!(runs > 0, "--runs must be at least 1");
    let n = pkg.manifest.layers.len();
    let mut load_secs = vec![vec![]; n];
    let mut exec_secs = vec![vec![]; n];
    let mut load_bytes = vec![vec![]; n];
    let mut plan_bytes = vec![vec![]; n];
    let mut exec_bytes = vec![vec![]; n];
    let input = FloatTensor::filled(pkg.manifest.inputs[0].shape.clone(), 0.5);
    for _ in 0..runs {
        let mut walk = crate::runtime::Activations::new(pkg, &input)?;
        for i in 0..n {
            let before = process_memory()?.rss;
            reset_peak()?;
            let t = Instant::now();
            let layer = load_layer(pkg, i)?;
            load_secs[i].push(t.elapsed().as_secs_f64());
            let loaded = process_memory()?;
            load_bytes[i].push(loaded.rss.saturating_sub(before) as f64);
            plan_bytes[i].push(loaded.peak_rss.saturating_sub(loaded.rss) as f64);
            let loaded = loaded.rss;
            reset_peak()?;
            let t = Instant::now();
            walk.step(pkg, &layer)?;
            exec_secs[i].push(t.elapsed().as_secs_f64());
            exec_bytes[i].push(process_memory()?.peak_rss.saturating_sub(loaded) as f64);
        }
        walk.finish(pkg)?;
    }
    let costs = (0..n)
        .map(|i| {
            let entry = &pkg.manifest.layers[i];
            let activations: u64 = entry
                .inputs
                .iter()
                .chain(&entry.outputs)
                .map(|t| t.bytes)
                .sum();
            (entry, activations)
        })
        .enumerate()
        .map(|(i, (entry, activations))| LayerCost {
            kind: entry.kind,
            // RSS deltas miss memory the allocator reused from an earlier layer; in a batch
            // that memory is someone else's. Never below the weights and the activations.
            load_bytes: (median(load_bytes[i].clone()) as u64).max(entry.weight_bytes),
            // The planner's copies are freed by the time the load returns: only the peak
            // sees them.
            plan_bytes: median(plan_bytes[i].clone()) as u64,
            exec_bytes: (median(exec_bytes[i].clone()) as u64).max(activations),
            load_secs: median(load_secs[i].clone()),
            exec_secs: median(exec_secs[i].clone()),
        })
        .collect();
    Ok(ModelProfile {
        layers: n,
        weight_bytes: pkg.manifest.weight_bytes(),
        costs,
    })
}
