//! An optional store of what a client holds, in a memory-backed directory of
//! the pod (an `emptyDir` with `medium: Memory`): one file per binding with
//! its values and lease handle. A process that restarts in the same pod (a
//! container restart, a crash loop) reads it back and resumes its leases
//! with the handles, so the pod keeps one database user however often its
//! app restarts. Files are written whole (a new file, then a rename) with
//! mode 0400; the directory must be on tmpfs or ramfs, never disk.

use std::{
    fs,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
};

use prost::Message as _;
use tessera_proto::v1::Credential as Wire;
use zeroize::{Zeroize as _, Zeroizing};

use crate::target::SetupError;

/// `statfs` magic numbers of the memory-backed filesystems.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// Where a client keeps its credentials across restarts of its process.
#[derive(Debug)]
pub(crate) struct Store {
    dir: PathBuf,
}

impl Store {
    /// The store in `dir`, made (mode 0700) when missing.
    ///
    /// # Errors
    /// [`SetupError::Store`] when the directory cannot be made or is not on
    /// a memory-backed filesystem.
    pub(crate) fn open(dir: &Path) -> Result<Self, SetupError> {
        let failed = |reason: String| SetupError::Store {
            dir: dir.to_owned(),
            reason,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| failed(e.to_string()))?;
        let kind = rustix::fs::statfs(dir).map_err(|e| failed(e.to_string()))?;
        #[allow(clippy::unnecessary_cast)] // f_type's width differs by target
        let magic = kind.f_type as i64;
        if magic != TMPFS_MAGIC && magic != RAMFS_MAGIC {
            return Err(failed(
                "not on tmpfs or ramfs: credentials would reach disk (mount an emptyDir with medium: Memory there)".to_owned(),
            ));
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Every credential stored; a file that does not read back is skipped
    /// (the binding is then fetched anew).
    pub(crate) fn load(&self) -> Vec<Wire> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|entry| {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                tessera_proto::is_safe_name(&name) && !name.starts_with('.')
            })
            .filter_map(|entry| {
                let bytes = Zeroizing::new(fs::read(entry.path()).ok()?);
                Wire::decode(bytes.as_slice()).ok()
            })
            .collect()
    }

    /// Replaces the stored credential of `wire.binding`. Best effort: a
    /// failure costs only a new lease after a restart.
    pub(crate) fn save(&self, mut wire: Wire) {
        if tessera_proto::is_safe_name(&wire.binding) {
            let bytes = Zeroizing::new(wire.encode_to_vec());
            // Best effort: a failure leaves the previous copy.
            let _ = tessera_atomic_file::replace(&self.dir.join(&wire.binding), &bytes, 0o400);
        }
        for value in wire.fields.values_mut() {
            value.zeroize();
        }
    }

    /// Forgets `binding` (given back to the broker).
    pub(crate) fn remove(&self, binding: &str) {
        if tessera_proto::is_safe_name(binding) {
            let _ = fs::remove_file(self.dir.join(binding));
        }
    }
}
