//! `status.json` in the spool's root: what the daemon has done and how memory, disk and
//! the watchdog stand, replaced atomically so a reader never sees half of it. This struct
//! is the one definition of its schema (docs/spool.md); the metrics file (`metrics.rs`)
//! is rendered from the same value at the same moment, so the two always agree.

use super::config::{Config, RunConfig};
use super::pipeline::{Model, unix_now};
use super::schema::{FrameStage, ModelError};
use crate::memory::{self, SystemMemory};
use crate::runtime::ExecutorSnapshot;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Upper bounds of the frame latency histogram's buckets, in seconds: from a small model
/// on a PC to a tiled one on a Pi Zero.
pub(crate) const LATENCY_BOUNDS_SECS: [f64; 12] = [
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// `status.json`: the daemon's state, counters, memory, disk and watchdog, rewritten
/// after every frame and at every rescan (readers get a whole file, never half of one).
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    /// The daemon's process id.
    pub pid: u32,
    /// memaflow's version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// Running, stopping after a signal, or stopped.
    pub state: State,
    /// The board defaults the configuration was read with, if any.
    pub board: Option<String>,
    /// When the daemon started, seconds since the Unix epoch.
    pub started_unix: f64,
    /// When this status was written, seconds since the Unix epoch.
    pub updated_unix: f64,
    /// Frames whose result (done) or failure record (failed) is written, since start.
    pub frames_done: u64,
    /// Frames moved to `failed/` with a failure record, since start.
    pub frames_failed: u64,
    /// Frames claimed and not yet recorded, now; `frames_deferred` of them are processed
    /// and wait for disk space to record their outcome.
    pub frames_in_flight: usize,
    /// Processed frames whose outcome waits for disk space.
    pub frames_deferred: usize,
    /// The last frame that failed, if one has.
    pub last_error: Option<LastError>,
    /// Claim to record of every recorded frame (done and failed).
    pub latency: Histogram,
    /// Per model name that can run: its inferences with outputs (`ok`) and without.
    pub inferences: Vec<InferenceCount>,
    /// The spool's file system.
    pub disk: Disk,
    /// The systemd watchdog and frames that stall it.
    pub watchdog: Watchdog,
    /// The `[run]` settings in force (policies, budget, cache, tiling).
    pub run: RunConfig,
    /// Every configured model, in configuration order, with its start-up error if any.
    pub models: Vec<ModelStatus>,
    /// The last memory readings (absent before the first).
    pub memory: Option<MemoryNow>,
    /// The ledger and the layer cache: per model, its resident layers and bytes.
    pub cache: Option<ExecutorSnapshot>,
}

/// The daemon's life cycle, as `status.json` and `memaflow_state` show it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Claiming and processing frames.
    Running,
    /// A stop signal arrived: nothing more is claimed.
    Stopping,
    /// Every frame in hand finished or requeued; the process is exiting.
    Stopped,
}

/// The most recent frame failure, as the failure record gives it.
#[derive(Debug, Serialize, Deserialize)]
pub struct LastError {
    /// The frame's name, lossy where it is not UTF-8 (the failure record has the bytes).
    pub frame: String,
    /// Where the frame failed.
    pub stage: FrameStage,
    /// The error and its causes, outermost first.
    pub reason: String,
    /// When it failed, seconds since the Unix epoch.
    pub at_unix: f64,
}

/// One configured model as the daemon found it at start.
#[derive(Debug, Serialize, Deserialize)]
pub struct ModelStatus {
    /// The package's name (its directory's name when it cannot be opened).
    pub name: String,
    /// The package's directory.
    pub path: PathBuf,
    /// Why it cannot run (a missing or damaged package, a configuration that does
    /// not fit it); its frames' results carry the same error.
    pub error: Option<ModelError>,
    /// The tiling configuration it runs under, if it runs tiled.
    pub tiling: Option<String>,
}

/// Memory readings at the last status write, as the memory gate sees them.
#[derive(Debug, Serialize, Deserialize)]
pub struct MemoryNow {
    /// The daemon's resident set (`VmRSS`).
    pub rss_bytes: Option<u64>,
    /// The daemon's peak resident set since start (`VmHWM`).
    pub peak_rss_bytes: Option<u64>,
    /// `MemAvailable` from `/proc/meminfo`.
    pub mem_available_bytes: Option<u64>,
    /// The daemon's memory cgroup limit, if it has one.
    pub cgroup_limit_bytes: Option<u64>,
    /// What the memory gate would allow beyond what is resident now (reserve deducted).
    pub headroom_bytes: Option<u64>,
    /// The kernel's memory event counters of the daemon's cgroup (`memory.events` or
    /// v1's `memory.oom_control`), by the kernel's names; absent when not readable.
    pub cgroup_events: Option<BTreeMap<String, u64>>,
}

/// A histogram of durations: `counts[i]` frames took at most `bounds_secs[i]` and more
/// than the bound before; the last count is above every bound.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Histogram {
    /// Upper bounds of the buckets, seconds, increasing.
    pub bounds_secs: Vec<f64>,
    /// Frames per bucket (one more entry than `bounds_secs`: above every bound).
    pub counts: Vec<u64>,
    /// Sum of every observed duration, seconds.
    pub sum_secs: f64,
    /// Frames observed.
    pub count: u64,
}

impl Histogram {
    pub(crate) fn new(bounds_secs: &[f64]) -> Histogram {
        Histogram {
            bounds_secs: bounds_secs.to_vec(),
            counts: vec![0; bounds_secs.len() + 1],
            sum_secs: 0.0,
            count: 0,
        }
    }

    pub(crate) fn observe(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds_secs.partition_point(|&b| b < secs);
        self.counts[i] += 1;
        self.sum_secs += secs;
        self.count += 1;
    }
}

