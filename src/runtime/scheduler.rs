//! Which ready task runs next: FCFS, SJF, LJF, or MEMA (the paper's Algorithm 1) with a
//! ledger of expected resident bytes held within a budget.
//!
//! The scheduler is pure bookkeeping: no threads, no clock, no I/O. Workers ask `next`
//! for a task of their pool and report `complete`; the live memory reading comes in as an
//! argument. That makes every decision reproducible in tests.

use super::tasks::{LayerCost, LoadingPolicy, TaskKind, TaskSpec, plan_inference};
use anyhow::{Result, ensure};
use std::collections::VecDeque;
use std::sync::Arc;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
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
    pub const ALL: [SchedulingPolicy; 4] = [
        SchedulingPolicy::Fcfs,
        SchedulingPolicy::Sjf,
        SchedulingPolicy::Ljf,
        SchedulingPolicy::Mema,
    ];
}

/// Most inferences in flight at once (`--parallel`). The per-decision candidate lists are
/// fixed-capacity on the stack, sized from it: a scheduling decision never allocates.
pub const MAX_PARALLEL: usize = 16;

/// A ready load waits at most this many scheduling rounds per layer index it is behind:
/// MEMA orders loads by layer index, which alone would let a stream of new inferences
/// (low indices) starve an old one (high indices).
const AGEING_ROUNDS: u64 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskRef {
    pub inference: usize,
    pub task: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Waiting(usize),
    Ready { since: u64 },
    Running,
    Done,
}

struct Inference {
    costs: Arc<[LayerCost]>,
    /// Index into the scheduler's observed timings, shared by inferences of one package.
    group: usize,
    tasks: Vec<TaskSpec>,
    state: Vec<State>,
    dependents: Vec<Vec<usize>>,
    /// Bytes it needs at least to make progress: its largest layer, loaded and running.
    footprint: u64,
    started: bool,
    left: usize,
}

/// Durations observed so far for the layers of one package (one cost table).
struct Observed {
    costs: Arc<[LayerCost]>,
    load_secs: Vec<Option<f64>>,
    exec_secs: Vec<Option<f64>>,
}

/// Weight of the newest observation in the running estimate.
const OBSERVATION_WEIGHT: f64 = 0.3;

pub struct Scheduler {
    policy: SchedulingPolicy,
    observed: Vec<Observed>,
    loading: LoadingPolicy,
    budget: Option<u64>,
    parallel: usize,
    inferences: Vec<Inference>,
    waiting: VecDeque<usize>,
    /// Started and unfinished inferences, oldest first: the only ones with ready tasks.
    in_flight: heapless::Vec<usize, MAX_PARALLEL>,
    ledger: u64,
    high_water: u64,
    round: u64,
    overdrafts: u64,
}

impl Scheduler {
    /// `budget` bounds the ledger under MEMA (`None`: only live readings bound it);
    /// `parallel` bounds the inferences in flight (1 to `MAX_PARALLEL`).
    pub fn new(
        policy: SchedulingPolicy,
        loading: LoadingPolicy,
        budget: Option<u64>,
        parallel: usize,
    ) -> Scheduler {
        Scheduler {
            policy,
            observed: vec![],
            loading,
            budget,
            parallel: parallel.clamp(1, MAX_PARALLEL),
            inferences: vec![],
            waiting: VecDeque::new(),
            in_flight: heapless::Vec::new(),
            ledger: 0,
            high_water: 0,
            round: 0,
            overdrafts: 0,
        }
    }

