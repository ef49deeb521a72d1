//! Writes a binding's fields into the pod's tmpfs volume the way the kubelet
//! writes a Secret volume (`atomic_writer.go`), so readers never see half a
//! rotation:
//!
//! ```text
//! <out>/<binding>/..2026_11_25_06_05_55.123456789_ab12/<field>   files 0400 (0440 with a group)
//! <out>/<binding>/..data -> ..2026_11_25_06_05_55.123456789_ab12 swapped by rename
//! <out>/<binding>/<field> -> ..data/<field>                      stable names for the app
//! ```
//!
//! Directories are 0500 (0550 with a group) at rest; the writer opens its own
//! write bit only for the moment of a swap. Every step works relative to
//! directory handles opened with `O_NOFOLLOW`: whoever can write the
//! volume cannot make the writer follow a symlink out of it, and anything in a
//! binding directory the writer did not make is replaced, not trusted.

use std::{
    io,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    time::SystemTime,
};

use at::Kind;
use tessera_proto::is_safe_name;

mod at;
mod error;

pub use error::WriteError;
use error::io_err;

/// `statfs` magic number of tmpfs (memory-backed: secrets never reach disk).
const TMPFS_MAGIC: i64 = 0x0102_1994;
/// `statfs` magic number of ramfs (memory-backed too).
const RAMFS_MAGIC: i64 = 0x8584_58f6;
/// The symlink naming the current timestamped directory.
const DATA_LINK: &str = "..data";
/// The symlink created next to `..data` and renamed over it.
const DATA_TMP_LINK: &str = "..data_tmp";
/// A user-visible link being made, renamed over its name.
const LINK_TMP: &str = "..link_tmp";

pub use crate::pod_output::Fields;

/// Hidden file in each version directory: the lease handle (0400/0440 like
/// the fields), read back to resume the same lease after a restart.
pub const HANDLE_FILE: &str = "..handle";
/// Hidden file in each version directory: the credential version, for file
/// watchers and humans (`cat <binding>/..data/..version`).
pub const VERSION_FILE: &str = "..version";

/// What the writer stores next to a binding's fields.
#[derive(Clone, Copy, Debug, Default)]
pub struct Meta<'a> {
    /// The credential version written in `..version`.
    pub version: &'a str,
    /// The lease handle, when the source has one.
    pub handle: Option<&'a str>,
}

/// Checks that `dir` is on tmpfs or ramfs.
///
/// # Errors
/// [`WriteError::NotTmpfs`] when it is not; `Io` when it cannot be examined.
pub fn ensure_tmpfs(dir: &Path) -> Result<(), WriteError> {
    let stat = rustix::fs::statfs(dir).map_err(|e| WriteError::Io {
        op: "statfs",
        path: dir.to_owned(),
        source: e.into(),
    })?;
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    let kind = i64::from(stat.f_type as i64);
    if kind == TMPFS_MAGIC || kind == RAMFS_MAGIC {
        Ok(())
    } else {
        Err(WriteError::NotTmpfs(dir.to_owned()))
    }
}

/// Who may read one binding's files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// 0o400 or 0o440.
    pub file_mode: u32,
    /// Group to own files and directories.
    pub group: Option<u32>,
}

impl Access {
    fn dir_mode(self) -> u32 {
        if self.file_mode == 0o440 {
            0o550
        } else {
            0o500
        }
    }
}

/// Writes bindings under one output directory.
#[derive(Clone, Debug)]
pub struct Writer {
    out: PathBuf,
    group: Option<u32>,
    /// The pod owner's renames and templates.
    output: crate::pod_output::PodOutput,
}

impl Writer {
    /// A writer into `out`. `group` is the default owner group: with it, files
    /// are 0440 and directories 0550, so a non-root app in the group can read
    /// them; without it 0400 and 0500.
    pub fn new(out: PathBuf, group: Option<u32>) -> Self {
        Self {
            out,
            group,
            output: crate::pod_output::PodOutput::default(),
        }
    }

    /// This writer, shaping each binding's files as the pod owner asked.
    #[must_use]
    pub fn with_output(mut self, output: crate::pod_output::PodOutput) -> Self {
        self.output = output;
        self
    }

