//! Memory readings: this process (`/proc/self/status`) and the system (`/proc/meminfo`,
//! memory cgroups v1 and v2), for the memory gate.

use anyhow::{Context, Result};

pub mod heap;
mod mapped;
mod system;
pub use mapped::{Released, release_start_up};
pub use system::{Cgroup, CgroupVersion, Reading, SystemMemory};

/// Resident set of a process, from `/proc/<pid>/status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProcessMemory {
    /// `VmRSS`, bytes.
    pub rss: u64,
    /// `VmHWM`: the high-water mark of the resident set, bytes.
    pub peak_rss: u64,
}

pub(crate) fn process_memory() -> Result<ProcessMemory> {
    let text = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    parse_status(&text)
}

/// Parses the `VmRSS` and `VmHWM` lines of a `/proc/<pid>/status` file (tests read
/// another process's with it).
pub fn parse_status(text: &str) -> Result<ProcessMemory> {
    let field = |key: &str| -> Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(key))
            .with_context(|| format!("no {key} in /proc status"))?;
        let kib: u64 = line[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("bad {key} line: {line}"))?;
        Ok(kib * 1024)
    };
    Ok(ProcessMemory {
        rss: field("VmRSS:")?,
        peak_rss: field("VmHWM:")?,
    })
}

/// Makes freed layer weights leave the process instead of staying in the allocator.
///
/// glibc raises its mmap threshold to the size of the largest block freed (up to 32 MiB),
/// after which layer-sized buffers come from the heap and their memory stays resident
/// after they are dropped: a budget of 128 MiB then peaks far above it. A fixed threshold
/// keeps every buffer of 1 MiB or more in its own mapping, unmapped on free. musl (the
/// firmware build) already unmaps large blocks, so the threshold is glibc only; there this
/// ends [`reuse_freed_memory`] and hands back the blocks it kept. The price is a page fault
/// and a zeroed page for every page of every large buffer, every time: a daemon, which
/// runs the same layers frame after frame, keeps some instead
/// ([`keep_buffers_between_frames`]).
pub fn return_freed_memory_promptly() {
    heap::keep_freed_blocks(0);
    set_mmap_threshold(PROMPT_MMAP_THRESHOLD);
    KEEP_BUFFERS.store(false, std::sync::atomic::Ordering::Relaxed);
}

/// [`return_freed_memory_promptly`] for a daemon under a budget, which runs the same layers
/// frame after frame: buffers under 2 MiB (most activations, a reload's file bytes) come
/// from glibc's heap, and what the heap keeps of them once freed serves the next layer's
/// without page faults or zeroing. It is memory the ledger does not count, bounded by
/// [`KEPT_FREED_MAX`]: the executor measures it ([`kept_freed_bytes`]) and trims the heap
/// once it holds more, or once the memory reading has no room for it to grow to its bound
/// beyond what the budget still admits; where even a trimmed heap would not leave that
/// room, it calls [`return_freed_memory_promptly`]. At half the stream benchmark's working
/// set, 1.15x the frame rate for about 3 MiB more peak RSS (docs/results.md). On musl this
/// is [`return_freed_memory_promptly`]: large blocks are unmapped on free.
pub fn keep_buffers_between_frames() {
    heap::keep_freed_blocks(0);
    set_mmap_threshold(KEPT_MMAP_THRESHOLD);
    KEEP_BUFFERS.store(true, std::sync::atomic::Ordering::Relaxed);
}

static KEEP_BUFFERS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Blocks of this size or more get their own mapping, unmapped on free (glibc).
const PROMPT_MMAP_THRESHOLD: i32 = 1 << 20;
/// The same, for a daemon keeping its buffers between frames: 1-2 MiB activations and
/// file reads were a third of its page faults.
const KEPT_MMAP_THRESHOLD: i32 = 2 << 20;

