//! The long-lived executor: worker threads that run the scheduler's tasks for whatever
//! inferences are submitted, with the memory gate consulted before every decision and a
//! cache of loaded layers that outlives inferences (`LayerCache::Keep`).
//!
//! Callers register models once (`add_model`), then `submit` inputs and `wait` for their
//! outputs, from any thread, at any time: a batch submits everything at once, the spool
//! daemon submits each frame's inferences as frames arrive, several frames in flight.

use super::FloatTensor;
use super::engine::{LoadPhases, LoadedLayer, load_layer};
use super::reload::{LayerTemplate, load_with_template, reload};
use super::residency::{Evictable, EvictionCause};
use super::scheduler::{
    CacheStats, Decision, InferenceSummary, Live, LoadMeasure, LoadWay, ModelId, Refusal,
    Reservation, Scheduler, SchedulerOptions, TaskRef, TemplateMade,
};
use super::sequential::{Activations, held_bytes, run_layer};
use super::tasks::{LayerCost, LoadingPolicy, TaskKind};
use crate::memory::{self, Bytes, SystemMemory, heap};
use crate::model::Package;
use anyhow::{Context, Result, anyhow, bail};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Runs a whole inference as one step instead of layer by layer (tiled execution is one:
/// `tiling::TiledModel`). Given the job's input, returns the package's outputs.
pub(crate) type WholeRun = Arc<dyn Fn(FloatTensor) -> Result<Vec<FloatTensor>> + Send + Sync>;

#[derive(Clone, Debug)]
pub struct ExecutorOptions {
    pub scheduler: SchedulerOptions,
    /// Kept free below MemAvailable and below the cgroup limit.
    pub reserve: u64,
    /// Workers of the main pool (loads and execs). DeepEye adds one for fc preloads.
    pub workers: usize,
    /// Keep every task's timing and every memory reading (for batch reports; a daemon
    /// running for months keeps none).
    pub(crate) record: bool,
    /// Freed buffers stay in the allocator for reuse while every reading leaves at least
    /// this much headroom; the first reading under it makes them go back to the kernel
    /// promptly from then on ([`memory::return_freed_memory_promptly`]). `None`: the
    /// caller chose the allocator's behaviour for the whole run.
    pub(crate) reuse_freed_above: Option<u64>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct TaskRecord {
    pub(crate) inference: usize,
    #[serde(flatten)]
    pub kind: TaskKind,
    pub(crate) worker: usize,
    pub(crate) start_ms: f64,
    pub(crate) end_ms: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct BudgetSample {
    pub(crate) at_ms: f64,
    pub ledger: u64,
    /// What the live reading allowed beyond what is resident (`None`: unbounded).
    pub(crate) headroom: Option<u64>,
    pub(crate) mem_available: Option<u64>,
    pub(crate) cgroup_limit: Option<u64>,
}

/// When an inference ran and what it cost, in ms since the executor started.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub(crate) struct InferenceTiming {
    pub(crate) arrival_ms: f64,
    pub(crate) start_ms: f64,
    pub(crate) end_ms: f64,
    /// Summed durations of its layer loads and execs (on several workers they overlap).
    pub(crate) load_ms: f64,
    pub(crate) exec_ms: f64,
}

/// A finished inference: its outputs (or why it has none), timing and cache use.
#[derive(Debug)]
pub struct InferenceOutput {
    pub outputs: Result<Vec<FloatTensor>>,
    pub(crate) timing: InferenceTiming,
    pub summary: InferenceSummary,
}

impl InferenceOutput {
    /// It was refused for lack of memory. Beside other inferences, or with other frames'
    /// buffers in memory, that may only say it did not fit *then*: a model that fits
    /// alone runs if submitted again with [`Executor::submit_alone`].
    pub(crate) fn refused_for_room(&self) -> bool {
        matches!(&self.outputs, Err(e) if e.downcast_ref::<NoRoom>().is_some())
    }
}

/// Why an inference was refused: a layer's footprint is more than can be made free.
#[derive(Debug)]
struct NoRoom(String);

impl std::fmt::Display for NoRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NoRoom {}

/// Per model: its resident layers now.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ModelResidency {
    /// The model's name.
    pub name: String,
    /// Layers resident now.
    pub resident_layers: usize,
    /// Layers it has.
    pub layers: usize,
    /// Bytes the ledger counts for its resident layers.
    pub resident_bytes: u64,
    /// Bytes of its layers' plan templates (what makes a reload cheap).
    #[serde(default)]
    pub template_bytes: u64,
}

/// The executor's state at one moment, for status files and reports.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ExecutorSnapshot {
    /// The ledger now: resident layers and reservations, bytes.
    pub ledger_bytes: u64,
    /// The ledger's highest value since start, bytes.
    pub ledger_high_water_bytes: u64,
    /// Times the ledger went beyond the budget.
    pub overdrafts: u64,
    /// The layer cache's counters.
    pub cache: CacheStats,
    /// Per registered model, what of it is resident.
    pub models: Vec<ModelResidency>,
}

