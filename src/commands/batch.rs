//! `memaflow batch`: every input through every model, layer by layer under a loading
//! policy and a scheduler within a memory budget (or the status quo: each model whole, one
//! inference after another).

use super::{InputSource, summarise_outputs, write_npy_outputs};
use crate::bench::status_quo;
use crate::memory::{Bytes, SystemMemory};
use crate::model::Package;
use crate::profile::Profile;
use crate::runtime::scheduler::CacheStats;
use crate::runtime::{
    self, BatchOptions, Eviction, FloatTensor, Job, LayerCache, LayerCost, LoadingPolicy,
    SchedulingPolicy,
};
use crate::spool::results::OutputSummary;
use crate::tiling::{TiledModel, Tiling};
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `memaflow batch` as typed.
#[derive(clap::Args, Debug)]
pub struct BatchArgs {
    /// Package directories (comma-separated or repeated).
    #[arg(long, required = true, value_delimiter = ',', value_name = "PKG")]
    pub models: Vec<PathBuf>,
    /// Images to run through every model (JPEG, PNG, PPM/PGM, BMP).
    #[arg(long, num_args = 1.., value_name = "IMAGE", required_unless_present = "input_npy", conflicts_with = "input_npy")]
    pub(crate) images: Vec<PathBuf>,
    /// Float tensors to feed every model as is.
    #[arg(long, num_args = 1.., value_name = "FILE")]
    pub(crate) input_npy: Vec<PathBuf>,
    /// How layers are loaded relative to their execution.
    #[arg(long, value_enum, default_value = "partial")]
    pub loading: LoadingPolicy,
    /// Which ready task runs next.
    #[arg(long, value_enum, default_value = "mema")]
    pub scheduling: SchedulingPolicy,
    /// Inferences in flight at once (1 to 16).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=runtime::MAX_PARALLEL as i64))]
    pub parallel: u16,
    /// Memory budget for weights and activations (e.g. 256M, 1G); the live MemAvailable
    /// and cgroup limit bound it further.
    #[arg(long, value_name = "SIZE")]
    pub budget: Option<Bytes>,
    /// Memory kept free below MemAvailable and the cgroup limit.
    #[arg(long, value_name = "SIZE", default_value = "16M")]
    pub reserve: Bytes,
    /// Fused tiling: `needed` runs a model tiled when one of its layers does not fit the
    /// budget (`--budget`, else the memory free at the start) on its own; `auto` whenever
    /// the search predicts a faster tiled run within it; `off` never. (A configuration
    /// names one package's layers: `infer` takes it.)
    #[arg(long, value_name = "MODE", default_value = "needed")]
    pub tiling: Tiling,
    /// Worker threads (default: one per CPU).
    #[arg(long)]
    pub workers: Option<usize>,
    /// `keep`: a loaded layer stays resident for the next inference of its model while
    /// memory allows; `off`: every inference loads its own layers (the paper's runs).
    #[arg(long, value_enum, default_value = "keep")]
    pub cache: LayerCache,
    /// Which resident layer makes room first when a load needs it.
    #[arg(long, value_enum, default_value = "cost-per-byte")]
    pub eviction: Eviction,
    /// Per-layer costs measured by `memaflow profile` (estimated from the manifest for
    /// packages it does not cover).
    #[arg(long, value_name = "FILE")]
    pub(crate) profile: Option<PathBuf>,
    /// Write outputs as DIR/KK-MODEL/NN.npy (KK: inference number) with outputs.json.
    #[arg(long, value_name = "DIR")]
    pub(crate) npy_out: Option<PathBuf>,
    /// Write the full report (timeline of every task, budget readings) as JSON.
    #[arg(long, value_name = "FILE.json")]
    pub report: Option<PathBuf>,
    /// The status quo instead: each model run whole in tract, one inference after another
    /// (no layers, no scheduler, no budget).
    #[arg(long, conflicts_with_all = ["loading", "scheduling", "parallel", "budget", "workers", "profile", "tiling", "cache", "eviction"])]
    pub(crate) status_quo: bool,
}

/// How the batch runs.
#[derive(Clone, Debug)]
pub(crate) enum BatchEngine {
    /// Layer by layer under the scheduler; packages tiled as `tiling` says.
    Layerwise {
        options: BatchOptions,
        tiling: Tiling,
        /// Per-layer costs (`memaflow profile`); estimated where it has none.
        profile: Option<PathBuf>,
    },
    /// Each model whole in tract, one inference after another.
    StatusQuo,
}

/// `memaflow batch`, checked.
#[derive(Clone, Debug)]
pub struct BatchRequest {
    pub(crate) models: Vec<PathBuf>,
    /// Every input goes through every model, inputs in the outer loop.
    pub(crate) inputs: Vec<InputSource>,
    pub(crate) engine: BatchEngine,
    pub(crate) npy_out: Option<PathBuf>,
    /// Where the full report (`BatchReport` or `StatusQuoReport`) goes.
    pub(crate) report: Option<PathBuf>,
}

