//! The server side of the peer channel: mutual TLS that takes only peer
//! certificates (the peer CA's), and `Follow` streams of this replica's KV
//! copies: every one it holds, then each change it reads from Vault.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use tessera_proto::peer::v1::{
    FollowRequest, KvCopy, KvSource,
    peer_server::{Peer, PeerServer},
};
use tokio::{net::TcpListener, sync::broadcast::error::RecvError};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::PeerSettings;
use crate::{
    StartError,
    feed::{Fed, FeedNote, Feeds},
    listener::{self, ConnectionLimits},
    policy::Kv2Source,
    tasks::Spawner,
    tls::{self, TlsSettings},
};

/// Serves the peer channel on `listener` until `shutdown`.
///
/// # Errors
/// The peer certificate or CA cannot be loaded, or the listening socket is gone.
pub async fn serve_peers(
    listener: TcpListener,
    settings: PeerSettings,
    feeds: Arc<Feeds>,
    (limits, spawner): (ConnectionLimits, Spawner),
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let (config, _) = tls::server_config(&TlsSettings {
        cert: settings.cert.clone(),
        key: settings.key.clone(),
        client_ca: Some(settings.ca.clone()),
    })?;
    tracing::info!(address = %settings.listen, peers = ?settings.addresses, "peer channel listening (mutual TLS, peer CA only)");
    let gate = listener::Gate::new("peers", limits);
    let incoming = tls::incoming(
        listener,
        config,
        gate.clone(),
        spawner.clone(),
        shutdown.clone(),
    );
    let service = PeerService {
        feeds,
        spawner,
        shutdown: shutdown.clone(),
    };
    let serving = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(listener::HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(listener::HTTP2_KEEPALIVE_TIMEOUT))
        .add_service(PeerServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned());
    tokio::select! {
        served = serving => served?,
        error = gate.broken() => return Err(StartError::Listener(error)),
    }
    Ok(())
}

struct PeerService {
    feeds: Arc<Feeds>,
    spawner: Spawner,
    shutdown: CancellationToken,
}

type CopyStream = Pin<Box<dyn Stream<Item = Result<KvCopy, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for PeerService {
    type FollowStream = CopyStream;

    async fn follow(
        &self,
        request: Request<FollowRequest>,
    ) -> Result<Response<Self::FollowStream>, Status> {
        let follower = crate::text::printable(&request.get_ref().replica);
        tracing::info!(%follower, "a peer follows this replica's KV copies");
        // Subscribed before the copies are taken: nothing falls between.
        let mut changes = self.feeds.changes();
        let mut canaries = self.feeds.change_feed().map(|state| state.relayed());
        let feeds = self.feeds.clone();
        let shutdown = self.shutdown.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        // Every third of the health-check interval the follower hears how
        // long ago Vault answered this replica's own requests.
        let mut vouch = tokio::time::interval(feeds.vault().health_check_interval() / 3);
        vouch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.spawner.spawn(async move {
            let mut copies = feeds.copies();
            loop {
                for (source, fed) in copies.drain(..) {
                    if tx.send(Ok(to_copy(&source, &fed))).await.is_err() {
                        return;
                    }
                }
                let canary = async {
                    match canaries.as_mut() {
                        Some(canaries) => canaries.recv().await,
                        None => std::future::pending().await,
                    }
                };
                let next = tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = vouch.tick() => {
                        let interval = feeds.vault().health_check_interval();
                        let Some(ago) = feeds.vault().answered_ago().filter(|ago| *ago < interval) else {
                            continue;
                        };
                        let ms = u64::try_from(ago.as_millis()).unwrap_or(u64::MAX);
                        let word = KvCopy { vault_answered_ms: Some(ms), ..KvCopy::default() };
                        if tx.send(Ok(word)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    next = changes.recv() => next,
                    canary = canary => {
                        let relayed = match canary {
                            Ok(FeedNote::Canary(path)) => KvCopy { canary: path, ..KvCopy::default() },
                            Ok(FeedNote::Up(up)) => KvCopy { feed_up: Some(up), ..KvCopy::default() },
                            Err(_) => continue,
                        };
                        if tx.send(Ok(relayed)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                };
                match next {
                    Ok(change) => copies.push(change),
                    // Too slow to keep up: every copy again.
                    Err(RecvError::Lagged(_)) => copies = feeds.copies(),
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A KV source on the wire.
fn wire_source(source: &Kv2Source) -> KvSource {
    KvSource {
        mount: source.mount.clone(),
        path: source.path.clone(),
        keys: source.keys.clone().unwrap_or_default(),
        all_keys: source.keys.is_none(),
        namespace: source.namespace.clone().unwrap_or_default(),
    }
}

/// A feed's value as a peer receives it.
fn to_copy(source: &Kv2Source, fed: &Fed) -> KvCopy {
    KvCopy {
        source: Some(wire_source(source)),
        version: fed.secret.version,
        created: fed.secret.created.map(Into::into),
        fields: fed
            .secret
            .fields
            .iter()
            .map(|(name, value)| (name.clone(), value.expose_secret().to_vec()))
            .collect(),
        confirmed_at: Some(fed.freshness.confirmed_at.into()),
        last_known_good: fed.freshness.last_known_good,
        canary: String::new(),
        feed_up: None,
        vault_answered_ms: None,
    }
}