/// What `finish` returns: the recorded timeline.
pub struct ExecutorReport {
    pub(crate) tasks: Vec<TaskRecord>,
    pub(crate) budget_readings: Vec<BudgetSample>,
    pub(crate) snapshot: ExecutorSnapshot,
}

/// A registered model: its package, and its resident layers' plans.
struct ModelSlot {
    package: Arc<Package>,
    whole: Option<WholeRun>,
    /// Minimum resident bytes of each layer: its weights (a measurement below is an
    /// allocator reusing freed memory, not a smaller layer).
    weight_bytes: Vec<u64>,
    plans: Vec<Option<LoadedLayer>>,
    /// Plan templates of layers evicted once (`runtime/reload.rs`), until evicted.
    templates: Vec<Option<Arc<LayerTemplate>>>,
}

/// A layer between its load and its exec, owned by one inference (`LayerCache::Off`, and
/// whole runs).
enum Staged {
    Layer(LoadedLayer),
    Whole(WholeRun),
}

struct Flight {
    /// Which inference this is (`State::submitted`), of all that used its slot.
    number: u64,
    model: ModelId,
    input: Option<FloatTensor>,
    walk: Option<Activations>,
    staged: Vec<Option<Staged>>,
    outputs: Option<Result<Vec<FloatTensor>>>,
    timing: InferenceTiming,
}

struct State {
    scheduler: Scheduler,
    models: Vec<ModelSlot>,
    /// Per inference slot of the scheduler.
    flights: Vec<Option<Flight>>,
    /// Inferences submitted so far: each flight's number, which tells a task's result
    /// from a later inference that reuses its slot.
    submitted: u64,
    tasks: Vec<TaskRecord>,
    samples: Vec<BudgetSample>,
    /// Tasks being performed now, and how many have started since the executor began:
    /// a load ran alone (its measurements are its own) if none started while it ran.
    running: usize,
    started: u64,
    /// VmHWM seen before the last reset (measuring a load resets it).
    peak_rss: u64,
    /// The last memory reading and when it was taken: reused for READING_MAX_AGE.
    reading: Option<(Instant, Reading)>,
    /// While freed buffers are kept for reuse: the headroom under which they stop being
    /// (`ExecutorOptions::reuse_freed_above`); `None` once they go back to the kernel.
    reuse_freed_above: Option<u64>,
    /// Bytes of layers evicted since the heap was last trimmed (`drop_evicted`).
    untrimmed: u64,
    shutdown: bool,
    /// Shut down without finishing what is in flight (the process is exiting).
    abandon: bool,
}

struct Inner {
    state: Mutex<State>,
    /// Workers wait here for work or memory.
    work: Condvar,
    /// Callers of `wait` and `reserve` wait here.
    finished: Condvar,
    system: SystemMemory,
    options: ExecutorOptions,
    t0: Instant,
}

