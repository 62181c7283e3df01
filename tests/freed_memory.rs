//! The daemon bounds what glibc's heap keeps of freed buffers by measuring it
//! (`memory::freed_resident_bytes`). One test in its own process: the measure is the whole
//! process's, and tests running beside it would move it.

/// Buffers under glibc's mmap threshold, so that they come from the heap.
const BLOCK: usize = 64 << 10;
const BLOCKS: usize = 256; // 16 MiB, half of it freed

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn freed_heap_memory_is_measured_until_trimmed() {
    use memaflow::memory::freed_resident_bytes;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    // Touched (non-zero) so that every page is resident.
    let mut blocks: Vec<Vec<u8>> = (0..BLOCKS).map(|i| vec![i as u8 | 1; BLOCK]).collect();
    let held = freed_resident_bytes().expect("measured on glibc");
    // Every other block: the freed ones lie between live ones, as a cached layer's
    // neighbours do, where glibc cannot give them back on its own.
    let kept: Vec<Vec<u8>> = blocks.drain(..).step_by(2).collect();
    let freed = freed_resident_bytes().expect("measured on glibc");
    let total = (BLOCK * BLOCKS / 2) as u64;
    assert!(
        freed >= held + total / 2,
        "8 MiB freed into the heap: {:.1} MiB measured before, {:.1} MiB after",
        mib(held),
        mib(freed)
    );
    // SAFETY: malloc_trim only hands free pages back to the kernel.
    unsafe { nix::libc::malloc_trim(0) };
    let trimmed = freed_resident_bytes().expect("measured on glibc");
    assert!(
        trimmed + total / 2 <= freed,
        "a trim returns what the heap kept: {:.1} MiB before, {:.1} MiB after",
        mib(freed),
        mib(trimmed)
    );
    assert_eq!(std::hint::black_box(kept).len(), BLOCKS / 2);
}
