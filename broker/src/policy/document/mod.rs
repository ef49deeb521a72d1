//! The policy as written (YAML, with source positions) and its checks.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use serde::Deserialize;
pub use serde_saphyr::Spanned;

use super::{
    BUILT_IN_OVERLAP, BUILT_IN_RENEW_FRACTION, BUILT_IN_TTL, Binding, DatabaseSource, ImageUser,
    Kv2Source, Limits, Origin, PKI_NAME_FIELDS, PkiSource, Problem, Source, Subject, at,
    format_duration, glob, render::Template, safe,
};

mod output;

use output::compile_output;

/// The only policy `apiVersion` this broker reads.
pub const API_VERSION: &str = "tessera.dev/v1alpha1";

/// Source kinds this broker knows, as named in `limits.allowedSources`.
const SOURCE_KINDS: &[&str] = &["kv2", "database", "pki"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Document {
    api_version: Spanned<String>,
    kind: Spanned<String>,
    pub(super) limits: Option<Spanned<LimitsDoc>>,
    pub(super) defaults: Option<Spanned<DefaultsDoc>>,
    #[serde(default)]
    pub(super) bindings: Vec<BindingDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct LimitsDoc {
    max_ttl: Option<Spanned<String>>,
    min_renew_fraction: Option<Spanned<f64>>,
    max_renew_fraction: Option<Spanned<f64>>,
    allowed_sources: Option<Spanned<Vec<String>>>,
    allowed_mounts: Option<Vec<String>>,
    image_user: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct DefaultsDoc {
    ttl: Option<Spanned<String>>,
    renew_fraction: Option<Spanned<f64>>,
    mode: Option<Spanned<String>>,
    group: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct BindingDoc {
    pub(super) name: Spanned<String>,
    #[serde(default)]
    #[allow(dead_code)] // documentation for reviewers; not used by the broker
    description: Option<String>,
    subjects: Spanned<Vec<SubjectDoc>>,
    source: Spanned<SourceDoc>,
    ttl: Option<Spanned<String>>,
    renew_fraction: Option<Spanned<f64>>,
    overlap: Option<Spanned<String>>,
    refresh_interval: Option<Spanned<String>>,
    output: Option<Spanned<OutputDoc>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SubjectDoc {
    namespace: Spanned<String>,
    service_account: Spanned<String>,
    #[serde(default)]
    pod_labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
enum SourceDoc {
    Kv2(Kv2Doc),
    Database(DatabaseDoc),
    Pki(PkiDoc),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DatabaseDoc {
    mount: String,
    role: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PkiDoc {
    mount: String,
    role: String,
    common_name: String,
    #[serde(default)]
    alt_names: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kv2Doc {
    mount: String,
    path: String,
    keys: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct OutputDoc {
    #[serde(default)]
    files: BTreeMap<String, String>,
    #[serde(default)]
    templates: BTreeMap<String, String>,
    #[serde(default)]
    templates_only: bool,
    mode: Option<Spanned<String>>,
    group: Option<u32>,
}

/// Defaults after their checks.
pub(super) struct Defaults {
    ttl: Option<Duration>,
    renew_fraction: Option<f64>,
    mode: Option<u32>,
    group: Option<u32>,
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

/// The longest duration a policy may name (a year): anything longer is a typo.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

fn duration(
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

fn mode(file: &str, text: &Spanned<String>, problems: &mut Vec<Problem>) -> Option<u32> {
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

/// Applies a `limits` block.
pub(super) fn apply_limits(
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

fn check_ttl(
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

fn check_fraction(
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

/// Checks a `defaults` block against the limits.
pub(super) fn check_defaults(
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

/// Checks one binding and applies the defaults; `None` when it has problems.
pub(super) fn compile_binding(
    file: &str,
    raw: &BindingDoc,
    limits: &Limits,
    defaults: Option<&Defaults>,
    problems: &mut Vec<Problem>,
) -> Option<Binding> {
    let before = problems.len();
    let name = raw.name.value.clone();
    if !safe(&name) {
        problems.push(at(
            file,
            &raw.name,
            format!("binding name `{name}` is not a safe directory name (no `/`, not `.`, no leading `..`)"),
        ));
    }
    let here = |spanned_line: u64| format!("{file}:{spanned_line}");

    if raw.subjects.value.is_empty() {
        problems.push(at(
            file,
            &raw.subjects,
            format!("binding `{name}`: `subjects` is empty (name at least one)"),
        ));
    }
    let mut subjects = Vec::new();
    for s in &raw.subjects.value {
        for (field, value) in [
            ("namespace", &s.namespace),
            ("serviceAccount", &s.service_account),
        ] {
            if value.value.is_empty() {
                problems.push(at(
                    file,
                    value,
                    format!("binding `{name}`: subject {field} is empty"),
                ));
            } else if value.value == "*" && field == "namespace" {
                // Allowed, but worth a reviewer's eye: `policy explain` shows it.
            } else if glob::is_pattern(&value.value) && value.value.contains('/') {
                problems.push(at(
                    file,
                    value,
                    format!(
                        "binding `{name}`: subject {field} `{}` contains `/`",
                        value.value
                    ),
                ));
            }
        }
        subjects.push(Subject {
            namespace: s.namespace.value.clone(),
            service_account: s.service_account.value.clone(),
            pod_labels: s.pod_labels.clone(),
        });
    }

    let source = match &raw.source.value {
        SourceDoc::Kv2(kv) => {
            if kv.mount.is_empty() || kv.path.is_empty() {
                problems.push(at(
                    file,
                    &raw.source,
                    format!("binding `{name}`: kv2 needs `mount` and `path`"),
                ));
            }
            if kv.path.split('/').any(|seg| seg == ".." || seg == ".") {
                problems.push(at(
                    file,
                    &raw.source,
                    format!(
                        "binding `{name}`: kv2 path `{}` has `.` or `..` segments",
                        kv.path
                    ),
                ));
            }
            if let Some(keys) = &kv.keys {
                if keys.is_empty() {
                    problems.push(at(
                        file,
                        &raw.source,
                        format!(
                            "binding `{name}`: kv2 `keys` is empty (remove it to deliver all keys)"
                        ),
                    ));
                }
                if let Some(bad) = keys.iter().find(|k| !safe(k)) {
                    problems.push(at(
                        file,
                        &raw.source,
                        format!("binding `{name}`: key `{bad}` is not a safe file name"),
                    ));
                }
            }
            Source::Kv2(Kv2Source {
                mount: kv.mount.clone(),
                path: kv.path.clone(),
                keys: kv.keys.clone(),
            })
        }
        SourceDoc::Database(db) => {
            if db.mount.is_empty() || db.role.is_empty() {
                problems.push(at(
                    file,
                    &raw.source,
                    format!("binding `{name}`: database needs `mount` and `role`"),
                ));
            }
            Source::Database(DatabaseSource {
                mount: db.mount.clone(),
                role: db.role.clone(),
            })
        }
        SourceDoc::Pki(pki) => {
            if pki.mount.is_empty() || pki.role.is_empty() || pki.common_name.is_empty() {
                problems.push(at(
                    file,
                    &raw.source,
                    format!("binding `{name}`: pki needs `mount`, `role` and `commonName`"),
                ));
            }
            for text in std::iter::once(&pki.common_name).chain(&pki.alt_names) {
                match Template::parse(text) {
                    Ok(t) => {
                        if let Some(bad) = t.fields().find(|f| !PKI_NAME_FIELDS.contains(f)) {
                            problems.push(at(
                                file,
                                &raw.source,
                                format!(
                                    "binding `{name}`: pki name `{text}` uses `{bad}` (use {})",
                                    PKI_NAME_FIELDS.join(", ")
                                ),
                            ));
                        }
                    }
                    Err(e) => problems.push(at(
                        file,
                        &raw.source,
                        format!("binding `{name}`: pki name `{text}`: {e}"),
                    )),
                }
            }
            Source::Pki(PkiSource {
                mount: pki.mount.clone(),
                role: pki.role.clone(),
                common_name: pki.common_name.clone(),
                alt_names: pki.alt_names.clone(),
            })
        }
    };
    if let Some(allowed) = &limits.allowed_sources
        && !allowed.contains(source.kind())
    {
        problems.push(at(
            file,
            &raw.source,
            format!(
                "binding `{name}`: source kind `{}` is not in limits.allowedSources",
                source.kind()
            ),
        ));
    }
    if let Some(allowed) = &limits.allowed_mounts
        && !allowed.contains(source.mount())
    {
        problems.push(at(
            file,
            &raw.source,
            format!(
                "binding `{name}`: mount `{}` is not in limits.allowedMounts",
                source.mount()
            ),
        ));
    }

    let (ttl, ttl_origin) = match (&raw.ttl, defaults.and_then(|d| d.ttl)) {
        (Some(t), _) => (
            check_ttl(file, t, limits, "ttl", problems).unwrap_or(BUILT_IN_TTL),
            Origin::Binding,
        ),
        (None, Some(d)) => (d, Origin::Default),
        (None, None) => (BUILT_IN_TTL.min(limits.max_ttl), Origin::BuiltIn),
    };
    let (renew_fraction, renew_fraction_origin) =
        match (&raw.renew_fraction, defaults.and_then(|d| d.renew_fraction)) {
            (Some(f), _) => (
                check_fraction(file, f, limits, "renewFraction", problems)
                    .unwrap_or(BUILT_IN_RENEW_FRACTION),
                Origin::Binding,
            ),
            (None, Some(d)) => (d, Origin::Default),
            (None, None) => (
                BUILT_IN_RENEW_FRACTION.clamp(limits.min_renew_fraction, limits.max_renew_fraction),
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
        .and_then(|text| check_refresh_interval(file, text, &name, &source, problems));

    let output = compile_output(file, raw, &name, &source, defaults, problems);
    (problems.len() == before).then(|| Binding {
        name,
        subjects,
        source,
        ttl,
        ttl_origin,
        renew_fraction,
        renew_fraction_origin,
        overlap,
        refresh_interval,
        output,
        defined_at: here(raw.name.referenced.line()),
    })
}

/// Shortest and longest `refreshInterval`: Vault is not asked more than
/// once a second per secret, nor a change left unseen more than a day.
const REFRESH_BOUNDS: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(24 * 3600));

/// A KV binding's `refreshInterval`, checked: only KV sources are polled.
fn check_refresh_interval(
    file: &str,
    text: &Spanned<String>,
    name: &str,
    source: &Source,
    problems: &mut Vec<Problem>,
) -> Option<Duration> {
    if !matches!(source, Source::Kv2(_)) {
        problems.push(at(
            file,
            text,
            format!(
                "binding `{name}`: refreshInterval applies to kv2 sources (leased credentials follow ttl and renewFraction)"
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
