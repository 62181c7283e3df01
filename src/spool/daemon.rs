//! `memaflow run`: the spool daemon. Finishes what an earlier run left in `work/`, then
//! claims and processes frames from `incoming/`, up to `[run] frames_in_flight` at once,
//! woken by inotify with a periodic rescan as fallback (`--once`: until `incoming/` is
//! empty, then exit). All frames' inferences go to one executor: one memory gate, one
//! cache of resident layers. Results are recorded by this thread alone, as frames finish
//! (not necessarily in claim order).
//!
//! SIGTERM and SIGINT are blocked and read from a signalfd, so no handler code runs in
//! signal context. On either, the daemon claims nothing more; the frames in hand get
//! `stop_grace_secs` to finish, the rest are put back into `incoming/`, and it exits 0.

use super::config::{Config, DonePolicy};
use super::layout::Spool;
use super::pipeline::{self, Model, Outcome, unix_now};
use super::schema::{FailureRecord, FrameResult, FrameStage, Outputs};
use super::status::{LastError, State, Status};
use crate::memory::SystemMemory;
use crate::runtime::{Executor, ExecutorOptions, SchedulerOptions};
use anyhow::{Context, Result, anyhow};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// How often the status file is refreshed while idle.
const STATUS_EVERY: Duration = Duration::from_secs(60);
/// How often signals are checked while frames are being processed.
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
    log_start(&spool, &config);
    let system = SystemMemory::detect();
    let executor = Arc::new(Executor::start(executor_options(&config), system.clone())?);
    let models = pipeline::load_all(&config.models, &config.run, &system, &executor);
    let usable = models.iter().filter(|m| m.error().is_none()).count();
    if models.is_empty() {
        log::warn!("no models configured: frames wait in incoming/ until there are some");
    } else {
        log::info!("{usable} of {} models usable", models.len());
    }
    let status = Status::new(&config, &models);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let mut d = Daemon {
        config,
        spool,
        models: Arc::new(models),
        executor,
        system,
        status,
        signals,
        stop: false,
        unclaimable: HashSet::new(),
        status_written: Instant::now(),
        in_flight: vec![],
        retry: VecDeque::new(),
        done_tx,
        done_rx,
    };
    d.write_status()?;
    d.recover()?;
    d.main_loop(opts.once)?;
    d.stop_in_flight()?;
    d.status.state = State::Stopped;
    d.write_status()?;
    log::info!(
        "stopped: {} frames done, {} failed",
        d.status.frames_done,
        d.status.frames_failed
    );
    Ok(())
}

fn log_start(spool: &Spool, config: &Config) {
    let run = &config.run;
    log::info!(
        "spool {}; board {}; budget {}, reserve {}, {:?}/{:?}, parallel {}, {} threads, {} frames in flight, layer cache {:?}",
        spool.root.display(),
        config.board.as_deref().unwrap_or("none (not detected)"),
        run.budget
            .map_or("none".into(), |b| crate::memory::Bytes(b).to_string()),
        crate::memory::Bytes(run.reserve),
        run.loading,
        run.scheduling,
        run.parallel,
        run.threads,
        run.frames_in_flight,
        run.cache,
    );
}

