//! Where a binding's values come from in Vault, within the limits.

use crate::policy::{
    DatabaseSource, KeyMaker, Kv2Source, Limits, PKI_NAME_FIELDS, PkiSource, Problem, Source,
    SshSource, VaultPathSource, at,
    document::{BindingDoc, SourceDoc, VaultDoc},
    render::Template,
    safe,
};

/// Path prefixes a `vault:` source may not name: Vault's own configuration,
/// its auth methods and identities. Reading or writing them with the broker's
/// token would hand pods the broker's powers.
const VAULT_RESERVED: &[&str] = &["sys", "auth", "identity", "cubbyhole"];

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
                namespace: kv.namespace.clone(),
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
                namespace: db.namespace.clone(),
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
            let names = std::iter::once(&pki.common_name).chain(&pki.alt_names);
            for message in name_template_problems("pki name", names) {
                problems.push(at(
                    file,
                    &raw.source,
                    format!("binding `{name}`: {message}"),
                ));
            }
            let key = match &pki.key {
                None => KeyMaker::Vault,
                Some(key) => match key.value.as_str() {
                    "vault" => KeyMaker::Vault,
                    "pod" => KeyMaker::Pod,
                    other => {
                        problems.push(at(
                            file,
                            key,
                            format!("binding `{name}`: pki key `{other}` is not `vault` or `pod`"),
                        ));
                        KeyMaker::Vault
                    }
                },
            };
            Source::Pki(PkiSource {
                mount: pki.mount.clone(),
                role: pki.role.clone(),
                common_name: pki.common_name.clone(),
                alt_names: pki.alt_names.clone(),
                key,
                namespace: pki.namespace.clone(),
            })
        }
        SourceDoc::Ssh(ssh) => {
            if ssh.mount.is_empty() || ssh.role.is_empty() {
                problems.push(at(
                    file,
                    &raw.source,
                    format!("binding `{name}`: ssh needs `mount` and `role`"),
                ));
            }
            for message in name_template_problems("ssh principal", ssh.principals.iter()) {
                problems.push(at(
                    file,
                    &raw.source,
                    format!("binding `{name}`: {message}"),
                ));
            }
            Source::Ssh(SshSource {
                mount: ssh.mount.clone(),
                role: ssh.role.clone(),
                principals: ssh.principals.clone(),
                extensions: ssh.extensions.clone(),
                namespace: ssh.namespace.clone(),
            })
        }
        SourceDoc::Vault(doc) => {
            let mut problem = |message: String| {
                problems.push(at(
                    file,
                    &raw.source,
                    format!("binding `{name}`: {message}"),
                ));
            };
            vault_path_problems(doc).into_iter().for_each(&mut problem);
            Source::Vault(VaultPathSource {
                path: doc.path.clone(),
                write: doc.operation.as_deref() == Some("write"),
                data: doc.data.clone(),
                fields: doc.fields.clone(),
                namespace: doc.namespace.clone(),
            })
        }
    };
    if let Some(namespace) = source.namespace()
        && !crate::policy::is_namespace_path(namespace)
    {
        problems.push(at(
            file,
            &raw.source,
            format!(
                "binding `{name}`: namespace `{namespace}` must be a namespace path like `team-a` or `org/team-a` (letters, digits, `-` and `_` between slashes)"
            ),
        ));
    }
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

/// What is wrong with name templates (PKI names, SSH principals): each may
/// use only the identity's `pod`, `namespace` and `serviceAccount`.
fn name_template_problems<'a>(what: &str, texts: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut found = Vec::new();
    for text in texts {
        match Template::parse(text) {
            Ok(t) => {
                if let Some(bad) = t.fields().find(|f| !PKI_NAME_FIELDS.contains(f)) {
                    found.push(format!(
                        "{what} `{text}` uses `{bad}` (use {})",
                        PKI_NAME_FIELDS.join(", ")
                    ));
                }
            }
            Err(e) => found.push(format!("{what} `{text}`: {e}")),
        }
    }
    found
}

/// What is wrong with a `vault:` source, one sentence each.
fn vault_path_problems(doc: &VaultDoc) -> Vec<String> {
    let mut found = Vec::new();
    let path = doc.path.as_str();
    let segments: Vec<&str> = path.split('/').collect();
    if path.is_empty()
        || path.starts_with('/')
        || segments
            .iter()
            .any(|s| s.is_empty() || *s == "." || *s == "..")
    {
        found.push(format!("vault path `{path}` must be a path below /v1/ without empty, `.` or `..` segments (e.g. `aws/creds/deploy`)"));
    } else if VAULT_RESERVED.contains(&segments[0]) {
        found.push(format!("vault path `{path}` is under `{}/`, which a binding may not name (the broker's own Vault powers are not for pods)", segments[0]));
    }
    match doc.operation.as_deref() {
        None | Some("read" | "write") => {}
        Some(other) => found.push(format!(
            "vault operation `{other}` is not `read` or `write`"
        )),
    }
    if !doc.data.is_empty() && doc.operation.as_deref() != Some("write") {
        found.push("vault `data` is sent only by `operation: write`".to_owned());
    }
    if let Some(fields) = &doc.fields {
        if fields.is_empty() {
            found.push("vault `fields` is empty (remove it to deliver every field)".to_owned());
        }
        if let Some(bad) = fields.iter().find(|f| !safe(f)) {
            found.push(format!("field `{bad}` is not a safe file name"));
        }
    }
    found
}
