//! The live policy: swapped whole and atomically when its files change, so no
//! request ever sees half a policy; an invalid change keeps the last good one.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use ring::digest;
use tokio_util::sync::CancellationToken;

use super::{Policy, PolicyError, read_sources};

/// One loaded policy and its generation (1 for the first load, +1 per change).
#[derive(Debug)]
pub struct Loaded {
    /// The compiled policy, all files together.
    pub policy: Policy,
    /// Increases with every successful reload.
    pub generation: u64,
    fingerprint: Vec<u8>,
}

/// The current policy plus what the last reload said.
pub struct PolicyStore {
    paths: Vec<PathBuf>,
    /// The cluster whose subjects apply.
    cluster: String,
    current: ArcSwap<Loaded>,
    last_error: Mutex<Option<String>>,
    /// The generation in force, for those who wait for a change.
    generation: tokio::sync::watch::Sender<u64>,
}

fn fingerprint(texts: &[(String, String)]) -> Vec<u8> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for (name, text) in texts {
        ctx.update(name.as_bytes());
        ctx.update(&[0]);
        ctx.update(text.as_bytes());
        ctx.update(&[0]);
    }
    ctx.finish().as_ref().to_vec()
}

impl PolicyStore {
    /// Loads the policy at `paths` (files or directories) as the broker of
    /// `cluster` applies it ([`Policy::for_cluster`]).
    ///
    /// # Errors
    /// A [`PolicyError`] listing every problem.
    pub fn load(paths: Vec<PathBuf>, cluster: &str) -> Result<Self, PolicyError> {
        let sources = read_sources(&paths)?;
        let mut policy = Policy::parse_many(&sources.texts)?.for_cluster(cluster);
        policy.files = sources.files;
        Ok(Self {
            paths,
            cluster: cluster.to_owned(),
            current: ArcSwap::from_pointee(Loaded {
                policy,
                generation: 1,
                fingerprint: fingerprint(&sources.texts),
            }),
            last_error: Mutex::new(None),
            generation: tokio::sync::watch::Sender::new(1),
        })
    }

    /// Follows the generation in force: the receiver sees each new policy
    /// (open streams wait on it instead of polling).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The policy to use for one whole request.
    pub fn current(&self) -> Arc<Loaded> {
        self.current.load_full()
    }

    /// The error of the last reload attempt, if it failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the files; swaps in the new policy when they changed and are
    /// valid. Returns whether a new policy was swapped in.
    ///
    /// # Errors
    /// A [`PolicyError`] when the changed files are invalid; the last good
    /// policy stays in force.
    pub fn reload(&self) -> Result<bool, PolicyError> {
        let result = read_sources(&self.paths).and_then(|sources| {
            let print = fingerprint(&sources.texts);
            let current = self.current.load();
            if print == current.fingerprint {
                return Ok(false);
            }
            let mut policy = Policy::parse_many(&sources.texts)?.for_cluster(&self.cluster);
            policy.files = sources.files;
            let generation = current.generation + 1;
            self.current.store(Arc::new(Loaded {
                policy,
                generation,
                fingerprint: print,
            }));
            self.generation.send_replace(generation);
            Ok(true)
        });
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
            result.as_ref().err().map(ToString::to_string);
        result
    }

    /// Polls the files every `interval` until `shutdown`. Polling (not inotify)
    /// follows a ConfigMap's `..data` symlink swap without special cases.
    pub async fn follow(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            match self.reload() {
                Ok(true) => {
                    let loaded = self.current();
                    tracing::info!(
                        generation = loaded.generation,
                        bindings = loaded.policy.bindings.len(),
                        "policy reloaded"
                    );
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::error!(%error, generation = self.current().generation, "policy reload failed; keeping the last good policy");
                }
            }
        }
    }
}
