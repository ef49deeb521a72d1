//! Reports for reviewers: what an identity gets and why (`policy explain`), and
//! what access a change grants or removes (`policy diff`).

use std::{collections::BTreeSet, fmt::Write};

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
    if !o.templates.is_empty() {
        let names: Vec<&str> = o.templates.keys().map(String::as_str).collect();
        parts.push(format!("templates {}", names.join(", ")));
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

/// Explains what `identity` gets from `policy`, binding by binding.
pub fn explain(policy: &Policy, identity: &Identity) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "identity {}/{}",
        identity.namespace, identity.service_account
    );
    match &identity.pod_labels {
        Some(labels) if !labels.is_empty() => {
            let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(out, "pod labels {}", shown.join(", "));
        }
        _ => {
            let _ = writeln!(
                out,
                "pod labels none (subjects that require podLabels do not match)"
            );
        }
    }
    let limits = &policy.limits;
    let mut denied = Vec::new();
    let mut granted = 0;
    for binding in &policy.bindings {
        let Some(subject) = binding.matching_subject(identity) else {
            denied.push(binding.name.as_str());
            continue;
        };
        granted += 1;
        let _ = writeln!(out, "\ngranted {} ({})", binding.name, binding.defined_at);
        let _ = writeln!(out, "  subject         {subject}");
        let _ = writeln!(out, "  source          {}", binding.source);
        let _ = writeln!(
            out,
            "  ttl             {} ({}; ceiling limits.maxTtl {})",
            format_duration(binding.ttl),
            binding.ttl_origin,
            format_duration(limits.max_ttl)
        );
        let _ = writeln!(
            out,
            "  renew fraction  {} ({}; limits [{}, {}])",
            binding.renew_fraction,
            binding.renew_fraction_origin,
            limits.min_renew_fraction,
            limits.max_renew_fraction
        );
        if let Some(interval) = binding.refresh_interval {
            let _ = writeln!(out, "  refresh         every {}", format_duration(interval));
        }
        let _ = writeln!(out, "  files           {}", describe_output(binding));
    }
    if granted == 0 {
        let _ = writeln!(
            out,
            "\nno binding names this identity: everything is denied (deny by default)"
        );
    }
    if !denied.is_empty() {
        let _ = writeln!(out, "\nnot granted {}", denied.join(", "));
    }
    out
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
pub fn diff(old: &Policy, new: &Policy) -> Vec<String> {
    let (before, after) = (access(old), access(new));
    let mut lines = Vec::new();
    for (subject, binding, source) in after.difference(&before) {
        lines.push(format!("+ grant   {subject} -> {binding} ({source})"));
    }
    for (subject, binding, source) in before.difference(&after) {
        lines.push(format!("- remove  {subject} -> {binding} ({source})"));
    }
    for new_binding in &new.bindings {
        let Some(old_binding) = old.bindings.iter().find(|b| b.name == new_binding.name) else {
            continue;
        };
        let name = &new_binding.name;
        let mut change = |what: &str, a: String, b: String| {
            if a != b {
                lines.push(format!("~ change  {name}: {what} {a} -> {b}"));
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
                .map_or_else(|| "default".to_owned(), |d| format_duration(d).to_string())
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
    }
    let (a, b) = (&old.limits, &new.limits);
    let mut limit = |what: &str, x: String, y: String| {
        if x != y {
            lines.push(format!("~ limits  {what} {x} -> {y}"));
        }
    };
    limit(
        "maxTtl",
        format_duration(a.max_ttl),
        format_duration(b.max_ttl),
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
        format!("{:?}", a.allowed_sources),
        format!("{:?}", b.allowed_sources),
    );
    limit(
        "allowedMounts",
        format!("{:?}", a.allowed_mounts),
        format!("{:?}", b.allowed_mounts),
    );
    lines
}
