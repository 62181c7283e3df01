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
//!
//! Under systemd (`Type=notify`) it sends `READY=1` once the configuration, the packages
//! and the spool are checked, and `WATCHDOG=1` from this loop only, and only while no
//! frame has been in flight longer than `spool.stall_secs`: a loop that stops going round,
//! or a wedged inference, stops the pings. A full disk is weather: an outcome that cannot
//! be written waits in memory (its frame in `work/`) and is written again with a backoff,
//! and nothing is claimed while less than `spool.min_free` is free.

use super::config::{Config, DonePolicy};
use super::fsutil::{free_bytes, is_disk_full, replace_file, shown};
use super::layout::{Spool, name_bytes_hex};
use super::metrics;
use super::pipeline::{self, FrameError, Model, Outcome, unix_now};
use super::schema::{FailureRecord, FrameResult, FrameStage, ModelResult, ModelStage, Outputs};
use super::status::{DiskState, LastError, State, Status};
use crate::memory::SystemMemory;
use crate::notify;
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
/// While claiming waits for disk space: how often the free space is looked at again.
const DISK_CHECK: Duration = Duration::from_secs(1);
/// Outcomes that found the disk full are written again after this, doubling up to
/// `LAST_RETRY`.
const FIRST_RETRY: Duration = Duration::from_millis(250);
const LAST_RETRY: Duration = Duration::from_secs(8);

