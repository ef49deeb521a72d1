//! Reports for reviewers: what an identity gets and why (`policy explain`), and
//! what access a change grants or removes (`policy diff`).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    time::Duration,
};

use serde::Serialize;

use super::{Binding, Policy, format_duration};
use crate::identity::Identity;

fn describe_output(binding: &Binding) -> String {
    let o = &binding.output;
    let mut parts = Vec::new();
    if o.templates_only {
        parts.push("raw fields not written".to_owned());
    } else if o.files.is_empty() {
        parts.push("one file per field".to_owned());
    } else {
        let renames: Vec<String> = o.files.iter().map(|(f, n)| format!("{f} -> {n}")).collect();
        parts.push(format!("renamed {}", renames.join(", ")));
    }
    for (name, template) in &o.templates {
        // Quoted as JSON so a newline in the template stays on one line.
        let text = serde_json::Value::String(template.to_string());
        parts.push(format!("template {name} = {text}"));
    }
    let mode = match o.mode {
        Some(m) => format!("mode {m:04o}"),
        None => "mode from the sidecar (0400, or 0440 with --group)".to_owned(),
    };
    parts.push(mode);
    if let Some(g) = o.group {
        parts.push(format!("group {g}"));
    }
    parts.join("; ")
}

/// A limit's set as a reviewer reads it: `any` when unset, else its members.
fn describe_set(set: Option<&BTreeSet<String>>) -> String {
    match set {
        None => "any".to_owned(),
        Some(set) if set.is_empty() => "none".to_owned(),
        Some(set) => set
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// What an identity gets from a policy and why (`policy explain`): printed
/// as text, or serialized for CI bots (`--output json`).
#[derive(Debug, Serialize)]
pub struct Explanation {
    /// The identity's cluster (`--cluster`), when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The namespace of the identity explained.
    pub namespace: String,
    /// The service account of the identity explained.
    pub service_account: String,
    /// The pod labels assumed; `None`: subjects that require labels do not match.
    pub pod_labels: Option<BTreeMap<String, String>>,
    /// The bindings granted, in policy order.
    pub granted: Vec<Grant>,
    /// The policy's bindings this identity does not get.
    pub not_granted: Vec<String>,
}

/// One granted binding and where each of its settings comes from.
#[derive(Debug, Serialize)]
pub struct Grant {
    /// The binding's name in the policy.
    pub binding: String,
    /// `file:line` of its definition.
    pub defined_at: String,
    /// The subject that matched the identity.
    pub subject: String,
    /// The Vault source it reads.
    pub source: String,
    /// The credential's TTL, e.g. `15m`.
    pub ttl: String,
    /// Where the TTL comes from.
    pub ttl_origin: String,
    /// The policy's TTL ceiling (`limits.maxTtl`).
    pub max_ttl: String,
    /// The floor a pod or caller may narrow the TTL to
    /// (`limits.minTtl.<kind>`); leased sources only.
    pub min_ttl: Option<String>,
    /// The fraction of the TTL after which it is renewed.
    pub renew_fraction: f64,
    /// Where the renew fraction comes from.
    pub renew_fraction_origin: String,
    /// The policy's bounds on the renew fraction.
    pub renew_fraction_limits: [f64; 2],
    /// How often a KV secret is checked, when the binding sets it.
    pub refresh_interval: Option<String>,
    /// The files the sidecar writes.
    pub files: String,
    /// Vault's second gate, when the binding has one: the pod must also
    /// be allowed by Vault's policy for this role.
    pub vault_gate: Option<String>,
}

impl Explanation {
    /// Explains what `identity` gets from `policy`, binding by binding.
    pub fn of(policy: &Policy, identity: &Identity) -> Self {
        let limits = &policy.limits;
        let mut granted = Vec::new();
        let mut not_granted = Vec::new();
        for binding in &policy.bindings {
            let Some(subject) = binding.matching_subject(identity) else {
                not_granted.push(binding.name.clone());
                continue;
            };
            granted.push(Grant {
                binding: binding.name.clone(),
                defined_at: binding.defined_at.clone(),
                subject: subject.to_string(),
                source: binding.source.to_string(),
                ttl: format_duration(binding.ttl),
                ttl_origin: binding.ttl_origin.to_string(),
                max_ttl: format_duration(limits.max_ttl),
                min_ttl: binding
                    .source
                    .is_leased()
                    .then(|| format_duration(binding.min_ttl)),
                renew_fraction: binding.renew_fraction,
                renew_fraction_origin: binding.renew_fraction_origin.to_string(),
                renew_fraction_limits: [limits.min_renew_fraction, limits.max_renew_fraction],
                refresh_interval: binding.refresh_interval.map(format_duration),
                files: describe_output(binding),
                vault_gate: binding.gate.as_ref().map(ToString::to_string),
            });
        }
        Self {
            cluster: None,
            namespace: identity.namespace.clone(),
            service_account: identity.service_account.clone(),
            pod_labels: identity
                .pod_labels
                .clone()
                .filter(|labels| !labels.is_empty())
                .map(|labels| labels.into_iter().collect()),
            granted,
            not_granted,
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(out, "identity {}/{}", self.namespace, self.service_account)?;
        if let Some(cluster) = &self.cluster {
            writeln!(out, "cluster {cluster}")?;
        }
        match &self.pod_labels {
            Some(labels) => {
                let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                writeln!(out, "pod labels {}", shown.join(", "))?;
            }
            None => writeln!(
                out,
                "pod labels none (subjects that require podLabels do not match)"
            )?,
        }
        for grant in &self.granted {
            writeln!(out, "\ngranted {} ({})", grant.binding, grant.defined_at)?;
            writeln!(out, "  subject         {}", grant.subject)?;
            writeln!(out, "  source          {}", grant.source)?;
            let floor = match &grant.min_ttl {
                Some(min) => format!("floor limits.minTtl {min}, "),
                None => String::new(),
            };
            writeln!(
                out,
                "  ttl             {} ({}; {floor}ceiling limits.maxTtl {})",
                grant.ttl, grant.ttl_origin, grant.max_ttl
            )?;
            let [low, high] = grant.renew_fraction_limits;
            writeln!(
                out,
                "  renew fraction  {} ({}; limits [{low}, {high}])",
                grant.renew_fraction, grant.renew_fraction_origin
            )?;
            if let Some(interval) = &grant.refresh_interval {
                writeln!(out, "  refresh         every {interval}")?;
            }
            writeln!(out, "  files           {}", grant.files)?;
            if let Some(gate) = &grant.vault_gate {
                writeln!(
                    out,
                    "  vault gate      {gate} (Vault's policy for the pod must allow it too)"
                )?;
            }
        }
        if self.granted.is_empty() {
            writeln!(
                out,
                "\nno binding names this identity: everything is denied (deny by default)"
            )?;
        }
        if !self.not_granted.is_empty() {
            writeln!(out, "\nnot granted {}", self.not_granted.join(", "))?;
        }
        Ok(())
    }
}

/// One difference in access between two policies (`policy diff`).
#[derive(Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Change {
    /// A subject gains a binding.
    Grant {
        /// Who, as the policy writes it.
        subject: String,
        /// The binding now granted.
        binding: String,
        /// The binding's source, as `policy explain` shows it.
        source: String,
    },
    /// A subject loses a binding.
    Remove {
        /// Who, as the policy writes it.
        subject: String,
        /// The binding no longer granted.
        binding: String,
        /// The binding's source, as `policy explain` shows it.
        source: String,
    },
    /// A setting of a binding present in both changed.
    Setting {
        /// The binding whose setting changed.
        binding: String,
        /// The setting, as the policy spells it (`ttl`, `files`, ...).
        setting: String,
        /// The value in the old policy.
        from: String,
        /// The value in the new policy.
        to: String,
    },
    /// A policy-wide limit changed.
    Limit {
        /// The limit, as the policy spells it (`maxTtl`, ...).
        limit: String,
        /// The value in the old policy.
        from: String,
        /// The value in the new policy.
        to: String,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Grant {
                subject,
                binding,
                source,
            } => write!(f, "+ grant   {subject} -> {binding} ({source})"),
            Change::Remove {
                subject,
                binding,
                source,
            } => write!(f, "- remove  {subject} -> {binding} ({source})"),
            Change::Setting {
                binding,
                setting,
                from,
                to,
            } => write!(f, "~ change  {binding}: {setting} {from} -> {to}"),
            Change::Limit { limit, from, to } => write!(f, "~ limits  {limit} {from} -> {to}"),
        }
    }
}

fn access(policy: &Policy) -> BTreeSet<(String, String, String)> {
    policy
        .bindings
        .iter()
        .flat_map(|b| {
            b.subjects
                .iter()
                .map(move |s| (s.to_string(), b.name.clone(), b.source.to_string()))
        })
        .collect()
}

/// The access granted and removed by going from `old` to `new`, and changes to
/// the settings of bindings present in both. Empty when nothing changed.
pub fn diff(old: &Policy, new: &Policy) -> Vec<Change> {
    let (before, after) = (access(old), access(new));
    let mut lines = Vec::new();
    for (subject, binding, source) in after.difference(&before) {
        lines.push(Change::Grant {
            subject: subject.clone(),
            binding: binding.clone(),
            source: source.clone(),
        });
    }
    for (subject, binding, source) in before.difference(&after) {
        lines.push(Change::Remove {
            subject: subject.clone(),
            binding: binding.clone(),
            source: source.clone(),
        });
    }
    for new_binding in &new.bindings {
        let Some(old_binding) = old.bindings.iter().find(|b| b.name == new_binding.name) else {
            continue;
        };
        let name = &new_binding.name;
        let mut change = |what: &str, from: String, to: String| {
            if from != to {
                lines.push(Change::Setting {
                    binding: name.clone(),
                    setting: what.to_owned(),
                    from,
                    to,
                });
            }
        };
        change(
            "ttl",
            format_duration(old_binding.ttl),
            format_duration(new_binding.ttl),
        );
        change(
            "renewFraction",
            old_binding.renew_fraction.to_string(),
            new_binding.renew_fraction.to_string(),
        );
        change(
            "overlap",
            format_duration(old_binding.overlap),
            format_duration(new_binding.overlap),
        );
        let refresh = |b: &Binding| {
            b.refresh_interval
                .map_or_else(|| "default".to_owned(), format_duration)
        };
        change(
            "refreshInterval",
            refresh(old_binding),
            refresh(new_binding),
        );
        change(
            "files",
            describe_output(old_binding),
            describe_output(new_binding),
        );
        let gate = |b: &Binding| {
            b.gate
                .as_ref()
                .map_or_else(|| "none".to_owned(), ToString::to_string)
        };
        change("vaultGate", gate(old_binding), gate(new_binding));
        let unbound = |b: &Binding| if b.allow_unbound { "allow" } else { "refuse" }.to_owned();
        change(
            "callers.unbound",
            unbound(old_binding),
            unbound(new_binding),
        );
    }
    let (a, b) = (&old.limits, &new.limits);
    let mut limit = |what: &str, from: String, to: String| {
        if from != to {
            lines.push(Change::Limit {
                limit: what.to_owned(),
                from,
                to,
            });
        }
    };
    limit(
        "maxTtl",
        format_duration(a.max_ttl),
        format_duration(b.max_ttl),
    );
    limit(
        "minTtl",
        describe_floors(&a.min_ttl),
        describe_floors(&b.min_ttl),
    );
    limit(
        "minRenewFraction",
        a.min_renew_fraction.to_string(),
        b.min_renew_fraction.to_string(),
    );
    limit(
        "maxRenewFraction",
        a.max_renew_fraction.to_string(),
        b.max_renew_fraction.to_string(),
    );
    limit(
        "allowedSources",
        describe_set(a.allowed_sources.as_ref()),
        describe_set(b.allowed_sources.as_ref()),
    );
    limit(
        "allowedMounts",
        describe_set(a.allowed_mounts.as_ref()),
        describe_set(b.allowed_mounts.as_ref()),
    );
    limit(
        "imageUser",
        a.image_user.to_string(),
        b.image_user.to_string(),
    );
    lines
}

/// `limits.minTtl` as one line: `database 5m, pki 5m, ssh 5m, vault 5m`.
fn describe_floors(floors: &BTreeMap<String, Duration>) -> String {
    let shown: Vec<String> = floors
        .iter()
        .map(|(kind, floor)| format!("{kind} {}", format_duration(*floor)))
        .collect();
    shown.join(", ")
}
