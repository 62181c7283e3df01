//! Which ready task runs next: FCFS, SJF, LJF, or MEMA (the paper's Algorithm 1) with a
//! ledger of expected resident bytes held within a budget and the live memory reading,
//! and which resident layers make room when something needs it.
//!
//! The scheduler is pure bookkeeping: no threads, no clock, no I/O. Workers ask `next`
//! for a task of their pool and report `complete`; the live memory reading comes in as an
//! argument. That makes every decision reproducible in tests.
//!
//! Invariants:
//! - The ledger is the sum of: resident layers (counted once per layer under
//!   `LayerCache::Keep`, once per inference under `Off`), the reservations of loads in
//!   flight (planner copies, weights, the exec's bytes), the exec bytes of loaded layers not
//!   yet run, every started inference's activations (the most it will hold from its next
//!   layer on, shrinking as it progresses), and reservations taken
//!   outside tasks (`reserve`, e.g. a frame being decoded).
//! - What the live reading cannot show yet is the ledger less resident layers: it is taken
//!   off the reading's headroom, so memory promised is never handed out twice.
//! - A resident layer some inference has loaded and not yet run is pinned: never evicted.

use super::residency::{
    Evictable, Evicted, Eviction, EvictionCause, LayerCache, Residency, Victims,
};
use super::tasks::{LayerCost, LoadingPolicy, TaskKind, TaskSpec, exec_index, load_index};
use anyhow::{Result, ensure};
use std::collections::VecDeque;
use std::sync::Arc;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
/// Which ready task a free worker gets (the paper's four; one scheduler, one pick each).
#[serde(rename_all = "lowercase")]
pub enum SchedulingPolicy {
    /// The earliest submitted ready task.
    Fcfs,
    /// The ready task with the shortest expected duration.
    Sjf,
    /// The ready task with the longest expected duration.
    Ljf,
    /// Memory-aware: execs by memory throughput, loads in layer order within the budget.
    Mema,
}

impl SchedulingPolicy {
    /// Every policy, in the order tables and plans list them.
    pub const ALL: [SchedulingPolicy; 4] = [
        SchedulingPolicy::Fcfs,
        SchedulingPolicy::Sjf,
        SchedulingPolicy::Ljf,
        SchedulingPolicy::Mema,
    ];
}

/// Most inferences in flight at once (`--parallel`). The per-decision candidate lists are
/// fixed-capacity on the stack, sized from it: a scheduling decision never allocates.
pub(crate) const MAX_PARALLEL: usize = 16;

/// A ready load waits at most this many scheduling rounds per layer index it is behind:
/// MEMA orders loads by layer index, which alone would let a stream of new inferences
/// (low indices) starve an old one (high indices).
const AGEING_ROUNDS: u64 = 8;

/// With layers kept and `partial` loading, how many layers beyond its next exec an
/// inference may load. Loading ahead overlaps loads with the exec running; further ahead
/// it only moves loads earlier, and the layers loaded ahead are pinned: a second worker
/// that loaded as far ahead as the budget allowed turned the cache into a read-ahead
/// window sliding over every layer (no layer survived a frame, even with the budget above
/// the working set).
const LOAD_AHEAD: usize = 2;

/// Making a layer's plan template peaks at about this many plans of it beyond a load's
/// footprint (a second plan, the file read again, packed weights copied to zero padding).
const MAKING_PEAK_PLANS: u64 = 3;

/// Weight of the newest observation in the running estimate of a duration.
const OBSERVATION_WEIGHT: f64 = 0.3;

/// A model registered with the scheduler: its layers' costs and what is resident of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId(pub usize);

/// One layer of one model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LayerKey {
    /// The model.
    pub model: ModelId,
    /// The layer's index in the model.
    pub layer: usize,
}

/// One task of one inference in flight: what a [`Decision::Run`] hands a worker, and what
/// it reports back with [`Scheduler::observe`] and [`Scheduler::complete`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskRef {
    pub(crate) inference: usize,
    pub(crate) task: usize,
}

/// What a free worker is told to do.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decision {
    /// Run this task now; its memory is already counted in the ledger.
    Run(TaskRef),
    /// The inference cannot run within the memory there is: it has been ended and its
    /// reservations released. Its loaded layers must be dropped.
    Refuse(usize, Refusal),
}

/// Why an inference was refused: a layer (of it, or of an older inference it made room
/// for) needs more than can be made free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The model of the layer that needed the room.
    pub model: ModelId,
    /// The layer that needed the room.
    pub layer: usize,
    /// The layer's footprint with what its inference holds (activations, reservations).
    pub needs: u64,
    /// The most that could be made free for it with every other inference's memory kept.
    pub(crate) available: u64,
    /// The refused inference is not the one that needed the room: it was the youngest in
    /// flight, refused so that an older one can go on.
    pub(crate) displaced: bool,
}

/// A live memory reading as the scheduler uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Live {
    /// What the reading allowed beyond what the process held then (negative: over).
    pub(crate) headroom: i64,
    /// The ledger's bytes the reading already showed when it was taken (`Scheduler::seen`
    /// then): everything the ledger holds beyond them is not in it.
    pub(crate) seen_then: u64,
    /// The part of the memory there is that `headroom` keeps back (the configured
    /// reserve): only a layer that nothing else can make room for may use it.
    pub reserve: u64,
}

/// What a load measured (only when it ran alone, so that the process's counters are its).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct LoadMeasure {
    /// Bytes the loaded layer keeps resident.
    pub(crate) resident: Option<u64>,
    /// Bytes above `resident` at the load's peak (the planner's transient copies).
    pub transient: Option<u64>,
    /// What became of the plan template the load was asked to make (`LoadWay`).
    pub(crate) template: TemplateMade,
}

/// The outcome of a load asked to make its layer's plan template (`runtime/reload.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum TemplateMade {
    /// The load made none (none was asked, or the load failed).
    #[default]
    None,
    /// Made, holding this many bytes: the executor keeps it until it is evicted.
    Made(u64),
    /// The layer's plan cannot be rebuilt from a template: it is always loaded in full.
    Impossible,
}

/// How a load task loads its layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LoadWay {
    /// Read, parse and plan the layer file.
    Full,
    /// A full load that also makes the layer's plan template: the layer was evicted once
    /// and is loaded again, so later loads can be reloads. Room for it is reserved.
    FullMakingTemplate,
    /// Through the layer's template: the file read and checked, its weights gathered into
    /// the planned graph; no parse, declutter or codegen.
    Reload,
}

/// A layer's plan template, as the ledger knows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Template {
    /// None yet: made by the next load of the layer after an eviction.
    #[default]
    Absent,
    /// The executor holds it: these bytes are in the ledger.
    Present(u64),
    /// Evicted once for room: made again only when there is room without evicting for
    /// it, so that a budget too tight for templates does not pay to make them each load.
    Evicted,
    /// The layer cannot have one.
    Impossible,
}

/// Counters of the layer cache since the scheduler was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    /// Loads served by a resident layer.
    pub hits: u64,
    /// Loads that read and planned a layer.
    pub misses: u64,
    /// Resident layers dropped to make room.
    pub evictions: u64,
    /// Bytes those evictions freed.
    pub evicted_bytes: u64,
    /// Plan templates made (`runtime/reload.rs`): loads after them are reloads.
    #[serde(default)]
    pub templates: u64,
    /// Inferences ended because they could not fit.
    pub refusals: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Waiting(usize),
    Ready { since: u64 },
    Running,
    Done,
}

/// What a load reserved in the ledger, so that its release matches it exactly even if the
/// estimates were refined meanwhile.
#[derive(Clone, Copy, Debug, Default)]
struct Reserved {
    transient: u64,
    resident: u64,
    exec: u64,
    /// Room for the plan template the load makes (its upper bound: the layer's plan).
    template: u64,
    /// The layer was loaded (its bytes are the inference's own, or pinned in the cache).
    loaded: bool,
}

struct Inference {
    model: usize,
    state: Vec<State>,
    reserved: Vec<Reserved>,
    started: bool,
    left: usize,
    /// Layers executed so far: the position its next exec is at.
    executed: usize,
    /// Bytes of this inference's own reservations in the ledger now.
    own: u64,
    /// Of its reserved activations, the bytes that exist now (the reading shows them).
    active: u64,
    /// High-water mark of `own` plus the model's resident layers.
    share_high_water: u64,
    /// High-water mark of the whole ledger while it was in flight.
    ledger_high_water: u64,
    hits: u32,
    misses: u32,
    refused: bool,
    /// Its next load fits only once an older inference in flight is done: its loads wait
    /// until one leaves (`leave_flight`), instead of the model being refused.
    parked: bool,
    /// It runs with no other inference in flight (`submit_as`).
    alone: bool,
    /// A slot of a finished inference may be reused once the caller retires it.
    retired: bool,
}

/// Per layer: refined durations and bytes.
#[derive(Clone, Copy, Debug, Default)]
struct Observed {
    load_secs: Option<f64>,
    exec_secs: Option<f64>,
    resident: Option<u64>,
    transient: Option<u64>,
    /// A load of it has completed: a later load means it was evicted.
    loaded_before: bool,
    template: Template,
}

pub(super) struct ModelEntry {
    pub(super) name: String,
    pub(super) costs: Arc<[LayerCost]>,
    /// `held[l]`: the most activation bytes an inference holds from layer `l` on (`held[n]`
    /// = 0), reserved from Init and released as it passes each layer.
    held: Vec<u64>,
    tasks: Arc<[TaskSpec]>,
    dependents: Arc<[Vec<usize>]>,
    observed: Vec<Observed>,
    pub(super) residency: Vec<Residency>,
    /// Bytes of its layers resident in the cache (`LayerCache::Keep`).
    pub(super) resident_bytes: u64,
    /// Bytes of its layers' plan templates.
    template_bytes: u64,
    /// Whether its layers are kept across inferences (`LayerCache::Keep`, and a model run
    /// layer by layer: a whole run has nothing to keep).
    keep: bool,
}

impl ModelEntry {
    /// The bytes a load of `layer` reserves now: measured where known, never below the
    /// estimate for what only lasts during the load or the exec.
    pub(super) fn cost(&self, layer: usize) -> LayerCost {
        let mut c = self.costs[layer];
        let o = &self.observed[layer];
        if let Some(r) = o.resident {
            c.load_bytes = r;
        }
        if let Some(t) = o.transient {
            c.plan_bytes = c.plan_bytes.max(t);
        }
        c
    }

    pub(super) fn exec_secs(&self, layer: usize) -> f64 {
        self.observed[layer]
            .exec_secs
            .unwrap_or(self.costs[layer].exec_secs)
    }

    pub(super) fn load_secs(&self, layer: usize) -> f64 {
        self.observed[layer]
            .load_secs
            .unwrap_or(self.costs[layer].load_secs)
    }

    /// The least an inference needs to make progress at its worst layer: the activations
    /// reserved for it there and the layer being loaded.
    fn footprint(&self) -> u64 {
        (0..self.costs.len())
            .map(|l| self.held[l] + self.cost(l).footprint())
            .max()
            .unwrap_or(0)
    }
}

