//! The program's own pages after start-up.
//!
//! An idle daemon's resident set is mostly not data: it is the program's code and read-only
//! data, mapped from the executable and its libraries, that start-up ran through
//! (configuration parsing, the package checks). The kernel maps up to 16 neighbouring
//! pages with each page faulted in ("fault-around"), so a few hundred touched pages keep
//! megabytes of code mapped — 7 of the daemon's 10.6 MiB after start-up, against 0.8 MiB
//! of heap. Those pages are clean copies of the page cache: dropping them from the
//! process's mapping loses nothing, and the code a later frame runs is mapped again by
//! minor faults from the page cache, as at start. [`release_start_up`] does that, and
//! trims glibc's heap, once start-up is over.

use super::{ProcessMemory, process_memory, release_free_heap};
use std::collections::HashSet;

/// What [`release_start_up`] did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Released {
    /// Resident bytes of code and read-only data dropped from the mappings.
    pub mapped_bytes: u64,
    /// The process's memory before the release.
    pub(crate) before: Option<ProcessMemory>,
    /// And after it.
    pub(crate) after: Option<ProcessMemory>,
}

/// Trims the heap and drops the resident pages of the program's and its libraries'
/// read-only mappings (see the module's documentation). Call once start-up is done: what
/// it drops comes back only as it runs again. Best effort: a mapping the kernel refuses
/// is left as it is.
pub fn release_start_up() -> Released {
    let before = process_memory().ok();
    release_free_heap();
    let mut mapped_bytes = 0;
    if let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") {
        for m in droppable(&smaps) {
            // SAFETY: `droppable` only returns whole mappings that are private, readable,
            // never writable and hold no anonymous (copied-on-write) page, of a file that is
            // also mapped executable: the program or a shared library, which nothing unmaps
            // (no dlclose). Every page of such a mapping is the file's page-cache page, so
            // MADV_DONTNEED changes no byte that any thread can read: the next access maps
            // the same page again. No memory is freed that Rust owns.
            let rc = unsafe {
                nix::libc::madvise(
                    m.start as *mut nix::libc::c_void,
                    m.len,
                    nix::libc::MADV_DONTNEED,
                )
            };
            if rc == 0 {
                mapped_bytes += m.resident;
            }
        }
    }
    Released {
        mapped_bytes,
        before,
        after: process_memory().ok(),
    }
}

/// A mapping whose pages may be dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Droppable {
    start: usize,
    len: usize,
    /// `Rss`, bytes.
    resident: u64,
}

/// One mapping of `/proc/self/smaps`, as far as `droppable` asks.
struct Mapping<'a> {
    start: usize,
    end: usize,
    perms: &'a str,
    path: &'a str,
    rss_kib: Option<u64>,
    anonymous_kib: Option<u64>,
}

/// The read-only, private mappings of files that are also mapped executable, with
/// resident pages and none of them anonymous: the program's and its libraries' code and
/// constants. A mapping whose `Anonymous` line is missing is left alone (relocated data,
/// `.data.rel.ro`, shows its copied pages there and must keep them).
fn droppable(smaps: &str) -> Vec<Droppable> {
    let mappings = parse(smaps);
    let executable: HashSet<&str> = mappings
        .iter()
        .filter(|m| m.perms.as_bytes().get(2) == Some(&b'x'))
        .map(|m| m.path)
        .collect();
    mappings
        .iter()
        .filter(|m| {
            let p = m.perms.as_bytes();
            p.len() == 4
                && p[0] == b'r'
                && p[1] == b'-'
                && p[3] == b'p'
                && m.path.starts_with('/')
                && !m.path.ends_with(" (deleted)")
                && executable.contains(m.path)
                && m.anonymous_kib == Some(0)
                && m.rss_kib.is_some_and(|r| r > 0)
        })
        .map(|m| Droppable {
            start: m.start,
            len: m.end - m.start,
            resident: m.rss_kib.unwrap_or(0) * 1024,
        })
        .collect()
}

