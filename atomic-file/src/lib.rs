//! Replacing a file at once: the new content is written beside it under a
//! name of its own (`.NAME.PID.partial`), flushed to storage, given its mode
//! exactly (the umask does not apply), renamed over the old file, and the
//! directory flushed, so a reader sees the old file or the new one, never a
//! part, and a crash leaves one of the two. Whatever was planted under the
//! partial name is removed first; the partial file is created, never opened
//! through a link.
//!
//! Tessera's one write-then-rename outside the sidecar's volume writer (which
//! swaps whole directories): the broker's key and CA files, the sidecar's
//! status file and installed binary, the client's store.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

/// Replaces `path` with `bytes`, with `mode`.
///
/// # Errors
/// When the partial file cannot be written or renamed; `path` is untouched.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    replace_with(path, mode, |file| file.write_all(bytes))
}

/// Replaces `path` with what `write` puts into the new file, with `mode`.
///
/// # Errors
/// When `write` fails or the partial file cannot be made or renamed; `path`
/// is untouched and the partial file removed.
pub fn replace_with(
    path: &Path,
    mode: u32,
    write: impl FnOnce(&mut fs::File) -> io::Result<()>,
) -> io::Result<()> {
    let partial = partial_name(path)?;
    match fs::remove_file(&partial) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let result = (|| {
        // `create_new` fails on anything already there, a link included.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)?;
        write(&mut file)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        drop(file);
        fs::rename(&partial, path)?;
        // The rename is durable once the directory is.
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&partial);
    }
    result
}

/// `.NAME.PID.partial` beside `path`: two files, or two processes writing
/// one, never share it.
fn partial_name(path: &Path) -> io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    Ok(path.with_file_name(format!(
        ".{}.{}.partial",
        name.to_string_lossy(),
        std::process::id()
    )))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn the_file_is_replaced_whole_with_its_exact_mode_and_nothing_left_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        replace(&path, b"first", 0o644).unwrap();
        replace(&path, b"second", 0o400).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o400);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["key"]);
    }

    #[test]
    fn a_planted_link_under_the_partial_name_is_removed_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status");
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, partial_name(&path).unwrap()).unwrap();
        replace(&path, b"new", 0o444).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        assert_eq!(fs::read(&path).unwrap(), b"new");
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_partial() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin");
        replace(&path, b"old", 0o555).unwrap();
        let failed = replace_with(&path, 0o555, |_| Err(io::Error::other("source unreadable")));
        assert!(failed.is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert!(!partial_name(&path).unwrap().exists());
    }
}
