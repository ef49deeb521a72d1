//! Where a binding's values come from in Vault, within the limits.

use crate::policy::{
    DatabaseSource, Kv2Source, Limits, PKI_NAME_FIELDS, PkiSource, Problem, Source, at,
    document::{BindingDoc, SourceDoc},
    render::Template,
    safe,
};

/// The binding's source, checked, and allowed by `limits`.
pub(super) fn compile_source(
    file: &str,
    raw: &BindingDoc,
    name: &str,
    limits: &Limits,
    problems: &mut Vec<Problem>,
) -> Source {
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
    source
}