pub struct Executor {
    inner: Arc<Inner>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// How long a memory reading is used for decisions. Reading it costs tens of
/// microseconds (`/proc/meminfo` and the cgroup's files), and a frame with every layer
/// resident takes a decision per layer; whatever the ledger promised since the reading
/// is taken off it, so an older reading misses only what others allocated meanwhile,
/// which the reserve is for.
const READING_MAX_AGE: Duration = Duration::from_millis(5);

/// How long a worker with nothing it may start sleeps before re-reading memory: a limit
/// can grow back without any task finishing.
const RECHECK: Duration = Duration::from_millis(20);
/// The same with nothing in flight at all: the cache must still shrink when the limit is
/// lowered or another process grows, but an idle daemon should cost next to nothing.
const IDLE_RECHECK: Duration = Duration::from_millis(200);

impl Executor {
    pub fn start(options: ExecutorOptions, system: SystemMemory) -> Result<Executor> {
        let parallel = options.scheduler.parallel;
        anyhow::ensure!(
            (1..=super::MAX_PARALLEL).contains(&parallel),
            "parallel must be 1 to {}, not {parallel}",
            super::MAX_PARALLEL
        );
        let pools: Vec<usize> = std::iter::repeat_n(0, options.workers.max(1))
            .chain((options.scheduler.loading == LoadingPolicy::DeepEye).then_some(1))
            .collect();
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                scheduler: Scheduler::new(options.scheduler),
                models: vec![],
                flights: vec![],
                submitted: 0,
                tasks: vec![],
                samples: vec![],
                running: 0,
                started: 0,
                peak_rss: 0,
                reading: None,
                reuse_freed_above: options.reuse_freed_above,
                untrimmed: 0,
                shutdown: false,
                abandon: false,
            }),
            work: Condvar::new(),
            finished: Condvar::new(),
            system,
            options,
            t0: Instant::now(),
        });
        let mut threads = vec![];
        for (worker, pool) in pools.into_iter().enumerate() {
            let inner = inner.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("worker-{worker}"))
                    .spawn(move || worker_loop(&inner, worker, pool))
                    .context("starting a worker thread")?,
            );
        }
        Ok(Executor { inner, threads })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a model whose layers cost `costs` (one entry for a `whole` run). Fails
    /// when a layer alone exceeds the budget.
    pub fn add_model(
        &self,
        package: Arc<Package>,
        costs: Arc<[LayerCost]>,
        whole: Option<WholeRun>,
    ) -> Result<ModelId> {
        let steps = match whole {
            Some(_) => 1,
            None => package.manifest.layers.len(),
        };
        anyhow::ensure!(
            costs.len() == steps,
            "{}: {} layer costs for {steps} steps",
            package.name(),
            costs.len()
        );
        // A whole run's cost covers its activations; layer by layer they stay between
        // layers and are reserved for the whole inference.
        let held = match whole {
            Some(_) => vec![0, 0],
            None => held_bytes(&package),
        };
        let weight_bytes = match whole {
            Some(_) => vec![0],
            None => package
                .manifest
                .layers
                .iter()
                .map(|l| l.weight_bytes)
                .collect(),
        };
        let mut state = self.lock();
        let cacheable = whole.is_none();
        let id = state
            .scheduler
            .add_model(package.name(), costs, held, cacheable)?;
        state.models.push(ModelSlot {
            plans: (0..steps).map(|_| None).collect(),
            templates: vec![None; steps],
            weight_bytes,
            package,
            whole,
        });
        Ok(id)
    }

    /// Queues one input through `model`; returns the inference's id for `wait`.
    pub fn submit(&self, model: ModelId, input: FloatTensor) -> usize {
        self.submit_as(model, input, false)
    }

    /// Submits an inference that runs with no other beside it, after every inference
    /// submitted before it (see [`InferenceOutput::refused_for_room`]).
    pub(crate) fn submit_alone(&self, model: ModelId, input: FloatTensor) -> usize {
        self.submit_as(model, input, true)
    }

    fn submit_as(&self, model: ModelId, input: FloatTensor, alone: bool) -> usize {
        let mut state = self.lock();
        let id = state.scheduler.submit_as(model, alone);
        let steps = state.models[model.0].plans.len();
        let now = self.inner.ms(Instant::now());
        let flight = Flight {
            number: 0,
            model,
            input: Some(input),
            walk: None,
            staged: (0..steps).map(|_| None).collect(),
            outputs: None,
            timing: InferenceTiming {
                arrival_ms: now,
                ..InferenceTiming::default()
            },
        };
        if state.flights.len() <= id {
            state.flights.resize_with(id + 1, || None);
        }
        state.submitted += 1;
        state.flights[id] = Some(Flight {
            number: state.submitted,
            ..flight
        });
        drop(state);
        self.inner.work.notify_all();
        id
    }

    /// Blocks until inference `id` has finished; frees its slot.
    pub fn wait(&self, id: usize) -> InferenceOutput {
        let mut state = self.lock();
        loop {
            let done = state.flights[id]
                .as_ref()
                .is_some_and(|f| f.outputs.is_some());
            if done {
                let flight = state.flights[id].take().expect("checked above");
                let summary = state.scheduler.inference_summary(id);
                state.scheduler.retire(id);
                return InferenceOutput {
                    outputs: flight.outputs.expect("checked above"),
                    timing: flight.timing,
                    summary,
                };
            }
            state = self
                .inner
                .finished
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Reserves `bytes` in the ledger for brief work outside the scheduler's tasks
    /// (decoding a frame), waiting until they fit; fails if they cannot fit even with
    /// nothing else in flight. Released when the guard drops. Hold the guard only for
    /// work that does not wait for an inference: loads that do not fit wait for it.
    pub(crate) fn reserve(&self, bytes: u64) -> Result<Reserved<'_>> {
        self.reserve_as(bytes, true)
    }

    /// Reserves `bytes` for memory kept while inferences run and are waited for (a frame
    /// kept for the crops of its cascades until its detector is done). Counted in the
    /// ledger like `reserve`, but no load waits for it: one that cannot fit beside it is
    /// refused as if nothing would free memory, instead of waiting forever.
    pub(crate) fn hold(&self, bytes: u64) -> Result<Reserved<'_>> {
        self.reserve_as(bytes, false)
    }

    fn reserve_as(&self, bytes: u64, brief: bool) -> Result<Reserved<'_>> {
        let mut state = self.lock();
        loop {
            let reading = self.inner.read();
            let live = reading.live().map(|l| Live {
                seen_then: state.scheduler.seen(),
                ..l
            });
            let reservation = state.scheduler.reserve(bytes, live, brief);
            // Whatever the answer, the plans of layers evicted for it go now, under this
            // lock: a victim left in the outbox would later take the plan of the same
            // layer loaded again in between, which the scheduler counts as resident.
            drop_evicted(&mut state);
            match reservation {
                Reservation::Granted => {
                    return Ok(Reserved {
                        executor: self,
                        bytes,
                        brief,
                    });
                }
                Reservation::Never { available } => bail!(
                    "needs {} of memory, and at most {} can be made free",
                    Bytes(bytes),
                    Bytes(available)
                ),
                Reservation::Wait => {
                    state = self
                        .inner
                        .finished
                        .wait_timeout(state, RECHECK)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    pub(crate) fn snapshot(&self) -> ExecutorSnapshot {
        snapshot(&self.lock())
    }

    /// The process's peak resident set since the executor started.
    pub fn peak_rss(&self) -> u64 {
        let seen = self.lock().peak_rss;
        let now = memory::process_memory().map_or(0, |m| m.peak_rss);
        seen.max(now)
    }

    /// Milliseconds since the executor started (the timeline of records and timings).
    pub(crate) fn now_ms(&self) -> f64 {
        self.inner.ms(Instant::now())
    }

    /// Stops the workers once nothing is in flight; returns what was recorded.
    pub fn finish(mut self) -> ExecutorReport {
        self.stop(false);
        let mut state = self.lock();
        ExecutorReport {
            tasks: std::mem::take(&mut state.tasks),
            budget_readings: std::mem::take(&mut state.samples),
            snapshot: snapshot(&state),
        }
    }

    /// Stops the workers: after what is in flight, or (`abandon`) after the tasks they
    /// are performing now; inferences left unfinished never complete.
    fn stop(&mut self, abandon: bool) {
        {
            let mut state = self.lock();
            state.shutdown = true;
            state.abandon |= abandon;
        }
        self.inner.work.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.stop(true);
    }
}

/// Reserved bytes (see `Executor::reserve`), released on drop.
pub(crate) struct Reserved<'a> {
    executor: &'a Executor,
    bytes: u64,
    brief: bool,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.executor
            .lock()
            .scheduler
            .release(self.bytes, self.brief);
        self.executor.inner.work.notify_all();
        self.executor.inner.finished.notify_all();
    }
}