    /// Queues an inference; returns its id. Fails when one of its layers alone exceeds the
    /// budget: no schedule can run it.
    pub fn submit(&mut self, name: &str, costs: Arc<[LayerCost]>) -> Result<usize> {
        let footprint = costs.iter().map(LayerCost::footprint).max().unwrap_or(0);
        if let Some(budget) = self.budget {
            for (i, c) in costs.iter().enumerate() {
                ensure!(
                    c.footprint() <= budget,
                    "{name}: layer {i} needs {} ({} weights + {} to plan + {} to run), more than the whole budget of {}",
                    crate::memory::Bytes(c.footprint()),
                    crate::memory::Bytes(c.load_bytes),
                    crate::memory::Bytes(c.plan_bytes),
                    crate::memory::Bytes(c.exec_bytes),
                    crate::memory::Bytes(budget)
                );
            }
        }
        let tasks = plan_inference(self.loading, &costs);
        let mut dependents = vec![vec![]; tasks.len()];
        for (i, t) in tasks.iter().enumerate() {
            for &d in &t.deps {
                dependents[d].push(i);
            }
        }
        let state = tasks.iter().map(|t| State::Waiting(t.deps.len())).collect();
        let id = self.inferences.len();
        let left = tasks.len();
        // Inferences submitted with the same cost table learn from each other's timings.
        let group = match self
            .observed
            .iter()
            .position(|o| Arc::ptr_eq(&o.costs, &costs))
        {
            Some(g) => g,
            None => {
                self.observed.push(Observed {
                    costs: costs.clone(),
                    load_secs: vec![None; costs.len()],
                    exec_secs: vec![None; costs.len()],
                });
                self.observed.len() - 1
            }
        };
        self.inferences.push(Inference {
            group,
            costs,
            tasks,
            state,
            dependents,
            footprint,
            started: false,
            left,
        });
        self.waiting.push_back(id);
        Ok(id)
    }

    /// Refines the expected duration of a task's layer with one it just took: the estimate
    /// (or profile) only starts the running average.
    pub fn observe(&mut self, t: TaskRef, secs: f64) {
        let inf = &self.inferences[t.inference];
        let observed = &mut self.observed[inf.group];
        let slot = match inf.tasks[t.task].kind {
            TaskKind::Init => return,
            TaskKind::Load(l) => &mut observed.load_secs[l],
            TaskKind::Exec(l) => &mut observed.exec_secs[l],
        };
        *slot = Some(match *slot {
            Some(old) => old + OBSERVATION_WEIGHT * (secs - old),
            None => secs,
        });
    }

    /// Expected duration: observed if the layer has run before, else the given cost.
    pub fn expected_secs(&self, t: TaskRef) -> f64 {
        let inf = &self.inferences[t.inference];
        let observed = &self.observed[inf.group];
        match inf.tasks[t.task].kind {
            TaskKind::Init => 0.0,
            TaskKind::Load(l) => observed.load_secs[l].unwrap_or(inf.costs[l].load_secs),
            TaskKind::Exec(l) => observed.exec_secs[l].unwrap_or(inf.costs[l].exec_secs),
        }
    }

    pub fn kind(&self, t: TaskRef) -> TaskKind {
        self.inferences[t.inference].tasks[t.task].kind
    }

    /// Expected resident bytes of everything loaded or running.
    pub fn ledger(&self) -> u64 {
        self.ledger
    }

    pub fn high_water(&self) -> u64 {
        self.high_water
    }

    /// How often a load was admitted beyond the budget because nothing else was resident
    /// (the one-layer-ahead allowance that keeps progress going).
    pub fn overdrafts(&self) -> u64 {
        self.overdrafts
    }

    pub fn is_done(&self) -> bool {
        self.inferences.iter().all(|i| i.left == 0)
    }

    pub fn is_finished(&self, inference: usize) -> bool {
        self.inferences[inference].left == 0
    }

    /// The next task for a free worker of `pool`, or `None` if it should wait for a
    /// completion. `headroom` is what the live reading still allows beyond the ledger
    /// (bytes), `None` if unbounded.
    pub fn next(&mut self, pool: usize, headroom: Option<u64>) -> Option<TaskRef> {
        self.round += 1;
        let cap = match (self.budget, headroom) {
            (Some(b), Some(h)) => Some(b.saturating_sub(self.ledger).min(h)),
            (Some(b), None) => Some(b.saturating_sub(self.ledger)),
            (None, h) => h,
        };
        self.start_inferences(cap);
        let pick = match self.policy {
            SchedulingPolicy::Mema => self.pick_mema(pool, cap),
            _ => self.pick_greedy(pool),
        }?;
        let inf = &mut self.inferences[pick.inference];
        inf.state[pick.task] = State::Running;
        let cost = match inf.tasks[pick.task].kind {
            TaskKind::Init => 0,
            // A layer's whole footprint, its exec's transient bytes included, is reserved
            // from the start of its load to the end of its exec: an exec is never held
            // back (it frees memory), so its bytes must already be accounted for. The
            // planner's transient copies are reserved until the load ends.
            TaskKind::Load(l) => inf.costs[l].footprint(),
            TaskKind::Exec(_) => 0,
        };
        self.ledger += cost;
        self.high_water = self.high_water.max(self.ledger);
        Some(pick)
    }

