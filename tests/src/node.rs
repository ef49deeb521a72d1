//! A node agent standing in for the kubelet and the container runtime, which
//! cannot run here, in front of the real API server of [`Cluster`].
//!
//! It registers a Node, binds pending pods to it (there is no scheduler), and
//! runs what each *stored* pod spec says: `emptyDir` volumes as directories on
//! tmpfs (`/dev/shm`), projected service-account tokens from the TokenRequest
//! API bound to the pod (audience and expiry from the spec, refreshed at 80 %
//! of their life as the kubelet does), projected downward-API annotations,
//! init containers in order, native sidecars (`restartPolicy: Always`) started
//! first and held by their exec `startupProbe`, then the containers, each as a
//! process with its `command`, `args` and `env`. It writes the pod's phase and
//! container states back, stops a pod's processes when it is deleted
//! (SIGTERM, its grace period, SIGKILL, then the final delete, as the kubelet
//! does) and ends a pod whose `restartPolicy` is not `Always` when its
//! containers have exited (a Job's pod: `Succeeded` or `Failed`).
//!
//! What it cannot do: pull or run images (a Tessera container runs the
//! workspace's `tessera-sidecar` binary, any other runs its command with the
//! host's shell), mount anything (a path under a volume mount in `env`,
//! `args`, `command` or a probe is rewritten to the volume's directory),
//! networking (every pod shares the host's loopback), cgroups and resource
//! limits, users and security contexts (processes run as the test's user),
//! restarting crashed containers, and liveness or readiness probes.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ::kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions},
};
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{Container, Node, Pod, ServiceAccount},
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::*;

/// The node's name.
pub const NODE: &str = "tessera-node";

/// A running node agent; stops (and kills what it runs) when dropped.
pub struct NodeAgent {
    stop: CancellationToken,
    pods: Arc<Mutex<HashMap<String, RunningPod>>>,
    /// Where pod volumes live (tmpfs).
    root: tempfile::TempDir,
}

/// One pod's processes and volumes.
struct RunningPod {
    namespace: String,
    name: String,
    uid: String,
    /// Volume name to directory.
    volumes: BTreeMap<String, PathBuf>,
    /// Container name to process; sidecars (native) first.
    processes: Vec<(String, Proc)>,
    /// Tokens to refresh: (file, audience, seconds, next refresh).
    tokens: Vec<(PathBuf, String, i64, Instant)>,
    service_account: String,
    restart_always: bool,
    /// Names of the app containers (not init, not native sidecars).
    apps: Vec<String>,
    finished: bool,
}

impl NodeAgent {
    /// Registers the node and starts running pods bound to it.
    pub async fn start(cluster: &Cluster) -> Self {
        let client = cluster.client().await;
        let nodes: Api<Node> = Api::all(client.clone());
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": NODE, "labels": { "kubernetes.io/os": "linux", "kubernetes.io/hostname": NODE } },
        }))
        .unwrap();
        nodes.create(&PostParams::default(), &node).await.unwrap();
        nodes
            .patch_status(
                NODE,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": {
                    "conditions": [{ "type": "Ready", "status": "True", "reason": "TesseraNodeAgent",
                                     "message": "a test node agent stands in for the kubelet" }],
                    "allocatable": { "cpu": "2", "memory": "8Gi", "pods": "110" },
                    "capacity": { "cpu": "2", "memory": "8Gi", "pods": "110" },
                }})),
            )
            .await
            .unwrap();
        let agent = Self {
            stop: CancellationToken::new(),
            pods: Arc::default(),
            root: tempfile::Builder::new()
                .prefix("tessera-node-")
                .tempdir_in("/dev/shm")
                .unwrap(),
        };
        let work = Work {
            client,
            pods: agent.pods.clone(),
            root: agent.root.path().to_owned(),
        };
        let stop = agent.stop.clone();
        tokio::spawn(async move {
            // Bounded: a tick every 200 ms until the agent is dropped.
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if let Err(error) = work.sync().await {
                    eprintln!("node agent: {error}");
                }
            }
        });
        agent
    }

    /// The directory of volume `volume` of pod `namespace/name`, once it runs.
    pub fn volume(&self, namespace: &str, name: &str, volume: &str) -> Option<PathBuf> {
        let pods = self.pods.lock().unwrap();
        pods.values()
            .find(|p| p.namespace == namespace && p.name == name)
            .and_then(|p| p.volumes.get(volume).cloned())
    }

    /// The output of container `container` of pod `namespace/name` so far.
    pub fn logs(&self, namespace: &str, name: &str, container: &str) -> String {
        let pods = self.pods.lock().unwrap();
        pods.values()
            .find(|p| p.namespace == namespace && p.name == name)
            .and_then(|p| p.processes.iter().find(|(c, _)| c == container))
            .map(|(_, proc)| proc.output())
            .unwrap_or_default()
    }

    /// The names of the pods it runs.
    pub fn running(&self) -> Vec<String> {
        let pods = self.pods.lock().unwrap();
        pods.values()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect()
    }

    /// Where its pods' volumes live.
    pub fn root(&self) -> &Path {
        self.root.path()
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        self.stop.cancel();
        // Dropping the processes kills them.
        self.pods.lock().unwrap().clear();
    }
}

