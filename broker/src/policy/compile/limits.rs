//! The policy's `limits` block: the ceilings nothing below may exceed.

use std::collections::BTreeSet;

use super::checks::duration;
use crate::policy::{
    DEFAULT_MIN_TTL, ImageUser, Limits, Problem, at,
    document::{LimitsDoc, Spanned},
    format_duration,
};

/// Source kinds this broker knows, as named in `limits.allowedSources`.
const SOURCE_KINDS: &[&str] = &["kv2", "database", "pki", "ssh", "vault"];

/// Applies a `limits` block.
pub(in crate::policy) fn apply_limits(
    file: &str,
    doc: &Spanned<LimitsDoc>,
    limits: &mut Limits,
    problems: &mut Vec<Problem>,
) {
    let l = &doc.value;
    if let Some(max) = l
        .max_ttl
        .as_ref()
        .and_then(|t| duration(file, t, "limits.maxTtl", problems))
    {
        limits.max_ttl = max;
    }
    if let Some(floors) = &l.min_ttl {
        for (kind, text) in &floors.value {
            // Source kinds whose credentials have a TTL: those with a floor.
            let leased = || DEFAULT_MIN_TTL.iter().map(|(kind, _)| *kind);
            if !leased().any(|k| k == kind) {
                problems.push(at(
                    file,
                    floors,
                    format!(
                        "limits.minTtl: `{}` is not a leased source kind (known: {})",
                        crate::text::printable(kind),
                        leased().collect::<Vec<_>>().join(", ")
                    ),
                ));
                continue;
            }
            let what = format!("limits.minTtl.{kind}");
            let Some(floor) = duration(file, text, &what, problems) else {
                continue;
            };
            if floor > limits.max_ttl {
                problems.push(at(
                    file,
                    text,
                    format!(
                        "{what} {} exceeds limits.maxTtl {}",
                        format_duration(floor),
                        format_duration(limits.max_ttl)
                    ),
                ));
                continue;
            }
            limits.min_ttl.insert(kind.clone(), floor);
        }
    }
    for (field, name, target) in [
        (
            &l.min_renew_fraction,
            "minRenewFraction",
            &mut limits.min_renew_fraction,
        ),
        (
            &l.max_renew_fraction,
            "maxRenewFraction",
            &mut limits.max_renew_fraction,
        ),
    ] {
        if let Some(value) = field {
            if value.value.is_finite() && value.value > 0.0 && value.value < 1.0 {
                *target = value.value;
            } else {
                problems.push(at(
                    file,
                    value,
                    format!("limits.{name} {} must be between 0 and 1", value.value),
                ));
            }
        }
    }
    if limits.min_renew_fraction > limits.max_renew_fraction {
        problems.push(at(
            file,
            doc,
            format!(
                "limits.minRenewFraction {} exceeds limits.maxRenewFraction {}",
                limits.min_renew_fraction, limits.max_renew_fraction
            ),
        ));
    }
    if let Some(kinds) = &l.allowed_sources {
        if let Some(bad) = kinds
            .value
            .iter()
            .find(|k| !SOURCE_KINDS.contains(&k.as_str()))
        {
            problems.push(at(
                file,
                kinds,
                format!(
                    "limits.allowedSources: unknown source kind `{bad}` (known: {})",
                    SOURCE_KINDS.join(", ")
                ),
            ));
        }
        limits.allowed_sources = Some(kinds.value.iter().cloned().collect());
    }
    if let Some(mounts) = &l.allowed_mounts {
        limits.allowed_mounts = Some(mounts.iter().cloned().collect::<BTreeSet<_>>());
    }
    if let Some(allowed) = l.pod_templates {
        limits.pod_templates = allowed;
    }
    if let Some(choice) = &l.image_user {
        match choice.value.as_str() {
            "fsGroup" => limits.image_user = ImageUser::FsGroup,
            "refuse" => limits.image_user = ImageUser::Refuse,
            other => problems.push(at(
                file,
                choice,
                format!("limits.imageUser `{other}` is not known (use \"fsGroup\" or \"refuse\")"),
            )),
        }
    }
}
