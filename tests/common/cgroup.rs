//! A memory cgroup of the test's own (v1 on a plain Linux host, v2 where the memory
//! controller is on the unified hierarchy), for running the daemon under a real limit.
//! Needs root (CI and the QEMU guest run as root); `TestCgroup::create` says why not.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TestCgroup {
    pub dir: PathBuf,
    pub v2: bool,
}

impl TestCgroup {
    /// A new cgroup limited to `limit` bytes, or why none can be made here.
    pub fn create(name: &str, limit: u64) -> Result<TestCgroup, String> {
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let (root, v2) = if v1.join("memory.limit_in_bytes").exists() {
            (v1.to_path_buf(), false)
        } else if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            (PathBuf::from("/sys/fs/cgroup"), true)
        } else {
            return Err("no memory cgroup hierarchy".into());
        };
        if v2 {
            // Children get the memory controller only if the parent hands it down.
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
        }
        let dir = root.join(format!("memaflow-test-{name}-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let cg = TestCgroup { dir, v2 };
        cg.set_limit(limit)?;
        if !v2 {
            // Memory is not swapped out instead of reclaimed (no swap here anyway).
            let _ = std::fs::write(cg.dir.join("memory.swappiness"), "0");
        }
        Ok(cg)
    }

    fn limit_file(&self) -> PathBuf {
        self.dir.join(if self.v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        })
    }

    /// Sets the limit; fails (v1: EBUSY) when the usage cannot be brought below it.
    pub fn set_limit(&self, limit: u64) -> Result<(), String> {
        std::fs::write(self.limit_file(), limit.to_string())
            .map_err(|e| format!("limit {limit} on {}: {e}", self.dir.display()))
    }

    pub fn usage(&self) -> u64 {
        let file = if self.v2 {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        read_number(&self.dir.join(file))
    }

    /// Processes of this cgroup the kernel's OOM killer has killed.
    pub fn oom_kills(&self) -> u64 {
        let (file, key) = if self.v2 {
            ("memory.events", "oom_kill ")
        } else {
            ("memory.oom_control", "oom_kill ")
        };
        std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// A command that runs `program args…` inside this cgroup (the shell joins it, then
    /// execs the program: nothing runs outside the limit).
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("echo $$ > \"$0\" && exec \"$@\"")
            .arg(self.dir.join("cgroup.procs"))
            .arg(program)
            .args(args);
        c
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Its processes have exited by now; the kernel removes it once they are reaped.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

fn read_number(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}
