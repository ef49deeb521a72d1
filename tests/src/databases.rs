//! Private MariaDB, Redis and RabbitMQ servers (Debian's packages, installed
//! by `scripts/test`) on free loopback ports with password authentication,
//! and their OpenBao connections, to prove a delivered user by logging in
//! with it and its revocation by failing to.

use super::*;

/// A private MariaDB server; stopped (by PID) when dropped.
pub struct MariaDb {
    _dir: tempfile::TempDir,
    _proc: Proc,
    /// The port on 127.0.0.1.
    pub port: u16,
    /// The password of `vault`, the account OpenBao manages users with.
    pub admin_password: String,
}

impl MariaDb {
    /// Creates a data directory and starts the server on a free port.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tessera-mariadb-")
            .tempdir()
            .unwrap();
        let data = dir.path().join("data");
        let installed = Command::new("mariadb-install-db")
            .arg(format!("--datadir={}", data.display()))
            .args(["--user=root", "--auth-root-authentication-method=socket"])
            .output()
            .expect("mariadb-install-db (scripts/test installs mariadb-server)");
        assert!(
            installed.status.success(),
            "mariadb-install-db: {}",
            String::from_utf8_lossy(&installed.stderr)
        );
        let port = free_port();
        let socket = dir.path().join("sock");
        let mut command = Command::new("mariadbd");
        command
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--port={port}"))
            .args(["--bind-address=127.0.0.1", "--user=root", "--skip-log-bin"])
            .arg(format!("--pid-file={}", dir.path().join("pid").display()));
        let proc = Proc::spawn("mariadb", command, dir.path().join("log"));
        let admin_password = random_string(24);
        let setup = format!(
            // The anonymous accounts would match local logins before any `user'@'%'`.
            "DELETE FROM mysql.global_priv WHERE User = ''; FLUSH PRIVILEGES; CREATE USER 'vault'@'%' IDENTIFIED BY '{admin_password}'; GRANT ALL ON *.* TO 'vault'@'%' WITH GRANT OPTION;"
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let done = Command::new("mariadb")
                .arg(format!("--socket={}", socket.display()))
                .args(["-u", "root", "-e", &setup])
                .output()
                .unwrap();
            if done.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "MariaDB did not start: {}",
                String::from_utf8_lossy(&done.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Self {
            _dir: dir,
            _proc: proc,
            port,
            admin_password,
        }
    }

    /// Whether `user` logs in over TCP with `password`.
    pub fn can_login(&self, user: &str, password: &str) -> bool {
        Command::new("mariadb")
            .args(["-h", "127.0.0.1", "-P", &self.port.to_string(), "-u", user])
            .arg(format!("-p{password}"))
            .args(["--connect-timeout=5", "-e", "SELECT 1"])
            .output()
            .unwrap()
            .status
            .success()
    }
}

/// A private Redis server (ACLs, a password for `default`); stopped (by PID)
/// when dropped.
pub struct Redis {
    _dir: tempfile::TempDir,
    _proc: Proc,
    /// The port on 127.0.0.1.
    pub port: u16,
    /// The password of `default`, the account OpenBao manages users with.
    pub admin_password: String,
}

impl Redis {
    /// Starts the server on a free port, persisting nothing.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tessera-redis-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let admin_password = random_string(24);
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--requirepass", &admin_password]);
        let proc = Proc::spawn("redis", command, dir.path().join("log"));
        let redis = Self {
            _dir: dir,
            _proc: proc,
            port,
            admin_password,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !redis.can_login("default", &redis.admin_password) {
            assert!(Instant::now() < deadline, "Redis did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        redis
    }

    /// Whether `user` authenticates with `password` (AUTH, then PING).
    pub fn can_login(&self, user: &str, password: &str) -> bool {
        let output = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "--user",
                user,
                "--pass",
                password,
                "--no-auth-warning",
                "PING",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).trim() == "PONG"
    }
}

impl OpenBao {
    /// Connects the `database` engine to `mariadb` (plugin
    /// `mysql-database-plugin`) and adds role `role`, whose users may read.
    pub fn mariadb_role(&self, mariadb: &MariaDb, role: &str, default_ttl: &str, max_ttl: &str) {
        self.enable_database_engine(None);
        self.cli(&[
            "write",
            "database/config/mariadb",
            "plugin_name=mysql-database-plugin",
            &format!(
                "connection_url={{{{username}}}}:{{{{password}}}}@tcp(127.0.0.1:{})/",
                mariadb.port
            ),
            "allowed_roles=*",
            "username=vault",
            &format!("password={}", mariadb.admin_password),
        ]);
        self.cli(&[
            "write",
            &format!("database/roles/{role}"),
            "db_name=mariadb",
            "creation_statements=CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}'; GRANT SELECT ON *.* TO '{{name}}'@'%';",
            &format!("default_ttl={default_ttl}"),
            &format!("max_ttl={max_ttl}"),
        ]);
    }

