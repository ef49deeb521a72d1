//! The audit trail: one JSON line per decision (authentication failure, issue,
//! rotation push, revoke, denial), naming the pod. Never a secret value or a
//! token; Vault lease ids appear only as SHA-256 digests, which an operator can
//! match against Vault's own audit log by hashing its `lease_id`.

use std::{
    fs::OpenOptions,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::PathBuf,
    sync::Mutex,
    time::SystemTime,
};

use serde::Serialize;

use crate::identity::Identity;

/// Where audit events go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditTarget {
    /// Standard output (logs go to standard error).
    Stdout,
    /// A file, appended to, created with mode 0600.
    File(PathBuf),
}

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// A token was presented and refused.
    Authenticate,
    /// Credentials were issued (Fetch, or the first message of Watch).
    Issue,
    /// A lease was extended.
    Renew,
    /// A changed credential was pushed on a Watch stream (new KV version,
    /// rotated lease, renewed certificate).
    Rotate,
    /// Credentials were given back.
    Revoke,
}

impl Action {
    /// The name used in the audit log and as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Authenticate => "authenticate",
            Self::Issue => "issue",
            Self::Renew => "renew",
            Self::Rotate => "rotate",
            Self::Revoke => "revoke",
        }
    }
}

/// How it ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The request was served (or the work done).
    Success,
    /// Refused by authentication, policy or rate limit.
    Denied,
    /// Failed for a reason the caller did not cause (Vault down).
    Error,
}

impl Outcome {
    /// The name used in the audit log and as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Denied => "denied",
            Self::Error => "error",
        }
    }
}

/// One audit record.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Event {
    /// RFC 3339 time with milliseconds.
    pub time: String,
    /// What happened.
    pub action: Option<Action>,
    /// How it ended.
    pub outcome: Option<Outcome>,
    /// Why, for denials and errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The namespace of the verified caller.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The service account the caller's token names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// The pod the token is bound to, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// That pod's UID (a recreated pod of the same name has another).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The node the pod runs on, when the token names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The address the request came from (none for the broker's own sweeps).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The policy binding the decision is about, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binding: Option<String>,
    /// The source, e.g. `kv2 secret/shop/orders`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The credential version delivered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// SHA-256 (hex) of the Vault lease id, for leased credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_id_sha256: Option<String>,
    /// Lifetime granted, in seconds, for leased credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// Policy generation that decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_generation: Option<u64>,
}

impl Event {
    /// An event about `identity`.
    pub fn new(action: Action, outcome: Outcome, identity: Option<&Identity>) -> Self {
        let mut event = Self {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            action: Some(action),
            outcome: Some(outcome),
            ..Self::default()
        };
        if let Some(identity) = identity {
            event.namespace = Some(identity.namespace.clone());
            event.service_account = Some(identity.service_account.clone());
            event.pod_name = identity.pod.as_ref().map(|p| p.name.clone());
            event.pod_uid = identity.pod.as_ref().map(|p| p.uid.clone());
            event.node = identity.node.as_ref().map(|n| n.name.clone());
        }
        event
    }
}

/// Where audit lines go (a file or stdout), one JSON line per decision.
pub struct Audit {
    sink: Mutex<Box<dyn Write + Send>>,
    cluster: String,
}

/// One audit line: the cluster's name, then the event.
#[derive(Serialize)]
struct Line<'a> {
    cluster: &'a str,
    #[serde(flatten)]
    event: &'a Event,
}

impl Audit {
    /// Opens `target` for the events of `cluster` (named in every line, so
    /// several clusters' trails can be read together).
    ///
    /// # Errors
    /// When the file cannot be opened for appending.
    pub fn open(target: &AuditTarget, cluster: &str) -> io::Result<Self> {
        let sink: Box<dyn Write + Send> = match target {
            AuditTarget::Stdout => Box::new(io::stdout()),
            AuditTarget::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(path)?,
            ),
        };
        Ok(Self {
            sink: Mutex::new(sink),
            cluster: cluster.to_owned(),
        })
    }

    /// Writes one event as a JSON line. A write failure is logged, not
    /// returned: the request was already decided.
    pub fn record(&self, event: &Event) {
        let Ok(mut line) = serde_json::to_vec(&Line {
            cluster: &self.cluster,
            event,
        }) else {
            return;
        };
        line.push(b'\n');
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(error) = sink.write_all(&line).and_then(|()| sink.flush()) {
            tracing::error!(%error, "cannot write the audit log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_labels_are_the_audit_log_names() {
        for action in [
            Action::Authenticate,
            Action::Issue,
            Action::Renew,
            Action::Rotate,
            Action::Revoke,
        ] {
            assert_eq!(serde_json::to_value(action).unwrap(), action.as_str());
        }
        for outcome in [Outcome::Success, Outcome::Denied, Outcome::Error] {
            assert_eq!(serde_json::to_value(outcome).unwrap(), outcome.as_str());
        }
    }
}
