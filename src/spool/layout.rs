//! The spool on disk. The directory a frame is in is its state, and a rename is each
//! transition:
//!
//! ```text
//! incoming/F ──claim──▶ work/F ──result──▶ out/F.json, then work/F ──▶ done/F (or unlinked)
//!                              └─refusal──▶ failed/F.error.json, then work/F ──▶ failed/F
//! ```
//!
//! Every step is a single rename or an atomic write, and the frame leaves `work/` only
//! after its result or error record is durable; so after a crash at any point, `work/`
//! holds exactly the frames whose fate is not yet recorded (retried) or recorded but not
//! yet moved on (moved on, not retried). Claims never replace: a name already used by an
//! earlier frame gets a `~N` suffix before its extension.
//!
//! A frame retried from `work/` counts its attempts there: before its N-th processing
//! (N ≥ 2) an empty marker `work/.F.attempt-N` is created (`O_EXCL`: whole or absent, no
//! temp file) and `work/` fsynced, so a frame that stops the daemon every time is seen
//! to, however often it happens. The markers go when the frame leaves `work/`; markers
//! left without their frame (a crash right after it left) are removed on open.
//!
//! Names are kept as the bytes they are (`OsStr`): a frame whose name is not UTF-8 keeps
//! it in `work/`, `out/` and `done/`; its result says which bytes (`frame_bytes_hex`).

use super::config::DonePolicy;
use super::fsutil::{
    create_marker, lock_exclusive, remove_temp_files, rename_noreplace, shown, sync_dir,
    write_atomic,
};
use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::fcntl::Flock;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub(crate) const STATUS_FILE: &str = "status.json";
const LOCK_FILE: &str = ".lock";
const MAX_SUFFIX: u32 = 100_000;
/// `work/.F.attempt-N`: frame F's N-th processing has begun.
const ATTEMPT_MARK: &str = ".attempt-";

/// An open spool; holds its lock, so one daemon at a time works on it.
pub struct Spool {
    pub root: PathBuf,
    incoming: PathBuf,
    work: PathBuf,
    out: PathBuf,
    done: PathBuf,
    failed: PathBuf,
    _lock: Flock<File>,
}

/// A directory entry of `incoming/` that may be claimed.
pub(crate) struct Entry {
    pub name: OsString,
    /// Regular files only: when it last changed (the settle rule applies to them).
    pub(crate) modified: Option<SystemTime>,
}