fn snapshot(state: &State) -> ExecutorSnapshot {
    let s = &state.scheduler;
    ExecutorSnapshot {
        ledger_bytes: s.ledger(),
        ledger_high_water_bytes: s.high_water(),
        overdrafts: s.overdrafts(),
        cache: s.cache_stats(),
        models: state
            .models
            .iter()
            .enumerate()
            .map(|(m, slot)| {
                let (resident_layers, resident_bytes) = s.resident(ModelId(m));
                ModelResidency {
                    name: slot.package.name().to_string(),
                    resident_layers,
                    layers: slot.plans.len(),
                    resident_bytes,
                    template_bytes: s.template_bytes(ModelId(m)),
                }
            })
            .collect(),
    }
}

/// Freed heap left untrimmed after evictions while the budget, not the reading, decides.
/// Trimming (`memory::release_free_heap`) walks the whole heap and hands its free pages
/// back, to be faulted in again by the next allocations: trimmed after every eviction, 30
/// frames at half the working set made 550 k page faults, 380-450 k with this bound
/// (docs/results.md). A daemon keeping its buffers between frames trims by what the heap
/// holds instead (`memory::kept_freed_bytes`).
const UNTRIMMED_MAX: u64 = 4 << 20;

/// What `drop_evicted` did.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dropped {
    Nothing,
    /// Plans dropped; the reading does not limit admissions, so it need not show them gone.
    Plans,
    /// Plans dropped and the heap trimmed: the next decision reads memory again.
    PlansAndTrimmed,
}

/// Drops the plans of layers the scheduler evicted. Where the live reading limits what is
/// admitted (or soon would), the freed heap goes back to the kernel at once so that the
/// next reading shows it; under a budget with memory to spare, once the heap keeps more
/// freed memory than the daemon allows, or else once `UNTRIMMED_MAX` has been evicted
/// since the last trim.
fn drop_evicted(state: &mut State) -> Dropped {
    let State {
        scheduler,
        models,
        untrimmed,
        reading,
        ..
    } = state;
    let mut any = false;
    let rule = scheduler.eviction();
    for evicted in scheduler.take_evicted() {
        let key = evicted.key;
        let slot = &mut models[key.model.0];
        let (dropped, what) = match evicted.what {
            Evictable::Plan => (slot.plans[key.layer].take().is_some(), "layer"),
            Evictable::Template => (
                slot.templates[key.layer].take().is_some(),
                "plan template of layer",
            ),
        };
        if dropped {
            any = true;
            *untrimmed += evicted.bytes;
            if log::log_enabled!(log::Level::Debug) {
                log::debug!(
                    "evicted {} {what} {} ({} bytes, {:?} rule): {}",
                    models[key.model.0].package.name(),
                    key.layer,
                    evicted.bytes,
                    rule,
                    eviction_cause(models, evicted.cause)
                );
            }
        }
    }
    if !any {
        return Dropped::Nothing;
    }
    let live = reading.and_then(|(_, r)| r.live());
    let heap_over = memory::kept_freed_bytes().map_or(*untrimmed >= UNTRIMMED_MAX, |kept| {
        kept > memory::KEPT_FREED_MAX
    });
    if live.is_none() || heap_over || scheduler.reading_binds(live, UNTRIMMED_MAX) {
        memory::release_free_heap();
        *untrimmed = 0;
        Dropped::PlansAndTrimmed
    } else {
        Dropped::Plans
    }
}

/// Why a layer was evicted, in words for the log.
fn eviction_cause(models: &[ModelSlot], cause: EvictionCause) -> String {
    match cause {
        EvictionCause::ReadingDropped => {
            "the memory reading fell below what the ledger holds".to_string()
        }
        EvictionCause::RoomFor(key) => format!(
            "room for layer {} of {}",
            key.layer,
            models[key.model.0].package.name()
        ),
        EvictionCause::RoomForReservation => "room for a reservation (a frame to decode)".into(),
    }
}