/// Inferences of one model since start, by whether they produced outputs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct InferenceCount {
    /// The model's name.
    pub model: String,
    /// Inferences that produced outputs.
    pub ok: u64,
    /// Inferences that did not (an error at preprocessing, a layer or the report).
    pub failed: u64,
}

/// The spool's file system as the daemon sees it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Disk {
    /// Ok, low or full.
    pub state: DiskState,
    /// Free bytes for the daemon (`statvfs` f_bavail), at the last check.
    pub free_bytes: Option<u64>,
    /// Below this many free bytes, nothing is claimed (`spool.min_free`).
    pub min_free_bytes: u64,
    /// Writes of a result, failure record or status that found the disk full, since start.
    pub full_writes: u64,
    /// When the state last changed.
    pub since_unix: f64,
}

/// The spool's file system: whether frames are claimed and outcomes written.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DiskState {
    /// Enough free space: frames are claimed.
    Ok,
    /// Less than `min_free_bytes` free: no frame is claimed until there is more.
    Low,
    /// A write found the disk full: the outcomes of processed frames wait (the frames in
    /// `work/`) and are written again with a backoff; nothing is claimed meanwhile.
    Full,
}

/// The systemd watchdog as the main loop feeds it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Watchdog {
    /// Whether systemd asked for pings (`WATCHDOG_USEC`).
    pub enabled: bool,
    /// A frame has been in flight longer than `stall_secs`: the pings have stopped.
    pub stalled: bool,
    /// How long a frame may be in flight before the pings stop (`spool.stall_secs`).
    pub stall_secs: f64,
    /// How long the oldest frame in hand has been in flight.
    pub oldest_frame_secs: f64,
}

impl Status {
    /// A running daemon's status before its first frame.
    pub(crate) fn new(config: &Config, models: &[Model], watchdog: bool) -> Status {
        let now = unix_now();
        let mut status = Status {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            state: State::Running,
            board: config.board.clone(),
            started_unix: now,
            updated_unix: 0.0,
            frames_done: 0,
            frames_failed: 0,
            frames_in_flight: 0,
            frames_deferred: 0,
            last_error: None,
            latency: Histogram::new(&LATENCY_BOUNDS_SECS),
            inferences: vec![],
            disk: Disk {
                state: DiskState::Ok,
                free_bytes: None,
                min_free_bytes: config.spool.min_free,
                full_writes: 0,
                since_unix: now,
            },
            watchdog: Watchdog {
                enabled: watchdog,
                stalled: false,
                stall_secs: config.spool.stall.as_secs_f64(),
                oldest_frame_secs: 0.0,
            },
            run: config.run.clone(),
            models: models
                .iter()
                .map(|m| ModelStatus {
                    name: m.name.clone(),
                    path: m.path.clone(),
                    error: m.error().cloned(),
                    tiling: m.tiling().map(|c| c.to_string()),
                })
                .collect(),
            memory: None,
            cache: None,
        };
        // Every usable model from the start, at zero (once: a package configured twice
        // is one model name).
        for m in models.iter().filter(|m| m.error().is_none()) {
            if !status.inferences.iter().any(|c| c.model == m.name) {
                status.inferences.push(InferenceCount {
                    model: m.name.clone(),
                    ..InferenceCount::default()
                });
            }
        }
        status
    }

    /// Counts one inference of `model`.
    pub(crate) fn inference(&mut self, model: &str, ok: bool) {
        let i = match self.inferences.iter().position(|c| c.model == model) {
            Some(i) => i,
            None => {
                self.inferences.push(InferenceCount {
                    model: model.into(),
                    ..InferenceCount::default()
                });
                self.inferences.len() - 1
            }
        };
        if ok {
            self.inferences[i].ok += 1;
        } else {
            self.inferences[i].failed += 1;
        }
    }

    /// Fresh timestamps and memory readings.
    pub(crate) fn refresh(&mut self, system: &SystemMemory, cache: ExecutorSnapshot) {
        self.updated_unix = unix_now();
        let process = memory::process_memory().ok();
        let reading = system.read().ok();
        self.memory = Some(MemoryNow {
            rss_bytes: process.map(|p| p.rss),
            peak_rss_bytes: process.map(|p| p.peak_rss),
            mem_available_bytes: reading.as_ref().and_then(|r| r.mem_available),
            cgroup_limit_bytes: reading.as_ref().and_then(|r| r.cgroup_limit()),
            headroom_bytes: reading.as_ref().and_then(|r| r.headroom(self.run.reserve)),
            cgroup_events: system.events(),
        });
        self.cache = Some(cache);
    }

    pub(crate) fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        let mut bytes = serde_json::to_vec_pretty(self)?;
        bytes.push(b'\n');
        Ok(bytes)
    }

    /// One line for `systemctl status` (sd_notify `STATUS=`).
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{:?}: {} done, {} failed, {} in flight",
            self.state, self.frames_done, self.frames_failed, self.frames_in_flight
        )
        .to_lowercase();
        match self.disk.state {
            DiskState::Ok => {}
            DiskState::Low => s.push_str("; disk low: not claiming"),
            DiskState::Full => s.push_str(&format!(
                "; disk full: {} outcome(s) wait",
                self.frames_deferred
            )),
        }
        if self.watchdog.stalled {
            s.push_str(&format!(
                "; stalled: a frame in flight for {:.0} s",
                self.watchdog.oldest_frame_secs
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_include_their_upper_bound() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for ms in [50, 100, 101, 1000, 5000] {
            h.observe(Duration::from_millis(ms));
        }
        assert_eq!(h.counts, [2, 2, 1]);
        assert_eq!(h.count, 5);
        assert!((h.sum_secs - 6.251).abs() < 1e-9);
    }
}
