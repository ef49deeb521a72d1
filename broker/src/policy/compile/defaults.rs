//! The policy's `defaults` block, checked against its limits.

use std::time::Duration;

use super::checks::{check_fraction, check_ttl, mode};
use crate::policy::{
    Limits, Problem,
    document::{DefaultsDoc, Spanned},
};

/// Defaults after their checks.
pub(in crate::policy) struct Defaults {
    pub(super) ttl: Option<Duration>,
    pub(super) renew_fraction: Option<f64>,
    pub(super) mode: Option<u32>,
    pub(super) group: Option<u32>,
}

/// Checks a `defaults` block against the limits.
pub(in crate::policy) fn check_defaults(
    file: &str,
    doc: &Spanned<DefaultsDoc>,
    limits: &Limits,
    problems: &mut Vec<Problem>,
) -> Defaults {
    let d = &doc.value;
    Defaults {
        ttl: d
            .ttl
            .as_ref()
            .and_then(|t| check_ttl(file, t, limits, "defaults.ttl", problems)),
        renew_fraction: d
            .renew_fraction
            .as_ref()
            .and_then(|f| check_fraction(file, f, limits, "defaults.renewFraction", problems)),
        mode: d.mode.as_ref().and_then(|m| mode(file, m, problems)),
        group: d.group,
    }
}
