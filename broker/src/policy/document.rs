//! The policy as written: its YAML shape, with source positions. The checks
//! that turn it into [`super::Binding`]s are in `compile`.

use std::collections::BTreeMap;

use serde::Deserialize;
pub use serde_saphyr::Spanned;

/// The only policy `apiVersion` this broker reads.
pub const API_VERSION: &str = "tessera.dev/v1alpha1";

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Document {
    #[serde(rename = "apiVersion")]
    _api_version: serde::de::IgnoredAny,
    #[serde(rename = "kind")]
    _kind: serde::de::IgnoredAny,
    pub(super) limits: Option<Spanned<LimitsDoc>>,
    pub(super) defaults: Option<Spanned<DefaultsDoc>>,
    #[serde(default)]
    pub(super) bindings: Vec<BindingDoc>,
    #[serde(default)]
    pub(super) delegations: Vec<Spanned<DelegationDoc>>,
}

/// What a policy says, whether written as a `Policy` file or as a
/// `ClusterAccessPolicy`'s `spec`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct PolicyBody {
    pub(super) limits: Option<Spanned<LimitsDoc>>,
    pub(super) defaults: Option<Spanned<DefaultsDoc>>,
    #[serde(default)]
    pub(super) bindings: Vec<BindingDoc>,
    #[serde(default)]
    pub(super) delegations: Vec<Spanned<DelegationDoc>>,
}

impl From<Document> for PolicyBody {
    fn from(doc: Document) -> Self {
        Self {
            limits: doc.limits,
            defaults: doc.defaults,
            bindings: doc.bindings,
            delegations: doc.delegations,
        }
    }
}

/// `delegations:` entry: what namespaces may define for themselves in
/// `AccessBinding`s.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct DelegationDoc {
    pub(super) namespaces: Spanned<Vec<String>>,
    #[serde(default)]
    pub(super) kv2: Vec<Spanned<KvGrantDoc>>,
    #[serde(default)]
    pub(super) database: Vec<Spanned<RoleGrantDoc>>,
    #[serde(default)]
    pub(super) pki: Vec<Spanned<RoleGrantDoc>>,
    pub(super) max_ttl: Option<Spanned<String>>,
    pub(super) vault_namespace: Option<String>,
}

/// A KV v2 mount and the path prefix delegated under it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct KvGrantDoc {
    pub(super) mount: String,
    pub(super) path_prefix: String,
}

/// An engine mount and the roles (a glob) delegated on it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RoleGrantDoc {
    pub(super) mount: String,
    pub(super) role: String,
}

/// `kind: ClusterAccessPolicy`: the security team's rules as a
/// cluster-scoped resource; its `spec` is a policy document's body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ClusterPolicyResource {
    #[serde(rename = "metadata")]
    _metadata: serde::de::IgnoredAny,
    spec: PolicyBody,
    #[serde(rename = "apiVersion")]
    _api_version: serde::de::IgnoredAny,
    #[serde(rename = "kind")]
    _kind: serde::de::IgnoredAny,
    #[serde(default, rename = "status")]
    _status: Option<serde::de::IgnoredAny>,
}

/// `kind: AccessBinding`: one binding an app team declares in its own
/// namespace, for its own service accounts.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AccessBindingResource {
    metadata: MetadataDoc,
    spec: Spanned<AccessBindingSpec>,
    #[serde(rename = "apiVersion")]
    _api_version: serde::de::IgnoredAny,
    #[serde(rename = "kind")]
    _kind: serde::de::IgnoredAny,
    #[serde(default, rename = "status")]
    _status: Option<serde::de::IgnoredAny>,
}

/// The parts of `metadata` the policy uses; the rest is the API server's.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct MetadataDoc {
    pub(super) name: Spanned<String>,
    pub(super) namespace: Option<String>,
}