/// What `memaflow run` is told on its command line.
pub struct RunOptions {
    /// The configuration file.
    pub config: PathBuf,
    /// The board whose defaults apply (detected when absent).
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
    let reuse_freed_above = allocator_policy(&config, &system);
    let executor = Arc::new(Executor::start(
        executor_options(&config, reuse_freed_above),
        system.clone(),
    )?);
    let models = pipeline::load_all(&config.models, &config.run, &system, &executor);
    let usable = models.iter().filter(|m| m.error().is_none()).count();
    if models.is_empty() {
        log::warn!("no models configured: frames wait in incoming/ until there are some");
    } else {
        log::info!("{usable} of {} models usable", models.len());
    }
    let watchdog = notify::Watchdog::from_env();
    let status = Status::new(&config, &models, watchdog.interval().is_some());
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let mut d = Daemon {
        config,
        spool,
        models: Arc::new(models),
        executor,
        system,
        status,
        signals,
        watchdog,
        stop: false,
        unclaimable: HashSet::new(),
        status_written: Instant::now(),
        in_flight: vec![],
        retry: VecDeque::new(),
        pending: VecDeque::new(),
        retry_at: None,
        backoff: FIRST_RETRY,
        metrics_problem: None,
        done_tx,
        done_rx,
    };
    d.may_claim();
    d.write_status()?;
    d.recover()?;
    // Frames need not keep start-up's pages (argument parsing, the packages' checks):
    // even a `--once` run, which processes frames next, peaked ~3 MiB lower without
    // them on the stream benchmark, at the same frame rate (docs/results.md).
    let r = crate::memory::release_start_up();
    let rss = |m: Option<crate::memory::ProcessMemory>| {
        m.map_or("?".into(), |m| crate::memory::Bytes(m.rss).to_string())
    };
    log::info!(
        "start-up done: {} of mapped code and constants released, heap trimmed; resident {} → {}",
        crate::memory::Bytes(r.mapped_bytes),
        rss(r.before),
        rss(r.after)
    );
    notify::ready(&d.status.summary());
    d.main_loop(opts.once)?;
    d.stop_in_flight()?;
    d.status.state = State::Stopped;
    d.write_status()?;
    notify::stopping(&d.status.summary());
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

/// Headroom under which memory is no longer plentiful for a daemon without a budget.
const PLENTIFUL_HEADROOM: u64 = 512 << 20;

/// Where freed buffers go. In a cgroup with a memory limit and no budget, back to the
/// kernel at once (`memory::return_freed_memory_promptly`): the reading decides what is
/// admitted, and a freed layer or activation kept by the allocator is resident memory the
/// ledger no longer counts. Under a budget, the same; with one worker thread, but for
/// smaller buffers the heap keeps for the next frame's layers, up to a bound, while the
/// reading has room for them (`memory::keep_buffers_between_frames`). glibc gives each
/// thread an arena of its own, and a buffer freed in one serves only that thread's next
/// allocations: with two workers at half the stream benchmark's working set, the heap's
/// bound cost 3-5 MiB more peak RSS for no steady gain (docs/runtime.md). With neither,
/// memory is plentiful and they stay in the process for the next frame's layers (glibc's
/// heap; on musl, `memory::reuse_freed_memory`), which then neither fault pages in nor
/// zero them: a quarter less CPU a frame on the stream benchmark's models with glibc, 1.6x
/// the frame rate with musl (docs/runtime.md). Returns the headroom under which the
/// executor switches to returning them, for good; `None` when they go back from the start.
fn allocator_policy(config: &Config, system: &SystemMemory) -> Option<u64> {
    let limited = system.read().map_or(true, |r| r.cgroup_limit().is_some());
    if config.run.budget.is_some() && config.run.threads == 1 {
        crate::memory::keep_buffers_between_frames();
        log::info!(
            "freed buffers go back to the kernel, but for at most {} the heap keeps for the next frames (a budget, one worker)",
            crate::memory::Bytes(crate::memory::KEPT_FREED_MAX)
        );
        None
    } else if config.run.budget.is_some() || limited {
        crate::memory::return_freed_memory_promptly();
        log::info!("freed buffers go back to the kernel at once (a budget or a cgroup limit)");
        None
    } else {
        crate::memory::reuse_freed_memory();
        log::info!(
            "freed buffers stay in the process for reuse while the headroom is at least {}",
            crate::memory::Bytes(PLENTIFUL_HEADROOM)
        );
        Some(PLENTIFUL_HEADROOM)
    }
}

fn executor_options(config: &Config, reuse_freed_above: Option<u64>) -> ExecutorOptions {
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
        reuse_freed_above,
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
    name: OsString,
    since: Instant,
    /// Retried from `work/` after a stop: processed with no other frame in flight.
    alone: bool,
}

/// What a frame's thread sends back.
type Finished = (OsString, Outcome);

/// A processed frame's outcome, ready to be written (again, if the disk was full).
struct Record {
    name: OsString,
    /// How long processing took (`None`: it never finished, so no latency to observe).
    took: Option<Duration>,
    kind: RecordKind,
    /// Each model that ran: its name and whether it produced outputs.
    inferences: Vec<(String, bool)>,
}

enum RecordKind {
    Done { bytes: Vec<u8>, line: String },
    Failed { bytes: Vec<u8>, error: FrameError },
}

struct Daemon {
    config: Config,
    spool: Spool,
    models: Arc<Vec<Model>>,
    executor: Arc<Executor>,
    system: SystemMemory,
    status: Status,
    signals: Signals,
    watchdog: notify::Watchdog,
    stop: bool,
    /// Entries of `incoming/` that could not be claimed, logged once each.
    unclaimable: HashSet<OsString>,
    status_written: Instant,
    in_flight: Vec<InFlight>,
    /// Frames in `work/` from an earlier run, to process before claiming new ones, one
    /// at a time, each with the number of its next attempt.
    retry: VecDeque<(OsString, u32)>,
    /// Outcomes that found the disk full, oldest first, and when to write them again.
    pending: VecDeque<Record>,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// The last failure to write the metrics file, logged once.
    metrics_problem: Option<String>,
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
    /// Writes `status.json` and the metrics file from one refreshed status, and tells
    /// systemd the summary. A full disk is counted, not fatal.
    fn write_status(&mut self) -> Result<()> {
        self.status.frames_in_flight = self.in_flight.len() + self.pending.len();
        self.status.frames_deferred = self.pending.len();
        self.status.refresh(&self.system, self.executor.snapshot());
        let bytes = self.status.to_json()?;
        match self.spool.write_status(&bytes) {
            Ok(()) => {}
            Err(e) if is_disk_full(&e) => {
                self.status.disk.full_writes += 1;
                if self.status.disk.state == DiskState::Ok {
                    self.set_disk(DiskState::Low, &format!("{e:#}"));
                }
            }
            Err(e) => return Err(e),
        }
        self.write_metrics();
        self.status_written = Instant::now();
        notify::status(&self.status.summary());
        Ok(())
    }

