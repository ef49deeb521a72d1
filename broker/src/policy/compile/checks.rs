//! Values as a policy writes them: durations, TTLs, renewal fractions and
//! file modes, each checked against the limits.

use std::time::Duration;

use crate::policy::{Limits, Problem, at, document::Spanned, format_duration};

/// The longest duration a policy may name (a year): anything longer is a typo.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

pub(super) fn duration(
    file: &str,
    text: &Spanned<String>,
    what: &str,
    problems: &mut Vec<Problem>,
) -> Option<Duration> {
    match humantime::parse_duration(&text.value) {
        Ok(d) if d > MAX_DURATION => {
            problems.push(at(
                file,
                text,
                format!(
                    "{what} `{}` is longer than {} (no credential lives that long)",
                    text.value,
                    format_duration(MAX_DURATION)
                ),
            ));
            None
        }
        Ok(d) if !d.is_zero() => Some(d),
        _ => {
            problems.push(at(
                file,
                text,
                format!("{what} `{}` is not a duration like 15m or 1h", text.value),
            ));
            None
        }
    }
}

pub(super) fn mode(file: &str, text: &Spanned<String>, problems: &mut Vec<Problem>) -> Option<u32> {
    match text.value.as_str() {
        "0400" => Some(0o400),
        "0440" => Some(0o440),
        other => {
            problems.push(at(
                file,
                text,
                format!("mode `{other}` is not allowed (use \"0400\", or \"0440\" with a group)"),
            ));
            None
        }
    }
}

/// A TTL, parsed and checked against the cluster ceiling.
pub(super) fn check_ttl(
    file: &str,
    text: &Spanned<String>,
    limits: &Limits,
    what: &str,
    problems: &mut Vec<Problem>,
) -> Option<Duration> {
    let ttl = duration(file, text, what, problems)?;
    if ttl > limits.max_ttl {
        problems.push(at(
            file,
            text,
            format!(
                "{what} {} exceeds the cluster ceiling {} (lower {what} or raise limits.maxTtl)",
                format_duration(ttl),
                format_duration(limits.max_ttl)
            ),
        ));
        return None;
    }
    Some(ttl)
}

/// A renewal fraction, checked against the cluster's bounds.
pub(super) fn check_fraction(
    file: &str,
    value: &Spanned<f64>,
    limits: &Limits,
    what: &str,
    problems: &mut Vec<Problem>,
) -> Option<f64> {
    // Written so that NaN (`.nan` in YAML) fails it too.
    if !(value.value >= limits.min_renew_fraction && value.value <= limits.max_renew_fraction) {
        problems.push(at(
            file,
            value,
            format!(
                "{what} {} is outside the cluster limits [{}, {}] (adjust it or limits.min/maxRenewFraction)",
                value.value, limits.min_renew_fraction, limits.max_renew_fraction
            ),
        ));
        return None;
    }
    Some(value.value)
}
