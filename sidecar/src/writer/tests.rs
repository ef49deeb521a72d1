use std::os::unix::fs::MetadataExt;

use super::*;

fn owner() -> Access {
    Access {
        file_mode: 0o400,
        group: None,
    }
}

fn fields(pairs: &[(&str, &str)]) -> Fields {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Zeroizing::new(v.as_bytes().to_vec())))
        .collect()
}

fn tmpfs_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tessera-writer-")
        .tempdir_in("/dev/shm")
        .expect("/dev/shm is tmpfs on Linux")
}

#[test]
fn writes_kubelet_layout_with_private_modes() {
    let out = tmpfs_dir();
    let writer = Writer::new(out.path().to_owned(), None);
    assert!(
        writer
            .write(
                "db",
                &fields(&[("user", "u1"), ("pass", "p1")]),
                Meta::default(),
                owner()
            )
            .unwrap()
    );

    let dir = out.path().join("db");
    assert_eq!(fs::read_to_string(dir.join("user")).unwrap(), "u1");
    assert_eq!(
        fs::read_link(dir.join("user")).unwrap(),
        Path::new("..data/user")
    );
    let target = fs::read_link(dir.join(DATA_LINK)).unwrap();
    assert!(target.to_string_lossy().starts_with(".."));
    let file_meta = fs::metadata(dir.join("pass")).unwrap();
    assert_eq!(file_meta.mode() & 0o777, 0o400);
    assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o500);
    assert_eq!(
        fs::metadata(dir.join(&target)).unwrap().mode() & 0o777,
        0o500
    );
}

#[test]
fn rotation_replaces_everything_and_drops_old_names() {
    let out = tmpfs_dir();
    let writer = Writer::new(out.path().to_owned(), None);
    writer
        .write(
            "db",
            &fields(&[("user", "u1"), ("old", "x")]),
            Meta::default(),
            owner(),
        )
        .unwrap();
    let first = fs::read_link(out.path().join("db").join(DATA_LINK)).unwrap();
    writer
        .write(
            "db",
            &fields(&[("user", "u2"), ("pass", "p2")]),
            Meta::default(),
            owner(),
        )
        .unwrap();

    let dir = out.path().join("db");
    assert_eq!(fs::read_to_string(dir.join("user")).unwrap(), "u2");
    assert_eq!(fs::read_to_string(dir.join("pass")).unwrap(), "p2");
    assert!(fs::symlink_metadata(dir.join("old")).is_err());
    assert!(
        !dir.join(&first).exists(),
        "the previous version directory is removed"
    );
    let hidden: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("..") && e.file_name() != DATA_LINK)
        .collect();
    assert_eq!(hidden.len(), 1, "exactly one version directory remains");
}

#[test]
fn identical_values_are_not_rewritten() {
    let out = tmpfs_dir();
    let writer = Writer::new(out.path().to_owned(), None);
    assert!(
        writer
            .write("db", &fields(&[("user", "u1")]), Meta::default(), owner())
            .unwrap()
    );
    assert!(
        !writer
            .write("db", &fields(&[("user", "u1")]), Meta::default(), owner())
            .unwrap()
    );
}

#[test]
fn group_mode_is_0440_and_0550() {
    let out = tmpfs_dir();
    let gid = fs::metadata(out.path()).unwrap().gid();
    let writer = Writer::new(out.path().to_owned(), Some(gid));
    let access = writer.access(0, None).unwrap();
    writer
        .write("db", &fields(&[("user", "u1")]), Meta::default(), access)
        .unwrap();
    let dir = out.path().join("db");
    assert_eq!(
        fs::metadata(dir.join("user")).unwrap().mode() & 0o777,
        0o440
    );
    assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o550);
}

#[test]
fn unsafe_names_are_refused_and_nothing_is_written() {
    let out = tmpfs_dir();
    let writer = Writer::new(out.path().to_owned(), None);
    for bad in ["../x", "a/b", "..data", ".", ""] {
        let err = writer
            .write("db", &fields(&[(bad, "v")]), Meta::default(), owner())
            .unwrap_err();
        assert!(matches!(err, WriteError::UnsafeName(_)), "{bad}");
        let err = writer
            .write(bad, &fields(&[("ok", "v")]), Meta::default(), owner())
            .unwrap_err();
        assert!(matches!(err, WriteError::UnsafeName(_)), "{bad}");
    }
    assert_eq!(fs::read_dir(out.path()).unwrap().count(), 0);
}

#[test]
fn disk_directories_are_not_tmpfs() {
    let disk = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    assert!(matches!(
        ensure_tmpfs(disk.path()),
        Err(WriteError::NotTmpfs(_))
    ));
    assert!(ensure_tmpfs(Path::new("/dev/shm")).is_ok());
}

#[test]
fn policy_mode_and_group_override_the_defaults() {
    let writer = Writer::new(PathBuf::from("/nonexistent"), None);
    assert_eq!(
        owner(),
        Access {
            file_mode: 0o400,
            group: None
        }
    );
    assert_eq!(
        writer.access(0, Some(7)).unwrap(),
        Access {
            file_mode: 0o440,
            group: Some(7)
        }
    );
    assert_eq!(
        writer.access(0o400, Some(7)).unwrap(),
        Access {
            file_mode: 0o400,
            group: Some(7)
        }
    );
    let grouped = Writer::new(PathBuf::from("/nonexistent"), Some(5));
    assert_eq!(
        grouped.access(0, None).unwrap(),
        Access {
            file_mode: 0o440,
            group: Some(5)
        }
    );
    assert!(matches!(
        writer.access(0o644, None),
        Err(WriteError::UnsafeMode(0o644))
    ));
}

#[test]
fn handle_and_version_are_stored_hidden_with_the_fields() {
    let out = tmpfs_dir();
    let writer = Writer::new(out.path().to_owned(), None);
    let meta = Meta {
        version: "v7",
        handle: Some("sealed.handle"),
    };
    assert!(
        writer
            .write("db", &fields(&[("user", "u1")]), meta, owner())
            .unwrap()
    );
    assert_eq!(writer.handle("db").as_deref(), Some("sealed.handle"));
    let dir = out.path().join("db");
    assert_eq!(
        fs::read_to_string(dir.join("..data/..version")).unwrap(),
        "v7"
    );
    assert_eq!(
        fs::metadata(dir.join("..data/..handle")).unwrap().mode() & 0o777,
        0o400
    );
    let visible: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".."))
        .collect();
    assert_eq!(visible, ["user"], "the handle is not a field the app sees");
    assert!(
        !writer
            .write("db", &fields(&[("user", "u1")]), meta, owner())
            .unwrap()
    );
    let new_handle = Meta {
        version: "v8",
        handle: Some("other.handle"),
    };
    assert!(
        writer
            .write("db", &fields(&[("user", "u1")]), new_handle, owner())
            .unwrap()
    );
    assert_eq!(writer.handle("db").as_deref(), Some("other.handle"));
}