impl BatchArgs {
    /// Checks the arguments once into a request: inputs exist, engines and budgets parse.
    pub fn check(self) -> Result<BatchRequest> {
        let inputs = if self.input_npy.is_empty() {
            self.images.into_iter().map(InputSource::Image).collect()
        } else {
            self.input_npy.into_iter().map(InputSource::Npy).collect()
        };
        self.tiling.check_shared()?;
        let engine = if self.status_quo {
            BatchEngine::StatusQuo
        } else {
            let workers = self
                .workers
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            BatchEngine::Layerwise {
                options: BatchOptions {
                    loading: self.loading,
                    scheduling: self.scheduling,
                    parallel: self.parallel.into(),
                    budget: self.budget.map(|b| b.0),
                    reserve: self.reserve.0,
                    workers,
                    cache: self.cache,
                    eviction: self.eviction,
                },
                tiling: self.tiling,
                profile: self.profile,
            }
        };
        Ok(BatchRequest {
            models: self.models,
            inputs,
            engine,
            npy_out: self.npy_out,
            report: self.report,
        })
    }
}

/// What `memaflow batch` prints: the layer-wise run's or the status quo's.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum BatchSummary {
    /// The layer-wise executor's batch.
    Layerwise(LayerwiseSummary),
    /// The status quo's batch (`--status-quo`).
    StatusQuo(StatusQuoSummary),
}

/// What a layer-wise batch did, as `memaflow batch` prints it.
#[derive(Debug, Serialize)]
pub struct LayerwiseSummary {
    /// The loading policy.
    pub loading: LoadingPolicy,
    /// The scheduling policy.
    pub scheduling: SchedulingPolicy,
    /// Inferences in flight at once.
    pub parallel: usize,
    /// The ledger's bound, if one was given.
    pub budget_bytes: Option<u64>,
    /// From the executor's start to the last inference's end.
    pub makespan_ms: f64,
    /// The ledger's highest value.
    pub ledger_high_water_bytes: u64,
    /// Times the ledger went beyond the budget.
    pub overdrafts: u64,
    /// Whether layers stayed resident across inferences.
    pub cache: LayerCache,
    /// The layer cache's counters.
    pub layers: CacheStats,
    /// The process's peak resident set.
    pub peak_rss_bytes: u64,
    /// Package name → the tiling configuration it ran under, for the tiled ones.
    pub tiled: BTreeMap<String, String>,
    /// Every inference, in submission order.
    pub inferences: Vec<BatchInference>,
}

/// What a status-quo batch did, as `memaflow batch --status-quo` prints it.
#[derive(Debug, Serialize)]
pub struct StatusQuoSummary {
    /// Always `status-quo`.
    pub mode: &'static str,
    /// Wall-clock time of the whole batch, models' loads included.
    pub makespan_ms: f64,
    /// The process's peak resident set.
    pub peak_rss_bytes: u64,
    /// Every inference, in submission order.
    pub inferences: Vec<BatchInference>,
}

/// One inference of a batch, in submission order.
#[derive(Debug, Serialize)]
pub struct BatchInference {
    /// The package's name.
    pub model: String,
    /// The input file as given.
    pub input: String,
    /// When it started, ms from the batch's start.
    pub start_ms: f64,
    /// When it ended, ms from the batch's start.
    pub end_ms: f64,
    /// Its outputs, summarised.
    pub outputs: Vec<OutputSummary>,
}

/// Runs the batch, writes `--npy-out` and `--report` if asked, and summarises it.
pub fn run(request: &BatchRequest) -> Result<BatchSummary> {
    let packages = request
        .models
        .iter()
        .map(|m| Package::open(m).map(Arc::new))
        .collect::<Result<Vec<_>>>()?;
    match &request.engine {
        BatchEngine::StatusQuo => run_status_quo(request, &packages).map(BatchSummary::StatusQuo),
        BatchEngine::Layerwise {
            options,
            tiling,
            profile,
        } => run_layerwise(request, &packages, options, tiling, profile.as_deref())
            .map(BatchSummary::Layerwise),
    }
}

/// One job per input and package (inputs in the outer loop), and each job's input label.
/// `tiled` is empty or has an entry per package.
fn build_jobs(
    packages: &[Arc<Package>],
    costs: &[Arc<[LayerCost]>],
    tiled: &[Option<TiledModel>],
    inputs: &[InputSource],
) -> Result<(Vec<Job>, Vec<String>)> {
    let mut jobs = vec![];
    let mut labels = vec![];
    for source in inputs {
        let label = source.path().display().to_string();
        for (k, (pkg, costs)) in packages.iter().zip(costs).enumerate() {
            let input = source.tensor_for(pkg).with_context(|| label.clone())?;
            jobs.push(match tiled.get(k).and_then(Option::as_ref) {
                Some(t) => t.job(input),
                None => Job::layered(pkg.clone(), input, costs.clone()),
            });
            labels.push(label.clone());
        }
    }
    Ok((jobs, labels))
}

