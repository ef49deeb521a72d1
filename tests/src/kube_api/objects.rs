//! Stored objects the broker reads and writes (Secrets, mutating webhook
//! configurations) with the API server's semantics it relies on: create
//! refuses an existing name (409 AlreadyExists), update refuses a stale
//! `resourceVersion` (409 Conflict), each write bumps the version.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Json,
    extract::{Path as UrlPath, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{ApiState, refused, status};

/// Objects by `(kind, namespace, name)`; cluster-scoped ones have namespace "".
pub(super) type Objects = BTreeMap<(String, String, String), Value>;

fn key(kind: &str, namespace: &str, name: &str) -> (String, String, String) {
    (kind.to_owned(), namespace.to_owned(), name.to_owned())
}

fn next_version(state: &ApiState) -> String {
    (state
        .version
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        + 1)
    .to_string()
}

fn get(state: &ApiState, kind: &str, namespace: &str, name: &str) -> Response {
    match state
        .objects
        .lock()
        .unwrap()
        .get(&key(kind, namespace, name))
    {
        Some(object) => Json(object.clone()).into_response(),
        None => status(404, "NotFound", format!("{kind} \"{name}\" not found")),
    }
}

fn create(state: &ApiState, kind: &str, namespace: &str, mut object: Value) -> Response {
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut objects = state.objects.lock().unwrap();
    let key = key(kind, namespace, &name);
    if objects.contains_key(&key) {
        return status(
            409,
            "AlreadyExists",
            format!("{kind} \"{name}\" already exists"),
        );
    }
    object["metadata"]["resourceVersion"] = json!(next_version(state));
    object["metadata"]["uid"] = json!(format!("uid-{name}"));
    objects.insert(key, object.clone());
    (StatusCode::CREATED, Json(object)).into_response()
}

fn replace(
    state: &ApiState,
    kind: &str,
    namespace: &str,
    name: &str,
    mut object: Value,
) -> Response {
    let mut objects = state.objects.lock().unwrap();
    let key = key(kind, namespace, name);
    let Some(stored) = objects.get(&key) else {
        return status(404, "NotFound", format!("{kind} \"{name}\" not found"));
    };
    let presented = object["metadata"]["resourceVersion"].clone();
    if !presented.is_null() && presented != stored["metadata"]["resourceVersion"] {
        return status(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {kind} \"{name}\": the object has been modified"
            ),
        );
    }
    object["metadata"]["resourceVersion"] = json!(next_version(state));
    objects.insert(key, object.clone());
    Json(object).into_response()
}

/// `GET /api/v1/namespaces/{namespace}/secrets/{name}`.
pub(super) async fn read_secret(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
) -> Response {
    if let Some(denied) = refused(&state, &headers, format!("GET secrets/{namespace}/{name}")) {
        return denied;
    }
    get(&state, "secrets", &namespace, &name)
}

/// `POST /api/v1/namespaces/{namespace}/secrets`.
pub(super) async fn create_secret(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    UrlPath(namespace): UrlPath<String>,
    Json(object): Json<Value>,
) -> Response {
    if let Some(denied) = refused(&state, &headers, format!("POST secrets/{namespace}")) {
        return denied;
    }
    create(&state, "secrets", &namespace, object)
}

/// `PUT /api/v1/namespaces/{namespace}/secrets/{name}`.
pub(super) async fn replace_secret(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
    Json(object): Json<Value>,
) -> Response {
    if let Some(denied) = refused(&state, &headers, format!("PUT secrets/{namespace}/{name}")) {
        return denied;
    }
    replace(&state, "secrets", &namespace, &name, object)
}

/// `GET .../mutatingwebhookconfigurations/{name}`.
pub(super) async fn read_webhook_configuration(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> Response {
    if let Some(denied) = refused(
        &state,
        &headers,
        format!("GET mutatingwebhookconfigurations/{name}"),
    ) {
        return denied;
    }
    get(&state, "mutatingwebhookconfigurations", "", &name)
}

/// `PUT .../mutatingwebhookconfigurations/{name}`.
pub(super) async fn replace_webhook_configuration(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
    Json(object): Json<Value>,
) -> Response {
    if let Some(denied) = refused(
        &state,
        &headers,
        format!("PUT mutatingwebhookconfigurations/{name}"),
    ) {
        return denied;
    }
    replace(&state, "mutatingwebhookconfigurations", "", &name, object)
}

impl super::FakeApiServer {
    /// Stores `object` (a Secret or a mutating webhook configuration, as a
    /// `kubectl apply` would), replacing what was there.
    pub fn put_object(&self, object: Value) {
        let kind = match object["kind"].as_str() {
            Some("Secret") => "secrets",
            Some("MutatingWebhookConfiguration") => "mutatingwebhookconfigurations",
            other => panic!("the fake API server stores no {other:?}"),
        };
        let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = object["metadata"]["name"].as_str().unwrap();
        let mut object = object.clone();
        object["metadata"]["resourceVersion"] = json!(next_version(&self.state));
        self.state
            .objects
            .lock()
            .unwrap()
            .insert(key(kind, namespace, name), object);
    }

    /// The stored Secret `namespace/name`.
    pub fn secret(&self, namespace: &str, name: &str) -> Option<Value> {
        self.state
            .objects
            .lock()
            .unwrap()
            .get(&key("secrets", namespace, name))
            .cloned()
    }

    /// The stored mutating webhook configuration `name`.
    pub fn webhook_configuration(&self, name: &str) -> Option<Value> {
        self.state
            .objects
            .lock()
            .unwrap()
            .get(&key("mutatingwebhookconfigurations", "", name))
            .cloned()
    }
}
