//! A real Kubernetes control plane for a test: kube-apiserver, etcd and
//! kube-controller-manager built from Kubernetes' own Go modules, started by
//! `scripts/cluster up` in a temporary directory and stopped by PID when the
//! guard drops (also when the test fails). Tests talk to it the way people
//! do, with `kubectl`; tokens come from the TokenRequest API (`kubectl create
//! token`), so the issuer, keys and pod binding are the cluster's own.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::OnceLock,
};

use serde_json::{Value, json};

use crate::workspace_root;

/// Tessera's MutatingWebhookConfiguration `tessera` as the chart renders it
/// (pod `CREATE`s in namespaces labelled `tessera.dev/injection: enabled`),
/// with `client_config` (a `url` and `caBundle`, or a `service`) and
/// `failure_policy`.
pub fn webhook_configuration(client_config: Value, failure_policy: &str) -> Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": "tessera" },
        "webhooks": [{
            "name": "inject.tessera.dev",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": failure_policy,
            "timeoutSeconds": 5,
            "namespaceSelector": { "matchLabels": { "tessera.dev/injection": "enabled" } },
            "rules": [{ "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                        "resources": ["pods"], "scope": "Namespaced" }],
            "clientConfig": client_config,
        }],
    })
}

/// A running control plane.
pub struct Cluster {
    dir: tempfile::TempDir,
    /// cluster-admin's kubeconfig.
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:PORT`: the API server, which is also the
    /// service-account issuer (it serves the OIDC discovery document).
    pub server: String,
}

/// The kubectl the scripts install (`TESSERA_KUBECTL`, `.tools/bin/kubectl`, or PATH).
pub fn kubectl_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TESSERA_KUBECTL") {
        return PathBuf::from(path);
    }
    let local = workspace_root().join(".tools/bin/kubectl");
    if local.exists() {
        local
    } else {
        PathBuf::from("kubectl")
    }
}

/// The helm the scripts install (`TESSERA_HELM`, `.tools/bin/helm`, or PATH).
pub fn helm_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TESSERA_HELM") {
        return PathBuf::from(path);
    }
    let local = workspace_root().join(".tools/bin/helm");
    if local.exists() {
        local
    } else {
        PathBuf::from("helm")
    }
}

/// Builds the control plane once per test process (cached across runs).
fn ensure_built() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let built = Command::new(workspace_root().join("scripts/cluster"))
            .arg("build")
            .stdout(Stdio::null())
            .status()
            .expect("scripts/cluster runs");
        assert!(built.success(), "scripts/cluster build failed");
    });
}

impl Cluster {
    /// Starts a control plane and waits until it serves and its controllers run.
    pub fn start() -> Self {
        ensure_built();
        let dir = tempfile::Builder::new()
            .prefix("tessera-kube-")
            .tempdir()
            .unwrap();
        let up = Command::new(workspace_root().join("scripts/cluster"))
            .args(["up", "--dir"])
            .arg(dir.path())
            .output()
            .expect("scripts/cluster runs");
        assert!(
            up.status.success(),
            "scripts/cluster up failed: {}",
            String::from_utf8_lossy(&up.stderr)
        );
        let kubeconfig = dir.path().join("kubeconfig");
        let text = std::fs::read_to_string(&kubeconfig).unwrap();
        let server = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: "))
            .expect("a server in the kubeconfig")
            .to_owned();
        Self {
            dir,
            kubeconfig,
            server,
        }
    }

    /// A Kubernetes client as cluster-admin.
    pub async fn client(&self) -> ::kube::Client {
        let kubeconfig = ::kube::config::Kubeconfig::read_from(&self.kubeconfig).unwrap();
        let config = ::kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        ::kube::Client::try_from(config).unwrap()
    }

    /// The cluster's directory (its state, keys and logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The cluster CA (PEM file): what signs the API server's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("pki/ca.crt")
    }

    /// The service-account issuer (`iss` of every token it mints).
    pub fn issuer(&self) -> &str {
        &self.server
    }

    /// The process IDs: the API server (with etcd) first, then the
    /// controller manager.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.dir.path().join("pids"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Stops the API server (SIGTERM, then SIGKILL): the control plane is
    /// down, etcd's data and the keys stay.
    pub fn stop_api_server(&self) {
        if let Some(pid) = self.pids().first() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists()
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }

    /// Starts the API server again in the same directory (same port, keys
    /// and data) and waits until it is ready.
    pub fn start_api_server(&self) {
        let restarted = Command::new(workspace_root().join("scripts/cluster"))
            .args(["restart", "--dir"])
            .arg(self.dir.path())
            .output()
            .expect("scripts/cluster runs");
        assert!(
            restarted.status.success(),
            "scripts/cluster restart failed: {}",
            String::from_utf8_lossy(&restarted.stderr)
        );
    }

    /// `kubectl` as cluster-admin.
    pub fn kubectl(&self) -> Command {
        let mut command = Command::new(kubectl_binary());
        command.arg("--kubeconfig").arg(&self.kubeconfig);
        command
    }

    /// Runs kubectl with `args`; panics with its error when it fails.
    pub fn run(&self, args: &[&str]) -> String {
        let output = self.kubectl().args(args).output().unwrap();
        assert!(
            output.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Installs the chart's CRDs (`policy.resources.enabled`), as `helm
    /// install` renders them, and waits until the API server serves them.
    pub fn install_policy_crds(&self) {
        let rendered = Command::new(helm_binary())
            .arg("template")
            .arg("tessera")
            .arg(workspace_root().join("deploy/helm/tessera"))
            .args(["--show-only", "templates/crds.yaml"])
            .args(["--set", "vault.address=https://vault:8200"])
            .args(["--set", "policy.resources.enabled=true"])
            .output()
            .expect("helm runs");
        assert!(
            rendered.status.success(),
            "helm template: {}",
            String::from_utf8_lossy(&rendered.stderr)
        );
        let applied = self.with_stdin(
            &["apply", "-f", "-"],
            &String::from_utf8(rendered.stdout).unwrap(),
        );
        assert!(
            applied.status.success(),
            "the CRDs: {}",
            String::from_utf8_lossy(&applied.stderr)
        );
        self.run(&[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/clusteraccesspolicies.tessera.dev",
            "crd/accessbindings.tessera.dev",
        ]);
    }