    fn write_metrics(&mut self) {
        let Some(path) = &self.config.spool.metrics else {
            return;
        };
        match replace_file(path, &metrics::render(&self.status)) {
            Ok(()) => self.metrics_problem = None,
            Err(e) => {
                let e = format!("{e:#}");
                if self.metrics_problem.as_ref() != Some(&e) {
                    log::warn!("cannot write the metrics file (retrying with each status): {e}");
                }
                self.metrics_problem = Some(e);
            }
        }
    }

    fn check_signal(&mut self) -> Result<()> {
        if let Some(s) = self.signals.take()? {
            if !self.stop {
                log::info!("{s}: stopping (no more frames are claimed)");
            }
            self.stop = true;
            self.status.state = State::Stopping;
            notify::stopping(&self.status.summary());
        }
        Ok(())
    }

    /// The main loop went round: ping the watchdog unless a frame has been in flight
    /// longer than `spool.stall_secs` (then it is taken for wedged, and systemd, which
    /// hears no more pings, restarts the daemon). Logged once per change.
    fn heartbeat(&mut self) -> Result<()> {
        let oldest = self.in_flight.iter().min_by_key(|f| f.since);
        let age = oldest.map_or(Duration::ZERO, |f| f.since.elapsed());
        self.status.watchdog.oldest_frame_secs = age.as_secs_f64();
        let stalled = age > self.config.spool.stall;
        if stalled != self.status.watchdog.stalled {
            self.status.watchdog.stalled = stalled;
            if let (true, Some(f)) = (stalled, oldest) {
                log::error!(
                    "{}: in flight for {age:.1?}, more than spool.stall_secs ({:?}): taken for wedged, watchdog pings stop{}",
                    shown(&f.name),
                    self.config.spool.stall,
                    if self.status.watchdog.enabled {
                        " (systemd restarts the daemon; the frame is retried from work/)"
                    } else {
                        ""
                    }
                );
            } else {
                log::info!("no frame in flight beyond spool.stall_secs: watchdog pings resume");
            }
            self.write_status()?;
        }
        if !stalled {
            self.watchdog.progress();
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
            let shown = shown(&name);
            if self.spool.has_result(&name) {
                log::info!("{shown}: result already written by an earlier run; not run again");
                self.spool.release(&name, self.config.spool.done)?;
            } else if self.spool.has_error_record(&name) {
                log::info!("{shown}: failure already recorded by an earlier run");
                self.spool.release_failed(&name)?;
            } else {
                let attempts = self.spool.attempts(&name);
                let max = self.config.spool.max_attempts;
                if attempts >= max {
                    // The failure's own log line (`account`) says why; so does its record.
                    let record = self.unfinished(name, attempts)?;
                    self.commit(record)?;
                } else {
                    log::info!(
                        "{shown}: claimed by an earlier run that did not finish; retrying, alone (attempt {} of {max})",
                        attempts + 1
                    );
                    self.retry.push_back((name, attempts + 1));
                }
            }
        }
        Ok(())
    }

