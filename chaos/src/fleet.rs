//! The pods of the run: each a real sidecar process writing one binding (KV,
//! database or PKI) into its own tmpfs directory, and a watcher that checks,
//! twice a second, that every pod still holds a valid credential: its files
//! are there, not expired, and a database credential still logs in.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use tessera_sidecar::status::Status;
use tessera_tests::{Env, Postgres, Proc, field, pod_uid};

/// The namespace every pod runs in.
pub const NAMESPACE: &str = "shop";

/// What a pod asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A KV v2 secret.
    Kv,
    /// A dynamic PostgreSQL user.
    Db,
    /// A PKI certificate.
    Pki,
}

impl Kind {
    /// Every kind, in the fleet's order.
    pub const ALL: [Self; 3] = [Self::Kv, Self::Db, Self::Pki];

    /// The policy binding the pod's service account is granted.
    pub fn binding(self) -> &'static str {
        match self {
            Self::Kv => "kv",
            Self::Db => "db",
            Self::Pki => "tls",
        }
    }

    /// The file that proves the credential is there.
    fn probe(self) -> &'static str {
        match self {
            Self::Kv => "value",
            Self::Db => "password",
            Self::Pki => "certificate",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Self::Kv => "kv",
            Self::Db => "db",
            Self::Pki => "pki",
        }
    }
}

/// One pod: its identity, volume and sidecar.
pub struct Pod {
    /// The service account (the pod is `<name>-0`).
    pub name: String,
    /// What it asks for.
    pub kind: Kind,
    /// The pod UID its token names.
    pub uid: String,
    /// Its in-memory volume.
    pub out: tempfile::TempDir,
    token: PathBuf,
    sidecar: Option<Proc>,
    /// Deleted from the API server (its leases must go).
    pub deleted: bool,
    /// The fault during which it was created, if any.
    pub born_in: Option<String>,
    /// Files were written at least once.
    pub delivered: bool,
    /// The last database credential seen in its files.
    pub last_login: Option<(String, String)>,
}

impl Pod {
    /// Whether its sidecar runs.
    pub fn running(&self) -> bool {
        self.sidecar.is_some()
    }

    /// The pod did not lose a valid credential: its files are there and,
    /// until the credential's expiry, a database user (while PostgreSQL
    /// runs) logs in. An expired credential is not a loss (Vault may end
    /// it); [`Pod::settled`] asks for a live one.
    fn holds_valid(&mut self, pg: &Postgres, pg_up: bool) -> Result<(), String> {
        let binding = self.kind.binding();
        let Some(probe) = field(self.out.path(), binding, self.kind.probe()) else {
            return if self.delivered {
                Err("its files are gone".to_owned())
            } else {
                Ok(())
            };
        };
        if probe.is_empty() {
            return Err("an empty file".to_owned());
        }
        self.delivered = true;
        let status = Status::read(self.out.path());
        let not_after = status
            .bindings
            .get(binding)
            .and_then(|s| s.not_after.as_deref())
            .and_then(|t| humantime::parse_rfc3339(t).ok());
        if not_after.is_some_and(|t| t <= SystemTime::now()) {
            return Ok(());
        }
        if self.kind == Kind::Db {
            let user = field(self.out.path(), binding, "username").unwrap_or_default();
            self.last_login = Some((user.clone(), probe.clone()));
            if pg_up && !pg.can_login(&user, &probe) {
                // Read again: a rotation may have swapped the files between
                // the two reads.
                let now = field(self.out.path(), binding, "username").unwrap_or_default();
                if now == user {
                    return Err(format!("PostgreSQL refuses its user {user}"));
                }
            }
        }
        Ok(())
    }

    /// Delivered, valid, and confirmed: the sidecar reaches a broker that
    /// reaches Vault.
    fn settled(&mut self, pg: &Postgres) -> bool {
        if !self.running() || self.holds_valid(pg, true).is_err() || !self.delivered {
            return false;
        }
        Status::read(self.out.path())
            .bindings
            .get(self.kind.binding())
            .is_some_and(|s| {
                let expired = s
                    .not_after
                    .as_deref()
                    .and_then(|t| humantime::parse_rfc3339(t).ok())
                    .is_some_and(|t| t <= SystemTime::now());
                !s.stale && !s.last_known_good && !expired
            })
    }
}

/// Every pod of the run and what the watcher found.
pub struct Fleet {
    pods: Mutex<Vec<Pod>>,
    /// Pods found without a valid credential during the current fault:
    /// pod name to the first reason.
    lost: Mutex<BTreeMap<String, String>>,
    pg: Arc<Postgres>,
    pg_up: AtomicBool,
    stop: AtomicBool,
    broker: String,
    next: Mutex<usize>,
}

impl Fleet {
    /// A fleet whose sidecars dial `broker` (the balancer).
    pub fn new(pg: Arc<Postgres>, broker: String) -> Arc<Self> {
        Arc::new(Self {
            pods: Mutex::default(),
            lost: Mutex::default(),
            pg,
            pg_up: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            broker,
            next: Mutex::new(0),
        })
    }

    /// The address the sidecars dial (the balancer standing in for the Service).
    pub fn broker(&self) -> &str {
        &self.broker
    }

    /// Creates a pod of `kind` in the API server and starts its sidecar.
    pub fn add(&self, env: &Env, kind: Kind, born_in: Option<&str>) -> String {
        let name = {
            let mut next = self.next.lock().unwrap();
            *next += 1;
            format!("{}-{}", kind.prefix(), *next)
        };
        // The pod in the real API server; its token is bound to it.
        let uid = match &env.kube {
            Some(cluster) => cluster.add_pod(NAMESPACE, &format!("{name}-0"), &name, &[]),
            None => pod_uid(NAMESPACE, &name),
        };
        let out = env.tmpfs_out();
        let token = env.token_file(NAMESPACE, &name);
        let sidecar = env.sidecar_run_at(&self.broker, &token, out.path(), &[kind.binding()]);
        self.pods.lock().unwrap().push(Pod {
            name: name.clone(),
            kind,
            uid,
            out,
            token,
            sidecar: Some(sidecar),
            deleted: false,
            born_in: born_in.map(str::to_owned),
            delivered: false,
            last_login: None,
        });
        name
    }

