//! Per-layer costs the scheduler plans with. Without a measured profile they are estimated
//! from the manifest: bytes from the layer's weights and activations, durations from its
//! file size and FLOPs at rates measured on this build machine (see docs/runtime.md).

mod measure;
pub use measure::{ModelProfile, Profile, profile_package};

use crate::model::{LayerKind, Manifest, Package};
use crate::runtime::LayerCost;

/// Parsing and planning a layer file, bytes per second (tract's optimiser dominates).
const LOAD_BYTES_PER_SEC: f64 = 300e6;
/// Per-layer fixed cost of a load (open, verify, plan), seconds.
const LOAD_FIXED_SECS: f64 = 0.5e-3;
/// Sustained f32 FLOPs per second of one core.
const EXEC_FLOPS_PER_SEC: f64 = 5e9;

/// Estimated costs of every layer of a package.
pub fn estimate(manifest: &Manifest) -> Vec<LayerCost> {
    manifest
        .layers
        .iter()
        .map(|l| {
            let activations: u64 = l.inputs.iter().chain(&l.outputs).map(|t| t.bytes).sum();
            let w = l.weight_bytes;
            LayerCost {
                kind: l.kind,
                // tract keeps the weights packed for its kernels, padded to its tile sizes
                // (measured 1.00–1.13 × the weights).
                load_bytes: w + w / 8 + (64 << 10),
                // While planning, the file's buffer or tract's unpacked copy sits beside the
                // packed weights; convolution kernels are also reordered and reshaped
                // before packing (measured peaks: 2.13 × the weights for fc, up to 4.0 ×
                // for conv; docs/runtime.md).
                plan_bytes: match l.kind {
                    LayerKind::Fc => w + (64 << 10),
                    LayerKind::Conv | LayerKind::DwConv | LayerKind::Other => 3 * w + (64 << 10),
                },
                // Inputs and outputs, plus as much again for workspace (im2col, packing).
                exec_bytes: 2 * activations,
                load_secs: LOAD_FIXED_SECS + l.file_bytes as f64 / LOAD_BYTES_PER_SEC,
                exec_secs: 1e-5 + l.flops as f64 / EXEC_FLOPS_PER_SEC,
            }
        })
        .collect()
}

/// `estimate`, with each layer's execution bytes from its graph: the outputs, the buffers
/// tract builds for convolutions, and its kernels' scratch (`tiling::predictor`'s model
/// of tract 0.23, measured in docs/tiling.md), beyond the inputs the inference already
/// holds. A layer that cannot be read keeps the manifest's estimate (its load will fail
/// with the reason).
pub fn estimate_package(pkg: &Package) -> Vec<LayerCost> {
    let mut costs = estimate(&pkg.manifest);
    for (i, cost) in costs.iter_mut().enumerate() {
        if let Ok((_, graph)) = pkg.read_layer(i) {
            let inputs: u64 = graph
                .inputs
                .iter()
                .map(|&t| graph.tensors[t].bytes() as u64)
                .sum();
            let peak = crate::tiling::predictor::exec_peak(&graph);
            cost.exec_bytes =
                peak.saturating_sub(inputs) + crate::tiling::predictor::CALIBRATION.run_bytes;
        }
    }
    costs
}
