//! `memaflow publish` against a real mosquitto (Debian's `mosquitto` and
//! `mosquitto-clients`) on 127.0.0.1, with a password file and a TLS listener whose
//! certificates the test makes with the openssl CLI. A `mosquitto_sub` with a persistent
//! session records what the broker delivered. Checked: every result delivered at least
//! once over 50 SIGKILLs and a broker restart (duplicates counted and printed); nothing
//! marked sent before the broker acknowledged it; TLS with a client certificate; wrong
//! password, untrusted certificate and unknown host named in the log, retried, results
//! kept; `publish.keep`; systemd's READY=1 and WATCHDOG=1; a full disk (a small tmpfs)
//! waited out without an exit, a result removed or a marker written early.
#![cfg(feature = "publish")]

mod common;
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const USER: &str = "memaflow";
const PASSWORD: &str = "s3cret";
const SUB_USER: &str = "watcher";
const SUB_PASSWORD: &str = "w4tch";
/// Two models per result, one with a name that would break a topic unescaped.
const MODELS: [&str; 2] = ["face", "odd/model+#"];
const MODEL_TOPICS: [&str; 2] = ["face", "odd_model__"];

/// Whether mosquitto is installed; CI (MEMAFLOW_REQUIRE_REFERENCE=1) requires it.
fn have_mosquitto(test: &str) -> bool {
    let found = [
        mosquitto_bin(),
        "mosquitto_sub",
        "mosquitto_passwd",
        "openssl",
    ]
    .iter()
    .all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !found {
        assert!(
            std::env::var("MEMAFLOW_REQUIRE_REFERENCE").as_deref() != Ok("1"),
            "mosquitto, mosquitto_sub, mosquitto_passwd or openssl missing: apt-get install mosquitto mosquitto-clients openssl"
        );
        skip(
            test,
            "mosquitto not installed (apt-get install mosquitto mosquitto-clients)",
        );
    }
    found
}