    /// The failure record of a frame that never finished in `attempts` attempts.
    fn unfinished(&self, name: OsString, attempts: u32) -> Result<Record> {
        let error = FrameError {
            stage: FrameStage::Unfinished,
            reason: format!(
                "processing never finished in {attempts} attempt(s) (spool.max_attempts = {}): the daemon stopped each time it was in flight (a crash, a kill or a watchdog restart); not tried again",
                self.config.spool.max_attempts
            ),
            models: vec![],
        };
        let failure = FailureRecord {
            frame: name.to_string_lossy().into_owned(),
            frame_bytes_hex: name_bytes_hex(&name),
            stage: error.stage,
            reason: error.reason.clone(),
            models: vec![],
            attempts: Some(attempts),
            failed_unix: unix_now(),
        };
        let mut bytes = serde_json::to_vec_pretty(&failure)?;
        bytes.push(b'\n');
        Ok(Record {
            name,
            took: None,
            kind: RecordKind::Failed { bytes, error },
            inferences: vec![],
        })
    }

    /// Whether new frames may be claimed as far as the disk goes: no outcome waits for
    /// space, and at least `spool.min_free` is free. Updates the disk's state.
    fn may_claim(&mut self) -> bool {
        if !self.pending.is_empty() {
            return false;
        }
        let free = match free_bytes(&self.spool.root) {
            Ok(f) => f,
            Err(e) => {
                // Not knowing is no reason to stop: the writes will tell.
                log::debug!("{e:#}");
                return true;
            }
        };
        self.status.disk.free_bytes = Some(free);
        let state = if free < self.config.spool.min_free {
            DiskState::Low
        } else {
            DiskState::Ok
        };
        self.set_disk(state, "");
        state == DiskState::Ok
    }

