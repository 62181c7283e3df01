//! `memaflow run`: the spool daemon. Finishes what an earlier run left in `work/`, then
//! claims and processes frames from `incoming/`, one at a time, woken by inotify with a
//! periodic rescan as fallback (`--once`: until `incoming/` is empty, then exit).
//!
//! SIGTERM and SIGINT are blocked and read from a signalfd, so no handler code runs in
//! signal context. On either, the daemon claims nothing more; the frame in hand gets
//! `stop_grace_secs` to finish, else it is put back into `incoming/` and the daemon exits 0.

use super::config::{Config, DonePolicy};
use super::layout::Spool;
use super::pipeline::{self, Model, Outcome, unix_now};
use super::status::{LastError, State, Status};
use crate::memory::SystemMemory;
use anyhow::{Context, Result, anyhow};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::ffi::OsString;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

/// How often the status file is refreshed while idle.
const STATUS_EVERY: Duration = Duration::from_secs(60);
/// How often signals are checked while a frame is being processed.
const TICK: Duration = Duration::from_millis(50);

pub struct RunOptions {
    pub config: PathBuf,
    pub board: Option<String>,
    /// Process what is there (and what arrives meanwhile), then exit.
    pub once: bool,
}

/// Runs the daemon. Call before any other thread exists: SIGTERM and SIGINT are blocked
/// here, and threads started earlier would still take them with the default action.
pub fn run(opts: &RunOptions) -> Result<()> {
    let signals = Signals::block()?;
    let config = Config::load(&opts.config, opts.board.as_deref())?;
    if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(config.log_level);
    }
    let spool = Spool::open(&config.spool.root)?;
    log::info!(
        "spool {}; board {}; budget {}, reserve {}, {:?}/{:?}, parallel {}, {} threads",
        spool.root.display(),
        config.board.as_deref().unwrap_or("none (not detected)"),
        config
            .run
            .budget
            .map_or("none".into(), |b| crate::memory::Bytes(b).to_string()),
        crate::memory::Bytes(config.run.reserve),
        config.run.loading,
        config.run.scheduling,
        config.run.parallel,
        config.run.threads,
    );
    let system = SystemMemory::detect();
    let models: Vec<Model> = config
        .models
        .iter()
        .map(|m| Model::load(m, &config.run, &system))
        .collect();
    let usable = models.iter().filter(|m| m.error().is_none()).count();
    if models.is_empty() {
        log::warn!("no models configured: frames wait in incoming/ until there are some");
    } else {
        log::info!("{usable} of {} models usable", models.len());
    }
    let status = Status {
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
    };
    let mut d = Daemon {
        config,
        spool,
        models: Arc::new(models),
        system,
        status,
        signals,
        stop: false,
        unclaimable: HashSet::new(),
        status_written: Instant::now(),
    };
    d.write_status()?;
    d.recover()?;
    if !d.stop {
        if opts.once {
            while !d.stop && d.scan(None, &mut HashSet::new())?.claimed > 0 {}
        } else {
            d.watch()?;
        }
    }
    d.status.state = State::Stopped;
    d.write_status()?;
    log::info!(
        "stopped: {} frames done, {} failed",
        d.status.frames_done,
        d.status.frames_failed
    );
    Ok(())
}

struct Signals {
    fd: SignalFd,
}

impl Signals {
    fn block() -> Result<Signals> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGINT);
        set.thread_block().context("blocking SIGTERM and SIGINT")?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .context("creating a signalfd")?;
        Ok(Signals { fd })
    }

    /// The stop signal that arrived, if any (without waiting).
    fn take(&self) -> Result<Option<Signal>> {
        match self.fd.read_signal() {
            Ok(Some(info)) => Ok(Signal::try_from(info.ssi_signo as i32).ok()),
            Ok(None) | Err(Errno::EAGAIN) => Ok(None),
            Err(e) => Err(e).context("reading the signalfd"),
        }
    }
}

struct Scan {
    claimed: usize,
    /// Regular files left for later: changed too recently to be surely complete.
    settling: bool,
}

struct Daemon {
    config: Config,
    spool: Spool,
    models: Arc<Vec<Model>>,
    system: SystemMemory,
    status: Status,
    signals: Signals,
    stop: bool,
    /// Entries of `incoming/` that could not be claimed, logged once each.
    unclaimable: HashSet<OsString>,
    status_written: Instant,
}