/// What one tick does.
struct Work {
    client: Client,
    pods: Arc<Mutex<HashMap<String, RunningPod>>>,
    root: PathBuf,
}

impl Work {
    async fn sync(&self) -> Result<(), ::kube::Error> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let all = api.list(&ListParams::default()).await?;
        let mut seen = Vec::new();
        for pod in all.items {
            let meta = &pod.metadata;
            let (Some(namespace), Some(name), Some(uid)) =
                (meta.namespace.clone(), meta.name.clone(), meta.uid.clone())
            else {
                continue;
            };
            let spec = pod.spec.clone().unwrap_or_default();
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
            match spec.node_name.as_deref() {
                None => {
                    // The scheduler's job: bind it here.
                    let binding = json!({
                        "apiVersion": "v1", "kind": "Binding",
                        "metadata": { "name": name },
                        "target": { "apiVersion": "v1", "kind": "Node", "name": NODE },
                    });
                    let _ = pods
                        .create_subresource::<_, Value>(
                            "binding",
                            &name,
                            &PostParams::default(),
                            &binding,
                        )
                        .await;
                    continue;
                }
                Some(NODE) => {}
                Some(_) => continue,
            }
            seen.push(uid.clone());
            if meta.deletion_timestamp.is_some() {
                let grace = meta.deletion_grace_period_seconds.unwrap_or(30);
                let running = self.pods.lock().unwrap().remove(&uid);
                if let Some(running) = running {
                    stop_pod(running, Duration::from_secs(grace.clamp(0, 30) as u64)).await;
                }
                let _ = pods
                    .delete(
                        &name,
                        &DeleteParams {
                            grace_period_seconds: Some(0),
                            preconditions: Some(Preconditions {
                                uid: Some(uid.clone()),
                                resource_version: None,
                            }),
                            ..DeleteParams::default()
                        },
                    )
                    .await;
                continue;
            }
            let known = self.pods.lock().unwrap().contains_key(&uid);
            if !known {
                let running = self.start_pod(&pod, &namespace, &name, &uid).await;
                self.pods.lock().unwrap().insert(uid.clone(), running);
                continue;
            }
            self.refresh_tokens(&uid, &name).await;
            self.report(&pods, &uid, &name).await;
        }
        // Pods gone from the API server without a graceful delete.
        self.pods
            .lock()
            .unwrap()
            .retain(|uid, _| seen.contains(uid));
        Ok(())
    }

    /// Makes the pod's volumes, runs its init containers and native
    /// sidecars (each sidecar until its startup probe passes), then its
    /// containers.
    async fn start_pod(&self, pod: &Pod, namespace: &str, name: &str, uid: &str) -> RunningPod {
        let spec = pod.spec.clone().unwrap_or_default();
        let dir = self.root.join(uid);
        let mut running = RunningPod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: uid.to_owned(),
            volumes: BTreeMap::new(),
            processes: Vec::new(),
            tokens: Vec::new(),
            service_account: spec
                .service_account_name
                .clone()
                .unwrap_or_else(|| "default".to_owned()),
            restart_always: spec.restart_policy.as_deref().unwrap_or("Always") == "Always",
            apps: spec.containers.iter().map(|c| c.name.clone()).collect(),
            finished: false,
        };
        make_volumes(pod, &dir.join("volumes"), &mut running);
        self.refresh_tokens_of(&mut running).await;
        let logs = dir.join("logs");
        fs::create_dir_all(&logs).unwrap();
        for init in spec.init_containers.iter().flatten() {
            let sidecar = init.restart_policy.as_deref() == Some("Always");
            let proc = run(init, &running.volumes, &logs);
            if sidecar {
                if let Some(probe) = init.startup_probe.as_ref().and_then(|p| p.exec.as_ref()) {
                    let command = probe.command.clone().unwrap_or_default();
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while Instant::now() < deadline
                        && !probe_passes(init, &command, &running.volumes)
                    {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                running.processes.push((init.name.clone(), proc));
            } else {
                let mut proc = proc;
                let deadline = Instant::now() + Duration::from_secs(120);
                while !proc.exited() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                running.processes.push((init.name.clone(), proc));
            }
        }
        for container in &spec.containers {
            running.processes.push((
                container.name.clone(),
                run(container, &running.volumes, &logs),
            ));
        }
        running
    }

    async fn refresh_tokens(&self, uid: &str, _name: &str) {
        let running = self.pods.lock().unwrap().remove(uid);
        if let Some(mut running) = running {
            self.refresh_tokens_of(&mut running).await;
            self.pods.lock().unwrap().insert(uid.to_owned(), running);
        }
    }

    /// Writes every projected token that is due (at 80 % of its life).
    async fn refresh_tokens_of(&self, running: &mut RunningPod) {
        let accounts: Api<ServiceAccount> =
            Api::namespaced(self.client.clone(), &running.namespace);
        for (file, audience, seconds, due) in &mut running.tokens {
            if Instant::now() < *due {
                continue;
            }
            let request = TokenRequest {
                spec: TokenRequestSpec {
                    audiences: vec![audience.clone()],
                    expiration_seconds: Some(*seconds),
                    bound_object_ref: Some(BoundObjectReference {
                        api_version: Some("v1".to_owned()),
                        kind: Some("Pod".to_owned()),
                        name: Some(running.name.clone()),
                        uid: Some(running.uid.clone()),
                    }),
                },
                ..TokenRequest::default()
            };
            match accounts
                .create_token_request(&running.service_account, &PostParams::default(), &request)
                .await
            {
                Ok(answer) => {
                    let token = answer.status.map(|s| s.token).unwrap_or_default();
                    let partial = file.with_extension("partial");
                    fs::write(&partial, token).unwrap();
                    fs::rename(&partial, &*file).unwrap();
                    *due = Instant::now() + Duration::from_secs((*seconds as u64) * 8 / 10);
                }
                Err(error) => eprintln!("node agent: token for {}: {error}", running.name),
            }
        }
    }

    /// Writes the pod's phase and container states; ends a pod whose
    /// containers exited when it does not restart them.
    async fn report(&self, pods: &Api<Pod>, uid: &str, name: &str) {
        let (status, finish) = {
            let mut all = self.pods.lock().unwrap();
            let Some(running) = all.get_mut(uid) else {
                return;
            };
            if running.finished {
                return;
            }
            let mut states = Vec::new();
            let mut codes = Vec::new();
            for (container, proc) in &mut running.processes {
                let code = proc.exit_code();
                let exited = proc.exited();
                if running.apps.contains(container) {
                    codes.push(exited.then_some(code.unwrap_or(137)));
                }
                let state = if exited {
                    json!({ "terminated": { "exitCode": code.unwrap_or(137), "reason": if code == Some(0) { "Completed" } else { "Error" } } })
                } else {
                    json!({ "running": { "startedAt": "2026-01-01T00:00:00Z" } })
                };
                states.push(json!({ "name": container, "state": state, "ready": !exited,
                                    "restartCount": 0, "image": "", "imageID": "" }));
            }
            let done = !running.restart_always && codes.iter().all(Option::is_some);
            let phase = if done {
                if codes.iter().all(|c| *c == Some(0)) {
                    "Succeeded"
                } else {
                    "Failed"
                }
            } else {
                "Running"
            };
            running.finished = done;
            (
                json!({ "status": { "phase": phase, "containerStatuses": states,
                                    "conditions": [{ "type": "Ready", "status": if done { "False" } else { "True" } }] } }),
                done,
            )
        };
        let _ = pods
            .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
            .await;
        if finish {
            // The kubelet stops a finished pod's sidecars (SIGTERM; they
            // give their leases back on the way out).
            if let Some(running) = self.pods.lock().unwrap().get_mut(uid) {
                for (_, proc) in &mut running.processes {
                    if !proc.exited() {
                        proc.signal("TERM");
                    }
                }
            }
        }
    }
}

