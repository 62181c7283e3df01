//! One run as a child process: spawned inside its cgroup, waited for with a time limit,
//! its end classified (finished, OOM-killed, failed, timed out).

use super::cgroup::{CgroupStats, RunCgroup};
use anyhow::{Context, Result};
use std::fmt;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How a child ended, as the process table says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    Code(i32),
    Signal(i32),
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "{c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

impl std::str::FromStr for Exit {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Exit> {
        match s.strip_prefix("signal ") {
            Some(sig) => Ok(Exit::Signal(
                sig.parse().with_context(|| format!("bad exit '{s}'"))?,
            )),
            None => Ok(Exit::Code(
                s.parse().with_context(|| format!("bad exit '{s}'"))?,
            )),
        }
    }
}

impl From<ExitStatus> for Exit {
    fn from(s: ExitStatus) -> Exit {
        match (s.code(), s.signal()) {
            (Some(c), _) => Exit::Code(c),
            (None, Some(sig)) => Exit::Signal(sig),
            // Neither code nor signal: only for stopped/continued, which wait() does not
            // report without WUNTRACED.
            (None, None) => Exit::Code(-1),
        }
    }
}

/// The verdict on a run (its names: `crate::names`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Status {
    /// Finished and wrote its report.
    Ok,
    /// Killed by the kernel's OOM killer in its cgroup.
    OomKilled,
    /// Ended otherwise without a report (an error, someone else's signal).
    Failed,
    /// Killed by the bench after the plan's timeout.
    Timeout,
}

/// A finished child: how it ended and how long it took from spawn to reaping.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ended {
    pub(crate) exit: Exit,
    pub(crate) wall: Duration,
    /// CPU time (user + system) of the child, where the kernel reports it.
    pub(crate) cpu: Option<Duration>,
    pub(crate) timed_out: bool,
}

/// User + system time of all reaped children of this process so far. The bench runs
/// one child at a time, so the difference across a run is that run's.
fn children_cpu() -> Option<Duration> {
    let mut usage = std::mem::MaybeUninit::<nix::libc::rusage>::uninit();
    // SAFETY: getrusage fills the whole struct when it returns 0 (checked first).
    let usage = unsafe {
        if nix::libc::getrusage(nix::libc::RUSAGE_CHILDREN, usage.as_mut_ptr()) != 0 {
            return None;
        }
        usage.assume_init()
    };
    let t = |tv: nix::libc::timeval| {
        Duration::from_secs(tv.tv_sec.max(0) as u64)
            + Duration::from_micros(tv.tv_usec.max(0) as u64)
    };
    Some(t(usage.ru_utime) + t(usage.ru_stime))
}

