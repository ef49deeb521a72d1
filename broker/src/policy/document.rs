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
    pub(super) api_version: Spanned<String>,
    pub(super) kind: Spanned<String>,
    pub(super) limits: Option<Spanned<LimitsDoc>>,
    pub(super) defaults: Option<Spanned<DefaultsDoc>>,
    #[serde(default)]
    pub(super) bindings: Vec<BindingDoc>,
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

/// Parses one document; a syntax error or unknown key is `(line, column, message)`.
pub(super) fn parse(text: &str) -> Result<Document, (u64, u64, String)> {
    let doc: Document = serde_saphyr::from_str(text).map_err(|e| {
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
    })?;
    if doc.api_version.value != API_VERSION {
        return Err((
            doc.api_version.referenced.line(),
            doc.api_version.referenced.column(),
            format!(
                "apiVersion `{}` is not supported (use `{API_VERSION}`)",
                doc.api_version.value
            ),
        ));
    }
    if doc.kind.value != "Policy" {
        return Err((
            doc.kind.referenced.line(),
            doc.kind.referenced.column(),
            format!("kind `{}` is not `Policy`", doc.kind.value),
        ));
    }
    Ok(doc)
}