fn executor_options(config: &Config) -> ExecutorOptions {
    let run = &config.run;
    ExecutorOptions {
        scheduler: SchedulerOptions {
            policy: run.scheduling,
            loading: run.loading,
            budget: run.budget,
            parallel: run.parallel,
            cache: run.cache,
            eviction: run.eviction,
        },
        reserve: run.reserve,
        workers: run.threads,
        record: false,
    }
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

/// A frame being processed on its own thread.
struct InFlight {
    name: String,
}

/// What a frame's thread sends back.
type Finished = (String, Outcome);

struct Daemon {
    config: Config,
    spool: Spool,
    models: Arc<Vec<Model>>,
    executor: Arc<Executor>,
    system: SystemMemory,
    status: Status,
    signals: Signals,
    stop: bool,
    /// Entries of `incoming/` that could not be claimed, logged once each.
    unclaimable: HashSet<OsString>,
    status_written: Instant,
    in_flight: Vec<InFlight>,
    /// Frames in `work/` from an earlier run, to process before claiming new ones.
    retry: VecDeque<String>,
    done_tx: Sender<Finished>,
    done_rx: Receiver<Finished>,
}

/// Names of `incoming/` to claim, from its last listing.
#[derive(Default)]
struct Listing {
    names: VecDeque<OsString>,
    /// Regular files left for later: changed too recently to be surely complete.
    settling: bool,
    /// Whether `incoming/` should be listed again before waiting: an event arrived or
    /// the rescan interval passed since the last listing.
    stale: bool,
}

impl Daemon {
    fn write_status(&mut self) -> Result<()> {
        self.status.cache = Some(self.executor.snapshot());
        let bytes = self.status.render(&self.system)?;
        self.spool.write_status(&bytes)?;
        self.status_written = Instant::now();
        Ok(())
    }

    fn check_signal(&mut self) -> Result<()> {
        if let Some(s) = self.signals.take()? {
            if !self.stop {
                log::info!("{s}: stopping (no more frames are claimed)");
            }
            self.stop = true;
            self.status.state = State::Stopping;
        }
        Ok(())
    }

    fn capacity(&self) -> usize {
        if self.models.is_empty() {
            0
        } else {
            self.config.run.frames_in_flight
        }
    }

    /// Frames an earlier run claimed and did not finish: moved on if their result or
    /// error record is already written, queued to be processed again otherwise.
    fn recover(&mut self) -> Result<()> {
        if self.models.is_empty() {
            return Ok(());
        }
        for name in self.spool.in_work()? {
            if self.spool.has_result(&name) {
                log::info!("{name}: result already written by an earlier run; not run again");
                self.spool.release(&name, self.config.spool.done)?;
            } else if self.spool.has_error_record(&name) {
                log::info!("{name}: failure already recorded by an earlier run");
                self.spool.release_failed(&name)?;
            } else {
                log::info!("{name}: claimed by an earlier run that did not finish; retrying");
                self.retry.push_back(name);
            }
        }
        Ok(())
    }

    /// Claims and dispatches frames until `frames_in_flight` are in hand or none is left
    /// to claim now.
    fn fill(
        &mut self,
        listing: &mut Listing,
        settle: Option<Duration>,
        announced: &mut HashSet<OsString>,
    ) -> Result<()> {
        while self.in_flight.len() < self.capacity() && !self.stop {
            if let Some(name) = self.retry.pop_front() {
                self.dispatch(name)?;
                continue;
            }
            if listing.names.is_empty() {
                if !listing.stale {
                    return Ok(());
                }
                self.list(listing, settle, announced)?;
                if listing.names.is_empty() {
                    return Ok(());
                }
            }
            let Some(entry) = listing.names.pop_front() else {
                return Ok(());
            };
            announced.remove(&entry);
            match self.spool.claim(&entry) {
                Ok(Some(name)) => {
                    self.unclaimable.remove(&entry);
                    self.dispatch(name)?;
                }
                Ok(None) => {}
                Err(e) => {
                    if self.unclaimable.insert(entry.clone()) {
                        log::error!("{}: cannot be claimed: {e:#}", entry.to_string_lossy());
                    }
                }
            }
            self.check_signal()?;
        }
        Ok(())
    }

    /// Lists `incoming/` into `listing`. With `settle`, a regular file not `announced` by
    /// inotify is left until it has been unchanged that long.
    fn list(
        &mut self,
        listing: &mut Listing,
        settle: Option<Duration>,
        announced: &mut HashSet<OsString>,
    ) -> Result<()> {
        let entries = self.spool.incoming()?;
        // Forget names no longer there, so neither set grows over a long run.
        let present: HashSet<&OsString> = entries.iter().map(|e| &e.name).collect();
        announced.retain(|n| present.contains(n));
        self.unclaimable.retain(|n| present.contains(n));
        listing.stale = false;
        listing.settling = false;
        for entry in entries {
            if let (Some(settle), Some(modified)) = (settle, entry.modified) {
                let young = modified.elapsed().is_ok_and(|age| age < settle);
                if young && !announced.contains(&entry.name) {
                    listing.settling = true;
                    continue;
                }
            }
            if !self.unclaimable.contains(&entry.name) {
                listing.names.push_back(entry.name);
            }
        }
        Ok(())
    }

    /// Starts processing `work/NAME` on a thread of its own.
    fn dispatch(&mut self, name: String) -> Result<()> {
        let path = self.spool.work_path(&name);
        let (models, run, executor) = (
            self.models.clone(),
            self.config.run.clone(),
            self.executor.clone(),
        );
        let limit = self.config.spool.max_frame_bytes;
        let dump_inputs = self.config.debug.dump_inputs.clone();
        let frame = name.clone();
        let done = self.done_tx.clone();
        std::thread::Builder::new()
            .name("frame".into())
            .spawn(move || {
                let cx = pipeline::Setup {
                    models: &models,
                    run: &run,
                    max_frame_bytes: limit,
                    executor: &executor,
                    dump_inputs: dump_inputs.as_deref(),
                };
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    pipeline::process(&frame, &path, &cx)
                }))
                .unwrap_or_else(|_| {
                    Outcome::Failed(pipeline::FrameError {
                        stage: FrameStage::Internal,
                        reason: "processing panicked (a bug: please report it with the frame)"
                            .into(),
                        models: vec![],
                    })
                });
                // The receiver is gone only if the daemon stopped waiting for frames.
                let _ = done.send((frame, outcome));
            })
            .context("starting the frame's thread")?;
        self.in_flight.push(InFlight { name });
        Ok(())
    }

    /// Records a finished frame.
    fn finished(&mut self, (name, outcome): Finished) -> Result<()> {
        self.in_flight.retain(|f| f.name != name);
        self.record(&name, outcome)
    }

    /// The main loop: keep `frames_in_flight` frames in hand, record them as they finish,
    /// wait for frames (inotify, rescans) when none is there.
    fn main_loop(&mut self, once: bool) -> Result<()> {
        let inotify = if once { None } else { Some(self.watch()?) };
        let settle = (!once).then_some(self.config.spool.settle);
        let rescan = self.config.spool.rescan;
        let mut announced = HashSet::new();
        let mut listing = Listing {
            stale: true,
            ..Listing::default()
        };
        let mut listed_at = Instant::now();
        loop {
            self.check_signal()?;
            if self.stop {
                return Ok(());
            }
            if listing.stale {
                listed_at = Instant::now();
            }
            self.fill(&mut listing, settle, &mut announced)?;
            if self.in_flight.is_empty() {
                if once && listing.names.is_empty() && self.retry.is_empty() {
                    // Look once more: frames may have arrived while the last ones ran.
                    self.list(&mut listing, None, &mut announced)?;
                    if listing.names.is_empty() {
                        return Ok(());
                    }
                    continue;
                }
                if self.status_written.elapsed() >= STATUS_EVERY {
                    self.write_status()?;
                }
                let wait = if listing.settling {
                    self.config.spool.settle.min(rescan)
                } else {
                    rescan
                };
                self.idle(inotify.as_ref(), wait, &mut announced)?;
                listing.stale = true;
                continue;
            }
            match self.done_rx.recv_timeout(TICK) {
                Ok(finished) => self.finished(finished)?,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(anyhow!("every frame thread's channel closed"));
                }
            }
            if let Some(inotify) = &inotify
                && read_events(inotify, &mut announced)?
            {
                listing.stale = true;
            }
            if listed_at.elapsed() >= rescan || once {
                listing.stale = true;
            }
        }
    }

    /// Waits (no frame in hand) for a signal, an inotify event or `wait`.
    fn idle(
        &mut self,
        inotify: Option<&Inotify>,
        wait: Duration,
        announced: &mut HashSet<OsString>,
    ) -> Result<()> {
        let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
        let mut fds = vec![PollFd::new(self.signals.fd.as_fd(), PollFlags::POLLIN)];
        if let Some(i) = inotify {
            fds.push(PollFd::new(i.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e).context("waiting for frames"),
        }
        if let Some(i) = inotify {
            read_events(i, announced)?;
        }
        Ok(())
    }

    /// After a stop signal: the frames in hand get `stop_grace` to finish; the others go
    /// back into `incoming/`.
    fn stop_in_flight(&mut self) -> Result<()> {
        if self.in_flight.is_empty() {
            return Ok(());
        }
        let grace = self.config.spool.stop_grace;
        let deadline = Instant::now() + grace;
        while !self.in_flight.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.done_rx.recv_timeout(left) {
                Ok(finished) => self.finished(finished)?,
                Err(_) => break,
            }
        }
        for f in std::mem::take(&mut self.in_flight) {
            log::info!(
                "{}: not finished in {grace:?}; put back into incoming/",
                f.name
            );
            self.spool.requeue(&f.name)?;
        }
        Ok(())
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
                let record = FailureRecord {
                    frame: name.to_string(),
                    stage: e.stage,
                    reason: e.reason.clone(),
                    models: e.models,
                    failed_unix: unix_now(),
                };
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

    fn watch(&self) -> Result<Inotify> {
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
        log::info!(
            "watching {} (rescan every {:?})",
            self.spool.incoming_dir().display(),
            self.config.spool.rescan
        );
        Ok(inotify)
    }
}

