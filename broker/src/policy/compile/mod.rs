//! From the policy as written to [`Binding`]s: every check, in parts that
//! depend one way (`subjects`, `source`, `timing`, `output` on `checks` and
//! `defaults`; nothing here on the policy's runtime use).

mod checks;
mod defaults;
mod delegation;
mod limits;
mod output;
mod source;
mod subjects;
mod timing;

pub(super) use defaults::{Defaults, check_defaults};
pub(super) use delegation::compile_delegation;
pub(super) use limits::apply_limits;

use super::{Binding, Limits, Problem, at, document::BindingDoc, safe};

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
    let subjects = subjects::compile_subjects(file, raw, &name, problems);
    let source = source::compile_source(file, raw, &name, limits, problems);
    let timing = timing::compile_timing(file, raw, &name, &source, limits, defaults, problems);
    let output = output::compile_output(file, raw, &name, &source, defaults, problems);
    let allow_unbound = compile_callers(file, raw, &name, &source, problems);
    let gate = compile_gate(file, raw, &name, problems);
    (problems.len() == before).then(|| Binding {
        defined_at: format!("{file}:{}", raw.name.referenced.line()),
        name,
        subjects,
        source,
        ttl: timing.ttl,
        ttl_origin: timing.ttl_origin,
        min_ttl: timing.min_ttl,
        allow_unbound,
        renew_fraction: timing.renew_fraction,
        renew_fraction_origin: timing.renew_fraction_origin,
        overlap: timing.overlap,
        refresh_interval: timing.refresh_interval,
        output,
        gate,
    })
}

/// `vaultGate: { mount, role, namespace }`: checked like a source's names.
fn compile_gate(
    file: &str,
    raw: &BindingDoc,
    name: &str,
    problems: &mut Vec<Problem>,
) -> Option<super::VaultGate> {
    let doc = raw.vault_gate.as_ref()?;
    let gate = &doc.value;
    let mut problem = |message: String| {
        problems.push(at(
            file,
            doc,
            format!("binding `{name}`: vaultGate {message}"),
        ));
    };
    if gate.mount.is_empty()
        || gate
            .mount
            .split('/')
            .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        problem(format!(
            "mount `{}` must be an auth mount path like `jwt` or `kubernetes`",
            gate.mount
        ));
    }
    match super::render::Template::parse(&gate.role) {
        Ok(role) => {
            if let Some(bad) = role.fields().find(|f| !super::PKI_NAME_FIELDS.contains(f)) {
                problem(format!(
                    "role `{}` uses `{bad}` (use {})",
                    gate.role,
                    super::PKI_NAME_FIELDS.join(", ")
                ));
            }
        }
        Err(error) => problem(format!("role `{}`: {error}", gate.role)),
    }
    if gate.role.is_empty() {
        problem("needs a `role`".to_owned());
    }
    if let Some(namespace) = &gate.namespace
        && !super::is_namespace_path(namespace)
    {
        problem(format!(
            "namespace `{namespace}` is not a namespace path like `team-a`"
        ));
    }
    Some(super::VaultGate {
        mount: gate.mount.clone(),
        role: gate.role.clone(),
        namespace: gate.namespace.clone(),
    })
}

/// `callers: { unbound: allow | refuse }`: whether tokens bound to no pod
/// may have a leased binding (refused when absent).
fn compile_callers(
    file: &str,
    raw: &BindingDoc,
    name: &str,
    source: &super::Source,
    problems: &mut Vec<Problem>,
) -> bool {
    let Some(callers) = &raw.callers else {
        return false;
    };
    let unbound = &callers.value.unbound;
    if !source.is_leased() {
        problems.push(at(
            file,
            callers,
            format!("binding `{name}`: callers.unbound applies to leased sources (database, pki); any caller may read a KV secret it is granted"),
        ));
        return false;
    }
    match unbound.value.as_str() {
        "allow" => true,
        "refuse" => false,
        other => {
            problems.push(at(
                file,
                unbound,
                format!("binding `{name}`: callers.unbound `{other}` is not known (use \"allow\" or \"refuse\")"),
            ));
            false
        }
    }
}
