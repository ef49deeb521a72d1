//! Why writing a binding's files failed, each naming the file and what to do.

#[allow(clippy::wildcard_imports)]
use super::*;

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
    /// The pod owner's renames or templates do not fit what was delivered.
    #[error("{0}")]
    PodOutput(String),
    /// The broker asked for a file mode other than 0400 or 0440.
    #[error("refusing file mode {0:o} from the broker (only 0400 and 0440 are written)")]
    UnsafeMode(u32),
    /// The credential can never fit: it is larger than the whole volume.
    #[error(
        "binding `{binding}`: the credential needs {size} bytes but the volume holds {capacity} bytes in all (raise the volume's size limit, e.g. the webhook's volumeSizeLimit)"
    )]
    TooLarge {
        /// The binding whose files did not fit.
        binding: String,
        /// Bytes the credential takes on tmpfs.
        size: u64,
        /// Bytes the volume holds in all.
        capacity: u64,
    },
    /// The volume is full for now; the previous version stays.
    #[error(
        "binding `{binding}`: no space left on the volume for the credential's {size} bytes ({free} bytes free); the previous version stays, retrying"
    )]
    NoSpace {
        /// The binding whose files were not written.
        binding: String,
        /// Bytes the credential takes on tmpfs.
        size: u64,
        /// Bytes free when the write failed.
        free: u64,
    },
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory it happened at.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

pub(super) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> WriteError {
    move |source| WriteError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}