    /// The access for a binding: the policy's mode and group (from the broker)
    /// where given, this writer's defaults otherwise.
    ///
    /// # Errors
    /// [`WriteError::UnsafeMode`] for a mode other than 0400 or 0440.
    pub fn access(
        &self,
        policy_mode: u32,
        policy_group: Option<u32>,
    ) -> Result<Access, WriteError> {
        let group = policy_group.or(self.group);
        let file_mode = match policy_mode {
            0 if group.is_some() => 0o440,
            0 => 0o400,
            0o400 | 0o440 => policy_mode,
            other => return Err(WriteError::UnsafeMode(other)),
        };
        Ok(Access { file_mode, group })
    }

    /// The output directory.
    pub fn out(&self) -> &Path {
        &self.out
    }

    /// The lease handle stored with `binding`'s current files, if any.
    pub fn handle(&self, binding: &str) -> Option<String> {
        let current = self.current(binding)?;
        let bytes = at::read_file(&current, HANDLE_FILE).ok()?;
        String::from_utf8(bytes.to_vec())
            .ok()
            .filter(|h| !h.is_empty())
    }

    /// Whether `binding` has files.
    pub fn has_files(&self, binding: &str) -> bool {
        self.current(binding).is_some()
    }

    /// The current version directory of `binding`, opened without following
    /// anything the writer did not make.
    fn current(&self, binding: &str) -> Option<OwnedFd> {
        if !is_safe_name(binding) {
            return None;
        }
        let root = at::open_root(&self.out).ok()?;
        let dir = at::open_dir(&root, binding).ok()?;
        current_version(&dir).map(|(_, fd)| fd)
    }

    /// Atomically replaces the files of `binding` with `fields` (and `meta`).
    /// Returns `false` when the files already held these values and handle
    /// (nothing written).
    ///
    /// Everything happens relative to directory handles opened without
    /// following links: a binding directory, data link or file name that is
    /// not what the writer made (a planted file, a symlink to elsewhere) is
    /// replaced, never followed. A failed write removes what it created.
    ///
    /// # Errors
    /// On an unsafe name, a credential the volume cannot hold, or a
    /// filesystem failure; the previous files then stay in place and readable.
    pub fn write(
        &self,
        binding: &str,
        fields: &Fields,
        meta: Meta<'_>,
        access: Access,
    ) -> Result<bool, WriteError> {
        if !is_safe_name(binding) {
            return Err(WriteError::UnsafeName(binding.to_owned()));
        }
        let shaped = self
            .output
            .apply(binding, fields)
            .map_err(WriteError::PodOutput)?;
        let fields = shaped.as_ref().unwrap_or(fields);
        if let Some(bad) = fields.keys().find(|name| !is_safe_name(name)) {
            return Err(WriteError::UnsafeName(bad.clone()));
        }
        let root = at::open_root(&self.out).map_err(io_err("open", &self.out))?;
        let path = self.out.join(binding);
        let dir = binding_dir(&root, binding, &path)?;
        if unchanged(&dir, fields, meta.handle) {
            return Ok(false);
        }
        let size = footprint(fields, meta);
        let (capacity, _) = at::capacity(&dir).map_err(io_err("statvfs", &path))?;
        if size > capacity {
            return Err(WriteError::TooLarge {
                binding: binding.to_owned(),
                size,
                capacity,
            });
        }
        if let Some(gid) = access.group {
            at::chgrp(&dir, gid).map_err(io_err("chown", &path))?;
        }
        // Owner write only for the swap; restored below, also on failure.
        at::chmod(&dir, access.dir_mode() | 0o200).map_err(io_err("chmod", &path))?;
        let result = swap(&dir, &path, fields, meta, access).map_err(|error| match error {
            WriteError::Io { source, .. } if is_no_space(&source) => WriteError::NoSpace {
                binding: binding.to_owned(),
                size,
                free: at::capacity(&dir).map_or(0, |(_, free)| free),
            },
            other => other,
        });
        let restored = at::chmod(&dir, access.dir_mode()).map_err(io_err("chmod", &path));
        result?;
        restored?;
        Ok(true)
    }
}