impl Spool {
    /// Creates the spool's directories as needed and takes its lock.
    pub fn open(root: &Path) -> Result<Spool> {
        std::fs::create_dir_all(root)
            .with_context(|| format!("creating the spool {}", root.display()))?;
        let dir = |name: &str| -> Result<PathBuf> {
            let p = root.join(name);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(_) => bail!(
                    "{} is not a directory (the spool's directories may not be links)",
                    p.display()
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir(&p).with_context(|| format!("creating {}", p.display()))?
                }
                Err(e) => return Err(e).with_context(|| p.display().to_string()),
            }
            Ok(p)
        };
        let spool = Spool {
            root: root.to_path_buf(),
            incoming: dir("incoming")?,
            work: dir("work")?,
            out: dir("out")?,
            done: dir("done")?,
            failed: dir("failed")?,
            _lock: lock_exclusive(&root.join(LOCK_FILE), "daemon")?,
        };
        spool.remove_orphan_attempts()?;
        for d in [&spool.out, &spool.failed, &spool.root] {
            let n = remove_temp_files(d)?;
            if n > 0 {
                log::info!(
                    "removed {n} unfinished temp file(s) from {} (a crash interrupted a write)",
                    d.display()
                );
            }
        }
        Ok(spool)
    }

    pub(crate) fn incoming_dir(&self) -> &Path {
        &self.incoming
    }

    pub(crate) fn work_path(&self, name: &OsStr) -> PathBuf {
        self.work.join(name)
    }

    /// `incoming/` now, hidden names (producers' temp files) left out, in name order.
    pub(crate) fn incoming(&self) -> Result<Vec<Entry>> {
        list(&self.incoming)
    }

    /// Frames in `work/`, in name order: claimed by a run that did not finish them.
    pub(crate) fn in_work(&self) -> Result<Vec<OsString>> {
        Ok(list(&self.work)?.into_iter().map(|e| e.name).collect())
    }

    /// How many times the frame `work/NAME` has been processed or begun to be: once
    /// for its claim, once more for each attempt marker.
    pub fn attempts(&self, name: &OsStr) -> u32 {
        let mut n = 1;
        while std::fs::symlink_metadata(self.work.join(attempt_marker(name, n + 1))).is_ok() {
            n += 1;
        }
        n
    }

    /// Records durably that the frame `work/NAME` is about to be processed for the `n`-th
    /// time (n ≥ 2), before it is.
    pub fn record_attempt(&self, name: &OsStr, n: u32) -> Result<()> {
        // One already there was made by a start that stopped before it processed the
        // frame: the same attempt.
        create_marker(&self.work.join(attempt_marker(name, n)))?;
        sync_dir(&self.work)
    }

    /// Removes the attempt markers of `NAME`, which has left `work/`: the highest first,
    /// so that a crash half-way leaves markers 2..k, still a count (and removed on open).
    pub fn forget_attempts(&self, name: &OsStr) -> Result<()> {
        for n in (2..=self.attempts(name)).rev() {
            let path = self.work.join(attempt_marker(name, n));
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing {}", shown(path.as_os_str())));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Removes attempt markers whose frame is no longer in `work/`.
    fn remove_orphan_attempts(&self) -> Result<()> {
        for entry in std::fs::read_dir(&self.work)
            .with_context(|| format!("listing {}", self.work.display()))?
        {
            let marker = entry
                .with_context(|| format!("listing {}", self.work.display()))?
                .file_name();
            let Some(frame) = frame_of_marker(&marker) else {
                continue;
            };
            if std::fs::symlink_metadata(self.work.join(&frame)).is_err() {
                let path = self.work.join(&marker);
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", shown(path.as_os_str())))?;
            }
        }
        Ok(())
    }

    fn name_in_use(&self, name: &OsStr) -> bool {
        let exists = |p: PathBuf| std::fs::symlink_metadata(p).is_ok();
        exists(self.work.join(name))
            || exists(self.out.join(result_name(name)))
            || exists(self.done.join(name))
            || exists(self.failed.join(name))
            || exists(self.failed.join(error_name(name)))
    }

    /// Moves `incoming/NAME` into `work/` under a name no earlier frame used; returns it.
    /// `None` when the entry is gone (taken or removed by someone else).
    pub(crate) fn claim(&self, name: &OsStr) -> Result<Option<OsString>> {
        let from = self.incoming.join(name);
        for n in 0..MAX_SUFFIX {
            let candidate = if n == 0 {
                name.to_os_string()
            } else {
                suffixed(name, n)
            };
            if self.name_in_use(&candidate) {
                continue;
            }
            match rename_noreplace(&from, &self.work.join(&candidate)) {
                Ok(()) => {
                    sync_dir(&self.work)?;
                    return Ok(Some(candidate));
                }
                Err(Errno::EEXIST) => continue,
                Err(Errno::ENOENT) => return Ok(None),
                Err(e) => {
                    return Err(e).with_context(|| format!("claiming {}", shown(from.as_os_str())));
                }
            }
        }
        bail!("no free name for {} after {MAX_SUFFIX} tries", shown(name))
    }

    /// Whether `out/NAME.json` is a complete result for the frame `work/NAME`.
    pub(crate) fn has_result(&self, name: &OsStr) -> bool {
        names_frame(&self.out.join(result_name(name)), name)
    }

    pub(crate) fn has_error_record(&self, name: &OsStr) -> bool {
        names_frame(&self.failed.join(error_name(name)), name)
    }

    /// Records the result, then lets the frame go: to `done/` or unlinked.
    pub fn complete(&self, name: &OsStr, result: &[u8], policy: DonePolicy) -> Result<()> {
        write_atomic(&self.out, result_name(name), result)?;
        self.release(name, policy)
    }

    /// The frame's result is durable: move it on from `work/`.
    pub(crate) fn release(&self, name: &OsStr, policy: DonePolicy) -> Result<()> {
        let from = self.work.join(name);
        match policy {
            DonePolicy::Move => {
                move_unique(&from, &self.done, name)?;
                sync_dir(&self.done)?;
            }
            DonePolicy::Delete => {
                let removed = std::fs::remove_file(&from).or_else(|e| {
                    // A directory or other odd entry ends in failed/, never here; but a
                    // frame may be gone already if a crash hit after the unlink.
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                });
                removed.with_context(|| format!("removing {}", shown(from.as_os_str())))?;
            }
        }
        sync_dir(&self.work)?;
        self.forget_attempts(name)
    }

    /// Records why the frame failed, then moves it to `failed/`.
    pub(crate) fn fail(&self, name: &OsStr, record: &[u8]) -> Result<()> {
        write_atomic(&self.failed, error_name(name), record)?;
        self.release_failed(name)
    }

    pub(crate) fn release_failed(&self, name: &OsStr) -> Result<()> {
        move_unique(&self.work.join(name), &self.failed, name)?;
        sync_dir(&self.failed)?;
        sync_dir(&self.work)?;
        self.forget_attempts(name)
    }

    /// Puts a claimed frame back into `incoming/` (shutdown before it was done). If that
    /// name is taken again it stays in `work/`, which the next start retries. A frame put
    /// back starts its count again: the stop, not the frame, ended its attempt.
    pub(crate) fn requeue(&self, name: &OsStr) -> Result<()> {
        match rename_noreplace(&self.work.join(name), &self.incoming.join(name)) {
            Ok(()) => {
                sync_dir(&self.incoming)?;
                sync_dir(&self.work)?;
                self.forget_attempts(name)
            }
            Err(Errno::EEXIST) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("requeueing {}", shown(name))),
        }
    }

    pub(crate) fn write_status(&self, bytes: &[u8]) -> Result<()> {
        write_atomic(&self.root, STATUS_FILE, bytes)
    }
}