fn parse(smaps: &str) -> Vec<Mapping<'_>> {
    let mut out: Vec<Mapping> = vec![];
    for line in smaps.lines() {
        if let Some(m) = header(line) {
            out.push(m);
            continue;
        }
        let Some(last) = out.last_mut() else { continue };
        let kib = |key: &str| {
            line.strip_prefix(key)
                .and_then(|v| v.trim().strip_suffix("kB"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let Some(v) = kib("Rss:") {
            last.rss_kib = Some(v);
        } else if let Some(v) = kib("Anonymous:") {
            last.anonymous_kib = Some(v);
        }
    }
    out
}

/// `START-END PERMS OFFSET DEV INODE [PATH]`, the line that begins each mapping.
fn header(line: &str) -> Option<Mapping<'_>> {
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?;
    // Offset, device and inode; the path follows after padding.
    for _ in 0..3 {
        fields.next()?;
    }
    let path = fields.next().unwrap_or("").trim_start();
    (end > start && perms.len() == 4).then_some(Mapping {
        start,
        end,
        perms,
        path,
        rss_kib: None,
        anonymous_kib: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55ab6e12c000-55ab6e504000 r--p 00000000 103:02 1234                      /usr/bin/memaflow
Size:               3936 kB
Rss:                1424 kB
Anonymous:             0 kB
VmFlags: rd mr mw me sd
55ab6e504000-55ab6f479000 r-xp 003d8000 103:02 1234                      /usr/bin/memaflow
Size:              15828 kB
Rss:                5792 kB
Anonymous:             0 kB
55ab6f479000-55ab6f4ee000 r--p 0134d000 103:02 1234                      /usr/bin/memaflow
Rss:                 468 kB
Anonymous:           468 kB
55ab6f4ee000-55ab6f4f3000 rw-p 013c2000 103:02 1234                      /usr/bin/memaflow
Rss:                  20 kB
Anonymous:            20 kB
55ab81456000-55ab8153d000 rw-p 00000000 00:00 0                          [heap]
Rss:                 828 kB
Anonymous:           828 kB
7f3ed6000000-7f3ed6100000 r--p 00000000 103:02 99                        /var/lib/models/layer 3.tflite
Rss:                 100 kB
Anonymous:             0 kB
7f3ed63bb000-7f3ed6511000 r-xp 00028000 103:02 77                        /usr/lib/libc.so.6
Rss:                 980 kB
Anonymous:             0 kB
7f3ed6600000-7f3ed6601000 r-xp 00000000 103:02 78                        /usr/lib/untouched.so
Rss:                   0 kB
Anonymous:             0 kB
7f3ed6700000-7f3ed6701000 r--p 00000000 103:02 79                        /usr/lib/no-anon-line.so
Rss:                   4 kB
7f3ed6701000-7f3ed6702000 r-xp 00001000 103:02 79                        /usr/lib/no-anon-line.so
Rss:                   4 kB
Anonymous:             0 kB
7ffcdb9e9000-7ffcdba0a000 r-xp 00000000 00:00 0                          [vdso]
Rss:                   8 kB
Anonymous:             0 kB
";

    #[test]
    fn only_clean_read_only_mappings_of_program_and_libraries() {
        let got: Vec<(usize, u64)> = droppable(SMAPS)
            .iter()
            .map(|d| (d.start, d.resident / 1024))
            .collect();
        assert_eq!(
            got,
            [
                (0x55ab6e12c000, 1424),
                (0x55ab6e504000, 5792),
                (0x7f3ed63bb000, 980),
                (0x7f3ed6701000, 4),
            ],
            "not: relocated data, writable data, the heap, a data file, untouched code, \
             a mapping without an Anonymous line, the vDSO"
        );
    }

    #[test]
    fn releasing_keeps_the_program_running() {
        let r = release_start_up();
        assert!(r.before.is_some() && r.after.is_some());
        // The code and constants dropped come back as they run.
        let text = format!("{:?}", std::hint::black_box(vec![1u8, 2, 3]));
        assert_eq!(text, "[1, 2, 3]");
    }
}
