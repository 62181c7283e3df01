//! `memaflow infer`: one input through one package, layer by layer, tiled, or whole.

use super::{InputSource, ms, summarise_outputs, write_npy_outputs};
use crate::memory::{Bytes, PeakWatch};
use crate::model::Package;
use crate::runtime::{self, npy};
use crate::spool::results::OutputSummary;
use crate::tiling::execute::TiledStats;
use crate::tiling::{self, Tiling, TilingConfig};
use anyhow::{Result, bail};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

/// `memaflow infer` as typed.
#[derive(clap::Args, Debug)]
pub struct InferArgs {
    /// Package directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Image to run (JPEG, PNG, PPM/PGM, BMP), preprocessed as the manifest says.
    #[arg(required_unless_present = "input_npy", conflicts_with = "input_npy")]
    pub image: Option<PathBuf>,
    /// Feed this float tensor as the input, as is (no preprocessing).
    #[arg(long, value_name = "FILE")]
    pub(crate) input_npy: Option<PathBuf>,
    /// Run the whole normalised model in tract instead of layer by layer.
    #[arg(long)]
    pub whole: bool,
    /// Write each output as DIR/NN.npy (NN = position in the model's outputs) and
    /// DIR/outputs.json with their names.
    #[arg(long, value_name = "DIR")]
    pub(crate) npy_out: Option<PathBuf>,
    /// Also write the preprocessed input tensor to this .npy file.
    #[arg(long, value_name = "FILE")]
    pub(crate) save_input: Option<PathBuf>,
    /// Fused tiling of the early conv layers: `needed` (tile when the untiled run is
    /// predicted not to fit --budget; without --budget, never), `auto` (the fastest
    /// configuration predicted to fit --budget), `off` (the tiled executor with no group),
    /// or groups FIRST-LAST:ROWSxCOLS of layer indices and layers in output-channel slices
    /// LAYER/SLICES, e.g. `0-2:4x4,3-5:2x2,8/3`.
    #[arg(
        long,
        value_name = "MODE",
        default_value = "needed",
        conflicts_with = "whole"
    )]
    pub tiling: Tiling,
    /// Memory budget for the inference's activations and weights, for tiling.
    #[arg(long, value_name = "SIZE", conflicts_with = "whole")]
    pub budget: Option<Bytes>,
}

/// How the inference runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Execution {
    /// The whole normalised model as one tract model.
    Whole,
    /// Layer by layer, tiled as `tiling` says for `budget`.
    Layers { tiling: Tiling, budget: Option<u64> },
}

/// `memaflow infer`, checked.
#[derive(Clone, Debug)]
pub struct InferRequest {
    pub(crate) model: PathBuf,
    pub(crate) input: InputSource,
    pub(crate) execution: Execution,
    pub(crate) npy_out: Option<PathBuf>,
    pub(crate) save_input: Option<PathBuf>,
}

impl InferArgs {
    /// Checks the arguments once into a request: input exists, execution and budget parse.
    pub fn check(self) -> Result<InferRequest> {
        let Some(input) = InputSource::from_args(self.image, self.input_npy) else {
            bail!("give an IMAGE or --input-npy FILE");
        };
        let execution = if self.whole {
            Execution::Whole
        } else {
            Execution::Layers {
                tiling: self.tiling,
                budget: self.budget.map(|b| b.0),
            }
        };
        Ok(InferRequest {
            model: self.model,
            input,
            execution,
            npy_out: self.npy_out,
            save_input: self.save_input,
        })
    }
}

/// Which executor ran the inference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InferMode {
    /// The whole normalised model as one tract model.
    Whole,
    /// Layer by layer (also under a configuration that tiles nothing).
    Layers,
    /// Through the tiled executor.
    Tiled,
}