/// `.F.attempt-N`, hidden (never claimed or listed as a frame).
fn attempt_marker(frame: &OsStr, n: u32) -> OsString {
    let mut s = OsString::from(".");
    s.push(frame);
    s.push(format!("{ATTEMPT_MARK}{n}"));
    s
}

/// The frame an attempt marker belongs to (`None` for any other name).
fn frame_of_marker(marker: &OsStr) -> Option<OsString> {
    let b = marker.as_encoded_bytes().strip_prefix(b".")?;
    let at = b
        .windows(ATTEMPT_MARK.len())
        .rposition(|w| w == ATTEMPT_MARK.as_bytes())?;
    let (frame, n) = (&b[..at], &b[at + ATTEMPT_MARK.len()..]);
    let numbered = !n.is_empty() && n.iter().all(u8::is_ascii_digit);
    (numbered && !frame.is_empty())
        .then(|| std::os::unix::ffi::OsStringExt::from_vec(frame.to_vec()))
}

pub fn result_name(frame: &OsStr) -> OsString {
    with_suffix(frame, ".json")
}

pub(crate) fn error_name(frame: &OsStr) -> OsString {
    with_suffix(frame, ".error.json")
}

fn with_suffix(name: &OsStr, suffix: &str) -> OsString {
    let mut s = name.to_os_string();
    s.push(suffix);
    s
}

/// The hexadecimal bytes of a name that is not UTF-8 (`None` for one that is): written
/// beside the lossy `frame` of a result or failure record, so the exact name is there.
pub(crate) fn name_bytes_hex(name: &OsStr) -> Option<String> {
    if name.to_str().is_some() {
        return None;
    }
    Some(
        name.as_encoded_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// Whether a result or failure record is the one of frame `name`: its `frame` for a
/// UTF-8 name, its `frame_bytes_hex` for any other.
/// `name` with `~N` before its extension: `cam.jpg` → `cam~2.jpg`. Works on the bytes, so
/// a name that is not UTF-8 keeps them.
fn suffixed(name: &OsStr, n: u32) -> OsString {
    let b = name.as_encoded_bytes();
    let (stem, ext) = match b.iter().rposition(|&c| c == b'.') {
        Some(dot) if dot > 0 => b.split_at(dot),
        _ => (b, &b[b.len()..]),
    };
    let mut out = stem.to_vec();
    out.extend_from_slice(format!("~{n}").as_bytes());
    out.extend_from_slice(ext);
    std::os::unix::ffi::OsStringExt::from_vec(out)
}

/// Renames `from` into `dir` as `name`, or a suffixed name if something is there already
/// (put there by hand: the daemon's own names are unique from the claim on).
fn move_unique(from: &Path, dir: &Path, name: &OsStr) -> Result<()> {
    for n in 0..MAX_SUFFIX {
        let to = dir.join(if n == 0 {
            name.to_os_string()
        } else {
            suffixed(name, n)
        });
        match rename_noreplace(from, &to) {
            Ok(()) => return Ok(()),
            Err(Errno::EEXIST) => continue,
            // Gone already: a crash after the rename, before `work/` was synced.
            Err(Errno::ENOENT) if std::fs::symlink_metadata(from).is_err() => return Ok(()),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "moving {} to {}",
                        shown(from.as_os_str()),
                        shown(to.as_os_str())
                    )
                });
            }
        }
    }
    bail!("no free name for {} in {}", shown(name), dir.display())
}

