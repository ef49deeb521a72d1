//! The client side of the peer channel: one follower per peer, dialled by
//! address over mutual TLS (the peer certificate, trusted by the peer CA
//! and the name every peer certificate carries), taking its KV copies into
//! this replica's feeds. A peer is a live member while its stream is open.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api,
    runtime::{WatchStreamExt as _, reflector, watcher},
};

use tessera_proto::peer::v1::{FollowRequest, KvCopy, peer_client::PeerClient};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use super::{PEER_NAME, PeerAddresses, PeerSettings, Peers};
use crate::{
    StartError,
    feed::{FEED_CHECK, Fed, Feeds, Freshness},
    policy::Kv2Source,
    secret::Secret,
    tasks::Spawner,
    vault::KvSecret,
};

/// First and longest wait before a lost peer is dialled again.
const REDIAL: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(5));

/// Follows every peer of `settings` (not this replica) until `shutdown`:
/// the static list, or the endpoints of the broker's Service as its
/// EndpointSlices change (watched through the API server, `kube`).
///
/// # Errors
/// The peer certificate, key or CA cannot be read; EndpointSlices asked
/// for without a Kubernetes API.
pub async fn follow_peers(
    settings: PeerSettings,
    (peers, feeds): (Arc<Peers>, Arc<Feeds>),
    kube: Option<kube::Client>,
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
    let mut followers = Followers {
        me: settings.advertise.clone(),
        tls,
        peers,
        feeds,
        spawner,
        shutdown: shutdown.clone(),
        running: BTreeMap::new(),
    };
    match &settings.addresses {
        PeerAddresses::Static(addresses) => {
            followers.follow(addresses.iter().cloned().collect());
            shutdown.cancelled().await;
        }
        PeerAddresses::EndpointSlices {
            namespace,
            service,
            port,
        } => {
            let Some(kube) = kube else {
                return Err(StartError::Kubernetes(
                    "peers.endpointSlices needs the Kubernetes API (kubernetes.kubeconfig, or in-cluster)".to_owned(),
                ));
            };
            let slices: Api<EndpointSlice> = Api::namespaced(kube, namespace);
            let selector = format!("kubernetes.io/service-name={service}");
            let (store, writer) = reflector::store();
            let events = reflector(
                writer,
                watcher(slices, watcher::Config::default().labels(&selector)),
            )
            .default_backoff();
            tokio::pin!(events);
            loop {
                let event = tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    event = events.next() => event,
                };
                match event {
                    Some(Ok(_)) => followers.follow(endpoint_addresses(&store.state(), port)),
                    Some(Err(error)) => {
                        tracing::warn!(%error, "watching the broker's EndpointSlices failed; retrying")
                    }
                    None => return Ok(()),
                }
            }
        }
    }
    Ok(())
}

/// The followers running, one per peer address.
struct Followers {
    me: String,
    tls: ClientTlsConfig,
    peers: Arc<Peers>,
    feeds: Arc<Feeds>,
    spawner: Spawner,
    shutdown: CancellationToken,
    running: BTreeMap<String, CancellationToken>,
}

impl Followers {
    /// Follows exactly `addresses` (but this replica): new ones are
    /// dialled, gone ones dropped from the members.
    fn follow(&mut self, addresses: BTreeSet<String>) {
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|address| !addresses.contains(*address))
            .cloned()
            .collect();
        for address in gone {
            if let Some(stop) = self.running.remove(&address) {
                stop.cancel();
            }
            self.peers.set_live(&address, false);
        }
        for address in addresses {
            if address == self.me || self.running.contains_key(&address) {
                continue;
            }
            let stop = self.shutdown.child_token();
            self.spawner.spawn(follow(
                address.clone(),
                self.tls.clone(),
                (self.peers.clone(), self.feeds.clone()),
                stop.clone(),
            ));
            self.running.insert(address, stop);
        }
    }
}

/// The peer addresses of `slices`: every endpoint not known to be unready,
/// with the slice's port named `port`.
fn endpoint_addresses(slices: &[Arc<EndpointSlice>], port: &str) -> BTreeSet<String> {
    let mut addresses = BTreeSet::new();
    for slice in slices {
        let Some(number) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(port))
            .and_then(|p| p.port)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            if endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .is_some_and(|ready| !ready)
            {
                continue;
            }
            for address in &endpoint.addresses {
                addresses.insert(if address.contains(':') {
                    format!("[{address}]:{number}")
                } else {
                    format!("{address}:{number}")
                });
            }
        }
    }
    addresses
}

/// Follows one peer, dialling it again whenever its stream ends.
async fn follow(
    address: String,
    tls: ClientTlsConfig,
    (peers, feeds): (Arc<Peers>, Arc<Feeds>),
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
        if !copy.canary.is_empty() {
            // A peer's feed brought a canary: this replica's counts there too.
            if let Some(state) = feeds.change_feed() {
                state.canary_arrived(&copy.canary, true);
            }
            continue;
        }
        if let Some(ms) = copy.vault_answered_ms {
            feeds.vault().peer_answered(Duration::from_millis(ms));
            continue;
        }
        if let Some(up) = copy.feed_up {
            // Taken from the replica that checks the feed for the cluster
            // only, as this replica counts the members.
            let checker = crate::membership::owner(&peers.members(), FEED_CHECK)
                .is_some_and(|o| o == address);
            if let (Some(state), true) = (feeds.change_feed(), checker) {
                state.owner_found(up);
            }
            continue;
        }
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

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};

    use super::*;

    fn slice(port: (&str, i32), endpoints: &[(&str, Option<bool>)]) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            ports: Some(vec![EndpointPort {
                name: Some(port.0.to_owned()),
                port: Some(port.1),
                ..EndpointPort::default()
            }]),
            endpoints: endpoints
                .iter()
                .map(|(address, ready)| Endpoint {
                    addresses: vec![(*address).to_owned()],
                    conditions: Some(EndpointConditions {
                        ready: *ready,
                        ..EndpointConditions::default()
                    }),
                    ..Endpoint::default()
                })
                .collect(),
            ..EndpointSlice::default()
        })
    }

    #[test]
    fn peers_are_the_endpoints_not_known_unready_with_the_named_port() {
        let slices = [
            slice(
                ("peer", 8444),
                &[("10.0.0.1", Some(true)), ("10.0.0.2", None)],
            ),
            slice(
                ("peer", 8444),
                &[("10.0.0.3", Some(false)), ("fd00::4", Some(true))],
            ),
            slice(("grpc", 8443), &[("10.0.0.5", Some(true))]),
        ];
        let found: Vec<String> = endpoint_addresses(&slices, "peer").into_iter().collect();
        assert_eq!(found, ["10.0.0.1:8444", "10.0.0.2:8444", "[fd00::4]:8444"]);
    }
}
