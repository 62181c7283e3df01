//! `memaflow publish`: sends every result the daemon writes to `out/` to an MQTT broker
//! (QoS 1), oldest first, and records a result as sent only after the broker's PUBACK
//! (`backlog`). The broker may be away for as long as it likes: results wait on disk,
//! the connection is retried with a bounded backoff, and `publish.keep` bounds the wait.
//! A separate process from the daemon, which keeps no network. See docs/publish.md.

mod backlog;
mod broker;
mod message;

pub use backlog::shown;

pub(crate) use backlog::{Counts, PUBLISH_DIR};

use crate::notify;
use crate::spool::config::PublisherConfig;
use crate::spool::fsutil::{is_disk_full, replace_file, write_atomic};
use crate::spool::metrics::{Kind, Text};
use anyhow::{Context, Result};
use backlog::Backlog;
use broker::{Broker, WINDOW};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use rumqttc::{AsyncClient, ConnectionError, Event, Incoming, Outgoing, QoS};
use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::Instant;

const STATUS_FILE: &str = "status.json";
/// The main loop goes round at least this often (watchdog, status, rescans).
const TICK: Duration = Duration::from_secs(1);
const STATUS_EVERY: Duration = Duration::from_secs(1);
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// Requests the connection may hold beyond the window: one result is several messages
/// when the topic has `{model}`.
const REQUEST_SLACK: usize = 256;
/// Markers that could not be written (a full disk) are tried again after this, doubling
/// up to `MARK_LAST_RETRY`: each try is a failing system call per waiting marker.
const MARK_FIRST_RETRY: Duration = Duration::from_millis(250);
const MARK_LAST_RETRY: Duration = Duration::from_secs(4);

/// Runs the publisher until SIGTERM or SIGINT.
pub fn run(config_path: &Path) -> Result<()> {
    let config = PublisherConfig::load(config_path)?;
    if std::env::var_os("RUST_LOG").is_none() {
        log::set_max_level(config.log_level);
    }
    let device = config.publish.device.clone().unwrap_or_else(host_name);
    let broker = Broker::new(&config.publish, &device)?;
    let backlog = Backlog::open(&config.spool_root, config.publish.keep)?;
    let watch = Watch::new(backlog.out_dir())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the I/O runtime")?;
    let status_path = config.spool_root.join(PUBLISH_DIR);
    runtime.block_on(
        Publisher {
            topic: config.publish.topic.clone(),
            retry_max: config.publish.retry_max,
            rescan: config.rescan,
            device,
            broker,
            backlog,
            status: Status::default(),
            status_dir: status_path,
            metrics: config.publish.metrics.clone(),
            last_written: (Instant::now(), vec![], LinkState::Stopped),
            full: [false; 3],
            mark_retry: None,
            mark_problem: None,
        }
        .run(watch),
    )
}

/// Seconds since the epoch, for `status.json`. (The daemon's `pipeline::unix_now` is
/// the same; the publisher does not reach into the daemon's frame pipeline for it.)
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The kernel's host name (`uname`, so the unit may hide `/proc/sys`).
fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "memaflow".into())
}

/// `publish/status.json`: what the publisher has done, replaced atomically.
#[derive(Debug, Default, serde::Serialize)]
struct Status {
    pid: u32,
    state: LinkState,
    broker: String,
    /// Results not yet acknowledged (waiting or in flight).
    unsent: usize,
    /// Results acknowledged whose markers are not written yet (a full disk): not sent
    /// again by this process, sent again by the next if it starts before they are.
    unmarked: usize,
    /// `full` while the last marker, status or metrics write found the file system full.
    disk: DiskState,
    /// Writes (markers, status, metrics) that found the file system full, since start.
    disk_full_writes: u64,
    #[serde(flatten)]
    counts: Counts,
    /// Connections made, and attempts or connections that failed, since start.
    connects: u64,
    connection_failures: u64,
    last_error: Option<String>,
    started_unix: f64,
    updated_unix: f64,
}

/// The publisher's view of the disk: it has no `low` (it claims nothing), only whether
/// its writes fit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum DiskState {
    #[default]
    Ok,
    Full,
}

/// What the publisher writes; each may find the disk full on its own (markers need an
/// inode, status.json and the metrics file blocks, and the metrics file may be on
/// another file system).
#[derive(Clone, Copy)]
enum Written {
    Markers = 0,
    Status = 1,
    Metrics = 2,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum LinkState {
    #[default]
    Connecting,
    Connected,
    /// Waiting to retry after a failure.
    Disconnected,
    Stopped,
}

/// inotify on `out/`, readable through tokio.
struct Watch(Inotify);

impl Watch {
    fn new(out: &Path) -> Result<Watch> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .context("inotify_init")?;
        inotify
            .add_watch(
                out,
                AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE,
            )
            .with_context(|| format!("watching {}", out.display()))?;
        Ok(Watch(inotify))
    }
}

