//! The metrics file: Prometheus' text exposition format (version 0.0.4), for
//! node_exporter's textfile collector (the daemon has no network). Rendered from
//! `status.json`'s value at the same moment, so the two agree; replaced by a rename, so
//! the collector never reads half of it. Every metric is documented in docs/metrics.md.
//! `Text` is shared with `memaflow publish`, which writes a file of its own.

use super::status::{DiskState, State, Status};
use std::collections::BTreeMap;
use std::fmt::{Display, Write};

/// The kinds of metric families used here.
#[derive(Clone, Copy)]
pub(crate) enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// A metrics file being written: families, each with its `HELP` and `TYPE` lines first.
#[derive(Default)]
pub(crate) struct Text(String);

impl Text {
    pub(crate) fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Text {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
        self
    }

    /// One sample; label values are escaped as the format asks.
    pub(crate) fn sample(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        value: impl Display,
    ) -> &mut Text {
        self.0.push_str(name);
        if !labels.is_empty() {
            let labels: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                .collect();
            let _ = write!(self.0, "{{{}}}", labels.join(","));
        }
        let _ = writeln!(self.0, " {value}");
        self
    }

    /// A family with one unlabelled sample.
    pub(crate) fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl Display) {
        self.family(name, kind, help).sample(name, &[], value);
    }

    /// Counter families with one unlabelled sample each: (name, help, value).
    pub(crate) fn counters(&mut self, counters: &[(&str, &str, u64)]) {
        for &(name, help, value) in counters {
            self.single(name, Kind::Counter, help, value);
        }
    }

    /// A gauge family with one sample a state (label `state`): 1 for the current one.
    pub(crate) fn states(&mut self, name: &str, help: &str, states: &[(&str, bool)]) {
        self.family(name, Kind::Gauge, help);
        for &(label, current) in states {
            self.sample(name, &[("state", label)], flag(current));
        }
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0.into_bytes()
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

fn flag(b: bool) -> u8 {
    u8::from(b)
}

/// The daemon's metrics file from its status.
pub(crate) fn render(s: &Status) -> Vec<u8> {
    let mut t = Text::default();
    frames(&mut t, s);
    cache(&mut t, s);
    memory(&mut t, s);
    health(&mut t, s);
    t.into_bytes()
}

fn frames(t: &mut Text, s: &Status) {
    t.family(
        "memaflow_frames_total",
        Kind::Counter,
        "Frames recorded since start, by outcome: done (result written) or failed (failure record written).",
    )
    .sample("memaflow_frames_total", &[("outcome", "done")], s.frames_done)
    .sample("memaflow_frames_total", &[("outcome", "failed")], s.frames_failed);
    t.single(
        "memaflow_frames_in_flight",
        Kind::Gauge,
        "Frames claimed and not yet recorded.",
        s.frames_in_flight,
    );
    t.single(
        "memaflow_frames_deferred",
        Kind::Gauge,
        "Processed frames whose outcome waits for disk space (kept in work/).",
        s.frames_deferred,
    );
    let h = &s.latency;
    let name = "memaflow_frame_duration_seconds";
    t.family(
        name,
        Kind::Histogram,
        "Time from claim to record of each recorded frame.",
    );
    let mut cumulative = 0;
    for (bound, count) in h.bounds_secs.iter().zip(&h.counts) {
        cumulative += count;
        t.sample(
            &format!("{name}_bucket"),
            &[("le", &bound.to_string())],
            cumulative,
        );
    }
    t.sample(&format!("{name}_bucket"), &[("le", "+Inf")], h.count)
        .sample(&format!("{name}_sum"), &[], h.sum_secs)
        .sample(&format!("{name}_count"), &[], h.count);
    let name = "memaflow_inferences_total";
    t.family(
        name,
        Kind::Counter,
        "Inferences since start, by model and outcome: ok (outputs reported) or failed.",
    );
    for c in &s.inferences {
        t.sample(name, &[("model", &c.model), ("outcome", "ok")], c.ok)
            .sample(
                name,
                &[("model", &c.model), ("outcome", "failed")],
                c.failed,
            );
    }
}

fn cache(t: &mut Text, s: &Status) {
    let Some(c) = &s.cache else { return };
    t.counters(&[
        (
            "memaflow_layer_loads_total",
            "Layer loads that read and planned a layer file.",
            c.cache.misses,
        ),
        (
            "memaflow_layer_cache_hits_total",
            "Layer loads served by a resident layer.",
            c.cache.hits,
        ),
        (
            "memaflow_layer_evictions_total",
            "Resident layers evicted to make room.",
            c.cache.evictions,
        ),
        (
            "memaflow_layer_evicted_bytes_total",
            "Bytes of the resident layers evicted.",
            c.cache.evicted_bytes,
        ),
        (
            "memaflow_refusals_total",
            "Inferences refused because they could not fit under the memory limit.",
            c.cache.refusals,
        ),
        (
            "memaflow_overdrafts_total",
            "Times the ledger went beyond the budget.",
            c.overdrafts,
        ),
    ]);
    t.single(
        "memaflow_ledger_bytes",
        Kind::Gauge,
        "The scheduler's ledger now: resident layers and reservations.",
        c.ledger_bytes,
    );
    t.single(
        "memaflow_ledger_high_water_bytes",
        Kind::Gauge,
        "The ledger's high-water mark since start.",
        c.ledger_high_water_bytes,
    );
    // By model name: a package configured twice is registered twice, one series here.
    let mut by_name: BTreeMap<&str, (u64, usize)> = BTreeMap::new();
    for m in &c.models {
        let e = by_name.entry(&m.name).or_default();
        e.0 += m.resident_bytes;
        e.1 += m.resident_layers;
    }
    let name = "memaflow_resident_bytes";
    t.family(name, Kind::Gauge, "Bytes of a model's resident layers.");
    for (model, (bytes, _)) in &by_name {
        t.sample(name, &[("model", model)], bytes);
    }
    let name = "memaflow_resident_layers";
    t.family(name, Kind::Gauge, "A model's resident layers.");
    for (model, (_, layers)) in &by_name {
        t.sample(name, &[("model", model)], layers);
    }
}

fn memory(t: &mut Text, s: &Status) {
    let Some(m) = &s.memory else { return };
    let gauges = [
        (
            "memaflow_rss_bytes",
            "The daemon's resident set (VmRSS).",
            m.rss_bytes,
        ),
        (
            "memaflow_peak_rss_bytes",
            "The daemon's peak resident set (VmHWM).",
            m.peak_rss_bytes,
        ),
        (
            "memaflow_mem_available_bytes",
            "MemAvailable of /proc/meminfo.",
            m.mem_available_bytes,
        ),
        (
            "memaflow_cgroup_limit_bytes",
            "The tightest memory limit of the daemon's cgroup and its ancestors.",
            m.cgroup_limit_bytes,
        ),
        (
            "memaflow_headroom_bytes",
            "What the memory gate would allow beyond what is resident now, reserve deducted.",
            m.headroom_bytes,
        ),
    ];
    for (name, help, value) in gauges {
        if let Some(v) = value {
            t.single(name, Kind::Gauge, help, v);
        }
    }
    let Some(events) = &m.cgroup_events else {
        return;
    };
    let name = "memaflow_cgroup_memory_events_total";
    t.family(
        name,
        Kind::Counter,
        "The kernel's memory events of the daemon's cgroup (memory.events; v1: oom_kill of memory.oom_control).",
    );
    for (event, n) in events.iter().filter(|(e, _)| *e != "under_oom") {
        t.sample(name, &[("event", event)], n);
    }
    if let Some(n) = events.get("under_oom") {
        t.single(
            "memaflow_cgroup_under_oom",
            Kind::Gauge,
            "1 while the daemon's cgroup (v1) is out of memory.",
            n,
        );
    }
}

fn health(t: &mut Text, s: &Status) {
    t.states(
        "memaflow_state",
        "The daemon's state: 1 for the current one.",
        &[
            ("running", s.state == State::Running),
            ("stopping", s.state == State::Stopping),
            ("stopped", s.state == State::Stopped),
        ],
    );
    t.states(
        "memaflow_disk_state",
        "The spool's file system: ok, low (below min_free: not claiming) or full (outcomes wait): 1 for the current one.",
        &[
            ("ok", s.disk.state == DiskState::Ok),
            ("low", s.disk.state == DiskState::Low),
            ("full", s.disk.state == DiskState::Full),
        ],
    );
    if let Some(free) = s.disk.free_bytes {
        t.single(
            "memaflow_disk_free_bytes",
            Kind::Gauge,
            "Free bytes on the spool's file system at the last check.",
            free,
        );
    }
    t.single(
        "memaflow_disk_min_free_bytes",
        Kind::Gauge,
        "spool.min_free: below it no frame is claimed.",
        s.disk.min_free_bytes,
    );
    t.single(
        "memaflow_disk_full_writes_total",
        Kind::Counter,
        "Writes that found the spool's file system full.",
        s.disk.full_writes,
    );
    t.single(
        "memaflow_watchdog_stalled",
        Kind::Gauge,
        "1 while a frame has been in flight longer than spool.stall_secs (watchdog pings stopped).",
        flag(s.watchdog.stalled),
    );
    t.single(
        "memaflow_oldest_frame_seconds",
        Kind::Gauge,
        "How long the oldest frame in hand has been in flight.",
        s.watchdog.oldest_frame_secs,
    );
    t.single(
        "memaflow_start_time_seconds",
        Kind::Gauge,
        "When the daemon started, in seconds since the epoch.",
        s.started_unix,
    );
    t.single(
        "memaflow_updated_time_seconds",
        Kind::Gauge,
        "When this file was written, in seconds since the epoch.",
        s.updated_unix,
    );
    t.family(
        "memaflow_build_info",
        Kind::Gauge,
        "The daemon's version and board (value 1).",
    )
    .sample(
        "memaflow_build_info",
        &[
            ("version", &s.version),
            ("board", s.board.as_deref().unwrap_or("")),
        ],
        1,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut t = Text::default();
        t.family("m", Kind::Gauge, "a\nb")
            .sample("m", &[("model", "a\"b\\c\nd")], 1);
        let text = String::from_utf8(t.into_bytes()).unwrap();
        assert_eq!(
            text,
            "# HELP m a\\nb\n# TYPE m gauge\nm{model=\"a\\\"b\\\\c\\nd\"} 1\n"
        );
    }
}
