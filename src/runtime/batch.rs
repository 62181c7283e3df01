//! Runs many inferences at once on worker threads, in the order a scheduler picks, with
//! the memory gate consulted before every decision.

use super::FloatTensor;
use super::engine::{LoadedLayer, load_layer};
use super::scheduler::{MAX_PARALLEL, Scheduler, SchedulingPolicy, TaskRef};
use super::sequential::{Activations, run_layer};
use super::tasks::{LayerCost, LoadingPolicy, TaskKind};
use crate::memory::{self, SystemMemory};
use crate::model::Package;
use anyhow::{Context, Result, anyhow, ensure};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct BatchOptions {
    pub loading: LoadingPolicy,
    pub scheduling: SchedulingPolicy,
    /// Inferences in flight at once.
    pub parallel: usize,
    /// Upper bound on the ledger (`--budget`); the live readings bound it further.
    pub budget: Option<u64>,
    /// Kept free below MemAvailable and below the cgroup limit.
    pub reserve: u64,
    /// Workers of the main pool (loads and execs). DeepEye adds one for fc preloads.
    pub workers: usize,
}

/// Runs a whole inference as one step instead of layer by layer (tiled execution is one:
/// `tiling::TiledModel`). Given the job's input, returns the package's outputs.
pub type WholeRun = Arc<dyn Fn(FloatTensor) -> Result<Vec<FloatTensor>> + Send + Sync>;

