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
//! write bit only for the moment of a swap.

use std::{
    collections::BTreeMap,
    fs::{self, OpenOptions},
    io::{self, Write},
    os::unix::fs::DirBuilderExt,
    os::unix::fs::{OpenOptionsExt, PermissionsExt, symlink},
    path::{Path, PathBuf},
    time::SystemTime,
};

use tessera_proto::is_safe_name;
use zeroize::Zeroizing;

/// `statfs` magic of tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;
/// `statfs` magic of ramfs.
const RAMFS_MAGIC: i64 = 0x8584_58f6;
/// The symlink naming the current timestamped directory.
const DATA_LINK: &str = "..data";
/// The symlink created next to `..data` and renamed over it.
const DATA_TMP_LINK: &str = "..data_tmp";

/// A binding's fields: name to value, zeroed on drop.
pub type Fields = BTreeMap<String, Zeroizing<Vec<u8>>>;

/// Hidden file in each version directory: the lease handle (0400/0440 like
/// the fields), read back to resume the same lease after a restart.
pub const HANDLE_FILE: &str = "..handle";
/// Hidden file in each version directory: the credential version, for file
/// watchers and humans (`cat <binding>/..data/..version`).
pub const VERSION_FILE: &str = "..version";

/// What the writer stores next to a binding's fields.
#[derive(Clone, Copy, Debug, Default)]
pub struct Meta<'a> {
    /// The credential version.
    pub version: &'a str,
    /// The lease handle, when the source has one.
    pub handle: Option<&'a str>,
}

/// Errors writing the volume.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The output directory is on a disk-backed filesystem.
    #[error(
        "{0} is not on tmpfs or ramfs: secrets would reach disk (mount an emptyDir with medium: Memory, or pass --allow-non-tmpfs for local development)"
    )]
    NotTmpfs(PathBuf),
    /// A binding or field name could escape its directory or clash with the writer's entries.
    #[error("refusing unsafe name `{0}` (no `/`, not `.` or `..`, no leading `..`)")]
    UnsafeName(String),
    /// The broker asked for a file mode other than 0400 or 0440.
    #[error("refusing file mode {0:o} from the broker (only 0400 and 0440 are written)")]
    UnsafeMode(u32),
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Where.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> WriteError {
    move |source| WriteError::Io {
        op,
        path: path.to_owned(),
        source,
    }
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
}

