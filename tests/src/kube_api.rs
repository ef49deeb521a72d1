//! An in-process HTTPS server speaking the Kubernetes API's JSON (k8s-openapi
//! types), standing in for a real API server, which cannot be had here. It
//! serves what the broker uses: OIDC discovery and the JWKS, TokenReview, pod
//! reads, the cluster-wide pod list and watch (newline-delimited watch
//! events, as the API server streams them), Secrets and mutating webhook
//! configurations (read, create, update), and the version. It signs nothing: it trusts the dev JWKS the harness gives it,
//! checks tokens like the API server does (signature, issuer, audience,
//! bound pod still present), and requires the broker's bearer token.

use std::{
    collections::BTreeMap,
    net::TcpListener,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    extract::{Path as UrlPath, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use k8s_openapi::{
    api::{
        authentication::v1::{TokenReview, TokenReviewStatus, UserInfo},
        core::v1::Pod,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Status},
};
use serde_json::{Value, json};
use tessera_broker::{
    identity::{Expectations, JwksFile, Source, Verifier},
    secret::Secret,
};

/// The bearer token the broker's kubeconfig carries.
const BROKER_TOKEN: &str = "tessera-broker-test-token";

mod objects;

struct ApiState {
    url: String,
    issuer: String,
    jwks_path: PathBuf,
    pods: Mutex<BTreeMap<(String, String), Pod>>,
    calls: Mutex<Vec<String>>,
    /// Secrets and webhook configurations.
    objects: Mutex<objects::Objects>,
    /// Pod changes as watch events (`{"type": ..., "object": ...}`).
    events: tokio::sync::broadcast::Sender<Value>,
    /// The resource version of the latest change.
    version: std::sync::atomic::AtomicU64,
}

impl ApiState {
    /// Records a change to `pod` and tells the watchers.
    fn changed(&self, kind: &str, mut pod: Pod) {
        let version = self
            .version
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        pod.metadata.resource_version = Some(version.to_string());
        let mut object = serde_json::to_value(pod).unwrap();
        object["kind"] = json!("Pod");
        object["apiVersion"] = json!("v1");
        let _ = self.events.send(json!({ "type": kind, "object": object }));
    }
}

/// The running fake API server; stops when dropped.
pub struct FakeApiServer {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    state: Arc<ApiState>,
    handle: axum_server::Handle<std::net::SocketAddr>,
}

fn status(code: u16, reason: &str, message: String) -> Response {
    let body = Status {
        code: Some(i32::from(code)),
        message: Some(message),
        reason: Some(reason.to_owned()),
        status: Some("Failure".to_owned()),
        ..Status::default()
    };
    let mut value = serde_json::to_value(body).unwrap();
    value["kind"] = json!("Status");
    value["apiVersion"] = json!("v1");
    (StatusCode::from_u16(code).unwrap(), Json(value)).into_response()
}

/// Records the call; the 401 answer when it lacks the broker's bearer token.
fn refused(state: &ApiState, headers: &HeaderMap, call: String) -> Option<Response> {
    state.calls.lock().unwrap().push(call);
    let expected = format!("Bearer {BROKER_TOKEN}");
    let presented = headers.get("authorization").and_then(|v| v.to_str().ok());
    (presented != Some(expected.as_str()))
        .then(|| status(401, "Unauthorized", "Unauthorized".to_owned()))
}

/// `GET /version`, as a 1.33 API server answers (the webhook's `auto` mode asks).
async fn version(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if let Some(denied) = refused(&state, &headers, "GET /version".into()) {
        return denied;
    }
    Json(k8s_openapi::apimachinery::pkg::version::Info {
        major: "1".to_owned(),
        minor: "33".to_owned(),
        git_version: "v1.33.4".to_owned(),
        git_commit: "74cdb426e4ab0b4b3b1d5a5c1ec2c7a6d6b6e1f0".to_owned(),
        git_tree_state: "clean".to_owned(),
        build_date: "2025-08-12T10:00:00Z".to_owned(),
        go_version: "go1.24.5".to_owned(),
        compiler: "gc".to_owned(),
        platform: "linux/amd64".to_owned(),
        ..Default::default()
    })
    .into_response()
}

async fn discovery(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if let Some(denied) = refused(
        &state,
        &headers,
        "GET /.well-known/openid-configuration".into(),
    ) {
        return denied;
    }
    Json(json!({
        "issuer": state.issuer,
        "jwks_uri": format!("{}/openid/v1/jwks", state.url),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
    }))
    .into_response()
}

async fn jwks(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if let Some(denied) = refused(&state, &headers, "GET /openid/v1/jwks".into()) {
        return denied;
    }
    let text = std::fs::read_to_string(&state.jwks_path).unwrap();
    Json(serde_json::from_str::<Value>(&text).unwrap()).into_response()
}

async fn token_review(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Json(review): Json<TokenReview>,
) -> Response {
    if let Some(denied) = refused(&state, &headers, "POST tokenreviews".into()) {
        return denied;
    }
    let audiences = review.spec.audiences.clone().unwrap_or_default();
    let token = review.spec.token.clone().unwrap_or_default();
    let verifier = Verifier::new(
        Source::JwksFile(JwksFile::load(&state.jwks_path).unwrap()),
        Expectations {
            issuer: state.issuer.clone(),
            audiences: audiences.clone(),
            leeway: std::time::Duration::from_secs(5),
        },
    );
    let verdict = match verifier.verify(&Secret::from(token)).await {
        Err(error) => Err(error.to_string()),
        Ok(identity) => {
            // Bound tokens die with their pod.
            let pod = identity.pod.clone().unwrap();
            let present = state
                .pods
                .lock()
                .unwrap()
                .get(&(identity.namespace.clone(), pod.name.clone()))
                .is_some_and(|p| p.metadata.uid.as_deref() == Some(pod.uid.as_str()));
            if present {
                Ok(identity)
            } else {
                Err(format!("pod {}/{} not found", identity.namespace, pod.name))
            }
        }
    };
    let status = match verdict {
        Ok(identity) => {
            let (pod, node) = (identity.pod.unwrap(), identity.node.unwrap());
            let extra = BTreeMap::from([
                (
                    "authentication.kubernetes.io/pod-name".to_owned(),
                    vec![pod.name],
                ),
                (
                    "authentication.kubernetes.io/pod-uid".to_owned(),
                    vec![pod.uid],
                ),
                (
                    "authentication.kubernetes.io/node-name".to_owned(),
                    vec![node.name],
                ),
                (
                    "authentication.kubernetes.io/node-uid".to_owned(),
                    vec![node.uid],
                ),
            ]);
            TokenReviewStatus {
                authenticated: Some(true),
                audiences: Some(audiences),
                user: Some(UserInfo {
                    username: Some(format!(
                        "system:serviceaccount:{}:{}",
                        identity.namespace, identity.service_account
                    )),
                    uid: Some(identity.service_account_uid),
                    groups: Some(vec!["system:serviceaccounts".to_owned()]),
                    extra: Some(extra),
                }),
                error: None,
            }
        }
        Err(error) => TokenReviewStatus {
            authenticated: Some(false),
            error: Some(error),
            ..TokenReviewStatus::default()
        },
    };
    let answer = TokenReview {
        metadata: ObjectMeta::default(),
        spec: review.spec,
        status: Some(status),
    };
    let mut value = serde_json::to_value(answer).unwrap();
    value["kind"] = json!("TokenReview");
    value["apiVersion"] = json!("authentication.k8s.io/v1");
    (StatusCode::CREATED, Json(value)).into_response()
}

async fn read_pod(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
) -> Response {
    if let Some(denied) = refused(&state, &headers, format!("GET pods/{namespace}/{name}")) {
        return denied;
    }
    match state.pods.lock().unwrap().get(&(namespace, name.clone())) {
        Some(pod) => {
            let mut value = serde_json::to_value(pod).unwrap();
            value["kind"] = json!("Pod");
            value["apiVersion"] = json!("v1");
            Json(value).into_response()
        }
        None => status(404, "NotFound", format!("pods \"{name}\" not found")),
    }
}

/// `GET /api/v1/pods`: the pod list, or with `watch=true` a stream of watch
/// events from now on.
async fn list_pods(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let watch = query
        .as_deref()
        .unwrap_or_default()
        .split('&')
        .any(|p| p == "watch=true" || p == "watch=1");
    let call = if watch { "WATCH pods" } else { "LIST pods" };
    if let Some(denied) = refused(&state, &headers, call.to_owned()) {
        return denied;
    }
    if watch {
        let events = state.events.subscribe();
        let lines = futures::stream::unfold(events, |mut events| async move {
            loop {
                match events.recv().await {
                    Ok(event) => {
                        let mut line = serde_json::to_vec(&event).unwrap();
                        line.push(b'\n');
                        return Some((Ok::<_, std::convert::Infallible>(line), events));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        return Response::builder()
            .header("content-type", "application/json")
            .body(axum::body::Body::from_stream(lines))
            .unwrap();
    }
    let items: Vec<Value> = state
        .pods
        .lock()
        .unwrap()
        .values()
        .map(|pod| serde_json::to_value(pod).unwrap())
        .collect();
    let version = state.version.load(std::sync::atomic::Ordering::SeqCst);
    Json(json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": { "resourceVersion": version.to_string() },
        "items": items,
    }))
    .into_response()
}

impl FakeApiServer {
    /// Serves on a free loopback port with the dev certificate in `dev_dir`,
    /// trusting the JWKS at `jwks_path` for tokens of `issuer`.
    pub async fn start(dev_dir: &Path, jwks_path: &Path, issuer: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!(
            "https://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        );
        let state = Arc::new(ApiState {
            url: url.clone(),
            issuer: issuer.to_owned(),
            jwks_path: jwks_path.to_owned(),
            pods: Mutex::default(),
            calls: Mutex::default(),
            objects: Mutex::default(),
            events: tokio::sync::broadcast::channel(64).0,
            version: std::sync::atomic::AtomicU64::new(1),
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/version", get(version))
            .route("/openid/v1/jwks", get(jwks))
            .route(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                post(token_review),
            )
            .route("/api/v1/namespaces/{namespace}/pods/{name}", get(read_pod))
            .route("/api/v1/pods", get(list_pods))
            .route(
                "/api/v1/namespaces/{namespace}/secrets",
                post(objects::create_secret),
            )
            .route(
                "/api/v1/namespaces/{namespace}/secrets/{name}",
                get(objects::read_secret).put(objects::replace_secret),
            )
            .route(
                "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}",
                get(objects::read_webhook_configuration)
                    .put(objects::replace_webhook_configuration),
            )
            .with_state(state.clone());
        let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(
            dev_dir.join("tls.crt"),
            dev_dir.join("tls.key"),
        )
        .await
        .unwrap();
        let handle = axum_server::Handle::new();
        listener.set_nonblocking(true).unwrap();
        let server = axum_server::from_tcp_rustls(listener, tls)
            .unwrap()
            .handle(handle.clone())
            .serve(app.into_make_service());
        tokio::spawn(server);
        Self { url, state, handle }
    }

    /// Writes a kubeconfig for the broker and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig.yaml");
        let config = format!(
            "apiVersion: v1
kind: Config
clusters:
  - name: fake
    cluster:
      server: {url}
      certificate-authority: {ca}
users:
  - name: broker
    user:
      token: {BROKER_TOKEN}
contexts:
  - name: fake
    context: {{ cluster: fake, user: broker }}
current-context: fake
",
            url = self.url,
            ca = dir.join("dev/ca.pem").display(),
        );
        std::fs::write(&path, config).unwrap();
        path
    }

    /// Adds (or replaces) a pod.
    pub fn add_pod(&self, namespace: &str, name: &str, uid: &str, labels: &[(&str, &str)]) {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                uid: Some(uid.to_owned()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        };
        self.state
            .pods
            .lock()
            .unwrap()
            .insert((namespace.to_owned(), name.to_owned()), pod.clone());
        self.state.changed("ADDED", pod);
    }

    /// Deletes a pod.
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let removed = self
            .state
            .pods
            .lock()
            .unwrap()
            .remove(&(namespace.to_owned(), name.to_owned()));
        if let Some(pod) = removed {
            self.state.changed("DELETED", pod);
        }
    }

    /// Whether some client watches pods (the broker's deletion watch).
    pub fn watched(&self) -> bool {
        self.state.events.receiver_count() > 0
    }

    /// How many requests matched `call` (e.g. `GET /openid/v1/jwks`).
    pub fn calls(&self, call: &str) -> usize {
        self.state
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| *c == call)
            .count()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}
