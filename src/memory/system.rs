//! What the system lets us still allocate: `MemAvailable` from `/proc/meminfo`, and the
//! memory cgroup this process is in (v1 `memory.limit_in_bytes`/`memory.usage_in_bytes`,
//! v2 `memory.max`/`memory.current`), ancestors included since their limits apply too.
//! Every path hangs off a root directory so that tests read fixture trees.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// Which cgroup hierarchy the process's memory cgroup is in (both are read the same way
/// after this).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    /// cgroup v1: `memory.limit_in_bytes`, `memory.usage_in_bytes`, `memory.oom_control`.
    V1,
    /// cgroup v2: `memory.max`, `memory.current`, `memory.events`.
    V2,
}

/// The memory cgroup of this process: its directory and those of its ancestors up to the
/// hierarchy's mount point, innermost first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    /// Which hierarchy its directories are in.
    pub version: CgroupVersion,
    pub(crate) dirs: Vec<PathBuf>,
}

/// One limited cgroup level's limit and usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub(crate) struct CgroupLevel {
    pub limit: u64,
    /// All charged bytes, the page cache included.
    pub usage: u64,
    /// Clean, unmapped file cache within `usage` (from `memory.stat`): the kernel drops it
    /// before it would fail an allocation, so it is not in anyone's way.
    pub(crate) reclaimable: u64,
}

impl CgroupLevel {
    /// Bytes the level's processes actually hold (the "working set").
    pub(crate) fn working_set(&self) -> u64 {
        self.usage.saturating_sub(self.reclaimable)
    }
}

/// A reading of the system's memory, taken at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Reading {
    /// `MemAvailable`, bytes.
    pub(crate) mem_available: Option<u64>,
    /// The cgroup hierarchy the levels were read from, if any.
    pub cgroup: Option<CgroupVersion>,
    /// Limit and usage of each cgroup level that has a limit, innermost first.
    pub(crate) cgroup_levels: Vec<CgroupLevel>,
}

impl Reading {
    /// Bytes that can still be allocated before `MemAvailable` falls to `reserve` or a
    /// cgroup's working set reaches its limit (less `reserve` as well: the kernel reclaims,
    /// then kills, at the limit). `None` when nothing bounds it.
    ///
    /// A cgroup's usage counts the page cache of every file its processes read — all the
    /// layer files, after one pass over the models — so usage alone sits at the limit and
    /// a scheduler trusting it would wait for memory that is there (the paper's MEMA dip at
    /// 1 GiB). The clean cache is subtracted, as `MemAvailable` does for the system.
    pub(crate) fn headroom(&self, reserve: u64) -> Option<u64> {
        let system = self.mem_available.map(|a| a.saturating_sub(reserve));
        let cgroup = self
            .cgroup_levels
            .iter()
            .map(|l| {
                l.limit
                    .saturating_sub(l.working_set())
                    .saturating_sub(reserve)
            })
            .min();
        match (system, cgroup) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Like `headroom`, but signed: negative when a cgroup's working set (or the system's
    /// use) is already beyond its limit less `reserve` — by how much the holder of the
    /// memory must shrink.
    pub(crate) fn room(&self, reserve: u64) -> Option<i64> {
        let signed = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let system = self.mem_available.map(|a| signed(a) - signed(reserve));
        let cgroup = self
            .cgroup_levels
            .iter()
            .map(|l| signed(l.limit) - signed(l.working_set()) - signed(reserve))
            .min();
        match (system, cgroup) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The tightest cgroup limit, if any.
    pub(crate) fn cgroup_limit(&self) -> Option<u64> {
        self.cgroup_levels.iter().map(|l| l.limit).min()
    }
}

/// Where readings come from: `/` on a running system, a fixture tree in tests.
#[derive(Clone, Debug)]
pub struct SystemMemory {
    root: PathBuf,
    cgroup: Option<Cgroup>,
}

impl SystemMemory {
    /// The running system, with this process's cgroup.
    pub fn detect() -> SystemMemory {
        SystemMemory::at_root("/")
    }

    /// A system whose `/proc` and `/sys/fs/cgroup` are under `root`.
    pub(crate) fn at_root(root: impl AsRef<Path>) -> SystemMemory {
        let root = root.as_ref().to_path_buf();
        let cgroup = match detect_cgroup(&root) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("memory cgroup not readable, using /proc/meminfo alone: {e:#}");
                None
            }
        };
        SystemMemory { root, cgroup }
    }

