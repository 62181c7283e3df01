//! The layer cache's bookkeeping: which layers are resident, and which to evict when
//! something needs room. Each model's layers recur in order on every frame, so the
//! runtime knows the future well enough to evict what is needed furthest ahead.

use super::scheduler::{LayerKey, ModelId, Scheduler};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// Whether a loaded layer outlives the inference that loaded it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LayerCache {
    /// Layers stay resident across inferences while the memory gate allows; the next
    /// inference of the model uses them without loading. Evicted when something needs room.
    #[default]
    Keep,
    /// Every inference loads its own layers and frees each after running it (the paper's
    /// semantics, for reproducing its tables).
    Off,
}

/// Which unpinned resident layer goes first when room is needed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Eviction {
    /// The layer whose next use is furthest ahead in expected time (Belady's rule, with
    /// the layer order every inference follows as the future).
    FurthestAhead,
    /// The layer cheapest to reload per byte it frees (a reload through a plan template
    /// is cheap), wherever its next use lies (layers loaded for an inference and not yet
    /// run are pinned, under every rule). The default:
    /// under a budget it reloads fewer layers and runs more frames per second
    /// (docs/results.md).
    #[default]
    CostPerByte,
}

/// A layer's place in the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Residency {
    Absent,
    /// Being loaded: other inferences wait for it rather than loading it twice.
    Loading,
    /// Loaded; `pins` inferences have it loaded and not yet run (those cannot lose it).
    Resident {
        bytes: u64,
        pins: u32,
    },
}

impl Residency {
    pub(crate) fn pin(&mut self) {
        if let Residency::Resident { pins, .. } = self {
            *pins += 1;
        }
    }

    pub(crate) fn unpin(&mut self) {
        if let Residency::Resident { pins, .. } = self {
            *pins = pins.saturating_sub(1);
        }
    }
}

/// Most evictions handed over per scheduling decision: the list lives in the scheduler, so
/// a decision never allocates. More victims wait for the next decision.
const MAX_VICTIMS: usize = 64;

/// Why the scheduler evicted a resident layer: said in the executor's debug log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EvictionCause {
    /// The memory reading fell below what the ledger holds (the limit was lowered, or
    /// another process grew): the cache shrinks before anything else is admitted.
    ReadingDropped,
    /// Room for this layer's load or execution.
    RoomFor(LayerKey),
    /// Room for bytes reserved outside any task (a frame being decoded).
    RoomForReservation,
}

/// What of a layer an eviction drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Evictable {
    /// Its plan: the next use loads it (a reload, with a template).
    Plan,
    /// Its plan template: the next load after its plan's eviction is a full one.
    Template,
}

/// One eviction the executor has yet to act on.
#[derive(Clone, Copy, Debug)]
pub struct Evicted {
    /// The layer.
    pub key: LayerKey,
    /// Bytes the ledger counted for it (freed once its plan is dropped).
    pub bytes: u64,
    /// Why: said in the debug log.
    pub(crate) cause: EvictionCause,
    /// Its plan or its plan template.
    pub(crate) what: Evictable,
}

/// Layers evicted by the scheduler whose plans the executor has yet to drop.
pub(crate) struct Victims(heapless::Vec<Evicted, MAX_VICTIMS>);

impl Victims {
    pub fn new() -> Victims {
        Victims(heapless::Vec::new())
    }

    pub(crate) fn is_full(&self) -> bool {
        self.0.is_full()
    }

    pub fn push(&mut self, evicted: Evicted) {
        let _ = self.0.push(evicted);
    }

    pub(crate) fn drain(&mut self) -> impl Iterator<Item = Evicted> + '_ {
        std::iter::from_fn(move || self.0.pop())
    }
}

/// The unpinned resident layer to evict next, by the scheduler's eviction policy; with
/// `used_after`, only among layers whose next use is expected later than that many
/// seconds from now (room for a layer loaded ahead of its use must not come from a layer
/// needed before it: that trade only moves a load earlier and adds one).
pub(super) fn choose_victim(s: &Scheduler, used_after: Option<f64>) -> Option<LayerKey> {
    let horizon = horizon(s);
    let mut best: Option<(LayerKey, f64, u64)> = None;
    for (m, model) in s.models.iter().enumerate() {
        let n = model.costs.len();
        // Prefix sums of expected exec time: P(l) = Σ_{k<l} exec(k).
        let total: f64 = (0..n).map(|l| model.exec_secs(l)).sum();
        let at = |p: usize| (0..p).map(|l| model.exec_secs(l)).sum::<f64>();
        let mut cursors: heapless::Vec<(usize, f64), { super::MAX_PARALLEL }> =
            heapless::Vec::new();
        for (model_index, position) in s.cursors() {
            if model_index == m {
                let _ = cursors.push((position, at(position)));
            }
        }
        let queued = s.queued(m);
        let mut prefix = 0.0;
        for (l, residency) in model.residency.iter().enumerate() {
            let here = prefix;
            prefix += model.exec_secs(l);
            let Residency::Resident { bytes, pins: 0 } = *residency else {
                continue;
            };
            let key = LayerKey {
                model: ModelId(m),
                layer: l,
            };
            let until_next_use = next_use(here, total, &cursors, queued, horizon, l);
            if used_after.is_some_and(|after| until_next_use <= after) {
                continue;
            }
            let score = match s.eviction() {
                Eviction::FurthestAhead => until_next_use,
                // Every evicted layer is loaded again once, at its next use, whether that is
                // later in this pass or in the next frame's: what differs is only what that
                // load costs. Preferring layers not needed in this pass instead evicted the
                // many small layers without a template (a full load each) while the large
                // templated ones of the running model stayed: 188 of 511 evictions over 12
                // frames at half the working set, against 21 of 395 this way.
                Eviction::CostPerByte => -model.load_secs(l) / bytes.max(1) as f64,
            };
            let better = match best {
                None => true,
                Some((_, s, b)) => score > s || (score == s && bytes > b),
            };
            if better {
                best = Some((key, score, bytes));
            }
        }
    }
    best.map(|(key, _, _)| key)
}

/// Expected seconds until layer `l` (at prefix time `here` of a pass taking `total`) is
/// next executed, given the positions of the model's inferences in flight.
fn next_use(
    here: f64,
    total: f64,
    cursors: &[(usize, f64)],
    queued: bool,
    horizon: f64,
    l: usize,
) -> f64 {
    let ahead = cursors
        .iter()
        .filter(|&&(p, _)| p <= l)
        .map(|&(_, at)| here - at)
        .fold(f64::INFINITY, f64::min);
    if ahead.is_finite() {
        return ahead;
    }
    // Every inference in flight is past it: the next pass, after this one ends.
    let next_pass = cursors
        .iter()
        .map(|&(_, at)| total - at + here)
        .fold(f64::INFINITY, f64::min);
    if next_pass.is_finite() {
        return next_pass;
    }
    if queued { here } else { horizon + here }
}

/// Expected seconds until every inference in flight has finished: when a model with none
/// in flight and none queued is likely needed next (the next frame).
fn horizon(s: &Scheduler) -> f64 {
    s.cursors()
        .map(|(m, position)| {
            let model = &s.models[m];
            (position..model.costs.len())
                .map(|l| model.exec_secs(l))
                .sum::<f64>()
        })
        .fold(0.0, f64::max)
}
