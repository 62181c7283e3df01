//! The daemon in a fleet: systemd's readiness and watchdog over a fake `NOTIFY_SOCKET`
//! (pings stop while a frame is in flight beyond `spool.stall_secs`); the metrics file
//! passes `promtool check metrics` and agrees with `status.json`; names from outside (a
//! newline, bytes that are not UTF-8) neither split a log line nor lose their bytes; a
//! full disk (a 3 MiB tmpfs) is waited out, not a crash.

mod common;
use common::*;
use memaflow::spool::schema::FailureRecord;
use memaflow::spool::status::{DiskState, State, Status};
use serde_json::Value;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const DETECTOR: &str = "face_detection_short_range";
const LANDMARKS: &str = "face_landmark_f32";

/// A scratch directory with a spool, the shared models imported and a configuration.
struct Setup {
    dir: PathBuf,
    spool: PathBuf,
    config: PathBuf,
}

/// `spool_keys` and `run_keys` go into `[spool]` and `[run]`; `models` are `[[model]]`
/// entries, `{det}` and `{lm}` standing for the two shared packages' paths.
fn setup(
    test: &str,
    spool_root: Option<&Path>,
    spool_keys: &str,
    run_keys: &str,
    models: &str,
) -> Setup {
    let dir = scratch(test);
    let det = import_shared(DETECTOR, &dir.join("models"));
    let lm = import_shared(LANDMARKS, &dir.join("models"));
    let spool = spool_root.map_or_else(|| dir.join("spool"), Path::to_path_buf);
    std::fs::create_dir_all(spool.join("incoming")).unwrap();
    let config = dir.join("memaflow.toml");
    let models = models
        .replace("{det}", &format!("{det:?}"))
        .replace("{lm}", &format!("{lm:?}"));
    std::fs::write(
        &config,
        format!(
            "[spool]\nroot = {spool:?}\nrescan_secs = 0.2\nsettle_secs = 0\n{spool_keys}\n\
             [run]\nframes_in_flight = 1\n{run_keys}\n{models}"
        ),
    )
    .unwrap();
    Setup { dir, spool, config }
}

/// A small frame (a few KiB, so that several fit on the test's small disk).
fn photo() -> Vec<u8> {
    let img = image::RgbImage::from_fn(64, 48, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 5) as u8, 90])
    });
    let mut out = vec![];
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// Drops a frame as producers should: written under a hidden name, then renamed.
fn drop_frame(spool: &Path, name: &OsString, bytes: &[u8]) {
    let mut hidden = OsString::from(".");
    hidden.push(name);
    let tmp = spool.join("incoming").join(hidden);
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, spool.join("incoming").join(name)).unwrap();
}