impl Writer {
    /// A writer into `out`. `group` is the default owner group: with it, files
    /// are 0440 and directories 0550, so a non-root app in the group can read
    /// them; without it 0400 and 0500.
    pub fn new(out: PathBuf, group: Option<u32>) -> Self {
        Self { out, group }
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

    fn set_mode(path: &Path, mode: u32) -> Result<(), WriteError> {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
    }

    /// Whether the binding's current files hold exactly `fields` and `handle`.
    fn unchanged(dir: &Path, fields: &Fields, handle: Option<&str>) -> bool {
        let data = dir.join(DATA_LINK);
        let Ok(entries) = fs::read_dir(&data) else {
            return false;
        };
        let count = entries
            .filter_map(Result::ok)
            .filter(|e| !e.file_name().to_string_lossy().starts_with(".."))
            .count();
        count == fields.len()
            && Self::read_hidden(dir, HANDLE_FILE).as_deref() == handle
            && fields.iter().all(|(name, value)| {
                fs::read(data.join(name))
                    .map(Zeroizing::new)
                    .is_ok_and(|on_disk| on_disk.as_slice() == value.as_slice())
            })
    }

    fn read_hidden(dir: &Path, name: &str) -> Option<String> {
        fs::read_to_string(dir.join(DATA_LINK).join(name)).ok()
    }

    /// The output directory.
    pub fn out(&self) -> &Path {
        &self.out
    }

    /// The lease handle stored with `binding`'s current files, if any.
    pub fn handle(&self, binding: &str) -> Option<String> {
        if !is_safe_name(binding) {
            return None;
        }
        Self::read_hidden(&self.out.join(binding), HANDLE_FILE).filter(|h| !h.is_empty())
    }

    /// Whether `binding` has files.
    pub fn has_files(&self, binding: &str) -> bool {
        is_safe_name(binding) && self.out.join(binding).join(DATA_LINK).is_dir()
    }

    /// Atomically replaces the files of `binding` with `fields` (and `meta`).
    /// Returns `false` when the files already held these values and handle
    /// (nothing written).
    ///
    /// # Errors
    /// On an unsafe name or a filesystem failure; the previous files then stay
    /// in place and readable.
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
        if let Some(bad) = fields.keys().find(|name| !is_safe_name(name)) {
            return Err(WriteError::UnsafeName(bad.clone()));
        }
        let dir = self.out.join(binding);
        if Self::unchanged(&dir, fields, meta.handle) {
            return Ok(false);
        }
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("mkdir", &dir)(e)),
        }
        if let Some(gid) = access.group {
            std::os::unix::fs::chown(&dir, None, Some(gid)).map_err(io_err("chown", &dir))?;
        }
        // Owner write only for the swap; restored below, also on failure.
        Self::set_mode(&dir, access.dir_mode() | 0o200)?;
        let result = Self::swap(&dir, fields, meta, access);
        let restored = Self::set_mode(&dir, access.dir_mode());
        result?;
        restored?;
        Ok(true)
    }

    fn swap(dir: &Path, fields: &Fields, meta: Meta<'_>, access: Access) -> Result<(), WriteError> {
        let (ts_name, ts_dir) = create_timestamped_dir(dir)?;
        for (name, value) in fields {
            Self::write_file(&ts_dir.join(name), value, access)?;
        }
        Self::write_file(&ts_dir.join(VERSION_FILE), meta.version.as_bytes(), access)?;
        if let Some(handle) = meta.handle {
            Self::write_file(&ts_dir.join(HANDLE_FILE), handle.as_bytes(), access)?;
        }
        if let Some(gid) = access.group {
            std::os::unix::fs::chown(&ts_dir, None, Some(gid)).map_err(io_err("chown", &ts_dir))?;
        }
        Self::set_mode(&ts_dir, access.dir_mode())?;
        sync_dir(&ts_dir)?;

        let tmp_link = dir.join(DATA_TMP_LINK);
        let _ = fs::remove_file(&tmp_link);
        symlink(&ts_name, &tmp_link).map_err(io_err("symlink", &tmp_link))?;
        fs::rename(&tmp_link, dir.join(DATA_LINK)).map_err(io_err("rename", &tmp_link))?;

        // Stable user-visible names: add new ones, drop ones no longer present.
        for name in fields.keys() {
            let link = dir.join(name);
            if fs::symlink_metadata(&link).is_err() {
                symlink(Path::new(DATA_LINK).join(name), &link)
                    .map_err(io_err("symlink", &link))?;
            }
        }
        for entry in fs::read_dir(dir).map_err(io_err("readdir", dir))?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !name.starts_with("..") && !fields.contains_key(name.as_ref()) {
                let _ = fs::remove_file(entry.path());
            }
        }
        sync_dir(dir)?;

        // Remove the previous directory and any left by an interrupted write.
        for entry in fs::read_dir(dir).map_err(io_err("readdir", dir))?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let is_ts_dir = name.starts_with("..") && name != DATA_LINK && name != DATA_TMP_LINK;
            if is_ts_dir && *name != *ts_name && entry.file_type().is_ok_and(|t| t.is_dir()) {
                let path = entry.path();
                let _ = Self::set_mode(&path, 0o700);
                if let Err(error) = fs::remove_dir_all(&path) {
                    tracing::warn!(path = %path.display(), %error, "could not remove an old version directory");
                }
            }
        }
        Ok(())
    }

    fn write_file(path: &Path, value: &[u8], access: Access) -> Result<(), WriteError> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err("create", path))?;
        file.write_all(value).map_err(io_err("write", path))?;
        if let Some(gid) = access.group {
            std::os::unix::fs::fchown(&file, None, Some(gid)).map_err(io_err("chown", path))?;
        }
        // Explicit mode: the umask must not decide who reads a secret.
        file.set_permissions(fs::Permissions::from_mode(access.file_mode))
            .map_err(io_err("chmod", path))?;
        file.sync_all().map_err(io_err("fsync", path))
    }
}

fn create_timestamped_dir(parent: &Path) -> Result<(String, PathBuf), WriteError> {
    let now = SystemTime::now();
    let stamp = humantime::format_rfc3339_nanos(now)
        .to_string()
        .replace(['-', ':', 'T'], "_")
        .trim_end_matches('Z')
        .to_owned();
    loop {
        let name = format!("..{stamp}_{:04x}", fastrand::u16(..));
        let path = parent.join(&name);
        match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => return Ok((name, path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("mkdir", &path)(e)),
        }
    }
}

fn sync_dir(path: &Path) -> Result<(), WriteError> {
    fs::File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(io_err("fsync", path))
}

#[cfg(test)]
mod tests;
