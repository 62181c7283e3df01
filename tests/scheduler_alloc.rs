//! A scheduling decision must not allocate: workers take it under a lock, on a board whose
//! memory is mostly promised to layers. A counting allocator checks `next` and `complete`
//! over whole batches, for every policy.

use memaflow::model::LayerKind;
use memaflow::runtime::{LayerCost, LoadingPolicy, Scheduler, SchedulingPolicy};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; the counter is a
// thread-local `Cell` with a const initialiser, which never allocates or re-enters.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(|c| c.get())
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
    for loading in LoadingPolicy::ALL {
        for policy in SchedulingPolicy::ALL {
            let mut s = Scheduler::new(policy, loading, Some(24 << 20), 3);
            for _ in 0..20 {
                s.submit("net", costs.clone()).unwrap();
            }
            let mut running = Vec::with_capacity(64);
            let mut decisions = 0;
            let before = allocations();
            while !s.is_done() {
                for pool in 0..2 {
                    while running.len() < 4 {
                        let Some(t) = s.next(pool, Some(16 << 20)) else {
                            break;
                        };
                        running.push(t);
                        decisions += 1;
                    }
                }
                // Oldest first, as if every task took as long.
                let t = running.remove(0);
                s.observe(t, 0.001);
                s.complete(t);
            }
            assert_eq!(
                allocations() - before,
                0,
                "{loading:?}/{policy:?}: {decisions} decisions allocated"
            );
        }
    }
}