    /// Connects the `database` engine to `redis` (plugin
    /// `redis-database-plugin`) and adds role `role`, whose users may read.
    pub fn redis_role(&self, redis: &Redis, role: &str, default_ttl: &str, max_ttl: &str) {
        self.enable_database_engine(None);
        self.cli(&[
            "write",
            "database/config/redis",
            "plugin_name=redis-database-plugin",
            "host=127.0.0.1",
            &format!("port={}", redis.port),
            "username=default",
            &format!("password={}", redis.admin_password),
            "allowed_roles=*",
        ]);
        self.cli(&[
            "write",
            &format!("database/roles/{role}"),
            "db_name=redis",
            r#"creation_statements=["~*", "+@read", "+ping"]"#,
            &format!("default_ttl={default_ttl}"),
            &format!("max_ttl={max_ttl}"),
        ]);
    }
}

/// A private RabbitMQ node (Debian's `rabbitmq-server`, with its management
/// API, which OpenBao's `rabbitmq` engine calls) and its own `epmd` on free
/// loopback ports; both stopped (by PID) when dropped.
pub struct RabbitMq {
    dir: tempfile::TempDir,
    _epmd: Proc,
    _server: Proc,
    /// The management API's port on 127.0.0.1.
    pub management_port: u16,
}

impl RabbitMq {
    /// Starts a node as the `rabbitmq` user (RabbitMQ refuses root) and
    /// waits for its management API.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tessera-rabbitmq-")
            .tempdir()
            .unwrap();
        let path = dir.path();
        fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let (amqp, management, epmd_port, distribution) =
            (free_port(), free_port(), free_port(), free_port());
        fs::write(path.join("enabled_plugins"), "[rabbitmq_management].\n").unwrap();
        fs::write(
            path.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{amqp}\nmanagement.tcp.port = {management}\nmanagement.tcp.ip = 127.0.0.1\n"
            ),
        )
        .unwrap();
        // Names from /etc/hosts only: no resolver helper process to outlive the node.
        fs::write(path.join("inetrc"), "{lookup, [file]}.\n").unwrap();
        for sub in ["mnesia", "log", "home"] {
            fs::create_dir_all(path.join(sub)).unwrap();
        }
        let owned = Command::new("chown")
            .args(["-R", "rabbitmq"])
            .arg(path)
            .status()
            .unwrap();
        assert!(
            owned.success(),
            "chown to rabbitmq (scripts/test installs rabbitmq-server)"
        );
        let epmd_binary = fs::read_dir("/usr/lib/erlang")
            .unwrap()
            .flatten()
            .map(|entry| entry.path().join("bin/epmd"))
            .find(|candidate| candidate.exists())
            .expect("Erlang's epmd");
        let mut epmd = Command::new(epmd_binary);
        epmd.args(["-port", &epmd_port.to_string(), "-address", "127.0.0.1"]);
        let epmd = Proc::spawn("epmd", epmd, path.join("epmd.log"));
        let at = |sub: &str| path.join(sub).display().to_string();
        let mut server = Command::new("runuser");
        server
            .args(["-u", "rabbitmq", "--", "env"])
            .arg(format!("HOME={}", at("home")))
            .arg(format!("RABBITMQ_NODENAME=tessera{amqp}@localhost"))
            .arg(format!("RABBITMQ_MNESIA_BASE={}", at("mnesia")))
            .arg(format!("RABBITMQ_LOG_BASE={}", at("log")))
            .arg(format!("RABBITMQ_CONFIG_FILE={}", at("rabbitmq")))
            .arg(format!(
                "RABBITMQ_ENABLED_PLUGINS_FILE={}",
                at("enabled_plugins")
            ))
            .arg(format!(
                "RABBITMQ_FEATURE_FLAGS_FILE={}",
                at("feature_flags")
            ))
            .arg(format!(
                "RABBITMQ_PLUGINS_EXPAND_DIR={}",
                at("plugins-expand")
            ))
            .arg(format!("RABBITMQ_DIST_PORT={distribution}"))
            .arg(format!("ERL_EPMD_PORT={epmd_port}"))
            .arg(format!("ERL_INETRC={}", at("inetrc")))
            .arg("RABBITMQ_SERVER_ERL_ARGS=-start_epmd false")
            .arg("/usr/lib/rabbitmq/bin/rabbitmq-server")
            .current_dir(path);
        let server = Proc::spawn("rabbitmq", server, path.join("server.log"));
        let node = Self {
            dir,
            _epmd: epmd,
            _server: server,
            management_port: management,
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        while !node.can_login("guest", "guest") {
            assert!(
                Instant::now() < deadline,
                "RabbitMQ did not start: {}",
                fs::read_to_string(node.dir.path().join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        node
    }

    /// Whether `user` authenticates to the management API with `password`.
    pub fn can_login(&self, user: &str, password: &str) -> bool {
        use base64::Engine as _;
        use std::io::{Read as _, Write as _};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.management_port))
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let credentials =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let request = format!(
            "GET /api/whoami HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Basic {credentials}\r\nConnection: close\r\n\r\n"
        );
        let mut response = String::new();
        stream.write_all(request.as_bytes()).is_ok()
            && stream.read_to_string(&mut response).is_ok()
            && response.starts_with("HTTP/1.1 200")
    }
}