/// How the scheduler runs: policies, bounds and the layer cache.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SchedulerOptions {
    /// Which ready task runs next.
    pub policy: SchedulingPolicy,
    /// Which tasks of an inference may run before which.
    pub loading: LoadingPolicy,
    /// Bounds the ledger (`None`: only live readings bound it).
    pub budget: Option<u64>,
    /// Inferences in flight at once (1 to `MAX_PARALLEL`).
    pub parallel: usize,
    /// Whether layers outlive the inference that loaded them.
    pub cache: LayerCache,
    /// Which resident layer goes first when room is needed.
    pub eviction: Eviction,
}

/// The pure scheduling state of an executor: inferences in flight, their task graphs, the
/// ledger of expected resident bytes and the resident layers. No threads and no clock:
/// workers ask [`Scheduler::next`] under a lock and report back, so every policy can be
/// tested (and simulated) without running a layer.
pub struct Scheduler {
    opts: SchedulerOptions,
    pub(super) models: Vec<ModelEntry>,
    inferences: Vec<Inference>,
    free_slots: Vec<usize>,
    waiting: VecDeque<usize>,
    /// Started and unfinished inferences, oldest first: the only ones with ready tasks.
    in_flight: heapless::Vec<usize, MAX_PARALLEL>,
    ledger: u64,
    /// Bytes in the ledger the live reading shows: loaded layers.
    seen: u64,
    /// Reservations outside tasks, and how many are held.
    external: u64,
    /// Brief external reservations (see `reserve`).
    external_count: usize,
    high_water: u64,
    round: u64,
    overdrafts: u64,
    stats: CacheStats,
    evicted: Victims,
}

impl Scheduler {
    /// An idle scheduler with an empty ledger.
    pub fn new(opts: SchedulerOptions) -> Scheduler {
        Scheduler {
            opts: SchedulerOptions {
                parallel: opts.parallel.clamp(1, MAX_PARALLEL),
                ..opts
            },
            models: vec![],
            inferences: vec![],
            free_slots: vec![],
            waiting: VecDeque::new(),
            in_flight: heapless::Vec::new(),
            ledger: 0,
            seen: 0,
            external: 0,
            external_count: 0,
            high_water: 0,
            round: 0,
            overdrafts: 0,
            stats: CacheStats::default(),
            evicted: Victims::new(),
        }
    }

    /// Registers a model. Fails when one of its layers alone exceeds the budget: no
    /// schedule can run it. `held[l]`: the most activation bytes an inference holds from
    /// layer `l` on, one entry per layer and a last one (0) after the last.
    pub fn add_model(
        &mut self,
        name: &str,
        costs: Arc<[LayerCost]>,
        held: Vec<u64>,
        cacheable: bool,
    ) -> Result<ModelId> {
        ensure!(
            held.len() == costs.len() + 1,
            "{name}: {} activation sizes for {} layers",
            held.len(),
            costs.len()
        );
        if let Some(budget) = self.opts.budget {
            for (i, c) in costs.iter().enumerate() {
                ensure!(
                    held[i] + c.footprint() <= budget,
                    "{name}: layer {i} needs {} ({} weights + {} to plan + {} to run + {} of activations), more than the whole budget of {}",
                    crate::memory::Bytes(held[i] + c.footprint()),
                    crate::memory::Bytes(c.load_bytes),
                    crate::memory::Bytes(c.plan_bytes),
                    crate::memory::Bytes(c.exec_bytes),
                    crate::memory::Bytes(held[i]),
                    crate::memory::Bytes(budget)
                );
            }
        }
        let tasks: Arc<[TaskSpec]> = super::tasks::plan_inference(self.opts.loading, &costs).into();
        let mut dependents = vec![vec![]; tasks.len()];
        for (i, t) in tasks.iter().enumerate() {
            for &d in &t.deps {
                dependents[d].push(i);
            }
        }
        self.models.push(ModelEntry {
            name: name.to_string(),
            observed: vec![Observed::default(); costs.len()],
            residency: vec![Residency::Absent; costs.len()],
            resident_bytes: 0,
            template_bytes: 0,
            costs,
            held,
            keep: cacheable && self.opts.cache == LayerCache::Keep,
            tasks,
            dependents: dependents.into(),
        });
        Ok(ModelId(self.models.len() - 1))
    }

    /// Queues an inference of `model`; returns its id (a slot reused after `retire`).
    pub fn submit(&mut self, model: ModelId) -> usize {
        self.submit_as(model, false)
    }

    /// `submit`, or (`alone`) an inference that starts once every inference before it is
    /// done, with nothing beside it: the later ones wait for it. A model refused for room
    /// beside others is tried again this way, so that a refusal says it does not fit alone.
    pub(crate) fn submit_as(&mut self, model: ModelId, alone: bool) -> usize {
        let entry = &self.models[model.0];
        let n = entry.costs.len();
        let inference = Inference {
            model: model.0,
            state: entry
                .tasks
                .iter()
                .map(|t| State::Waiting(t.deps.len()))
                .collect(),
            reserved: vec![Reserved::default(); n],
            started: false,
            left: entry.tasks.len(),
            executed: 0,
            own: 0,
            active: 0,
            share_high_water: 0,
            ledger_high_water: 0,
            hits: 0,
            misses: 0,
            refused: false,
            parked: false,
            alone,
            retired: false,
        };
        let id = match self.free_slots.pop() {
            Some(slot) => {
                self.inferences[slot] = inference;
                slot
            }
            None => {
                self.inferences.push(inference);
                self.inferences.len() - 1
            }
        };
        self.waiting.push_back(id);
        id
    }

    /// Frees a finished inference's slot for reuse.
    pub(crate) fn retire(&mut self, inference: usize) {
        let inf = &mut self.inferences[inference];
        debug_assert_eq!(inf.left, 0);
        if !inf.retired {
            inf.retired = true;
            self.free_slots.push(inference);
        }
    }

    pub(crate) fn model_of(&self, inference: usize) -> ModelId {
        ModelId(self.inferences[inference].model)
    }

    /// Whether the model's layers stay resident across its inferences.
    pub(crate) fn keeps(&self, model: ModelId) -> bool {
        self.models[model.0].keep
    }

    pub(crate) fn model_name(&self, model: ModelId) -> &str {
        &self.models[model.0].name
    }

    /// Refines the expected duration of a task's layer with one it just took: the estimate
    /// (or profile) only starts the running average. Shared by all inferences of a model.
    pub fn observe(&mut self, t: TaskRef, secs: f64) {
        let inf = &self.inferences[t.inference];
        let model = &mut self.models[inf.model];
        let slot = match model.tasks[t.task].kind {
            TaskKind::Init => return,
            TaskKind::Load(l) => &mut model.observed[l].load_secs,
            TaskKind::Exec(l) => &mut model.observed[l].exec_secs,
        };
        *slot = Some(match *slot {
            Some(old) => old + OBSERVATION_WEIGHT * (secs - old),
            None => secs,
        });
    }

    /// Expected duration: observed if the layer has run before, else the given cost.
    pub(crate) fn expected_secs(&self, t: TaskRef) -> f64 {
        let inf = &self.inferences[t.inference];
        let model = &self.models[inf.model];
        match model.tasks[t.task].kind {
            TaskKind::Init => 0.0,
            TaskKind::Load(l) => model.load_secs(l),
            TaskKind::Exec(l) => model.exec_secs(l),
        }
    }

    pub(crate) fn kind(&self, t: TaskRef) -> TaskKind {
        self.models[self.inferences[t.inference].model].tasks[t.task].kind
    }

    /// Expected resident bytes of everything loaded, running or reserved.
    pub(crate) fn ledger(&self) -> u64 {
        self.ledger
    }

    pub(crate) fn high_water(&self) -> u64 {
        self.high_water
    }

    /// How often a load was admitted beyond the budget because nothing else could run
    /// (the one-layer-ahead allowance that keeps progress going; never beyond the live
    /// reading, where the inference is refused instead).
    pub(crate) fn overdrafts(&self) -> u64 {
        self.overdrafts
    }

    pub(crate) fn cache_stats(&self) -> CacheStats {
        self.stats
    }

    /// Resident layers and their bytes, of one model (`LayerCache::Keep`).
    pub(crate) fn resident(&self, model: ModelId) -> (usize, u64) {
        let m = &self.models[model.0];
        let layers = m
            .residency
            .iter()
            .filter(|r| matches!(r, Residency::Resident { .. }))
            .count();
        (layers, m.resident_bytes)
    }

    /// Bytes of the ledger a reading taken now shows: loaded layers, activations made.
    pub(crate) fn seen(&self) -> u64 {
        self.seen
    }

    /// Bytes of the ledger the live reading shows: loaded layers.
    pub(crate) fn resident_total(&self) -> u64 {
        self.seen
    }

