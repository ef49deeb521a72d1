//! `scripts/chaos`: the fault matrix on this machine, with real processes: a
//! 3-node OpenBao cluster (Raft) behind a proxy to its active node, 3 broker
//! replicas behind a loopback TCP balancer (standing in for the Service), a
//! private PostgreSQL, the Kubernetes API stand-in (no API server can be had
//! here) and a fleet of sidecars (KV, database, PKI). Prints a table and
//! `N passed, M failed`; exits non-zero when a fault failed. The full run
//! writes docs/RELIABILITY.md; `--quick` is shorter and writes nothing.
// A harness, like the tests: a broken assumption panics and fails the run.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)]

mod faults;
mod fleet;
mod report;

use std::{sync::Arc, time::Duration};

use faults::{Fault, Timing, World};
use fleet::{Fleet, Kind};
use tessera_tests::{Balancer, Env, EnvOptions, Postgres, random_string, workspace_root};

/// The database role the fleet's users are made from.
const DB_ROLE: &str = "chaos";

struct Sizes {
    pods_per_kind: usize,
    timing: Timing,
    /// Database credential lifetime (the role's default TTL) and max TTL.
    db_ttl: (&'static str, &'static str),
}

impl Sizes {
    fn quick() -> Self {
        Self {
            pods_per_kind: 2,
            timing: Timing {
                vault_down: Duration::from_secs(15),
                api_down: Duration::from_secs(15),
                hold: Duration::from_secs(4),
                recovery_limit: Duration::from_secs(60),
                lease_limit: Duration::from_secs(30),
            },
            db_ttl: ("10m", "1h"),
        }
    }

    fn full() -> Self {
        Self {
            pods_per_kind: 8,
            timing: Timing {
                vault_down: Duration::from_secs(120),
                api_down: Duration::from_secs(60),
                hold: Duration::from_secs(10),
                recovery_limit: Duration::from_secs(120),
                lease_limit: Duration::from_secs(60),
            },
            // Longer than the Vault outage, so the run tells a lost
            // credential from an expired one; renewed every 2.5 minutes,
            // under the faults. (Rotation under faults: the leases tests.)
            db_ttl: ("5m", "8m"),
        }
    }
}

fn policy(db_ttl: &str) -> String {
    format!(
        "apiVersion: tessera.dev/v1alpha1
kind: Policy
bindings:
  - name: kv
    subjects: [{{ namespace: shop, serviceAccount: \"kv-*\" }}]
    source: {{ kv2: {{ mount: secret, path: shop/config }} }}
  - name: db
    subjects: [{{ namespace: shop, serviceAccount: \"db-*\" }}]
    source: {{ database: {{ mount: database, role: {DB_ROLE} }} }}
    ttl: {db_ttl}
    renewFraction: 0.5
    overlap: 20s
  - name: tls
    subjects: [{{ namespace: shop, serviceAccount: \"pki-*\" }}]
    source: {{ pki: {{ mount: pki, role: pods, commonName: \"{{{{ pod }}}}.shop\" }} }}
    ttl: 10m
"
    )
}

async fn setup(sizes: &Sizes) -> World {
    let pg = Arc::new(Postgres::start());
    let policy = policy(sizes.db_ttl.0);
    let mut env = Env::start_with(
        &policy,
        EnvOptions {
            vault_cluster: true,
            kubernetes: true,
            pod_lookup: true,
            rust_log: "info".to_owned(),
            poll: "1s",
            sweep_interval: "5s",
            ..EnvOptions::default()
        },
    )
    .await;
    env.bao
        .put(
            "shop/config",
            &serde_json::json!({ "value": random_string(16) }),
        )
        .await;
    env.bao
        .database_role(&pg, DB_ROLE, sizes.db_ttl.0, sizes.db_ttl.1);
    env.bao.pki_role("1h");
    // The environment's own broker steps aside: the fleet is served by
    // three replicas of the same configuration.
    env.broker.kill();
    let mut replicas = Vec::new();
    for name in ["a", "b", "c"] {
        replicas.push(env.start_replica(name).await);
    }
    let balancer = Balancer::start(replicas.iter().map(|r| r.port).collect());
    let fleet = Fleet::new(pg.clone(), balancer.uri.clone());
    for _ in 0..sizes.pods_per_kind {
        for kind in Kind::ALL {
            fleet.add(&env, kind, None);
        }
    }
    World {
        env,
        replicas,
        _balancer: balancer,
        fleet,
        pg,
        policy,
        db_role: DB_ROLE,
        timing: sizes.timing,
    }
}

fn describe(sizes: &Sizes) -> String {
    format!(
        "- OpenBao: 3 nodes with integrated (Raft) storage on loopback, initialised, unsealed and joined\n  \
by script; clients reach the active node through a loopback proxy (the `openbao-active` Service).\n\
- Broker: 3 replicas (the debug build) behind a round-robin loopback TCP balancer (the Service),\n  \
pod lookup and deletion watch against a real kube-apiserver (scripts/cluster), sweep every 5 s.\n\
- PostgreSQL: a private cluster with password authentication; database users from Vault's\n  \
database engine (role TTL {}, max {}), renewed at half their life, 20 s overlap on rotation.\n\
- Fleet: {} sidecars ({} each of KV, database, PKI), each its own pod and tmpfs volume, plus the\n  \
pods the faults create. Vault down for {} s, the API server for {} s; other faults held {} s.",
        sizes.db_ttl.0,
        sizes.db_ttl.1,
        sizes.pods_per_kind * 3,
        sizes.pods_per_kind,
        sizes.timing.vault_down.as_secs(),
        sizes.timing.api_down.as_secs(),
        sizes.timing.hold.as_secs(),
    )
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> std::process::ExitCode {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes = if quick { Sizes::quick() } else { Sizes::full() };
    println!(
        "starting the cluster, the replicas and {} pods",
        sizes.pods_per_kind * 3
    );
    let mut world = setup(&sizes).await;
    let watcher = world.fleet.watch();
    let started = std::time::Instant::now();
    while !world.fleet.settled() {
        if started.elapsed() > Duration::from_secs(90) {
            eprintln!("the fleet never settled: {:?}", world.fleet.unsettled());
            return std::process::ExitCode::FAILURE;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "{} pods hold their credentials after {:.1} s",
        world.fleet.size(),
        started.elapsed().as_secs_f64()
    );
    let mut outcomes = Vec::new();
    for fault in Fault::ALL {
        println!("fault: {}", fault.name());
        let outcome = world.run(fault).await;
        println!(
            "  {} (recovered in {})",
            if outcome.passed() { "pass" } else { "FAIL" },
            outcome
                .recovery
                .map_or_else(|| "-".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()))
        );
        outcomes.push(outcome);
    }
    let seen = world.control().await;
    world.fleet.stop();
    let _ = watcher.join();
    println!("\n{}", report::table(&outcomes));
    print!("{}", report::details(&outcomes));
    println!(
        "instrument check: every database user revoked behind the broker's back; the watcher saw {seen} pod(s) lose a credential"
    );
    println!("{}", report::summary(&outcomes));
    if seen == 0 {
        eprintln!("the watcher missed a deliberate loss: the table above cannot be trusted");
        return std::process::ExitCode::FAILURE;
    }
    if !quick {
        let path = workspace_root().join("docs/RELIABILITY.md");
        if let Err(error) = report::write(&path, &outcomes, &describe(&sizes), seen) {
            eprintln!("cannot write {}: {error}", path.display());
            return std::process::ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    if outcomes.iter().all(faults::Outcome::passed) {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
