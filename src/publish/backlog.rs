//! Which results in `out/` are sent, on disk. The daemon's results are never touched
//! (other readers keep using `out/`); the publisher records a result as sent by creating
//! an empty marker of the same name in `publish/sent/`, and only once the broker has
//! acknowledged every message of it:
//!
//! ```text
//! out/R.json (written by the daemon) ──PUBACK(s)──▶ publish/sent/R.json created, publish/sent/ fsynced
//! ```
//!
//! So a crash at any moment leaves every result either marked (acknowledged; possibly
//! acknowledged and not yet marked, which only resends it) or unmarked (sent again on the
//! next start): at least once, never lost. A marker is an empty file created with
//! `O_EXCL`: it exists whole or not at all, and needs no temp file. Markers whose result
//! is gone from `out/` are removed; results beyond `publish.keep` unsent are dropped,
//! oldest first (the only deletion the publisher makes in `out/`).

use crate::spool::fsutil::{create_marker, lock_exclusive, read_frame, sync_dir};
use anyhow::{Context, Result};
use nix::fcntl::Flock;
use std::collections::{BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The publisher's directory in the spool's root: its markers, status and lock.
pub(crate) const PUBLISH_DIR: &str = "publish";
const SENT_DIR: &str = "sent";
const LOCK_FILE: &str = ".lock";
/// A result larger than this is not a result the daemon wrote.
const MAX_RESULT_BYTES: u64 = 256 << 20;

/// Where a result in `out/` stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Waiting(SystemTime),
    /// Handed to the broker connection: `acks` acknowledgements still missing.
    InFlight {
        written: SystemTime,
        acks: usize,
    },
    Sent,
    /// Not a complete result (refused or unparseable): reported once, left alone.
    Unreadable,
}

/// The results of one spool and their publication state, oldest first.
pub(crate) struct Backlog {
    out: PathBuf,
    sent: PathBuf,
    states: HashMap<OsString, State>,
    /// The waiting results by the time their result was written (then by name).
    waiting: BTreeSet<(SystemTime, OsString)>,
    keep: usize,
    /// Acknowledged since the last `flush`, their markers not yet durable.
    to_mark: Vec<OsString>,
    pub counts: Counts,
    _lock: Flock<File>,
}

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub(crate) struct Counts {
    /// Results marked sent since start.
    pub sent: u64,
    /// Results dropped unsent (the backlog was over `publish.keep`) since start.
    pub(crate) dropped: u64,
    /// Files in `out/` that are not complete results.
    pub(crate) unreadable: u64,
}

