//! A policy's `delegations`: what namespaces may define for themselves.

use super::checks::duration;
use crate::policy::{
    Limits, Problem, at,
    delegation::{Delegation, Grant},
    document::{DelegationDoc, Spanned},
    is_namespace_path,
    render::Template,
};

/// Checks one delegation; `None` when it has problems.
pub(in crate::policy) fn compile_delegation(
    file: &str,
    doc: &Spanned<DelegationDoc>,
    limits: &Limits,
    problems: &mut Vec<Problem>,
) -> Option<Delegation> {
    let before = problems.len();
    let raw = &doc.value;
    if raw.namespaces.value.is_empty()
        || raw
            .namespaces
            .value
            .iter()
            .any(|n| n.is_empty() || n.contains('/'))
    {
        problems.push(at(
            file,
            &raw.namespaces,
            "delegation: `namespaces` must name namespaces (names or globs like team-*)".to_owned(),
        ));
    }
    if raw.kv2.is_empty() && raw.database.is_empty() && raw.pki.is_empty() {
        problems.push(at(
            file,
            doc,
            "delegation grants nothing (add kv2, database or pki)".to_owned(),
        ));
    }
    let mut grants = |docs: &[Spanned<(String, String)>], kind: &str, what: &str| {
        let mut out = Vec::new();
        for grant in docs {
            let (mount, pattern) = &grant.value;
            let mut problem = |message: String| {
                problems.push(at(file, grant, format!("delegation {kind}: {message}")));
            };
            if mount.is_empty()
                || mount
                    .split('/')
                    .any(|s| s.is_empty() || s == "." || s == "..")
            {
                problem(format!("mount `{mount}` is not a mount path like `secret`"));
            }
            if kind == "kv2" && (!pattern.ends_with('/') || pattern.split('/').any(|s| s == "..")) {
                problem(format!(
                    "{what} `{pattern}` must end with `/` (`team-a` would also match `team-ab/…`), e.g. `teams/{{{{ namespace }}}}/`"
                ));
            }
            match Template::parse(pattern) {
                Ok(template) if template.fields().all(|f| f == "namespace") => out.push(Grant {
                    mount: mount.clone(),
                    pattern: pattern.clone(),
                    template,
                }),
                Ok(_) => problem(format!(
                    "{what} `{pattern}` may use only `{{{{ namespace }}}}`"
                )),
                Err(error) => problem(format!("{what} `{pattern}`: {error}")),
            }
        }
        out
    };
    let pairs = |docs: &[Spanned<crate::policy::document::RoleGrantDoc>]| -> Vec<Spanned<(String, String)>> {
        docs.iter()
            .map(|d| Spanned::new((d.value.mount.clone(), d.value.role.clone()), d.referenced, d.defined))
            .collect()
    };
    let kv2: Vec<_> = raw
        .kv2
        .iter()
        .map(|d| {
            Spanned::new(
                (d.value.mount.clone(), d.value.path_prefix.clone()),
                d.referenced,
                d.defined,
            )
        })
        .collect();
    let kv2 = grants(&kv2, "kv2", "pathPrefix");
    let database = grants(&pairs(&raw.database), "database", "role");
    let pki = grants(&pairs(&raw.pki), "pki", "role");
    let max_ttl = raw
        .max_ttl
        .as_ref()
        .and_then(|t| duration(file, t, "delegation maxTtl", problems));
    if let Some(max) = max_ttl
        && max > limits.max_ttl
        && let Some(t) = &raw.max_ttl
    {
        problems.push(at(
            file,
            t,
            format!(
                "delegation maxTtl `{}` is above limits.maxTtl {} (lower it)",
                t.value,
                crate::policy::format_duration(limits.max_ttl)
            ),
        ));
    }
    if let Some(namespace) = &raw.vault_namespace
        && !is_namespace_path(namespace)
    {
        problems.push(at(
            file,
            doc,
            format!(
                "delegation vaultNamespace `{namespace}` is not a namespace path like `team-a`"
            ),
        ));
    }
    (problems.len() == before).then(|| Delegation {
        namespaces: raw.namespaces.value.clone(),
        kv2,
        database,
        pki,
        max_ttl,
        vault_namespace: raw.vault_namespace.clone(),
        defined_at: format!("{file}:{}", doc.referenced.line()),
    })
}
