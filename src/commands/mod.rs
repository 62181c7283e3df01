//! The commands `memaflow` runs on packages, as library functions: each takes the arguments
//! as the user typed them (a `clap::Args` struct, `…Args`), checks them once into typed
//! options (`…Request`), runs, and returns a typed summary that `main.rs` prints.
//!
//! This is the one module that sees every other one (as `main.rs` does): it turns a
//! command's inputs into the work of `model`, `runtime`, `tiling`, `spool` and `bench`, and
//! nothing imports it but `main.rs`.

pub mod batch;
pub mod import;
pub mod infer;
pub mod inspect;

use crate::model::Package;
use crate::runtime::{FloatTensor, npy};
use crate::spool::{preprocess, results};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Where an inference's input comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum InputSource {
    /// An image, decoded and preprocessed as the package's manifest says.
    Image(PathBuf),
    /// A float tensor fed as is.
    Npy(PathBuf),
}

impl InputSource {
    /// The source the user named: an `--input-npy` file over an image (clap makes them
    /// exclusive); `None` when neither was given.
    pub(crate) fn from_args(
        image: Option<PathBuf>,
        npy_file: Option<PathBuf>,
    ) -> Option<InputSource> {
        npy_file
            .map(InputSource::Npy)
            .or(image.map(InputSource::Image))
    }

    pub(crate) fn path(&self) -> &Path {
        match self {
            InputSource::Image(p) | InputSource::Npy(p) => p,
        }
    }

    /// The input tensor for `pkg`.
    pub(crate) fn tensor_for(&self, pkg: &Package) -> Result<FloatTensor> {
        match self {
            InputSource::Npy(path) => Ok(FloatTensor::from(npy::read(path)?)),
            InputSource::Image(path) => {
                let img = preprocess::decode_file(path)?;
                preprocess::to_input(
                    &img,
                    &pkg.manifest.preprocess,
                    &pkg.manifest.inputs[0].shape,
                )
                .with_context(|| pkg.name().to_string())
            }
        }
    }
}

/// Every output of `pkg` summarised as `infer` prints it, in manifest order.
fn summarise_outputs(pkg: &Package, outputs: &[FloatTensor]) -> Vec<results::OutputSummary> {
    pkg.manifest
        .outputs
        .iter()
        .zip(outputs)
        .map(|(spec, t)| results::summarise(&spec.name, t, spec.labels.as_deref()))
        .collect()
}

/// `DIR/NN.npy` per output (NN: its position in the model's outputs) and `DIR/outputs.json`.
fn write_npy_outputs(dir: &Path, pkg: &Package, outputs: &[FloatTensor]) -> Result<()> {
    #[derive(serde::Serialize)]
    struct OutputNames<'a> {
        outputs: Vec<&'a str>,
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let width = pkg.manifest.outputs.len().to_string().len().max(2);
    for (i, out) in outputs.iter().enumerate() {
        npy::write(&dir.join(format!("{i:0width$}.npy")), &out.shape, &out.data)?;
    }
    let names = OutputNames {
        outputs: pkg
            .manifest
            .outputs
            .iter()
            .map(|o| o.name.as_str())
            .collect(),
    };
    std::fs::write(
        dir.join("outputs.json"),
        serde_json::to_string_pretty(&names)?,
    )?;
    Ok(())
}

/// Milliseconds to the microsecond, as summaries print durations.
fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}