    /// `kubectl apply` of `object` (JSON); the output.
    pub fn apply(&self, object: &Value) -> Output {
        self.with_stdin(&["apply", "-f", "-"], &object.to_string())
    }

    /// Runs kubectl with `args` and `input` on its standard input.
    pub fn with_stdin(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write as _;
        let mut child = self
            .kubectl()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// `kubectl replace` of `object` (JSON): exactly this object, whatever
    /// the stored one's version, as a GitOps sync or an operator's edit
    /// writes it.
    pub fn replace(&self, object: &Value) {
        let mut object = object.clone();
        if let Some(metadata) = object["metadata"].as_object_mut() {
            metadata.remove("resourceVersion");
        }
        let replaced = self.with_stdin(&["replace", "-f", "-"], &object.to_string());
        assert!(
            replaced.status.success(),
            "{}",
            String::from_utf8_lossy(&replaced.stderr)
        );
    }

    /// The object at `kind/name` in `namespace` (`None` for cluster-scoped),
    /// or `None` when it does not exist.
    pub fn get(&self, namespace: Option<&str>, what: &str) -> Option<Value> {
        let mut command = self.kubectl();
        command.args(["get", what, "-o", "json"]);
        if let Some(namespace) = namespace {
            command.args(["-n", namespace]);
        }
        let output = command.output().unwrap();
        output
            .status
            .success()
            .then(|| serde_json::from_slice(&output.stdout).unwrap())
    }

    /// Makes the namespace and the service account unless they exist.
    pub fn service_account(&self, namespace: &str, name: &str) {
        for object in [
            json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": namespace } }),
            json!({ "apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": { "name": name, "namespace": namespace } }),
        ] {
            let applied = self.apply(&object);
            assert!(
                applied.status.success(),
                "{}",
                String::from_utf8_lossy(&applied.stderr)
            );
        }
    }

    /// Creates a pod of `service_account` with `labels` (not scheduled to any
    /// node: it exists for lookups and token binding, and runs nowhere);
    /// returns its UID, which the API server assigns.
    pub fn add_pod(
        &self,
        namespace: &str,
        name: &str,
        service_account: &str,
        labels: &[(&str, &str)],
    ) -> String {
        self.service_account(namespace, service_account);
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": name, "namespace": namespace, "labels": labels },
            "spec": {
                "serviceAccountName": service_account,
                "automountServiceAccountToken": false,
                "containers": [{ "name": "app", "image": "registry.example/app:1" }]
            }
        });
        let created = self.with_stdin(&["create", "-f", "-", "-o", "json"], &pod.to_string());
        assert!(
            created.status.success(),
            "{}",
            String::from_utf8_lossy(&created.stderr)
        );
        let pod: Value = serde_json::from_slice(&created.stdout).unwrap();
        pod["metadata"]["uid"].as_str().unwrap().to_owned()
    }

    /// Deletes a pod at once (no kubelet is there to wait for).
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        self.run(&[
            "delete",
            "pod",
            name,
            "-n",
            namespace,
            "--grace-period=0",
            "--force",
            "--wait=false",
        ]);
    }

    /// A token from the TokenRequest API for `audience`, bound to `pod` when
    /// given (the API server then puts the pod's name and UID in it, and
    /// refuses it once the pod is gone), valid for `seconds`.
    pub fn token(
        &self,
        namespace: &str,
        service_account: &str,
        audience: &str,
        pod: Option<&str>,
        seconds: u32,
    ) -> String {
        self.service_account(namespace, service_account);
        let duration = format!("--duration={seconds}s");
        let audience = format!("--audience={audience}");
        let mut args = vec![
            "create",
            "token",
            service_account,
            "-n",
            namespace,
            &audience,
            &duration,
        ];
        let bound;
        if let Some(pod) = pod {
            bound = format!("--bound-object-name={pod}");
            args.extend(["--bound-object-kind=Pod", &bound]);
        }
        self.run(&args).trim().to_owned()
    }

    /// Whether the pod exists.
    pub fn has_pod(&self, namespace: &str, name: &str) -> bool {
        self.get(Some(namespace), &format!("pod/{name}")).is_some()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(workspace_root().join("scripts/cluster"))
            .args(["down", "--dir"])
            .arg(self.dir.path())
            .stderr(Stdio::null())
            .status();
    }
}