/// Opens `binding`'s directory under `root`, creating it, or replacing
/// whatever else holds the name (a symlink is removed, never followed).
fn binding_dir(root: &OwnedFd, binding: &str, path: &Path) -> Result<OwnedFd, WriteError> {
    match at::kind(root, binding).map_err(io_err("stat", path))? {
        Kind::Dir => {}
        Kind::Absent => at::mkdir(root, binding, 0o700).map_err(io_err("mkdir", path))?,
        other => {
            tracing::warn!(path = %path.display(), kind = ?other, "replacing an entry the writer did not make");
            at::remove_tree(root, binding).map_err(io_err("remove", path))?;
            at::mkdir(root, binding, 0o700).map_err(io_err("mkdir", path))?;
        }
    }
    at::open_dir(root, binding).map_err(io_err("open", path))
}

/// The name and handle of the version directory `..data` points at, when it
/// is one the writer made (a hidden name in the same directory).
fn current_version(dir: &OwnedFd) -> Option<(String, OwnedFd)> {
    let target = at::read_link(dir, DATA_LINK)?;
    if !is_version_name(&target) {
        return None;
    }
    let fd = at::open_dir(dir, &target).ok()?;
    Some((target, fd))
}

/// A name the writer gives version directories: hidden, one component, not
/// one of its links.
fn is_version_name(name: &str) -> bool {
    name.starts_with("..")
        && name.len() > 2
        && !name.contains('/')
        && name != DATA_LINK
        && name != DATA_TMP_LINK
        && name != LINK_TMP
}

/// Whether the binding's current files hold exactly `fields` and `handle`,
/// and every visible name is the writer's link to them.
fn unchanged(dir: &OwnedFd, fields: &Fields, handle: Option<&str>) -> bool {
    let Some((_, current)) = current_version(dir) else {
        return false;
    };
    let stored_handle = at::read_file(&current, HANDLE_FILE).ok();
    let handle_matches = match (stored_handle, handle) {
        (None, None) => true,
        (Some(stored), Some(handle)) => stored.as_slice() == handle.as_bytes(),
        _ => false,
    };
    let Ok(in_version) = at::list(&current) else {
        return false;
    };
    let Ok(visible) = at::list(dir) else {
        return false;
    };
    let visible_count = visible.iter().filter(|n| !n.starts_with("..")).count();
    let field_count = in_version.iter().filter(|n| !n.starts_with("..")).count();
    handle_matches
        && field_count == fields.len()
        && visible_count == fields.len()
        && fields.iter().all(|(name, value)| {
            at::read_link(dir, name).as_deref() == Some(link_target(name).as_str())
                && at::read_file(&current, name)
                    .is_ok_and(|on_disk| on_disk.as_slice() == value.as_slice())
        })
}

fn link_target(name: &str) -> String {
    format!("{DATA_LINK}/{name}")
}

/// Bytes a version takes on tmpfs: every file rounded up to a page.
fn footprint(fields: &Fields, meta: Meta<'_>) -> u64 {
    const PAGE: u64 = 4096;
    let round = |len: usize| (len as u64).div_ceil(PAGE).max(1) * PAGE;
    fields.values().map(|v| round(v.len())).sum::<u64>()
        + round(meta.version.len())
        + meta.handle.map_or(0, |h| round(h.len()))
}

fn is_no_space(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(code) if code == rustix::io::Errno::NOSPC.raw_os_error()
            || code == rustix::io::Errno::DQUOT.raw_os_error()
    )
}