/// One input through one package.
#[derive(Clone)]
pub struct Job {
    pub package: Arc<Package>,
    pub input: FloatTensor,
    /// Per layer; for a `whole` job one entry, the whole run's cost.
    pub costs: Arc<[LayerCost]>,
    /// Run as one step, scheduled and budgeted as a single layer costing `costs[0]`.
    pub whole: Option<WholeRun>,
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
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct TaskRecord {
    pub inference: usize,
    #[serde(flatten)]
    pub kind: TaskKind,
    pub worker: usize,
    pub start_ms: f64,
    pub end_ms: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct InferenceRecord {
    pub model: String,
    pub arrival_ms: f64,
    pub start_ms: f64,
    pub end_ms: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BudgetSample {
    pub at_ms: f64,
    pub ledger: u64,
    /// What the live reading allowed beyond what is resident (`None`: unbounded).
    pub headroom: Option<u64>,
    pub mem_available: Option<u64>,
    pub cgroup_limit: Option<u64>,
}

#[derive(Debug, serde::Serialize)]
pub struct BatchReport {
    pub loading: LoadingPolicy,
    pub scheduling: SchedulingPolicy,
    pub parallel: usize,
    pub budget: Option<u64>,
    pub makespan_ms: f64,
    pub ledger_high_water: u64,
    pub overdrafts: u64,
    pub peak_rss: u64,
    pub inferences: Vec<InferenceRecord>,
    pub tasks: Vec<TaskRecord>,
    pub budget_readings: Vec<BudgetSample>,
    #[serde(skip)]
    pub outputs: Vec<Vec<FloatTensor>>,
}

struct Flight {
    walk: Option<Activations>,
    layers: Vec<Option<Staged>>,
    outputs: Option<Vec<FloatTensor>>,
    start: Option<Instant>,
    end: Option<Instant>,
}

struct Shared {
    scheduler: Scheduler,
    flights: Vec<Flight>,
    tasks: Vec<TaskRecord>,
    samples: Vec<BudgetSample>,
    /// Bytes reserved in the ledger that the live reading may not show yet: loads in flight
    /// (weights, planner copies) and the execs of loaded layers. They are taken off the
    /// reading's headroom, else a load could be admitted into memory already promised.
    unseen_bytes: u64,
    error: Option<anyhow::Error>,
}

/// A layer between its load and its exec.
enum Staged {
    Layer(LoadedLayer),
    /// A whole job has nothing to load ahead: its run plans what it needs.
    Whole(WholeRun),
}

/// What a worker does with one task, outside the lock.
enum Work {
    Init,
    Load {
        package: Arc<Package>,
        layer: usize,
    },
    Stage(usize, WholeRun),
    Exec {
        package: Arc<Package>,
        layer: LoadedLayer,
        inputs: tract_core::prelude::TVec<tract_core::prelude::TValue>,
    },
    Whole {
        run: WholeRun,
        input: FloatTensor,
    },
}

pub fn run_batch(
    jobs: Vec<Job>,
    options: &BatchOptions,
    system: &SystemMemory,
) -> Result<BatchReport> {
    ensure!(
        (1..=MAX_PARALLEL).contains(&options.parallel),
        "parallel must be 1 to {MAX_PARALLEL}, not {}",
        options.parallel
    );
    let mut scheduler = Scheduler::new(
        options.scheduling,
        options.loading,
        options.budget,
        options.parallel,
    );
    for job in &jobs {
        let steps = match job.whole {
            Some(_) => 1,
            None => job.package.manifest.layers.len(),
        };
        ensure!(
            job.costs.len() == steps,
            "{}: {} layer costs for {steps} steps",
            job.package.name(),
            job.costs.len()
        );
        scheduler.submit(job.package.name(), job.costs.clone())?;
    }
    let flights = jobs
        .iter()
        .map(|j| Flight {
            walk: None,
            layers: (0..j.costs.len()).map(|_| None).collect(),
            outputs: None,
            start: None,
            end: None,
        })
        .collect();
    let shared = Mutex::new(Shared {
        scheduler,
        flights,
        tasks: vec![],
        samples: vec![],
        unseen_bytes: 0,
        error: None,
    });
    let wake = Condvar::new();
    let t0 = Instant::now();
    let pools: Vec<usize> = std::iter::repeat_n(0, options.workers.max(1))
        .chain((options.loading == LoadingPolicy::DeepEye).then_some(1))
        .collect();
    std::thread::scope(|scope| {
        for (worker, &pool) in pools.iter().enumerate() {
            let (shared, wake, jobs) = (&shared, &wake, &jobs);
            scope.spawn(move || worker_loop(worker, pool, shared, wake, jobs, options, system, t0));
        }
    });
    let makespan = t0.elapsed();
    let shared = shared
        .into_inner()
        .map_err(|_| anyhow!("a worker panicked"))?;
    if let Some(e) = shared.error {
        return Err(e);
    }
    let ms = |t: Instant| t.duration_since(t0).as_secs_f64() * 1e3;
    let mut inferences = vec![];
    let mut outputs = vec![];
    for (job, flight) in jobs.iter().zip(shared.flights) {
        inferences.push(InferenceRecord {
            model: job.package.name().to_string(),
            arrival_ms: 0.0,
            start_ms: flight.start.map_or(0.0, ms),
            end_ms: flight.end.map_or(0.0, ms),
        });
        outputs.push(
            flight
                .outputs
                .context("an inference finished without outputs")?,
        );
    }
    Ok(BatchReport {
        loading: options.loading,
        scheduling: options.scheduling,
        parallel: options.parallel,
        budget: options.budget,
        makespan_ms: makespan.as_secs_f64() * 1e3,
        ledger_high_water: shared.scheduler.high_water(),
        overdrafts: shared.scheduler.overdrafts(),
        peak_rss: memory::process_memory().map(|m| m.peak_rss).unwrap_or(0),
        inferences,
        tasks: shared.tasks,
        budget_readings: shared.samples,
        outputs,
    })
}

/// How long an idle worker sleeps before re-reading memory: a limit can grow back without
/// any task finishing.
const RECHECK: Duration = Duration::from_millis(20);

#[allow(clippy::too_many_arguments)]
fn worker_loop(
    worker: usize,
    pool: usize,
    shared: &Mutex<Shared>,
    wake: &Condvar,
    jobs: &[Job],
    options: &BatchOptions,
    system: &SystemMemory,
    t0: Instant,
) {
    let ms = |t: Instant| t.duration_since(t0).as_secs_f64() * 1e3;
    let mut guard = shared.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if guard.error.is_some() || guard.scheduler.is_done() {
            wake.notify_all();
            return;
        }
        let reading = system.read();
        let (headroom, mem_available, cgroup_limit) = match &reading {
            Ok(r) => (
                r.headroom(options.reserve)
                    .map(|h| h.saturating_sub(guard.unseen_bytes)),
                r.mem_available,
                r.cgroup_limit(),
            ),
            Err(e) => {
                log::warn!("memory reading failed, scheduling on the budget alone: {e:#}");
                (None, None, None)
            }
        };
        let Some(task) = guard.scheduler.next(pool, headroom) else {
            guard = wake
                .wait_timeout(guard, RECHECK)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            continue;
        };
        let ledger = guard.scheduler.ledger();
        guard.samples.push(BudgetSample {
            at_ms: ms(Instant::now()),
            ledger,
            headroom,
            mem_available,
            cgroup_limit,
        });
        let job = &jobs[task.inference];
        let kind = guard.scheduler.kind(task);
        let work = match kind {
            TaskKind::Init => Work::Init,
            TaskKind::Load(l) => {
                guard.unseen_bytes += job.costs[l].footprint();
                match &job.whole {
                    Some(run) => Work::Stage(l, run.clone()),
                    None => Work::Load {
                        package: job.package.clone(),
                        layer: l,
                    },
                }
            }
            TaskKind::Exec(l) => {
                let flight = &mut guard.flights[task.inference];
                match flight.layers[l]
                    .take()
                    .expect("exec scheduled before its load")
                {
                    Staged::Whole(run) => Work::Whole {
                        run,
                        input: job.input.clone(),
                    },
                    Staged::Layer(layer) => {
                        let inputs = match flight
                            .walk
                            .as_ref()
                            .expect("exec before init")
                            .inputs_for(&job.package, l)
                        {
                            Ok(i) => i,
                            Err(e) => {
                                guard.error = Some(e);
                                continue;
                            }
                        };
                        Work::Exec {
                            package: job.package.clone(),
                            layer,
                            inputs,
                        }
                    }
                }
            }
        };
        drop(guard);
        let start = Instant::now();
        let result = perform(work, job);
        let end = Instant::now();
        guard = shared.lock().unwrap_or_else(|p| p.into_inner());
        guard.tasks.push(TaskRecord {
            inference: task.inference,
            kind,
            worker,
            start_ms: ms(start),
            end_ms: ms(end),
        });
        match result {
            Ok(done) => {
                if let Err(e) = apply(&mut guard, task, done, job, start, end) {
                    guard.error = Some(e);
                }
                guard.scheduler.complete(task);
            }
            Err(e) => guard.error = Some(e),
        }
        wake.notify_all();
    }
}

enum Done {
    /// `None` for a whole job, which keeps no activations between steps.
    Init(Result<Option<Activations>>),
    Loaded(usize, Staged),
    Ran(
        usize,
        tract_core::prelude::TVec<tract_core::prelude::TValue>,
    ),
    RanWhole(Vec<FloatTensor>),
}

fn perform(work: Work, job: &Job) -> Result<Done> {
    Ok(match work {
        Work::Init => Done::Init(match job.whole {
            Some(_) => Ok(None),
            None => Activations::new(&job.package, &job.input).map(Some),
        }),
        Work::Load { package, layer } => {
            Done::Loaded(layer, Staged::Layer(load_layer(&package, layer)?))
        }
        Work::Stage(layer, run) => Done::Loaded(layer, Staged::Whole(run)),
        Work::Whole { run, input } => Done::RanWhole(
            run(input).with_context(|| format!("{}: whole run", job.package.name()))?,
        ),
        Work::Exec {
            package,
            layer,
            inputs,
        } => {
            let index = layer.index;
            let outs = run_layer(&package, &layer, inputs)?;
            // The layer's weights go here, as soon as it has run.
            drop(layer);
            Done::Ran(index, outs)
        }
    })
}

fn apply(
    shared: &mut Shared,
    task: TaskRef,
    done: Done,
    job: &Job,
    start: Instant,
    end: Instant,
) -> Result<()> {
    let flight = &mut shared.flights[task.inference];
    match done {
        Done::Init(walk) => {
            flight.walk = walk?;
            flight.start = Some(start);
        }
        Done::Loaded(index, staged) => {
            // Weights are resident now, and planner copies gone: only the exec is unseen.
            let c = &job.costs[index];
            shared.unseen_bytes -= c.load_bytes + c.plan_bytes;
            flight.layers[index] = Some(staged);
        }
        Done::Ran(index, outs) => {
            shared.unseen_bytes -= job.costs[index].exec_bytes;
            let walk = flight.walk.as_mut().context("exec before init")?;
            walk.store(&job.package, index, outs)?;
            if index + 1 == flight.layers.len() {
                let walk = flight.walk.take().context("exec before init")?;
                flight.outputs = Some(walk.finish(&job.package)?);
                flight.end = Some(end);
            }
        }
        Done::RanWhole(outs) => {
            shared.unseen_bytes -= job.costs[0].exec_bytes;
            flight.outputs = Some(outs);
            flight.end = Some(end);
        }
    }
    Ok(())
}
