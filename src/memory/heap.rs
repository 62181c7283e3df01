//! Heap bytes a thread allocates and keeps: how big an object built on one thread really
//! is. RSS readings are page-grained and see every thread at once; a layer's plan template
//! (tens of kilobytes of graph) is counted in the ledger by what building it kept.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting each thread's allocated-minus-freed bytes.
pub struct CountingAllocator;

thread_local! {
    // Constant-initialised and without a destructor: reading it never allocates, so the
    // allocator may use it, even while the thread is being torn down.
    static NET_BYTES: Cell<i64> = const { Cell::new(0) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count(delta: i64) {
    let _ = NET_BYTES.try_with(|n| n.set(n.get().wrapping_add(delta)));
}

fn count_allocation() {
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get().wrapping_add(1)));
}

/// Counts an allocation of `size` bytes that returned `p`.
fn allocated(p: *mut u8, size: usize) -> *mut u8 {
    count_allocation();
    if !p.is_null() {
        count(size as i64);
    }
    p
}

/// Allocations (and reallocations) this thread has made so far: a scheduling decision,
/// taken under the executor's lock, must make none (`tests/scheduler_alloc.rs`).
pub fn allocations_by_this_thread() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

// SAFETY: every method forwards its arguments unchanged to `System`, which upholds the
// `GlobalAlloc` contract; the counting touches only a thread-local integer and never
// allocates or unwinds. The methods are not inlined: fat LTO would copy the counting into
// every allocation site of the program (hundreds of KiB of firmware for nothing; a call
// costs a branch).
unsafe impl GlobalAlloc for CountingAllocator {
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        allocated(unsafe { System.alloc(layout) }, layout.size())
    }

    #[inline(never)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        allocated(unsafe { System.alloc_zeroed(layout) }, layout.size())
    }

    #[inline(never)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation above is).
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as i64));
    }

    #[inline(never)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`, and `new_size` is the caller's, passed on unchanged.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        count_allocation();
        if !p.is_null() {
            count(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

/// Runs `f` and returns what it returned with the heap bytes this thread allocated during
/// it and had not freed at its end (0 if it freed more than it allocated).
pub fn kept_by<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = NET_BYTES.with(Cell::get);
    let value = f();
    let after = NET_BYTES.with(Cell::get);
    (value, after.saturating_sub(before).max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_closure_keeps_is_counted_and_what_it_frees_is_not() {
        let (kept, bytes) = kept_by(|| {
            let scratch = vec![0u8; 1 << 20];
            std::hint::black_box(&scratch);
            vec![1u64; 4096]
        });
        assert_eq!(kept.len(), 4096);
        assert!(
            (32_768..32_768 + 1024).contains(&bytes),
            "kept {bytes} bytes for a 32 KiB vector"
        );
    }
}