/// An `AccessBinding`'s `spec`: a binding whose subjects are service
/// accounts of the resource's namespace.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct AccessBindingSpec {
    #[serde(default)]
    #[allow(dead_code)] // documentation for reviewers; not used by the broker
    pub(super) description: Option<String>,
    pub(super) service_accounts: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(super) pod_labels: BTreeMap<String, String>,
    pub(super) source: Spanned<SourceDoc>,
    pub(super) ttl: Option<Spanned<String>>,
    pub(super) renew_fraction: Option<Spanned<f64>>,
    pub(super) overlap: Option<Spanned<String>>,
    pub(super) refresh_interval: Option<Spanned<String>>,
    pub(super) output: Option<Spanned<OutputDoc>>,
    pub(super) vault_gate: Option<Spanned<GateDoc>>,
}

impl AccessBindingSpec {
    /// The binding as a policy file would write it: named after the
    /// resource, for its service accounts in `namespace`.
    pub(super) fn into_binding(self, name: Spanned<String>, namespace: &str) -> BindingDoc {
        let accounts = self.service_accounts;
        let subjects = accounts
            .value
            .into_iter()
            .map(|account| SubjectDoc {
                cluster: None,
                namespace: Spanned::new(namespace.to_owned(), account.referenced, account.defined),
                service_account: account,
                pod_labels: self.pod_labels.clone(),
            })
            .collect();
        BindingDoc {
            name,
            description: self.description,
            subjects: Spanned::new(subjects, accounts.referenced, accounts.defined),
            source: self.source,
            ttl: self.ttl,
            renew_fraction: self.renew_fraction,
            overlap: self.overlap,
            refresh_interval: self.refresh_interval,
            output: self.output,
            callers: None,
            vault_gate: self.vault_gate,
        }
    }
}

/// One parsed document: a policy file, or one of the two resources.
pub(super) enum Parsed {
    /// `kind: Policy`.
    Policy(PolicyBody),
    /// `kind: ClusterAccessPolicy`.
    ClusterPolicy(PolicyBody),
    /// `kind: AccessBinding` (its namespace is checked to be there).
    AccessBinding {
        metadata: MetadataDoc,
        spec: Box<Spanned<AccessBindingSpec>>,
    },
}

