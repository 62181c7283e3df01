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
use crate::spool::fsutil::{replace_file, write_atomic};
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
    #[serde(flatten)]
    counts: Counts,
    /// Connections made, and attempts or connections that failed, since start.
    connects: u64,
    connection_failures: u64,
    last_error: Option<String>,
    started_unix: f64,
    updated_unix: f64,
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
            if let Err(e) = self.backlog.flush() {
                self.problem(format!("cannot record results as sent (retrying): {e:#}"));
            }
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
            log::warn!("cannot record results as sent: {e:#}");
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

    fn problem(&mut self, reason: String) {
        if self.status.last_error.as_deref() != Some(reason.as_str()) {
            log::warn!("{reason}");
        }
        self.status.last_error = Some(reason);
    }

    fn summary(&self) -> String {
        format!(
            "{:?}: broker {}; {} unsent, {} sent, {} dropped",
            self.status.state,
            self.broker.name,
            self.backlog.unsent(),
            self.backlog.counts.sent,
            self.backlog.counts.dropped
        )
        .to_lowercase()
    }

    /// Writes `status.json` when something in it changed: at once for a new connection
    /// state or `now`, else at most once a second (each write is an fsync in this loop).
    fn write_status(&mut self, now: bool) {
        self.status.unsent = self.backlog.unsent();
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
        if let Err(e) = write_atomic(&self.status_dir, STATUS_FILE, &bytes) {
            log::debug!("{e:#}");
        }
        if let Some(path) = &self.metrics
            && let Err(e) = replace_file(path, &render_metrics(&self.status))
        {
            log::debug!("{e:#}");
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
    let counters = [
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
    ];
    for (name, help, value) in counters {
        t.single(name, Kind::Counter, help, value);
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
