//! Memory cgroups for bench runs: one fresh cgroup per child, with the run's limit and no
//! swap, read for OOM kills and peak usage, removed afterwards. The only user of
//! cgroups-rs (v1 and v2).
//!
//! Run cgroups live under a parent directory, by default `memaflow-bench` inside the
//! memory cgroup this process is in: nesting keeps the children under whatever limits and
//! accounting apply to the bench itself, and a delegated (unprivileged, systemd) subtree is
//! usually writable where the hierarchy's root is not.

use crate::memory::{CgroupVersion, SystemMemory};
use anyhow::{Context, Result, anyhow, bail};
use cgroups_rs::Controller;
use cgroups_rs::memory::MemController;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The directory run cgroups are created in.
#[derive(Debug)]
pub(crate) struct BenchCgroups {
    parent: PathBuf,
    version: CgroupVersion,
    /// Removed at the end only when this bench created it (another bench may share it).
    created: bool,
}

/// What a run's cgroup saw, read after its child exited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// Peak usage (v1 `memory.max_usage_in_bytes`, v2 `memory.peak` where the kernel has
    /// it), page cache included.
    pub peak: Option<u64>,
    /// Processes the kernel's OOM killer killed in this cgroup.
    pub oom_kills: u64,
}

/// One run's cgroup. `procs` is its `cgroup.procs`, opened before the child is forked so
/// that the child can move itself in without allocating (see `child::spawn`).
pub struct RunCgroup {
    memory: MemController,
    version: CgroupVersion,
    procs: File,
}

impl BenchCgroups {
    /// Creates (or reuses) `parent`, or `memaflow-bench` in this process's memory cgroup,
    /// and checks that a limited child cgroup can be made there. Any error means limits
    /// cannot be enforced here; the message says why.
    pub(crate) fn prepare(parent: Option<&Path>) -> Result<BenchCgroups> {
        let (parent, version) = match parent {
            Some(p) => (p.to_path_buf(), version_at(p)?),
            None => {
                let system = SystemMemory::detect();
                let cg = system
                    .cgroup()
                    .context("this process is in no memory cgroup (none mounted?)")?;
                let own = cg
                    .dirs
                    .first()
                    .context("the memory cgroup of this process has no directory")?;
                (own.join("memaflow-bench"), cg.version)
            }
        };
        let created = !parent.exists();
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("creating cgroup {}", parent.display()))?;
        // Run cgroups left by a bench that was killed (`run-<pid>-<run>`, its pid gone)
        // are empty and can go; a bench still running keeps its own.
        if let Ok(entries) = std::fs::read_dir(&parent) {
            for e in entries.flatten() {
                let name = e.file_name();
                let owner = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("run-").or(n.strip_prefix("probe-")))
                    .and_then(|rest| rest.split('-').next())
                    .and_then(|pid| pid.parse::<u32>().ok());
                if owner.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        let bench = BenchCgroups {
            parent,
            version,
            created,
        };
        if version == CgroupVersion::V2 {
            // v2 limits a child only when its parent delegates the memory controller, and
            // a cgroup holding processes cannot delegate (no internal processes): the
            // write fails then, and bench falls back to budgets.
            for dir in [bench.parent.parent(), Some(bench.parent.as_path())]
                .into_iter()
                .flatten()
            {
                enable_memory_controller(dir)?;
            }
        }
        let probe = bench
            .create(&format!("probe-{}", std::process::id()), Some(64 << 20))
            .context("creating a limited probe cgroup")?;
        probe.remove()?;
        Ok(bench)
    }

    pub(crate) fn version(&self) -> CgroupVersion {
        self.version
    }

    pub fn parent(&self) -> &Path {
        &self.parent
    }