    /// Sets the disk's state, with one log line per change.
    fn set_disk(&mut self, state: DiskState, why: &str) {
        let disk = &mut self.status.disk;
        if disk.state == state {
            return;
        }
        disk.state = state;
        disk.since_unix = unix_now();
        let free = disk
            .free_bytes
            .map_or("unknown".into(), |f| crate::memory::Bytes(f).to_string());
        match state {
            DiskState::Full => log::warn!(
                "spool disk full ({why}): processed frames stay in work/ and their outcomes are written again with a backoff; nothing is claimed meanwhile"
            ),
            DiskState::Low => log::warn!(
                "spool disk low: {free} free, less than spool.min_free ({}): nothing is claimed until there is more{}",
                crate::memory::Bytes(disk.min_free_bytes),
                if why.is_empty() {
                    String::new()
                } else {
                    format!(" ({why})")
                }
            ),
            DiskState::Ok => log::info!("spool disk: {free} free: claiming again"),
        }
        notify::status(&self.status.summary());
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
            // A frame retried after a stop runs alone: if it stops the daemon again, no
            // other frame's attempt is counted with it.
            if self.in_flight.iter().any(|f| f.alone) {
                return Ok(());
            }
            if let Some((name, attempt)) = self.retry.front().cloned() {
                if !self.in_flight.is_empty() {
                    return Ok(());
                }
                self.retry.pop_front();
                if let Err(e) = self.spool.record_attempt(&name, attempt) {
                    // Not counting is better than not processing (a full disk, mostly).
                    log::warn!(
                        "{}: attempt {attempt} not recorded ({e:#}); processed uncounted",
                        shown(&name)
                    );
                }
                self.dispatch(name, true)?;
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
            if !self.may_claim() {
                return Ok(());
            }
            let Some(entry) = listing.names.pop_front() else {
                return Ok(());
            };
            announced.remove(&entry);
            match self.spool.claim(&entry) {
                Ok(Some(name)) => {
                    self.unclaimable.remove(&entry);
                    self.dispatch(name, false)?;
                }
                Ok(None) => {}
                Err(e) => {
                    if self.unclaimable.insert(entry.clone()) {
                        log::error!("{}: cannot be claimed: {e:#}", shown(&entry));
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
        listing.names.clear();
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

    /// Starts processing `work/NAME` on a thread of its own (`alone`: see `InFlight`).
    fn dispatch(&mut self, name: OsString, alone: bool) -> Result<()> {
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
                let shown_as = frame.to_string_lossy().into_owned();
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    pipeline::process(&shown_as, &path, &cx)
                }))
                .unwrap_or_else(|_| {
                    Outcome::Failed(FrameError {
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
        self.in_flight.push(InFlight {
            name,
            since: Instant::now(),
            alone,
        });
        Ok(())
    }

    /// Records a finished frame.
    fn finished(&mut self, (name, outcome): Finished) -> Result<()> {
        let since = self
            .in_flight
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.since);
        self.in_flight.retain(|f| f.name != name);
        let took = since.map_or(Duration::ZERO, |s| s.elapsed());
        let record = self.record(name, outcome, took)?;
        self.commit(record)
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
            self.heartbeat()?;
            self.check_signal()?;
            if self.stop {
                return Ok(());
            }
            if self.retry_at.is_some_and(|t| Instant::now() >= t) {
                self.write_pending()?;
            }
            if listing.stale {
                listed_at = Instant::now();
            }
            let disk = self.status.disk.state;
            if disk == DiskState::Low {
                self.may_claim();
            }
            self.fill(&mut listing, settle, &mut announced)?;
            if self.status.disk.state != disk {
                self.write_status()?;
            }
            if self.in_flight.is_empty() {
                let nothing_left = listing.names.is_empty() && self.retry.is_empty();
                if once && nothing_left && self.pending.is_empty() {
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
                let wait = self.idle_wait(&listing, rescan);
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

    /// How long to wait with no frame in hand: until the next rescan, a settling file,
    /// a look at the disk while claiming waits for space, an outcome's next write, or
    /// the next watchdog ping, whichever comes first.
    fn idle_wait(&self, listing: &Listing, rescan: Duration) -> Duration {
        let mut wait = rescan;
        if listing.settling {
            wait = wait.min(self.config.spool.settle);
        }
        if self.status.disk.state != DiskState::Ok {
            wait = wait.min(DISK_CHECK);
        }
        if let Some(at) = self.retry_at {
            wait = wait.min(at.saturating_duration_since(Instant::now()));
        }
        if let Some(w) = self.watchdog.interval() {
            wait = wait.min(w);
        }
        wait
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
    /// back into `incoming/`. Outcomes still waiting for disk space get one more try;
    /// their frames stay in `work/` otherwise and are processed again on the next start.
    fn stop_in_flight(&mut self) -> Result<()> {
        let grace = self.config.spool.stop_grace;
        let deadline = Instant::now() + grace;
        while !self.in_flight.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            self.heartbeat()?;
            match self.done_rx.recv_timeout(left.min(TICK)) {
                Ok(finished) => self.finished(finished)?,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        for f in std::mem::take(&mut self.in_flight) {
            log::info!(
                "{}: not finished in {grace:?}; put back into incoming/",
                shown(&f.name)
            );
            self.spool.requeue(&f.name)?;
        }
        if !self.pending.is_empty() {
            self.write_pending()?;
        }
        for r in &self.pending {
            log::warn!(
                "{}: outcome not written (disk full); stays in work/ and is processed again on the next start",
                shown(&r.name)
            );
            // Processing finished: this stop is no attempt that failed. (An unlink needs
            // no space.)
            self.spool.forget_attempts(&r.name)?;
        }
        Ok(())
    }

    /// Turns a frame's outcome into the bytes of its result or failure record.
    fn record(&self, name: OsString, outcome: Outcome, took: Duration) -> Result<Record> {
        let frame_bytes_hex = name_bytes_hex(&name);
        let (kind, inferences) = match outcome {
            Outcome::Done(mut result) => {
                result.frame_bytes_hex = frame_bytes_hex;
                let mut bytes = serde_json::to_vec_pretty(&result)?;
                bytes.push(b'\n');
                let line = one_line(&result, self.config.spool.done);
                (RecordKind::Done { bytes, line }, inferences(&result.models))
            }
            Outcome::Failed(error) => {
                let record = FailureRecord {
                    frame: name.to_string_lossy().into_owned(),
                    frame_bytes_hex,
                    stage: error.stage,
                    reason: error.reason.clone(),
                    models: error.models.clone(),
                    attempts: None,
                    failed_unix: unix_now(),
                };
                let mut bytes = serde_json::to_vec_pretty(&record)?;
                bytes.push(b'\n');
                let inferences = inferences(&error.models);
                (RecordKind::Failed { bytes, error }, inferences)
            }
        };
        Ok(Record {
            name,
            took: Some(took),
            kind,
            inferences,
        })
    }

    /// Writes a frame's outcome and lets the frame go; if the disk is full, keeps it to
    /// write again later (the frame stays in `work/`).
    fn commit(&mut self, record: Record) -> Result<()> {
        if !self.pending.is_empty() {
            // The disk was full a moment ago: wait for the retry, in order.
            self.pending.push_back(record);
            return self.write_status();
        }
        match self.write(&record) {
            Ok(()) => self.account(record),
            Err(e) if is_disk_full(&e) => {
                self.status.disk.full_writes += 1;
                self.set_disk(DiskState::Full, &format!("{e:#}"));
                self.pending.push_back(record);
                self.backoff = FIRST_RETRY;
                self.retry_at = Some(Instant::now() + self.backoff);
            }
            Err(e) => return Err(e),
        }
        self.write_status()
    }

    /// Writes the outcomes that found the disk full, oldest first, until one fails again
    /// (then the next try waits twice as long, up to `LAST_RETRY`).
    fn write_pending(&mut self) -> Result<()> {
        while let Some(record) = self.pending.pop_front() {
            match self.write(&record) {
                Ok(()) => self.account(record),
                Err(e) if is_disk_full(&e) => {
                    self.pending.push_front(record);
                    self.status.disk.full_writes += 1;
                    self.backoff = (self.backoff * 2).min(LAST_RETRY);
                    self.retry_at = Some(Instant::now() + self.backoff);
                    log::debug!("still full: {e:#}; next try in {:?}", self.backoff);
                    return self.write_status();
                }
                Err(e) => return Err(e),
            }
        }
        self.retry_at = None;
        self.backoff = FIRST_RETRY;
        self.may_claim();
        self.write_status()
    }

    fn write(&self, r: &Record) -> Result<()> {
        let shown = shown(&r.name);
        match &r.kind {
            RecordKind::Done { bytes, .. } => self
                .spool
                .complete(&r.name, bytes, self.config.spool.done)
                .with_context(|| format!("{shown}: recording the result")),
            RecordKind::Failed { bytes, .. } => self
                .spool
                .fail(&r.name, bytes)
                .with_context(|| format!("{shown}: recording the failure")),
        }
    }

    /// A frame's outcome is written: count it and log it.
    fn account(&mut self, r: Record) {
        if let Some(took) = r.took {
            self.status.latency.observe(took);
        }
        for (model, ok) in &r.inferences {
            self.status.inference(model, *ok);
        }
        let shown = shown(&r.name);
        match r.kind {
            RecordKind::Done { line, .. } => {
                self.status.frames_done += 1;
                log::info!("{shown}: {line}");
            }
            RecordKind::Failed { error, .. } => {
                self.status.frames_failed += 1;
                log::warn!(
                    "{shown}: failed ({}): {}",
                    error.stage.name(),
                    error.reason.escape_debug()
                );
                self.status.last_error = Some(LastError {
                    frame: r.name.to_string_lossy().into_owned(),
                    stage: error.stage,
                    reason: error.reason,
                    at_unix: unix_now(),
                });
            }
        }
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

/// The models of a result or failure record that ran: name, and whether it has outputs.
/// A model whose package was unusable did not run and is not counted.
fn inferences(models: &[ModelResult]) -> Vec<(String, bool)> {
    models
        .iter()
        .filter_map(|m| match m.error() {
            None => Some((m.name.clone(), true)),
            Some(e) if e.stage == ModelStage::Package => None,
            Some(_) => Some((m.name.clone(), false)),
        })
        .collect()
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
