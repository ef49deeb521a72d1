//! Child processes the harness starts: killed by PID when dropped, their
//! output kept in a log file and printed when a test fails.

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
            .stderr(file);
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

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
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
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