/// What `memaflow infer` prints.
#[derive(Clone, Debug, Serialize)]
pub struct InferSummary {
    /// The package's name.
    pub model: String,
    /// Which executor ran it.
    pub mode: InferMode,
    /// Layers of the package.
    pub layers: usize,
    /// The input file as given.
    pub input: String,
    /// Its outputs, summarised.
    pub outputs: Vec<OutputSummary>,
    /// Where its time went.
    pub time_ms: InferTimes,
    /// The process's peak resident set.
    pub peak_rss_bytes: Option<u64>,
    /// The run's own peak over the resident set before it (`VmHWM` reset before the run).
    pub run_peak_delta_bytes: Option<u64>,
    /// Set when the run went through the tiled executor.
    pub tiling: Option<TilingSummary>,
}

/// Milliseconds an inference spent loading, executing, and in all.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct InferTimes {
    /// Reading, parsing and planning layers (or the whole model).
    pub load: f64,
    /// Running them.
    pub exec: f64,
    /// From the start of the run to its outputs.
    pub total: f64,
}

/// How a tiled inference was cut.
#[derive(Clone, Debug, Serialize)]
pub struct TilingSummary {
    /// As `--tiling` takes it.
    pub config: String,
    /// Tiles run.
    pub tiles: usize,
    /// Tract plans built for tiles and channel slices.
    pub plans: usize,
}

/// The tiling configuration `infer` runs under; `None`: plain layer by layer (or whole).
fn tiling_config(pkg: &Package, execution: &Execution) -> Result<Option<TilingConfig>> {
    let Execution::Layers { tiling, budget } = execution else {
        return Ok(None);
    };
    // `--tiling off` runs the tiled executor without groups, so that it differs from a
    // tiled run by the tiling alone (benchmarks compare the two).
    Ok(match (tiling, budget) {
        (Tiling::Off, _) => Some(TilingConfig::untiled()),
        (Tiling::Fixed(c), _) => Some(c.clone()),
        (Tiling::Needed, None) => None,
        (Tiling::Needed, Some(_)) | (Tiling::Auto, _) => {
            tiling::search::for_inference(pkg, *budget, *tiling == Tiling::Auto)?
        }
    })
}

/// Runs one inference and summarises it.
pub fn run(request: &InferRequest) -> Result<InferSummary> {
    let pkg = Package::open(&request.model)?;
    let input = request.input.tensor_for(&pkg)?;
    if let Some(path) = &request.save_input {
        npy::write(path, &input.shape, &input.data)?;
    }
    let config = tiling_config(&pkg, &request.execution)?;
    let watch = PeakWatch::start();
    let t = Instant::now();
    let (run, tiled): (runtime::RunResult, Option<(&TilingConfig, TiledStats)>) =
        match (&request.execution, &config) {
            (Execution::Whole, _) => (runtime::run_whole(&pkg, &input)?, None),
            (_, None) => (runtime::run_layerwise(&pkg, &input)?, None),
            (_, Some(config)) => {
                let run = tiling::run_tiled(&pkg, input, config)?;
                let result = runtime::RunResult {
                    outputs: run.outputs,
                    stats: run.stats.run,
                };
                (result, Some((config, run.stats)))
            }
        };
    let total = t.elapsed();
    let peak = watch.finish();
    if let Some(dir) = &request.npy_out {
        write_npy_outputs(dir, &pkg, &run.outputs)?;
    }
    let mode = match (&request.execution, tiled) {
        (Execution::Whole, _) => InferMode::Whole,
        (_, Some((c, _))) if !c.is_untiled() => InferMode::Tiled,
        _ => InferMode::Layers,
    };
    Ok(InferSummary {
        model: pkg.name().to_string(),
        mode,
        layers: pkg.manifest.layers.len(),
        input: request.input.path().display().to_string(),
        outputs: summarise_outputs(&pkg, &run.outputs),
        time_ms: InferTimes {
            load: ms(run.stats.load),
            exec: ms(run.stats.exec),
            total: ms(total),
        },
        peak_rss_bytes: peak.peak_rss,
        run_peak_delta_bytes: peak.run_peak_delta,
        tiling: tiled.map(|(config, stats)| TilingSummary {
            config: config.to_string(),
            tiles: stats.tiles,
            plans: stats.plans,
        }),
    })
}
