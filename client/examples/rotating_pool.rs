//! A PostgreSQL pool that follows Tessera's rotations: new connections always
//! use the current credential, and connections opened with a superseded one
//! are closed as soon as its successor arrives, inside the broker's overlap
//! (the old user stays valid for the binding's `overlap` after that). A
//! query already running on an old connection finishes; no query starts on
//! one.
//!
//! It runs a workload, one query every 20 ms for `TESSERA_POOL_SECONDS`
//! seconds, and prints `queries=N failed=M users=a,b,...` (the database users
//! it saw, in order):
//!
//! ```text
//! TESSERA_BROKER=https://tessera.tessera.svc:8443 TESSERA_CA_FILE=... TESSERA_TOKEN_FILE=... \
//! TESSERA_POOL_BINDING=orders-db TESSERA_POOL_DB="host=db port=5432 dbname=orders" \
//!     cargo run -p tessera-client --example rotating_pool
//! ```

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use tessera_client::{Client, Credential};
use tokio::sync::watch;

/// Connections by the credential version they were opened with.
struct Pool {
    base: tokio_postgres::Config,
    current: watch::Receiver<Option<Credential>>,
    idle: Vec<(String, tokio_postgres::Client)>,
}

impl Pool {
    /// A connection opened with the current credential.
    async fn get(&mut self) -> Result<(String, tokio_postgres::Client), String> {
        let credential = self.current.borrow().clone().ok_or("no credential yet")?;
        // Superseded connections go now, while their user is still valid.
        self.idle
            .retain(|(version, _)| *version == credential.version);
        if let Some(connection) = self.idle.pop() {
            return Ok(connection);
        }
        let mut config = self.base.clone();
        config
            .user(credential.text("username").unwrap_or_default())
            .password(credential.text("password").unwrap_or_default());
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        tokio::spawn(connection);
        Ok((credential.version, client))
    }

    /// Gives a connection back; kept only while its credential is current.
    fn put(&mut self, version: String, client: tokio_postgres::Client) {
        let current = self.current.borrow().as_ref().map(|c| c.version.clone());
        if current.as_deref() == Some(version.as_str()) {
            self.idle.push((version, client));
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let binding = std::env::var("TESSERA_POOL_BINDING")?;
    let base: tokio_postgres::Config = std::env::var("TESSERA_POOL_DB")?.parse()?;
    let seconds: u64 = std::env::var("TESSERA_POOL_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let client = Client::from_env()?;

    // Follow the binding: every rotation replaces the current credential.
    let (tx, rx) = watch::channel(None);
    let mut changes = Box::pin(client.watch(&[binding.as_str()]));
    let followed = binding.clone();
    tokio::spawn(async move {
        while let Some(set) = changes.next().await {
            match set {
                Ok(set) => {
                    let _ = tx.send(set.get(&followed).cloned());
                }
                Err(error) => {
                    eprintln!("watch ended: {error}");
                    return;
                }
            }
        }
    });
    let mut current = rx.clone();
    current.wait_for(Option::is_some).await?;

    let mut pool = Pool {
        base,
        current: rx,
        idle: Vec::new(),
    };
    let (mut queries, mut failed, mut users) = (0u64, 0u64, Vec::<String>::new());
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        queries += 1;
        match pool.get().await {
            Ok((version, connection)) => {
                match connection.query_one("SELECT current_user::text", &[]).await {
                    Ok(row) => {
                        let user: String = row.get(0);
                        if users.last() != Some(&user) {
                            users.push(user);
                        }
                        pool.put(version, connection);
                    }
                    Err(error) => {
                        failed += 1;
                        eprintln!("query failed: {error}");
                    }
                }
            }
            Err(error) => {
                failed += 1;
                eprintln!("no connection: {error}");
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "queries={queries} failed={failed} users={}",
        users.join(",")
    );
    Ok(())
}