/// Debian installs the broker in /usr/sbin, which a user's PATH may lack.
fn mosquitto_bin() -> &'static str {
    if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn sh(dir: &Path, script: &str) {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate signed by it, and a
/// second CA that signed nothing of the broker's.
fn make_certificates(dir: &Path) {
    sh(
        dir,
        r#"
        key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
        key ca.key; key rogue-ca.key; key server.key; key client.key
        openssl req -x509 -new -key ca.key -out ca.pem -days 2 -subj /CN=memaflow-test-ca
        openssl req -x509 -new -key rogue-ca.key -out rogue-ca.pem -days 2 -subj /CN=rogue-ca
        openssl req -new -key server.key -out server.csr -subj /CN=127.0.0.1
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' > server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile server.ext 2>/dev/null
        openssl req -new -key client.key -out client.csr -subj /CN=memaflow-device
        printf 'extendedKeyUsage=clientAuth\n' > client.ext
        openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 2 -extfile client.ext 2>/dev/null
        "#,
    );
}

/// mosquitto on two free ports of 127.0.0.1: plain and TLS (client certificate
/// required), both with passwords; persistent, so a restart keeps queued messages.
struct Mosquitto {
    dir: PathBuf,
    port: u16,
    tls_port: u16,
    child: Option<Child>,
}

impl Mosquitto {
    fn start(dir: &Path) -> Mosquitto {
        make_certificates(dir);
        sh(
            dir,
            &format!(
                "mosquitto_passwd -c -b passwd {USER} {PASSWORD} && mosquitto_passwd -b passwd {SUB_USER} {SUB_PASSWORD}"
            ),
        );
        let (port, tls_port) = (free_port(), free_port());
        let d = dir.display();
        std::fs::write(
            dir.join("mosquitto.conf"),
            format!(
                "user root\npersistence true\npersistence_location {d}/\n\
                 max_queued_messages 0\nallow_anonymous false\npassword_file {d}/passwd\n\
                 log_dest file {d}/mosquitto.log\nlog_type all\n\
                 listener {port} 127.0.0.1\n\
                 listener {tls_port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\n\
                 keyfile {d}/server.key\nrequire_certificate true\n"
            ),
        )
        .unwrap();
        let mut m = Mosquitto {
            dir: dir.to_path_buf(),
            port,
            tls_port,
            child: None,
        };
        m.restart();
        m
    }

    fn restart(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.tls_port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "mosquitto did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM: mosquitto saves its persistent state and exits.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "TERM");
            child.wait().unwrap();
        }
    }

    fn signal(&self, sig: &str) {
        signal(self.child.as_ref().unwrap(), sig);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

/// A publisher that is killed if the test fails before it stops it.
struct Running(Child);

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            self.0.kill().ok();
            self.0.wait().ok();
        }
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

/// One message as `mosquitto_sub` printed it.
struct Received {
    topic: String,
    payload: Value,
}

/// `mosquitto_sub` with a persistent session (QoS 1, fixed client id): messages published
/// while it is away (a broker restart) are kept for it by the broker.
struct Subscriber {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    got: Vec<Received>,
}

impl Subscriber {
    fn start(broker: &Mosquitto) -> Subscriber {
        let mut child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
            .args([
                "-u",
                SUB_USER,
                "-P",
                SUB_PASSWORD,
                "-q",
                "1",
                "-c",
                "-i",
                "test-watcher",
            ])
            .args(["-t", "memaflow/#", "-F", "%x %t"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let start = Instant::now();
        while !broker.log().contains("test-watcher") {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the subscriber did not connect"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        Subscriber {
            child,
            lines,
            got: vec![],
        }
    }

    fn take(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            let (hex, topic) = line.split_once(' ').unwrap_or((&line, ""));
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            self.got.push(Received {
                topic: topic.to_string(),
                payload: serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                    panic!(
                        "payload not JSON ({e}): {}",
                        String::from_utf8_lossy(&bytes)
                    )
                }),
            });
        }
    }

    /// (result id, model) of every message so far, with how often each came.
    fn delivered(&mut self) -> BTreeMap<(u64, String), usize> {
        self.take();
        let mut m = BTreeMap::new();
        for r in &self.got {
            let id = r.payload["id"].as_u64().unwrap();
            let model = r.payload["models"][0]["name"].as_str().unwrap().to_string();
            *m.entry((id, model)).or_insert(0) += 1;
        }
        m
    }

    /// Waits until every (id, model) of `ids` arrived; panics naming what is missing.
    fn wait_for(&mut self, ids: &[u64], limit: Duration) -> BTreeMap<(u64, String), usize> {
        let start = Instant::now();
        loop {
            let d = self.delivered();
            let missing: Vec<_> = ids
                .iter()
                .flat_map(|&id| MODELS.iter().map(move |m| (id, m.to_string())))
                .filter(|k| !d.contains_key(k))
                .collect();
            if missing.is_empty() {
                return d;
            }
            assert!(
                start.elapsed() < limit,
                "{} messages never arrived, e.g. {:?}",
                missing.len(),
                &missing[..missing.len().min(5)]
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// A spool with `out/` and a configuration for the publisher.
struct Spool {
    dir: PathBuf,
    config: PathBuf,
}

impl Spool {
    fn new(dir: &Path, publish: &str) -> Spool {
        std::fs::create_dir_all(dir.join("spool/out")).unwrap();
        let config = dir.join("memaflow.toml");
        std::fs::write(
            &config,
            format!(
                "[spool]\nroot = \"spool\"\nrescan_secs = 0.5\n[[model]]\npath = \"unused\"\n\
                 [publish]\ndevice = \"test-device\"\nretry_max_secs = 0.5\n{publish}\n"
            ),
        )
        .unwrap();
        Spool {
            dir: dir.join("spool"),
            config,
        }
    }

    fn result_name(id: u64) -> OsString {
        // Names come from outside: one in seven has a newline and a byte that is not UTF-8.
        if id % 7 == 3 {
            let mut name = format!("caf-{id}\n.png.json").into_bytes();
            name.insert(3, 0xe9);
            OsString::from_vec(name)
        } else {
            OsString::from(format!("r{id:05}.png.json"))
        }
    }

    /// Writes a result the way the daemon does: temp file, then rename into `out/`.
    fn write_result(&self, id: u64) {
        let staged = Self::stage_result(&self.dir.join("out/.result.tmp"), id);
        std::fs::rename(&staged, self.dir.join("out").join(Self::result_name(id))).unwrap();
    }

    /// Writes result `id` to `path`, to be renamed into `out/` later.
    fn stage_result(path: &Path, id: u64) -> PathBuf {
        let name = Self::result_name(id);
        let body = serde_json::json!({
            "frame": String::from_utf8_lossy(name.as_bytes()).trim_end_matches(".json"),
            "id": id,
            "written_unix": unix_now(),
            "models": MODELS.iter().map(|m| serde_json::json!({"name": m, "outputs": [id]})).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&body).unwrap()).unwrap();
        path.to_path_buf()
    }

    fn marked(&self) -> BTreeSet<OsString> {
        names(&self.dir.join("publish/sent"))
    }

    fn results(&self) -> BTreeSet<OsString> {
        names(&self.dir.join("out"))
    }

    fn status(&self) -> Value {
        std::fs::read(self.dir.join("publish/status.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }

    fn publisher(&self, log: &Path) -> Command {
        let mut c = cli_command();
        c.arg("publish")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "memaflow=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap(),
            );
        c
    }
}

fn names(dir: &Path) -> BTreeSet<OsString> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name())
                .filter(|n| !n.as_bytes().starts_with(b"."))
                .collect()
        })
        .unwrap_or_default()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn credentials() -> String {
    format!("username = \"{USER}\"\npassword = \"{PASSWORD}\"")
}

#[test]
fn every_result_arrives_over_sigkills_and_a_broker_restart() {
    if !have_mosquitto("every_result_arrives_over_sigkills_and_a_broker_restart") {
        return;
    }
    let dir = scratch("publish-sigkill");
    let mut broker = Mosquitto::start(&dir);
    let mut sub = Subscriber::start(&broker);
    let spool = Spool::new(
        &dir,
        &format!(
            "host = \"127.0.0.1\"\nport = {}\n{}",
            broker.port,
            credentials()
        ),
    );
    let log = dir.join("publisher.log");
    // The kill schedule is reproducible.
    let mut rng = SplitMix64(17);
    let mut written = 0u64;
    let t0 = Instant::now();
    let cycles = 50;
    for cycle in 0..cycles {
        if cycle == 20 {
            broker.stop();
        }
        if cycle == 30 {
            broker.restart();
        }
        for _ in 0..rng.below(12) {
            spool.write_result(written);
            written += 1;
        }
        let mut child = spool.publisher(&log).spawn().map(Running).unwrap();
        // Results keep arriving while it runs; the kill comes at any moment, start-up
        // included.
        let life = Duration::from_millis(rng.below(300));
        let start = Instant::now();
        while start.elapsed() < life {
            if rng.below(4) == 0 {
                spool.write_result(written);
                written += 1;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // Nothing the publisher marked is missing from out/: it removes no result.
        let results = spool.results();
        assert!(
            spool.marked().is_subset(&results),
            "a marker without its result"
        );
        assert_eq!(
            results.len() as u64,
            written,
            "a result went missing from out/"
        );
    }
    let kills = t0.elapsed();

    // Nothing is marked before the broker acknowledged it: freeze the broker once the
    // publisher is connected, give it results to send, kill it, and none is marked.
    let mut child = spool.publisher(&log).spawn().map(Running).unwrap();
    wait_until("a connection", Duration::from_secs(20), || {
        spool.status()["state"] == "connected" && spool.status()["unsent"] == 0
    });
    broker.signal("STOP");
    let frozen: Vec<u64> = (written..written + 5).collect();
    for &id in &frozen {
        spool.write_result(id);
    }
    written += 5;
    std::thread::sleep(Duration::from_millis(1500));
    child.kill().unwrap();
    child.wait().unwrap();
    let marked = spool.marked();
    for &id in &frozen {
        assert!(
            !marked.contains(&Spool::result_name(id)),
            "result {id} marked sent without an acknowledgement"
        );
    }
    broker.signal("CONT");

    // A last run sends the rest; SIGTERM then stops it with status 0.
    let mut child = spool.publisher(&log).spawn().map(Running).unwrap();
    wait_until("every result marked sent", Duration::from_secs(60), || {
        spool.marked().len() as u64 == written
    });
    let ids: Vec<u64> = (0..written).collect();
    let delivered = sub.wait_for(&ids, Duration::from_secs(30));
    signal(&child, "TERM");
    assert!(child.wait().unwrap().success(), "SIGTERM must exit 0");
    assert_eq!(spool.status()["state"], "stopped");

    let messages: usize = delivered.values().sum();
    let duplicates = messages - delivered.len();
    for r in &sub.got {
        let model = r.payload["models"][0]["name"].as_str().unwrap();
        let k = MODELS.iter().position(|m| *m == model).unwrap();
        assert_eq!(r.topic, format!("memaflow/test-device/{}", MODEL_TOPICS[k]));
    }
    let odd = sub
        .got
        .iter()
        .find(|r| r.payload["id"].as_u64().unwrap() % 7 == 3)
        .unwrap();
    assert!(
        odd.payload["frame"].as_str().unwrap().contains('\n'),
        "the frame name arrives as written"
    );
    eprintln!(
        "{written} results ({} messages) over {cycles} SIGKILLs ({kills:.1?}) and a broker restart: \
         all delivered, {messages} messages received, {duplicates} duplicates",
        written * 2
    );
}

#[test]
fn tls_with_a_client_certificate() {
    if !have_mosquitto("tls_with_a_client_certificate") {
        return;
    }
    let dir = scratch("publish-tls");
    let broker = Mosquitto::start(&dir);
    let mut sub = Subscriber::start(&broker);
    let d = dir.display();
    let spool = Spool::new(
        &dir,
        &format!(
            "host = \"127.0.0.1\"\nport = {}\n{}\nca_file = \"{d}/ca.pem\"\n\
             client_cert = \"{d}/client.pem\"\nclient_key = \"{d}/client.key\"",
            broker.tls_port,
            credentials()
        ),
    );
    for id in 0..20 {
        spool.write_result(id);
    }
    let mut child = spool
        .publisher(&dir.join("publisher.log"))
        .spawn()
        .map(Running)
        .unwrap();
    sub.wait_for(&(0..20).collect::<Vec<_>>(), Duration::from_secs(30));
    wait_until("every result marked", Duration::from_secs(10), || {
        spool.marked().len() == 20
    });
    signal(&child, "TERM");
    assert!(child.wait().unwrap().success());
}

/// Starts a publisher on a bad configuration: it must say what is wrong, naming the
/// broker, keep retrying, and keep every result.
fn refused(dir: &Path, publish: &str, expect: &[&str], wrap: Option<&str>) {
    let spool = Spool::new(dir, publish);
    for id in 0..3 {
        spool.write_result(id);
    }
    let log = dir.join("publisher.log");
    let mut cmd = spool.publisher(&log);
    let mut child = match wrap {
        // Another network namespace: only its own loopback, so a name lookup fails at
        // once instead of asking the machine's DNS server.
        Some(w) => {
            let mut c = Command::new(w);
            c.args(["-n", "--"])
                .arg(cmd.get_program())
                .args(cmd.get_args())
                .envs(cmd.get_envs().filter_map(|(k, v)| Some((k, v?))))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&log)
                        .unwrap(),
                );
            c.spawn().map(Running).unwrap()
        }
        None => cmd.spawn().map(Running).unwrap(),
    };
    wait_until("two failed attempts", Duration::from_secs(20), || {
        spool.status()["connection_failures"].as_u64().unwrap_or(0) >= 2
    });
    assert!(child.try_wait().unwrap().is_none(), "the publisher exited");
    let text = std::fs::read_to_string(&log).unwrap();
    for e in expect {
        assert!(text.contains(e), "the log lacks {e:?}:\n{text}");
    }
    let warnings = text.lines().filter(|l| l.contains("WARN")).count();
    assert_eq!(
        warnings, 1,
        "one line per change of state, not per attempt:\n{text}"
    );
    assert_eq!(spool.status()["unsent"], 3);
    assert!(
        spool.status()["last_error"]
            .as_str()
            .unwrap()
            .contains(expect[0])
    );
    assert!(spool.marked().is_empty());
    assert_eq!(spool.results().len(), 3);
    signal(&child, "TERM");
    assert!(child.wait().unwrap().success());
}

#[test]
fn wrong_password_bad_certificate_unknown_host_are_named_and_retried() {
    if !have_mosquitto("wrong_password_bad_certificate_unknown_host_are_named_and_retried") {
        return;
    }
    let dir = scratch("publish-refused");
    let broker = Mosquitto::start(&dir);
    let d = dir.display();
    let plain = format!("MQTT broker 127.0.0.1:{}", broker.port);
    refused(
        &dir.join("password"),
        &format!(
            "host = \"127.0.0.1\"\nport = {}\nusername = \"{USER}\"\npassword = \"wrong\"",
            broker.port
        ),
        &[&plain, "refused the connection", "password"],
        None,
    );
    let tls = format!("MQTT broker 127.0.0.1:{}", broker.tls_port);
    refused(
        &dir.join("certificate"),
        &format!(
            "host = \"127.0.0.1\"\nport = {}\n{}\nca_file = \"{d}/rogue-ca.pem\"\n\
             client_cert = \"{d}/client.pem\"\nclient_key = \"{d}/client.key\"",
            broker.tls_port,
            credentials()
        ),
        &[&tls, "TLS failed", "certificate"],
        None,
    );
    refused(
        &dir.join("host"),
        "host = \"no-such-broker.invalid\"",
        &["MQTT broker no-such-broker.invalid:1883"],
        Some("unshare"),
    );
    // Once the password is right, what waited is delivered.
    let mut sub = Subscriber::start(&broker);
    let spool = Spool::new(
        &dir.join("password"),
        &format!(
            "host = \"127.0.0.1\"\nport = {}\n{}",
            broker.port,
            credentials()
        ),
    );
    let mut child = spool
        .publisher(&dir.join("password/publisher.log"))
        .spawn()
        .map(Running)
        .unwrap();
    sub.wait_for(&[0, 1, 2], Duration::from_secs(20));
    signal(&child, "TERM");
    assert!(child.wait().unwrap().success());
}

#[test]
fn keep_drops_the_oldest_with_a_log_line() {
    let dir = scratch("publish-keep");
    // Nothing listens on this port: every result waits.
    let spool = Spool::new(
        &dir,
        &format!("host = \"127.0.0.1\"\nport = {}\nkeep = 4", free_port()),
    );
    // Oldest first: 3 (a name with a newline and a byte that is not UTF-8), 0, 1, ...
    for id in [3, 0, 1, 2, 4, 5] {
        spool.write_result(id);
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = dir.join("publisher.log");
    let mut child = spool.publisher(&log).spawn().map(Running).unwrap();
    wait_until("the drops", Duration::from_secs(10), || {
        spool.status()["dropped"] == 2
    });
    spool.write_result(6);
    wait_until("one more drop", Duration::from_secs(10), || {
        spool.status()["dropped"] == 3
    });
    let left: Vec<OsString> = spool.results().into_iter().collect();
    let want: Vec<OsString> = [2, 4, 5, 6]
        .map(Spool::result_name)
        .into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(left, want, "the oldest went");
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("dropped result").count(), 3, "{text}");
    // The exact name, escaped: the log line stays one line.
    assert!(
        text.contains("dropped result caf\\xe9-3\\n.png.json unsent"),
        "{text}"
    );
    signal(&child, "TERM");
    assert!(child.wait().unwrap().success());
}

#[test]
fn systemd_hears_ready_and_watchdog_pings() {
    let dir = scratch("publish-notify");
    let spool = Spool::new(
        &dir,
        &format!("host = \"127.0.0.1\"\nport = {}", free_port()),
    );
    let socket_path = dir.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut child = spool
        .publisher(&dir.join("publisher.log"))
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .spawn()
        .map(Running)
        .unwrap();
    let mut buf = [0u8; 4096];
    let mut recv = || {
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv();
    assert!(first.lines().any(|l| l == "READY=1"), "{first}");
    assert!(first.lines().any(|l| l.starts_with("STATUS=")), "{first}");
    // Pings at half of WATCHDOG_USEC while the loop runs (the broker is away meanwhile).
    let start = Instant::now();
    let mut pings = 0;
    while pings < 5 {
        if recv().lines().any(|l| l == "WATCHDOG=1") {
            pings += 1;
        }
    }
    let every = start.elapsed() / 5;
    assert!(every < Duration::from_millis(400), "pings every {every:?}");
    signal(&child, "TERM");
    assert!(child.wait().unwrap().success());
    let mut last = String::new();
    while let Ok(n) = socket.recv(&mut buf) {
        last = String::from_utf8_lossy(&buf[..n]).into_owned();
        if last.contains("STOPPING=1") {
            break;
        }
    }
    assert!(last.contains("STOPPING=1"), "{last}");
}

/// Makes a directory immutable (even to root) while it lives: a stand-in for a full or
/// read-only file system under `publish/sent/`.
struct Immutable(PathBuf);

impl Immutable {
    fn new(dir: &Path) -> Option<Immutable> {
        let ok = Command::new("chattr")
            .arg("+i")
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Immutable(dir.to_path_buf()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[test]
fn markers_that_cannot_be_written_keep_the_publisher_up() {
    let test = "markers_that_cannot_be_written_keep_the_publisher_up";
    if !have_mosquitto(test) {
        return;
    }
    let dir = scratch("publish-marker-failure");
    let broker = Mosquitto::start(&dir);
    let mut sub = Subscriber::start(&broker);
    let spool = Spool::new(
        &dir,
        &format!(
            "host = \"127.0.0.1\"\nport = {}\n{}",
            broker.port,
            credentials()
        ),
    );
    let log = dir.join("publisher.log");
    let mut child = spool.publisher(&log).spawn().map(Running).unwrap();
    wait_until("a connection", Duration::from_secs(20), || {
        spool.status()["state"] == "connected"
    });
    let Some(frozen) = Immutable::new(&spool.dir.join("publish/sent")) else {
        skip(test, "chattr +i is not supported here");
        child.kill().ok();
        child.wait().ok();
        return;
    };
    for id in 0..3 {
        spool.write_result(id);
    }
    sub.wait_for(&[0, 1, 2], Duration::from_secs(20));
    wait_until(
        "the failure in status.json",
        Duration::from_secs(10),
        || {
            spool.status()["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("cannot record results as sent"))
        },
    );
    assert!(child.try_wait().unwrap().is_none(), "the publisher exited");
    assert!(spool.marked().is_empty());
    drop(frozen);
    wait_until("the markers", Duration::from_secs(10), || {
        spool.marked().len() == 3 && spool.status()["sent"] == 3
    });
    signal(&child, "TERM");
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("cannot record results as sent").count(),
        1,
        "one line per change, not per retry:\n{text}"
    );
    // Acknowledged once: not sent again while its marker waited.
    assert_eq!(sub.delivered().values().sum::<usize>(), 6);
}

#[test]
fn watchdog_pings_stop_while_the_loop_is_busy_and_metrics_pass_promtool() {
    let test = "watchdog_pings_stop_while_the_loop_is_busy_and_metrics_pass_promtool";
    if !have_mosquitto(test) {
        return;
    }
    let dir = scratch("publish-busy");
    let broker = Mosquitto::start(&dir);
    let spool = Spool::new(
        &dir,
        &format!(
            "host = \"127.0.0.1\"\nport = {}\n{}\nmetrics = \"publish.prom\"",
            broker.port,
            credentials()
        ),
    );
    let socket_path = dir.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "WATCHDOG=1")
                && tx.send(Instant::now()).is_err()
            {
                return;
            }
        }
    });
    let mut child = spool
        .publisher(&dir.join("publisher.log"))
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .spawn()
        .map(Running)
        .unwrap();
    wait_until("a connection", Duration::from_secs(20), || {
        spool.status()["state"] == "connected"
    });
    let gaps = |pings: &[Instant]| pings.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    let idle: Vec<Instant> = (0..10).map(|_| rx.recv().unwrap()).collect();
    assert!(
        gaps(&idle) < Duration::from_millis(300),
        "idle: {:?}",
        gaps(&idle)
    );
    // One result with eight million outputs: reading, checking and splitting it per model
    // is one step of the loop, far longer than the 100 ms between pings. A step that
    // never ends (a wedged read) would stop them for good.
    let mut body =
        String::from("{\"frame\": \"big.png\", \"models\": [{\"name\": \"face\", \"outputs\": [");
    body.push_str(&"1,".repeat(8_000_000));
    body.push_str("1]}]}");
    let tmp = spool.dir.join("out/.big.tmp");
    std::fs::write(&tmp, body).unwrap();
    while rx.try_recv().is_ok() {}
    let written = Instant::now();
    std::fs::rename(&tmp, spool.dir.join("out/big.png.json")).unwrap();
    wait_until("the big result sent", Duration::from_secs(60), || {
        spool.status()["sent"] == 1
    });
    let mut busy = vec![written];
    busy.extend(rx.try_iter());
    assert!(
        gaps(&busy) >= Duration::from_millis(300),
        "pings went on while the loop was busy: longest gap {:?}",
        gaps(&busy)
    );
    signal(&child, "TERM");
    assert!(child.wait().unwrap().success());
    // The publisher's metrics file: valid, and the counters of its status.json.
    let prom = dir.join("publish.prom");
    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&prom).unwrap())
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => {
            assert!(
                std::env::var("MEMAFLOW_REQUIRE_REFERENCE").as_deref() != Ok("1"),
                "promtool missing: apt-get install prometheus"
            );
            skip(test, "promtool not installed (apt-get install prometheus)");
        }
    }
    let text = std::fs::read_to_string(&prom).unwrap();
    let status = spool.status();
    for (metric, field) in [
        ("memaflow_publish_sent_total", "sent"),
        ("memaflow_publish_unsent", "unsent"),
        ("memaflow_publish_connects_total", "connects"),
        (
            "memaflow_publish_connection_failures_total",
            "connection_failures",
        ),
    ] {
        let line = format!("{metric} {}", status[field]);
        assert!(text.lines().any(|l| l == line), "no '{line}' in\n{text}");
    }
    assert!(
        text.contains("memaflow_publish_state{state=\"stopped\"} 1"),
        "{text}"
    );
}

