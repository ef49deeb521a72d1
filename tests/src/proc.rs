//! Child processes the harness starts: killed by PID when dropped, with
//! every process they started (each runs in a process group of its own, so
//! an `exec` wrapper's app goes with it), their output kept in a log file and
//! printed when a test fails.

use std::os::unix::process::CommandExt as _;

use super::*;

/// A child process killed by PID when dropped; its output goes to a log file.
pub struct Proc {
    child: Child,
    name: String,
    /// Where stdout and stderr go.
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `command` with output to `log`.
    pub fn spawn(name: &str, mut command: Command, log: PathBuf) -> Self {
        let file = fs::File::create(&log).unwrap();
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .process_group(0);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({command:?}): {e}"));
        Self {
            child,
            name: name.to_owned(),
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the process and everything it started (SIGKILL to its process
    /// group) and reaps it.
    pub fn kill(&mut self) {
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.pid())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// The exit code, once the process has exited on its own.
    pub fn exit_code(&mut self) -> Option<i32> {
        self.child
            .try_wait()
            .unwrap()
            .and_then(|status| status.code())
    }

    /// Sends `signal` (a name `kill` knows, e.g. `USR1`).
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status();
    }

    /// Sends SIGTERM and waits up to 10 s for exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Breaks the process's listening socket on `port` under it, as a fault
    /// in the kernel or a stray `close` would: takes a copy of the socket
    /// from the process (`pidfd_getfd`; the harness runs as root) and shuts
    /// it down, so the process's next `accept` fails with EINVAL.
    pub fn break_listener(&self, port: u16) {
        let inode = listening_inode(port)
            .unwrap_or_else(|| panic!("{}: nothing listens on port {port}", self.name));
        let target = format!("socket:[{inode}]");
        let fd = fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .filter_map(Result::ok)
            .find(|entry| {
                fs::read_link(entry.path()).is_ok_and(|link| link.to_string_lossy() == target)
            })
            .and_then(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
            .unwrap_or_else(|| panic!("{}: does not hold the socket on port {port}", self.name));
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).unwrap();
        let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).unwrap();
        let socket =
            rustix::process::pidfd_getfd(&pidfd, fd, rustix::process::PidfdGetfdFlags::empty())
                .expect("pidfd_getfd (the harness runs as root)");
        rustix::net::shutdown(&socket, rustix::net::Shutdown::Both).unwrap();
    }
}

/// The inode of the socket listening on 127.0.0.1:`port` (`/proc/net/tcp`).
fn listening_inode(port: u16) -> Option<String> {
    let table = fs::read_to_string("/proc/net/tcp").ok()?;
    let local = format!("0100007F:{port:04X}");
    table.lines().skip(1).find_map(|line| {
        let columns: Vec<&str> = line.split_whitespace().collect();
        (columns.get(1) == Some(&local.as_str()) && columns.get(3) == Some(&"0A"))
            .then(|| columns.get(9).map(|inode| (*inode).to_owned()))
            .flatten()
    })
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- {} output ({}) -----\n{}",
                self.name,
                self.log.display(),
                self.output()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found in this session: every run left the app of an `exec` wrapper
    /// the harness had killed running (the wrapper died, its child lived on).
    #[test]
    fn dropping_a_process_kills_what_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("child.pid");
        let mut command = Command::new("sh");
        command.args([
            "-c",
            &format!("sleep 300 & echo $! > {}; wait", pid_file.display()),
        ]);
        let proc = Proc::spawn("a wrapper", command, dir.path().join("log"));
        let deadline = Instant::now() + Duration::from_secs(10);
        let child = loop {
            if let Some(pid) = fs::read_to_string(&pid_file)
                .ok()
                .and_then(|text| text.trim().parse::<u32>().ok())
            {
                break pid;
            }
            assert!(
                Instant::now() < deadline,
                "the wrapper never started its child"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let alive = |pid: u32| {
            fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| !stat.contains(") Z "))
        };
        assert!(alive(child));
        drop(proc);
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(child) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(child), "the child {child} outlived its wrapper");
    }
}
