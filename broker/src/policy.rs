//! The access policy: which identities get which bindings. Deny by default: an
//! identity gets exactly the bindings whose subjects name it, nothing else.

use std::{collections::BTreeSet, path::Path};

use serde::Deserialize;
use tessera_proto::is_safe_name;

use crate::identity::Identity;

/// The only policy `apiVersion` this broker reads.
pub const API_VERSION: &str = "tessera.dev/v1alpha1";

/// Errors loading or checking a policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read policy {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML does not parse into a policy (unknown keys are errors).
    #[error("policy {path}: {detail}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message, with line and column.
        detail: String,
    },
    /// The policy parses but is not valid.
    #[error("policy {path}: {detail}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong and how to fix it.
        detail: String,
    },
}

/// A policy document (`kind: Policy`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Policy {
    /// Must be [`API_VERSION`].
    pub api_version: String,
    /// Must be `Policy`.
    pub kind: String,
    /// The bindings; names are unique.
    #[serde(default)]
    pub bindings: Vec<Binding>,
}

/// A named credential and who may have it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Binding {
    /// Name: the directory name in the pod and the name clients ask for.
    pub name: String,
    /// Who may have it.
    pub subjects: Vec<Subject>,
    /// Where the values come from.
    pub source: Source,
}

/// A Kubernetes service account, named exactly.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Subject {
    /// Namespace.
    pub namespace: String,
    /// Service-account name.
    pub service_account: String,
}

/// Where a binding's values come from.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub enum Source {
    /// A Vault KV version 2 secret.
    Kv2(Kv2Source),
}

/// A KV v2 secret: all its keys, or the chosen ones.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Kv2Source {
    /// Mount path of the KV v2 engine, e.g. `secret`.
    pub mount: String,
    /// Secret path under the mount, e.g. `orders/db`.
    pub path: String,
    /// Keys to deliver; all keys when absent.
    pub keys: Option<Vec<String>>,
}

impl Policy {
    /// Reads and validates a policy file.
    ///
    /// # Errors
    /// When the file cannot be read, does not parse, or is invalid.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses and validates a policy document; `origin` names it in errors.
    ///
    /// # Errors
    /// When the text does not parse or the policy is invalid.
    pub fn parse(text: &str, origin: &str) -> Result<Self, PolicyError> {
        let policy: Policy = serde_saphyr::from_str(text).map_err(|e| PolicyError::Parse {
            path: origin.to_owned(),
            detail: e.to_string(),
        })?;
        policy.validate().map_err(|detail| PolicyError::Invalid {
            path: origin.to_owned(),
            detail,
        })?;
        Ok(policy)
    }

    fn validate(&self) -> Result<(), String> {
        if self.api_version != API_VERSION {
            return Err(format!(
                "apiVersion `{}` is not supported (use `{API_VERSION}`)",
                self.api_version
            ));
        }
        if self.kind != "Policy" {
            return Err(format!("kind `{}` is not `Policy`", self.kind));
        }
        let mut names = BTreeSet::new();
        for binding in &self.bindings {
            let name = &binding.name;
            if !is_safe_name(name) {
                return Err(format!(
                    "binding name `{name}` is not a safe directory name (no `/`, not `.`, no leading `..`)"
                ));
            }
            if !names.insert(name.as_str()) {
                return Err(format!(
                    "binding `{name}` is defined twice (names must be unique)"
                ));
            }
            if binding.subjects.is_empty() {
                return Err(format!(
                    "binding `{name}`: `subjects` is empty (name at least one)"
                ));
            }
            if let Some(subject) = binding
                .subjects
                .iter()
                .find(|s| s.namespace.is_empty() || s.service_account.is_empty())
            {
                return Err(format!(
                    "binding `{name}`: subject {subject:?} needs a namespace and a serviceAccount"
                ));
            }
            let Source::Kv2(kv) = &binding.source;
            if kv.mount.is_empty() || kv.path.is_empty() {
                return Err(format!("binding `{name}`: kv2 needs `mount` and `path`"));
            }
            if let Some(keys) = &kv.keys {
                if keys.is_empty() {
                    return Err(format!(
                        "binding `{name}`: kv2 `keys` is empty (remove it to deliver all keys)"
                    ));
                }
                if let Some(bad) = keys.iter().find(|k| !is_safe_name(k)) {
                    return Err(format!(
                        "binding `{name}`: key `{bad}` is not a safe file name"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The bindings granted to `identity`, in policy order.
    pub fn granted<'a>(
        &'a self,
        identity: &Identity,
    ) -> impl Iterator<Item = &'a Binding> + use<'a> {
        let (namespace, service_account) =
            (identity.namespace.clone(), identity.service_account.clone());
        self.bindings.iter().filter(move |b| {
            b.subjects
                .iter()
                .any(|s| s.namespace == namespace && s.service_account == service_account)
        })
    }

    /// The binding `name` if `identity` is granted it. Unknown and not granted
    /// look the same to the caller, so a pod cannot probe binding names.
    pub fn lookup(&self, identity: &Identity, name: &str) -> Option<&Binding> {
        self.granted(identity).find(|b| b.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
apiVersion: tessera.dev/v1alpha1
kind: Policy
bindings:
  - name: app-config
    subjects:
      - namespace: shop
        serviceAccount: orders
    source:
      kv2:
        mount: secret
        path: shop/orders
        keys: [username, password]
"#;

    fn identity(ns: &str, sa: &str) -> Identity {
        Identity {
            namespace: ns.into(),
            service_account: sa.into(),
            service_account_uid: String::new(),
            pod: None,
            node: None,
            expires_at: 0,
        }
    }

    #[test]
    fn grants_only_named_subjects() {
        let policy = Policy::parse(POLICY, "test").unwrap();
        assert!(
            policy
                .lookup(&identity("shop", "orders"), "app-config")
                .is_some()
        );
        assert!(
            policy
                .lookup(&identity("shop", "billing"), "app-config")
                .is_none()
        );
        assert!(
            policy
                .lookup(&identity("other", "orders"), "app-config")
                .is_none()
        );
        assert!(
            policy
                .lookup(&identity("shop", "orders"), "missing")
                .is_none()
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let text = POLICY.replace("keys:", "kyes:");
        let err = Policy::parse(&text, "test").unwrap_err();
        assert!(matches!(err, PolicyError::Parse { .. }), "{err}");
    }

    #[test]
    fn unsafe_names_are_rejected() {
        for bad in ["../etc", "a/b", "..data", "."] {
            let text = POLICY.replace("app-config", bad);
            let err = Policy::parse(&text, "test").unwrap_err();
            assert!(matches!(err, PolicyError::Invalid { .. }), "{bad}: {err}");
        }
        let text = POLICY.replace("[username, password]", "[\"..data\"]");
        assert!(matches!(
            Policy::parse(&text, "test").unwrap_err(),
            PolicyError::Invalid { .. }
        ));
    }

    #[test]
    fn wrong_api_version_is_rejected() {
        let text = POLICY.replace("v1alpha1", "v9");
        assert!(matches!(
            Policy::parse(&text, "test").unwrap_err(),
            PolicyError::Invalid { .. }
        ));
    }
}