/// Freed memory the heap may keep resident for a daemon's next frames
/// ([`keep_buffers_between_frames`]): memory the ledger does not count, bounded here.
/// Unbounded, the heap of the stream benchmark at half its working set came to keep 20-25
/// MiB (freed buffers between cached layers; peak RSS over the benchmark's bound). A trim
/// returns all of it, to be faulted in again, so the frame rate falls quickly with the
/// bound: 12, 16 and 20 MiB gave 3.1x, 3.3x and 4.4x the issue day's frame rate at 50 %,
/// for 48.1, 50.3 and 51.7 MiB peak RSS against the bound's 53.5 (docs/results.md).
pub const KEPT_FREED_MAX: u64 = 16 << 20;

fn set_mmap_threshold(bytes: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator tunables, with values in the documented ranges.
    // glibc's manual marks it MT-Unsafe for initialisation only ("init"): the allocator
    // is initialised by the process's first allocation, long before any caller here, and
    // after that mallopt changes the tunables under the main arena's lock.
    unsafe {
        use nix::libc::{M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, mallopt};
        mallopt(M_MMAP_THRESHOLD, bytes);
        mallopt(M_TRIM_THRESHOLD, 4 << 20);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = bytes;
}

/// The freed memory the heap keeps resident, where [`keep_buffers_between_frames`] is in
/// force and glibc can tell; `None` otherwise (the caller trims by its own rule).
pub(crate) fn kept_freed_bytes() -> Option<u64> {
    if !KEEP_BUFFERS.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    freed_resident_bytes()
}

/// Freed memory resident in glibc's heaps: the process's anonymous resident pages less
/// what its live allocations hold, in the heaps and in mappings of their own. The few
/// MiB of anonymous memory malloc does not own (thread stacks, relocated constants) count
/// as freed: it over-states what a trim returns, on the side of trimming. Allocates
/// nothing (the executor calls it under its lock).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn freed_resident_bytes() -> Option<u64> {
    use std::io::Read;
    let mut statm = [0u8; 128];
    let n = std::fs::File::open("/proc/self/statm")
        .and_then(|mut f| f.read(&mut statm))
        .ok()?;
    // SAFETY: sysconf reads a constant of the running system; no memory is involved.
    let page = u64::try_from(unsafe { nix::libc::sysconf(nix::libc::_SC_PAGESIZE) }).ok()?;
    let anonymous = anonymous_pages(std::str::from_utf8(&statm[..n]).ok()?)? * page;
    // SAFETY: mallinfo2 only reads the allocator's statistics, under its own arena locks,
    // and returns them by value.
    let info = unsafe { nix::libc::mallinfo2() };
    let held = u64::try_from(info.uordblks.saturating_add(info.hblkhd)).ok()?;
    Some(anonymous.saturating_sub(held))
}

/// Freed memory resident in the allocator's heaps: known on glibc only. musl unmaps large
/// blocks on free, and the daemon keeps no buffers there.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn freed_resident_bytes() -> Option<u64> {
    None
}

/// Anonymous resident pages from a `/proc/<pid>/statm` line: resident less file-backed
/// and shared.
#[cfg(any(test, all(target_os = "linux", target_env = "gnu")))]
fn anonymous_pages(statm: &str) -> Option<u64> {
    let mut fields = statm
        .split_ascii_whitespace()
        .map(|f| f.parse::<u64>().ok());
    let resident = fields.nth(1)??;
    let file_and_shared = fields.next()??;
    Some(resident.saturating_sub(file_and_shared))
}

/// Bytes of freed large blocks kept for reuse while memory is plentiful (musl only).
#[cfg(target_env = "musl")]
const KEPT_WHILE_PLENTIFUL: usize = 64 << 20;

/// Keeps freed buffers in the process for the next frame's, while memory is plentiful.
/// glibc does so on its own (its heap keeps what is freed, its mmap threshold rising to
/// the largest block freed); musl unmaps every block over about 128 KiB at once, so there
/// the global allocator keeps freed blocks of that size, up to `KEPT_WHILE_PLENTIFUL`
/// bytes, and gives each back for an allocation of its size class and alignment: a frame's
/// activations and reloaded weights come back without page faults or zeroing.
/// [`return_freed_memory_promptly`] ends it.
pub fn reuse_freed_memory() {
    #[cfg(target_env = "musl")]
    heap::keep_freed_blocks(KEPT_WHILE_PLENTIFUL);
}