/// Stops a deleted pod as the kubelet does: SIGTERM to the app containers,
/// then, once they have exited, to the sidecars (which give their leases
/// back on the way out), all within the grace period; SIGKILL after it.
async fn stop_pod(mut running: RunningPod, grace: Duration) {
    let deadline = Instant::now() + grace;
    let apps = running.apps.clone();
    for wave in [true, false] {
        let in_wave = |name: &str| apps.iter().any(|a| a == name) == wave;
        for (name, proc) in &running.processes {
            if in_wave(name) {
                proc.signal("TERM");
            }
        }
        while Instant::now() < deadline
            && running
                .processes
                .iter_mut()
                .any(|(name, p)| in_wave(name) && !p.exited())
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Dropping kills what is left.
}

/// `path` with a volume mount's path replaced by the volume's directory.
fn rewrite(text: &str, container: &Container, volumes: &BTreeMap<String, PathBuf>) -> String {
    let mut mounts: Vec<(&str, &Path)> = container
        .volume_mounts
        .iter()
        .flatten()
        .filter_map(|m| {
            volumes
                .get(&m.name)
                .map(|dir| (m.mount_path.as_str(), dir.as_path()))
        })
        .collect();
    // Longest first, so a nested mount wins.
    mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    for (path, dir) in mounts {
        if let Some(rest) = text.strip_prefix(path) {
            return format!("{}{rest}", dir.display());
        }
        if text.contains(path) {
            return text.replace(path, &dir.display().to_string());
        }
    }
    text.to_owned()
}

/// The program for a container's first word: Tessera's binary for its image.
fn program(container: &Container, first: &str) -> PathBuf {
    let tessera = container
        .image
        .as_deref()
        .is_some_and(|image| image.contains("tessera-sidecar"));
    if tessera && first.ends_with("tessera-sidecar") {
        binary("tessera-sidecar")
    } else {
        PathBuf::from(first)
    }
}

/// Starts a container as a process.
fn run(container: &Container, volumes: &BTreeMap<String, PathBuf>, logs: &Path) -> Proc {
    let mut words: Vec<String> = container.command.clone().unwrap_or_default();
    if words.is_empty() {
        // An image's entrypoint: Tessera's images start the binary.
        words.push("/tessera-sidecar".to_owned());
    }
    words.extend(container.args.clone().unwrap_or_default());
    let words: Vec<String> = words
        .iter()
        .map(|w| rewrite(w, container, volumes))
        .collect();
    let mut command = Command::new(program(container, &words[0]));
    command
        .args(&words[1..])
        .env_clear()
        .env("PATH", "/usr/bin:/bin");
    for var in container.env.iter().flatten() {
        if let Some(value) = &var.value {
            command.env(&var.name, rewrite(value, container, volumes));
        }
    }
    Proc::spawn(
        &container.name,
        command,
        logs.join(format!("{}.log", container.name)),
    )
}

/// Runs an exec probe's command in the container's environment.
fn probe_passes(
    container: &Container,
    command: &[String],
    volumes: &BTreeMap<String, PathBuf>,
) -> bool {
    let Some(first) = command.first() else {
        return false;
    };
    let mut probe = Command::new(program(container, first));
    probe
        .args(command[1..].iter().map(|w| rewrite(w, container, volumes)))
        .env_clear()
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for var in container.env.iter().flatten() {
        if let Some(value) = &var.value {
            probe.env(&var.name, rewrite(value, container, volumes));
        }
    }
    probe.status().is_ok_and(|s| s.success())
}

/// Makes the pod's volumes under `volumes`: empty directories, projected
/// service-account tokens (noted in `running`, written by the token refresh)
/// and downward-API files of annotations.
fn make_volumes(pod: &Pod, volumes: &Path, running: &mut RunningPod) {
    let spec = pod.spec.as_ref();
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    for volume in spec.and_then(|s| s.volumes.as_ref()).into_iter().flatten() {
        let path = volumes.join(&volume.name);
        fs::create_dir_all(&path).unwrap();
        if let Some(projected) = &volume.projected {
            for source in projected.sources.iter().flatten() {
                if let Some(token) = &source.service_account_token {
                    let file = path.join(&token.path);
                    let audience = token.audience.clone().unwrap_or_default();
                    let seconds = token.expiration_seconds.unwrap_or(3600);
                    running
                        .tokens
                        .push((file, audience, seconds, Instant::now()));
                }
                if let Some(downward) = &source.downward_api {
                    for item in downward.items.iter().flatten() {
                        let Some(field) = &item.field_ref else {
                            continue;
                        };
                        let value = field
                            .field_path
                            .strip_prefix("metadata.annotations['")
                            .and_then(|k| k.strip_suffix("']"))
                            .and_then(|k| annotations.get(k))
                            .cloned()
                            .unwrap_or_default();
                        fs::write(path.join(&item.path), value).unwrap();
                    }
                }
            }
        }
        running.volumes.insert(volume.name.clone(), path);
    }
}
