//! A batch: many inferences submitted at once to an executor of their own, run in the
//! order the scheduler picks, with the memory gate consulted before every decision.

use super::FloatTensor;
use super::executor::{BudgetSample, Executor, ExecutorOptions, TaskRecord, WholeRun};
use super::residency::{Eviction, LayerCache};
use super::scheduler::{CacheStats, ModelId, SchedulerOptions, SchedulingPolicy};
use super::tasks::{LayerCost, LoadingPolicy};
use crate::memory::SystemMemory;
use crate::model::Package;
use anyhow::{Context, Result};
use std::sync::Arc;

/// How a batch runs: the policies, the memory bounds and the workers of its executor.
#[derive(Clone, Debug)]
pub struct BatchOptions {
    /// Which tasks of an inference may run before which.
    pub loading: LoadingPolicy,
    /// Which ready task runs next.
    pub scheduling: SchedulingPolicy,
    /// Inferences in flight at once.
    pub parallel: usize,
    /// Upper bound on the ledger (`--budget`); the live readings bound it further.
    pub budget: Option<u64>,
    /// Kept free below MemAvailable and below the cgroup limit.
    pub reserve: u64,
    /// Workers of the main pool (loads and execs). DeepEye adds one for fc preloads.
    pub workers: usize,
    /// Whether layers outlive the inference that loaded them (`Off`: the paper's runs).
    pub cache: LayerCache,
    /// Which resident layer goes first when room is needed.
    pub eviction: Eviction,
}

/// One input through one package.
#[derive(Clone)]
pub struct Job {
    /// The package (shared by the jobs of one model).
    pub package: Arc<Package>,
    /// The input tensor, of the package's input shape.
    pub input: FloatTensor,
    /// Per layer; for a `whole` job one entry, the whole run's cost.
    pub costs: Arc<[LayerCost]>,
    /// Run as one step, scheduled and budgeted as a single layer costing `costs[0]`.
    pub(crate) whole: Option<WholeRun>,
}

impl Job {
    /// The package layer by layer.
    pub fn layered(package: Arc<Package>, input: FloatTensor, costs: Arc<[LayerCost]>) -> Job {
        Job {
            package,
            input,
            costs,
            whole: None,
        }
    }

    /// Jobs of the same model share a package, a cost table and (tiled) a run: they are
    /// one model to the executor, and learn from each other's timings.
    fn same_model(&self, other: &Job) -> bool {
        Arc::ptr_eq(&self.package, &other.package)
            && Arc::ptr_eq(&self.costs, &other.costs)
            && match (&self.whole, &other.whole) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

/// When one inference of a batch ran, in milliseconds from the executor's start.
#[derive(Clone, Debug, serde::Serialize)]
pub struct InferenceRecord {
    /// The package's name.
    pub model: String,
    pub(crate) arrival_ms: f64,
    pub(crate) start_ms: f64,
    pub(crate) end_ms: f64,
}

/// What a batch did: its settings, its timeline and memory, and every output.
#[derive(Debug, serde::Serialize)]
pub struct BatchReport {
    /// The loading policy it ran with.
    pub loading: LoadingPolicy,
    /// The scheduling policy it ran with.
    pub scheduling: SchedulingPolicy,
    /// Inferences in flight at once.
    pub parallel: usize,
    /// The ledger's bound, bytes.
    pub budget: Option<u64>,
    /// Whether layers outlived their inference.
    pub cache: LayerCache,
    /// From the executor's start (just before the first submission) to the last
    /// inference's end.
    pub makespan_ms: f64,
    /// The ledger's highest value, bytes: within the budget unless overdrafts say otherwise.
    pub ledger_high_water: u64,
    /// Times the ledger went beyond the budget (a layer larger than any room there was).
    pub overdrafts: u64,
    pub(crate) cache_stats: CacheStats,
    /// The process's peak resident set at the end, bytes.
    pub peak_rss: u64,
    /// Every inference, in job order.
    pub inferences: Vec<InferenceRecord>,
    pub(crate) tasks: Vec<TaskRecord>,
    pub(crate) budget_readings: Vec<BudgetSample>,
    /// Every inference's outputs, in job order (not serialised).
    #[serde(skip)]
    pub outputs: Vec<Vec<FloatTensor>>,
}

impl BatchOptions {
    pub(crate) fn executor_options(&self, record: bool) -> ExecutorOptions {
        ExecutorOptions {
            scheduler: SchedulerOptions {
                policy: self.scheduling,
                loading: self.loading,
                budget: self.budget,
                parallel: self.parallel,
                cache: self.cache,
                eviction: self.eviction,
            },
            reserve: self.reserve,
            workers: self.workers,
            record,
            // Batches and the bench keep one allocator behaviour for the whole run
            // (chosen at start-up), so that their cells compare like with like.
            reuse_freed_above: None,
        }
    }
}

/// Runs every job to its end; fails with the first inference's error if any failed.
pub fn run_batch(
    jobs: Vec<Job>,
    options: &BatchOptions,
    system: &SystemMemory,
) -> Result<BatchReport> {
    let executor = Executor::start(options.executor_options(true), system.clone())?;
    let mut models: Vec<ModelId> = Vec::with_capacity(jobs.len());
    for (k, job) in jobs.iter().enumerate() {
        let model = match (0..k).find(|&j| jobs[j].same_model(job)) {
            Some(j) => models[j],
            None => {
                executor.add_model(job.package.clone(), job.costs.clone(), job.whole.clone())?
            }
        };
        models.push(model);
    }
    let mut names = vec![];
    let mut ids = vec![];
    // Inputs move into the executor: a batch never holds them twice.
    for (job, model) in jobs.into_iter().zip(models) {
        names.push(job.package.name().to_string());
        ids.push(executor.submit(model, job.input));
    }
    let mut outputs = vec![];
    let mut inferences = vec![];
    for (name, id) in names.into_iter().zip(ids) {
        let out = executor.wait(id);
        outputs.push(out.outputs.with_context(|| format!("{name}: inference"))?);
        inferences.push(InferenceRecord {
            model: name,
            arrival_ms: out.timing.arrival_ms,
            start_ms: out.timing.start_ms,
            end_ms: out.timing.end_ms,
        });
    }
    let makespan_ms = executor.now_ms();
    let peak_rss = executor.peak_rss();
    let report = executor.finish();
    Ok(BatchReport {
        loading: options.loading,
        scheduling: options.scheduling,
        parallel: options.parallel,
        budget: options.budget,
        cache: options.cache,
        makespan_ms,
        ledger_high_water: report.snapshot.ledger_high_water_bytes,
        overdrafts: report.snapshot.overdrafts,
        cache_stats: report.snapshot.cache,
        peak_rss,
        inferences,
        tasks: report.tasks,
        budget_readings: report.budget_readings,
        outputs,
    })
}
