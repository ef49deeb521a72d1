//! What a pod owner may say about a binding's files, within the policy:
//! `tessera.dev/files.<binding>: "password=db-password"` renames delivered
//! files, `tessera.dev/templates.<binding>` (a YAML map of file to template)
//! adds files rendered from them. Both only reshape what the broker delivers
//! for that binding, so they cannot widen access; the security team may
//! forbid templates (`limits.podTemplates: false`). Checked here at
//! admission, rendered by the sidecar.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;
use tessera_template::Template;

use super::{annotations::BINDINGS, denial::Denial};
use crate::policy::{Kv2Source, Policy, Source};

/// The keys a KV secret has now, as far as the broker knows (its last good
/// read of the secret); `None` when it has not read it.
pub type KvKeys<'a> = dyn Fn(&Kv2Source) -> Option<Vec<String>> + 'a;

/// Prefix of the per-binding rename annotations.
pub const FILES_PREFIX: &str = "tessera.dev/files.";
/// Prefix of the per-binding template annotations.
pub const TEMPLATES_PREFIX: &str = "tessera.dev/templates.";

/// The files a binding delivers, when the policy names its fields or the
/// broker has read the KV secret it delivers whole.
fn delivered(policy: &Policy, binding: &str, kv_keys: &KvKeys<'_>) -> Option<BTreeSet<String>> {
    let binding = policy.binding(binding)?;
    let fields = binding
        .source
        .known_fields()
        .or_else(|| match &binding.source {
            Source::Kv2(kv) => kv_keys(kv),
            _ => None,
        })?;
    let output = &binding.output;
    let mut files: BTreeSet<String> = BTreeSet::new();
    if !output.templates_only {
        files.extend(
            fields
                .iter()
                .map(|f| output.files.get(f).unwrap_or(f).clone()),
        );
    }
    files.extend(output.templates.keys().cloned());
    Some(files)
}

/// Checks the pod's output annotations; the sidecar's `TESSERA_POD_OUTPUT`
/// when there are any.
///
/// # Errors
/// A [`Denial`] naming the annotation: an unlisted binding, an unsafe or
/// clashing file name, a rename or template field the binding does not
/// deliver (for a KV binding without `keys`, the keys the secret has now),
/// a template error, or templates the policy forbids.
pub fn check(
    annotations: &BTreeMap<String, String>,
    bindings: &[String],
    policy: &Policy,
    kv_keys: &KvKeys<'_>,
) -> Result<Option<String>, Denial> {
    let mut out = serde_json::Map::new();
    for (key, value) in annotations {
        let (binding, is_template) = match (
            key.strip_prefix(FILES_PREFIX),
            key.strip_prefix(TEMPLATES_PREFIX),
        ) {
            (Some(binding), _) => (binding, false),
            (_, Some(binding)) => (binding, true),
            _ => continue,
        };
        if !bindings.iter().any(|b| b == binding) {
            return Err(Denial(format!(
                "annotation {key}: binding `{binding}` is not in {BINDINGS}"
            )));
        }
        let known = delivered(policy, binding, kv_keys);
        let entry = out
            .entry(binding.to_owned())
            .or_insert_with(|| json!({ "files": {}, "templates": {} }));
        if is_template {
            if !policy.limits.pod_templates {
                return Err(Denial(format!(
                    "annotation {key}: the policy does not allow per-pod templates (limits.podTemplates: false); ask the policy owners for a template on the binding"
                )));
            }
            let templates = parse_templates(value).map_err(|e| {
                Denial(format!(
                    "annotation {key}: not a map of file name to template: {e}"
                ))
            })?;
            for (file, text) in templates {
                check_name(key, &file)?;
                let template = Template::parse(&text)
                    .map_err(|e| Denial(format!("annotation {key}: template `{file}`: {e}")))?;
                if let Some(known) = &known
                    && let Some(missing) = template.required_fields().find(|f| !known.contains(*f))
                {
                    return Err(Denial(format!(
                        "annotation {key}: template `{file}` uses `{missing}`, which binding `{binding}` does not deliver (it delivers {})",
                        known.iter().cloned().collect::<Vec<_>>().join(", ")
                    )));
                }
                entry["templates"][file] = json!(text);
            }
        } else {
            for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let Some((field, file)) = pair.split_once('=') else {
                    return Err(Denial(format!(
                        "annotation {key}: `{}` is not field=file",
                        pair.escape_debug()
                    )));
                };
                let (field, file) = (field.trim(), file.trim());
                check_name(key, file)?;
                if let Some(known) = &known
                    && !known.contains(field)
                {
                    return Err(Denial(format!(
                        "annotation {key}: binding `{binding}` delivers no `{field}` (it delivers {})",
                        known.iter().cloned().collect::<Vec<_>>().join(", ")
                    )));
                }
                entry["files"][field] = json!(file);
            }
        }
    }
    for (binding, entry) in &out {
        let Some(known) = delivered(policy, binding, kv_keys) else {
            continue;
        };
        let renamed = |file: &String| {
            entry["files"][file.as_str()]
                .as_str()
                .map_or(file.clone(), str::to_owned)
        };
        let mut names: Vec<String> = known.iter().map(renamed).collect();
        if let Some(templates) = entry["templates"].as_object() {
            names.extend(templates.keys().cloned());
        }
        let mut seen = BTreeSet::new();
        if let Some(twice) = names.iter().find(|name| !seen.insert(*name)) {
            return Err(Denial(format!(
                "annotations {FILES_PREFIX}{binding} and {TEMPLATES_PREFIX}{binding}: two files of binding `{binding}` would be named `{twice}`"
            )));
        }
    }
    if out.is_empty() {
        return Ok(None);
    }
    Ok(Some(serde_json::Value::Object(out).to_string()))
}

/// Parses a templates annotation as plain YAML: no aliases (one anchor
/// repeated by aliases is how a small text expands into gigabytes), and a
/// small event budget.
fn parse_templates(value: &str) -> Result<BTreeMap<String, String>, String> {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_aliases = 0;
    budget.max_anchors = 0;
    budget.max_events = 4096;
    let options = serde_saphyr::options! { budget: Some(budget) };
    serde_saphyr::from_str_with_options(value, options).map_err(|e| {
        let text = e.to_string();
        if value.contains('*') && text.contains("budget") {
            "YAML aliases (`*name`) and anchors (`&name`) are not allowed here; write each template out".to_owned()
        } else if value.contains(": {{") {
            // `file: {{ field }}` is a YAML map inside a map, not text.
            "a template starting with `{{` must be quoted (file: \"{{ field }}\")".to_owned()
        } else {
            text
        }
    })
}

fn check_name(key: &str, file: &str) -> Result<(), Denial> {
    if tessera_proto::is_safe_name(file) {
        Ok(())
    } else {
        Err(Denial(format!(
            "annotation {key}: `{}` is not a safe file name (no `/`, not `.` or `..`, no leading `..`)",
            file.escape_debug()
        )))
    }
}