    /// The budget to plan against: `given`, else the headroom read now less `reserve`
    /// (`None` when nothing is known).
    pub(crate) fn budget_or_headroom(&self, given: Option<u64>, reserve: u64) -> Option<u64> {
        given.or_else(|| self.read().ok().and_then(|r| r.headroom(reserve)))
    }

    /// The process's memory cgroup, if it has one that can be read.
    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }

    /// The kernel's memory event counters of this process's cgroup, by the kernel's own
    /// names, or `None` when there is no cgroup or its file cannot be read. v2
    /// `memory.events` (hierarchical: `low`, `high`, `max`, `oom`, `oom_kill`,
    /// `oom_group_kill`); v1 `memory.oom_control` (`oom_kill`, and `under_oom`, which is
    /// 1 while the cgroup is out of memory, not a count).
    pub fn events(&self) -> Option<std::collections::BTreeMap<String, u64>> {
        let cg = self.cgroup.as_ref()?;
        let file = match cg.version {
            CgroupVersion::V2 => "memory.events",
            CgroupVersion::V1 => "memory.oom_control",
        };
        let text = std::fs::read_to_string(cg.dirs.first()?.join(file)).ok()?;
        Some(parse_events(&text))
    }

    /// Reads MemAvailable and every limited cgroup level now; fails only when
    /// `/proc/meminfo` cannot be read.
    pub fn read(&self) -> Result<Reading> {
        let meminfo = self.root.join("proc/meminfo");
        let mem_available = match std::fs::read_to_string(&meminfo) {
            Ok(text) => Some(
                parse_meminfo_available(&text).with_context(|| meminfo.display().to_string())?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| meminfo.display().to_string()),
        };
        let mut cgroup_levels = vec![];
        if let Some(cg) = &self.cgroup {
            for dir in &cg.dirs {
                if let Some(level) = read_level(cg.version, dir)? {
                    cgroup_levels.push(level);
                }
            }
        }
        Ok(Reading {
            mem_available,
            cgroup: self.cgroup.as_ref().map(|c| c.version),
            cgroup_levels,
        })
    }
}

/// `name value` lines (`memory.events`, `memory.oom_control`); other lines are skipped.
/// v1's `oom_kill_disable` is a setting, not an event, and is left out.
pub(crate) fn parse_events(text: &str) -> std::collections::BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .filter(|(name, _)| name != "oom_kill_disable")
        .collect()
}

/// `MemAvailable` in bytes (kernels before 3.14 lack it: then MemFree + Cached is the
/// closest estimate).
pub(crate) fn parse_meminfo_available(text: &str) -> Result<u64> {
    let field = |key: &str| -> Result<Option<u64>> {
        let Some(line) = text.lines().find(|l| l.split(':').next() == Some(key)) else {
            return Ok(None);
        };
        let rest = line[key.len() + 1..].trim();
        let (num, unit) = rest.split_once(' ').unwrap_or((rest, ""));
        let v: u64 = num
            .trim()
            .parse()
            .with_context(|| format!("bad line '{line}'"))?;
        Ok(Some(if unit.trim() == "kB" { v * 1024 } else { v }))
    };
    if let Some(v) = field("MemAvailable")? {
        return Ok(v);
    }
    match (field("MemFree")?, field("Cached")?) {
        (Some(free), cached) => Ok(free + cached.unwrap_or(0)),
        _ => bail!("neither MemAvailable nor MemFree found"),
    }
}

