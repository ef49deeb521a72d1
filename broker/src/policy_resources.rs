//! The policy as Kubernetes resources (`policy.resources`): the security
//! team's `ClusterAccessPolicy` and app teams' `AccessBinding`s, read from the
//! API server with a reflector each, handed to the policy store, and what
//! became of each written back to its `status` (an `Accepted` condition with
//! the same messages `policy check` prints, and `observedGeneration`).

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::StreamExt as _;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams},
    runtime::{WatchStreamExt as _, reflector, watcher},
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::Metrics,
    policy::{
        resources::{ClusterResource, ResourceKey, ResourceKind, Verdict},
        store::PolicyStore,
    },
};

/// The API group of both kinds.
pub const GROUP: &str = "tessera.dev";
/// Their version.
pub const VERSION: &str = "v1alpha1";

/// A condition's message is cut to this many bytes (Kubernetes allows 32 KiB).
const MAX_MESSAGE: usize = 4096;
/// How often statuses that could not be written are tried again.
const STATUS_RETRY: Duration = Duration::from_secs(10);

fn api_resource(kind: ResourceKind) -> ApiResource {
    let plural = match kind {
        ResourceKind::ClusterAccessPolicy => "clusteraccesspolicies",
        ResourceKind::AccessBinding => "accessbindings",
    };
    ApiResource {
        group: GROUP.to_owned(),
        version: VERSION.to_owned(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: kind.as_str().to_owned(),
        plural: plural.to_owned(),
    }
}

const KINDS: [ResourceKind; 2] = [
    ResourceKind::ClusterAccessPolicy,
    ResourceKind::AccessBinding,
];

/// The resource as the policy compiles it: kind, name, namespace and spec
/// (nothing of the API server's bookkeeping).
fn to_resource(kind: ResourceKind, object: &DynamicObject) -> Option<ClusterResource> {
    let name = object.metadata.name.clone()?;
    let namespace = object.metadata.namespace.clone();
    let text = json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": kind.as_str(),
        "metadata": { "name": name, "namespace": namespace },
        "spec": object.data.get("spec").cloned().unwrap_or(Value::Null),
    })
    .to_string();
    let created = object
        .metadata
        .creation_timestamp
        .as_ref()
        .and_then(|t| serde_json::to_value(t).ok())
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    Some(ClusterResource {
        key: ResourceKey {
            kind,
            namespace,
            name,
        },
        generation: object.metadata.generation.unwrap_or(0),
        created,
        text,
    })
}

/// Lists both kinds once: the broker's first policy waits for them, so a
/// restarted replica never serves a policy missing the cluster's bindings.
///
/// # Errors
/// The API server's error (the CRDs not installed, RBAC, unreachable).
pub async fn list(client: &Client) -> Result<Vec<ClusterResource>, kube::Error> {
    let mut found = Vec::new();
    for kind in KINDS {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &api_resource(kind));
        let list = api.list(&ListParams::default()).await?;
        found.extend(list.items.iter().filter_map(|o| to_resource(kind, o)));
    }
    Ok(found)
}

/// Follows both kinds until `shutdown`, reloading the policy with each
/// change. While the API server is away the last resources read stay.
pub async fn follow(client: Client, store: Arc<PolicyStore>, shutdown: CancellationToken) {
    let mut readers = Vec::new();
    let mut streams = Vec::new();
    for kind in KINDS {
        let ar = api_resource(kind);
        let writer = reflector::store::Writer::new(ar.clone());
        readers.push((kind, writer.as_reader()));
        let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
        let events = reflector(writer, watcher(api, watcher::Config::default()))
            .default_backoff()
            .map(move |event| (kind, event));
        streams.push(events.boxed());
    }
    let mut events = futures::stream::select_all(streams);
    // A kind counts once its first full list is in.
    let mut listed = Vec::new();
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            event = events.next() => event,
        };
        let Some((kind, event)) = event else { return };
        match event {
            Err(error) => {
                tracing::warn!(%error, "watching ClusterAccessPolicy and AccessBinding resources failed; keeping the last read, retrying");
                continue;
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
            Ok(watcher::Event::InitDone) if !listed.contains(&kind) => listed.push(kind),
            Ok(_) => {}
        }
        if listed.len() < KINDS.len() {
            continue;
        }
        let resources = readers
            .iter()
            .flat_map(|(kind, reader)| {
                reader
                    .state()
                    .iter()
                    .filter_map(|o| to_resource(*kind, o))
                    .collect::<Vec<_>>()
            })
            .collect();
        match store.set_resources(resources) {
            Ok(true) => tracing::info!(
                generation = store.current().generation,
                "policy reloaded from its resources"
            ),
            Ok(false) => {}
            Err(error) => {
                tracing::error!(%error, "the policy files are invalid; keeping the last good policy");
            }
        }
    }
}

/// The `status` a verdict writes.
fn status(verdict: &Verdict, since: &str) -> Value {
    let (state, reason, mut message) = if verdict.accepted() {
        ("True", "Accepted", "served to its subjects".to_owned())
    } else {
        let reason = if verdict.in_force.is_some() {
            "RejectedEarlierInForce"
        } else {
            "Rejected"
        };
        let mut message = verdict.problems.join("; ");
        if let Some(generation) = verdict.in_force {
            message.push_str(&format!(
                " (generation {generation}, accepted earlier, stays in force)"
            ));
        }
        ("False", reason, message)
    };
    if message.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push('…');
    }
    json!({ "status": {
        "observedGeneration": verdict.generation,
        "conditions": [{
            "type": "Accepted",
            "status": state,
            "reason": reason,
            "message": message,
            "observedGeneration": verdict.generation,
            "lastTransitionTime": since,
        }],
    }})
}

/// Writes each resource's verdict to its status when it changes, and
/// counts the rejected ones in `tessera_policy_resources_rejected`, until
/// `shutdown`; writes that fail are tried again.
pub async fn write_status(
    client: Client,
    (store, metrics): (Arc<PolicyStore>, Arc<Metrics>),
    shutdown: CancellationToken,
) {
    let mut verdicts = store.verdicts();
    // What was written for each resource, and since when its state holds.
    let mut written: HashMap<ResourceKey, (Verdict, String)> = HashMap::new();
    loop {
        let current = verdicts.borrow_and_update().clone();
        let rejected = current.iter().filter(|v| !v.accepted()).count();
        metrics
            .policy_resources_rejected
            .set(i64::try_from(rejected).unwrap_or(i64::MAX));
        for verdict in current.iter() {
            let since = match written.get(&verdict.key) {
                Some((done, _)) if done == verdict => continue,
                Some((done, since)) if done.accepted() == verdict.accepted() => since.clone(),
                _ => humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            };
            let ar = api_resource(verdict.key.kind);
            let api: Api<DynamicObject> = match &verdict.key.namespace {
                Some(namespace) => Api::namespaced_with(client.clone(), namespace, &ar),
                None => Api::all_with(client.clone(), &ar),
            };
            match api
                .patch_status(
                    &verdict.key.name,
                    &PatchParams::default(),
                    &Patch::Merge(status(verdict, &since)),
                )
                .await
            {
                Ok(_) => {
                    written.insert(verdict.key.clone(), (verdict.clone(), since));
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    written.remove(&verdict.key);
                }
                Err(error) => {
                    tracing::warn!(resource = %verdict.key, %error, "could not write the resource's status; trying again");
                }
            }
        }
        written.retain(|key, _| current.iter().any(|v| &v.key == key));
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = verdicts.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(STATUS_RETRY) => {}
        }
    }
}