    /// Nothing waiting or in flight.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.in_flight.is_empty()
    }

    pub(crate) fn is_finished(&self, inference: usize) -> bool {
        self.inferences[inference].left == 0
    }

    /// Per finished inference: whether it was refused, its cache hits and misses, and the
    /// high-water mark of its share of the ledger (its reservations and its model's
    /// resident layers).
    pub(crate) fn inference_summary(&self, inference: usize) -> InferenceSummary {
        let inf = &self.inferences[inference];
        InferenceSummary {
            hits: inf.hits,
            misses: inf.misses,
            share_high_water: inf.share_high_water,
            ledger_high_water: inf.ledger_high_water,
        }
    }

    /// Layers evicted since the last call: their plans must be dropped.
    pub fn take_evicted(&mut self) -> impl Iterator<Item = Evicted> + '_ {
        self.evicted.drain()
    }

    /// A fresh reading: one taken now, with the ledger as it is.
    pub(crate) fn fresh(&self, headroom: i64) -> Live {
        Live {
            headroom,
            seen_then: self.seen,
            reserve: 0,
        }
    }

    /// What a reading still allows beyond what the ledger promised that it cannot show:
    /// everything in the ledger except what the reading already saw.
    fn live_room(&self, live: Option<Live>) -> Option<i64> {
        live.map(|l| l.headroom - (self.ledger as i64 - l.seen_then as i64))
    }

    /// Whether the live reading, not the budget, limits what is admitted next, or would
    /// with `margin` bytes less in it: memory freed must then show in the reading before
    /// it is counted. Under a budget with memory to spare the budget alone decides.
    pub(crate) fn reading_binds(&self, live: Option<Live>, margin: u64) -> bool {
        let Some(live_room) = self.live_room(live) else {
            return false;
        };
        self.opts.budget.is_none_or(|b| {
            live_room < b as i64 - self.ledger as i64 + i64::try_from(margin).unwrap_or(i64::MAX)
        })
    }

    /// What the reading and the budget still allow: the budget less the ledger, and the
    /// live room. Negative when the ledger is already beyond either.
    fn room(&self, live: Option<Live>) -> Option<i64> {
        let live = self.live_room(live);
        let budget = self.opts.budget.map(|b| b as i64 - self.ledger as i64);
        match (live, budget) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// `next_live` with a reading taken now: what the live reading still allows beyond what
    /// the process holds now (bytes, negative when over), `None` if unbounded.
    pub fn next(&mut self, pool: usize, live: Option<i64>) -> Option<Decision> {
        let live = live.map(|h| self.fresh(h));
        self.next_live(pool, live)
    }

    /// The next task for a free worker of `pool`, or `None` if it should wait for a
    /// completion (or a change of the reading). A reading may be a few milliseconds old:
    /// what the ledger promised since is taken off it.
    pub(crate) fn next_live(&mut self, pool: usize, live: Option<Live>) -> Option<Decision> {
        self.round += 1;
        let mut room = self.room(live);
        if let Some(r) = room
            && r < 0
        {
            // The reading dropped below what is held: shrink the cache before anything
            // else is admitted.
            let freed = self.evict((-r) as u64, EvictionCause::ReadingDropped, None);
            room = Some(r + freed as i64);
        }
        self.start_inferences(room);
        let decision = loop {
            let pick = match self.opts.policy {
                SchedulingPolicy::Mema => self.pick_mema(pool),
                _ => self.pick_greedy(pool),
            }?;
            match self.admit(pick, &mut room, live) {
                Admit::Run => break Decision::Run(pick),
                // A load served by the cache is done at once: look again (its exec may be
                // ready now).
                Admit::Hit => continue,
                // Its loads wait for an older inference: another in flight may go on.
                Admit::Parked => continue,
                Admit::Wait => return None,
                Admit::Refuse(inference, refusal) => break Decision::Refuse(inference, refusal),
            }
        };
        self.update_shares();
        Some(decision)
    }

    /// Reserves what `pick` needs, making room from the cache if it must; says whether it
    /// may run.
    fn admit(&mut self, pick: TaskRef, room: &mut Option<i64>, live: Option<Live>) -> Admit {
        let model_index = self.inferences[pick.inference].model;
        match self.models[model_index].tasks[pick.task].kind {
            TaskKind::Init => {
                let held = self.models[model_index].held[0];
                // Its start counted the cache's evictable bytes as room: make it real
                // before the ledger takes the activations, or the ledger would overrun the
                // budget until the next decision shrank the cache.
                if let Some(short) = room.map(|r| held as i64 - r).filter(|&s| s > 0) {
                    let key = LayerKey {
                        model: ModelId(model_index),
                        layer: 0,
                    };
                    let freed = self.evict(short as u64, EvictionCause::RoomFor(key), None);
                    *room = room.map(|r| r + freed as i64);
                }
                self.reserve_for(pick.inference, held, room);
                self.set_running(pick);
                Admit::Run
            }
            TaskKind::Exec(_) => {
                self.set_running(pick);
                Admit::Run
            }
            TaskKind::Load(layer) => self.admit_load(pick, layer, room, live),
        }
    }

    fn admit_load(
        &mut self,
        pick: TaskRef,
        layer: usize,
        room: &mut Option<i64>,
        live: Option<Live>,
    ) -> Admit {
        let inf = &self.inferences[pick.inference];
        let model = &self.models[inf.model];
        let cost = model.cost(layer);
        let hit = model.keep && matches!(model.residency[layer], Residency::Resident { .. });
        let bytes = if hit {
            cost.exec_bytes
        } else {
            cost.footprint()
        };
        let template = if hit {
            None
        } else {
            self.template_wanted(inf.model, layer, live)
        };
        // Room is made for a first template, not for one evicted before (see `Template`).
        let wanted = bytes + template.filter(|t| t.evict_for_it).map_or(0, |t| t.bytes);
        let mut freed = 0;
        if room.is_some_and(|r| r < wanted as i64) {
            let short = wanted as i64 - room.unwrap_or(0);
            let key = LayerKey {
                model: ModelId(inf.model),
                layer,
            };
            // A hit's own layer is pinned meanwhile: room for its exec must not come from
            // evicting the very plan it is about to run.
            if hit {
                self.models[key.model.0].residency[layer].pin();
            }
            // A load ahead of its inference's next exec (`LOAD_AHEAD`) overlaps with
            // that exec: worth free room, not a cached layer the next frame needs again.
            // The load of the next exec's own layer evicts, but only layers needed after
            // it (evicting one needed sooner only adds a load). When that is not enough and
            // nothing will free memory by waiting, any unpinned layer may go.
            if layer <= self.inferences[pick.inference].executed {
                let needed_in = self.secs_until_exec(pick.inference, layer);
                freed = self.evict(short as u64, EvictionCause::RoomFor(key), Some(needed_in));
            }
            if freed < short as u64 && !self.progress_pending() {
                freed += self.evict(short as u64 - freed, EvictionCause::RoomFor(key), None);
            }
            if hit {
                self.models[key.model.0].residency[layer].unpin();
            }
            *room = room.map(|r| r + freed as i64);
        }
        if room.is_none_or(|r| r >= bytes as i64) || self.opts.policy != SchedulingPolicy::Mema {
            let template = template
                .map(|t| t.bytes)
                .filter(|&t| room.is_none_or(|r| r >= (bytes + t) as i64));
            return self.start_load(pick, layer, cost, hit, template.unwrap_or(0), room);
        }
        // It does not fit. Wait for what is running to free memory, and for the reading to
        // show the layers just evicted gone (they may have held more than was counted).
        if freed > 0 || self.progress_pending() {
            return Admit::Wait;
        }
        // Nothing running will free memory: waiting would wait forever. What the limit
        // itself allows, the reserve included:
        let hard_room = self
            .live_room(live)
            .zip(live)
            .map(|(r, l)| r + l.reserve as i64);
        if hard_room.is_none_or(|r| r >= bytes as i64) {
            // Only the configured budget or the reserve is short, not the memory there
            // is: load one layer ahead anyway, the documented allowance. With in-order
            // loads this happens only with nothing resident, except under `bulk`, which
            // must hold a whole model before its first exec.
            self.overdrafts += 1;
            return self.start_load(pick, layer, cost, hit, 0, room);
        }
        // An older inference in flight holds memory it will free when done: this one's
        // loads wait for that (the older ones go on) rather than the model being refused
        // for room it will have. The oldest never parks, so something always progresses.
        if self.in_flight.first() != Some(&pick.inference) {
            self.inferences[pick.inference].parked = true;
            return Admit::Parked;
        }
        // Make room by ending the youngest inference in flight (this one, if it is alone):
        // the layer cannot fit beside what the others hold, and never will by waiting.
        let victim = self.youngest_in_flight().unwrap_or(pick.inference);
        let own = self.inferences[pick.inference].own;
        let refusal = Refusal {
            layer,
            model: ModelId(self.inferences[pick.inference].model),
            needs: bytes + own,
            available: (hard_room.unwrap_or(0).max(0) as u64) + own,
            displaced: victim != pick.inference,
        };
        self.refuse(victim);
        Admit::Refuse(victim, refusal)
    }

    /// Whether a load of `layer` should make its plan template, and the room to reserve.
    ///
    /// Only under a configured budget, and only while the memory there is (the live
    /// reading) has room for making one beside the load without evicting: making plans
    /// the layer twice and copies its weights on the way (`runtime/reload.rs`), a peak of
    /// about three times the plan, and near a cgroup's limit that peak is a risk no reload
    /// saving is worth. There a layer is loaded in full, as without templates.
    fn template_wanted(
        &self,
        model: usize,
        layer: usize,
        live: Option<Live>,
    ) -> Option<TemplateWanted> {
        let m = &self.models[model];
        let o = &m.observed[layer];
        if !m.keep || !o.loaded_before || self.opts.budget.is_none() {
            return None;
        }
        let cost = m.cost(layer);
        let making_peak = cost.footprint() + MAKING_PEAK_PLANS * cost.load_bytes;
        if self.live_room(live).is_some_and(|r| r < making_peak as i64) {
            return None;
        }
        let evict_for_it = match o.template {
            Template::Absent => true,
            Template::Evicted => false,
            Template::Present(_) | Template::Impossible => return None,
        };
        Some(TemplateWanted {
            // A template is the plan's graph without its weights: the plan bounds it.
            bytes: cost.load_bytes,
            evict_for_it,
        })
    }

    /// How the load of task `t` (running now) loads its layer.
    pub(crate) fn load_way(&self, t: TaskRef) -> LoadWay {
        let inf = &self.inferences[t.inference];
        let model = &self.models[inf.model];
        let TaskKind::Load(layer) = model.tasks[t.task].kind else {
            return LoadWay::Full;
        };
        if inf.reserved[layer].template > 0 {
            LoadWay::FullMakingTemplate
        } else if matches!(model.observed[layer].template, Template::Present(_)) {
            LoadWay::Reload
        } else {
            LoadWay::Full
        }
    }

    /// Bytes of the plan templates of one model.
    pub(crate) fn template_bytes(&self, model: ModelId) -> u64 {
        self.models[model.0].template_bytes
    }

    fn start_load(
        &mut self,
        pick: TaskRef,
        layer: usize,
        cost: LayerCost,
        hit: bool,
        template: u64,
        room: &mut Option<i64>,
    ) -> Admit {
        let model_index = self.inferences[pick.inference].model;
        if hit {
            self.reserve_for(pick.inference, cost.exec_bytes, room);
            let inf = &mut self.inferences[pick.inference];
            inf.reserved[layer] = Reserved {
                exec: cost.exec_bytes,
                loaded: true,
                ..Reserved::default()
            };
            inf.hits += 1;
            self.models[model_index].residency[layer].pin();
            self.stats.hits += 1;
            self.set_running(pick);
            self.finish_task(pick);
            return Admit::Hit;
        }
        self.reserve_for(pick.inference, cost.footprint() + template, room);
        let inf = &mut self.inferences[pick.inference];
        inf.reserved[layer] = Reserved {
            transient: cost.plan_bytes,
            resident: cost.load_bytes,
            exec: cost.exec_bytes,
            template,
            loaded: false,
        };
        inf.misses += 1;
        self.stats.misses += 1;
        if self.models[model_index].keep {
            self.models[model_index].residency[layer] = Residency::Loading;
        }
        self.set_running(pick);
        Admit::Run
    }

    fn reserve_for(&mut self, inference: usize, bytes: u64, room: &mut Option<i64>) {
        self.ledger += bytes;
        self.high_water = self.high_water.max(self.ledger);
        self.inferences[inference].own += bytes;
        *room = room.map(|r| r - bytes as i64);
    }

    fn release_for(&mut self, inference: usize, bytes: u64) {
        self.ledger -= bytes;
        self.inferences[inference].own -= bytes;
    }

    fn set_running(&mut self, t: TaskRef) {
        self.inferences[t.inference].state[t.task] = State::Running;
    }

    /// Records a finished task: releases what it reserved, readies its dependents.
    pub fn complete(&mut self, t: TaskRef) {
        self.complete_measured(t, LoadMeasure::default());
    }

    /// `complete`, with what a load measured of its layer: the ledger and every later
    /// load of the layer use the measured bytes.
    pub(crate) fn complete_measured(&mut self, t: TaskRef, measured: LoadMeasure) {
        let model_index = self.inferences[t.inference].model;
        match self.models[model_index].tasks[t.task].kind {
            TaskKind::Init => {}
            TaskKind::Load(l) => self.loaded(t.inference, l, measured),
            TaskKind::Exec(l) => self.executed(t.inference, l),
        }
        self.finish_task(t);
        self.update_shares();
    }

    fn loaded(&mut self, inference: usize, layer: usize, measured: LoadMeasure) {
        let model_index = self.inferences[inference].model;
        let r = self.inferences[inference].reserved[layer];
        // A measured size only ever lowers the estimate: RSS grown during the first load
        // of a process also holds tract's lazily built tables, and evicting the layer
        // must never be credited with more than it frees.
        let resident = measured.resident.map_or(r.resident, |m| m.min(r.resident));
        let observed = &mut self.models[model_index].observed[layer];
        if measured.resident.is_some() {
            observed.resident = Some(resident);
        }
        if measured.transient.is_some() {
            observed.transient = measured.transient;
        }
        observed.loaded_before = true;
        self.release_for(inference, r.transient + r.template);
        match measured.template {
            TemplateMade::Made(bytes) => {
                let model = &mut self.models[model_index];
                model.observed[layer].template = Template::Present(bytes);
                model.template_bytes += bytes;
                self.ledger += bytes;
                self.seen += bytes;
                self.stats.templates += 1;
            }
            // Asked for a template, the load made none: the layer cannot have one.
            TemplateMade::Impossible | TemplateMade::None if r.template > 0 => {
                self.models[model_index].observed[layer].template = Template::Impossible;
            }
            TemplateMade::Impossible | TemplateMade::None => {}
        }
        self.ledger = self.ledger - r.resident + resident;
        self.high_water = self.high_water.max(self.ledger);
        self.seen += resident;
        let inf = &mut self.inferences[inference];
        inf.reserved[layer].loaded = true;
        inf.reserved[layer].transient = 0;
        inf.reserved[layer].template = 0;
        inf.own -= r.resident;
        if self.models[model_index].keep {
            // Resident bytes now belong to the cache, not to the inference.
            let model = &mut self.models[model_index];
            model.residency[layer] = Residency::Resident {
                bytes: resident,
                pins: 1,
            };
            model.resident_bytes += resident;
            inf.reserved[layer].resident = 0;
        } else {
            inf.own += resident;
            inf.reserved[layer].resident = resident;
        }
    }

    fn executed(&mut self, inference: usize, layer: usize) {
        let r = self.inferences[inference].reserved[layer];
        let model_index = self.inferences[inference].model;
        let held = &self.models[model_index].held;
        // Past this layer, the activations it will hold at most are fewer.
        let passed = held[layer] - held[layer + 1];
        self.release_for(inference, r.exec + r.resident + passed);
        self.seen -= r.resident;
        self.inferences[inference].reserved[layer] = Reserved::default();
        self.inferences[inference].executed = layer + 1;
        if self.models[model_index].keep {
            self.models[model_index].residency[layer].unpin();
        }
    }

    /// Marks a task done, readies its dependents, and ends the inference after its last.
    fn finish_task(&mut self, t: TaskRef) {
        let model_index = self.inferences[t.inference].model;
        let dependents = self.models[model_index].dependents.clone();
        let round = self.round;
        let inf = &mut self.inferences[t.inference];
        debug_assert_eq!(inf.state[t.task], State::Running);
        inf.state[t.task] = State::Done;
        inf.left -= 1;
        for &d in &dependents[t.task] {
            if let State::Waiting(n) = inf.state[d] {
                inf.state[d] = if n == 1 {
                    State::Ready { since: round }
                } else {
                    State::Waiting(n - 1)
                };
            }
        }
        if inf.left == 0 {
            let (own, active) = (inf.own, inf.active);
            inf.active = 0;
            self.seen -= active;
            self.release_for(t.inference, own);
            self.leave_flight(t.inference);
        }
    }

    /// The bytes of activations an inference holds now (at most its reservation): they
    /// exist, so the reading shows them and they are no longer unseen.
    pub(crate) fn set_activations(&mut self, inference: usize, bytes: u64) {
        let model_index = self.inferences[inference].model;
        let inf = &mut self.inferences[inference];
        if inf.left == 0 {
            return;
        }
        let bytes = bytes.min(self.models[model_index].held[inf.executed]);
        self.seen = self.seen - inf.active + bytes;
        inf.active = bytes;
    }

    /// Whether a load of this layer should measure it: the first time, and only when the
    /// cache keeps it (a measured size then stands for every later load).
    pub(crate) fn needs_measure(&self, model: ModelId, layer: usize) -> bool {
        self.models[model.0].observed[layer].resident.is_none()
    }

    /// Ends the inference of a task that failed (its own reservations released, the
    /// layer it was loading not resident); the others go on.
    pub(crate) fn abort(&mut self, t: TaskRef) {
        if self.inferences[t.inference].left > 0 {
            self.end(t.inference);
        }
    }

    /// Ends an inference that cannot fit: releases everything it holds.
    fn refuse(&mut self, inference: usize) {
        self.end(inference);
        self.stats.refusals += 1;
    }

    fn end(&mut self, inference: usize) {
        let model_index = self.inferences[inference].model;
        let keep = self.models[model_index].keep;
        for layer in 0..self.inferences[inference].reserved.len() {
            let r = self.inferences[inference].reserved[layer];
            let residency = &mut self.models[model_index].residency[layer];
            if r.loaded {
                self.seen -= r.resident;
                if keep {
                    residency.unpin();
                }
            } else if keep && r.resident > 0 && *residency == Residency::Loading {
                *residency = Residency::Absent;
            }
        }
        let inf = &mut self.inferences[inference];
        let own = inf.own;
        self.seen -= inf.active;
        inf.active = 0;
        for s in inf.state.iter_mut() {
            *s = State::Done;
        }
        inf.left = 0;
        inf.refused = true;
        inf.reserved
            .iter_mut()
            .for_each(|r| *r = Reserved::default());
        self.release_for(inference, own);
        self.leave_flight(inference);
        self.waiting.retain(|&i| i != inference);
    }

    /// An inference is done or ended: what it held is free, so the loads of those parked
    /// behind it may try again.
    fn leave_flight(&mut self, inference: usize) {
        self.in_flight.retain(|&i| i != inference);
        for &i in &self.in_flight {
            self.inferences[i].parked = false;
        }
    }
}

