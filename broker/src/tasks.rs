//! The broker's long-lived tasks in one place: the servers (gRPC, webhook,
//! admin) and the loops that keep it current (policy and certificate
//! followers, KV warmers, the lease sweep, the pod watch, health). Each is
//! named; none may end before shutdown. One that returns, fails or panics
//! early is reported by [`Tasks::ended`] with its name, and `serve` then
//! stops the process with that error rather than run without it.
//!
//! Short-lived work (a connection's handshake, a `Watch` stream, a KV
//! poller, a revocation) goes through the [`Spawner`] of the same `Tasks`,
//! so shutdown waits for it too. No other code in the broker spawns.

use std::{future::Future, panic::AssertUnwindSafe, pin::Pin};

use futures::FutureExt as _;
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

/// A task not yet started.
type Pending = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// How a task ended, with its name.
#[derive(Debug, PartialEq, Eq)]
pub struct Ended {
    /// The task's name, e.g. `webhook server`.
    pub name: &'static str,
    /// `Ok` when it returned, else what went wrong (an error or a panic).
    pub outcome: Result<(), String>,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.outcome {
            Ok(()) => write!(f, "{} stopped", self.name),
            Err(error) => write!(f, "{} failed: {error}", self.name),
        }
    }
}

/// Named tasks: added while the broker is built (nothing runs yet), started
/// together, watched, and drained at shutdown.
#[derive(Default)]
pub struct Tasks {
    pending: Vec<(&'static str, Pending)>,
    running: JoinSet<Ended>,
    spawner: Spawner,
}

/// Spawns short-lived tasks that shutdown waits for (after the named
/// tasks have ended); cheap to clone.
#[derive(Clone, Default)]
pub struct Spawner(TaskTracker);

impl Spawner {
    /// Runs `task` in the background, tracked.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        // The tracker keeps what shutdown needs; the handle is not.
        drop(self.0.spawn(task));
    }

    /// Waits until every task spawned has ended (one spawned meanwhile too).
    async fn wait(&self) {
        self.0.close();
        self.0.wait().await;
    }
}

impl Tasks {
    /// Where short-lived work is spawned.
    pub fn spawner(&self) -> Spawner {
        self.spawner.clone()
    }

    /// Adds a task that runs until shutdown.
    pub fn add(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        self.add_fallible(name, task.map(Ok::<(), String>));
    }

    /// Adds a task that runs until shutdown or fails with an error.
    pub fn add_fallible<E: std::fmt::Display>(
        &mut self,
        name: &'static str,
        task: impl Future<Output = Result<(), E>> + Send + 'static,
    ) {
        let task = task.map(|result| result.map_err(|error| error.to_string()));
        self.pending.push((name, Box::pin(task)));
    }

    /// Starts every task added so far (on the current runtime).
    pub fn start(&mut self) {
        for (name, task) in self.pending.drain(..) {
            self.running.spawn(async move {
                let outcome = match AssertUnwindSafe(task).catch_unwind().await {
                    Ok(outcome) => outcome,
                    Err(panic) => Err(format!("panicked: {}", panic_message(&*panic))),
                };
                Ended { name, outcome }
            });
        }
    }

    /// The next task to end; pending forever while none has (or none runs).
    pub async fn ended(&mut self) -> Ended {
        match self.running.join_next().await {
            Some(Ok(ended)) => ended,
            // Panics are caught inside the task; only an abort gets here.
            Some(Err(error)) => Ended {
                name: "a broker task",
                outcome: Err(error.to_string()),
            },
            None => std::future::pending().await,
        }
    }

    /// Waits for every task to end (after shutdown was signalled): the
    /// named ones first, then the short-lived ones (streams, connections,
    /// revocations in flight). The names of those that failed on the way out.
    pub async fn drain(&mut self) -> Vec<Ended> {
        let mut failed = Vec::new();
        while let Some(joined) = self.running.join_next().await {
            if let Ok(ended) = joined
                && ended.outcome.is_err()
            {
                failed.push(ended);
            }
        }
        self.spawner.wait().await;
        failed
    }
}

/// The text of a panic's payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_task_that_ends_early_is_reported_by_name_whether_it_returns_fails_or_panics() {
        let mut tasks = Tasks::default();
        tasks.add("forever", std::future::pending());
        tasks.add("admin server", async {});
        tasks.start();
        assert_eq!(
            tasks.ended().await,
            Ended {
                name: "admin server",
                outcome: Ok(())
            }
        );

        let mut tasks = Tasks::default();
        tasks.add_fallible("webhook server", async { Err::<(), _>("address in use") });
        tasks.start();
        assert_eq!(
            tasks.ended().await.to_string(),
            "webhook server failed: address in use"
        );

        let mut tasks = Tasks::default();
        tasks.add("lease sweep", async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            panic!("boom");
        });
        tasks.start();
        assert_eq!(
            tasks.ended().await.to_string(),
            "lease sweep failed: panicked: boom"
        );
    }

    #[tokio::test]
    async fn nothing_runs_before_start_and_drain_waits_for_every_task() {
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Tasks::default();
        let flag = ran.clone();
        tasks.add("policy follower", async move {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !ran.load(std::sync::atomic::Ordering::SeqCst),
            "added, not started"
        );
        let spawned = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = spawned.clone();
        tasks.spawner().spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        tasks.start();
        assert!(tasks.drain().await.is_empty());
        assert!(ran.load(std::sync::atomic::Ordering::SeqCst));
        assert!(
            spawned.load(std::sync::atomic::Ordering::SeqCst),
            "drain waits for short-lived tasks too"
        );
    }
}