/// Reads pending inotify events; names completed by a rename or close-after-write go into
/// `announced`. Returns whether any event arrived.
fn read_events(inotify: &Inotify, announced: &mut HashSet<OsString>) -> Result<bool> {
    let mut any = false;
    loop {
        match inotify.read_events() {
            Ok(events) => {
                for ev in events {
                    any = true;
                    let complete = ev
                        .mask
                        .intersects(AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE);
                    if let (true, Some(name)) = (complete, ev.name) {
                        // Hidden names are producers' temp files, never claimed.
                        if !name.as_encoded_bytes().starts_with(b".") {
                            announced.insert(name);
                        }
                    }
                }
            }
            Err(Errno::EAGAIN) => return Ok(any),
            Err(e) => return Err(anyhow!(e).context("reading inotify events")),
        }
    }
}

/// The log line of a finished frame: each model's verdict and the time taken.
fn one_line(result: &FrameResult, done: DonePolicy) -> String {
    let models: Vec<String> = result
        .models
        .iter()
        .map(|m| match m.outputs() {
            None => format!("{} error", m.name),
            Some(Outputs::Boxes(d)) => format!("{} {} detection(s)", m.name, d.detections.len()),
            Some(Outputs::Landmarks(c)) => {
                format!("{} {} of {} crop(s) found", m.name, c.found, c.crops)
            }
            Some(_) => format!("{} ok", m.name),
        })
        .collect();
    format!(
        "{}×{}, {} in {} ms; {}",
        result.width,
        result.height,
        models.join(", "),
        result.time_ms.total,
        match done {
            DonePolicy::Move => "moved to done/",
            DonePolicy::Delete => "deleted",
        }
    )
}
