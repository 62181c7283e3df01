//! Model packages: TFLite import, normalisation, layer split, manifests and the zoo.
//!
//! Nothing here knows about scheduling, memory or the spool: the runtime reads packages
//! through [`Package`] and nothing else.

pub mod graph;
pub mod normalise;
mod ops;
pub mod package;
pub(crate) mod split;
pub mod tflite;
pub mod zoo;

pub use package::{
    ColorOrder, LayerEntry, Manifest, OutdatedFormat, Package, Preprocess, ResizeMode,
};
pub use split::LayerKind;

use anyhow::{Context, Result, ensure};
use std::path::Path;

/// Largest model file import reads: TFLite flatbuffers stop at 2 GiB, and external buffers
/// are not used by vision models of the size this appliance runs.
const MAX_MODEL_BYTES: u64 = 4 << 30;

/// What `memaflow import` may change about a model: its name, preprocessing, labels and
/// how large a layer may be. Everything else comes from the file.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// Package name; the file stem when absent.
    pub name: Option<String>,
    /// How frames are turned into its input (the file does not say).
    pub preprocess: Preprocess,
    /// One label per line, attached to the output with as many values.
    pub labels: Option<Vec<String>>,
    /// Replace an existing package at the destination.
    pub replace: bool,
    /// Fully-connected layers with more weight bytes than this are split into several
    /// layers (`None`: never).
    pub max_layer_weights: Option<u64>,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            name: None,
            preprocess: Preprocess::default(),
            labels: None,
            replace: false,
            max_layer_weights: Some(DEFAULT_MAX_LAYER_WEIGHTS),
        }
    }
}

/// Default for [`ImportOptions::max_layer_weights`]: small enough that one layer fits the
/// smallest board's budget with room to spare, large enough to keep layers few.
pub(crate) const DEFAULT_MAX_LAYER_WEIGHTS: u64 = 16 << 20;

/// `memaflow import`: reads, normalises and splits a TFLite model into a package.
pub fn import(model: &Path, out: &Path, options: &ImportOptions) -> Result<Manifest> {
    let ctx = || model.display().to_string();
    let bytes =
        bytes::Bytes::from(package::read_limited_bytes(model, MAX_MODEL_BYTES).with_context(ctx)?);
    let source = package::Source {
        file: model
            .file_name()
            .map(|f| f.to_string_lossy().to_string())
            .unwrap_or_default(),
        bytes: bytes.len() as u64,
    };
    let mut graph = tflite::read_graph_shared(&bytes).with_context(ctx)?;
    drop(bytes);
    log_peak("read");
    graph.check_shapes().with_context(ctx)?;
    let mut report = normalise::normalise(&mut graph).with_context(ctx)?;
    if let Some(max) = options.max_layer_weights {
        let n = split::split_large_fully_connected(&mut graph, max).with_context(ctx)?;
        if n > 0 {
            report.insert("split-fully-connected", n);
        }
    }
    log_peak("normalised");
    let name = match &options.name {
        Some(n) => n.clone(),
        None => model
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "model".into()),
    };
    let mut labels = std::collections::HashMap::new();
    if let Some(l) = &options.labels {
        let target = graph
            .outputs
            .iter()
            .find(|&&o| graph.tensors[o].elements() == l.len())
            .with_context(|| {
                format!(
                    "{}: no output has {} values to match the {} labels",
                    ctx(),
                    l.len(),
                    l.len()
                )
            })?;
        labels.insert(graph.tensors[*target].name.clone(), l.clone());
    }
    ensure!(
        options.preprocess.mean.len() == 1
            || options.preprocess.mean.len()
                == graph.tensors[graph.inputs[0]]
                    .shape
                    .last()
                    .copied()
                    .unwrap_or(0),
        "{}: preprocessing gives {} means for an input of shape {:?}",
        ctx(),
        options.preprocess.mean.len(),
        graph.tensors[graph.inputs[0]].shape
    );
    let meta = package::PackageMeta {
        name,
        source: Some(source),
        preprocess: options.preprocess.clone(),
        labels,
        normalisation: report
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    };
    let manifest = package::write_package(&graph, &meta, out, options.replace).with_context(ctx)?;
    log_peak("written");
    Ok(manifest)
}

/// Import's memory at each phase, for `RUST_LOG=debug` (its peak is a documented bound).
fn log_peak(phase: &str) {
    if let Ok(m) = crate::memory::process_memory() {
        log::debug!(
            "import: {phase}: RSS {}, peak {}",
            crate::memory::Bytes(m.rss),
            crate::memory::Bytes(m.peak_rss)
        );
    }
}
