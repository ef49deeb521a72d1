//! The live policy: swapped whole and atomically when its files or
//! resources change, so no request ever sees half a policy; an invalid change
//! keeps the last good one (for a resource: its last accepted generation).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use ring::digest;
use tokio_util::sync::CancellationToken;

use super::{
    Policy, PolicyError, read_sources,
    resources::{ClusterResource, ResourceKey, Verdict, compile_all},
};

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
    /// The cluster's resources, when the policy reads them.
    resources: Mutex<Resources>,
    /// What became of each resource, for their status.
    verdicts: tokio::sync::watch::Sender<Arc<Vec<Verdict>>>,
    /// Held by one reload at a time.
    reloading: Mutex<()>,
}

/// The resources last read from the cluster, and each one's last accepted
/// generation (kept in force while a later one is rejected).
#[derive(Default)]
struct Resources {
    current: Vec<ClusterResource>,
    accepted: HashMap<ResourceKey, ClusterResource>,
}

fn fingerprint(texts: &[(String, String)], resources: &[ClusterResource]) -> Vec<u8> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for (name, text) in texts {
        ctx.update(name.as_bytes());
        ctx.update(&[0]);
        ctx.update(text.as_bytes());
        ctx.update(&[0]);
    }
    for resource in resources {
        ctx.update(resource.key.to_string().as_bytes());
        ctx.update(&resource.generation.to_le_bytes());
        ctx.update(resource.created.as_bytes());
        ctx.update(&[0]);
        ctx.update(resource.text.as_bytes());
        ctx.update(&[0]);
    }
    ctx.finish().as_ref().to_vec()
}

/// Compiles files and resources; a rejected resource whose earlier
/// generation was accepted is compiled at that generation instead, and its
/// verdict says so.
fn compile_keeping_accepted(
    texts: &[(String, String)],
    resources: &mut Resources,
) -> Result<(Policy, Vec<Verdict>), PolicyError> {
    let (policy, verdicts) = compile_all(texts, &resources.current)?;
    let mut kept = Vec::new();
    let substituted: Vec<ClusterResource> = resources
        .current
        .iter()
        .zip(&verdicts)
        .map(
            |(resource, verdict)| match resources.accepted.get(&resource.key) {
                Some(earlier)
                    if !verdict.accepted() && earlier.generation != resource.generation =>
                {
                    kept.push(earlier.generation);
                    earlier.clone()
                }
                _ => resource.clone(),
            },
        )
        .collect();
    let (policy, verdicts) = if kept.is_empty() {
        (policy, verdicts)
    } else {
        let (policy, again) = compile_all(texts, &substituted)?;
        let verdicts = verdicts
            .into_iter()
            .zip(again)
            .map(|(first, again)| {
                if first.accepted() || first.generation == again.generation {
                    again
                } else {
                    Verdict {
                        in_force: again.accepted().then_some(again.generation),
                        ..first
                    }
                }
            })
            .collect();
        (policy, verdicts)
    };
    let accepted: HashMap<ResourceKey, ClusterResource> = resources
        .current
        .iter()
        .zip(&verdicts)
        .filter_map(|(resource, verdict)| {
            if verdict.accepted() {
                Some((resource.key.clone(), resource.clone()))
            } else {
                resources
                    .accepted
                    .get(&resource.key)
                    .filter(|_| verdict.in_force.is_some())
                    .map(|earlier| (resource.key.clone(), earlier.clone()))
            }
        })
        .collect();
    resources.accepted = accepted;
    Ok((policy, verdicts))
}

impl PolicyStore {
    /// Loads the policy at `paths` (files or directories) as the broker of
    /// `cluster` applies it ([`Policy::for_cluster`]).
    ///
    /// # Errors
    /// A [`PolicyError`] listing every problem.
    pub fn load(paths: Vec<PathBuf>, cluster: &str) -> Result<Self, PolicyError> {
        Self::load_with(paths, cluster, Vec::new())
    }

    /// Loads the policy at `paths` together with `resources` read from the
    /// cluster (`policy.resources`).
    ///
    /// # Errors
    /// A [`PolicyError`] listing every problem of the files.
    pub fn load_with(
        paths: Vec<PathBuf>,
        cluster: &str,
        resources: Vec<ClusterResource>,
    ) -> Result<Self, PolicyError> {
        let sources = read_sources(&paths)?;
        let mut held = Resources {
            current: resources,
            accepted: HashMap::new(),
        };
        let (policy, verdicts) = compile_keeping_accepted(&sources.texts, &mut held)?;
        let mut policy = policy.for_cluster(cluster);
        policy.files = sources.files;
        Ok(Self {
            paths,
            cluster: cluster.to_owned(),
            current: ArcSwap::from_pointee(Loaded {
                policy,
                generation: 1,
                fingerprint: fingerprint(&sources.texts, &held.current),
            }),
            last_error: Mutex::new(None),
            generation: tokio::sync::watch::Sender::new(1),
            resources: Mutex::new(held),
            verdicts: tokio::sync::watch::Sender::new(Arc::new(verdicts)),
            reloading: Mutex::new(()),
        })
    }

    /// Takes the cluster's resources as now read and reloads.
    ///
    /// # Errors
    /// As [`PolicyStore::reload`].
    pub fn set_resources(&self, resources: Vec<ClusterResource>) -> Result<bool, PolicyError> {
        lock(&self.resources).current = resources;
        self.reload()
    }

    /// What became of each resource at the last successful load, for
    /// their status; changes with every reload that changes it.
    pub fn verdicts(&self) -> tokio::sync::watch::Receiver<Arc<Vec<Verdict>>> {
        self.verdicts.subscribe()
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
        lock(&self.last_error).clone()
    }

    /// Re-reads the files; swaps in the new policy when they changed and are
    /// valid. Returns whether a new policy was swapped in.
    ///
    /// # Errors
    /// A [`PolicyError`] when the changed files are invalid; the last good
    /// policy stays in force.
    pub fn reload(&self) -> Result<bool, PolicyError> {
        let _one_at_a_time = lock(&self.reloading);
        let result = read_sources(&self.paths).and_then(|sources| {
            let mut resources = lock(&self.resources);
            let print = fingerprint(&sources.texts, &resources.current);
            let current = self.current.load();
            if print == current.fingerprint {
                return Ok(false);
            }
            let (policy, verdicts) = compile_keeping_accepted(&sources.texts, &mut resources)?;
            drop(resources);
            self.verdicts.send_replace(Arc::new(verdicts));
            let mut policy = policy.for_cluster(&self.cluster);
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
        *lock(&self.last_error) = result.as_ref().err().map(ToString::to_string);
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