impl Inner {
    fn ms(&self, t: Instant) -> f64 {
        t.duration_since(self.t0).as_secs_f64() * 1e3
    }

    /// A memory reading now: the signed headroom, with its figures for the record.
    fn read(&self) -> Reading {
        match self.system.read() {
            Ok(r) => Reading {
                headroom: r.room(self.options.reserve),
                mem_available: r.mem_available,
                cgroup_limit: r.cgroup_limit(),
                seen_then: 0,
                reserve: self.options.reserve,
            },
            Err(e) => {
                log::warn!("memory reading failed, scheduling on the budget alone: {e:#}");
                Reading::default()
            }
        }
    }

    /// The last reading if it is recent enough, else a new one.
    fn reading(&self, state: &mut State) -> Reading {
        if let Some((at, r)) = state.reading
            && at.elapsed() < READING_MAX_AGE
        {
            return r;
        }
        let r = Reading {
            seen_then: state.scheduler.seen(),
            ..self.read()
        };
        state.reading = Some((Instant::now(), r));
        stop_reusing_freed_if_tight(state, &r);
        bound_kept_buffers(state, &r);
        r
    }
}

/// Memory is no longer plentiful: freed buffers go back to the kernel from now on, and
/// what the allocator kept goes back now (the next decision reads memory again).
fn stop_reusing_freed_if_tight(state: &mut State, r: &Reading) {
    let Some(floor) = state.reuse_freed_above else {
        return;
    };
    if r.headroom
        .is_some_and(|h| h < i64::try_from(floor).unwrap_or(i64::MAX))
    {
        state.reuse_freed_above = None;
        memory::return_freed_memory_promptly();
        memory::release_free_heap();
        state.reading = None;
        log::info!(
            "memory headroom under {}: freed buffers now go back to the kernel at once",
            Bytes(floor)
        );
    }
}

/// What the heap keeps of freed buffers between frames (`memory::keep_buffers_between_frames`)
/// is resident memory the ledger does not count, and an eviction or a finished exec frees
/// ledger bytes the reading goes on seeing. The budget bounds the one, the heap's bound the
/// other: that is safe only while the reading has room for both. Where it has no room for
/// the heap to grow to its bound, the heap is trimmed now (the next decision reads memory
/// again); where even a trimmed heap would leave none, freed buffers go back to the kernel
/// at once from now on.
fn bound_kept_buffers(state: &mut State, r: &Reading) {
    let (Some(kept), Some(live)) = (memory::kept_freed_bytes(), r.live()) else {
        return;
    };
    let trimmed = Live {
        headroom: live
            .headroom
            .saturating_add(i64::try_from(kept).unwrap_or(i64::MAX)),
        ..live
    };
    if state
        .scheduler
        .reading_binds(Some(trimmed), memory::KEPT_FREED_MAX)
    {
        memory::return_freed_memory_promptly();
        memory::release_free_heap();
        state.reading = None;
        log::info!(
            "memory headroom {} leaves no room for the {} of freed buffers kept between frames: they now go back to the kernel at once",
            Bytes(u64::try_from(live.headroom.max(0)).unwrap_or(0)),
            Bytes(memory::KEPT_FREED_MAX)
        );
    } else if state
        .scheduler
        .reading_binds(Some(live), memory::KEPT_FREED_MAX.saturating_sub(kept))
    {
        memory::release_free_heap();
        state.reading = None;
    }
}

/// A memory reading as the executor keeps it.
#[derive(Clone, Copy, Debug, Default)]
struct Reading {
    /// What the gate allows beyond what the process holds (negative: over); `None`:
    /// unbounded.
    headroom: Option<i64>,
    mem_available: Option<u64>,
    cgroup_limit: Option<u64>,
    /// The ledger's seen bytes when it was taken.
    seen_then: u64,
    /// The reserve `headroom` keeps back.
    reserve: u64,
}

impl Reading {
    fn live(&self) -> Option<Live> {
        self.headroom.map(|headroom| Live {
            headroom,
            seen_then: self.seen_then,
            reserve: self.reserve,
        })
    }
}

/// What a worker does with one task, outside the lock.
enum Work {
    Init(Arc<Package>, FloatTensor),
    InitWhole,
    Load {
        package: Arc<Package>,
        layer: usize,
        measure: Option<u64>,
        way: Way,
        weights: u64,
    },
    Stage(WholeRun),
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

/// A plan template is kept only if its layer's weights are at least this many times its
/// size: evicting the plan then frees most of what it held, and the reload it allows
/// (a tenth of a full load, `benches/reload.rs`) is worth the room the template keeps.
const TEMPLATE_WORTH: u64 = 4;

/// How a load is done (the scheduler's `LoadWay`, with the template to reload through).
enum Way {
    Full,
    MakingTemplate,
    Reload(Arc<LayerTemplate>),
}

impl Way {
    fn name(&self) -> &'static str {
        match self {
            Way::Full => "full load",
            Way::MakingTemplate => "full load making its plan template",
            Way::Reload(_) => "reload through its plan template",
        }
    }
}