/// A finished inference, as the scheduler saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct InferenceSummary {
    /// Loads served by resident layers.
    pub hits: u32,
    /// Loads that read and planned their layer.
    pub misses: u32,
    /// High-water mark of its reservations plus its model's resident layers.
    pub(crate) share_high_water: u64,
    /// High-water mark of the whole ledger (every inference's) while it was in flight.
    pub ledger_high_water: u64,
}

enum Admit {
    Run,
    Hit,
    Parked,
    Wait,
    Refuse(usize, Refusal),
}

/// What `reserve` decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reservation {
    Granted,
    /// Not now: memory will be freed by what is in flight.
    Wait,
    /// Not even with nothing else in flight: at most this many bytes could be had.
    Never {
        available: u64,
    },
}

impl Scheduler {
    /// Reserves bytes outside any task (a frame being decoded), making room from the
    /// cache if it must. Release them with `release`. A `brief` reservation is released
    /// without waiting for any inference, so a load that does not fit waits for it; one
    /// that is not (a frame kept for its cascades' crops while its detector runs) may
    /// outlive inferences, so nothing waits for it: a load that cannot fit beside it is
    /// treated as if nothing else would free memory.
    pub(crate) fn reserve(&mut self, bytes: u64, live: Option<Live>, brief: bool) -> Reservation {
        let mut room = self.room(live);
        let mut freed = 0;
        if room.is_some_and(|r| r < bytes as i64) {
            let short = bytes as i64 - room.unwrap_or(0);
            freed = self.evict(short as u64, EvictionCause::RoomForReservation, None);
            room = room.map(|r| r + freed as i64);
        }
        if room.is_none_or(|r| r >= bytes as i64) {
            self.ledger += bytes;
            self.high_water = self.high_water.max(self.ledger);
            self.external += bytes;
            self.external_count += usize::from(brief);
            return Reservation::Granted;
        }
        // Layers just evicted may have held more than was counted: read memory again
        // with them gone before saying never.
        if freed > 0 || !self.in_flight.is_empty() || self.external_count > 0 {
            return Reservation::Wait;
        }
        Reservation::Never {
            available: room.unwrap_or(0).max(0) as u64,
        }
    }

    pub(crate) fn release(&mut self, bytes: u64, brief: bool) {
        debug_assert!(self.external >= bytes && (!brief || self.external_count > 0));
        self.ledger -= bytes;
        self.external -= bytes;
        self.external_count -= usize::from(brief);
    }

    /// Starts queued inferences while fewer than `parallel` run and, under MEMA, while the
    /// next one's footprint fits what is left and what the cache could give up (or
    /// nothing runs at all).
    fn start_inferences(&mut self, mut room: Option<i64>) {
        let evictable = match room {
            Some(_) if self.opts.policy == SchedulingPolicy::Mema => self.evictable_bytes(),
            _ => 0,
        };
        // A second inference in flight overlaps its work with the first's, but under a
        // bound its activations and loads come out of the cache's room, evicting layers the
        // next frame needs again; reloading them costs more than the overlap gains (two
        // workers at half the working set: no layer survived a frame). With layers kept,
        // inferences run side by side only while the bound holds every kept layer beside
        // the footprints of all of them.
        let capacity = room
            .filter(|_| self.opts.cache == LayerCache::Keep)
            .map(|r| r + self.ledger as i64);
        let kept = capacity.map_or(0, |_| self.kept_working_set());
        let mut side_by_side: u64 = self
            .in_flight
            .iter()
            .map(|&i| self.models[self.inferences[i].model].footprint())
            .sum();
        if self.in_flight.iter().any(|&i| self.inferences[i].alone) {
            return;
        }
        while self.in_flight.len() < self.opts.parallel {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let alone = self.inferences[id].alone;
            if alone && !self.in_flight.is_empty() {
                break;
            }
            let footprint = self.models[self.inferences[id].model].footprint();
            side_by_side += footprint;
            if self.opts.policy == SchedulingPolicy::Mema
                && !self.in_flight.is_empty()
                && (room.is_some_and(|r| (footprint as i64) > r + evictable as i64)
                    || capacity.is_some_and(|c| ((kept + side_by_side) as i64) > c))
            {
                break;
            }
            if self.in_flight.push(id).is_err() {
                break; // unreachable: parallel <= MAX_PARALLEL
            }
            self.waiting.pop_front();
            // What it will need is not reserved yet (its init reserves its activations
            // without asking): the next start must fit beside it, not in the same room.
            room = room.map(|r| r - footprint as i64);
            let round = self.round;
            let inf = &mut self.inferences[id];
            inf.started = true;
            inf.state[0] = State::Ready { since: round };
            if alone {
                break;
            }
        }
    }

