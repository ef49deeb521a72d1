//! Filesystem steps relative to directory handles (`openat` and friends,
//! through rustix), so that a name swapped for a symlink between two steps is
//! never followed: every open uses `O_NOFOLLOW`, every removal `unlinkat`
//! (which removes a link, not what it points to).

use std::{
    ffi::CStr,
    io::{self, Write},
    os::fd::{AsFd, OwnedFd},
};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};

/// Deepest directory tree [`remove_tree`] descends into; a deeper one was not
/// made by the writer and is refused rather than recursed into without end.
const MAX_DEPTH: usize = 8;

/// What a name in a directory is, without following it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Nothing by that name.
    Absent,
    /// A directory (the binding's, or a version's).
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else (regular file, fifo, socket, device).
    Other,
}

/// What `name` in `dir` is, without following a link.
pub fn kind(dir: impl AsFd, name: &str) -> io::Result<Kind> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => Ok(match FileType::from_raw_mode(stat.st_mode) {
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        }),
        Err(rustix::io::Errno::NOENT) => Ok(Kind::Absent),
        Err(e) => Err(e.into()),
    }
}

/// Opens the directory `path` (absolute or relative to the working
/// directory); the output directory itself is the operator's choice.
pub fn open_root(path: &std::path::Path) -> io::Result<OwnedFd> {
    rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(Into::into)
}

/// Opens the directory `name` in `dir`; fails on a symlink or a non-directory.
pub fn open_dir(dir: impl AsFd, name: &str) -> io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(Into::into)
}

/// Creates the directory `name` in `dir` with `mode` (fails if it exists).
pub fn mkdir(dir: impl AsFd, name: &str, mode: u32) -> io::Result<()> {
    rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(mode)).map_err(Into::into)
}

/// Sets the mode of an open file or directory.
pub fn chmod(fd: impl AsFd, mode: u32) -> io::Result<()> {
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode)).map_err(Into::into)
}

/// Gives an open file or directory to group `gid`.
pub fn chgrp(fd: impl AsFd, gid: u32) -> io::Result<()> {
    rustix::fs::fchown(fd, None, Some(rustix::fs::Gid::from_raw(gid))).map_err(Into::into)
}

/// Flushes an open file or directory to its filesystem.
pub fn sync(fd: impl AsFd) -> io::Result<()> {
    rustix::fs::fsync(fd).map_err(Into::into)
}

/// Creates the new file `name` in `dir` (never an existing one, never through
/// a link), writes `value`, sets the group and `mode`, and flushes it.
pub fn write_new_file(
    dir: impl AsFd,
    name: &str,
    value: &[u8],
    mode: u32,
    group: Option<u32>,
) -> io::Result<()> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(value)?;
    if let Some(gid) = group {
        chgrp(&file, gid)?;
    }
    // Explicit mode: the umask must not decide who reads a secret.
    chmod(&file, mode)?;
    file.sync_all()
}

/// Reads the regular file `name` in `dir`, never through a link.
pub fn read_file(dir: impl AsFd, name: &str) -> io::Result<zeroize::Zeroizing<Vec<u8>>> {
    use std::io::Read;
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut file = std::fs::File::from(fd);
    let mut bytes = zeroize::Zeroizing::new(Vec::new());
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The target of the symlink `name` in `dir`, if it is one.
pub fn read_link(dir: impl AsFd, name: &str) -> Option<String> {
    let target = rustix::fs::readlinkat(dir, name, Vec::new()).ok()?;
    target.into_string().ok()
}

/// Creates the symlink `name` in `dir` pointing at `target`.
pub fn symlink(target: &str, dir: impl AsFd, name: &str) -> io::Result<()> {
    rustix::fs::symlinkat(target, dir, name).map_err(Into::into)
}

/// Renames `from` over `to`, both in `dir`.
pub fn rename(dir: impl AsFd, from: &str, to: &str) -> io::Result<()> {
    let dir = dir.as_fd();
    rustix::fs::renameat(dir, from, dir, to).map_err(Into::into)
}

/// The names in `dir` other than `.` and `..`.
pub fn list(dir: impl AsFd) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in Dir::read_from(dir)? {
        let entry = entry?;
        let name: &CStr = entry.file_name();
        let bytes = name.to_bytes();
        if bytes == b"." || bytes == b".." {
            continue;
        }
        // A name that is not UTF-8 is no name the writer made: list it
        // lossily so it can be removed by the same name.
        match name.to_str() {
            Ok(name) => names.push(name.to_owned()),
            Err(_) => names.push(String::from_utf8_lossy(bytes).into_owned()),
        }
    }
    Ok(names)
}

/// Removes `name` from `dir` whatever it is: a link or file is unlinked
/// (never followed), a directory emptied first, descending at most a few
/// levels. Absent is success.
pub fn remove_tree(dir: impl AsFd, name: &str) -> io::Result<()> {
    remove_at_depth(dir.as_fd(), name, 0)
}

fn remove_at_depth(dir: std::os::fd::BorrowedFd<'_>, name: &str, depth: usize) -> io::Result<()> {
    match kind(dir, name)? {
        Kind::Absent => Ok(()),
        Kind::Dir => {
            if depth >= MAX_DEPTH {
                return Err(io::Error::other(format!(
                    "`{name}` is nested deeper than {MAX_DEPTH} directories: not made by Tessera, not removed"
                )));
            }
            let child = open_dir(dir, name)?;
            // The writer's directories are read-only at rest: open them up to
            // empty them (root does not need this, other users do).
            let _ = chmod(&child, 0o700);
            for entry in list(&child)? {
                remove_at_depth(child.as_fd(), &entry, depth + 1)?;
            }
            ignore_absent(rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR))
        }
        Kind::Symlink | Kind::Other => {
            ignore_absent(rustix::fs::unlinkat(dir, name, AtFlags::empty()))
        }
    }
}

fn ignore_absent(result: rustix::io::Result<()>) -> io::Result<()> {
    match result {
        Err(rustix::io::Errno::NOENT) => Ok(()),
        other => other.map_err(Into::into),
    }
}

/// Bytes the filesystem holding `dir` has in all and has free.
pub fn capacity(dir: impl AsFd) -> io::Result<(u64, u64)> {
    let stat = rustix::fs::fstatvfs(dir)?;
    let block = stat.f_frsize.max(1);
    Ok((
        stat.f_blocks.saturating_mul(block),
        stat.f_bavail.saturating_mul(block),
    ))
}