enum Done {
    Init(Activations),
    InitWhole,
    Loaded(Staged, LoadMeasure, Option<LayerTemplate>),
    Ran(tract_core::prelude::TVec<tract_core::prelude::TValue>),
    RanWhole(Vec<FloatTensor>),
}

fn worker_loop(inner: &Inner, worker: usize, pool: usize) {
    let mut state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if state.shutdown && (state.abandon || state.scheduler.is_idle()) {
            inner.work.notify_all();
            return;
        }
        let reading = inner.reading(&mut state);
        let decision = state.scheduler.next_live(pool, reading.live());
        let dropped = drop_evicted(&mut state);
        let evicted = dropped != Dropped::Nothing;
        if dropped == Dropped::PlansAndTrimmed {
            // The next decision reads memory with the evicted layers gone.
            state.reading = None;
        }
        let task = match decision {
            // Memory was just freed: read it again before waiting.
            None if evicted => continue,
            None => {
                let recheck = if state.scheduler.is_idle() {
                    IDLE_RECHECK
                } else {
                    RECHECK
                };
                state = inner
                    .work
                    .wait_timeout(state, recheck)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            }
            Some(Decision::Refuse(inference, refusal)) => {
                refuse(inner, &mut state, inference, refusal);
                continue;
            }
            Some(Decision::Run(task)) => task,
        };
        if inner.options.record {
            let at_ms = inner.ms(Instant::now());
            let ledger = state.scheduler.ledger();
            state.samples.push(BudgetSample {
                at_ms,
                ledger,
                headroom: reading.headroom.map(|h| h.max(0) as u64),
                mem_available: reading.mem_available,
                cgroup_limit: reading.cgroup_limit,
            });
        }
        let kind = state.scheduler.kind(task);
        let work = match prepare(&mut state, task, kind) {
            Ok(work) => work,
            Err(e) => {
                fail(inner, &mut state, task, e);
                continue;
            }
        };
        state.running += 1;
        state.started += 1;
        let alone = state.running == 1;
        let started = state.started;
        let flight = flight_number(&state, task.inference);
        drop(state);
        let start = Instant::now();
        let result = perform(work, alone);
        let end = Instant::now();
        state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
        state.running -= 1;
        let alone = alone && state.started == started;
        if flight_number(&state, task.inference) != flight {
            // Its inference ended meanwhile (another of its tasks failed) and was waited
            // for: the slot is empty or another inference's, which this result is not.
            inner.work.notify_all();
            continue;
        }
        if inner.options.record {
            let record = TaskRecord {
                inference: task.inference,
                kind,
                worker,
                start_ms: inner.ms(start),
                end_ms: inner.ms(end),
            };
            state.tasks.push(record);
        }
        match result {
            Ok(done) => {
                state
                    .scheduler
                    .observe(task, end.duration_since(start).as_secs_f64());
                apply(inner, &mut state, task, kind, done, alone, (start, end));
            }
            Err(e) => fail(inner, &mut state, task, e),
        }
        inner.work.notify_all();
    }
}

/// The number of the inference in slot `inference` now, if any.
fn flight_number(state: &State, inference: usize) -> Option<u64> {
    state.flights.get(inference)?.as_ref().map(|f| f.number)
}

/// Takes what a task needs from the shared state (under the lock).
fn prepare(state: &mut State, task: TaskRef, kind: TaskKind) -> Result<Work> {
    let flight = state.flights[task.inference]
        .as_mut()
        .context("a task of an inference nobody submitted")?;
    let slot = &state.models[flight.model.0];
    Ok(match kind {
        TaskKind::Init => match slot.whole {
            Some(_) => Work::InitWhole,
            None => Work::Init(
                slot.package.clone(),
                flight.input.take().context("input taken twice")?,
            ),
        },
        TaskKind::Load(layer) => match &slot.whole {
            Some(run) => Work::Stage(run.clone()),
            None => Work::Load {
                package: slot.package.clone(),
                layer,
                measure: state
                    .scheduler
                    .needs_measure(flight.model, layer)
                    .then(|| slot.weight_bytes[layer]),
                weights: slot.weight_bytes[layer],
                way: match state.scheduler.load_way(task) {
                    LoadWay::Full => Way::Full,
                    LoadWay::FullMakingTemplate => Way::MakingTemplate,
                    LoadWay::Reload => Way::Reload(
                        slot.templates[layer]
                            .clone()
                            .context("a reload scheduled without its template")?,
                    ),
                },
            },
        },
        TaskKind::Exec(layer) => {
            let staged = match flight.staged[layer].take() {
                Some(s) => s,
                None => Staged::Layer(
                    slot.plans[layer]
                        .clone()
                        .context("exec scheduled before its layer was loaded")?,
                ),
            };
            match staged {
                Staged::Whole(run) => Work::Whole {
                    run,
                    input: flight.input.take().context("input taken twice")?,
                },
                Staged::Layer(layer) => {
                    let walk = flight.walk.as_mut().context("exec before init")?;
                    Work::Exec {
                        inputs: walk.take_inputs(&slot.package, layer.index)?,
                        package: slot.package.clone(),
                        layer,
                    }
                }
            }
        }
    })
}