/// Finds the memory cgroup of this process from `/proc/self/cgroup`: a v1 `memory`
/// hierarchy when there is one (hybrid systems mount v2 without the memory controller),
/// else the v2 unified hierarchy when its memory controller is enabled.
fn detect_cgroup(root: &Path) -> Result<Option<Cgroup>> {
    let self_cgroup = root.join("proc/self/cgroup");
    let text = match std::fs::read_to_string(&self_cgroup) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| self_cgroup.display().to_string()),
    };
    let base = root.join("sys/fs/cgroup");
    let mut v2_path = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if controllers.split(',').any(|c| c == "memory") {
            let mount = base.join("memory");
            return Ok(Some(Cgroup {
                version: CgroupVersion::V1,
                dirs: levels(&mount, path, "memory.limit_in_bytes"),
            }));
        }
        if id == "0" && controllers.is_empty() {
            v2_path = Some(path.to_string());
        }
    }
    if let Some(path) = v2_path {
        let enabled = std::fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
        if enabled.split_whitespace().any(|c| c == "memory") {
            return Ok(Some(Cgroup {
                version: CgroupVersion::V2,
                dirs: levels(&base, &path, "memory.current"),
            }));
        }
    }
    Ok(None)
}

/// The directories from the cgroup at `path` up to the mount point, innermost first. In a
/// cgroup namespace the path may not exist under the mount: then the mount point is ours.
fn levels(mount: &Path, path: &str, marker: &str) -> Vec<PathBuf> {
    let mut dirs = vec![];
    let mut rel = PathBuf::from(path.trim_start_matches('/'));
    loop {
        // `..` never appears in /proc/self/cgroup, but a fixture or a hostile mount could
        // put it there: never leave the mount.
        if rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            break;
        }
        let dir = mount.join(&rel);
        if dir.join(marker).exists() || dir == mount {
            dirs.push(dir);
        }
        if !rel.pop() {
            break;
        }
    }
    if dirs.is_empty() {
        dirs.push(mount.to_path_buf());
    }
    dirs
}

/// v1 reports "no limit" as a page-rounded i64::MAX (or close to it).
const V1_UNLIMITED: u64 = 1 << 60;