impl AsRawFd for Watch {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// One connection to the broker: rumqttc's event loop runs in its own task and hands
/// its events over a channel, so the main loop never cancels it half-way.
struct Connection {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
    task: tokio::task::JoinHandle<()>,
    /// Results of messages requested, in order, whose packet id is not known yet.
    unassigned: VecDeque<OsString>,
    by_packet_id: HashMap<u16, OsString>,
    messages_in_flight: usize,
    /// The wait before the next attempt if this one fails before the broker's CONNACK.
    backoff: Duration,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Link {
    /// `backoff`: the wait after the next attempt, should it fail too.
    Down {
        retry_at: Instant,
        backoff: Duration,
    },
    Connecting(Connection),
    Up(Connection),
}

struct Publisher {
    topic: crate::spool::publish_config::TopicTemplate,
    retry_max: Duration,
    rescan: Duration,
    device: String,
    broker: Broker,
    backlog: Backlog,
    status: Status,
    status_dir: std::path::PathBuf,
    /// The Prometheus text file, written with `status.json`.
    metrics: Option<std::path::PathBuf>,
    /// When `status.json` was last written, what it said (without its time), its state.
    last_written: (Instant, Vec<u8>, LinkState),
    /// Whether the last write of each kind (`Written`) found the disk full.
    full: [bool; 3],
    /// After a failed marker write: when to try again, and the wait after that.
    mark_retry: Option<(Instant, Duration)>,
    /// The `last_error` a failed marker write set, cleared when the markers are written.
    mark_problem: Option<String>,
}

impl Publisher {
    async fn run(mut self, watch: Watch) -> Result<()> {
        let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        // SAFETY: `Watch` owns its inotify descriptor (nix's `Inotify` holds an `OwnedFd`)
        // and never replaces it, so the fd registered here stays open and the same for as
        // long as the `AsyncFd` (which owns the `Watch`) lives.
        let watch =
            unsafe { AsyncFd::register_with_interest(watch, tokio::io::Interest::READABLE) }
                .map_err(std::io::Error::from)
                .context("polling inotify")?;
        let mut watchdog = notify::Watchdog::from_env();
        let mut tick = tokio::time::interval(watchdog.interval().map_or(TICK, |w| w.min(TICK)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_rescan = Instant::now() + self.rescan;
        self.status.pid = std::process::id();
        self.status.broker = self.broker.name.clone();
        self.status.started_unix = unix_now();
        let mut link = Link::Down {
            retry_at: Instant::now(),
            backoff: FIRST_RETRY,
        };
        log::info!(
            "publishing {} to MQTT broker {} as device {}; {} results unsent",
            self.backlog.out_dir().display(),
            self.broker.name,
            shown(self.device.as_ref()),
            self.backlog.unsent()
        );
        notify::ready(&self.summary());
        loop {
            if let Link::Up(conn) = &mut link
                && let Err(reason) = self.fill(conn)
            {
                link = self.lost(reason, None);
            }
            self.flush_markers();
            tokio::select! {
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
                _ = tick.tick() => {}
                ready = watch.readable() => {
                    let mut guard = ready.context("polling inotify")?;
                    self.take_events(guard.get_inner());
                    guard.clear_ready();
                }
                event = next_event(&mut link) => link = self.on_event(link, event),
            }
            if Instant::now() >= next_rescan {
                next_rescan = Instant::now() + self.rescan;
                if let Err(e) = self.backlog.rescan() {
                    self.problem(format!("{e:#}"));
                }
            }
            self.write_status(false);
            watchdog.progress();
        }
        if let Err(e) = self.backlog.flush() {
            log::warn!(
                "cannot record results as sent: {e:#}; {} acknowledged result(s) will be sent again by the next start",
                self.backlog.unmarked()
            );
        }
        drop(link);
        self.status.state = LinkState::Stopped;
        self.write_status(true);
        notify::stopping(&self.summary());
        log::info!("{}", self.summary());
        Ok(())
    }

    /// Reads inotify until it has nothing more (tokio's readiness is edge-triggered: what
    /// is left unread would wait for the next event). On an error, the rescans remain.
    fn take_events(&mut self, watch: &Watch) {
        loop {
            match watch.0.read_events() {
                Ok(events) => {
                    for e in events {
                        if e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                            let _ = self.backlog.rescan();
                        } else if let Some(name) = e.name {
                            self.backlog.add(&name);
                        }
                    }
                    self.backlog.enforce_keep();
                }
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(e) => {
                    log::warn!("reading inotify events: {e}");
                    return;
                }
            }
        }
    }

    /// Hands the oldest waiting results to the connection while the window has room.
    fn fill(&mut self, conn: &mut Connection) -> Result<(), String> {
        while conn.messages_in_flight < WINDOW {
            let Some((name, bytes)) = self.backlog.next() else {
                return Ok(());
            };
            let messages = match message::messages(&self.topic, &self.device, bytes) {
                Ok(m) => m,
                Err(e) => {
                    self.backlog.refuse(name, &format!("{e:#}"));
                    continue;
                }
            };
            self.backlog.expect_acks(&name, messages.len());
            for m in messages {
                conn.client
                    .try_publish(m.topic, QoS::AtLeastOnce, false, m.payload)
                    .map_err(|e| format!("handing a message to the connection: {e}"))?;
                conn.unassigned.push_back(name.clone());
                conn.messages_in_flight += 1;
            }
        }
        Ok(())
    }

    fn on_event(&mut self, link: Link, event: LinkEvent) -> Link {
        match (link, event) {
            (Link::Down { backoff, .. }, LinkEvent::RetryDue) => {
                self.status.state = LinkState::Connecting;
                Link::Connecting(self.connect(backoff))
            }
            (Link::Connecting(conn), LinkEvent::Mqtt(events)) => self.on_mqtt(conn, events, false),
            (Link::Up(conn), LinkEvent::Mqtt(events)) => self.on_mqtt(conn, events, true),
            (link, _) => link,
        }
    }

    fn connect(&self, backoff: Duration) -> Connection {
        let (client, mut eventloop) =
            AsyncClient::new(self.broker.options.clone(), WINDOW + REQUEST_SLACK);
        eventloop
            .network_options
            .set_connection_timeout(self.broker.connect_timeout_secs);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                let failed = event.is_err();
                if tx.send(event).is_err() || failed {
                    return;
                }
            }
        });
        Connection {
            client,
            events,
            task,
            unassigned: VecDeque::new(),
            by_packet_id: HashMap::new(),
            messages_in_flight: 0,
            backoff,
        }
    }

