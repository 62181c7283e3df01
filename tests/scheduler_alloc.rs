//! A scheduling decision must not allocate: workers take it under a lock, on a board whose
//! memory is mostly promised to layers. The library's counting allocator checks `next` and `complete`
//! over whole batches, for every policy.

use memaflow::model::LayerKind;
use memaflow::runtime::{
    Decision, Eviction, LayerCache, LayerCost, LoadingPolicy, Scheduler, SchedulerOptions,
    SchedulingPolicy,
};
use std::sync::Arc;

/// Counted by the library's own global allocator (`memory::heap`).
fn allocations() -> u64 {
    memaflow::memory::heap::allocations_by_this_thread()
}

#[test]
fn decisions_do_not_allocate() {
    let costs: Arc<[LayerCost]> = (0..12)
        .map(|i| LayerCost {
            kind: if i >= 8 {
                LayerKind::Fc
            } else {
                LayerKind::Conv
            },
            load_bytes: (2 + i % 3) << 20,
            plan_bytes: 1 << 20,
            exec_bytes: 1 << 20,
            load_secs: 0.002,
            exec_secs: 0.001,
        })
        .collect();
    for cache in [LayerCache::Off, LayerCache::Keep] {
        for loading in LoadingPolicy::ALL {
            for policy in SchedulingPolicy::ALL {
                let decisions = run_counted(policy, loading, cache, &costs);
                assert_eq!(
                    decisions.1, 0,
                    "{cache:?}/{loading:?}/{policy:?}: {} decisions allocated",
                    decisions.0
                );
            }
        }
    }
}

/// Runs 20 inferences of one model through a scheduler; returns the decisions taken and
/// the allocations made while taking them (the set-up may allocate).
fn run_counted(
    policy: SchedulingPolicy,
    loading: LoadingPolicy,
    cache: LayerCache,
    costs: &Arc<[LayerCost]>,
) -> (u64, u64) {
    let mut s = Scheduler::new(SchedulerOptions {
        policy,
        loading,
        budget: Some(24 << 20),
        parallel: 3,
        cache,
        eviction: Eviction::FurthestAhead,
    });
    let model = s
        .add_model("net", costs.clone(), vec![1 << 20; costs.len() + 1], true)
        .unwrap();
    for _ in 0..20 {
        s.submit(model);
    }
    let mut running = Vec::with_capacity(64);
    let mut decisions = 0;
    let before = allocations();
    while !s.is_idle() {
        for pool in 0..2 {
            while running.len() < 4 {
                match s.next(pool, Some(16 << 20)) {
                    Some(Decision::Run(t)) => running.push(t),
                    // `bulk` cannot hold a whole model in 16 MiB: refused, also without
                    // allocating.
                    Some(Decision::Refuse(..)) => {}
                    None => break,
                }
                s.take_evicted().for_each(drop);
                decisions += 1;
            }
        }
        if running.is_empty() {
            continue;
        }
        // Oldest first, as if every task took as long.
        let t = running.remove(0);
        s.observe(t, 0.001);
        s.complete(t);
    }
    (decisions, allocations() - before)
}
