use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
};

use zeroize::Zeroizing;

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

/// Writes `pairs` as binding `app` with default meta and owner-only access.
fn write_app(writer: &Writer, pairs: &[(&str, &str)]) -> Result<bool, WriteError> {
    writer.write("app", &fields(pairs), Meta::default(), owner())
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

/// A small tmpfs of its own (the test runs as root, as CI does), unmounted on drop.
struct SmallTmpfs {
    dir: tempfile::TempDir,
}

impl SmallTmpfs {
    fn mount(size: &str) -> Self {
        let dir = tmpfs_dir();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting a {size} tmpfs needs root");
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// Every entry under `dir` (recursively, links not followed) with its content.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(next) = stack.pop() {
        for entry in fs::read_dir(&next).unwrap().flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(path.clone());
                out.push((path, None));
            } else if kind.is_symlink() {
                out.push((
                    path.clone(),
                    Some(
                        fs::read_link(&path)
                            .unwrap()
                            .into_os_string()
                            .into_encoded_bytes(),
                    ),
                ));
            } else {
                out.push((path.clone(), Some(fs::read(&path).unwrap())));
            }
        }
    }
    out.sort();
    out
}

/// The binding's visible fields, read through its links.
fn visible(dir: &Path) -> BTreeMap<String, String> {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".."))
        .map(|n| {
            let value = fs::read_to_string(dir.join(&n)).unwrap();
            (n, value)
        })
        .collect()
}

/// Hidden entries other than `..data`: exactly one version directory.
fn version_dirs(dir: &Path) -> usize {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("..") && name != DATA_LINK
        })
        .count()
}

#[test]
fn writer_follows_no_symlinked_binding_directory() {
    let out = tmpfs_dir();
    let elsewhere = tmpfs_dir();
    fs::write(elsewhere.path().join("keep-1"), "precious").unwrap();
    fs::write(elsewhere.path().join("keep-2"), "precious").unwrap();
    let before = snapshot(elsewhere.path());
    let mode_before = fs::metadata(elsewhere.path()).unwrap().mode();
    let writer = Writer::new(out.path().to_owned(), None);
    write_app(&writer, &[("password", "p1")]).unwrap();
    // Swap the binding directory for a link to a directory outside the volume.
    let app = out.path().join("app");
    fs::set_permissions(&app, fs::Permissions::from_mode(0o700)).unwrap();
    fs::remove_dir_all(&app).unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), &app).unwrap();

    write_app(&writer, &[("password", "p2")]).unwrap();

    assert_eq!(
        snapshot(elsewhere.path()),
        before,
        "nothing outside the volume changed"
    );
    assert_eq!(
        fs::metadata(elsewhere.path()).unwrap().mode(),
        mode_before,
        "the foreign directory was not chmod-ed"
    );
    assert!(
        fs::symlink_metadata(&app).unwrap().is_dir(),
        "the link was replaced by a directory"
    );
    assert_eq!(
        visible(&app),
        BTreeMap::from([("password".into(), "p2".into())])
    );
}

#[test]
fn writer_replaces_a_planted_file_with_its_link() {
    let out = tmpfs_dir();
    let writer = Writer::new(out.path().to_owned(), None);
    write_app(&writer, &[("password", "real")]).unwrap();
    let app = out.path().join("app");
    fs::set_permissions(&app, fs::Permissions::from_mode(0o700)).unwrap();
    fs::remove_file(app.join("password")).unwrap();
    fs::write(app.join("password"), "planted").unwrap();
    fs::write(app.join("extra"), "planted").unwrap();

    // Same values: the writer still notices the name is not its link.
    assert!(
        writer
            .write(
                "app",
                &fields(&[("password", "real")]),
                Meta::default(),
                owner()
            )
            .unwrap()
    );
    assert_eq!(
        visible(&app),
        BTreeMap::from([("password".into(), "real".into())])
    );
    assert_eq!(
        fs::read_link(app.join("password")).unwrap(),
        Path::new("..data/password")
    );
}