    /// Bytes of every layer of the models whose layers are kept, all resident at once
    /// (measured where known): what the cache holds when nothing is evicted.
    fn kept_working_set(&self) -> u64 {
        self.models
            .iter()
            .filter(|m| m.keep)
            .map(|m| {
                (0..m.costs.len())
                    .map(|l| m.cost(l).load_bytes)
                    .sum::<u64>()
            })
            .sum()
    }

    /// Whether the load task `task` of an inference of `model` may be picked now: not
    /// while another inference is loading the same layer into the cache (it will be a
    /// hit once that load ends).
    fn load_pickable(&self, inference: usize, task: usize) -> bool {
        let inf = &self.inferences[inference];
        let model = &self.models[inf.model];
        match model.tasks[task].kind {
            TaskKind::Load(l) => {
                !model.keep
                    || (model.residency[l] != Residency::Loading && self.within_load_ahead(inf, l))
            }
            _ => true,
        }
    }

    /// Whether `inference` may load `layer` now under `partial` loading with layers kept
    /// (see `LOAD_AHEAD`). The other policies load as they define: bulk needs every layer
    /// before its first exec, DeepEye preloads fc layers, linear never loads ahead.
    fn within_load_ahead(&self, inference: &Inference, layer: usize) -> bool {
        self.opts.loading != LoadingPolicy::Partial || layer <= inference.executed + LOAD_AHEAD
    }

    /// Ready tasks of `pool`, with the round they became ready, oldest inference first.
    fn ready(&self, pool: usize) -> impl Iterator<Item = (TaskRef, u64)> + '_ {
        self.in_flight.iter().flat_map(move |&i| {
            let inf = &self.inferences[i];
            let model = &self.models[inf.model];
            inf.state
                .iter()
                .enumerate()
                .filter_map(move |(t, s)| match s {
                    State::Ready { since }
                        if model.tasks[t].pool == pool && self.load_pickable(i, t) =>
                    {
                        Some((
                            TaskRef {
                                inference: i,
                                task: t,
                            },
                            *since,
                        ))
                    }
                    _ => None,
                })
        })
    }

    fn pick_greedy(&self, pool: usize) -> Option<TaskRef> {
        let dur = |t: &TaskRef| self.expected_secs(*t);
        let ready = self.ready(pool).map(|(t, _)| t);
        match self.opts.policy {
            SchedulingPolicy::Sjf => ready.min_by(|a, b| {
                dur(a)
                    .total_cmp(&dur(b))
                    .then((a.inference, a.task).cmp(&(b.inference, b.task)))
            }),
            SchedulingPolicy::Ljf => ready.min_by(|a, b| {
                dur(b)
                    .total_cmp(&dur(a))
                    .then((a.inference, a.task).cmp(&(b.inference, b.task)))
            }),
            _ => ready.min_by_key(|t| (t.inference, t.task)),
        }
    }

    /// MEMA's candidates in `pool`: per inference in flight, its ready Init, its ready
    /// exec (execs run in order, so there is at most one) and its next load in layer
    /// order if that one is ready.
    fn mema_candidates(&self, pool: usize) -> heapless::Vec<Candidate, { 3 * MAX_PARALLEL }> {
        let mut out = heapless::Vec::new();
        for &i in &self.in_flight {
            let inf = &self.inferences[i];
            let model = &self.models[inf.model];
            let at = |task| TaskRef { inference: i, task };
            let ready_here = |task: usize| {
                matches!(inf.state[task], State::Ready { .. }) && model.tasks[task].pool == pool
            };
            if ready_here(0) {
                let _ = out.push(Candidate::Init(at(0)));
                continue;
            }
            let n = model.costs.len();
            // Within an inference, loads go strictly in layer order: the layer its next
            // exec needs is always loaded before any later one, so resident layers never
            // block their own progress (DeepEye's fc preloads wait for the convs before them).
            let next_load =
                (0..n).find(|&l| !matches!(inf.state[load_index(l)], State::Running | State::Done));
            if let Some(l) = next_load
                && let task = load_index(l)
                && let State::Ready { since } = inf.state[task]
                && model.tasks[task].pool == pool
                && !inf.parked
                && self.load_pickable(i, task)
            {
                let _ = out.push(Candidate::Load(at(task), l, since));
            }
            if let Some(l) = (0..n).find(|&l| ready_here(exec_index(n, l))) {
                let _ = out.push(Candidate::Exec(at(exec_index(n, l)), l));
            }
        }
        out
    }

    fn pick_mema(&self, pool: usize) -> Option<TaskRef> {
        let candidates = self.mema_candidates(pool);
        // Inits reserve only activations the start already allowed for; execs free
        // memory: they go first, highest memory throughput (bytes freed per second of
        // work) first.
        if let Some(t) = candidates.iter().find_map(|c| match c {
            Candidate::Init(t) => Some(*t),
            _ => None,
        }) {
            return Some(t);
        }
        let throughput = |t: TaskRef, l: usize| {
            let model = &self.models[self.inferences[t.inference].model];
            model.cost(l).loaded() as f64 / self.expected_secs(t).max(1e-9)
        };
        let exec = candidates
            .iter()
            .filter_map(|c| match *c {
                Candidate::Exec(t, l) => Some((t, throughput(t, l))),
                _ => None,
            })
            .max_by(|a, b| {
                a.1.total_cmp(&b.1)
                    .then((b.0.inference, b.0.task).cmp(&(a.0.inference, a.0.task)))
            });
        if let Some((t, _)) = exec {
            return Some(t);
        }
        let round = self.round;
        candidates
            .iter()
            .filter_map(|c| match *c {
                Candidate::Load(t, l, since) => Some((
                    t,
                    (l as u64).saturating_sub((round - since) / AGEING_ROUNDS),
                    l,
                )),
                _ => None,
            })
            .min_by_key(|&(t, key, l)| (key, t.inference, l))
            .map(|(t, _, _)| t)
    }

    /// A ready exec in any pool: a worker of another pool is about to free memory.
    fn any_ready_exec(&self) -> bool {
        self.in_flight.iter().any(|&i| {
            let inf = &self.inferences[i];
            let model = &self.models[inf.model];
            model.tasks.iter().zip(&inf.state).any(|(t, s)| {
                matches!(t.kind, TaskKind::Exec(_)) && matches!(s, State::Ready { .. })
            })
        })
    }

    /// Whether something will free memory without a new decision: a task running, an
    /// exec ready for a worker, or a reservation outside the tasks to be released.
    fn progress_pending(&self) -> bool {
        self.any_running() || self.any_ready_exec() || self.external_count > 0
    }

    /// Expected seconds of execution before `inference` runs `layer`: the execs of the
    /// layers between its position and it (0 for the layer it runs next).
    fn secs_until_exec(&self, inference: usize, layer: usize) -> f64 {
        let inf = &self.inferences[inference];
        let model = &self.models[inf.model];
        (inf.executed..layer).map(|l| model.exec_secs(l)).sum()
    }

    fn any_running(&self) -> bool {
        self.in_flight
            .iter()
            .any(|&i| self.inferences[i].state.contains(&State::Running))
    }

    fn youngest_in_flight(&self) -> Option<usize> {
        self.in_flight.last().copied()
    }

    fn update_shares(&mut self) {
        for &i in &self.in_flight {
            let inf = &mut self.inferences[i];
            let share = inf.own + self.models[inf.model].resident_bytes;
            inf.share_high_water = inf.share_high_water.max(share);
            inf.ledger_high_water = inf.ledger_high_water.max(self.ledger);
        }
    }

    /// Bytes the cache could free now: resident layers no inference has pinned, and the
    /// plan templates of layers not being loaded.
    fn evictable_bytes(&self) -> u64 {
        let plans: u64 = self
            .models
            .iter()
            .flat_map(|m| &m.residency)
            .filter_map(|r| match *r {
                Residency::Resident { bytes, pins: 0 } => Some(bytes),
                _ => None,
            })
            .sum();
        let templates: u64 = (0..self.models.len())
            .flat_map(|m| (0..self.models[m].costs.len()).map(move |l| (m, l)))
            .filter_map(|(m, l)| self.template_evictable(m, l))
            .sum();
        plans + templates
    }

    /// The bytes of layer `layer`'s template if it may be evicted now (not in use by a
    /// load of the layer).
    fn template_evictable(&self, model: usize, layer: usize) -> Option<u64> {
        let m = &self.models[model];
        match (m.observed[layer].template, m.residency[layer]) {
            (_, Residency::Loading) => None,
            (Template::Present(bytes), _) => Some(bytes),
            _ => None,
        }
    }

    /// The template to evict once no plan is left to: the largest (a template costs its
    /// layer a full load, whatever its size).
    fn template_victim(&self) -> Option<(LayerKey, u64)> {
        (0..self.models.len())
            .flat_map(|m| (0..self.models[m].costs.len()).map(move |l| (m, l)))
            .filter_map(|(m, l)| Some(((m, l), self.template_evictable(m, l)?)))
            .max_by_key(|&(_, bytes)| bytes)
            .map(|((m, layer), bytes)| {
                let key = LayerKey {
                    model: ModelId(m),
                    layer,
                };
                (key, bytes)
            })
    }

    /// Evicts unpinned resident layers, the policy's choice first, then plan templates,
    /// until `bytes` are freed or nothing is left (or the list of evictions to hand over
    /// is full); returns the bytes freed. With `used_after`, only layers whose next use is
    /// expected later than that many seconds ahead.
    fn evict(&mut self, bytes: u64, cause: EvictionCause, used_after: Option<f64>) -> u64 {
        let mut freed = 0;
        while freed < bytes && !self.evicted.is_full() {
            let victim = super::residency::choose_victim(self, used_after);
            let (key, size, what) = if let Some(key) = victim {
                let model = &mut self.models[key.model.0];
                let Residency::Resident { bytes: size, .. } = model.residency[key.layer] else {
                    break; // unreachable: victims are resident
                };
                model.residency[key.layer] = Residency::Absent;
                model.resident_bytes -= size;
                (key, size, Evictable::Plan)
            } else if let Some((key, size)) = self.template_victim() {
                let model = &mut self.models[key.model.0];
                model.observed[key.layer].template = Template::Evicted;
                model.template_bytes -= size;
                (key, size, Evictable::Template)
            } else {
                break;
            };
            self.ledger -= size;
            self.seen -= size;
            self.stats.evictions += 1;
            self.stats.evicted_bytes += size;
            self.evicted.push(Evicted {
                key,
                bytes: size,
                cause,
                what,
            });
            freed += size;
        }
        freed
    }

    /// Inferences in flight with the next layer each will execute, for eviction choices.
    pub(super) fn cursors(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.in_flight.iter().map(|&i| {
            let inf = &self.inferences[i];
            (inf.model, inf.executed)
        })
    }

    /// Models with inferences queued but not started.
    pub(super) fn queued(&self, model: usize) -> bool {
        self.waiting
            .iter()
            .any(|&i| self.inferences[i].model == model)
    }

    pub(super) fn eviction(&self) -> Eviction {
        self.opts.eviction
    }
}

/// A load that should make its layer's plan template.
#[derive(Clone, Copy, Debug)]
struct TemplateWanted {
    /// Room to reserve for it.
    bytes: u64,
    /// Whether resident layers may be evicted to make that room.
    evict_for_it: bool,
}

