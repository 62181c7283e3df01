//! The file operations the spool's crash safety rests on: renames that never replace,
//! writes that are complete or absent, and reads that refuse anything but a plain file.

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Makes the directory's entries (renames, creations, unlinks) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

/// `rename(2)` that fails with `EEXIST` instead of replacing `to`.
///
/// By system call number: nix wraps `renameat2` for glibc only, and the firmware links
/// musl. (`link` + `unlink` would not do: a crash between them leaves a hard-linked frame,
/// which the spool refuses.)
pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> nix::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    /// Linux's `RENAME_NOREPLACE` (include/uapi/linux/fs.h), the same on every architecture.
    const RENAME_NOREPLACE: nix::libc::c_uint = 1;
    let from = std::ffi::CString::new(from.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    let to = std::ffi::CString::new(to.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)?;
    // SAFETY: both pointers come from live `CString`s (NUL-terminated, no interior NUL) that
    // outlive the call; the kernel only reads them. The other arguments are plain integers
    // of the types renameat2(2) takes; the return value is checked below.
    let rc = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_renameat2,
            nix::libc::AT_FDCWD,
            from.as_ptr(),
            nix::libc::AT_FDCWD,
            to.as_ptr(),
            RENAME_NOREPLACE,
        )
    };
    Errno::result(rc).map(drop)
}

/// The temporary name `write_atomic` uses for `name`: hidden, so that readers of the
/// directory (and the daemon's own scans) skip it.
pub(crate) fn temp_name(name: impl AsRef<OsStr>) -> OsString {
    let mut t = OsString::from(".");
    t.push(name.as_ref());
    t.push(".tmp");
    t
}

/// Writes `dir/name` so that it is either absent, its previous content, or all of
/// `bytes`, even across a crash or power loss: temp file, fsync, rename, fsync of `dir`.
/// A failed write (a full disk) removes its temp file.
pub(crate) fn write_atomic(dir: &Path, name: impl AsRef<OsStr>, bytes: &[u8]) -> Result<()> {
    write_via_temp(dir, name.as_ref(), bytes, true)
}

/// Replaces `dir/name` by a rename, so that a reader sees the old or the new content,
/// without the fsyncs: for files that are rewritten often and need not survive a crash
/// (the metrics file). A failed write removes its temp file.
pub(crate) fn replace_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", shown(path.as_os_str())))?;
    write_via_temp(dir, name, bytes, false)
}

fn write_via_temp(dir: &Path, name: &OsStr, bytes: &[u8], sync: bool) -> Result<()> {
    let tmp = dir.join(temp_name(name));
    let target = dir.join(name);
    let written = (|| -> Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o640)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)
            .with_context(|| format!("creating {}", shown(tmp.as_os_str())))?;
        f.write_all(bytes)
            .and_then(|_| if sync { f.sync_all() } else { Ok(()) })
            .with_context(|| format!("writing {}", shown(tmp.as_os_str())))?;
        drop(f);
        std::fs::rename(&tmp, &target).with_context(|| {
            format!(
                "renaming {} to {}",
                shown(tmp.as_os_str()),
                shown(target.as_os_str())
            )
        })
    })();
    if let Err(e) = written {
        // Only our own temp file: O_NOFOLLOW refused anything else at its name.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if sync { sync_dir(dir) } else { Ok(()) }
}

/// Whether `e` (anywhere in its chain) is the file system being full: no space or the
/// user's quota. Such a failure is weather, to wait out, not a reason to stop.
pub(crate) fn is_disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let errno = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.raw_os_error())
            .map(Errno::from_raw)
            .or_else(|| c.downcast_ref::<Errno>().copied());
        matches!(errno, Some(Errno::ENOSPC | Errno::EDQUOT))
    })
}

/// Bytes an unprivileged writer may still use on the file system of `path`.
pub fn free_bytes(path: &Path) -> Result<u64> {
    let v = nix::sys::statvfs::statvfs(path)
        .with_context(|| format!("statvfs {}", shown(path.as_os_str())))?;
    Ok(v.blocks_available() as u64 * v.fragment_size() as u64)
}

/// A file name as a log line or message may show it: control characters and bytes that
/// are not UTF-8 escaped (`caf\xe9.png.json`, `a\nb`), so that a name from outside can
/// neither forge a log line nor lose its exact bytes.
pub fn shown(name: &OsStr) -> String {
    match name.to_str() {
        Some(s) => s.escape_debug().to_string(),
        None => name.as_encoded_bytes().escape_ascii().to_string(),
    }
}

