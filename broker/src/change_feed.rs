//! Changes pushed from Vault without Enterprise: Vault's audit device (an
//! `http` device in OpenBao, a `socket` device in Vault) sends the broker
//! every request it audits. The broker reads paths and operations only
//! (values in audit entries are HMACed and never used), recognises writes
//! and deletes of KV secrets the policy serves, and has them read again at
//! once. A forged or replayed entry can at most cause a re-read. A canary
//! request of the broker's own must come back through the feed: when it
//! does not, the feed is silent, and polling returns from its long backstop
//! to the short interval (the `tessera_change_feed_up` gauge, an alert).

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    StartError,
    feed::{ChangeFeedState, FEED_CHECK, Feeds},
    membership::Peers,
    metrics::Metrics,
    secret::Secret,
    vault::Vault,
};

/// `vault.changeFeed:`: where the audit device posts, and the polling it
/// allows.
#[derive(Clone, Debug)]
pub struct ChangeFeedSettings {
    /// Where the feed listens (plain HTTP: put it on a loopback or private
    /// address, or behind the Vault operator's TLS proxy).
    pub listen: SocketAddr,
    /// A file with the bearer token the audit device sends (its `headers`
    /// option); any caller is taken when absent.
    pub token_file: Option<PathBuf>,
    /// The poll interval while the feed is up: a backstop.
    pub backstop: Duration,
    /// How often a canary request checks that the feed still arrives.
    pub check_interval: Duration,
}

#[derive(Clone)]
struct Feed {
    feeds: Arc<Feeds>,
    state: Arc<ChangeFeedState>,
    metrics: Arc<Metrics>,
    token: Option<Arc<Secret>>,
}

/// Receives Vault's audit entries on `listener` and checks with a canary
/// that they keep coming, until `shutdown`.
///
/// # Errors
/// The token file cannot be read, or the server fails.
pub async fn serve_change_feed(
    listener: TcpListener,
    settings: ChangeFeedSettings,
    (feeds, state): (Arc<Feeds>, Arc<ChangeFeedState>),
    (vault, records_mount): (Arc<Vault>, String),
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let token = match &settings.token_file {
        Some(path) => {
            // Read into a buffer cleared on drop; only the trimmed token is kept.
            let raw =
                zeroize::Zeroizing::new(std::fs::read(path).map_err(|error| {
                    StartError::ChangeFeed(format!("{}: {error}", path.display()))
                })?);
            Some(Arc::new(Secret::new(raw.trim_ascii().to_vec())))
        }
        None => None,
    };
    let peers = feeds.peers().cloned();
    let feed = Feed {
        feeds,
        state: state.clone(),
        metrics: metrics.clone(),
        token,
    };
    tracing::info!(address = %settings.listen, backstop = ?settings.backstop, "Vault change feed listening (POST /v1/audit)");
    let app = Router::new()
        .route("/v1/audit", post(receive))
        .with_state(feed);
    let serving =
        axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    let checking = check(
        (vault, records_mount),
        (state, peers),
        metrics,
        settings.check_interval,
        shutdown,
    );
    // The server ends at shutdown (the checks with it) or when it fails.
    tokio::select! {
        served = serving => served.map_err(|error| StartError::ChangeFeed(error.to_string())),
        () = checking => Ok(()),
    }
}

/// One post of the audit device: one entry, or several, one per line.
async fn receive(State(feed): State<Feed>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if let Some(token) = &feed.token {
        let presented = headers
            .get("authorization")
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        // Digests compared: the time taken says nothing of the token.
        let digest = |bytes: &[u8]| ring::digest::digest(&ring::digest::SHA256, bytes);
        if digest(presented).as_ref() != digest(token.expose_secret()).as_ref() {
            return StatusCode::UNAUTHORIZED;
        }
    }
    for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        if let Ok(entry) = serde_json::from_slice::<Value>(line) {
            take(&feed, &entry);
        }
    }
    StatusCode::NO_CONTENT
}

/// One audit entry: a response to a write or delete names the secrets to
/// read again; the canary's read says the feed arrives.
fn take(feed: &Feed, entry: &Value) {
    if entry["type"] != "response" {
        return;
    }
    let request = &entry["request"];
    let path = request["path"].as_str().unwrap_or_default();
    if feed.state.canary_arrived(path, false) {
        return;
    }
    let writes = matches!(
        request["operation"].as_str(),
        Some("create" | "update" | "patch" | "delete")
    );
    if !writes || entry.get("error").is_some_and(|e| !e.is_null() && e != "") {
        return;
    }
    let namespace = request["namespace"]["path"]
        .as_str()
        .map(|ns| ns.trim_end_matches('/'))
        .filter(|ns| !ns.is_empty());
    let woken = feed.feeds.nudge(path, namespace);
    if woken > 0 {
        tracing::debug!(
            path,
            woken,
            "Vault's change feed named a KV secret; reading it again"
        );
        feed.metrics.change_feed_rereads.inc_by(woken as u64);
    }
}

/// Every `interval`, a canary read the feed must bring back: up while it
/// does, silent (short polling again) when it does not. Among `peers` the
/// owner of [`FEED_CHECK`] alone sends canaries and tells the others what
/// it found: more replicas cost Vault no more requests.
async fn check(
    (vault, records_mount): (Arc<Vault>, String),
    (state, peers): (Arc<ChangeFeedState>, Option<Arc<Peers>>),
    metrics: Arc<Metrics>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let checks = peers.as_ref().is_none_or(|peers| peers.owns(FEED_CHECK));
        if checks {
            let path = state.new_canary();
            let below = path
                .strip_prefix(&format!("{records_mount}/"))
                .unwrap_or(&path);
            // The answer does not matter (there is nothing there): its audit
            // entry does, on whichever replica's feed it lands.
            let _ = vault.kv1_read(&records_mount, below).await;
            metrics.change_feed_canaries.inc();
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let up = if checks {
            let came = state.canary_came();
            state.tell_peers(came);
            came
        } else {
            // The checking replica's word, one check late at most.
            state.owner_says_up(interval * 2)
        };
        metrics.change_feed_up.set(i64::from(up));
        if state.set_up(up) {
            if up {
                tracing::info!(
                    "Vault's change feed arrives; polling KV secrets at the backstop interval"
                );
            } else {
                tracing::warn!(
                    "Vault's change feed is silent (the canary request did not come back); polling KV secrets at the short interval"
                );
            }
        }
    }
}