/// A task MEMA may pick, with what it ranks by.
#[derive(Clone, Copy, Debug)]
enum Candidate {
    Init(TaskRef),
    /// The exec and its layer.
    Exec(TaskRef, usize),
    /// The load, its layer, and the round it became ready (for ageing).
    Load(TaskRef, usize, u64),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LayerKind;

    fn costs(n: usize, mib: u64, fc_from: usize) -> Arc<[LayerCost]> {
        (0..n)
            .map(|i| LayerCost {
                kind: if i >= fc_from {
                    LayerKind::Fc
                } else {
                    LayerKind::Conv
                },
                load_bytes: (mib + i as u64 % 3) << 20,
                plan_bytes: (i as u64 % 2) << 20,
                exec_bytes: 1 << 20,
                load_secs: 0.002 * (1 + i % 4) as f64,
                exec_secs: 0.001 * (1 + (i * 7) % 5) as f64,
            })
            .collect()
    }

    /// Registers a model whose inferences hold `held` bytes of activations throughout.
    fn model(s: &mut Scheduler, costs: Arc<[LayerCost]>, held: u64) -> ModelId {
        let mut profile = vec![held; costs.len()];
        profile.push(0);
        s.add_model("net", costs, profile, true).unwrap()
    }

    fn scheduler(
        policy: SchedulingPolicy,
        loading: LoadingPolicy,
        budget: Option<u64>,
        parallel: usize,
        cache: LayerCache,
    ) -> Scheduler {
        Scheduler::new(SchedulerOptions {
            policy,
            loading,
            budget,
            parallel,
            cache,
            eviction: Eviction::FurthestAhead,
        })
    }

    fn run(s: &mut Scheduler, pool: usize, live: Option<i64>) -> Option<TaskRef> {
        match s.next(pool, live) {
            Some(Decision::Run(t)) => Some(t),
            Some(Decision::Refuse(i, r)) => panic!("inference {i} refused: {r:?}"),
            None => None,
        }
    }

    /// Simulated run: `workers` per pool take tasks, each lasting its expected duration.
    /// Checks dependencies and exec order; returns (makespan, per-inference finish times).
    fn simulate(
        s: &mut Scheduler,
        workers: [usize; 2],
        budget: Option<u64>,
        check_budget: bool,
    ) -> (f64, Vec<f64>) {
        let mut now = 0.0;
        let mut busy: Vec<(f64, usize, TaskRef)> = vec![];
        let mut finished = vec![f64::NAN; s.inferences.len()];
        let mut executed: Vec<Vec<usize>> = vec![vec![]; s.inferences.len()];
        let mut steps = 0;
        while !s.is_idle() {
            steps += 1;
            assert!(steps < 1_000_000, "no progress");
            for (pool, &count) in workers.iter().enumerate() {
                while busy.iter().filter(|b| b.1 == pool).count() < count {
                    let Some(t) = run(s, pool, None) else { break };
                    s.take_evicted().for_each(drop);
                    let inf = &s.inferences[t.inference];
                    let model = &s.models[inf.model];
                    for &d in &model.tasks[t.task].deps {
                        assert_eq!(inf.state[d], State::Done, "dependency not done");
                    }
                    if let TaskKind::Exec(l) = model.tasks[t.task].kind {
                        executed[t.inference].push(l);
                    }
                    if check_budget && s.overdrafts == 0 {
                        assert!(
                            s.ledger <= budget.unwrap(),
                            "ledger {} over budget",
                            s.ledger
                        );
                    }
                    busy.push((now + s.expected_secs(t), pool, t));
                }
            }
            assert!(
                !busy.is_empty(),
                "deadlock: nothing running, nothing schedulable"
            );
            busy.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (end, _, t) = busy.remove(0);
            now = end;
            s.complete(t);
            if s.is_finished(t.inference) {
                finished[t.inference] = now;
            }
        }
        for (i, e) in executed.iter().enumerate() {
            let n = s.models[s.inferences[i].model].costs.len();
            assert_eq!(
                *e,
                (0..n).collect::<Vec<_>>(),
                "inference {i} ran its layers out of order"
            );
        }
        assert_eq!(
            s.ledger,
            s.models.iter().map(|m| m.resident_bytes).sum::<u64>()
        );
        (now, finished)
    }

    const LOADINGS: [LoadingPolicy; 4] = LoadingPolicy::ALL;
    const SCHEDULERS: [SchedulingPolicy; 4] = SchedulingPolicy::ALL;
    const CACHES: [LayerCache; 2] = [LayerCache::Off, LayerCache::Keep];

    #[test]
    fn every_combination_completes_in_dependency_order() {
        for cache in CACHES {
            for loading in LOADINGS {
                for policy in SCHEDULERS {
                    for parallel in 1..=3 {
                        let mut s = scheduler(policy, loading, Some(64 << 20), parallel, cache);
                        for k in 0..5 {
                            let m = model(&mut s, costs(4 + k, 4, 2 + k), 0);
                            s.submit(m);
                            s.submit(m);
                        }
                        simulate(&mut s, [parallel, 1], Some(64 << 20), false);
                    }
                }
            }
        }
    }

    #[test]
    fn mema_keeps_the_ledger_within_the_budget() {
        for cache in CACHES {
            for loading in [
                LoadingPolicy::Linear,
                LoadingPolicy::DeepEye,
                LoadingPolicy::Partial,
            ] {
                let budget = 24 << 20;
                let mut s = scheduler(SchedulingPolicy::Mema, loading, Some(budget), 3, cache);
                for k in 0..6 {
                    let m = model(&mut s, costs(6 + k, 5, 4), 1 << 20);
                    s.submit(m);
                    s.submit(m);
                }
                simulate(&mut s, [3, 1], Some(budget), true);
                assert!(
                    s.high_water() <= budget,
                    "{cache:?}/{loading:?}: high water {}",
                    s.high_water()
                );
                assert_eq!(s.overdrafts(), 0);
            }
        }
    }

    #[test]
    fn bulk_under_a_small_budget_overdraws_rather_than_deadlocks() {
        let budget = 24 << 20;
        let mut s = scheduler(
            SchedulingPolicy::Mema,
            LoadingPolicy::Bulk,
            Some(budget),
            2,
            LayerCache::Off,
        );
        for k in 0..3 {
            let m = model(&mut s, costs(6 + k, 5, 4), 0);
            s.submit(m);
        }
        simulate(&mut s, [2, 1], Some(budget), false);
        assert!(s.overdrafts() > 0 && s.high_water() > budget);
    }

    #[test]
    fn a_shrinking_live_limit_makes_mema_wait() {
        let mut s = scheduler(
            SchedulingPolicy::Mema,
            LoadingPolicy::Partial,
            Some(1 << 30),
            1,
            LayerCache::Off,
        );
        let m = model(&mut s, costs(3, 4, 3), 0);
        s.submit(m);
        let init = run(&mut s, 0, Some(1 << 30)).unwrap();
        s.complete(init);
        let load = run(&mut s, 0, Some(1 << 30)).unwrap();
        assert_eq!(s.kind(load), TaskKind::Load(0));
        // The cgroup limit drops: 1 MiB left. Layer 1 (5 MiB) must wait, though the
        // budget would allow it: the load in flight will free room when its exec ends.
        assert_eq!(s.next(0, Some(1 << 20)), None);
        s.complete(load);
        let exec = run(&mut s, 0, Some(1 << 20)).unwrap();
        assert_eq!(s.kind(exec), TaskKind::Exec(0));
        assert_eq!(s.next(0, Some(1 << 20)), None);
        s.complete(exec);
        // Room again.
        let next = run(&mut s, 0, Some(1 << 30)).unwrap();
        assert_eq!(s.kind(next), TaskKind::Load(1));
    }

    #[test]
    fn observed_durations_refine_the_estimates() {
        let mut s = scheduler(
            SchedulingPolicy::Sjf,
            LoadingPolicy::Partial,
            None,
            2,
            LayerCache::Off,
        );
        let net = model(&mut s, costs(2, 1, 2), 0);
        let a = s.submit(net);
        let b = s.submit(net);
        let load = TaskRef {
            inference: a,
            task: load_index(1),
        };
        let twin = TaskRef {
            inference: b,
            task: load.task,
        };
        assert_eq!(s.expected_secs(twin), 0.004);
        s.observe(load, 1.0);
        assert_eq!(s.expected_secs(twin), 1.0, "same model: learnt");
        s.observe(load, 0.0);
        assert!(
            (s.expected_secs(twin) - 0.7).abs() < 1e-12,
            "a running average, not the last value"
        );
        let other = model(&mut s, costs(2, 1, 2), 0);
        let c = s.submit(other);
        assert_eq!(
            s.expected_secs(TaskRef {
                inference: c,
                task: load.task
            }),
            0.004
        );
    }

    #[test]
    fn a_short_budget_with_memory_there_overdraws_rather_than_refuses() {
        // `bulk` must hold the whole model (15 MiB) before its first exec; the budget (a
        // setting) allows 12 MiB but the reading has plenty: the loads go ahead.
        let mut s = scheduler(
            SchedulingPolicy::Mema,
            LoadingPolicy::Bulk,
            Some(12 << 20),
            1,
            LayerCache::Keep,
        );
        let m = model(&mut s, costs(3, 4, 3), 0);
        let i = s.submit(m);
        run_serially(&mut s, Some(1 << 30));
        assert!(s.overdrafts() > 0);
        assert_eq!(s.inference_summary(i).misses, 3);
        assert_eq!(s.cache_stats().refusals, 0);
    }

    #[test]
    fn a_layer_beyond_the_live_limit_is_refused_not_overdrawn() {
        // Nothing of ours is resident and the reading allows less than the layer: loading
        // it anyway would take the process past its cgroup limit. The inference is ended
        // with the numbers, and nothing is left in the ledger.
        let mut s = scheduler(
            SchedulingPolicy::Mema,
            LoadingPolicy::Partial,
            None,
            1,
            LayerCache::Keep,
        );
        let m = model(&mut s, costs(3, 4, 3), 1 << 20);
        let i = s.submit(m);
        let init = run(&mut s, 0, Some(3 << 20)).unwrap();
        s.complete(init);
        match s.next(0, Some(3 << 20)) {
            Some(Decision::Refuse(refused, r)) => {
                assert_eq!(refused, i);
                assert_eq!(r.layer, 0);
                assert!(!r.displaced);
                // The layer (5 MiB) and the activations reserved for the inference (1 MiB),
                // against 3 MiB live.
                assert_eq!(r.needs, 6 << 20);
                assert_eq!(r.available, 3 << 20);
            }
            other => panic!("{other:?}"),
        }
        assert!(s.is_finished(i) && s.is_idle());
        assert_eq!(s.ledger(), 0);
        assert_eq!(s.cache_stats().refusals, 1);
    }

