//! Heap bytes a thread allocates and keeps: how big an object built on one thread really
//! is. RSS readings are page-grained and see every thread at once; a layer's plan template
//! (tens of kilobytes of graph) is counted in the ledger by what building it kept.
//!
//! The same allocator can keep freed large blocks for reuse ([`keep_freed_blocks`]):
//! musl's allocator unmaps them on free, and a daemon with memory to spare would fault in
//! and zero every frame's buffers again (docs/runtime.md, "Freed buffers in the daemon").

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

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

// SAFETY: every block comes from `System`, which upholds the `GlobalAlloc` contract, with
// the caller's layout or the same layout with its size rounded up to its class
// (`in_class`, a function of the layout alone), and goes back to `System` with that same
// rounded layout, or into `KEPT`, which hands it out again only for a layout of that very
// class and alignment, to one caller, and never touches its bytes (a zeroed request is
// zeroed here). The counting touches only a thread-local integer and `KEPT` a spin lock and
// a fixed array; neither allocates or unwinds. The methods are not inlined: fat LTO would
// copy the counting into every allocation site of the program (hundreds of KiB of firmware
// for nothing; a call costs a branch).
unsafe impl GlobalAlloc for CountingAllocator {
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let system = in_class(layout);
        if let Some(p) = KEPT.take(system) {
            return allocated(p, layout.size());
        }
        // SAFETY: the caller's contract for `alloc` holds for `system`, which only rounds
        // its size up.
        allocated(unsafe { System.alloc(system) }, layout.size())
    }

    #[inline(never)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let system = in_class(layout);
        if let Some(p) = KEPT.take(system) {
            // SAFETY: `p` is a live block of at least `layout.size()` bytes that nobody else
            // holds (`KeptBlocks::take` gave it out once).
            unsafe { p.write_bytes(0, layout.size()) };
            return allocated(p, layout.size());
        }
        // SAFETY: as for `alloc`.
        allocated(unsafe { System.alloc_zeroed(system) }, layout.size())
    }

    #[inline(never)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as i64));
        let system = in_class(layout);
        if KEPT.keep(ptr, system) {
            return;
        }
        // SAFETY: `ptr` was allocated by `System` with `system` (every allocation above is,
        // `in_class` being a function of the layout, and a kept block is handed out again
        // only for its own).
        unsafe { System.dealloc(ptr, system) };
    }

    #[inline(never)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_allocation();
        let old = in_class(layout);
        let new = class_size(new_size, layout.align());
        if new == old.size() {
            // Same class: the block already holds `new_size` bytes.
            count(new_size as i64 - layout.size() as i64);
            return ptr;
        }
        // SAFETY: `ptr` was allocated by `System` with `old` (see `dealloc`); `new` is
        // nonzero and, rounded to the alignment, does not overflow `isize` (`class_size`
        // only rounds up sizes that `Layout` accepted).
        let p = unsafe { System.realloc(ptr, old, new) };
        if !p.is_null() {
            count(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

/// Whether large blocks are allocated in size classes (see `class_size`): where freed
/// blocks may be kept for reuse, which is musl only (`super::reuse_freed_memory`).
const SIZE_CLASSES: bool = cfg!(target_env = "musl");

/// The size a block of `size` bytes is allocated with: below `KEPT_BLOCK_MIN` itself,
/// above it rounded up to the next eighth of a power of two (at most an eighth more), so
/// that a kept block serves every request of its class and not only of its exact size.
/// Blocks whose rounded size would not make a valid layout keep their size.
fn class_size(size: usize, align: usize) -> usize {
    if !SIZE_CLASSES {
        return size;
    }
    rounded_to_class(size, align)
}

fn rounded_to_class(size: usize, align: usize) -> usize {
    if size < KEPT_BLOCK_MIN {
        return size;
    }
    let step = 1usize << (usize::BITS - 1 - size.leading_zeros() - 3);
    match size.checked_next_multiple_of(step) {
        Some(rounded) if Layout::from_size_align(rounded, align).is_ok() => rounded,
        _ => size,
    }
}

/// `layout` with its size rounded to its class. Every allocation comes through here: the
/// layouts that keep their size (all of them without size classes) return at once.
fn in_class(layout: Layout) -> Layout {
    if !SIZE_CLASSES || layout.size() < KEPT_BLOCK_MIN {
        return layout;
    }
    Layout::from_size_align(class_size(layout.size(), layout.align()), layout.align())
        .unwrap_or(layout)
}

/// Freed blocks of at least this size may be kept for reuse: musl's allocator maps each
/// block over about 128 KiB on its own and unmaps it on free, so every activation of a
/// frame would otherwise be faulted in and zeroed page by page, every frame.
const KEPT_BLOCK_MIN: usize = 128 << 10;

/// Attempts at the kept blocks' lock an allocation makes before it does without them (a
/// miss, or the block freed): an allocator that never waits unboundedly, and whose
/// calls the compiler can see return.
const ALLOCATOR_TRIES: usize = 64;

/// Blocks kept at most: a frame's distinct activation and weight sizes.
const KEPT_SLOTS: usize = 128;

#[derive(Clone, Copy)]
struct KeptBlock {
    /// Null: the slot is empty.
    ptr: *mut u8,
    /// Its layout's size and alignment (not a `Layout`, so that the empty array is all
    /// zeros and takes no room in the firmware's file).
    size: usize,
    align: usize,
}

impl KeptBlock {
    fn is(&self, layout: Layout) -> bool {
        !self.ptr.is_null() && self.size == layout.size() && self.align == layout.align()
    }

    fn layout(&self) -> Layout {
        // SAFETY: `size` and `align` were copied from a `Layout` (`KeptBlocks::keep`), which
        // checked them.
        unsafe { Layout::from_size_align_unchecked(self.size, self.align) }
    }
}

/// Freed large blocks kept (up to a byte limit, off by default) and handed back for an
/// allocation of their layout (size class and alignment); see [`keep_freed_blocks`].
struct KeptBlocks {
    lock: AtomicBool,
    slots: UnsafeCell<[KeptBlock; KEPT_SLOTS]>,
    /// Bytes in the slots.
    bytes: AtomicUsize,
    /// At most this many bytes are kept; 0: none.
    limit: AtomicUsize,
}

// SAFETY: `slots` is only read or written inside `KeptBlocks::locked`, which holds `lock`
// (acquired with Acquire, released with Release) for the whole access: one thread at a time.
// The raw pointers it holds are blocks no thread uses while they are kept.
unsafe impl Sync for KeptBlocks {}

static KEPT: KeptBlocks = KeptBlocks::new();

impl KeptBlocks {
    const fn new() -> KeptBlocks {
        KeptBlocks {
            lock: AtomicBool::new(false),
            slots: UnsafeCell::new(
                [KeptBlock {
                    ptr: std::ptr::null_mut(),
                    size: 0,
                    align: 0,
                }; KEPT_SLOTS],
            ),
            bytes: AtomicUsize::new(0),
            limit: AtomicUsize::new(0),
        }
    }

    /// Runs `f` on the slots under the spin lock, or gives up after `tries` attempts to
    /// take it (`None`). `f` must not allocate (the allocator calls this) and does not: it
    /// only scans and writes the fixed array.
    fn locked<R>(
        &self,
        tries: usize,
        f: impl FnOnce(&mut [KeptBlock; KEPT_SLOTS]) -> R,
    ) -> Option<R> {
        let mut attempts = 0;
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            attempts += 1;
            if attempts >= tries {
                return None;
            }
            std::hint::spin_loop();
        }
        // SAFETY: the lock is held until the store below, so this is the only reference to
        // the slots meanwhile (see `unsafe impl Sync`).
        let result = f(unsafe { &mut *self.slots.get() });
        self.lock.store(false, Ordering::Release);
        Some(result)
    }

    /// A kept block of exactly `layout`, no longer kept.
    fn take(&self, layout: Layout) -> Option<*mut u8> {
        if layout.size() < KEPT_BLOCK_MIN || self.bytes.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.locked(ALLOCATOR_TRIES, |slots| {
            let slot = slots.iter_mut().find(|b| b.is(layout))?;
            let ptr = std::mem::replace(&mut slot.ptr, std::ptr::null_mut());
            self.bytes.fetch_sub(layout.size(), Ordering::Relaxed);
            Some(ptr)
        })
        .flatten()
    }

    /// Keeps the freed block `ptr` if it is large and fits the limit; false: free it.
    fn keep(&self, ptr: *mut u8, layout: Layout) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        if layout.size() < KEPT_BLOCK_MIN || layout.size() > limit {
            return false;
        }
        self.locked(ALLOCATOR_TRIES, |slots| {
            // Read again under the lock: once `keep_freed_blocks(0)` stored 0, a block is
            // either refused here or kept before its drain takes the lock.
            let limit = self.limit.load(Ordering::Relaxed);
            if self.bytes.load(Ordering::Relaxed) + layout.size() > limit {
                return false;
            }
            let Some(slot) = slots.iter_mut().find(|b| b.ptr.is_null()) else {
                return false;
            };
            *slot = KeptBlock {
                ptr,
                size: layout.size(),
                align: layout.align(),
            };
            self.bytes.fetch_add(layout.size(), Ordering::Relaxed);
            true
        })
        .unwrap_or(false)
    }

    /// Any one kept block, no longer kept. Always under the lock (no look at `bytes`
    /// first): a block kept just before the limit fell to 0 is seen here.
    fn take_any(&self) -> Option<KeptBlock> {
        self.locked(usize::MAX, |slots| {
            let slot = slots.iter_mut().find(|b| !b.ptr.is_null())?;
            let block = *slot;
            slot.ptr = std::ptr::null_mut();
            self.bytes.fetch_sub(block.size, Ordering::Relaxed);
            Some(block)
        })
        .flatten()
    }
}