impl Backlog {
    /// Opens the spool's `out/` and the publisher's `publish/` (created as needed), takes
    /// the publisher's lock, and lists both.
    pub fn open(spool_root: &Path, keep: usize) -> Result<Backlog> {
        // The daemon creates out/ on its first start; the publisher may start first.
        let out = spool_root.join("out");
        match std::fs::create_dir(&out) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(e).with_context(|| {
                    format!("cannot create {} (is the spool right?)", out.display())
                });
            }
            _ => {}
        }
        std::fs::read_dir(&out)
            .with_context(|| format!("cannot read the daemon's results in {}", out.display()))?;
        let dir = spool_root.join(PUBLISH_DIR);
        let sent = dir.join(SENT_DIR);
        std::fs::create_dir_all(&sent).with_context(|| format!("creating {}", sent.display()))?;
        let lock = lock_exclusive(&dir.join(LOCK_FILE), "publisher")?;
        crate::spool::fsutil::remove_temp_files(&dir)?;
        let mut backlog = Backlog {
            out,
            states: names(&sent)?
                .into_iter()
                .map(|n| (n, State::Sent))
                .collect(),
            sent,
            waiting: BTreeSet::new(),
            keep,
            to_mark: vec![],
            counts: Counts::default(),
            _lock: lock,
        };
        backlog.rescan()?;
        Ok(backlog)
    }

    pub(crate) fn out_dir(&self) -> &Path {
        &self.out
    }

    /// Lists `out/`: new results wait, markers of results gone from `out/` are removed.
    pub(crate) fn rescan(&mut self) -> Result<()> {
        let present: std::collections::HashSet<OsString> = names(&self.out)?
            .into_iter()
            .filter(|n| is_result_name(n))
            .collect();
        let gone: Vec<OsString> = self
            .states
            .keys()
            .filter(|n| !present.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            match self.states.remove(&name) {
                Some(State::Sent) => {
                    // Gone before its marker was written: none to write.
                    self.to_mark.retain(|n| *n != name);
                    remove_marker(&self.sent.join(&name))?
                }
                Some(State::Waiting(t)) => {
                    self.waiting.remove(&(t, name));
                }
                // Still owed its acknowledgements: forgotten when they come.
                Some(s @ State::InFlight { .. }) => {
                    self.states.insert(name, s);
                }
                _ => {}
            }
        }
        for name in present {
            self.add(&name);
        }
        self.enforce_keep();
        Ok(())
    }

    /// A result that may have appeared in `out/` (an inotify event).
    pub(crate) fn add(&mut self, name: &OsStr) {
        if !is_result_name(name) || self.states.contains_key(name) {
            return;
        }
        let Ok(meta) = std::fs::symlink_metadata(self.out.join(name)) else {
            return;
        };
        let written = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        self.states.insert(name.to_owned(), State::Waiting(written));
        self.waiting.insert((written, name.to_owned()));
    }

    /// Over `keep` unsent: the oldest waiting are deleted from `out/`, each logged.
    pub(crate) fn enforce_keep(&mut self) {
        while self.unsent() > self.keep {
            let Some((_, name)) = self.waiting.pop_first() else {
                break;
            };
            self.states.remove(&name);
            match std::fs::remove_file(self.out.join(&name)) {
                Ok(()) => {
                    self.counts.dropped += 1;
                    log::warn!(
                        "dropped result {} unsent: more than publish.keep = {} results wait",
                        shown(&name),
                        self.keep
                    );
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => log::warn!("cannot drop result {}: {e}", shown(&name)),
            }
        }
    }

    /// Results not yet acknowledged (waiting or in flight).
    pub(crate) fn unsent(&self) -> usize {
        self.waiting.len()
            + self
                .states
                .values()
                .filter(|s| matches!(s, State::InFlight { .. }))
                .count()
    }

    /// Results acknowledged whose markers are not durable yet (the last `flush` failed,
    /// or none has run since).
    pub fn unmarked(&self) -> usize {
        self.to_mark.len()
    }

    /// The oldest waiting result, now in flight, with its content; `None` when nothing
    /// waits. A file that is not a complete result is reported and skipped.
    pub fn next(&mut self) -> Option<(OsString, Vec<u8>)> {
        loop {
            let (written, name) = self.waiting.pop_first()?;
            match read_frame(&self.out.join(&name), MAX_RESULT_BYTES) {
                Ok(bytes) if serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok() => {
                    self.states
                        .insert(name.clone(), State::InFlight { written, acks: 0 });
                    return Some((name, bytes));
                }
                Ok(_) => self.refuse(name, "not complete JSON"),
                Err(e) if !self.out.join(&name).exists() => {
                    log::debug!("result {} went away: {e:#}", shown(&name));
                    self.states.remove(&name);
                }
                Err(e) => self.refuse(name, &format!("{e:#}")),
            }
        }
    }

    /// `name` is not a result that can be published: reported once, then left alone.
    pub(crate) fn refuse(&mut self, name: OsString, reason: &str) {
        log::warn!("not publishing {}: {reason}", shown(&name));
        self.counts.unreadable += 1;
        self.states.insert(name, State::Unreadable);
    }

    /// `messages` messages of the in-flight result `name` went to the broker.
    pub(crate) fn expect_acks(&mut self, name: &OsStr, messages: usize) {
        if let Some(State::InFlight { acks, .. }) = self.states.get_mut(name) {
            *acks += messages;
        }
    }

    /// One acknowledgement for `name`; its last makes the result sent (durable at the
    /// next `flush`).
    pub(crate) fn acked(&mut self, name: &OsStr) {
        if let Some(State::InFlight { acks, .. }) = self.states.get_mut(name) {
            *acks = acks.saturating_sub(1);
            if *acks == 0 {
                self.states.insert(name.to_owned(), State::Sent);
                self.to_mark.push(name.to_owned());
            }
        }
    }

    /// The connection was lost: every result in flight waits again, in its old place.
    pub(crate) fn requeue_in_flight(&mut self) {
        for (name, state) in self.states.iter_mut() {
            if let State::InFlight { written, .. } = *state {
                *state = State::Waiting(written);
                self.waiting.insert((written, name.clone()));
            }
        }
    }

    /// Makes the markers of the results acknowledged since the last call durable: one
    /// `O_EXCL` creation each, then one fsync of `publish/sent/` for all of them.
    pub(crate) fn flush(&mut self) -> Result<()> {
        if self.to_mark.is_empty() {
            return Ok(());
        }
        for name in &self.to_mark {
            create_marker(&self.sent.join(name))?;
        }
        sync_dir(&self.sent)?;
        self.counts.sent += self.to_mark.len() as u64;
        self.to_mark.clear();
        Ok(())
    }
}

