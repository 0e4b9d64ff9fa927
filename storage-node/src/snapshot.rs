//! Snapshot files of a replica: where they live and how they are made.
//!
//! A snapshot of a replica whose backing file is `DISK` is the file `DISK@SNAPSHOT` beside it
//! (the same file system, so a reflink can share its blocks). It is made by a reflink clone
//! (FICLONE: XFS, Btrfs, bcachefs) where the file system has one, and by a sparse copy
//! otherwise (ext4): only the data extents are copied (SEEK_DATA/SEEK_HOLE, copy_file_range),
//! so a thin volume's snapshot stays thin. Either way the copy goes to `DISK@SNAPSHOT.partial`,
//! is synced, and is renamed into place: a snapshot file that exists is complete.
//!
//! What makes the copies of all replicas the same point in time is the caller's: the primary
//! holds new writes, flushes (every peer acknowledges the barrier), and only then has every
//! replica copied (`api.rs`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Bytes per copy_file_range call in the sparse copy.
const COPY_CHUNK_BYTES: usize = 8 << 20;

/// How a snapshot was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneKind {
    Reflink,
    SparseCopy,
}

/// Snapshot names: what tandem-api sends (`snapshot-UUID`), as file-name safe as resource
/// names.
pub fn valid_name(name: &str) -> bool {
    crate::provision::valid_name(name)
}

/// The file of snapshot `name` of the replica on `disk`.
pub fn path(disk: &Path, name: &str) -> PathBuf {
    let mut text = disk.as_os_str().to_owned();
    text.push("@");
    text.push(name);
    PathBuf::from(text)
}

/// Every snapshot file of the replica on `disk` (complete ones only).
pub fn list(disk: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(file)) = (disk.parent(), disk.file_name()) else { return Vec::new() };
    let mut prefix = file.to_owned();
    prefix.push("@");
    let prefix = prefix.to_string_lossy().into_owned();
    let Ok(entries) =
        std::fs::read_dir(if dir.as_os_str().is_empty() { Path::new(".") } else { dir })
    else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            name.starts_with(&prefix) && !name.ends_with(".partial")
        })
        .map(|entry| dir.join(entry.file_name()))
        .collect()
}

/// Copies `source` to `target` (which must not exist) as a reflink where possible, a sparse
/// copy otherwise; `target` appears only complete and synced.
pub fn clone_file(source: &Path, target: &Path) -> io::Result<CloneKind> {
    let mut partial = target.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let from = File::open(source)?;
    let to = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&partial)?;
    let result = reflink(&from, &to).and_then(|done| {
        if done {
            Ok(CloneKind::Reflink)
        } else {
            sparse_copy(&from, &to).map(|()| CloneKind::SparseCopy)
        }
    });
    let result = result.and_then(|kind| {
        to.sync_all()?;
        std::fs::rename(&partial, target)?;
        if let Some(dir) = target.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(kind)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// FICLONE; `Ok(false)` when this file system (or this pair of files) cannot share blocks.
fn reflink(from: &File, to: &File) -> io::Result<bool> {
    // SAFETY: FICLONE takes the source descriptor as its argument; both descriptors are open
    // for the duration of the call and the kernel reads nothing else from user memory.
    let rc = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) };
    if rc == 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY) => Ok(false),
        _ => Err(error),
    }
}

/// Copies the data extents of `from` into `to` and gives `to` the same length.
fn sparse_copy(from: &File, to: &File) -> io::Result<()> {
    let length = from.metadata()?.len();
    to.set_len(length)?;
    let mut offset = 0u64;
    while offset < length {
        let Some(data) = seek(from, offset, libc::SEEK_DATA)? else { break };
        let hole = seek(from, data, libc::SEEK_HOLE)?.unwrap_or(length).min(length);
        copy_range(from, to, data, hole)?;
        offset = hole;
    }
    Ok(())
}

/// lseek with SEEK_DATA/SEEK_HOLE; `None` past the last data (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset).map_err(io::Error::other)?;
    // SAFETY: lseek on an open descriptor changes only its file offset.
    let position = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if position < 0 {
        let error = io::Error::last_os_error();
        return if error.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(error) };
    }
    u64::try_from(position).map(Some).map_err(io::Error::other)
}

/// copy_file_range of `[start, end)` at the same offsets in both files.
fn copy_range(from: &File, to: &File, start: u64, end: u64) -> io::Result<()> {
    let mut position = start;
    while position < end {
        let mut in_offset = libc::loff_t::try_from(position).map_err(io::Error::other)?;
        let mut out_offset = in_offset;
        let want = usize::try_from(end - position).unwrap_or(usize::MAX).min(COPY_CHUNK_BYTES);
        // SAFETY: both descriptors are open; the offsets are this function's own variables,
        // which the kernel updates; no buffer in user memory is involved.
        let copied = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut in_offset,
                to.as_raw_fd(),
                &mut out_offset,
                want,
                0,
            )
        };
        if copied < 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(error);
        }
        if copied == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "source shrank while copying",
            ));
        }
        position += u64::try_from(copied).map_err(io::Error::other)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_snapshot_is_a_complete_sparse_copy_beside_the_disk() {
        let dir = tempfile::tempdir().expect("dir");
        let disk = dir.path().join("vol.img");
        let file = File::create(&disk).expect("disk");
        let size = 64u64 << 20;
        file.set_len(size).expect("size");
        file.write_all_at(&[0xa5; 4096], 0).expect("write");
        file.write_all_at(&[0x5a; 8192], 40 << 20).expect("write");
        file.write_all_at(&[0x11; 512], size - 512).expect("write");
        let snap = path(&disk, "snapshot-1");
        assert_eq!(snap.file_name().expect("name"), "vol.img@snapshot-1");
        let kind = clone_file(&disk, &snap).expect("clone");
        let copy = File::open(&snap).expect("open");
        assert_eq!(copy.metadata().expect("meta").len(), size);
        let mut buffer = vec![0u8; 8192];
        copy.read_exact_at(&mut buffer[..4096], 0).expect("read");
        assert!(buffer[..4096].iter().all(|b| *b == 0xa5));
        copy.read_exact_at(&mut buffer, 40 << 20).expect("read");
        assert!(buffer.iter().all(|b| *b == 0x5a));
        copy.read_exact_at(&mut buffer[..512], size - 512).expect("read");
        assert!(buffer[..512].iter().all(|b| *b == 0x11));
        copy.read_exact_at(&mut buffer, 20 << 20).expect("read");
        assert!(buffer.iter().all(|b| *b == 0), "holes read as zeros");
        if kind == CloneKind::SparseCopy {
            use std::os::unix::fs::MetadataExt;
            let allocated = copy.metadata().expect("meta").blocks() * 512;
            assert!(allocated < 1 << 20, "the copy stays sparse: {allocated} bytes allocated");
        }
        // Later writes to the disk do not reach the snapshot.
        file.write_all_at(&[0xff; 4096], 0).expect("write");
        copy.read_exact_at(&mut buffer[..4096], 0).expect("read");
        assert!(buffer[..4096].iter().all(|b| *b == 0xa5));
        assert_eq!(list(&disk), vec![snap.clone()]);
        assert!(clone_file(&dir.path().join("missing.img"), &path(&disk, "x")).is_err());
        assert_eq!(list(&disk), vec![snap], "a failed clone leaves nothing");
    }
}
