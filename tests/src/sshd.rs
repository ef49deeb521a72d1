//! A private OpenSSH server (Debian's `openssh-server`) on a free loopback
//! port, trusting one user CA: a certificate signed by it for a principal
//! listed for `root` logs in. Stopped by PID when dropped.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use crate::{Proc, free_port};

/// The OpenSSH server.
pub struct Sshd {
    // Stopped before its directory goes, so its log can be shown.
    _proc: Proc,
    _dir: tempfile::TempDir,
    /// The port on 127.0.0.1.
    pub port: u16,
}

impl Sshd {
    /// Starts `sshd` trusting `user_ca` (an OpenSSH public key line) for
    /// user certificates, and letting `root` in with a certificate for one
    /// of `principals`. Nothing else logs in: no passwords, no keys.
    pub fn start(user_ca: &str, principals: &[&str]) -> Self {
        // sshd trusts its principals file only when no directory above it
        // is writable by others: not under /tmp.
        let dir = tempfile::Builder::new()
            .prefix("tessera-sshd-")
            .tempdir_in("/run")
            .unwrap();
        // sshd checks the modes of every file it trusts (StrictModes).
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        // Privilege separation needs its empty directory.
        fs::create_dir_all("/run/sshd").unwrap();
        let host_key = dir.path().join("host_ed25519");
        let made = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&host_key)
            .output()
            .unwrap();
        assert!(made.status.success(), "ssh-keygen: {made:?}");
        write(&dir.path().join("user_ca.pub"), user_ca);
        write(
            &dir.path().join("principals_root"),
            &format!("{}\n", principals.join("\n")),
        );
        let port = free_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nPidFile {dir}/sshd.pid\n\
             TrustedUserCAKeys {dir}/user_ca.pub\nAuthorizedPrincipalsFile {dir}/principals_%u\n\
             AuthorizedKeysFile none\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nUsePAM no\nLogLevel VERBOSE\n",
            host = host_key.display(),
            dir = dir.path().display(),
        );
        write(&dir.path().join("sshd_config"), &config);
        let mut command = Command::new("/usr/sbin/sshd");
        command
            .args(["-D", "-e", "-f"])
            .arg(dir.path().join("sshd_config"));
        let proc = Proc::spawn("sshd", command, dir.path().join("log"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            _proc: proc,
            _dir: dir,
            port,
        }
    }

    /// Runs `echo logged-in` as `root` with private key `key` and its
    /// certificate `certificate`; whether it logged in (and ran it).
    pub fn can_login(&self, key: &Path, certificate: &Path) -> bool {
        let output = Command::new("ssh")
            .args(["-p", &self.port.to_string()])
            .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args(["-o", "ConnectTimeout=10", "-F", "/dev/null"])
            .arg("-i")
            .arg(key)
            .arg("-o")
            .arg(format!("CertificateFile={}", certificate.display()))
            .args(["root@127.0.0.1", "echo", "logged-in"])
            .output()
            .unwrap();
        let logged_in = String::from_utf8_lossy(&output.stdout).trim() == "logged-in";
        if !logged_in {
            // Shown with the test's output when it fails.
            eprintln!(
                "ssh did not log in: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        logged_in
    }
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
}