#[test]
fn writer_replaces_a_planted_data_directory_and_foreign_link() {
    let out = tmpfs_dir();
    let elsewhere = tmpfs_dir();
    fs::write(elsewhere.path().join("password"), "planted").unwrap();
    let app = out.path().join("app");
    fs::create_dir(&app).unwrap();
    fs::create_dir(app.join(DATA_LINK)).unwrap();
    std::os::unix::fs::symlink(elsewhere.path().join("password"), app.join("password")).unwrap();
    let writer = Writer::new(out.path().to_owned(), None);
    write_app(&writer, &[("password", "real")]).unwrap();
    assert_eq!(
        visible(&app),
        BTreeMap::from([("password".into(), "real".into())])
    );
    assert_eq!(
        fs::read_to_string(elsewhere.path().join("password")).unwrap(),
        "planted"
    );
    assert_eq!(version_dirs(&app), 1);
}

#[test]
fn writer_that_does_not_fit_keeps_the_previous_version_and_recovers() {
    let volume = SmallTmpfs::mount("64k");
    let writer = Writer::new(volume.path().to_owned(), None);
    let big = "x".repeat(40 * 1024);
    write_app(&writer, &[("password", &big)]).unwrap();
    let app = volume.path().join("app");

    // The next version does not fit beside the current one.
    let bigger = "y".repeat(40 * 1024);
    for _ in 0..3 {
        let error = writer
            .write(
                "app",
                &fields(&[("password", &bigger)]),
                Meta::default(),
                owner(),
            )
            .unwrap_err();
        assert!(
            matches!(error, WriteError::NoSpace { ref binding, .. } if binding == "app"),
            "{error}"
        );
        assert_eq!(visible(&app)["password"], big, "the previous version stays");
        assert_eq!(version_dirs(&app), 1, "nothing half-written stays behind");
    }
    // Other bindings and a smaller successor still work.
    writer
        .write("other", &fields(&[("user", "u")]), Meta::default(), owner())
        .unwrap();
    write_app(&writer, &[("password", "small")]).unwrap();
    assert_eq!(visible(&app)["password"], "small");
    assert_eq!(version_dirs(&app), 1);

    // Larger than the whole volume: named as such, with both sizes.
    let huge = "z".repeat(100 * 1024);
    let error = write_app(&writer, &[("password", &huge)]).unwrap_err();
    match error {
        WriteError::TooLarge {
            binding,
            size,
            capacity,
        } => {
            assert_eq!(binding, "app");
            assert!(
                size > capacity && capacity == 64 * 1024,
                "{size} {capacity}"
            );
        }
        other => panic!("expected TooLarge, got {other}"),
    }
}

mod property {
    use proptest::prelude::*;

    use super::*;