fn list(dir: &Path) -> Result<Vec<Entry>> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let name = e.file_name();
        if name.as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let modified = e
            .metadata()
            .ok()
            .filter(|m| m.file_type().is_file())
            .and_then(|m| m.modified().ok());
        out.push(Entry { name, modified });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Whether `path` is complete JSON naming the frame `name` (`frame`, the one field a
/// result and a failure record share). Only that is asked of a record written before a
/// crash: whatever else it holds, it was written whole, so the frame is not run again.
/// Whether the record at `path` is `name`'s: by its `frame`, or by `frame_bytes_hex` for
/// a name that is not UTF-8.
fn names_frame(path: &Path, name: &OsStr) -> bool {
    #[derive(serde::Deserialize)]
    struct Named {
        frame: String,
        frame_bytes_hex: Option<String>,
    }
    let Some(record) = super::fsutil::read_frame(path, 256 << 20)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Named>(&bytes).ok())
    else {
        return false;
    };
    match name.to_str() {
        Some(s) => record.frame == s,
        None => record.frame_bytes_hex == name_bytes_hex(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_go_before_the_extension() {
        use std::os::unix::ffi::OsStrExt;
        let s = |n: &str, k| suffixed(OsStr::new(n), k);
        assert_eq!(s("cam.jpg", 2), "cam~2.jpg");
        assert_eq!(s("a.b.png", 1), "a.b~1.png");
        assert_eq!(s("noext", 3), "noext~3");
        assert_eq!(s(".hidden", 1), ".hidden~1");
        let odd = suffixed(OsStr::from_bytes(b"caf\xe9.png"), 1);
        assert_eq!(odd.as_bytes(), b"caf\xe9~1.png");
        assert_eq!(
            name_bytes_hex(OsStr::from_bytes(b"caf\xe9")).as_deref(),
            Some("636166e9")
        );
        assert_eq!(name_bytes_hex(OsStr::new("café")), None);
    }

    #[test]
    fn attempts_are_counted_in_work_and_go_with_the_frame() {
        use std::os::unix::ffi::OsStrExt;
        let root = std::env::temp_dir().join(format!("memaflow-attempts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let spool = Spool::open(&root).unwrap();
        let odd = OsStr::from_bytes(b"caf\xe9.attempt-2.png");
        for name in [OsStr::new("a.png"), odd] {
            std::fs::write(root.join("work").join(name), b"x").unwrap();
            assert_eq!(spool.attempts(name), 1);
            spool.record_attempt(name, 2).unwrap();
            spool.record_attempt(name, 2).unwrap();
            spool.record_attempt(name, 3).unwrap();
            assert_eq!(spool.attempts(name), 3);
            assert_eq!(
                frame_of_marker(&attempt_marker(name, 3)).as_deref(),
                Some(name)
            );
        }
        assert_eq!(frame_of_marker(OsStr::new(".a.png.attempt-")), None);
        assert_eq!(frame_of_marker(OsStr::new(".a.png.tmp")), None);
        assert_eq!(frame_of_marker(OsStr::new("a.png.attempt-2")), None);
        // The frame is hidden from the listing's markers and released with them.
        assert_eq!(spool.in_work().unwrap().len(), 2);
        spool
            .release(OsStr::new("a.png"), DonePolicy::Delete)
            .unwrap();
        assert_eq!(spool.attempts(OsStr::new("a.png")), 1);
        // A frame gone without its markers (a crash in between): removed on open.
        std::fs::remove_file(root.join("work").join(odd)).unwrap();
        drop(spool);
        let spool = Spool::open(&root).unwrap();
        assert_eq!(std::fs::read_dir(root.join("work")).unwrap().count(), 0);
        drop(spool);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_second_frame_of_the_same_name_keeps_the_first_result() {
        let root = std::env::temp_dir().join(format!("memaflow-layout-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let spool = Spool::open(&root).unwrap();
        assert!(Spool::open(&root).is_err(), "a second daemon is refused");
        for round in 0..2 {
            std::fs::write(root.join("incoming/cam.jpg"), [round]).unwrap();
            let entries = spool.incoming().unwrap();
            assert_eq!(entries.len(), 1);
            let name = spool.claim(&entries[0].name).unwrap().unwrap();
            let result = format!("{{\"frame\": \"{}\"}}", name.to_str().unwrap());
            assert!(!spool.has_result(&name));
            spool
                .complete(&name, result.as_bytes(), DonePolicy::Move)
                .unwrap();
            assert!(spool.has_result(&name));
        }
        assert!(root.join("out/cam.jpg.json").is_file());
        assert!(root.join("out/cam~1.jpg.json").is_file());
        assert_eq!(std::fs::read(root.join("done/cam.jpg")).unwrap(), [0]);
        assert_eq!(std::fs::read(root.join("done/cam~1.jpg")).unwrap(), [1]);
        drop(spool);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
