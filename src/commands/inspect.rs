//! `memaflow inspect`: a package's layers as a table (or its manifest as JSON).

use crate::memory::Bytes;
use crate::model::Manifest;
use std::fmt;

/// A package's layers as `memaflow inspect` prints them: kind, weights, activations in
/// and out, MFLOPs and ops per layer, then the totals.
pub struct LayerTable<'a>(pub &'a Manifest);

impl fmt::Display for LayerTable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        writeln!(
            f,
            "{}: {} layers; input {}; outputs {}",
            m.name,
            m.layers.len(),
            io(m.inputs.iter().map(|t| (&t.name, &t.shape))),
            io(m.outputs.iter().map(|t| (&t.name, &t.shape)))
        )?;
        writeln!(
            f,
            "{:>5}  {:<6} {:>11} {:>11} {:>11} {:>10}  ops",
            "layer", "kind", "weights", "act in", "act out", "MFLOPs"
        )?;
        for l in &m.layers {
            writeln!(
                f,
                "{:>5}  {:<6} {:>11} {:>11} {:>11} {:>10.1}  {}",
                l.index,
                l.kind.name(),
                Bytes(l.weight_bytes).to_string(),
                Bytes(l.input_bytes()).to_string(),
                Bytes(l.output_bytes()).to_string(),
                l.flops as f64 / 1e6,
                l.ops.join("+")
            )?;
        }
        let peak_act = m
            .layers
            .iter()
            .map(|l| l.input_bytes() + l.output_bytes())
            .max()
            .unwrap_or(0);
        write!(
            f,
            "total  {:<6} {:>11} {:>11} {:>11} {:>10.1}  (files {}, largest layer {})",
            "",
            Bytes(m.weight_bytes()).to_string(),
            "",
            format!("max {}", Bytes(peak_act)),
            m.flops() as f64 / 1e6,
            Bytes(m.file_bytes()),
            Bytes(m.layers.iter().map(|l| l.weight_bytes).max().unwrap_or(0)),
        )
    }
}

/// `name [shape]` of each tensor, comma-separated.
fn io<'a>(tensors: impl Iterator<Item = (&'a String, &'a Vec<usize>)>) -> String {
    tensors
        .map(|(name, shape)| format!("{name} {shape:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}