/// Hands free pages inside glibc's heap, and the freed blocks kept for reuse
/// ([`reuse_freed_memory`]), back to the kernel. Buffers under the mmap
/// threshold (tiles, small activations) come from the heap, and a heap fragmented by many
/// of them keeps its free pages resident until trimmed; musl returns them on its own.
pub(crate) fn release_free_heap() {
    heap::release_kept_blocks();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel; it takes the allocator's
    // own locks and touches no live allocation.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// Resets `VmHWM` to the current RSS (Linux ≥ 4.0), so a later reading is the peak of
/// what happened in between.
pub(crate) fn reset_peak() -> Result<()> {
    std::fs::write("/proc/self/clear_refs", "5").context("writing /proc/self/clear_refs")
}

/// The peak resident set of one stretch of work (an inference): `VmHWM` restarts from the
/// current resident set at [`PeakWatch::start`] where the kernel allows it, so that the
/// reading at [`PeakWatch::finish`] is that stretch's own peak.
pub(crate) struct PeakWatch {
    before: Option<ProcessMemory>,
    reset: bool,
}

/// What a [`PeakWatch`] saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RunPeak {
    /// The process's `VmHWM` (never below its value at the start).
    pub peak_rss: Option<u64>,
    /// The peak over the stretch less the resident set at its start; `None` where `VmHWM`
    /// could not be reset (it would include earlier peaks).
    pub(crate) run_peak_delta: Option<u64>,
}

impl PeakWatch {
    pub fn start() -> PeakWatch {
        let before = process_memory().ok();
        let reset = reset_peak().is_ok();
        PeakWatch { before, reset }
    }

    pub fn finish(&self) -> RunPeak {
        let after = process_memory().ok();
        RunPeak {
            peak_rss: after.map(|m| m.peak_rss.max(self.before.map_or(0, |b| b.peak_rss))),
            run_peak_delta: match (self.before, after) {
                (Some(b), Some(a)) if self.reset => Some(a.peak_rss.saturating_sub(b.rss)),
                _ => None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_pages_are_resident_less_file_backed() {
        assert_eq!(
            anonymous_pages("250000 9000 3500 4100 0 6000 0\n"),
            Some(5500)
        );
        assert_eq!(anonymous_pages("250000 9000"), None);
    }

    #[test]
    fn parses_status_fields() {
        let text = "Name:\tmemaflow\nVmHWM:\t  20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(
            parse_status(text).unwrap(),
            ProcessMemory {
                rss: 10 << 20,
                peak_rss: 20 << 20
            }
        );
        assert!(parse_status("Name: x\n").is_err());
    }
}

/// A byte count, written and read the way people write sizes: `256M`, `1G`, `1.5GiB`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bytes(pub u64);

impl std::fmt::Display for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut v = self.0 as f64;
        let mut unit = 0;
        while v >= 1024.0 && unit < UNITS.len() - 1 {
            v /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{v:.1} {}", UNITS[unit])
        }
    }
}

impl std::str::FromStr for Bytes {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Bytes> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let value: f64 = num
            .parse()
            .with_context(|| format!("'{s}' is not a size (try 256M, 1G, 1048576)"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            other => anyhow::bail!("unknown size unit '{other}' in '{s}' (use K, M, G or T)"),
        };
        anyhow::ensure!(value.is_finite() && value >= 0.0, "'{s}' is not a size");
        Ok(Bytes((value * mult as f64).round() as u64))
    }
}

#[cfg(test)]
mod bytes_tests {
    use super::Bytes;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!("256M".parse::<Bytes>().unwrap(), Bytes(256 << 20));
        assert_eq!("1G".parse::<Bytes>().unwrap(), Bytes(1 << 30));
        assert_eq!("1.5GiB".parse::<Bytes>().unwrap(), Bytes(3 << 29));
        assert_eq!("4096".parse::<Bytes>().unwrap(), Bytes(4096));
        assert!("12Q".parse::<Bytes>().is_err());
        assert!("".parse::<Bytes>().is_err());
        assert_eq!(Bytes(45_600_000).to_string(), "43.5 MiB");
    }
}
