//! A binding's timing: TTL, renew fraction, rotation overlap, KV refresh.

use std::time::Duration;

use super::{
    checks::{check_fraction, check_ttl, duration},
    defaults::Defaults,
};
use crate::policy::{
    BUILT_IN_OVERLAP, BUILT_IN_RENEW_FRACTION, BUILT_IN_TTL, Limits, Origin, Problem, Source, at,
    document::{BindingDoc, Spanned},
    format_duration,
};

/// A binding's timing after its checks.
pub(super) struct Timing {
    pub(super) ttl: Duration,
    pub(super) ttl_origin: Origin,
    pub(super) min_ttl: Duration,
    pub(super) renew_fraction: f64,
    pub(super) renew_fraction_origin: Origin,
    pub(super) overlap: Duration,
    pub(super) refresh_interval: Option<Duration>,
}

/// `ttl`, `renewFraction`, `overlap` and `refreshInterval`: the binding's,
/// else the defaults', else built in; each checked against the limits.
pub(super) fn compile_timing(
    file: &str,
    raw: &BindingDoc,
    name: &str,
    source: &Source,
    limits: &Limits,
    defaults: Option<&Defaults>,
    problems: &mut Vec<Problem>,
) -> Timing {
    let (ttl, ttl_origin) = match (&raw.ttl, defaults.and_then(|d| d.ttl)) {
        (Some(t), _) => (
            check_ttl(file, t, limits, "ttl", problems).unwrap_or(BUILT_IN_TTL),
            Origin::Binding,
        ),
        (None, Some(d)) => (d, Origin::Default),
        (None, None) => (BUILT_IN_TTL.min(limits.max_ttl), Origin::BuiltIn),
    };
    let min_ttl = limits.min_ttl_for(source.kind());
    if source.is_leased() && ttl < min_ttl {
        let origin = if raw.ttl.is_some() {
            ""
        } else {
            " (from defaults.ttl)"
        };
        let message = format!(
            "binding `{name}`: ttl {}{origin} is below the floor {} for {} credentials (raise the ttl or lower limits.minTtl.{})",
            format_duration(ttl),
            format_duration(min_ttl),
            source.kind(),
            source.kind()
        );
        problems.push(match &raw.ttl {
            Some(t) => at(file, t, message),
            None => at(file, &raw.name, message),
        });
    }
    let (renew_fraction, renew_fraction_origin) =
        match (&raw.renew_fraction, defaults.and_then(|d| d.renew_fraction)) {
            (Some(f), _) => (
                check_fraction(file, f, limits, "renewFraction", problems)
                    .unwrap_or(BUILT_IN_RENEW_FRACTION),
                Origin::Binding,
            ),
            (None, Some(d)) => (d, Origin::Default),
            (None, None) => (
                // Not `clamp`: it panics on limits in the wrong order, which
                // are reported as a problem of their own.
                BUILT_IN_RENEW_FRACTION
                    .max(limits.min_renew_fraction)
                    .min(limits.max_renew_fraction),
                Origin::BuiltIn,
            ),
        };

    let overlap = match &raw.overlap {
        Some(text) => duration(file, text, "overlap", problems).unwrap_or(BUILT_IN_OVERLAP),
        None => BUILT_IN_OVERLAP.min(ttl / 4),
    };
    if let Some(text) = &raw.overlap
        && overlap >= ttl
    {
        problems.push(at(
            file,
            text,
            format!(
                "overlap {} must be shorter than the ttl {}",
                format_duration(overlap),
                format_duration(ttl)
            ),
        ));
    }

    let refresh_interval = raw
        .refresh_interval
        .as_ref()
        .and_then(|text| check_refresh_interval(file, text, name, source, problems));

    Timing {
        ttl,
        ttl_origin,
        min_ttl,
        renew_fraction,
        renew_fraction_origin,
        overlap,
        refresh_interval,
    }
}

/// Shortest and longest `refreshInterval`: Vault is not asked more than
/// once a second per secret, nor a change left unseen more than a day.
const REFRESH_BOUNDS: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(24 * 3600));

/// A binding's `refreshInterval`, checked: only KV and `vault:` sources
/// are polled (a `vault:` answer without a lease is read again at it).
fn check_refresh_interval(
    file: &str,
    text: &Spanned<String>,
    name: &str,
    source: &Source,
    problems: &mut Vec<Problem>,
) -> Option<Duration> {
    if !matches!(source, Source::Kv2(_) | Source::Vault(_)) {
        problems.push(at(
            file,
            text,
            format!(
                "binding `{name}`: refreshInterval applies to kv2 and vault sources (leased credentials follow ttl and renewFraction)"
            ),
        ));
        return None;
    }
    let interval = duration(file, text, "refreshInterval", problems)?;
    if !(REFRESH_BOUNDS.0..=REFRESH_BOUNDS.1).contains(&interval) {
        problems.push(at(
            file,
            text,
            format!(
                "binding `{name}`: refreshInterval {} must be between {} and {}",
                format_duration(interval),
                format_duration(REFRESH_BOUNDS.0),
                format_duration(REFRESH_BOUNDS.1)
            ),
        ));
        return None;
    }
    Some(interval)
}