/// Runs `program args…` with stdout discarded and stderr to `stderr`, inside `cgroup`
/// when given, killing it (SIGKILL) after `limit`.
///
/// The child moves itself into the cgroup between fork and exec by writing `0` ("the
/// writer") to the cgroup's `cgroup.procs`, opened by the parent beforehand: so every
/// byte the child ever allocates is charged to the limited cgroup. Moving it after spawn
/// (cgroups-rs `add_task`) would let it run unlimited for a moment, and on v1 the memory
/// charged until then stays with the old cgroup. Holding it stopped until the parent moves
/// it would need a second pipe, because `Command::spawn` only returns once the child has
/// exec'd. The hook makes one `write(2)` on an inherited descriptor: async-signal-safe,
/// no allocation, as code between fork and exec must be.
pub(crate) fn run(
    program: &Path,
    args: &[String],
    stderr: &Path,
    cgroup: Option<&RunCgroup>,
    limit: Duration,
) -> Result<Ended> {
    let err =
        std::fs::File::create(stderr).with_context(|| format!("creating {}", stderr.display()))?;
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err);
    if let Some(cg) = cgroup {
        let fd = cg.procs().as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec; it only calls
        // write(2), which is async-signal-safe, on a descriptor the parent keeps open
        // until the child has been spawned, and builds its error without allocating.
        unsafe {
            command.pre_exec(move || {
                let n = nix::libc::write(fd, b"0".as_ptr().cast(), 1);
                if n == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let cpu_before = children_cpu();
    let start = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let cpu = || Some(children_cpu()?.saturating_sub(cpu_before?));
    loop {
        if let Some(status) = child.try_wait().context("waiting for the child")? {
            return Ok(Ended {
                exit: status.into(),
                wall: start.elapsed(),
                cpu: cpu(),
                timed_out: false,
            });
        }
        if start.elapsed() > limit {
            child.kill().ok();
            let status = child
                .wait()
                .context("reaping the child after its time limit")?;
            return Ok(Ended {
                exit: status.into(),
                wall: start.elapsed(),
                cpu: cpu(),
                timed_out: true,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The verdict: a child that did not finish cleanly while its cgroup recorded an OOM
/// kill was OOM-killed; any other unclean end failed.
pub(crate) fn classify(ended: &Ended, stats: Option<&CgroupStats>, report_ok: bool) -> Status {
    if ended.timed_out {
        return Status::Timeout;
    }
    let clean = ended.exit == Exit::Code(0);
    if clean && report_ok {
        return Status::Ok;
    }
    if !clean && stats.is_some_and(|s| s.oom_kills > 0) {
        return Status::OomKilled;
    }
    Status::Failed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(exit: Exit, timed_out: bool) -> Ended {
        Ended {
            exit,
            wall: Duration::from_secs(1),
            cpu: None,
            timed_out,
        }
    }

    #[test]
    fn classifies_ends() {
        let oom = CgroupStats {
            peak: Some(1),
            oom_kills: 1,
        };
        let calm = CgroupStats::default();
        assert_eq!(
            classify(&ended(Exit::Code(0), false), Some(&calm), true),
            Status::Ok
        );
        assert_eq!(
            classify(&ended(Exit::Signal(9), false), Some(&oom), false),
            Status::OomKilled
        );
        // Killed without an OOM kill in its cgroup: someone else's SIGKILL.
        assert_eq!(
            classify(&ended(Exit::Signal(9), false), Some(&calm), false),
            Status::Failed
        );
        assert_eq!(
            classify(&ended(Exit::Signal(9), false), None, false),
            Status::Failed
        );
        assert_eq!(
            classify(&ended(Exit::Code(0), false), Some(&calm), false),
            Status::Failed
        );
        assert_eq!(
            classify(&ended(Exit::Signal(9), true), Some(&oom), false),
            Status::Timeout
        );
        for e in [Exit::Code(2), Exit::Signal(9)] {
            assert_eq!(e.to_string().parse::<Exit>().unwrap(), e);
        }
    }

    #[test]
    fn runs_a_child_and_reports_its_end() {
        let dir = std::env::temp_dir().join(format!("memaflow-child-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = dir.join("stderr.txt");
        let sh = Path::new("/bin/sh");
        let args = |s: &str| vec!["-c".to_string(), s.to_string()];
        let e = run(
            sh,
            &args("echo oops >&2; exit 3"),
            &err,
            None,
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(e.exit, Exit::Code(3));
        assert!(!e.timed_out);
        assert_eq!(std::fs::read_to_string(&err).unwrap(), "oops\n");
        let busy = "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done";
        let e = run(sh, &args(busy), &err, None, Duration::from_secs(30)).unwrap();
        let cpu = e.cpu.expect("CPU time of a child");
        // Only a lower bound: other tests' children may be reaped meanwhile (the bench
        // itself runs one child at a time).
        assert!(cpu > Duration::from_millis(20), "{e:?}");
        let e = run(sh, &args("sleep 5"), &err, None, Duration::from_millis(200)).unwrap();
        assert!(e.timed_out);
        assert_eq!(e.exit, Exit::Signal(9));
        assert!(e.wall < Duration::from_secs(4));
        std::fs::remove_dir_all(&dir).ok();
    }
}
