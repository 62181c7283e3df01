//! `memaflow import`: a float TFLite model into a model package.

use crate::memory::{self, Bytes};
use crate::model::{self, ColorOrder, ImportOptions, Manifest, Preprocess, ResizeMode};
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `memaflow import` as typed.
#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    /// The .tflite file.
    pub model: PathBuf,
    /// Package directory to create.
    #[arg(long)]
    pub out: PathBuf,
    /// Package name (default: the file name without extension).
    #[arg(long)]
    pub name: Option<String>,
    /// Replace an existing package at --out.
    #[arg(long)]
    pub force: bool,
    /// Split fully-connected layers with more weights than this into several layers, so
    /// that each fits a small budget (0: never split).
    #[arg(long, value_name = "SIZE", default_value = "16M")]
    pub max_layer_weights: Bytes,
    /// Map pixels 0..255 linearly onto LO,HI (default 0,1). Exclusive with --mean/--std.
    #[arg(long, value_name = "LO,HI", conflicts_with_all = ["mean", "std"], allow_hyphen_values = true)]
    pub range: Option<String>,
    /// Per-channel mean subtracted from 0..255 pixels, e.g. 127.5 or 104,117,123.
    #[arg(long, value_name = "M[,M,M]", requires = "std")]
    pub(crate) mean: Option<String>,
    /// Per-channel divisor applied after the mean, e.g. 127.5 or 58.4,57.1,57.4.
    #[arg(long, value_name = "S[,S,S]", requires = "mean")]
    pub(crate) std: Option<String>,
    /// Channel order the model expects.
    #[arg(long, value_enum, default_value = "rgb")]
    pub(crate) color: ColorOrder,
    /// How frames are fitted to the input size.
    #[arg(long, value_enum, default_value = "stretch")]
    pub(crate) resize: ResizeMode,
    /// Text file with one class label per line, for the output with that many values.
    #[arg(long, value_name = "FILE")]
    pub labels: Option<PathBuf>,
}

/// `memaflow import`, checked.
#[derive(Clone, Debug)]
pub struct ImportRequest {
    pub(crate) model: PathBuf,
    pub(crate) out: PathBuf,
    pub(crate) options: ImportOptions,
}

fn floats(text: &str, what: &str) -> Result<Vec<f32>> {
    text.split(',')
        .map(|v| {
            v.trim()
                .parse::<f32>()
                .with_context(|| format!("{what}: '{v}' is not a number"))
        })
        .collect()
}

impl ImportArgs {
    /// Checks the arguments once into a request (preprocessing parsed, labels read).
    pub fn check(self) -> Result<ImportRequest> {
        let mut preprocess = Preprocess {
            color: self.color,
            resize: self.resize,
            ..Preprocess::default()
        };
        if let Some(range) = &self.range {
            let r = floats(range, "--range")?;
            if r.len() != 2 || r[0] == r[1] {
                bail!("--range takes two different numbers, LO,HI");
            }
            // pixel/255·(hi-lo) + lo  ==  (pixel - mean) / std
            let std = 255.0 / (r[1] - r[0]);
            preprocess.mean = vec![-r[0] * std];
            preprocess.std = vec![std];
        }
        if let (Some(m), Some(s)) = (&self.mean, &self.std) {
            preprocess.mean = floats(m, "--mean")?;
            preprocess.std = floats(s, "--std")?;
        }
        let labels = self
            .labels
            .as_deref()
            .map(model::package::read_labels)
            .transpose()?;
        let max = self.max_layer_weights.0;
        Ok(ImportRequest {
            model: self.model,
            out: self.out,
            options: ImportOptions {
                name: self.name,
                preprocess,
                labels,
                replace: self.force,
                max_layer_weights: (max > 0).then_some(max),
            },
        })
    }
}

/// What an import wrote, and what it cost.
pub struct ImportSummary {
    /// The package's manifest.
    pub manifest: Manifest,
    /// The package's directory.
    pub out: PathBuf,
    /// Wall-clock time of the import.
    pub took: Duration,
    /// The process's peak resident set after the import.
    pub peak_rss: Option<u64>,
}

/// Imports the model into a package (see [`crate::model::import`]) and measures what it cost.
pub fn run(request: &ImportRequest) -> Result<ImportSummary> {
    let t = Instant::now();
    let manifest = model::import(&request.model, &request.out, &request.options)?;
    Ok(ImportSummary {
        manifest,
        out: request.out.clone(),
        took: t.elapsed(),
        peak_rss: memory::process_memory().ok().map(|m| m.peak_rss),
    })
}

impl std::fmt::Display for ImportSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.manifest;
        write!(
            f,
            "{}: {} layers, {} of weights, {} of layer files, written to {} in {:.1} s",
            m.name,
            m.layers.len(),
            Bytes(m.weight_bytes()),
            Bytes(m.file_bytes()),
            self.out.display(),
            self.took.as_secs_f64(),
        )?;
        if let Some(peak) = self.peak_rss {
            write!(f, ", peak RSS {:.1} MiB", peak as f64 / 1048576.0)?;
        }
        let rewrites: Vec<String> = m
            .normalisation
            .iter()
            .map(|(k, v)| format!("{k}×{v}"))
            .collect();
        if !rewrites.is_empty() {
            write!(f, " (normalised: {})", rewrites.join(", "))?;
        }
        Ok(())
    }
}