/// The kinds this broker reads, as `apiVersion`/`kind` name them.
pub const KINDS: &[&str] = &["Policy", "ClusterAccessPolicy", "AccessBinding"];

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    api_version: Spanned<String>,
    kind: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct LimitsDoc {
    pub(super) max_ttl: Option<Spanned<String>>,
    pub(super) min_ttl: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
    pub(super) min_renew_fraction: Option<Spanned<f64>>,
    pub(super) max_renew_fraction: Option<Spanned<f64>>,
    pub(super) allowed_sources: Option<Spanned<Vec<String>>>,
    pub(super) allowed_mounts: Option<Vec<String>>,
    pub(super) image_user: Option<Spanned<String>>,
    pub(super) pod_templates: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct DefaultsDoc {
    pub(super) ttl: Option<Spanned<String>>,
    pub(super) renew_fraction: Option<Spanned<f64>>,
    pub(super) mode: Option<Spanned<String>>,
    pub(super) group: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct BindingDoc {
    pub(super) name: Spanned<String>,
    #[serde(default)]
    #[allow(dead_code)] // documentation for reviewers; not used by the broker
    pub(super) description: Option<String>,
    pub(super) subjects: Spanned<Vec<SubjectDoc>>,
    pub(super) source: Spanned<SourceDoc>,
    pub(super) ttl: Option<Spanned<String>>,
    pub(super) renew_fraction: Option<Spanned<f64>>,
    pub(super) overlap: Option<Spanned<String>>,
    pub(super) refresh_interval: Option<Spanned<String>>,
    pub(super) output: Option<Spanned<OutputDoc>>,
    pub(super) callers: Option<Spanned<CallersDoc>>,
    pub(super) vault_gate: Option<Spanned<GateDoc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct GateDoc {
    pub(super) mount: String,
    pub(super) role: String,
    pub(super) namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct CallersDoc {
    pub(super) unbound: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct SubjectDoc {
    pub(super) cluster: Option<Spanned<String>>,
    pub(super) namespace: Spanned<String>,
    pub(super) service_account: Spanned<String>,
    #[serde(default)]
    pub(super) pod_labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) enum SourceDoc {
    Kv2(Kv2Doc),
    Database(DatabaseDoc),
    Pki(PkiDoc),
    Ssh(SshDoc),
    Vault(VaultDoc),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct SshDoc {
    pub(super) mount: String,
    pub(super) role: String,
    #[serde(default)]
    pub(super) principals: Vec<String>,
    #[serde(default)]
    pub(super) extensions: BTreeMap<String, String>,
    pub(super) namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct VaultDoc {
    pub(super) path: String,
    pub(super) operation: Option<String>,
    #[serde(default)]
    pub(super) data: BTreeMap<String, String>,
    pub(super) fields: Option<Vec<String>>,
    pub(super) namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct DatabaseDoc {
    pub(super) mount: String,
    pub(super) role: String,
    pub(super) namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct PkiDoc {
    pub(super) mount: String,
    pub(super) role: String,
    pub(super) common_name: String,
    #[serde(default)]
    pub(super) alt_names: Vec<String>,
    pub(super) key: Option<Spanned<String>>,
    pub(super) namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Kv2Doc {
    pub(super) mount: String,
    pub(super) path: String,
    pub(super) keys: Option<Vec<String>>,
    pub(super) namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct OutputDoc {
    #[serde(default)]
    pub(super) files: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) templates: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) templates_only: bool,
    pub(super) mode: Option<Spanned<String>>,
    pub(super) group: Option<u32>,
}

fn located(e: &serde_saphyr::Error) -> (u64, u64, String) {
    let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
    let text = e.without_snippet().to_string();
    let message = text
        .strip_prefix("error: ")
        .unwrap_or(&text)
        .split_once(": ")
        .filter(|(prefix, _)| prefix.starts_with("line "))
        .map_or(text.as_str(), |(_, rest)| rest)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    (line, column, message)
}

/// Parses one document of any of [`KINDS`]; a syntax error or unknown key is
/// `(line, column, message)`.
pub(super) fn parse(text: &str) -> Result<Parsed, (u64, u64, String)> {
    // The header skips every other value: one that only the full parse
    // judges (a `.nan`) must not fail here.
    let mut lenient = serde_saphyr::Options::default();
    lenient.non_finite_float_policy = serde_saphyr::NonFiniteFloatPolicy::PassThrough;
    let header: Header =
        serde_saphyr::from_str_with_options(text, lenient).map_err(|e| located(&e))?;
    if header.api_version.value != API_VERSION {
        return Err((
            header.api_version.referenced.line(),
            header.api_version.referenced.column(),
            format!(
                "apiVersion `{}` is not supported (use `{API_VERSION}`)",
                header.api_version.value
            ),
        ));
    }
    match header.kind.value.as_str() {
        "Policy" => {
            let doc: Document = serde_saphyr::from_str(text).map_err(|e| located(&e))?;
            Ok(Parsed::Policy(doc.into()))
        }
        "ClusterAccessPolicy" => {
            let doc: ClusterPolicyResource =
                serde_saphyr::from_str(text).map_err(|e| located(&e))?;
            Ok(Parsed::ClusterPolicy(doc.spec))
        }
        "AccessBinding" => {
            let doc: AccessBindingResource =
                serde_saphyr::from_str(text).map_err(|e| located(&e))?;
            if doc.metadata.namespace.as_deref().is_none_or(str::is_empty) {
                let at = &doc.metadata.name.referenced;
                return Err((
                    at.line(),
                    at.column(),
                    "an AccessBinding needs metadata.namespace (its bindings are for that namespace's service accounts)".to_owned(),
                ));
            }
            Ok(Parsed::AccessBinding {
                metadata: doc.metadata,
                spec: Box::new(doc.spec),
            })
        }
        other => Err((
            header.kind.referenced.line(),
            header.kind.referenced.column(),
            format!("kind `{other}` is not one of {}", KINDS.join(", ")),
        )),
    }
}
