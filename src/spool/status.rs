//! `status.json` in the spool's root: what the daemon has done and how memory stands,
//! replaced atomically so a reader never sees half of it.

use super::config::{Config, RunConfig};
use super::pipeline::{Model, unix_now};
use super::schema::FrameStage;
use crate::memory::{self, SystemMemory};
use crate::runtime::ExecutorSnapshot;
use serde::Serialize;
use serde_json::Value;
use serde_json::json;

#[derive(Debug, Serialize)]
pub struct Status {
    pub pid: u32,
    pub version: &'static str,
    pub state: State,
    pub board: Option<String>,
    pub started_unix: f64,
    pub updated_unix: f64,
    /// Frames finished (result written) and failed since the daemon started.
    pub frames_done: u64,
    pub frames_failed: u64,
    pub last_error: Option<LastError>,
    pub run: RunConfig,
    pub models: Vec<Value>,
    pub memory: Option<MemoryNow>,
    /// The ledger and the layer cache: per model, its resident layers and bytes.
    pub cache: Option<ExecutorSnapshot>,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Running,
    /// A stop signal arrived: nothing more is claimed.
    Stopping,
    Stopped,
}

#[derive(Debug, Serialize)]
pub struct LastError {
    pub frame: String,
    pub stage: FrameStage,
    pub reason: String,
    pub at_unix: f64,
}

#[derive(Debug, Serialize)]
pub struct MemoryNow {
    pub rss_bytes: Option<u64>,
    pub peak_rss_bytes: Option<u64>,
    pub mem_available_bytes: Option<u64>,
    pub cgroup_limit_bytes: Option<u64>,
    /// What the memory gate would allow beyond what is resident now (reserve deducted).
    pub headroom_bytes: Option<u64>,
}

impl Status {
    /// A running daemon's status before its first frame.
    pub fn new(config: &Config, models: &[Model]) -> Status {
        Status {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION"),
            state: State::Running,
            board: config.board.clone(),
            started_unix: unix_now(),
            updated_unix: 0.0,
            frames_done: 0,
            frames_failed: 0,
            last_error: None,
            run: config.run.clone(),
            models: models
                .iter()
                .map(|m| {
                    json!({
                        "name": m.name,
                        "path": m.path,
                        "error": m.error(),
                        "tiling": m.tiling().map(|c| c.to_string()),
                    })
                })
                .collect(),
            memory: None,
            cache: None,
        }
    }

    /// Fresh timestamps and memory readings, as JSON.
    pub fn render(&mut self, system: &SystemMemory) -> serde_json::Result<Vec<u8>> {
        self.updated_unix = unix_now();
        let process = memory::process_memory().ok();
        let reading = system.read().ok();
        self.memory = Some(MemoryNow {
            rss_bytes: process.map(|p| p.rss),
            peak_rss_bytes: process.map(|p| p.peak_rss),
            mem_available_bytes: reading.as_ref().and_then(|r| r.mem_available),
            cgroup_limit_bytes: reading.as_ref().and_then(|r| r.cgroup_limit()),
            headroom_bytes: reading.as_ref().and_then(|r| r.headroom(self.run.reserve)),
        });
        let mut bytes = serde_json::to_vec_pretty(self)?;
        bytes.push(b'\n');
        Ok(bytes)
    }
}