/// Writes a new version directory and publishes it; on failure before the
/// swap, removes what it created so the previous version stays alone.
fn swap(
    dir: &OwnedFd,
    path: &Path,
    fields: &Fields,
    meta: Meta<'_>,
    access: Access,
) -> Result<(), WriteError> {
    let current = current_version(dir).map(|(name, _)| name);
    // Leftovers of an interrupted or failed write first: they hold space the
    // new version may need.
    remove_hidden_except(dir, path, current.as_deref())?;

    let version = create_version_dir(dir, path)?;
    let version_path = path.join(&version);
    let filled = fill_version(dir, &version, &version_path, fields, meta, access);
    let published = filled.and_then(|()| {
        at::symlink(&version, dir, DATA_TMP_LINK)
            .map_err(io_err("symlink", &path.join(DATA_TMP_LINK)))?;
        if !matches!(at::kind(dir, DATA_LINK), Ok(Kind::Symlink | Kind::Absent)) {
            tracing::warn!(path = %path.display(), "replacing a `..data` the writer did not make");
            at::remove_tree(dir, DATA_LINK).map_err(io_err("remove", &path.join(DATA_LINK)))?;
        }
        at::rename(dir, DATA_TMP_LINK, DATA_LINK)
            .map_err(io_err("rename", &path.join(DATA_TMP_LINK)))
    });
    if let Err(error) = published {
        let _ = at::remove_tree(dir, DATA_TMP_LINK);
        let _ = at::remove_tree(dir, &version);
        return Err(error);
    }

    // Stable user-visible names: each the writer's link, whatever held it.
    for name in fields.keys() {
        let target = link_target(name);
        if at::read_link(dir, name).as_deref() == Some(target.as_str()) {
            continue;
        }
        let link = path.join(name);
        if at::kind(dir, name).map_err(io_err("stat", &link))? == Kind::Dir {
            at::remove_tree(dir, name).map_err(io_err("remove", &link))?;
        }
        at::symlink(&target, dir, LINK_TMP).map_err(io_err("symlink", &link))?;
        // rename replaces a planted file or foreign link in one step.
        at::rename(dir, LINK_TMP, name).map_err(io_err("rename", &link))?;
    }
    for name in at::list(dir).map_err(io_err("readdir", path))? {
        if !name.starts_with("..") && !fields.contains_key(&name) {
            at::remove_tree(dir, &name).map_err(io_err("remove", &path.join(&name)))?;
        }
    }
    // The previous version, now that nothing points at it.
    remove_hidden_except(dir, path, Some(&version))?;
    at::sync(dir).map_err(io_err("fsync", path))
}

/// Fills the new version directory `version`.
fn fill_version(
    dir: &OwnedFd,
    version: &str,
    version_path: &Path,
    fields: &Fields,
    meta: Meta<'_>,
    access: Access,
) -> Result<(), WriteError> {
    let fd = at::open_dir(dir, version).map_err(io_err("open", version_path))?;
    let files = fields
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_slice()))
        .chain([(VERSION_FILE, meta.version.as_bytes())])
        .chain(meta.handle.map(|h| (HANDLE_FILE, h.as_bytes())));
    for (name, value) in files {
        at::write_new_file(&fd, name, value, access.file_mode, access.group)
            .map_err(io_err("write", &version_path.join(name)))?;
    }
    if let Some(gid) = access.group {
        at::chgrp(&fd, gid).map_err(io_err("chown", version_path))?;
    }
    at::chmod(&fd, access.dir_mode()).map_err(io_err("chmod", version_path))?;
    at::sync(&fd).map_err(io_err("fsync", version_path))
}

/// Removes every hidden entry but `..data` and the version `keep`.
fn remove_hidden_except(dir: &OwnedFd, path: &Path, keep: Option<&str>) -> Result<(), WriteError> {
    for name in at::list(dir).map_err(io_err("readdir", path))? {
        if name.starts_with("..")
            && name != DATA_LINK
            && Some(name.as_str()) != keep
            && let Err(error) = at::remove_tree(dir, &name)
        {
            tracing::warn!(path = %path.join(&name).display(), %error, "could not remove an old version directory");
        }
    }
    Ok(())
}

fn create_version_dir(dir: &OwnedFd, path: &Path) -> Result<String, WriteError> {
    let stamp = humantime::format_rfc3339_nanos(SystemTime::now())
        .to_string()
        .replace(['-', ':', 'T'], "_")
        .trim_end_matches('Z')
        .to_owned();
    // Random suffixes make a clash unlikely; a few tries make it harmless.
    let mut last = None;
    for _ in 0..16 {
        let name = format!("..{stamp}_{:04x}", fastrand::u16(..));
        match at::mkdir(dir, &name, 0o700) {
            Ok(()) => return Ok(name),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(io_err("mkdir", &path.join(&name))(e)),
        }
    }
    Err(io_err("mkdir", path)(
        last.unwrap_or_else(|| io::Error::other("no free name")),
    ))
}

#[cfg(test)]
mod tests;