fn read_level(version: CgroupVersion, dir: &Path) -> Result<Option<CgroupLevel>> {
    let read = |name: &str| -> Result<Option<String>> {
        let p = dir.join(name);
        match std::fs::read_to_string(&p) {
            Ok(t) => Ok(Some(t.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| p.display().to_string()),
        }
    };
    let number = |name: &str, text: &str| -> Result<u64> {
        text.parse()
            .with_context(|| format!("{}: '{text}' is not a byte count", dir.join(name).display()))
    };
    let (limit_file, usage_file) = match version {
        CgroupVersion::V1 => ("memory.limit_in_bytes", "memory.usage_in_bytes"),
        CgroupVersion::V2 => ("memory.max", "memory.current"),
    };
    let Some(limit_text) = read(limit_file)? else {
        return Ok(None);
    };
    let limit = match (version, limit_text.as_str()) {
        (CgroupVersion::V2, "max") => None,
        _ => Some(number(limit_file, &limit_text)?).filter(|&l| l < V1_UNLIMITED),
    };
    // An unlimited level bounds nothing: its usage and memory.stat (the costliest file)
    // are not read. Readings are taken every few milliseconds while frames run.
    let Some(limit) = limit else {
        return Ok(None);
    };
    let usage = match read(usage_file)? {
        Some(t) => number(usage_file, &t)?,
        None => 0,
    };
    // A missing or odd memory.stat only makes the reading conservative.
    let reclaimable = read("memory.stat")?
        .map(|t| parse_reclaimable(version, &t))
        .unwrap_or(0)
        .min(usage);
    Ok(Some(CgroupLevel {
        limit,
        usage,
        reclaimable,
    }))
}

/// Clean file cache nobody maps, from a cgroup's `memory.stat`: file pages on either LRU
/// list, less mapped (a program's own code: dropping it thrashes), dirty and
/// under-writeback pages (they need I/O first). v1 has per-level and `total_`
/// (hierarchical) counters; usage is hierarchical, so the `total_` ones match it.
pub(crate) fn parse_reclaimable(version: CgroupVersion, stat: &str) -> u64 {
    let field = |key: &str| -> u64 {
        stat.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok()).flatten()
            })
            .unwrap_or(0)
    };
    let [inactive, active, mapped, dirty, writeback] = match version {
        CgroupVersion::V1 => [
            "total_inactive_file",
            "total_active_file",
            "total_mapped_file",
            "total_dirty",
            "total_writeback",
        ],
        CgroupVersion::V2 => [
            "inactive_file",
            "active_file",
            "file_mapped",
            "file_dirty",
            "file_writeback",
        ],
    }
    .map(field);
    (inactive + active).saturating_sub(mapped + dirty + writeback)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_events_of_both_versions() {
        let v2 = parse_events("low 0\nhigh 3\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n");
        assert_eq!(v2["max"], 12);
        assert_eq!(v2["oom_kill"], 1);
        assert_eq!(v2.len(), 6);
        let v1 = parse_events("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n");
        assert_eq!(v1.keys().collect::<Vec<_>>(), ["oom_kill", "under_oom"]);
        assert_eq!(v1["oom_kill"], 2);
    }

    fn fixture(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("memaflow-fixture-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (path, text) in files {
            let p = root.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        root
    }

    const MEMINFO: &str = "MemTotal:        1000000 kB\nMemFree:          200000 kB\nMemAvailable:     500000 kB\nCached:           100000 kB\n";

    #[test]
    fn meminfo_available_and_its_fallback() {
        assert_eq!(parse_meminfo_available(MEMINFO).unwrap(), 500_000 * 1024);
        assert_eq!(
            parse_meminfo_available("MemFree: 10 kB\nCached: 5 kB\n").unwrap(),
            15 * 1024
        );
        assert!(parse_meminfo_available("MemTotal: 1 kB\n").is_err());
        assert!(parse_meminfo_available("MemAvailable: lots kB\n").is_err());
    }

    #[test]
    fn cgroup_v1_limit_and_usage_with_unlimited_ancestors() {
        let root = fixture(
            "v1",
            &[
                ("proc/meminfo", MEMINFO),
                (
                    "proc/self/cgroup",
                    "5:devices:/\n4:memory:/bench/run1\n0::/\n",
                ),
                (
                    "sys/fs/cgroup/memory/memory.limit_in_bytes",
                    "9223372036854771712\n",
                ),
                ("sys/fs/cgroup/memory/memory.usage_in_bytes", "3890368512\n"),
                (
                    "sys/fs/cgroup/memory/bench/memory.limit_in_bytes",
                    "9223372036854771712\n",
                ),
                (
                    "sys/fs/cgroup/memory/bench/memory.usage_in_bytes",
                    "300000000\n",
                ),
                (
                    "sys/fs/cgroup/memory/bench/run1/memory.limit_in_bytes",
                    "268435456\n",
                ),
                (
                    "sys/fs/cgroup/memory/bench/run1/memory.usage_in_bytes",
                    "100000000\n",
                ),
                // A v2 mount without the memory controller must not win (hybrid layout).
                ("sys/fs/cgroup/cgroup.controllers", "cpu pids\n"),
            ],
        );
        let sys = SystemMemory::at_root(&root);
        assert_eq!(sys.cgroup().unwrap().version, CgroupVersion::V1);
        let r = sys.read().unwrap();
        assert_eq!(r.cgroup_limit(), Some(268435456));
        // Only the level with a limit: the unlimited ancestors bound nothing.
        assert_eq!(r.cgroup_levels.len(), 1);
        assert_eq!(r.headroom(0), Some(268435456 - 100000000));
        assert_eq!(
            r.headroom(16 << 20),
            Some(268435456 - 100000000 - (16 << 20))
        );
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn cgroup_v2_max_and_current() {
        let root = fixture(
            "v2",
            &[
                ("proc/meminfo", MEMINFO),
                ("proc/self/cgroup", "0::/memaflow/daemon\n"),
                (
                    "sys/fs/cgroup/cgroup.controllers",
                    "cpuset cpu io memory pids\n",
                ),
                ("sys/fs/cgroup/memaflow/memory.max", "max\n"),
                ("sys/fs/cgroup/memaflow/memory.current", "50000000\n"),
                ("sys/fs/cgroup/memaflow/daemon/memory.max", "134217728\n"),
                ("sys/fs/cgroup/memaflow/daemon/memory.current", "34217728\n"),
            ],
        );
        let sys = SystemMemory::at_root(&root);
        assert_eq!(sys.cgroup().unwrap().version, CgroupVersion::V2);
        let r = sys.read().unwrap();
        assert_eq!(r.cgroup_limit(), Some(134217728));
        assert_eq!(r.headroom(0), Some(100_000_000));
        // MemAvailable bounds it when it is the tighter one.
        assert_eq!(r.mem_available, Some(500_000 * 1024));

        // The limit shrinks while running: the next reading sees it.
        std::fs::write(
            root.join("sys/fs/cgroup/memaflow/daemon/memory.max"),
            "44217728\n",
        )
        .unwrap();
        assert_eq!(sys.read().unwrap().headroom(0), Some(10_000_000));
        // Usage above a lowered limit is no headroom, not an underflow.
        std::fs::write(
            root.join("sys/fs/cgroup/memaflow/daemon/memory.max"),
            "1000\n",
        )
        .unwrap();
        assert_eq!(sys.read().unwrap().headroom(0), Some(0));
        // "max" everywhere: only MemAvailable bounds.
        std::fs::write(
            root.join("sys/fs/cgroup/memaflow/daemon/memory.max"),
            "max\n",
        )
        .unwrap();
        let r = sys.read().unwrap();
        assert_eq!(r.cgroup_limit(), None);
        assert_eq!(r.headroom(1024), Some(500_000 * 1024 - 1024));
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn clean_page_cache_is_headroom() {
        let v1 = "cache 900\ninactive_file 1\ntotal_inactive_file 300000000\n\
                  total_active_file 100000000\ntotal_mapped_file 20000000\n\
                  total_dirty 5000000\ntotal_writeback 0\n";
        assert_eq!(parse_reclaimable(CgroupVersion::V1, v1), 375_000_000);
        let v2 = "anon 1000\nfile 400000000\ninactive_file 300000000\n\
                  active_file 100000000\nfile_mapped 20000000\nfile_dirty 5000000\n\
                  file_writeback 1000000\n";
        assert_eq!(parse_reclaimable(CgroupVersion::V2, v2), 374_000_000);
        assert_eq!(parse_reclaimable(CgroupVersion::V2, "garbage\n"), 0);
        // More mapped than cached (shared memory counts as mapped): nothing, not wrapped.
        assert_eq!(
            parse_reclaimable(CgroupVersion::V2, "inactive_file 5\nfile_mapped 9\n"),
            0
        );

        // A cgroup at its limit, mostly page cache: the headroom is the cache.
        let root = fixture(
            "cache",
            &[
                ("proc/meminfo", MEMINFO),
                ("proc/self/cgroup", "0::/spool\n"),
                ("sys/fs/cgroup/cgroup.controllers", "memory\n"),
                ("sys/fs/cgroup/spool/memory.max", "268435456\n"),
                ("sys/fs/cgroup/spool/memory.current", "268435456\n"),
                (
                    "sys/fs/cgroup/spool/memory.stat",
                    "anon 68435456\ninactive_file 150000000\nactive_file 50000000\n\
                     file_mapped 0\nfile_dirty 0\nfile_writeback 0\n",
                ),
            ],
        );
        let r = SystemMemory::at_root(&root).read().unwrap();
        assert_eq!(r.cgroup_levels[0].working_set(), 68_435_456);
        assert_eq!(r.headroom(0), Some(200_000_000));
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn no_cgroup_and_garbage() {
        let root = fixture("none", &[("proc/meminfo", MEMINFO)]);
        let sys = SystemMemory::at_root(&root);
        assert!(sys.cgroup().is_none());
        assert_eq!(sys.read().unwrap().headroom(0), Some(500_000 * 1024));
        std::fs::remove_dir_all(&root).ok();

        let root = fixture(
            "garbage",
            &[
                ("proc/meminfo", MEMINFO),
                ("proc/self/cgroup", "0::/../../etc\n"),
                ("sys/fs/cgroup/cgroup.controllers", "memory\n"),
                ("sys/fs/cgroup/memory.max", "lots\n"),
            ],
        );
        let sys = SystemMemory::at_root(&root);
        assert_eq!(sys.cgroup().unwrap().dirs, vec![root.join("sys/fs/cgroup")]);
        assert!(
            sys.read().is_err(),
            "an unparsable limit is an error, not 'unlimited'"
        );
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn this_host_reads() {
        // Whatever this machine is, a reading works and gives some headroom.
        let r = SystemMemory::detect().read().unwrap();
        assert!(r.headroom(0).is_some_and(|h| h > 0));
    }
}