fn tiled_configs(
    packages: &[Arc<Package>],
    tiled: &[Option<TiledModel>],
) -> BTreeMap<String, String> {
    packages
        .iter()
        .zip(tiled)
        .filter_map(|(p, t)| Some((p.name().to_string(), t.as_ref()?.config.to_string())))
        .collect()
}

/// The layer-wise run under the scheduler, its files written.
fn run_layerwise(
    request: &BatchRequest,
    packages: &[Arc<Package>],
    options: &BatchOptions,
    tiling: &Tiling,
    profile: Option<&Path>,
) -> Result<LayerwiseSummary> {
    let profile = match profile {
        Some(path) => Profile::read(path)?,
        None => Profile::default(),
    };
    // One cost table per package, shared by its inferences, so that timings observed on
    // one input refine the schedule of the next.
    let costs: Vec<Arc<[LayerCost]>> = packages
        .iter()
        .map(|p| profile.costs_for(p).into())
        .collect();
    let system = SystemMemory::detect();
    let budget = system.budget_or_headroom(options.budget, options.reserve);
    let tiled = packages
        .iter()
        .zip(&costs)
        .map(|(p, c)| TiledModel::plan(p, c, tiling, budget))
        .collect::<Result<Vec<_>>>()?;
    let (jobs, labels) = build_jobs(packages, &costs, &tiled, &request.inputs)?;
    let report = runtime::run_batch(jobs.clone(), options, &system)?;
    write_files(request, &jobs, &report.outputs, &report)?;
    let spans = report.inferences.iter().map(|r| (r.start_ms, r.end_ms));
    Ok(LayerwiseSummary {
        loading: report.loading,
        scheduling: report.scheduling,
        parallel: report.parallel,
        budget_bytes: report.budget,
        makespan_ms: report.makespan_ms,
        ledger_high_water_bytes: report.ledger_high_water,
        overdrafts: report.overdrafts,
        cache: report.cache,
        layers: report.cache_stats,
        peak_rss_bytes: report.peak_rss,
        tiled: tiled_configs(packages, &tiled),
        inferences: inference_summaries(&jobs, &report.outputs, &labels, spans),
    })
}

/// `--status-quo`: the same jobs, each whole in tract, one after another.
fn run_status_quo(request: &BatchRequest, packages: &[Arc<Package>]) -> Result<StatusQuoSummary> {
    // Whole runs read no layer costs.
    let costs = vec![Arc::from([]); packages.len()];
    let (jobs, labels) = build_jobs(packages, &costs, &[], &request.inputs)?;
    let report = status_quo::run(&jobs)?;
    write_files(request, &jobs, &report.outputs, &report)?;
    let spans = report.inferences.iter().map(|r| (r.start_ms, r.end_ms));
    Ok(StatusQuoSummary {
        mode: report.mode,
        makespan_ms: report.makespan_ms,
        peak_rss_bytes: report.peak_rss,
        inferences: inference_summaries(&jobs, &report.outputs, &labels, spans),
    })
}

/// `--npy-out DIR` (`DIR/KK-MODEL/NN.npy` per job, in submission order) and `--report`.
fn write_files(
    request: &BatchRequest,
    jobs: &[Job],
    outputs: &[Vec<FloatTensor>],
    report: &impl Serialize,
) -> Result<()> {
    if let Some(dir) = &request.npy_out {
        let width = jobs.len().to_string().len().max(2);
        for (k, (job, outs)) in jobs.iter().zip(outputs).enumerate() {
            write_npy_outputs(
                &dir.join(format!("{k:0width$}-{}", job.package.name())),
                &job.package,
                outs,
            )?;
        }
    }
    if let Some(path) = &request.report {
        write_report(path, report)?;
    }
    Ok(())
}

fn write_report(path: &Path, report: &impl Serialize) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing {}", path.display()))
}

fn inference_summaries(
    jobs: &[Job],
    outputs: &[Vec<FloatTensor>],
    labels: &[String],
    spans: impl Iterator<Item = (f64, f64)>,
) -> Vec<BatchInference> {
    jobs.iter()
        .zip(outputs)
        .zip(labels)
        .zip(spans)
        .map(
            |(((job, outs), input), (start_ms, end_ms))| BatchInference {
                model: job.package.name().to_string(),
                input: input.clone(),
                start_ms,
                end_ms,
                outputs: summarise_outputs(&job.package, outs),
            },
        )
        .collect()
}