    /// What can happen to a volume between two looks at it.
    #[derive(Clone, Debug)]
    enum Op {
        /// A delivery of `size` bytes of value `tag` for fields `names`.
        Deliver {
            names: Vec<u8>,
            tag: u8,
            size: usize,
        },
        /// Someone with write access plants a regular file by a field's name.
        PlantFile(u8),
        /// ... replaces the binding directory with a link outside the volume.
        LinkBindingAway,
        /// ... links a field's name outside the volume.
        LinkFieldAway(u8),
        /// ... leaves a half-written version directory behind.
        PlantVersionDir,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (prop::collection::vec(0u8..4, 1..4), any::<u8>(), prop_oneof![Just(10usize), Just(20_000), Just(50_000)])
                .prop_map(|(names, tag, size)| Op::Deliver { names, tag, size }),
            1 => (0u8..4).prop_map(Op::PlantFile),
            1 => Just(Op::LinkBindingAway),
            1 => (0u8..4).prop_map(Op::LinkFieldAway),
            1 => Just(Op::PlantVersionDir),
        ]
    }

    fn is_real_dir(path: &Path) -> bool {
        fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
    }

    fn open_up(dir: &Path) {
        if is_real_dir(dir) {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).unwrap();
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn volume_always_holds_exactly_one_complete_version(ops in prop::collection::vec(op(), 1..14)) {
            let volume = SmallTmpfs::mount("96k");
            let elsewhere = tmpfs_dir();
            fs::write(elsewhere.path().join("f0"), "outside").unwrap();
            fs::create_dir(elsewhere.path().join("sub")).unwrap();
            fs::write(elsewhere.path().join("sub/f1"), "outside").unwrap();
            let before = snapshot(elsewhere.path());
            let writer = Writer::new(volume.path().to_owned(), None);
            let app = volume.path().join("app");
            let mut delivered: Option<BTreeMap<String, String>> = None;
            let mut tampered = false;
            for op in ops {
                if !matches!(op, Op::Deliver { .. }) {
                    tampered = true;
                }
                match op {
                    Op::Deliver { names, tag, size } => {
                        let value = char::from(b'a' + tag % 26).to_string().repeat(size);
                        let wanted: BTreeMap<String, String> = names.iter().map(|n| (format!("f{n}"), value.clone())).collect();
                        let as_fields: Fields = wanted.iter().map(|(k, v)| (k.clone(), Zeroizing::new(v.as_bytes().to_vec()))).collect();
                        match writer.write("app", &as_fields, Meta::default(), owner()) {
                            Ok(_) => {
                                prop_assert_eq!(&visible(&app), &wanted, "a delivery is complete");
                                prop_assert_eq!(version_dirs(&app), 1);
                                delivered = Some(wanted);
                                tampered = false;
                            }
                            Err(WriteError::NoSpace { .. } | WriteError::TooLarge { .. }) => {
                                if let (Some(previous), false) = (&delivered, tampered) {
                                    prop_assert_eq!(&visible(&app), previous, "a failed write keeps the previous version");
                                    prop_assert_eq!(version_dirs(&app), 1, "a failed write leaves nothing behind");
                                }
                            }
                            Err(other) => panic!("unexpected write error: {other}"),
                        }
                    }
                    Op::PlantFile(n) => {
                        open_up(&app);
                        if is_real_dir(&app) {
                            // On a full volume the planter fails too: it only tries.
                            let _ = fs::remove_file(app.join(format!("f{n}")));
                            let _ = fs::write(app.join(format!("f{n}")), "planted");
                        }
                    }
                    Op::LinkBindingAway => {
                        open_up(&app);
                        if fs::symlink_metadata(&app).is_ok() {
                            let _ = fs::remove_dir_all(&app).or_else(|_| fs::remove_file(&app));
                        }
                        let _ = std::os::unix::fs::symlink(elsewhere.path(), &app);
                        delivered = None;
                    }
                    Op::LinkFieldAway(n) => {
                        open_up(&app);
                        if is_real_dir(&app) {
                            let _ = fs::remove_file(app.join(format!("f{n}")));
                            let _ = std::os::unix::fs::symlink(elsewhere.path().join("f0"), app.join(format!("f{n}")));
                        }
                    }
                    Op::PlantVersionDir => {
                        open_up(&app);
                        if is_real_dir(&app) {
                            let _ = fs::create_dir(app.join("..2000_01_01_leftover"));
                            let _ = fs::write(app.join("..2000_01_01_leftover/f0"), "x".repeat(30_000));
                        }
                    }
                }
                prop_assert_eq!(&snapshot(elsewhere.path()), &before, "nothing outside the volume changes");
            }
            // One final delivery that fits: the volume then holds exactly it.
            let last: BTreeMap<String, String> = [("f1".to_owned(), "final".to_owned())].into();
            let as_fields: Fields = last.iter().map(|(k, v)| (k.clone(), Zeroizing::new(v.as_bytes().to_vec()))).collect();
            writer.write("app", &as_fields, Meta::default(), owner()).unwrap();
            prop_assert_eq!(visible(&app), last);
            prop_assert_eq!(version_dirs(&app), 1);
            prop_assert_eq!(&snapshot(elsewhere.path()), &before);
        }
    }
}
