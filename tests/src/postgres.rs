//! A private PostgreSQL cluster with password authentication, to prove a
//! delivered database credential by logging in with it.

use super::*;

/// A private PostgreSQL cluster with password (SCRAM) authentication. The
/// machine's own server trusts every local connection, so it would accept any
/// password; this one proves a delivered password by checking it.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// The port on 127.0.0.1.
    pub port: u16,
    /// The superuser `postgres` password.
    pub password: String,
}

fn postgres_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (scripts/test installs it)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("an initdb under /usr/lib/postgresql")
}

/// Runs a PostgreSQL tool as the `postgres` user when we are root (it refuses
/// to run as root), as ourselves otherwise.
fn as_postgres(program: &Path) -> Command {
    let root = fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

impl Postgres {
    /// Creates and starts a cluster on a free port.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tessera-pg-")
            .tempdir()
            .unwrap();
        let path = dir.path();
        let _ = Command::new("chown").arg("postgres").arg(path).status();
        fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let password = random_string(24);
        fs::write(path.join("pw"), &password).unwrap();
        let _ = Command::new("chown")
            .arg("postgres")
            .arg(path.join("pw"))
            .status();
        let bin = postgres_bin();
        let init = as_postgres(&bin.join("initdb"))
            .arg("-D")
            .arg(path.join("data"))
            .args(["-U", "postgres", "--auth=scram-sha-256", "-E", "UTF8"])
            .arg(format!("--pwfile={}", path.join("pw").display()))
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        let port = free_port();
        let started = as_postgres(&bin.join("pg_ctl"))
            .arg("-D")
            .arg(path.join("data"))
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1",
                path.display()
            ))
            .arg("-l")
            .arg(path.join("log"))
            .args(["-w", "start"])
            .output()
            .unwrap();
        assert!(
            started.status.success(),
            "PostgreSQL did not start: {}",
            String::from_utf8_lossy(&started.stderr)
        );
        Self {
            dir,
            bin,
            port,
            password,
        }
    }

    fn psql(&self, user: &str, password: &str, sql: &str) -> Output {
        Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                user,
                "-d",
                "postgres",
                "-tA",
                "-c",
                sql,
            ])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "5")
            .output()
            .unwrap()
    }

    /// Restarts the server (fast shutdown: connections are cut), with the
    /// options it was started with; returns once it takes connections.
    pub fn restart(&self) {
        // The server logs to its file: pg_ctl's own output pipe would
        // otherwise stay open as long as the server runs.
        let restarted = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-m", "fast", "-w", "restart"])
            .output()
            .unwrap();
        assert!(
            restarted.status.success(),
            "PostgreSQL did not restart: {}",
            String::from_utf8_lossy(&restarted.stderr)
        );
    }

    /// Whether `user` can log in with `password`.
    pub fn can_login(&self, user: &str, password: &str) -> bool {
        self.psql(user, password, "select 1").status.success()
    }

    /// Creates a login role `name` with `password` (any characters).
    pub fn create_user(&self, name: &str, password: &str) {
        let output = self.psql(
            "postgres",
            &self.password,
            &format!(
                "create role \"{}\" login password '{}'",
                name.replace('"', "\"\""),
                password.replace('\'', "''")
            ),
        );
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Whether `psql` connects with the connection URI `dsn`, as an app
    /// given that DSN would (libpq decodes its percent-escapes).
    pub fn can_connect(&self, dsn: &str) -> bool {
        Command::new("psql")
            .arg(dsn)
            .args(["-tA", "-c", "select 1"])
            .env("PGCONNECT_TIMEOUT", "5")
            .env_remove("PGPASSWORD")
            .output()
            .unwrap()
            .status
            .success()
    }

    /// Whether the role `name` exists (Vault drops a revoked user's role).
    pub fn role_exists(&self, name: &str) -> bool {
        let output = self.psql(
            "postgres",
            &self.password,
            &format!(
                "select count(*) from pg_roles where rolname = '{}'",
                name.replace('\'', "''")
            ),
        );
        String::from_utf8_lossy(&output.stdout).trim() != "0"
    }

    /// How many roles Vault created (names start with `v-`).
    pub fn vault_roles(&self) -> usize {
        let output = self.psql(
            "postgres",
            &self.password,
            "select count(*) from pg_roles where rolname like 'v-%'",
        );
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"])
            .output();
    }
}
