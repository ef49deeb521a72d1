//! The client side of the peer channel: one follower per peer, dialled by
//! address over mutual TLS (the peer certificate, trusted by the peer CA
//! and the name every peer certificate carries), taking its KV copies into
//! this replica's feeds. A peer is a live member while its stream is open.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tessera_proto::peer::v1::{FollowRequest, KvCopy, peer_client::PeerClient};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use super::{PEER_NAME, PeerSettings, Peers};
use crate::{
    StartError,
    feed::{Fed, Feeds, Freshness},
    policy::Kv2Source,
    secret::Secret,
    tasks::Spawner,
    vault::KvSecret,
};

/// First and longest wait before a lost peer is dialled again.
const REDIAL: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(5));

/// Follows every peer of `settings` (not this replica) until `shutdown`.
///
/// # Errors
/// The peer certificate, key or CA cannot be read.
pub async fn follow_peers(
    settings: PeerSettings,
    peers: Arc<Peers>,
    feeds: Arc<Feeds>,
    spawner: Spawner,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            StartError::Tls(crate::tls::TlsError::Cert {
                path: path.display().to_string(),
                detail: e.to_string(),
            })
        })
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&settings.ca)?))
        .identity(Identity::from_pem(
            read(&settings.cert)?,
            read(&settings.key)?,
        ))
        .domain_name(PEER_NAME);
    for address in settings
        .addresses
        .iter()
        .filter(|a| **a != settings.advertise)
    {
        spawner.spawn(follow(
            address.clone(),
            tls.clone(),
            peers.clone(),
            feeds.clone(),
            shutdown.clone(),
        ));
    }
    shutdown.cancelled().await;
    Ok(())
}

/// Follows one peer, dialling it again whenever its stream ends.
async fn follow(
    address: String,
    tls: ClientTlsConfig,
    peers: Arc<Peers>,
    feeds: Arc<Feeds>,
    shutdown: CancellationToken,
) {
    let mut wait = REDIAL.0;
    while !shutdown.is_cancelled() {
        match stream_from(&address, &tls, &peers, &feeds, &shutdown).await {
            Ok(()) => wait = REDIAL.0,
            Err(error) => tracing::debug!(peer = %address, %error, "peer not reached"),
        }
        peers.set_live(&address, false);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(REDIAL.1);
    }
}

/// One stream from `address`: the peer is live while it is open.
async fn stream_from(
    address: &str,
    tls: &ClientTlsConfig,
    peers: &Peers,
    feeds: &Feeds,
    shutdown: &CancellationToken,
) -> Result<(), tonic::Status> {
    let unreachable = |e: tonic::transport::Error| tonic::Status::unavailable(e.to_string());
    let channel = Endpoint::from_shared(format!("https://{address}"))
        .map_err(unreachable)?
        .tls_config(tls.clone())
        .map_err(unreachable)?
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(unreachable)?;
    let mut stream = PeerClient::new(channel)
        .follow(FollowRequest {
            replica: peers.me().to_owned(),
        })
        .await?
        .into_inner();
    peers.set_live(address, true);
    loop {
        let copy = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            copy = stream.message() => copy?,
        };
        let Some(copy) = copy else {
            return Ok(());
        };
        if let Some((source, fed)) = from_copy(copy) {
            feeds.offer(source, fed);
        }
    }
}

/// A peer's copy as a feed value; `None` for one without a source.
fn from_copy(copy: KvCopy) -> Option<(Kv2Source, Fed)> {
    let wire = copy.source?;
    let source = Kv2Source {
        mount: wire.mount,
        path: wire.path,
        keys: (!wire.all_keys).then_some(wire.keys),
        namespace: (!wire.namespace.is_empty()).then_some(wire.namespace),
    };
    let fields: BTreeMap<String, Secret> = copy
        .fields
        .into_iter()
        .map(|(name, value)| (name, Secret::new(value)))
        .collect();
    let confirmed_at = copy
        .confirmed_at
        .and_then(|at| std::time::SystemTime::try_from(at).ok())
        .unwrap_or(std::time::UNIX_EPOCH);
    let fed = Fed {
        secret: Arc::new(KvSecret {
            version: copy.version,
            created: copy
                .created
                .and_then(|at| std::time::SystemTime::try_from(at).ok()),
            fields,
        }),
        freshness: Freshness {
            confirmed_at,
            last_known_good: copy.last_known_good,
        },
    };
    Some((source, fed))
}