fn entries(dir: &Path) -> Vec<OsString> {
    let mut v: Vec<OsString> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn temp_files(spool: &Path) -> Vec<PathBuf> {
    let mut found = vec![];
    for sub in ["", "incoming", "work", "out", "done", "failed"] {
        for name in entries(&spool.join(sub)) {
            if name.as_bytes().ends_with(b".tmp") {
                found.push(spool.join(sub).join(name));
            }
        }
    }
    found
}

fn status(spool: &Path) -> Status {
    let bytes = std::fs::read(spool.join("status.json")).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < hang_limit(limit),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A daemon that is killed if the test fails before stopping it (its spool may be a
/// tmpfs about to be unmounted).
struct Daemon(Option<Child>);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

/// The daemon, its stderr in `log`.
fn start(s: &Setup, log: &Path, env: &[(&str, &str)]) -> Daemon {
    let mut c = cli_command();
    c.args(["run", "--config", s.config.to_str().unwrap()])
        .env("RUST_LOG", "memaflow=info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    Daemon(Some(c.spawn().unwrap()))
}

fn stop(mut daemon: Daemon, log: &Path) {
    let mut child = daemon.0.take().unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > hang_limit(Duration::from_secs(20)) {
            child.kill().ok();
            panic!(
                "the daemon did not stop:\n{}",
                std::fs::read_to_string(log).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        status.success(),
        "{status}:\n{}",
        std::fs::read_to_string(log).unwrap()
    );
}

/// Datagrams the daemon sends to a fake `NOTIFY_SOCKET`, with the time each arrived.
fn listen(socket: &Path) -> mpsc::Receiver<(Instant, String)> {
    let socket = std::os::unix::net::UnixDatagram::bind(socket).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if tx.send((Instant::now(), text)).is_err() {
                return;
            }
        }
    });
    rx
}

fn has_line(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l == line)
}

#[test]
fn systemd_hears_ready_and_pings_that_stop_while_a_frame_is_wedged() {
    // Every model loads all its layers again for every frame (no cache), one thread:
    // a frame takes seconds here, much longer than stall_secs (20 copies took 0.89 s
    // on CI once the host was built for AVX2: too close to the 0.9 s the test needs).
    let s = setup(
        "fleet-notify",
        None,
        "stall_secs = 0.3",
        "threads = 1\nparallel = 1\ncache = \"off\"",
        &"[[model]]\npath = {lm}\n".repeat(40),
    );
    let socket = s.dir.join("notify.sock");
    let rx = listen(&socket);
    let log = s.dir.join("daemon.log");
    let child = start(
        &s,
        &log,
        &[
            ("NOTIFY_SOCKET", socket.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let recv = || {
        rx.recv_timeout(Duration::from_secs(60))
            .expect("a notification")
    };
    // STATUS= may come before; READY=1 comes before any ping.
    let ready = loop {
        let (_, msg) = recv();
        assert!(!has_line(&msg, "WATCHDOG=1"), "a ping before READY=1");
        if has_line(&msg, "READY=1") {
            break msg;
        }
    };
    assert!(ready.contains("STATUS=running: 0 done"), "{ready}");
    // Idle: pings at half of WATCHDOG_USEC.
    let mut pings = vec![];
    while pings.len() < 10 {
        let (at, msg) = recv();
        if has_line(&msg, "WATCHDOG=1") {
            pings.push(at);
        }
    }
    let idle_gap = pings.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(
        idle_gap < Duration::from_millis(400),
        "idle pings {idle_gap:?} apart"
    );

    drop_frame(&s.spool, &"slow.png".into(), &photo());
    let result = s.spool.join("out/slow.png.json");
    let mut during = vec![];
    let mut stalled_status = false;
    let start_wait = Instant::now();
    while !result.exists() {
        assert!(start_wait.elapsed() < hang_limit(Duration::from_secs(120)));
        if let Ok((at, msg)) = rx.recv_timeout(Duration::from_millis(20)) {
            stalled_status |= msg.contains("stalled: a frame in flight");
            if has_line(&msg, "WATCHDOG=1") {
                during.push(at);
            }
        }
    }
    let r: Value = serde_json::from_slice(&std::fs::read(&result).unwrap()).unwrap();
    let took = Duration::from_secs_f64(r["time_ms"]["total"].as_f64().unwrap() / 1e3);
    assert!(
        took > Duration::from_millis(900),
        "the frame took {took:?}: too fast to show a stall beyond 0.3 s"
    );
    // Pings until the frame had been in flight 0.3 s, none from then until it was done.
    let longest = during
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let quiet_since_last = during.last().map_or(took, |t| t.elapsed());
    let gap = longest.max(quiet_since_last);
    assert!(
        gap + Duration::from_millis(500) >= took - Duration::from_millis(300),
        "pings stopped for only {gap:?} of a {took:?} frame (stall_secs 0.3)"
    );
    assert!(stalled_status, "STATUS= never said the daemon is stalled");
    // Done: the pings resume.
    let mut after = 0;
    while after < 3 {
        if has_line(&recv().1, "WATCHDOG=1") {
            after += 1;
        }
    }
    stop(child, &log);
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("taken for wedged, watchdog pings stop")
            .count(),
        1,
        "{text}"
    );
    assert_eq!(text.matches("watchdog pings resume").count(), 1, "{text}");
    let mut stopping = false;
    while let Ok((_, msg)) = rx.recv_timeout(Duration::from_secs(1)) {
        stopping |= has_line(&msg, "STOPPING=1");
    }
    assert!(stopping, "no STOPPING=1");
    assert_eq!(status(&s.spool).state, State::Stopped);
}

fn promtool_check(test: &str, file: &Path) {
    let Ok(out) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(file).unwrap())
        .output()
    else {
        assert!(
            std::env::var("MEMAFLOW_REQUIRE_REFERENCE").as_deref() != Ok("1"),
            "promtool missing: apt-get install prometheus"
        );
        skip(test, "promtool not installed (apt-get install prometheus)");
        return;
    };
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(file).unwrap()
    );
}

#[test]
fn metrics_pass_promtool_and_agree_with_status_and_names_keep_their_bytes() {
    let test = "metrics_pass_promtool_and_agree_with_status_and_names_keep_their_bytes";
    let s = setup(
        "fleet-metrics",
        None,
        "metrics = \"metrics/memaflow.prom\"",
        "threads = 2",
        "[[model]]\npath = {det}\n[[model]]\npath = {lm}\n[[model]]\npath = \"missing\"\n",
    );
    std::fs::create_dir_all(s.dir.join("metrics")).unwrap();
    let photo = photo();
    let newline = OsString::from("evil\n[ERROR] forged.png");
    let latin1 = OsString::from_vec(b"caf\xe9.png".to_vec());
    let names = [OsString::from("a.png"), newline.clone(), latin1.clone()];
    for n in &names {
        drop_frame(&s.spool, n, &photo);
    }
    drop_frame(&s.spool, &"broken\u{7}.png".into(), b"not an image");
    let out = Running::spawn(
        cli_command()
            .args(["run", "--once", "--config", s.config.to_str().unwrap()])
            .env("RUST_LOG", "memaflow=info"),
    )
    .wait(Duration::from_secs(300), "the daemon");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");

    // Exact names in out/ and done/; the result's frame is the lossy name, the bytes are
    // in frame_bytes_hex when the name is not UTF-8.
    for n in &names {
        let mut result_name = n.clone();
        result_name.push(".json");
        let r: Value =
            serde_json::from_slice(&std::fs::read(s.spool.join("out").join(&result_name)).unwrap())
                .unwrap();
        assert_eq!(r["frame"], n.to_string_lossy().as_ref());
        assert!(s.spool.join("done").join(n).is_file());
        if n == &latin1 {
            assert_eq!(r["frame_bytes_hex"], "636166e92e706e67");
        } else {
            assert!(r.get("frame_bytes_hex").is_none(), "{r}");
        }
    }
    let failure: FailureRecord = serde_json::from_slice(
        &std::fs::read(s.spool.join("failed/broken\u{7}.png.error.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(failure.frame, "broken\u{7}.png");
    // Log lines show the names escaped: a newline cannot start a forged line.
    assert!(log.contains("evil\\n[ERROR] forged.png: "), "{log}");
    assert!(log.contains("caf\\xe9.png: "), "{log}");
    assert!(log.contains("broken\\u{7}.png: failed (decode)"), "{log}");
    assert!(
        !log.lines().any(|l| l.starts_with("[ERROR] forged")),
        "{log}"
    );

    let st = status(&s.spool);
    let prom = s.dir.join("metrics/memaflow.prom");
    promtool_check(test, &prom);
    let m = samples(&std::fs::read_to_string(&prom).unwrap());
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no {k} in the metrics"));
    assert_eq!(st.frames_done, 3);
    assert_eq!(st.frames_failed, 1);
    assert_eq!(
        get("memaflow_frames_total{outcome=\"done\"}"),
        st.frames_done as f64
    );
    assert_eq!(
        get("memaflow_frames_total{outcome=\"failed\"}"),
        st.frames_failed as f64
    );
    assert_eq!(get("memaflow_frame_duration_seconds_count"), 4.0);
    assert_eq!(st.latency.count, 4);
    assert_eq!(
        get("memaflow_frame_duration_seconds_bucket{le=\"+Inf\"}"),
        4.0
    );
    assert!((get("memaflow_frame_duration_seconds_sum") - st.latency.sum_secs).abs() < 1e-6);
    // Two usable models, three frames each; the broken package never runs.
    assert_eq!(st.inferences.len(), 2);
    for c in &st.inferences {
        assert_eq!((c.ok, c.failed), (3, 0), "{c:?}");
        let key = |o: &str| {
            format!(
                "memaflow_inferences_total{{model=\"{}\",outcome=\"{o}\"}}",
                c.model
            )
        };
        assert_eq!(get(&key("ok")), 3.0);
        assert_eq!(get(&key("failed")), 0.0);
    }
    let cache = st.cache.as_ref().unwrap();
    assert!(cache.cache.misses > 0);
    assert_eq!(get("memaflow_layer_loads_total"), cache.cache.misses as f64);
    assert_eq!(
        get("memaflow_layer_cache_hits_total"),
        cache.cache.hits as f64
    );
    assert_eq!(
        get("memaflow_layer_evictions_total"),
        cache.cache.evictions as f64
    );
    assert_eq!(get("memaflow_refusals_total"), cache.cache.refusals as f64);
    assert_eq!(get("memaflow_overdrafts_total"), cache.overdrafts as f64);
    assert_eq!(get("memaflow_ledger_bytes"), cache.ledger_bytes as f64);
    for r in &cache.models {
        let key = format!("memaflow_resident_bytes{{model=\"{}\"}}", r.name);
        assert_eq!(get(&key), r.resident_bytes as f64);
    }
    let mem = st.memory.as_ref().unwrap();
    assert_eq!(get("memaflow_rss_bytes"), mem.rss_bytes.unwrap() as f64);
    if let Some(h) = mem.headroom_bytes {
        assert_eq!(get("memaflow_headroom_bytes"), h as f64);
    }
    if let Some(events) = &mem.cgroup_events {
        for (event, n) in events.iter().filter(|(e, _)| *e != "under_oom") {
            let key = format!("memaflow_cgroup_memory_events_total{{event=\"{event}\"}}");
            assert_eq!(get(&key), *n as f64);
        }
    }
    assert_eq!(get("memaflow_state{state=\"stopped\"}"), 1.0);
    assert_eq!(get("memaflow_disk_state{state=\"ok\"}"), 1.0);
    assert_eq!(get("memaflow_updated_time_seconds"), st.updated_unix);
}

#[test]
fn a_full_disk_is_waited_out_and_every_frame_finishes() {
    let test = "a_full_disk_is_waited_out_and_every_frame_finishes";
    let base = scratch("fleet-disk");
    let disk = match Tmpfs::mount(&base.join("disk"), "size=3m") {
        Ok(d) => d,
        Err(reason) => {
            skip(test, &reason);
            return;
        }
    };
    let s = setup(
        "fleet-disk-setup",
        Some(&disk.0.join("spool")),
        "min_free = \"1M\"\nmetrics = \"metrics/memaflow.prom\"",
        "threads = 1\nparallel = 1\ncache = \"off\"",
        &"[[model]]\npath = {lm}\n".repeat(4),
    );
    std::fs::create_dir_all(s.dir.join("metrics")).unwrap();
    let prom = s.dir.join("metrics/memaflow.prom");
    let metric = |k: &str| {
        std::fs::read_to_string(&prom)
            .ok()
            .and_then(|t| samples(&t).get(k).copied())
    };
    let log = s.dir.join("daemon.log");
    let mut child = start(&s, &log, &[]);
    let photo = photo();
    drop_frame(&s.spool, &"f0.png".into(), &photo);
    wait_until("the first result", Duration::from_secs(60), || {
        s.spool.join("out/f0.png.json").exists()
    });
    // Frames that will arrive while the disk is full, written beforehand.
    let stage = disk.0.join("stage");
    std::fs::create_dir_all(&stage).unwrap();
    for k in 2..5 {
        std::fs::write(stage.join(format!("f{k}.png")), &photo).unwrap();
    }
    // The disk fills while f1 is being processed: its result finds no space.
    drop_frame(&s.spool, &"f1.png".into(), &photo);
    wait_until("f1 claimed", Duration::from_secs(30), || {
        s.spool.join("work/f1.png").exists()
    });
    let filler = disk.0.join("filler");
    fill(&filler);
    for k in 2..5 {
        let name = format!("f{k}.png");
        std::fs::rename(stage.join(&name), s.spool.join("incoming").join(&name)).unwrap();
    }
    wait_until(
        "the disk full in the metrics",
        Duration::from_secs(60),
        || metric("memaflow_disk_state{state=\"full\"}") == Some(1.0),
    );
    assert_eq!(metric("memaflow_frames_deferred"), Some(1.0));
    assert!(metric("memaflow_disk_full_writes_total").unwrap() >= 1.0);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        temp_files(&s.spool).is_empty(),
        "{:?}",
        temp_files(&s.spool)
    );
    assert_eq!(entries(&s.spool.join("work")), ["f1.png"]);
    assert_eq!(
        entries(&s.spool.join("incoming")).len(),
        3,
        "claimed while full"
    );

    // Some space back, less than min_free: f1's result is written, nothing is claimed.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - (512 << 10)).unwrap();
    drop(f);
    assert!(free_bytes(&disk.0) < 1 << 20);
    wait_until("f1's result", Duration::from_secs(30), || {
        s.spool.join("out/f1.png.json").exists()
    });
    wait_until("disk low in status.json", Duration::from_secs(30), || {
        status(&s.spool).disk.state == DiskState::Low
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        entries(&s.spool.join("incoming")).len(),
        3,
        "claimed below min_free"
    );
    assert_eq!(metric("memaflow_disk_state{state=\"low\"}"), Some(1.0));

    // All the space back: the waiting frames are claimed and finished.
    std::fs::remove_file(&filler).unwrap();
    wait_until("every frame", Duration::from_secs(120), || {
        status(&s.spool).frames_done == 5
    });
    let st = status(&s.spool);
    assert_eq!(st.disk.state, DiskState::Ok);
    assert!(st.disk.full_writes >= 1);
    assert_eq!(st.frames_deferred, 0);
    assert_eq!(metric("memaflow_frames_total{outcome=\"done\"}"), Some(5.0));
    let running = child.0.as_mut().unwrap().try_wait().unwrap().is_none();
    assert!(running, "the daemon exited");
    stop(child, &log);
    for k in 0..5 {
        assert!(s.spool.join(format!("out/f{k}.png.json")).is_file(), "f{k}");
        assert!(s.spool.join(format!("done/f{k}.png")).is_file(), "f{k}");
    }
    assert!(
        temp_files(&s.spool).is_empty(),
        "{:?}",
        temp_files(&s.spool)
    );
    assert!(entries(&s.spool.join("work")).is_empty());
    let text = std::fs::read_to_string(&log).unwrap();
    for line in ["spool disk full", "spool disk low", "claiming again"] {
        assert_eq!(text.matches(line).count(), 1, "one '{line}' line:\n{text}");
    }
}