/// Creates the empty marker file `path` (a spool state recorded by a name), not following
/// a link; one already there is the same record, made by an earlier run.
pub(crate) fn create_marker(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        // The name came from outside: escaped, it cannot split the log line.
        Err(e) => Err(e).with_context(|| format!("creating {}", shown(path.as_os_str()))),
    }
}

/// Removes temp files an interrupted `write_atomic` left in `dir`.
pub(crate) fn remove_temp_files(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let name = e.file_name();
        let b = name.as_encoded_bytes();
        if b.starts_with(b".") && b.ends_with(b".tmp") && e.file_type()?.is_file() {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// What kind of directory entry `meta` describes, for messages.
fn kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "a regular file"
    }
}

fn check_plain(meta: &std::fs::Metadata, limit: u64) -> Result<()> {
    if !meta.file_type().is_file() {
        bail!(
            "it is {}, not a regular file (the spool takes plain files only and never follows links)",
            kind(meta)
        );
    }
    if meta.nlink() > 1 {
        bail!(
            "it has {} hard links (refused: another name could change it while it is read)",
            meta.nlink()
        );
    }
    if meta.len() > limit {
        bail!(
            "it is {} bytes, more than spool.max_frame_bytes ({limit})",
            meta.len()
        );
    }
    Ok(())
}

/// An exclusive lock on `path` (created if absent), held while the returned file lives:
/// one `who` (daemon, publisher) per spool. Refused at once if another process holds it.
pub(crate) fn lock_exclusive(path: &Path, who: &str) -> Result<Flock<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| match e {
        Errno::EWOULDBLOCK => anyhow::anyhow!(
            "another memaflow {who} holds {} (one {who} per spool)",
            path.display()
        ),
        e => anyhow::Error::new(e).context(format!("locking {}", path.display())),
    })
}

/// Reads a frame file of at most `limit` bytes. Symbolic links, other non-regular files
/// and files with more than one link are refused, and the checks are made again on the
/// opened file, so nothing swapped in between is read.
pub(crate) fn read_frame(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let meta = std::fs::symlink_metadata(path).context("cannot stat it")?;
    check_plain(&meta, limit)?;
    // O_NONBLOCK: a FIFO swapped in after the check must not block the open.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match Errno::from_raw(e.raw_os_error().unwrap_or(0)) {
            Errno::ELOOP => anyhow::anyhow!("it is a symbolic link (refused)"),
            _ => anyhow::Error::new(e).context("cannot open it"),
        })?;
    let meta = file.metadata().context("cannot stat the opened file")?;
    check_plain(&meta, limit)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .context("cannot read it")?;
    if bytes.len() as u64 > limit {
        bail!("it grew beyond spool.max_frame_bytes ({limit}) while being read");
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("memaflow-fsutil-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn refuses_links_and_non_regular_files() {
        let d = scratch("refuse");
        std::fs::write(d.join("a"), b"abc").unwrap();
        assert_eq!(read_frame(&d.join("a"), 3).unwrap(), b"abc");
        let err = |p: &str, limit| format!("{:#}", read_frame(&d.join(p), limit).unwrap_err());
        assert!(err("a", 2).contains("more than"));
        std::os::unix::fs::symlink(d.join("a"), d.join("link")).unwrap();
        assert!(err("link", 10).contains("symbolic link"));
        std::fs::hard_link(d.join("a"), d.join("hard")).unwrap();
        assert!(err("hard", 10).contains("hard links"));
        std::fs::create_dir(d.join("dir")).unwrap();
        assert!(err("dir", 10).contains("directory"));
        nix::unistd::mkfifo(&d.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(err("fifo", 10).contains("FIFO"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn atomic_write_and_noreplace_rename() {
        let d = scratch("atomic");
        write_atomic(&d, "r.json", b"1").unwrap();
        write_atomic(&d, "r.json", b"22").unwrap();
        assert_eq!(std::fs::read(d.join("r.json")).unwrap(), b"22");
        assert!(!d.join(temp_name("r.json")).exists());
        std::fs::write(d.join(temp_name("x")), b"partial").unwrap();
        assert_eq!(remove_temp_files(&d).unwrap(), 1);
        std::fs::write(d.join("b"), b"b").unwrap();
        assert_eq!(
            rename_noreplace(&d.join("b"), &d.join("r.json")),
            Err(Errno::EEXIST)
        );
        assert_eq!(std::fs::read(d.join("r.json")).unwrap(), b"22");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