    /// Records a finished task: frees a layer's bytes when its exec ends, readies dependents.
    pub fn complete(&mut self, t: TaskRef) {
        let inf = &mut self.inferences[t.inference];
        debug_assert_eq!(inf.state[t.task], State::Running);
        inf.state[t.task] = State::Done;
        inf.left -= 1;
        match inf.tasks[t.task].kind {
            TaskKind::Init => {}
            TaskKind::Load(l) => self.ledger -= inf.costs[l].plan_bytes,
            TaskKind::Exec(l) => self.ledger -= inf.costs[l].loaded(),
        }
        for k in 0..inf.dependents[t.task].len() {
            let d = inf.dependents[t.task][k];
            if let State::Waiting(n) = inf.state[d] {
                inf.state[d] = if n == 1 {
                    State::Ready { since: self.round }
                } else {
                    State::Waiting(n - 1)
                };
            }
        }
        if inf.left == 0 {
            self.in_flight.retain(|&i| i != t.inference);
        }
    }

    /// Starts queued inferences while fewer than `parallel` run and, under MEMA, while the
    /// next one's footprint fits (or nothing runs at all).
    fn start_inferences(&mut self, cap: Option<u64>) {
        while self.in_flight.len() < self.parallel {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let inf = &mut self.inferences[id];
            if self.policy == SchedulingPolicy::Mema
                && !self.in_flight.is_empty()
                && cap.is_some_and(|c| inf.footprint > c)
            {
                break;
            }
            if self.in_flight.push(id).is_err() {
                break; // unreachable: parallel <= MAX_PARALLEL
            }
            self.waiting.pop_front();
            inf.started = true;
            inf.state[0] = State::Ready { since: self.round };
        }
    }