fn perform(work: Work, alone: bool) -> Result<Done> {
    Ok(match work {
        Work::Init(package, input) => Done::Init(Activations::new(&package, &input)?),
        Work::InitWhole => Done::InitWhole,
        Work::Load {
            package,
            layer,
            measure,
            way,
            weights,
        } => {
            let (how, start) = (way.name(), Instant::now());
            let done = perform_load(&package, layer, measure.filter(|_| alone), way, weights)?;
            log::debug!(
                "{} layer {layer}: {how} in {:.2} ms",
                package.name(),
                start.elapsed().as_secs_f64() * 1e3
            );
            done
        }
        Work::Stage(run) => Done::Loaded(Staged::Whole(run), LoadMeasure::default(), None),
        Work::Whole { run, input } => Done::RanWhole(run(input)?),
        Work::Exec {
            package,
            layer,
            inputs,
        } => {
            let outs = run_layer(&package, &layer, inputs)?;
            // Without the cache, the layer's weights go here, as soon as it has run.
            drop(layer);
            Done::Ran(outs)
        }
    })
}

/// Loads one layer the way the scheduler chose (`measure`: the heap floor when the load
/// runs alone and its bytes are wanted).
fn perform_load(
    package: &Package,
    layer: usize,
    measure: Option<u64>,
    way: Way,
    weights: u64,
) -> Result<Done> {
    Ok(match (way, measure) {
        (Way::Reload(template), _) => {
            let (loaded, kept) =
                heap::kept_by(|| reload(package, layer, &template, &mut LoadPhases::default()));
            Done::Loaded(Staged::Layer(loaded?), heap_measure(kept, weights), None)
        }
        (Way::MakingTemplate, _) => {
            let (loaded, template) =
                load_with_template(package, layer, &mut LoadPhases::default())?;
            // Planning twice left a heap of freed blocks under the mmap threshold,
            // which the reading would count as held until trimmed.
            memory::release_free_heap();
            let (made, template) = match template {
                // A template as large as the layer's weights saves a reload little
                // and costs the cache as much room as its plan: not kept.
                Ok(t) if t.bytes() > weights / TEMPLATE_WORTH => {
                    log::debug!(
                        "{} layer {layer}: no plan template kept: {} bytes for {} of weights",
                        package.name(),
                        t.bytes(),
                        weights
                    );
                    (TemplateMade::Impossible, None)
                }
                Ok(t) => (TemplateMade::Made(t.bytes()), Some(t)),
                Err(e) => {
                    log::debug!("no plan template: {e:#}");
                    (TemplateMade::Impossible, None)
                }
            };
            let measure = LoadMeasure {
                template: made,
                ..LoadMeasure::default()
            };
            Done::Loaded(Staged::Layer(loaded), measure, template)
        }
        (Way::Full, Some(floor)) => {
            let (loaded, measured) = measured_load(package, layer, floor)?;
            Done::Loaded(Staged::Layer(loaded), measured, None)
        }
        (Way::Full, None) => {
            let (loaded, kept) = heap::kept_by(|| load_layer(package, layer));
            Done::Loaded(Staged::Layer(loaded?), heap_measure(kept, weights), None)
        }
    })
}

/// What a load that ran beside other tasks kept: the heap bytes its own thread allocated
/// and kept (the plan, packed weights and graph), at least the weights. Other threads'
/// allocations do not show in it, unlike in the process's RSS; the planner's transient
/// peak is not known this way.
fn heap_measure(kept: u64, weights: u64) -> LoadMeasure {
    LoadMeasure {
        resident: Some(kept.max(weights)),
        ..LoadMeasure::default()
    }
}

/// Loads a layer and measures what it keeps resident (RSS added, at least its weights
/// `floor` and at most the estimate the scheduler will compare it with) and the planner's
/// transient peak above that. Only meaningful when nothing else runs meanwhile.
fn measured_load(
    package: &Package,
    layer: usize,
    floor: u64,
) -> Result<(LoadedLayer, LoadMeasure)> {
    let before = memory::process_memory().ok();
    let reset = memory::reset_peak().is_ok();
    let loaded = load_layer(package, layer)?;
    let after = memory::process_memory().ok();
    let measure = match (before, after, reset) {
        (Some(b), Some(a), true) => LoadMeasure {
            resident: Some(a.rss.saturating_sub(b.rss).max(floor)),
            transient: Some(a.peak_rss.saturating_sub(a.rss)),
            template: TemplateMade::None,
        },
        _ => LoadMeasure::default(),
    };
    Ok((loaded, measure))
}