impl Daemon {
    fn write_status(&mut self) -> Result<()> {
        let bytes = self.status.render(&self.system)?;
        self.spool.write_status(&bytes)?;
        self.status_written = Instant::now();
        Ok(())
    }

    fn note_signal(&mut self, signal: Option<Signal>) {
        if let Some(s) = signal {
            if !self.stop {
                log::info!("{s}: stopping (no more frames are claimed)");
            }
            self.stop = true;
            self.status.state = State::Stopping;
        }
    }

    /// Frames an earlier run claimed and did not finish: moved on if their result or
    /// error record is already written, processed again otherwise.
    fn recover(&mut self) -> Result<()> {
        if self.models.is_empty() {
            return Ok(());
        }
        for name in self.spool.in_work()? {
            let signal = self.signals.take()?;
            self.note_signal(signal);
            if self.stop {
                break;
            }
            if self.spool.has_result(&name) {
                log::info!("{name}: result already written by an earlier run; not run again");
                self.spool.release(&name, self.config.spool.done)?;
            } else if self.spool.has_error_record(&name) {
                log::info!("{name}: failure already recorded by an earlier run");
                self.spool.release_failed(&name)?;
            } else {
                log::info!("{name}: claimed by an earlier run that did not finish; retrying");
                self.handle(name)?;
            }
        }
        Ok(())
    }

    /// Claims and processes what `incoming/` holds. With `settle`, a regular file not
    /// `announced` by inotify is left until it has been unchanged that long.
    fn scan(
        &mut self,
        settle: Option<Duration>,
        announced: &mut HashSet<OsString>,
    ) -> Result<Scan> {
        let mut scan = Scan {
            claimed: 0,
            settling: false,
        };
        if self.models.is_empty() {
            return Ok(scan);
        }
        let entries = self.spool.incoming()?;
        // Forget names no longer there, so neither set grows over a long run.
        let present: HashSet<&OsString> = entries.iter().map(|e| &e.name).collect();
        announced.retain(|n| present.contains(n));
        self.unclaimable.retain(|n| present.contains(n));
        for entry in entries {
            let signal = self.signals.take()?;
            self.note_signal(signal);
            if self.stop {
                break;
            }
            if let (Some(settle), Some(modified)) = (settle, entry.modified) {
                let young = modified.elapsed().is_ok_and(|age| age < settle);
                if young && !announced.contains(&entry.name) {
                    scan.settling = true;
                    continue;
                }
            }
            announced.remove(&entry.name);
            match self.spool.claim(&entry.name) {
                Ok(Some(name)) => {
                    scan.claimed += 1;
                    self.unclaimable.remove(&entry.name);
                    self.handle(name)?;
                }
                Ok(None) => {}
                Err(e) => {
                    if self.unclaimable.insert(entry.name.clone()) {
                        log::error!("{}: cannot be claimed: {e:#}", entry.name.to_string_lossy());
                    }
                }
            }
        }
        Ok(scan)
    }