    /// Events of one connection, taken in a batch so that their markers share an fsync.
    fn on_mqtt(
        &mut self,
        mut conn: Connection,
        events: Vec<Result<Event, ConnectionError>>,
        mut up: bool,
    ) -> Link {
        for event in events {
            let outcome = match event {
                Ok(event) => self.on_packet(&mut conn, event),
                Err(e) => Err(self.broker.describe(&e)),
            };
            match outcome {
                Ok(false) => {}
                Ok(true) => {
                    up = true;
                    self.status.connects += 1;
                    self.status.state = LinkState::Connected;
                    self.status.last_error = None;
                    log::info!("connected to MQTT broker {}", self.broker.name);
                    notify::status(&self.summary());
                }
                Err(reason) => return self.lost(reason, (!up).then_some(conn.backoff)),
            }
        }
        if up {
            Link::Up(conn)
        } else {
            Link::Connecting(conn)
        }
    }

    /// One event; `Ok(true)` when it is the broker's CONNACK.
    fn on_packet(&mut self, conn: &mut Connection, event: Event) -> Result<bool, String> {
        match event {
            Event::Incoming(Incoming::ConnAck(_)) => return Ok(true),
            Event::Incoming(Incoming::PubAck(ack)) => {
                let name = conn.by_packet_id.remove(&ack.pkid).ok_or_else(|| {
                    format!(
                        "MQTT broker {}: PUBACK for unknown packet {}",
                        self.broker.name, ack.pkid
                    )
                })?;
                conn.messages_in_flight -= 1;
                self.backlog.acked(&name);
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let name = conn
                    .unassigned
                    .pop_front()
                    .ok_or("a publish that was not requested")?;
                if conn.by_packet_id.insert(pkid, name).is_some() {
                    return Err(format!("packet id {pkid} reused while in flight"));
                }
            }
            // rumqttc holds a publish back when its packet id is still unacknowledged:
            // the broker acknowledges out of order, and our mapping would be ambiguous.
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                return Err(format!(
                    "MQTT broker {}: packet id {pkid} still unacknowledged (acknowledgements out of order)",
                    self.broker.name
                ));
            }
            _ => {}
        }
        Ok(false)
    }

    /// The connection failed or was lost: what was in flight waits again. An attempt that
    /// never connected waits `failed_attempt_backoff` and doubles it (up to
    /// `publish.retry_max_secs`); a connection that was up is retried soon.
    fn lost(&mut self, reason: String, failed_attempt_backoff: Option<Duration>) -> Link {
        self.backlog.requeue_in_flight();
        self.status.connection_failures += 1;
        if self.status.last_error.as_deref() != Some(reason.as_str()) {
            log::warn!("{reason}; results wait on disk, retrying");
        } else {
            log::debug!("{reason}");
        }
        self.status.last_error = Some(reason);
        self.status.state = LinkState::Disconnected;
        notify::status(&self.summary());
        let wait = failed_attempt_backoff
            .unwrap_or(FIRST_RETRY)
            .min(self.retry_max);
        Link::Down {
            retry_at: Instant::now() + wait,
            backoff: (wait * 2).min(self.retry_max),
        }
    }

    /// Makes the markers of acknowledged results durable. A failure (a full disk, a
    /// read-only file system) keeps them in memory, none sent again meanwhile, and tries
    /// again with a backoff; a full disk is the disk's state, anything else a problem.
    fn flush_markers(&mut self) {
        if self.backlog.unmarked() == 0 {
            return;
        }
        if let Some((at, _)) = self.mark_retry
            && Instant::now() < at
        {
            return;
        }
        let written = self.backlog.flush();
        match &written {
            Ok(()) => {
                self.mark_retry = None;
                if let Some(p) = self.mark_problem.take()
                    && self.status.last_error.as_ref() == Some(&p)
                {
                    self.status.last_error = None;
                }
            }
            Err(e) => {
                let wait = self
                    .mark_retry
                    .map_or(MARK_FIRST_RETRY, |(_, w)| (w * 2).min(MARK_LAST_RETRY));
                self.mark_retry = Some((Instant::now() + wait, wait));
                let reason = format!("cannot record results as sent (retrying): {e:#}");
                if is_disk_full(e) {
                    // Said once by the disk's state line; no warning per marker.
                    self.status.last_error = Some(reason.clone());
                } else {
                    self.problem(reason.clone());
                }
                self.mark_problem = Some(reason);
            }
        }
        self.wrote(Written::Markers, &written);
    }

    /// Notes whether a write found the disk full; one log line (and `STATUS=`) when the
    /// disk's state changes, never one per retry.
    fn wrote(&mut self, what: Written, result: &Result<()>) {
        let full = matches!(result, Err(e) if is_disk_full(e));
        self.status.disk_full_writes += u64::from(full);
        self.full[what as usize] = full;
        let state = if self.full.contains(&true) {
            DiskState::Full
        } else {
            DiskState::Ok
        };
        if state == self.status.disk {
            return;
        }
        self.status.disk = state;
        match (state, result) {
            (DiskState::Full, Err(e)) => log::warn!(
                "spool disk full ({e:#}): acknowledged results wait in memory to be marked sent (none is sent again meanwhile) and publish/status.json is not updated; retrying"
            ),
            _ => log::info!(
                "spool disk has room again: markers and status written ({} result(s) marked sent so far)",
                self.backlog.counts.sent
            ),
        }
        notify::status(&self.summary());
    }

    fn problem(&mut self, reason: String) {
        if self.status.last_error.as_deref() != Some(reason.as_str()) {
            log::warn!("{reason}");
        }
        self.status.last_error = Some(reason);
    }

    fn summary(&self) -> String {
        let mut s = format!(
            "{:?}: broker {}; {} unsent, {} sent, {} dropped",
            self.status.state,
            self.broker.name,
            self.backlog.unsent(),
            self.backlog.counts.sent,
            self.backlog.counts.dropped
        )
        .to_lowercase();
        if self.status.disk == DiskState::Full {
            s.push_str(&format!(
                "; disk full: {} acknowledged result(s) wait to be marked",
                self.backlog.unmarked()
            ));
        }
        s
    }

    /// Writes `status.json` when something in it changed: at once for a new connection
    /// state or `now`, else at most once a second (each write is an fsync in this loop).
    /// A write that failed is tried again a second later, changed or not.
    fn write_status(&mut self, now: bool) {
        self.status.unsent = self.backlog.unsent();
        self.status.unmarked = self.backlog.unmarked();
        self.status.counts = self.backlog.counts;
        self.status.updated_unix = 0.0;
        let content = serde_json::to_vec(&self.status).unwrap_or_default();
        let (at, last_content, last_state) = &self.last_written;
        let state_changed = self.status.state != *last_state;
        if !now && (content == *last_content || (!state_changed && at.elapsed() < STATUS_EVERY)) {
            return;
        }
        self.last_written = (Instant::now(), content, self.status.state);
        self.status.updated_unix = unix_now();
        let mut bytes = serde_json::to_vec_pretty(&self.status).unwrap_or_default();
        bytes.push(b'\n');
        let status = write_atomic(&self.status_dir, STATUS_FILE, &bytes);
        if let Err(e) = &status {
            log::debug!("{e:#}");
            self.last_written.1.clear();
        }
        self.wrote(Written::Status, &status);
        if let Some(path) = &self.metrics {
            let metrics = replace_file(path, &render_metrics(&self.status));
            if let Err(e) = &metrics {
                log::debug!("{e:#}");
            }
            self.wrote(Written::Metrics, &metrics);
        }
    }
}