/// Folds what a task produced into its inference (under the lock).
fn apply(
    inner: &Inner,
    state: &mut State,
    task: TaskRef,
    kind: TaskKind,
    done: Done,
    alone: bool,
    (start, end): (Instant, Instant),
) {
    if state.scheduler.is_finished(task.inference) {
        // The inference ended while this task ran (another of its tasks failed): the
        // result has nobody to go to, and the scheduler has released what it held.
        return;
    }
    let secs_ms = end.duration_since(start).as_secs_f64() * 1e3;
    let result = apply_done(state, task, done, alone, secs_ms, inner.ms(start));
    if let Err(e) = result {
        fail(inner, state, task, e);
        return;
    }
    let _ = kind;
    if state.scheduler.is_finished(task.inference) {
        finish_flight(inner, state, task.inference, end, None);
    }
}

fn apply_done(
    state: &mut State,
    task: TaskRef,
    done: Done,
    alone: bool,
    took_ms: f64,
    start_ms: f64,
) -> Result<()> {
    let State {
        scheduler,
        models,
        flights,
        peak_rss,
        ..
    } = state;
    let flight = flights[task.inference]
        .as_mut()
        .context("a result for an inference nobody submitted")?;
    let slot = &mut models[flight.model.0];
    match done {
        Done::Init(walk) => {
            let live = walk.live_bytes();
            flight.walk = Some(walk);
            flight.timing.start_ms = start_ms;
            scheduler.complete(task);
            scheduler.set_activations(task.inference, live);
        }
        Done::InitWhole => {
            flight.timing.start_ms = start_ms;
            scheduler.complete(task);
        }
        Done::Loaded(staged, measure, template) => {
            flight.timing.load_ms += took_ms;
            let TaskKind::Load(layer) = scheduler.kind(task) else {
                bail!("a load result for a task that is not a load");
            };
            if let Some(template) = template {
                slot.templates[layer] = Some(Arc::new(template));
            }
            match staged {
                Staged::Layer(l) if scheduler.keeps(flight.model) => {
                    slot.plans[layer] = Some(l);
                }
                other => flight.staged[layer] = Some(other),
            }
            let _ = alone;
            if measure.transient.is_some() {
                // Measuring reset the process's peak: keep what it had reached.
                *peak_rss = (*peak_rss).max(memory::process_memory().map_or(0, |m| m.peak_rss));
            }
            scheduler.complete_measured(task, measure);
        }
        Done::Ran(outs) => {
            flight.timing.exec_ms += took_ms;
            let TaskKind::Exec(layer) = scheduler.kind(task) else {
                bail!("an exec result for a task that is not an exec");
            };
            let walk = flight.walk.as_mut().context("exec before init")?;
            walk.store(&slot.package, layer, outs)?;
            let live = walk.live_bytes();
            if layer + 1 == slot.plans.len() {
                let walk = flight.walk.take().context("exec before init")?;
                flight.outputs = Some(walk.finish(&slot.package));
            }
            scheduler.complete(task);
            scheduler.set_activations(task.inference, live);
        }
        Done::RanWhole(outs) => {
            flight.timing.exec_ms += took_ms;
            flight.outputs = Some(Ok(outs));
            scheduler.complete(task);
        }
    }
    Ok(())
}

/// Ends an inference whose task failed: the others go on.
fn fail(inner: &Inner, state: &mut State, task: TaskRef, error: anyhow::Error) {
    state.scheduler.abort(task);
    finish_flight(inner, state, task.inference, Instant::now(), Some(error));
}

fn refuse(inner: &Inner, state: &mut State, inference: usize, refusal: Refusal) {
    let s = &state.scheduler;
    let name = s.model_name(s.model_of(inference)).to_string();
    let needing = s.model_name(refusal.model).to_string();
    let why = format!(
        "layer {} of {needing} needs {} with its activations and at most {} can be made free under the memory limit (its reserve of {} included)",
        refusal.layer,
        Bytes(refusal.needs),
        Bytes(refusal.available),
        Bytes(inner.options.reserve)
    );
    let error = anyhow::Error::new(NoRoom(if refusal.displaced {
        format!("{name}: ended to make room for an older inference: {why}")
    } else {
        format!("{name}: does not fit here: {why}")
    }));
    log::warn!("{error:#}");
    log::debug!(
        "refused with the ledger at {}, {} of it resident; the reading: {:?}",
        Bytes(state.scheduler.ledger()),
        Bytes(state.scheduler.resident_total()),
        inner.system.read()
    );
    finish_flight(inner, state, inference, Instant::now(), Some(error));
}

/// Records the end of an inference (its outputs already stored, or `error`) and wakes
/// whoever waits for it. Its own layers go with its staged plans.
fn finish_flight(
    inner: &Inner,
    state: &mut State,
    inference: usize,
    end: Instant,
    error: Option<anyhow::Error>,
) {
    if let Some(flight) = state.flights[inference].as_mut() {
        flight.timing.end_ms = inner.ms(end);
        flight.staged.iter_mut().for_each(|s| *s = None);
        flight.walk = None;
        flight.input = None;
        if let Some(e) = error {
            // The first error is the cause; a later one is its consequence.
            if !matches!(flight.outputs, Some(Err(_))) {
                flight.outputs = Some(Err(e));
            }
        } else if flight.outputs.is_none() {
            flight.outputs = Some(Err(anyhow!("the inference ended without outputs")));
        }
    }
    inner.finished.notify_all();
}