    /// SIGKILLs the sidecars of the pods `pick` selects; returns their names.
    pub fn kill(&self, mut pick: impl FnMut(usize, &Pod) -> bool) -> Vec<String> {
        let mut pods = self.pods.lock().unwrap();
        let mut killed = Vec::new();
        for (index, pod) in pods.iter_mut().enumerate() {
            if pod.running() && !pod.deleted && pick(index, pod) {
                if let Some(mut sidecar) = pod.sidecar.take() {
                    sidecar.kill();
                }
                killed.push(pod.name.clone());
            }
        }
        killed
    }

    /// Starts the sidecar of pod `name` again in the same pod (its volume,
    /// with the handles, kept), as the kubelet restarts a container.
    pub fn restart(&self, env: &Env, name: &str) {
        let mut pods = self.pods.lock().unwrap();
        if let Some(pod) = pods.iter_mut().find(|p| p.name == name) {
            let binding = pod.kind.binding();
            pod.sidecar =
                Some(env.sidecar_run_at(&self.broker, &pod.token, pod.out.path(), &[binding]));
        }
    }

    /// Deletes pod `name` from the API server (its sidecar already dead).
    pub fn delete(&self, env: &Env, name: &str) {
        let mut pods = self.pods.lock().unwrap();
        if let Some(pod) = pods.iter_mut().find(|p| p.name == name) {
            if let Some(cluster) = &env.kube {
                cluster.delete_pod(NAMESPACE, &format!("{name}-0"));
            }
            pod.deleted = true;
        }
    }

    /// The kind of pod `name`.
    pub fn kind_of(&self, name: &str) -> Option<Kind> {
        self.pods
            .lock()
            .unwrap()
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.kind)
    }

    /// Says whether PostgreSQL is up (logins are checked only then).
    pub fn set_postgres_up(&self, up: bool) {
        self.pg_up.store(up, Ordering::SeqCst);
    }

    /// Checks every live pod twice a second until [`Fleet::stop`].
    pub fn watch(self: &Arc<Self>) -> std::thread::JoinHandle<()> {
        let fleet = self.clone();
        std::thread::spawn(move || {
            while !fleet.stop.load(Ordering::SeqCst) {
                let pg_up = fleet.pg_up.load(Ordering::SeqCst);
                let mut found = Vec::new();
                for pod in fleet.pods.lock().unwrap().iter_mut().filter(|p| !p.deleted) {
                    if let Err(reason) = pod.holds_valid(&fleet.pg, pg_up) {
                        found.push((pod.name.clone(), reason));
                    }
                }
                let mut lost = fleet.lost.lock().unwrap();
                for (name, reason) in found {
                    lost.entry(name).or_insert(reason);
                }
                drop(lost);
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    }

    /// Stops the watcher.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// How many pods lost a valid credential since [`Fleet::take_lost`].
    pub fn lost_so_far(&self) -> usize {
        self.lost.lock().unwrap().len()
    }

    /// The pods that lost a valid credential since the last call.
    pub fn take_lost(&self) -> BTreeMap<String, String> {
        std::mem::take(&mut *self.lost.lock().unwrap())
    }

    /// Whether every live pod holds a confirmed, valid credential.
    pub fn settled(&self) -> bool {
        self.pods
            .lock()
            .unwrap()
            .iter_mut()
            .filter(|p| !p.deleted)
            .all(|p| p.settled(&self.pg))
    }

    /// Pods that are not settled, for the report.
    pub fn unsettled(&self) -> Vec<String> {
        self.pods
            .lock()
            .unwrap()
            .iter_mut()
            .filter_map(|p| (!p.deleted && !p.settled(&self.pg)).then(|| p.name.clone()))
            .collect()
    }

    /// Pods born in `fault` that never got files.
    pub fn unstarted(&self, fault: &str) -> Vec<String> {
        self.pods
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.born_in.as_deref() == Some(fault) && !p.delivered && !p.deleted)
            .map(|p| p.name.clone())
            .collect()
    }

    /// Whether pod `name` has had its files written.
    pub fn delivered(&self, name: &str) -> bool {
        self.pods
            .lock()
            .unwrap()
            .iter_mut()
            .find(|p| p.name == name)
            .is_some_and(|p| {
                p.delivered || field(p.out.path(), p.kind.binding(), p.kind.probe()).is_some()
            })
    }

    /// Live database pods.
    pub fn live_db_pods(&self) -> usize {
        self.pods
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.kind == Kind::Db && !p.deleted)
            .count()
    }

    /// Deleted database pods whose last credential still logs in.
    pub fn orphaned_logins(&self) -> Vec<String> {
        self.pods
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.kind == Kind::Db && p.deleted)
            .filter(|p| {
                p.last_login
                    .as_ref()
                    .is_some_and(|(user, password)| self.pg.can_login(user, password))
            })
            .map(|p| p.name.clone())
            .collect()
    }

    /// The UIDs of deleted pods, to look for their lease records.
    pub fn deleted_uids(&self) -> Vec<String> {
        self.pods
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.deleted)
            .map(|p| p.uid.clone())
            .collect()
    }

    /// How many pods run.
    pub fn size(&self) -> usize {
        self.pods
            .lock()
            .unwrap()
            .iter()
            .filter(|p| !p.deleted)
            .count()
    }
}