/// The publisher's metrics file (docs/metrics.md), from its status.
fn render_metrics(s: &Status) -> Vec<u8> {
    let mut t = Text::default();
    t.single(
        "memaflow_publish_unsent",
        Kind::Gauge,
        "Results not yet acknowledged by the broker (waiting or in flight): the queue's length.",
        s.unsent,
    );
    t.counters(&[
        (
            "memaflow_publish_sent_total",
            "Results acknowledged and marked sent since start.",
            s.counts.sent,
        ),
        (
            "memaflow_publish_dropped_total",
            "Results dropped unsent since start (more than publish.keep waited).",
            s.counts.dropped,
        ),
        (
            "memaflow_publish_unreadable_total",
            "Files in out/ that are not complete results, found since start.",
            s.counts.unreadable,
        ),
        (
            "memaflow_publish_connects_total",
            "Connections to the broker made since start.",
            s.connects,
        ),
        (
            "memaflow_publish_connection_failures_total",
            "Connection attempts that failed and connections lost since start.",
            s.connection_failures,
        ),
    ]);
    t.single(
        "memaflow_publish_unmarked",
        Kind::Gauge,
        "Results acknowledged by the broker whose markers wait for disk space.",
        s.unmarked,
    );
    t.single(
        "memaflow_publish_disk_full_writes_total",
        Kind::Counter,
        "Writes of markers, status.json or this file that found the disk full, since start.",
        s.disk_full_writes,
    );
    let name = "memaflow_publish_disk_state";
    t.family(
        name,
        Kind::Gauge,
        "The spool's disk as the publisher's writes found it: 1 for the current state.",
    );
    for (label, state) in [("ok", DiskState::Ok), ("full", DiskState::Full)] {
        t.sample(name, &[("state", label)], u8::from(s.disk == state));
    }
    t.single(
        "memaflow_publish_error",
        Kind::Gauge,
        "1 while the last operation failed (status.json's last_error is set).",
        u8::from(s.last_error.is_some()),
    );
    let name = "memaflow_publish_state";
    t.family(
        name,
        Kind::Gauge,
        "The connection's state: 1 for the current one.",
    );
    for (label, state) in [
        ("connecting", LinkState::Connecting),
        ("connected", LinkState::Connected),
        ("disconnected", LinkState::Disconnected),
        ("stopped", LinkState::Stopped),
    ] {
        t.sample(name, &[("state", label)], u8::from(s.state == state));
    }
    t.single(
        "memaflow_publish_updated_time_seconds",
        Kind::Gauge,
        "When this file was written, in seconds since the epoch.",
        s.updated_unix,
    );
    t.into_bytes()
}

enum LinkEvent {
    RetryDue,
    Mqtt(Vec<Result<Event, ConnectionError>>),
}

/// What the link has to say next: the retry time of a link that is down, else the
/// connection's events (all that are ready, at least one).
async fn next_event(link: &mut Link) -> LinkEvent {
    match link {
        Link::Down { retry_at, .. } => {
            tokio::time::sleep_until(*retry_at).await;
            LinkEvent::RetryDue
        }
        Link::Connecting(conn) | Link::Up(conn) => {
            let mut events = vec![];
            match conn.events.recv().await {
                Some(e) => events.push(e),
                None => events.push(Err(ConnectionError::RequestsDone)),
            }
            while events.len() < 1024 {
                match conn.events.try_recv() {
                    Ok(e) => events.push(e),
                    Err(_) => break,
                }
            }
            LinkEvent::Mqtt(events)
        }
    }
}
