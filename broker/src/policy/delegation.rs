//! What the security team lets a namespace define for itself (a policy's
//! `delegations`), and the check every `AccessBinding` passes: its source
//! must lie within one delegation that names its namespace.

use std::time::Duration;

use super::{Binding, Source, format_duration, glob, render::Template};

/// What the namespaces a delegation names may use in their own bindings.
#[derive(Clone, Debug, PartialEq)]
pub struct Delegation {
    /// Namespace names or globs.
    pub namespaces: Vec<String>,
    /// KV v2 mounts, each with the path prefix delegated under it.
    pub kv2: Vec<Grant>,
    /// Database engine mounts, each with the roles delegated on it.
    pub database: Vec<Grant>,
    /// PKI engine mounts, each with the roles delegated on it.
    pub pki: Vec<Grant>,
    /// The longest TTL a delegated leased binding may ask for.
    pub max_ttl: Option<Duration>,
    /// The Vault namespace delegated sources must live in; the broker's own when absent.
    pub vault_namespace: Option<String>,
    /// `file:line` of the delegation.
    pub defined_at: String,
}

/// One mount and what is delegated on it: a KV path prefix, or a role glob;
/// a template of `namespace`.
#[derive(Clone, Debug, PartialEq)]
pub struct Grant {
    /// The engine's mount path.
    pub mount: String,
    /// The prefix or glob, as written.
    pub pattern: String,
    /// The prefix or glob, parsed.
    pub template: Template,
}

impl Grant {
    /// The pattern for `namespace`; `None` when it cannot be rendered.
    fn for_namespace(&self, namespace: &str) -> Option<String> {
        let rendered = self
            .template
            .render(|field| (field == "namespace").then_some(namespace.as_bytes()))
            .ok()?;
        String::from_utf8(rendered.to_vec()).ok()
    }
}

impl Delegation {
    /// Whether it names `namespace`.
    pub fn applies_to(&self, namespace: &str) -> bool {
        self.namespaces.iter().any(|n| glob::matches(n, namespace))
    }

    /// Why `binding` (in `namespace`) is outside this delegation, or `None`.
    fn refusal(&self, namespace: &str, binding: &Binding) -> Option<String> {
        let source = &binding.source;
        if source.namespace() != self.vault_namespace.as_deref() {
            return Some(format!(
                "its Vault namespace `{}` is not the delegated `{}`",
                source.namespace().unwrap_or("(the broker's)"),
                self.vault_namespace.as_deref().unwrap_or("(the broker's)")
            ));
        }
        let within = match source {
            Source::Kv2(kv) => {
                !kv.path.split('/').any(|s| s == "..")
                    && self.kv2.iter().any(|grant| {
                        grant.mount == kv.mount
                            && grant
                                .for_namespace(namespace)
                                .is_some_and(|prefix| kv.path.starts_with(&prefix))
                    })
            }
            Source::Database(db) => allows_role(&self.database, namespace, &db.mount, &db.role),
            Source::Pki(pki) => allows_role(&self.pki, namespace, &pki.mount, &pki.role),
            Source::Ssh(_) | Source::Vault(_) => false,
        };
        if !within {
            return Some(format!(
                "its source {} is not delegated (delegated: {})",
                described(source),
                self.granted(namespace)
            ));
        }
        match self.max_ttl {
            Some(max) if source.is_leased() && binding.ttl > max => Some(format!(
                "its ttl {} is above the delegation's maxTtl {}",
                format_duration(binding.ttl),
                format_duration(max)
            )),
            _ => None,
        }
    }

    /// What it grants `namespace`, for messages.
    fn granted(&self, namespace: &str) -> String {
        let mut parts = Vec::new();
        for (kind, grants, what) in [
            ("kv2", &self.kv2, "paths under"),
            ("database", &self.database, "roles"),
            ("pki", &self.pki, "roles"),
        ] {
            for grant in grants {
                let pattern = grant
                    .for_namespace(namespace)
                    .unwrap_or_else(|| grant.pattern.clone());
                parts.push(format!("{kind} {} {what} `{pattern}`", grant.mount));
            }
        }
        parts.join("; ")
    }
}

fn allows_role(grants: &[Grant], namespace: &str, mount: &str, role: &str) -> bool {
    grants.iter().any(|grant| {
        grant.mount == mount
            && grant
                .for_namespace(namespace)
                .is_some_and(|pattern| glob::matches(&pattern, role))
    })
}

fn described(source: &Source) -> String {
    match source {
        Source::Kv2(kv) => format!("kv2 `{}/{}`", kv.mount, kv.path),
        Source::Database(db) => format!("database `{}` role `{}`", db.mount, db.role),
        Source::Pki(pki) => format!("pki `{}` role `{}`", pki.mount, pki.role),
        Source::Ssh(_) | Source::Vault(_) => format!(
            "{} (only kv2, database and pki can be delegated)",
            source.kind()
        ),
    }
}

/// Checks an `AccessBinding`'s compiled binding against the delegations:
/// accepted when one delegation that names `namespace` allows all of it.
///
/// # Errors
/// A sentence naming what is outside and what is delegated.
pub fn check(delegations: &[Delegation], namespace: &str, binding: &Binding) -> Result<(), String> {
    let mut applying = delegations
        .iter()
        .filter(|d| d.applies_to(namespace))
        .peekable();
    if applying.peek().is_none() {
        return Err(format!(
            "binding `{}`: namespace `{namespace}` may not define bindings of its own (no delegation names it; the security team adds one to a ClusterAccessPolicy's `delegations`)",
            binding.name
        ));
    }
    let mut refusals = Vec::new();
    for delegation in applying {
        match delegation.refusal(namespace, binding) {
            None => return Ok(()),
            Some(why) => refusals.push(format!("{} ({})", why, delegation.defined_at)),
        }
    }
    Err(format!(
        "binding `{}` is outside what namespace `{namespace}` may define: {} (keep within the delegation, or ask the security team to widen it)",
        binding.name,
        refusals.join("; ")
    ))
}