    /// Runs serially under a cgroup-like limit: the reading shows everything in the ledger.
    fn run_under_limit(s: &mut Scheduler, limit: i64) {
        while !s.is_idle() {
            match s.next(0, Some(limit - s.seen() as i64)) {
                Some(Decision::Run(t)) => {
                    s.take_evicted().for_each(drop);
                    s.complete(t);
                }
                other => panic!("{other:?} with the ledger at {}", s.ledger()),
            }
        }
    }

    #[test]
    fn a_younger_inference_that_fits_alone_waits_for_the_older_rather_than_being_refused() {
        // The older inference holds 4 MiB of activations throughout; the younger's only
        // layer (8 MiB, its exec 1 MiB) fits the 12 MiB limit alone, not beside it.
        let mut s = scheduler(
            SchedulingPolicy::Mema,
            LoadingPolicy::Partial,
            None,
            2,
            LayerCache::Off,
        );
        let small = model(&mut s, costs(3, 1, 3), 4 << 20);
        let big = model(&mut s, costs(1, 8, 1), 1 << 20);
        let older = s.submit(small);
        let younger = s.submit(big);
        // Both start with room to spare; then the limit is lowered.
        while s.in_flight.len() < 2 || s.ledger() < 5 << 20 {
            let live = (64 << 20) - s.seen() as i64;
            let t = run(&mut s, 0, Some(live)).expect("a task");
            assert!(matches!(s.kind(t), TaskKind::Init), "{:?}", s.kind(t));
            s.complete(t);
        }
        run_under_limit(&mut s, 12 << 20);
        assert_eq!(s.cache_stats().refusals, 0);
        assert!(s.is_finished(older) && s.is_finished(younger));
        assert!(!s.inferences[younger].refused);
        assert_eq!(s.ledger(), 0);
    }

    #[test]
    fn an_inference_submitted_alone_runs_after_those_before_it_and_before_those_after() {
        let mut s = scheduler(
            SchedulingPolicy::Mema,
            LoadingPolicy::Partial,
            None,
            2,
            LayerCache::Off,
        );
        let m = model(&mut s, costs(2, 1, 2), 0);
        let before = s.submit(m);
        let alone = s.submit_as(m, true);
        let after = s.submit(m);
        let mut beside: Vec<Vec<usize>> = vec![];
        while !s.is_idle() {
            let t = run(&mut s, 0, None).expect("a task");
            beside.push(s.in_flight.to_vec());
            s.complete(t);
        }
        assert!(
            beside.iter().all(|f| !f.contains(&alone) || f == &[alone]),
            "{beside:?}"
        );
        let first = |i: usize| beside.iter().position(|f| f.contains(&i)).unwrap();
        let last = |i: usize| beside.iter().rposition(|f| f.contains(&i)).unwrap();
        assert!(last(before) < first(alone) && last(alone) < first(after));
    }

    #[test]
    fn a_layer_larger_than_the_budget_is_refused() {
        let mut s = scheduler(
            SchedulingPolicy::Mema,
            LoadingPolicy::Partial,
            Some(8 << 20),
            1,
            LayerCache::Keep,
        );
        let err = s
            .add_model("facenet", costs(3, 9, 3), vec![0; 4], true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("facenet: layer 0") && err.contains("budget"),
            "{err}"
        );
    }

    #[test]
    fn no_starvation_under_a_stream_of_200_mixed_inferences() {
        for cache in CACHES {
            for policy in SCHEDULERS {
                let budget = 40 << 20;
                let mut s = scheduler(policy, LoadingPolicy::Partial, Some(budget), 3, cache);
                let models: Vec<ModelId> = (0..9)
                    .map(|n| model(&mut s, costs(2 + n, 2 + (n as u64 % 4), 1 + n), 0))
                    .collect();
                for k in 0..200 {
                    s.submit(models[(k * 13) % 9]);
                }
                let (makespan, finished) = simulate(
                    &mut s,
                    [3, 1],
                    Some(budget),
                    policy == SchedulingPolicy::Mema,
                );
                assert!(finished.iter().all(|f| f.is_finite()));
                // Inferences start in submission order, at most 3 at a time, so none can
                // finish later than a bounded window after those submitted just after it.
                for (k, f) in finished.iter().enumerate().skip(10) {
                    let later = finished[k + 1..]
                        .iter()
                        .take(10)
                        .cloned()
                        .fold(f64::INFINITY, f64::min);
                    if later.is_finite() {
                        assert!(
                            *f <= later + makespan / 20.0,
                            "{cache:?}/{policy:?}: inference {k} starved ({f} vs {later})"
                        );
                    }
                }
            }
        }
    }

    /// Runs inferences one after another on one worker, completing tasks in order.
    fn run_serially(s: &mut Scheduler, live: Option<i64>) {
        while !s.is_idle() {
            let t = run(s, 0, live).expect("a task");
            s.take_evicted().for_each(drop);
            s.complete(t);
        }
    }

    #[test]
    fn the_reading_binds_without_a_budget_or_when_it_is_the_tighter_limit() {
        let live = |s: &Scheduler, headroom: i64| Some(s.fresh(headroom));
        let mib = |n: i64| n << 20;
        let unbudgeted = scheduler(
            SchedulingPolicy::Mema,
            LoadingPolicy::Partial,
            None,
            1,
            LayerCache::Keep,
        );
        assert!(unbudgeted.reading_binds(live(&unbudgeted, mib(1024)), 4 << 20));
        assert!(!unbudgeted.reading_binds(None, 4 << 20));
        let budgeted = scheduler(
            SchedulingPolicy::Mema,
            LoadingPolicy::Partial,
            Some(16 << 20),
            1,
            LayerCache::Keep,
        );
        // 16 MiB of budget room: a reading with 1 GiB spare does not decide, one with
        // less than the budget room and the margin does.
        assert!(!budgeted.reading_binds(live(&budgeted, mib(1024)), 4 << 20));
        assert!(!budgeted.reading_binds(live(&budgeted, mib(20)), 4 << 20));
        assert!(budgeted.reading_binds(live(&budgeted, mib(19)), 4 << 20));
        assert!(budgeted.reading_binds(live(&budgeted, mib(8)), 0));
    }

    #[test]
    fn with_room_the_second_inference_loads_nothing() {
        let mut s = scheduler(
            SchedulingPolicy::Mema,
            LoadingPolicy::Partial,
            Some(256 << 20),
            1,
            LayerCache::Keep,
        );
        let m = model(&mut s, costs(8, 2, 8), 1 << 20);
        let first = s.submit(m);
        run_serially(&mut s, None);
        let second = s.submit(m);
        run_serially(&mut s, None);
        assert_eq!(s.inference_summary(first).misses, 8);
        assert_eq!(s.inference_summary(second).misses, 0);
        assert_eq!(s.inference_summary(second).hits, 8);
        let resident: u64 = (0..8).map(|l| costs(8, 2, 8)[l].load_bytes).sum();
        assert_eq!(s.resident(m), (8, resident));
        assert_eq!(
            s.ledger(),
            resident,
            "only the resident layers stay in the ledger"
        );
    }

    #[test]
    fn under_a_budget_the_cache_keeps_a_fixed_part_and_stays_within() {
        // 8 layers of 2-4 MiB (23 MiB in all) in a 16 MiB budget: each inference reloads
        // some layers, never more than the budget is reserved. Furthest ahead goes first:
        // a cyclic order keeps part of itself resident instead of thrashing, as
        // least-recently-used would (8 reloads every time).
        let budget = 16 << 20;
        let mut s = scheduler(
            SchedulingPolicy::Mema,
            LoadingPolicy::Partial,
            Some(budget),
            1,
            LayerCache::Keep,
        );
        let m = model(&mut s, costs(8, 2, 8), 0);
        let mut misses = vec![];
        for _ in 0..6 {
            let i = s.submit(m);
            run_serially(&mut s, None);
            assert!(s.high_water() <= budget);
            misses.push(s.inference_summary(i).misses);
        }
        // About 10 MiB of the 23 stay resident beside the layer being loaded and run.
        assert_eq!(misses[0], 8);
        assert!(
            misses[1..].iter().all(|&n| (1..=5).contains(&n)),
            "reloads per inference: {misses:?}"
        );
        assert!(s.cache_stats().evictions > 0);
    }

    #[test]
    fn a_reading_below_what_is_held_shrinks_the_cache_first() {
        let mut s = scheduler(
            SchedulingPolicy::Mema,
            LoadingPolicy::Partial,
            None,
            1,
            LayerCache::Keep,
        );
        let m = model(&mut s, costs(6, 2, 6), 0);
        s.submit(m);
        run_serially(&mut s, None);
        let (layers, bytes) = s.resident(m);
        assert_eq!(layers, 6);
        // Another process grew: the reading is 5 MiB below nothing. Before anything else
        // is admitted, at least 5 MiB of layers go.
        s.submit(m);
        let t = run(&mut s, 0, Some(-(5 << 20))).unwrap();
        assert_eq!(s.kind(t), TaskKind::Init);
        let evicted: Vec<LayerKey> = s.take_evicted().map(|e| e.key).collect();
        let (_, left) = s.resident(m);
        assert!(bytes - left >= 5 << 20, "{} freed", bytes - left);
        assert_eq!(evicted.len(), 6 - s.resident(m).0);
    }

    /// Runs one inference serially, its first decision with the reading `live` (then
    /// none), its template-making loads reporting a template of `template` bytes; returns
    /// how each layer was loaded.
    fn run_loads(s: &mut Scheduler, m: ModelId, live: Option<i64>, template: u64) -> Vec<LoadWay> {
        s.submit(m);
        let mut ways = vec![];
        let mut live = live;
        while !s.is_idle() {
            let t = run(s, 0, live.take()).expect("a task");
            s.take_evicted().for_each(drop);
            let TaskKind::Load(_) = s.kind(t) else {
                s.complete(t);
                continue;
            };
            let way = s.load_way(t);
            ways.push(way);
            let measure = LoadMeasure {
                template: match way {
                    LoadWay::FullMakingTemplate => TemplateMade::Made(template),
                    _ => TemplateMade::None,
                },
                ..LoadMeasure::default()
            };
            s.complete_measured(t, measure);
        }
        ways
    }

    #[test]
    fn an_evicted_layer_comes_back_with_a_template_then_reloads_through_it() {
        use LoadWay::*;
        let mut s = scheduler(
            SchedulingPolicy::Mema,
            LoadingPolicy::Partial,
            Some(1 << 30),
            1,
            LayerCache::Keep,
        );
        let m = model(&mut s, costs(3, 2, 3), 0);
        let template = 64 << 10;
        let plans: u64 = (0..3).map(|l| s.models[0].costs[l].load_bytes).sum();
        // A layer never evicted makes no template: with room, nothing pays for one.
        assert_eq!(run_loads(&mut s, m, None, template), [Full; 3]);
        assert_eq!(run_loads(&mut s, m, None, template), []);
        // The reading drops below nothing: every plan goes; loaded again, each layer
        // makes its template, counted in the ledger beside the plans.
        assert_eq!(
            run_loads(&mut s, m, Some(-(1 << 40)), template),
            [FullMakingTemplate; 3]
        );
        assert_eq!(s.ledger(), plans + 3 * template);
        assert_eq!(s.template_bytes(m), 3 * template);
        assert_eq!(s.cache_stats().templates, 3);
        // Evicting makes room from the plans first: the templates stay, and the next
        // loads are reloads.
        let short = (plans - 1) as i64;
        assert_eq!(run_loads(&mut s, m, Some(-short), template), [Reload; 3]);
        assert_eq!(s.template_bytes(m), 3 * template);
        assert_eq!(s.ledger(), plans + 3 * template);
        // With no plan left to evict, templates go too, and are counted out.
        let evicted_before = s.cache_stats().evictions;
        s.submit(m);
        let _ = run(&mut s, 0, Some(-(1 << 40)));
        let what: Vec<Evictable> = s.take_evicted().map(|e| e.what).collect();
        assert_eq!(what.iter().filter(|&&w| w == Evictable::Plan).count(), 3);
        assert_eq!(
            what.iter().filter(|&&w| w == Evictable::Template).count(),
            3
        );
        assert_eq!(s.cache_stats().evictions, evicted_before + 6);
        assert_eq!(s.template_bytes(m), 0);
        assert_eq!(s.seen(), 0);
    }

