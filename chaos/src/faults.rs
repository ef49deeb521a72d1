//! The fault matrix: each fault is injected into the running system, held,
//! healed, and then measured: pods that lost a valid credential, leases
//! minted twice, leases left after their pods were deleted, pods that should
//! have started and did not, and the time from the heal until every pod holds
//! a confirmed credential again.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tessera_tests::{Balancer, Env, Postgres, Replica, binary};

use crate::fleet::{Fleet, Kind, NAMESPACE};

/// How long the faults last.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// How long every Vault node stays down.
    pub vault_down: Duration,
    /// How long the Kubernetes API server stays down.
    pub api_down: Duration,
    /// How long other faults are held before they are healed.
    pub hold: Duration,
    /// Longest wait for the fleet to settle after a heal.
    pub recovery_limit: Duration,
    /// Longest wait for leases to be revoked after a heal.
    pub lease_limit: Duration,
}

/// One fault of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Vault's active node is SIGKILLed (a standby takes over).
    VaultActiveKilled,
    /// Every Vault node is down, then back; new pods start meanwhile.
    VaultDown,
    /// A broker replica is SIGKILLed, then replaced.
    ReplicaKilled,
    /// Every replica in turn is SIGTERMed and replaced.
    RollingRestart,
    /// A third of the sidecars are SIGKILLed: half restart in their pod,
    /// half of the pods are deleted and replaced by new ones.
    SidecarsKilled,
    /// PostgreSQL is restarted.
    PostgresRestarted,
    /// The policy is replaced by a broken one, then fixed; a pod starts
    /// while it is broken.
    PolicyBroken,
    /// The handle key is rotated (the old one retired) and every replica
    /// restarted with it.
    HandleKeyRotated,
    /// The Kubernetes API server is down, then back; pods whose sidecars
    /// died with their node meanwhile are deleted once it is back.
    ApiServerDown,
}

impl Fault {
    /// Every fault, in the order they run.
    pub const ALL: [Self; 9] = [
        Self::VaultActiveKilled,
        Self::VaultDown,
        Self::ReplicaKilled,
        Self::RollingRestart,
        Self::SidecarsKilled,
        Self::PostgresRestarted,
        Self::PolicyBroken,
        Self::HandleKeyRotated,
        Self::ApiServerDown,
    ];

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::VaultActiveKilled => "Vault active node SIGKILLed",
            Self::VaultDown => "every Vault node down, then back",
            Self::ReplicaKilled => "a broker replica SIGKILLed",
            Self::RollingRestart => "rolling restart of every replica",
            Self::SidecarsKilled => "sidecars SIGKILLed, pods replaced",
            Self::PostgresRestarted => "PostgreSQL restarted",
            Self::PolicyBroken => "policy broken, then fixed",
            Self::HandleKeyRotated => "handle key rotated",
            Self::ApiServerDown => "Kubernetes API server down, then back",
        }
    }
}

/// What one fault did to the fleet.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The fault.
    pub fault: Fault,
    /// Pods that lost a valid credential before its expiry, with why.
    pub lost: Vec<String>,
    /// Database leases beyond one per live pod once settled.
    pub double_minted: usize,
    /// Deleted pods whose leases were still there (or whose user still
    /// logged in) once settled.
    pub orphaned: Vec<String>,
    /// Pods that should have started and did not.
    pub unstarted: Vec<String>,
    /// From the heal until every pod held a confirmed credential again and
    /// a database pod created at the heal got its user; `None` when that
    /// did not happen within the limit.
    pub recovery: Option<Duration>,
    /// Pods still unsettled at the limit.
    pub unsettled: Vec<String>,
    /// Calls answered other than the design says (e.g. a pod lookup
    /// while the API server is down must fail `UNAVAILABLE`, saying why).
    pub misanswered: Vec<String>,
}

impl Outcome {
    /// Whether every loss column is 0 and the fleet recovered.
    pub fn passed(&self) -> bool {
        self.lost.is_empty()
            && self.double_minted == 0
            && self.orphaned.is_empty()
            && self.unstarted.is_empty()
            && self.misanswered.is_empty()
            && self.recovery.is_some()
    }
}