/// Results are `NAME.json`; the daemon's temp files are hidden (`.NAME.json.tmp`).
fn is_result_name(name: &OsStr) -> bool {
    let b = name.as_encoded_bytes();
    !b.starts_with(b".") && b.ends_with(b".json")
}

/// File names escaped for log lines (shared with the daemon).
pub use crate::spool::fsutil::shown;

fn remove_marker(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", shown(path.as_os_str())))
        }
        _ => Ok(()),
    }
}

fn names(dir: &Path) -> Result<Vec<OsString>> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let name = e
            .with_context(|| format!("listing {}", dir.display()))?
            .file_name();
        if !name.as_encoded_bytes().starts_with(b".") {
            out.push(name);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;
    use std::time::Duration;

    fn spool(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("memaflow-backlog-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("out")).unwrap();
        d
    }

    fn result(root: &Path, name: &OsStr, age_secs: u64) {
        let path = root.join("out").join(name);
        std::fs::write(&path, b"{\"frame\": \"x\"}").unwrap();
        let t = SystemTime::now() - Duration::from_secs(age_secs);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    #[test]
    fn oldest_first_marked_only_when_every_ack_is_in() {
        let root = spool("order");
        let odd = OsStr::from_bytes(b"caf\xe9\n.png.json");
        result(&root, OsStr::new("new.jpg.json"), 10);
        result(&root, odd, 30);
        result(&root, OsStr::new("mid.jpg.json"), 20);
        std::fs::write(root.join("out/.tmp.json.tmp"), b"{").unwrap();
        std::fs::write(root.join("out/broken.json"), b"{\"fr").unwrap();
        let mut b = Backlog::open(&root, 100).unwrap();
        assert!(
            Backlog::open(&root, 100).is_err(),
            "one publisher per spool"
        );
        assert_eq!(b.unsent(), 4);
        let (first, _) = b.next().unwrap();
        assert_eq!(first, odd);
        b.expect_acks(&first, 2);
        b.acked(&first);
        b.flush().unwrap();
        assert!(
            !root.join("publish/sent").join(odd).exists(),
            "one of two acks"
        );
        b.acked(&first);
        b.flush().unwrap();
        assert!(root.join("publish/sent").join(odd).exists());
        assert_eq!(b.next().unwrap().0, "mid.jpg.json");
        assert_eq!(b.next().unwrap().0, "new.jpg.json");
        assert!(b.next().is_none(), "the broken result is skipped");
        assert_eq!((b.counts.sent, b.counts.unreadable), (1, 1));
        // Lost connection: both in flight wait again, oldest first.
        b.requeue_in_flight();
        assert_eq!(b.next().unwrap().0, "mid.jpg.json");
        drop(b);
        // A restart knows the marked one; a result deleted by someone loses its marker.
        std::fs::remove_file(root.join("out").join(odd)).unwrap();
        let mut b = Backlog::open(&root, 100).unwrap();
        assert!(!root.join("publish/sent").join(odd).exists());
        assert_eq!(b.next().unwrap().0, "mid.jpg.json");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn over_keep_the_oldest_are_dropped() {
        let root = spool("keep");
        for age in 1..=5 {
            result(&root, OsStr::new(&format!("r{age}.json")), age);
        }
        let mut b = Backlog::open(&root, 3).unwrap();
        assert_eq!((b.unsent(), b.counts.dropped), (3, 2));
        assert!(!root.join("out/r5.json").exists() && !root.join("out/r4.json").exists());
        assert_eq!(b.next().unwrap().0, "r3.json");
        result(&root, OsStr::new("r0.json"), 0);
        b.add(OsStr::new("r0.json"));
        b.enforce_keep();
        // r3 is in flight, so the oldest waiting (r2) goes.
        assert_eq!(b.counts.dropped, 3);
        assert!(!root.join("out/r2.json").exists() && root.join("out/r3.json").exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn names_are_shown_escaped_and_exact() {
        assert_eq!(shown(OsStr::new("a\nb.json")), "a\\nb.json");
        assert_eq!(shown(OsStr::from_bytes(b"caf\xe9.json")), "caf\\xe9.json");
        assert_eq!(shown(OsStr::new("café.json")), "café.json");
    }
}