/// From now on freed blocks of 128 KiB or more are kept, up to `limit` bytes in all, and
/// an allocation of a kept block's size and alignment gets it back: no page faults, no
/// zeroing by the kernel. For memory that is plentiful (what glibc's heap does on its own);
/// `limit` 0 stops it and hands back what was kept.
pub fn keep_freed_blocks(limit: usize) {
    KEPT.limit.store(limit, Ordering::Relaxed);
    if limit == 0 {
        release_kept_blocks();
    }
}

/// Hands every kept block back to the system allocator (and so, for large blocks, to the
/// kernel).
pub fn release_kept_blocks() {
    while let Some(block) = KEPT.take_any() {
        // SAFETY: a kept block came from `System` with this layout and nobody holds it.
        unsafe { System.dealloc(block.ptr, block.layout()) };
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

    /// A block that `KeptBlocks` only stores and returns, never dereferences.
    fn fake(address: usize) -> *mut u8 {
        std::ptr::without_provenance_mut(address)
    }

    #[test]
    fn a_kept_block_comes_back_only_for_its_own_layout_and_within_the_limit() {
        let kept = KeptBlocks::new();
        let mib = Layout::from_size_align(1 << 20, 64).unwrap();
        let small = Layout::from_size_align(KEPT_BLOCK_MIN - 1, 8).unwrap();
        assert!(!kept.keep(fake(0x10000), mib), "kept with no limit set");
        kept.limit.store(3 << 20, Ordering::Relaxed);
        assert!(
            !kept.keep(fake(0x20000), small),
            "a small block is the allocator's"
        );
        assert!(kept.keep(fake(0x100000), mib));
        assert!(kept.keep(fake(0x300000), mib));
        let two = Layout::from_size_align(2 << 20, 64).unwrap();
        assert!(!kept.keep(fake(0x500000), two), "over the limit");
        assert_eq!(kept.bytes.load(Ordering::Relaxed), 2 << 20);
        let other_align = Layout::from_size_align(1 << 20, 4096).unwrap();
        assert_eq!(kept.take(other_align), None);
        assert_eq!(kept.take(two), None);
        let first = kept.take(mib).expect("a block of its layout");
        let second = kept.take(mib).expect("and the other");
        assert_ne!(first, second);
        assert_eq!(kept.take(mib), None, "each block is given out once");
        assert_eq!(kept.bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn size_classes_round_large_blocks_up_by_at_most_an_eighth() {
        assert_eq!(rounded_to_class(KEPT_BLOCK_MIN - 1, 8), KEPT_BLOCK_MIN - 1);
        assert_eq!(rounded_to_class(KEPT_BLOCK_MIN, 8), KEPT_BLOCK_MIN);
        assert_eq!(rounded_to_class(1 << 20, 64), 1 << 20);
        assert_eq!(rounded_to_class((1 << 20) + 1, 64), (1 << 20) + (1 << 17));
        for size in (KEPT_BLOCK_MIN..64 << 20).step_by(12_345) {
            let rounded = rounded_to_class(size, 16);
            assert!(
                rounded >= size && rounded - size <= size / 8,
                "{size} -> {rounded}"
            );
            assert_eq!(
                rounded_to_class(rounded, 16),
                rounded,
                "a class size is its own class"
            );
        }
        // A size that cannot be rounded within a valid layout stays as it is.
        let huge = isize::MAX as usize - 100;
        assert_eq!(rounded_to_class(huge, 8), huge);
    }

    #[test]
    fn every_kept_block_is_handed_back_once() {
        let kept = KeptBlocks::new();
        kept.limit.store(usize::MAX, Ordering::Relaxed);
        let mib = Layout::from_size_align(1 << 20, 8).unwrap();
        for i in 0..KEPT_SLOTS + 3 {
            let kept_it = kept.keep(fake((i + 1) << 21), mib);
            assert_eq!(
                kept_it,
                i < KEPT_SLOTS,
                "block {i}: the slots are full after {KEPT_SLOTS}"
            );
        }
        let mut back = std::collections::HashSet::new();
        while let Some(b) = kept.take_any() {
            assert!(back.insert(b.ptr as usize), "handed back twice");
        }
        assert_eq!(back.len(), KEPT_SLOTS);
        assert_eq!(kept.bytes.load(Ordering::Relaxed), 0);
    }

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