/// Everything the faults act on.
pub struct World {
    /// OpenBao (3 nodes), the Kubernetes control plane, the policy.
    pub env: Env,
    /// The broker replicas behind the balancer.
    pub replicas: Vec<Replica>,
    /// The Service standing in front of the replicas (held for the run).
    pub _balancer: Balancer,
    /// The pods.
    pub fleet: Arc<Fleet>,
    /// PostgreSQL for the database credentials.
    pub pg: Arc<Postgres>,
    /// The policy the run starts with.
    pub policy: String,
    /// The database role's name in Vault.
    pub db_role: &'static str,
    /// How long faults last.
    pub timing: Timing,
}

impl World {
    /// Injects `fault`, heals it, and measures.
    pub async fn run(&mut self, fault: Fault) -> Outcome {
        let _ = self.fleet.take_lost();
        let mut misanswered = Vec::new();
        let (healed, mut unstarted) = self.inject_and_heal(fault, &mut misanswered).await;
        // Recovered means Vault-backed work is done again, not only that
        // nothing looks wrong yet: a new database pod must get its user.
        self.fleet.add(&self.env, Kind::Db, Some(fault.name()));
        let limit = self.timing.recovery_limit;
        let mut recovery = None;
        while healed.elapsed() < limit {
            if self.fleet.settled() {
                recovery = Some(healed.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let unsettled = if recovery.is_some() {
            Vec::new()
        } else {
            self.fleet.unsettled()
        };
        if fault == Fault::VaultActiveKilled {
            // The cluster whole again for the faults that follow.
            self.env.bao.restart_killed(self.env.dir.path()).await;
        }
        let (double_minted, orphaned) = self.settle_leases().await;
        unstarted.extend(self.fleet.unstarted(fault.name()));
        let lost = self
            .fleet
            .take_lost()
            .into_iter()
            .map(|(pod, why)| format!("{pod}: {why}"))
            .collect();
        Outcome {
            fault,
            lost,
            double_minted,
            orphaned,
            unstarted,
            recovery,
            unsettled,
            misanswered,
        }
    }

    /// The instrument's own check, run last: every database user is
    /// revoked in Vault behind the broker's back, which the watcher must see
    /// as pods losing their credential. Returns how many it saw (0 means
    /// the measurements above could not be trusted).
    pub async fn control(&mut self) -> usize {
        let _ = self.fleet.take_lost();
        self.env.bao.cli(&[
            "lease",
            "revoke",
            "-prefix",
            &format!("database/creds/{}", self.db_role),
        ]);
        let started = Instant::now();
        while self.fleet.lost_so_far() == 0 && started.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        self.fleet.take_lost().len()
    }

    /// Starts a pod while a fault holds.
    fn add_during(&self, kind: Kind, fault: Fault) -> String {
        self.fleet.add(&self.env, kind, Some(fault.name()))
    }

    /// Injects and heals `fault`; returns when recovery is measured from
    /// (the heal; the kill, for a fault that heals itself), and pods that
    /// should have started while it held and did not.
    async fn inject_and_heal(
        &mut self,
        fault: Fault,
        misanswered: &mut Vec<String>,
    ) -> (Instant, Vec<String>) {
        let hold = self.timing.hold;
        let mut unstarted = Vec::new();
        match fault {
            Fault::VaultActiveKilled => {
                // A standby takes over by itself: measured from the kill.
                self.env.bao.kill_active();
                return (Instant::now(), unstarted);
            }
            Fault::VaultDown => {
                self.env.bao.kill_all();
                // New pods during the outage: KV ones start from a
                // replica's last good read; database ones wait for Vault.
                let kv = self.add_during(Kind::Kv, fault);
                self.add_during(Kind::Db, fault);
                tokio::time::sleep(self.timing.vault_down).await;
                if !self.fleet.delivered(&kv) {
                    unstarted.push(format!("{kv} (KV, during the outage)"));
                }
                self.env.bao.restart_killed(self.env.dir.path()).await;
            }
            Fault::ReplicaKilled => {
                self.replicas[1].proc.kill();
                self.add_during(Kind::Db, fault);
                tokio::time::sleep(hold).await;
                self.replicas[1].restart(&self.env, false).await;
            }
            Fault::RollingRestart => {
                for index in 0..self.replicas.len() {
                    self.replicas[index].restart(&self.env, true).await;
                    // The next one only once this one is back (maxUnavailable 0).
                    tokio::time::sleep(hold / 4).await;
                }
            }
            Fault::SidecarsKilled => {
                let killed = self.fleet.kill(|index, _| index % 3 == 0);
                tokio::time::sleep(hold).await;
                for (index, name) in killed.iter().enumerate() {
                    if index % 2 == 0 {
                        self.fleet.restart(&self.env, name);
                    } else {
                        self.fleet.delete(&self.env, name);
                        let kind = self.fleet.kind_of(name).unwrap_or(Kind::Kv);
                        self.add_during(kind, fault);
                    }
                }
            }
            Fault::PostgresRestarted => {
                self.fleet.set_postgres_up(false);
                self.pg.restart();
                self.fleet.set_postgres_up(true);
            }
            Fault::PolicyBroken => {
                self.env.set_policy(
                    "apiVersion: tessera.dev/v1alpha1\nkind: Policy\nbindings: [oops\n",
                );
                tokio::time::sleep(hold / 2).await;
                // The last good policy still serves: a new pod starts.
                self.add_during(Kind::Kv, fault);
                tokio::time::sleep(hold / 2).await;
                self.env.set_policy(&self.policy);
            }
            Fault::ApiServerDown => {
                let gone = self.api_server_down(misanswered).await;
                for name in &gone {
                    self.fleet.delete(&self.env, name);
                }
            }
            Fault::HandleKeyRotated => {
                let retired = self.env.rotate_handle_key();
                for replica in &mut self.replicas {
                    replica.retire_handle_key(&retired, &self.env);
                }
                for index in 0..self.replicas.len() {
                    self.replicas[index].restart(&self.env, true).await;
                    tokio::time::sleep(hold / 4).await;
                }
            }
        }
        (Instant::now(), unstarted)
    }

    /// Stops the API server while the fleet runs; returns the pods whose
    /// sidecars died meanwhile, to be deleted once it is back.
    async fn api_server_down(&self, misanswered: &mut Vec<String>) -> Vec<String> {
        let cluster = self.env.kube.as_ref().expect("chaos runs a cluster");
        // A pod-bound token minted while the API is up, to ask with later.
        cluster.add_pod(NAMESPACE, "probe-0", "probe", &[]);
        let token = self.env.dir.path().join("probe-token");
        std::fs::write(
            &token,
            cluster.token(NAMESPACE, "probe", "tessera", Some("probe-0"), 3600),
        )
        .unwrap();
        // Two database pods lose their node with the control plane.
        let mut dying = 0;
        let gone = self.fleet.kill(|_, pod| {
            let pick = pod.kind == Kind::Db && dying < 2;
            dying += usize::from(pick);
            pick
        });
        cluster.stop_api_server();
        // Past the identity cache (1 s): the pod cannot be looked up now.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let asked = std::process::Command::new(binary("tessera-sidecar"))
            .args(["whoami", "--broker", self.fleet.broker(), "--ca-file"])
            .arg(self.env.ca_file())
            .arg("--token-file")
            .arg(&token)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&asked.stderr);
        if asked.status.code() != Some(69) || !said.contains("Kubernetes API") {
            misanswered.push(format!(
                "a pod lookup while the API server is down: exit {:?}, {}",
                asked.status.code(),
                said.trim()
            ));
        }
        tokio::time::sleep(self.timing.api_down.saturating_sub(Duration::from_secs(3))).await;
        cluster.start_api_server();
        gone
    }

    /// Waits until the database leases are one per live pod and no deleted
    /// pod keeps a lease; returns (leases beyond that, deleted pods whose
    /// leases or users remain).
    async fn settle_leases(&self) -> (usize, Vec<String>) {
        let started = Instant::now();
        loop {
            let leases = self
                .env
                .bao
                .leases(&format!("database/creds/{}", self.db_role))
                .len();
            let live = self.fleet.live_db_pods();
            let orphaned = self.fleet.orphaned_logins();
            let extra = leases.saturating_sub(live);
            if (extra == 0 && orphaned.is_empty()) || started.elapsed() > self.timing.lease_limit {
                let records: Vec<String> = self
                    .fleet
                    .deleted_uids()
                    .into_iter()
                    .filter(|uid| !self.env.bao.lease_records(uid).is_empty())
                    .map(|uid| format!("records of pod {uid}"))
                    .collect();
                let double = extra.saturating_sub(orphaned.len());
                return (double, orphaned.into_iter().chain(records).collect());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