    #[test]
    fn near_a_live_limit_or_without_a_budget_layers_are_loaded_in_full() {
        // Three layers of 2 MiB of weights, 3 MiB with their exec: a reading of 7 MiB has
        // room for a load and a template's reservation (5 MiB), not for making one (9).
        let layer = costs(1, 2, 1)[0];
        let uniform: Arc<[LayerCost]> = vec![layer; 3].into();
        for (budget, live) in [(None, None), (Some(1 << 30), Some(7 << 20))] {
            let mut s = scheduler(
                SchedulingPolicy::Mema,
                LoadingPolicy::Partial,
                budget,
                1,
                LayerCache::Keep,
            );
            let m = model(&mut s, uniform.clone(), 0);
            run_loads(&mut s, m, None, 1 << 10);
            // Everything evicted by a reading far below; every later reading leaves room
            // for a load and a template, not for the peak of making one.
            s.submit(m);
            let mut first = Some(-(1 << 40));
            let mut ways = vec![];
            while !s.is_idle() {
                let t = run(&mut s, 0, first.take().or(live)).expect("a task");
                s.take_evicted().for_each(drop);
                if let TaskKind::Load(_) = s.kind(t) {
                    ways.push(s.load_way(t));
                }
                s.complete(t);
            }
            assert_eq!(ways, [LoadWay::Full; 3], "{budget:?} {live:?}");
        }
    }

    #[test]
    fn without_the_cache_no_load_makes_or_uses_a_template() {
        let mut s = scheduler(
            SchedulingPolicy::Mema,
            LoadingPolicy::Partial,
            None,
            1,
            LayerCache::Off,
        );
        let m = model(&mut s, costs(3, 2, 3), 0);
        for _ in 0..3 {
            assert_eq!(run_loads(&mut s, m, None, 1 << 10), [LoadWay::Full; 3]);
        }
        assert_eq!(s.ledger(), 0);
    }

    #[test]
    fn under_a_budget_a_template_evicted_once_is_only_made_again_in_free_room() {
        // 4 layers of 2 MiB in 5 MiB: every inference reloads. Templates of 1 MiB (the
        // reservation is the plan's 2 MiB) make the budget tighter still; whatever is
        // made or evicted, the ledger stays within the budget.
        let budget = 5 << 20;
        let mut s = scheduler(
            SchedulingPolicy::Mema,
            LoadingPolicy::Partial,
            Some(budget),
            1,
            LayerCache::Keep,
        );
        let m = model(&mut s, costs(4, 2, 2), 0);
        let mut made = 0;
        for _ in 0..12 {
            let ways = run_loads(&mut s, m, None, 1 << 20);
            made += ways
                .iter()
                .filter(|&&w| w == LoadWay::FullMakingTemplate)
                .count();
            assert!(s.high_water() <= budget, "{} > {budget}", s.high_water());
        }
        // Each layer makes its template once by evicting; after its eviction, only when
        // the room is there anyway: far fewer than one per load.
        assert!(
            (1..=16).contains(&made),
            "{made} templates made in 12 inferences"
        );
    }

    #[test]
    fn under_pressure_every_exec_finds_its_plan_and_every_reload_its_template() {
        // The executor's side, mirrored: plans and templates exist from their load's
        // completion to the eviction that drops them. Random readings (some far below
        // what is held), two inferences of two models in flight, completions in random
        // order: an exec must always find its plan, a reload its template.
        for budget in [None, Some(12 << 20)] {
            for seed in 1..20 {
                random_pressure(budget, seed);
            }
        }
    }

    fn random_pressure(budget: Option<u64>, seed: u64) {
        let mut s = scheduler(
            SchedulingPolicy::Mema,
            LoadingPolicy::Partial,
            budget,
            2,
            LayerCache::Keep,
        );
        let models = [
            model(&mut s, costs(6, 2, 6), 1 << 20),
            model(&mut s, costs(5, 1, 5), 1 << 20),
        ];
        let mut plans = vec![vec![false; 6]; 2];
        let mut templates = vec![vec![false; 6]; 2];
        let mut running: Vec<TaskRef> = vec![];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64 ^ seed;
        let mut random = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut submitted = 0;
        for _ in 0..4000 {
            if submitted < 60 && running.len() < 2 && random(3) == 0 {
                s.submit(models[random(2) as usize]);
                submitted += 1;
            }
            let live = match random(6) {
                0 => Some(-((random(8) as i64) << 20)),
                1 => Some((random(8) as i64) << 20),
                _ => None,
            };
            if running.len() < 2
                && let Some(decision) = s.next(0, live)
            {
                for e in s.take_evicted() {
                    let (m, l) = (e.key.model.0, e.key.layer);
                    match e.what {
                        Evictable::Plan => assert!(std::mem::take(&mut plans[m][l])),
                        Evictable::Template => assert!(std::mem::take(&mut templates[m][l])),
                    }
                }
                if let Decision::Run(t) = decision {
                    let m = s.model_of(t.inference).0;
                    match s.kind(t) {
                        TaskKind::Exec(l) => {
                            assert!(plans[m][l], "exec of {m}/{l} without its plan")
                        }
                        TaskKind::Load(l) => {
                            if s.load_way(t) == LoadWay::Reload {
                                assert!(templates[m][l], "reload of {m}/{l} without its template");
                            }
                        }
                        TaskKind::Init => {}
                    }
                    running.push(t);
                }
                continue;
            }
            if running.is_empty() {
                continue;
            }
            let t = running.remove(random(running.len() as u64) as usize);
            let m = s.model_of(t.inference).0;
            let mut measure = LoadMeasure::default();
            if let TaskKind::Load(l) = s.kind(t)
                && !s.is_finished(t.inference)
            {
                plans[m][l] = true;
                if s.load_way(t) == LoadWay::FullMakingTemplate {
                    templates[m][l] = true;
                    measure.template = TemplateMade::Made(256 << 10);
                }
            }
            if !s.is_finished(t.inference) {
                s.complete_measured(t, measure);
            }
            if s.is_finished(t.inference) && running.iter().all(|r| r.inference != t.inference) {
                s.retire(t.inference);
            }
        }
        assert!(s.cache_stats().evictions > 0, "{budget:?} {seed}");
    }

    #[test]
    fn two_inferences_in_flight_load_a_layer_once() {
        let mut s = scheduler(
            SchedulingPolicy::Mema,
            LoadingPolicy::Partial,
            None,
            2,
            LayerCache::Keep,
        );
        let m = model(&mut s, costs(5, 2, 5), 0);
        let a = s.submit(m);
        let b = s.submit(m);
        simulate(&mut s, [2, 0], None, false);
        let misses = s.inference_summary(a).misses + s.inference_summary(b).misses;
        assert_eq!(misses, 5, "each layer loaded once between the two");
        assert_eq!(s.cache_stats().hits, 5);
    }

    /// Frames of two models under `budget`, `workers` workers and as many inferences in
    /// flight; returns the loads each frame after the first served from the cache.
    fn hits_per_frame(workers: usize, budget: u64) -> Vec<u32> {
        let mut s = scheduler(
            SchedulingPolicy::Mema,
            LoadingPolicy::Partial,
            Some(budget),
            workers,
            LayerCache::Keep,
        );
        let detector = model(&mut s, costs(8, 2, 8), 2 << 20);
        let landmarks = model(&mut s, costs(8, 1, 6), 2 << 20);
        let mut hits = vec![];
        for frame in 0..6 {
            let ids = [s.submit(detector), s.submit(landmarks)];
            simulate(&mut s, [workers, 0], Some(budget), true);
            assert!(
                s.high_water() <= budget,
                "frame {frame}: ledger over budget"
            );
            if frame > 0 {
                hits.push(ids.iter().map(|&i| s.inference_summary(i).hits).sum());
            }
            ids.iter().for_each(|&i| s.retire(i));
        }
        hits
    }

    #[test]
    fn a_second_worker_under_a_budget_keeps_the_cache_serving_frames() {
        // 16 layers of 37 MiB in a 24 MiB budget. A second worker used to load ahead as
        // far as the budget allowed and start the second model beside the first, both
        // paid for by evicting the layers the next frame needed: no layer survived a
        // frame. Loads ahead now take free room only, and the second model starts only
        // where the budget holds the kept layers beside both.
        let budget = 24 << 20;
        let one = hits_per_frame(1, budget);
        let two = hits_per_frame(2, budget);
        assert!(
            one.iter().all(|&h| h >= 3),
            "one worker: hits per frame {one:?}"
        );
        let (one_total, two_total) = (one.iter().sum::<u32>(), two.iter().sum::<u32>());
        assert!(
            4 * two_total >= 3 * one_total,
            "hits per frame: two workers {two:?} against one {one:?}"
        );
    }

    #[test]
    fn reservations_wait_for_memory_and_refuse_what_can_never_fit() {
        let mut s = scheduler(
            SchedulingPolicy::Mema,
            LoadingPolicy::Partial,
            None,
            1,
            LayerCache::Keep,
        );
        assert_eq!(
            s.reserve(4 << 20, Some(s.fresh(8 << 20)), true),
            Reservation::Granted
        );
        // 4 MiB promised and not yet seen: 4 more do not fit 8 MiB of room... yet.
        assert_eq!(
            s.reserve(5 << 20, Some(s.fresh(8 << 20)), true),
            Reservation::Wait
        );
        s.release(4 << 20, true);
        assert_eq!(
            s.reserve(9 << 20, Some(s.fresh(8 << 20)), true),
            Reservation::Never { available: 8 << 20 }
        );
        assert_eq!(s.ledger(), 0);
        // Nothing waits for a reservation that is not brief: with only that one held, a
        // request that does not fit can never fit.
        assert_eq!(
            s.reserve(4 << 20, Some(s.fresh(8 << 20)), false),
            Reservation::Granted
        );
        assert_eq!(
            s.reserve(5 << 20, Some(s.fresh(8 << 20)), true),
            Reservation::Never { available: 4 << 20 }
        );
        s.release(4 << 20, false);
        assert_eq!(s.ledger(), 0);
    }
}