    /// A fresh cgroup `name` limited to `limit` bytes (no limit: `None`), swap off.
    pub fn create(&self, name: &str, limit: Option<u64>) -> Result<RunCgroup> {
        let dir = self.parent.join(name);
        if dir.exists() {
            // Left by a bench that was killed: empty by now, so it can go.
            MemController::new(dir.clone(), self.version == CgroupVersion::V2)
                .delete()
                .map_err(|e| anyhow!("{e}"))
                .with_context(|| format!("removing stale cgroup {}", dir.display()))?;
        }
        std::fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        let v2 = self.version == CgroupVersion::V2;
        let memory = MemController::new(dir.clone(), v2);
        let run = RunCgroup {
            procs: File::options()
                .write(true)
                .open(dir.join("cgroup.procs"))
                .with_context(|| format!("opening {}/cgroup.procs", dir.display()))?,
            memory,
            version: self.version,
        };
        let set = || -> Result<()> {
            let Some(limit) = limit else { return Ok(()) };
            let limit = i64::try_from(limit).context("limit too large")?;
            run.memory
                .set_limit(limit)
                .map_err(|e| anyhow!("{e}: {}", source_of(&e)))?;
            // No swap: the host may have some, the boards have none, and a limit that
            // spills into swap measures the disk, not the scheduler. v1 needs memsw ≥ the
            // memory limit, so equal means none; v2 counts swap apart.
            let swap_file = if v2 {
                "memory.swap.max"
            } else {
                "memory.memsw.limit_in_bytes"
            };
            if dir.join(swap_file).exists() {
                run.memory
                    .set_memswap_limit(if v2 { 0 } else { limit })
                    .map_err(|e| anyhow!("{e}: {}", source_of(&e)))?;
            }
            Ok(())
        };
        if let Err(e) = set() {
            let _ = run.memory.delete();
            return Err(e.context(format!("limiting cgroup {}", dir.display())));
        }
        Ok(run)
    }

    /// Removes the parent when this bench created it and no other bench uses it.
    pub fn finish(self) {
        if self.created {
            let _ = std::fs::remove_dir(&self.parent);
        }
    }
}

fn source_of(e: &cgroups_rs::error::Error) -> String {
    std::error::Error::source(e)
        .map(|s| s.to_string())
        .unwrap_or_default()
}

/// Which cgroup version `dir` (or its nearest existing ancestor) belongs to.
fn version_at(dir: &Path) -> Result<CgroupVersion> {
    let mut probe = Some(dir);
    while let Some(d) = probe {
        if d.exists() {
            if d.join("memory.limit_in_bytes").exists() {
                return Ok(CgroupVersion::V1);
            }
            if d.join("cgroup.controllers").exists() {
                return Ok(CgroupVersion::V2);
            }
            bail!(
                "{} is not inside a memory cgroup hierarchy ({} has neither memory.limit_in_bytes nor cgroup.controllers)",
                dir.display(),
                d.display()
            );
        }
        probe = d.parent();
    }
    bail!("{} does not exist", dir.display())
}

/// Adds `memory` to `dir/cgroup.subtree_control` unless it is there already.
fn enable_memory_controller(dir: &Path) -> Result<()> {
    let path = dir.join("cgroup.subtree_control");
    let current =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    if current.split_whitespace().any(|c| c == "memory") {
        return Ok(());
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(b"+memory"))
        .with_context(|| format!("enabling the memory controller in {}", path.display()))
}

impl RunCgroup {
    /// The open `cgroup.procs` of this cgroup.
    pub fn procs(&self) -> &File {
        &self.procs
    }

    pub fn stats(&self) -> Result<CgroupStats> {
        let m = self.memory.memory_stat();
        let peak = (m.max_usage_in_bytes > 0).then_some(m.max_usage_in_bytes);
        let oom_kills = match self.version {
            CgroupVersion::V1 => m.oom_control.oom_kill,
            CgroupVersion::V2 => {
                let path = self.memory.path().join("memory.events");
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                parse_oom_kills_v2(&text)
            }
        };
        Ok(CgroupStats { peak, oom_kills })
    }

    /// Removes the cgroup (its child has been reaped, so it is empty; cgroups-rs retries
    /// while the kernel finishes tearing the process down).
    pub fn remove(self) -> Result<()> {
        let dir = self.memory.path().to_path_buf();
        drop(self.procs);
        self.memory
            .delete()
            .map_err(|e| anyhow!("{e}: {}", source_of(&e)))
            .with_context(|| format!("removing cgroup {}", dir.display()))
    }
}

/// `oom_kill N` of a v2 `memory.events` file (0 when absent: kernels before 4.13).
fn parse_oom_kills_v2(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == "oom_kill")
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_v2_oom_kills() {
        let events = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(parse_oom_kills_v2(events), 1);
        assert_eq!(parse_oom_kills_v2("low 0\n"), 0);
    }

    #[test]
    fn a_directory_outside_any_hierarchy_is_refused() {
        let e = version_at(Path::new("/proc/self/nonexistent-cgroup")).unwrap_err();
        assert!(
            format!("{e:#}").contains("not inside a memory cgroup"),
            "{e:#}"
        );
        let e = BenchCgroups::prepare(Some(Path::new("/proc/self/x"))).unwrap_err();
        assert!(
            format!("{e:#}").contains("not inside a memory cgroup"),
            "{e:#}"
        );
    }
}