    /// Processes `work/NAME` and records its fate.
    fn handle(&mut self, name: String) -> Result<()> {
        let path = self.spool.work_path(&name);
        let (models, run, system) = (
            self.models.clone(),
            self.config.run.clone(),
            self.system.clone(),
        );
        let limit = self.config.spool.max_frame_bytes;
        let frame = name.clone();
        let (done, outcome) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("frame".into())
            .spawn(move || {
                let cx = pipeline::Setup {
                    models: &models,
                    run: &run,
                    max_frame_bytes: limit,
                    system: &system,
                };
                // The receiver is gone only if the daemon stopped waiting for this frame.
                let _ = done.send(pipeline::process(&frame, &path, &cx));
            })
            .context("starting the frame's thread")?;
        let mut deadline = None;
        let outcome = loop {
            match outcome.recv_timeout(TICK) {
                Ok(outcome) => break outcome,
                // The sender is dropped without sending only when processing panicked.
                Err(RecvTimeoutError::Disconnected) => {
                    break Outcome::Failed(pipeline::FrameError {
                        stage: pipeline::FrameStage::Internal,
                        reason: "processing panicked (a bug: please report it with the frame)"
                            .into(),
                        models: vec![],
                    });
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            let signal = self.signals.take()?;
            self.note_signal(signal);
            if self.stop {
                let grace = self.config.spool.stop_grace;
                let at = *deadline.get_or_insert_with(|| Instant::now() + grace);
                if Instant::now() >= at {
                    log::info!("{name}: not finished in {grace:?}; put back into incoming/");
                    return self.spool.requeue(&name);
                }
            }
        };
        self.record(&name, outcome)
    }

    fn record(&mut self, name: &str, outcome: Outcome) -> Result<()> {
        match outcome {
            Outcome::Done(result) => {
                let mut bytes = serde_json::to_vec_pretty(&result)?;
                bytes.push(b'\n');
                self.spool
                    .complete(name, &bytes, self.config.spool.done)
                    .with_context(|| format!("{name}: recording the result"))?;
                self.status.frames_done += 1;
                log::info!("{name}: {}", one_line(&result, self.config.spool.done));
            }
            Outcome::Failed(e) => {
                let record = json!({
                    "frame": name,
                    "stage": e.stage,
                    "reason": e.reason,
                    "models": e.models,
                    "failed_unix": unix_now(),
                });
                let mut bytes = serde_json::to_vec_pretty(&record)?;
                bytes.push(b'\n');
                self.spool
                    .fail(name, &bytes)
                    .with_context(|| format!("{name}: recording the failure"))?;
                self.status.frames_failed += 1;
                log::warn!("{name}: failed ({}): {}", e.stage.name(), e.reason);
                self.status.last_error = Some(LastError {
                    frame: name.to_string(),
                    stage: e.stage,
                    reason: e.reason,
                    at_unix: unix_now(),
                });
            }
        }
        self.write_status()
    }

    fn watch(&mut self) -> Result<()> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .context("initialising inotify")?;
        inotify
            .add_watch(
                self.spool.incoming_dir(),
                AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_CLOSE_WRITE
                    | AddWatchFlags::IN_CREATE,
            )
            .with_context(|| format!("watching {}", self.spool.incoming_dir().display()))?;
        let (rescan, settle) = (self.config.spool.rescan, self.config.spool.settle);
        log::info!(
            "watching {} (rescan every {rescan:?})",
            self.spool.incoming_dir().display()
        );
        let mut announced = HashSet::new();
        loop {
            let scan = self.scan(Some(settle), &mut announced)?;
            if self.stop {
                return Ok(());
            }
            if scan.claimed == 0 && self.status_written.elapsed() >= STATUS_EVERY {
                self.write_status()?;
            }
            let wait = if scan.settling {
                settle.min(rescan)
            } else {
                rescan
            };
            let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
            let mut fds = [
                PollFd::new(self.signals.fd.as_fd(), PollFlags::POLLIN),
                PollFd::new(inotify.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e).context("waiting for frames"),
            }
            let signal = self.signals.take()?;
            self.note_signal(signal);
            if self.stop {
                return Ok(());
            }
            loop {
                match inotify.read_events() {
                    Ok(events) => {
                        for ev in events {
                            let complete = ev.mask.intersects(
                                AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE,
                            );
                            if let (true, Some(name)) = (complete, ev.name) {
                                // Hidden names are producers' temp files, never claimed.
                                if !name.as_encoded_bytes().starts_with(b".") {
                                    announced.insert(name);
                                }
                            }
                        }
                    }
                    Err(Errno::EAGAIN) => break,
                    Err(e) => return Err(anyhow!(e).context("reading inotify events")),
                }
            }
        }
    }
}

/// The log line of a finished frame: each model's verdict and the time taken.
fn one_line(result: &Value, done: DonePolicy) -> String {
    let models: Vec<String> = result["models"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    let name = m["name"].as_str().unwrap_or("?");
                    if m.get("error").is_some() {
                        format!("{name} error")
                    } else if let Some(n) = m["outputs"]["detections"].as_array().map(Vec::len) {
                        format!("{name} {n} detection(s)")
                    } else {
                        format!("{name} ok")
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "{}×{}, {} in {} ms; {}",
        result["width"],
        result["height"],
        models.join(", "),
        result["time_ms"]["total"],
        match done {
            DonePolicy::Move => "moved to done/",
            DonePolicy::Delete => "deleted",
        }
    )
}