/// Hidden entries ending in `.tmp` under `dir`, one level down too (`out/`, `publish/`).
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = vec![];
    for sub in ["", "out", "publish", "publish/sent"] {
        for name in names_with_hidden(&dir.join(sub)) {
            if name.as_bytes().ends_with(b".tmp") {
                found.push(dir.join(sub).join(name));
            }
        }
    }
    found
}

fn names_with_hidden(dir: &Path) -> Vec<OsString> {
    std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default()
}

#[test]
fn a_full_disk_keeps_the_publisher_up_and_every_result_is_marked_once_there_is_room() {
    let test = "a_full_disk_keeps_the_publisher_up_and_every_result_is_marked_once_there_is_room";
    if !have_mosquitto(test) {
        return;
    }
    let dir = scratch("publish-disk");
    // A 3 MiB spool with 256 inodes: once both are used up, neither a marker (an empty
    // file: an inode) nor publish/status.json (blocks) fits.
    let disk = match Tmpfs::mount(&dir.join("disk"), "size=3m,nr_inodes=256") {
        Ok(d) => d,
        Err(reason) => {
            skip(test, &reason);
            return;
        }
    };
    let broker = Mosquitto::start(&dir);
    let mut sub = Subscriber::start(&broker);
    // The metrics file on another file system, as the Yocto layer has it: it shows the
    // state while status.json cannot be written.
    let prom = dir.join("publish.prom");
    let spool = Spool::new(
        &disk.0,
        &format!(
            "host = \"127.0.0.1\"\nport = {}\n{}\nmetrics = {prom:?}",
            broker.port,
            credentials()
        ),
    );
    let metric = |k: &str| {
        std::fs::read_to_string(&prom)
            .ok()
            .and_then(|t| samples(&t).get(k).copied())
    };
    let log = dir.join("publisher.log");
    let mut child = spool.publisher(&log).spawn().map(Running).unwrap();
    for id in 0..5 {
        spool.write_result(id);
    }
    sub.wait_for(&[0, 1, 2, 3, 4], Duration::from_secs(20));
    wait_until("the first markers", Duration::from_secs(10), || {
        spool.marked().len() == 5
    });

    // Results that arrive while the disk is full, written while there was room.
    let stage = disk.0.join("stage");
    std::fs::create_dir(&stage).unwrap();
    let late: Vec<u64> = (5..15).collect();
    for &id in &late {
        Spool::stage_result(&stage.join(id.to_string()), id);
    }
    fill(&disk.0.join("filler"));
    let inodes = fill_inodes(&disk.0.join("inodes"));
    assert!(
        std::fs::File::create(disk.0.join("one-more")).is_err(),
        "the disk is not full ({inodes} inodes filled)"
    );
    for &id in &late {
        std::fs::rename(
            stage.join(id.to_string()),
            spool.dir.join("out").join(Spool::result_name(id)),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    // Sent and acknowledged, but not marked: the state is in the metrics.
    sub.wait_for(&late, Duration::from_secs(30));
    let waiting = |n: f64| {
        metric("memaflow_publish_disk_state{state=\"full\"}") == Some(1.0)
            && metric("memaflow_publish_unmarked") == Some(n)
            && metric("memaflow_publish_unsent") == Some(0.0)
    };
    wait_until(
        "the full disk in the metrics",
        Duration::from_secs(20),
        || waiting(late.len() as f64),
    );
    assert_eq!(metric("memaflow_publish_error"), Some(1.0));
    assert!(metric("memaflow_publish_disk_full_writes_total").unwrap() >= 1.0);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(child.try_wait().unwrap().is_none(), "the publisher exited");
    assert_eq!(
        spool.marked().len(),
        5,
        "a marker was written on a full disk?"
    );
    assert_eq!(spool.results().len(), 15, "a result was removed");
    assert!(
        temp_files(&spool.dir).is_empty(),
        "{:?}",
        temp_files(&spool.dir)
    );

    // Killed while the disk is full: the next publisher starts on it, sends the
    // unmarked results again (at least once, never lost) and waits the same way.
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_file(&prom).unwrap();
    let mut child = spool.publisher(&log).spawn().map(Running).unwrap();
    wait_until(
        "the restarted publisher waiting for room",
        Duration::from_secs(30),
        || waiting(late.len() as f64),
    );
    assert!(child.try_wait().unwrap().is_none(), "the publisher exited");
    assert_eq!(spool.marked().len(), 5);
    assert_eq!(spool.results().len(), 15, "a result was removed");

    // Room again: every marker is written, status.json says so, nothing is left over.
    std::fs::remove_dir_all(disk.0.join("inodes")).unwrap();
    std::fs::remove_file(disk.0.join("filler")).unwrap();
    wait_until("every result marked", Duration::from_secs(30), || {
        spool.marked().len() == 15
    });
    wait_until(
        "status.json after the full disk",
        Duration::from_secs(10),
        || {
            let s = spool.status();
            s["disk"] == "ok" && s["unmarked"] == 0 && s["sent"] == late.len()
        },
    );
    assert!(spool.status()["disk_full_writes"].as_u64().unwrap() >= 1);
    assert!(spool.status()["last_error"].is_null(), "{}", spool.status());
    wait_until(
        "the metrics after the full disk",
        Duration::from_secs(10),
        || {
            metric("memaflow_publish_disk_state{state=\"ok\"}") == Some(1.0)
                && metric("memaflow_publish_unmarked") == Some(0.0)
                && metric("memaflow_publish_error") == Some(0.0)
        },
    );
    signal(&child, "TERM");
    assert!(child.wait().unwrap().success(), "SIGTERM must exit 0");
    assert_eq!(spool.results().len(), 15, "a result was removed");
    assert!(
        temp_files(&spool.dir).is_empty(),
        "{:?}",
        temp_files(&spool.dir)
    );

    // Every message arrived; those acknowledged while the disk was full twice (the
    // second publisher could not know they were).
    let all: Vec<u64> = (0..15).collect();
    let delivered = sub.wait_for(&all, Duration::from_secs(10));
    for ((id, model), n) in &delivered {
        let want = if *id >= 5 { 2 } else { 1 };
        assert!(*n >= want, "result {id} ({model}) arrived {n} times");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.matches("spool disk full").count(),
        2,
        "one line per publisher and change of state:\n{text}"
    );
    assert_eq!(
        text.matches("spool disk has room again").count(),
        1,
        "{text}"
    );
}