    /// Ready tasks of `pool`, with the round they became ready, oldest inference first.
    fn ready(&self, pool: usize) -> impl Iterator<Item = (TaskRef, u64)> + '_ {
        self.in_flight.iter().flat_map(move |&i| {
            let inf = &self.inferences[i];
            inf.state
                .iter()
                .enumerate()
                .filter_map(move |(t, s)| match s {
                    State::Ready { since } if inf.tasks[t].pool == pool => Some((
                        TaskRef {
                            inference: i,
                            task: t,
                        },
                        *since,
                    )),
                    _ => None,
                })
        })
    }

    fn pick_greedy(&self, pool: usize) -> Option<TaskRef> {
        let dur = |t: &TaskRef| self.expected_secs(*t);
        let ready = self.ready(pool).map(|(t, _)| t);
        match self.policy {
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
            let at = |task| TaskRef { inference: i, task };
            let ready_here = |task: usize| {
                matches!(inf.state[task], State::Ready { .. }) && inf.tasks[task].pool == pool
            };
            if ready_here(0) {
                let _ = out.push(Candidate::Init(at(0)));
                continue;
            }
            let n = inf.costs.len();
            // Within an inference, loads go strictly in layer order: the layer its next
            // exec needs is always loaded before any later one, so resident layers never
            // block their own progress (DeepEye's fc preloads wait for the convs before them).
            let next_load = (0..n).find(|&l| {
                !matches!(
                    inf.state[super::tasks::load_index(l)],
                    State::Running | State::Done
                )
            });
            if let Some(l) = next_load
                && let task = super::tasks::load_index(l)
                && let State::Ready { since } = inf.state[task]
                && inf.tasks[task].pool == pool
            {
                let _ = out.push(Candidate::Load(at(task), l, since));
            }
            if let Some(l) = (0..n).find(|&l| ready_here(super::tasks::exec_index(n, l))) {
                let _ = out.push(Candidate::Exec(at(super::tasks::exec_index(n, l)), l));
            }
        }
        out
    }

    fn pick_mema(&mut self, pool: usize, cap: Option<u64>) -> Option<TaskRef> {
        let candidates = self.mema_candidates(pool);
        // Inits cost nothing; execs free memory: they go first, highest memory throughput
        // (bytes freed per second of work) first.
        if let Some(t) = candidates.iter().find_map(|c| match c {
            Candidate::Init(t) => Some(*t),
            _ => None,
        }) {
            return Some(t);
        }
        let throughput = |t: TaskRef, l: usize| {
            self.inferences[t.inference].costs[l].loaded() as f64 / self.expected_secs(t).max(1e-9)
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
        let (t, _, l) = candidates
            .iter()
            .filter_map(|c| match *c {
                Candidate::Load(t, l, since) => Some((
                    t,
                    (l as u64).saturating_sub((round - since) / AGEING_ROUNDS),
                    l,
                )),
                _ => None,
            })
            .min_by_key(|&(t, key, l)| (key, t.inference, l))?;
        let bytes = self.inferences[t.inference].costs[l].footprint();
        match cap {
            Some(cap) if bytes > cap => {
                // Nothing running and no exec ready: waiting would wait forever. Load one
                // layer ahead anyway (the documented allowance). With in-order loads this
                // happens only with nothing resident, except under `bulk`, which must hold
                // a whole model before its first exec.
                if !self.any_running() && !self.any_ready_exec() {
                    self.overdrafts += 1;
                    Some(t)
                } else {
                    None
                }
            }
            _ => Some(t),
        }
    }

    /// A ready exec in any pool: a worker of another pool is about to free memory.
    fn any_ready_exec(&self) -> bool {
        self.in_flight.iter().any(|&i| {
            let inf = &self.inferences[i];
            inf.tasks.iter().zip(&inf.state).any(|(t, s)| {
                matches!(t.kind, TaskKind::Exec(_)) && matches!(s, State::Ready { .. })
            })
        })
    }

    fn any_running(&self) -> bool {
        self.in_flight
            .iter()
            .any(|&i| self.inferences[i].state.contains(&State::Running))
    }
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
        while !s.is_done() {
            steps += 1;
            assert!(steps < 1_000_000, "no progress");
            for (pool, &count) in workers.iter().enumerate() {
                while busy.iter().filter(|b| b.1 == pool).count() < count {
                    let Some(t) = s.next(pool, None) else { break };
                    let inf = &s.inferences[t.inference];
                    for &d in &inf.tasks[t.task].deps {
                        assert_eq!(inf.state[d], State::Done, "dependency not done");
                    }
                    if let TaskKind::Exec(l) = inf.tasks[t.task].kind {
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
            assert_eq!(
                *e,
                (0..s.inferences[i].costs.len()).collect::<Vec<_>>(),
                "inference {i} ran its layers out of order"
            );
        }
        assert_eq!(s.ledger, 0, "everything freed at the end");
        (now, finished)
    }

    const LOADINGS: [LoadingPolicy; 4] = LoadingPolicy::ALL;
    const SCHEDULERS: [SchedulingPolicy; 4] = SchedulingPolicy::ALL;

    #[test]
    fn every_combination_completes_in_dependency_order() {
        for loading in LOADINGS {
            for policy in SCHEDULERS {
                for parallel in 1..=3 {
                    let mut s = Scheduler::new(policy, loading, Some(64 << 20), parallel);
                    for k in 0..5 {
                        s.submit("net", costs(4 + k, 4, 2 + k)).unwrap();
                    }
                    simulate(&mut s, [parallel, 1], Some(64 << 20), false);
                }
            }
        }
    }

    #[test]
    fn mema_keeps_the_ledger_within_the_budget() {
        for loading in [
            LoadingPolicy::Linear,
            LoadingPolicy::DeepEye,
            LoadingPolicy::Partial,
        ] {
            let budget = 24 << 20;
            let mut s = Scheduler::new(SchedulingPolicy::Mema, loading, Some(budget), 3);
            for k in 0..6 {
                s.submit("net", costs(6 + k, 5, 4)).unwrap();
            }
            simulate(&mut s, [3, 1], Some(budget), true);
            assert!(
                s.high_water() <= budget,
                "{loading:?}: high water {}",
                s.high_water()
            );
            assert_eq!(s.overdrafts(), 0);
        }
    }

    #[test]
    fn bulk_under_a_small_budget_overdraws_rather_than_deadlocks() {
        let budget = 24 << 20;
        let mut s = Scheduler::new(SchedulingPolicy::Mema, LoadingPolicy::Bulk, Some(budget), 2);
        for k in 0..3 {
            s.submit("net", costs(6 + k, 5, 4)).unwrap();
        }
        simulate(&mut s, [2, 1], Some(budget), false);
        assert!(s.overdrafts() > 0 && s.high_water() > budget);
    }

    #[test]
    fn a_shrinking_live_limit_makes_mema_wait() {
        let mut s = Scheduler::new(
            SchedulingPolicy::Mema,
            LoadingPolicy::Partial,
            Some(1 << 30),
            1,
        );
        s.submit("net", costs(3, 4, 3)).unwrap();
        let init = s.next(0, Some(1 << 30)).unwrap();
        s.complete(init);
        let load = s.next(0, Some(1 << 30)).unwrap();
        assert_eq!(s.kind(load), TaskKind::Load(0));
        // The cgroup limit drops: 1 MiB left. Layer 1 (5 MiB) must wait, though the
        // budget flag would allow it.
        assert_eq!(s.next(0, Some(1 << 20)), None);
        s.complete(load);
        let exec = s.next(0, Some(1 << 20)).unwrap();
        assert_eq!(s.kind(exec), TaskKind::Exec(0));
        assert_eq!(s.next(0, Some(1 << 20)), None);
        s.complete(exec);
        // Room again.
        let next = s.next(0, Some(1 << 30)).unwrap();
        assert_eq!(s.kind(next), TaskKind::Load(1));
    }

    #[test]
    fn observed_durations_refine_the_estimates() {
        let mut s = Scheduler::new(SchedulingPolicy::Sjf, LoadingPolicy::Partial, None, 2);
        let shared = costs(2, 1, 2);
        let a = s.submit("net", shared.clone()).unwrap();
        let b = s.submit("net", shared).unwrap();
        let load = TaskRef {
            inference: a,
            task: super::super::tasks::load_index(1),
        };
        let twin = TaskRef {
            inference: b,
            task: load.task,
        };
        assert_eq!(s.expected_secs(twin), 0.004);
        s.observe(load, 1.0);
        assert_eq!(
            s.expected_secs(twin),
            1.0,
            "same package, same cost table: learnt"
        );
        s.observe(load, 0.0);
        assert!(
            (s.expected_secs(twin) - 0.7).abs() < 1e-12,
            "a running average, not the last value"
        );
        let other = s.submit("net", costs(2, 1, 2)).unwrap();
        assert_eq!(
            s.expected_secs(TaskRef {
                inference: other,
                task: load.task
            }),
            0.004
        );
    }

    #[test]
    fn one_layer_ahead_when_nothing_is_resident() {
        // The live reading says nothing fits, but nothing of ours is resident either:
        // waiting would never end. One load goes ahead; the next waits.
        let mut s = Scheduler::new(
            SchedulingPolicy::Mema,
            LoadingPolicy::Partial,
            Some(1 << 30),
            1,
        );
        s.submit("net", costs(3, 4, 3)).unwrap();
        let init = s.next(0, Some(0)).unwrap();
        s.complete(init);
        let load = s.next(0, Some(0)).unwrap();
        assert_eq!(s.kind(load), TaskKind::Load(0));
        assert_eq!(s.overdrafts(), 1);
        assert_eq!(s.next(0, Some(0)), None);
    }

    #[test]
    fn a_layer_larger_than_the_budget_is_refused() {
        let mut s = Scheduler::new(
            SchedulingPolicy::Mema,
            LoadingPolicy::Partial,
            Some(8 << 20),
            1,
        );
        let err = s.submit("facenet", costs(3, 9, 3)).unwrap_err().to_string();
        assert!(
            err.contains("facenet: layer 0") && err.contains("budget"),
            "{err}"
        );
    }

    #[test]
    fn no_starvation_under_a_stream_of_200_mixed_inferences() {
        for policy in SCHEDULERS {
            let budget = 40 << 20;
            let mut s = Scheduler::new(policy, LoadingPolicy::Partial, Some(budget), 3);
            let mut sizes = vec![];
            for k in 0..200 {
                let n = 2 + (k * 13) % 9;
                sizes.push(n);
                s.submit("net", costs(n, 2 + (k as u64 % 4), n - 1))
                    .unwrap();
            }
            let (makespan, finished) = simulate(
                &mut s,
                [3, 1],
                Some(budget),
                policy == SchedulingPolicy::Mema,
            );
            assert!(finished.iter().all(|f| f.is_finite()));
            // Inferences start in submission order, at most 3 at a time, so none can finish
            // later than a bounded window after those submitted just after it.
            for (k, f) in finished.iter().enumerate().skip(10) {
                let later = finished[k + 1..]
                    .iter()
                    .take(10)
                    .cloned()
                    .fold(f64::INFINITY, f64::min);
                if later.is_finite() {
                    assert!(
                        *f <= later + makespan / 20.0,
                        "{policy:?}: inference {k} starved ({f} vs {later})"
                    );
                }
            }
        }
    }
}
