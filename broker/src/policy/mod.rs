//! The access and rotation policy: which identities get which bindings, for how
//! long, and how they are written. One reviewed file, or a directory of them
//! (a mounted ConfigMap). Deny by default: an identity gets exactly the
//! bindings whose subjects match it.
//!
//! Loading collects every problem with `file:line:column`, what is wrong and
//! how to fix it, so `policy check` can list them all at once.

mod compile;
mod delegation;
mod document;
mod files;
pub mod glob;
pub use tessera_template as render;
mod limits;
pub mod report;
pub mod resources;
mod source;
pub mod store;

pub use delegation::Delegation;
pub use files::{Sources, read_sources};
pub use limits::{DEFAULT_MIN_TTL, ImageUser, Limits};
pub use source::{
    DATABASE_FIELDS, DatabaseSource, KeyMaker, Kv2Source, PKI_FIELDS, PKI_NAME_FIELDS, PkiSource,
    PodKey, SSH_FIELDS, Source, SshSource, VaultPathSource, is_namespace_path,
};

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::PathBuf,
    time::Duration,
};

use tessera_proto::is_safe_name;

use crate::{identity::Identity, secret::Secret};
pub use document::API_VERSION;
use document::{PolicyBody, Spanned};
use render::Template;

/// One problem found in a policy, located in its file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// The policy file the problem is in, as given on the command line or in the directory.
    pub file: String,
    /// 1-based line, 0 when unknown.
    pub line: u64,
    /// 1-based column, 0 when unknown.
    pub column: u64,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

/// A policy that could not be loaded: every problem found.
#[derive(Debug, thiserror::Error)]
pub struct PolicyError {
    /// The problems, in file order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(f, "policy has {n} problem{}", if n == 1 { "" } else { "s" })?;
        for problem in &self.problems {
            write!(f, "\n  {problem}")?;
        }
        Ok(())
    }
}

/// Where a setting came from, for `policy explain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Set on the binding.
    Binding,
    /// Taken from `defaults`.
    Default,
    /// Built in (no default in the policy).
    BuiltIn,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Binding => "set on the binding",
            Origin::Default => "from defaults",
            Origin::BuiltIn => "built-in default",
        })
    }
}

/// Who a binding is for. Namespace and service account are exact names or
/// globs (`*`, `?`); pod labels, when given, must all be present on the pod
/// (known only when the broker looks pods up; otherwise the subject never
/// matches, which is the safe side).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    /// The clusters (`cluster.name`, exact or glob) the subject is in; any
    /// cluster when `None`. A broker keeps only its own cluster's subjects
    /// ([`Policy::for_cluster`]).
    pub cluster: Option<String>,
    /// Namespace name or glob.
    pub namespace: String,
    /// Service-account name or glob.
    pub service_account: String,
    /// Labels the pod must carry.
    pub pod_labels: BTreeMap<String, String>,
}

impl Subject {
    /// Whether `identity` is this subject.
    pub fn matches(&self, identity: &Identity) -> bool {
        glob::matches(&self.namespace, &identity.namespace)
            && glob::matches(&self.service_account, &identity.service_account)
            && (self.pod_labels.is_empty()
                || identity.pod_labels.as_ref().is_some_and(|labels| {
                    self.pod_labels
                        .iter()
                        .all(|(k, v)| labels.get(k) == Some(v))
                }))
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(cluster) = &self.cluster {
            write!(f, "{cluster}:")?;
        }
        write!(f, "{}/{}", self.namespace, self.service_account)?;
        for (k, v) in &self.pod_labels {
            write!(f, " [{k}={v}]")?;
        }
        Ok(())
    }
}

/// How a binding's files are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// Field name to file name, for fields that are renamed.
    pub files: BTreeMap<String, String>,
    /// File name to template, for files rendered from several fields.
    pub templates: BTreeMap<String, Template>,
    /// Write only the templates, not the raw fields.
    pub templates_only: bool,
    /// File mode, 0o400 or 0o440; `None` lets the sidecar decide (0440 when
    /// it runs with `--group`, else 0400).
    pub mode: Option<u32>,
    /// Group owning the files (with mode 0440).
    pub group: Option<u32>,
}

/// Vault as a second gate for a binding: the broker logs in at
/// `auth/<mount>/login` with the pod's own service-account token as `role`
/// (Vault's `jwt` or `kubernetes` method) and reads the source with that
/// token, never its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VaultGate {
    /// The auth method's mount, e.g. `jwt` or `kubernetes`.
    pub mount: String,
    /// The Vault role: a template of `pod`, `namespace`, `serviceAccount`
    /// (e.g. `{{ namespace }}-{{ serviceAccount }}`).
    pub role: String,
    /// The Vault namespace of the auth method; the source's when absent.
    pub namespace: Option<String>,
}

impl fmt::Display for VaultGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "auth/{} role `{}`", self.mount, self.role)?;
        match &self.namespace {
            Some(namespace) => write!(f, " in namespace {namespace}"),
            None => Ok(()),
        }
    }
}

/// A binding with its defaults applied and its limits checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Binding {
    /// Name: the directory name in the pod and the name clients ask for.
    pub name: String,
    /// Who may have it.
    pub subjects: Vec<Subject>,
    /// Where the values come from.
    pub source: Source,
    /// Credential lifetime asked of Vault (leased sources).
    pub ttl: Duration,
    /// Where the TTL came from.
    pub ttl_origin: Origin,
    /// The shortest TTL a caller may narrow this binding to: the policy's
    /// `limits.minTtl` for its source kind.
    pub min_ttl: Duration,
    /// Fraction of the lifetime after which the credential is renewed.
    pub renew_fraction: f64,
    /// How long a superseded lease stays valid after its successor is delivered.
    pub overlap: Duration,
    /// How often each replica checks a KV source for a new version; the
    /// broker's `vault.kvPollInterval` when absent. Several bindings on one
    /// secret: the shortest wins.
    pub refresh_interval: Option<Duration>,
    /// Where the renew fraction came from.
    pub renew_fraction_origin: Origin,
    /// How files are written.
    pub output: Output,
    /// Whether callers whose token names no pod (`kubectl create token`)
    /// may have its leased credentials (`callers: { unbound: allow }`):
    /// nothing can revoke those with a pod, so by default they may not.
    pub allow_unbound: bool,
    /// Vault as a second gate (`vaultGate`): the source is read with the
    /// pod's own Vault token, so Vault's policy must allow it too.
    pub gate: Option<VaultGate>,
    /// `file:line` of the binding.
    pub defined_at: String,
}

impl Binding {
    /// This binding for a caller that wants its leased credentials to live
    /// at most `max` (a pod's `tessera.dev/ttl.<binding>`): the TTL only
    /// shortens, and the rotation overlap stays within a quarter of it.
    ///
    /// # Errors
    /// A sentence naming the floor when `max` is below the policy's
    /// `limits.minTtl` for this binding's kind.
    pub fn narrowed(&self, max: Duration) -> Result<Binding, String> {
        if max < self.min_ttl {
            return Err(format!(
                "{} is below the policy's floor {} for {} credentials (limits.minTtl.{})",
                format_duration(max),
                format_duration(self.min_ttl),
                self.source.kind(),
                self.source.kind()
            ));
        }
        let mut narrowed = self.clone();
        if max < self.ttl {
            narrowed.ttl = max;
            narrowed.overlap = self.overlap.min(max / 4);
        }
        Ok(narrowed)
    }

    /// Whether `identity` may have this binding.
    pub fn grants(&self, identity: &Identity) -> bool {
        self.subjects.iter().any(|s| s.matches(identity))
    }

    /// The first subject that matches `identity`.
    pub fn matching_subject(&self, identity: &Identity) -> Option<&Subject> {
        self.subjects.iter().find(|s| s.matches(identity))
    }

    /// The files to write for these source fields: renamed fields (unless
    /// `templatesOnly`) plus rendered templates. Nothing is dropped silently:
    /// two outputs with one file name, or a field whose name is no safe file
    /// name (a KV key like `../x`), fail the whole binding.
    ///
    /// # Errors
    /// A [`RenderError`] naming the field or file.
    pub fn render(
        &self,
        fields: &BTreeMap<String, Secret>,
    ) -> Result<BTreeMap<String, Secret>, RenderError> {
        let mut files = BTreeMap::new();
        let mut add = |name: &String, value: Secret| {
            if !is_safe_name(name) {
                return Err(RenderError::UnsafeName(crate::text::printable(name)));
            }
            match files.insert(name.clone(), value) {
                Some(_) => Err(RenderError::Collision(name.clone())),
                None => Ok(()),
            }
        };
        if !self.output.templates_only {
            for (field, value) in fields {
                add(self.output.files.get(field).unwrap_or(field), value.clone())?;
            }
        }
        for (file, template) in &self.output.templates {
            let mut rendered = template
                .render(|name| fields.get(name).map(Secret::expose_secret))
                .map_err(RenderError::Missing)?;
            add(file, Secret::new(std::mem::take(&mut *rendered)))?;
        }
        Ok(files)
    }
}

/// Why a binding's files could not be made from its source's fields.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// A template uses a field the source did not provide.
    #[error(
        "a template uses `{0}`, which the source does not have (fix the policy's template or the secret)"
    )]
    Missing(String),
    /// Two outputs (fields, renames, templates) would be written to one file.
    #[error(
        "two outputs would be written to file `{0}` (rename one with output.files, or choose fields with keys)"
    )]
    Collision(String),
    /// A source field's name is no safe file name (`/`, a leading `..`, empty).
    #[error(
        "the source has a field named `{0}`, which is no safe file name (rename the key in Vault, or choose keys)"
    )]
    UnsafeName(String),
}

/// A loaded, valid policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Cluster-wide limits.
    pub limits: Limits,
    /// The bindings, in file order (then `AccessBinding`s, oldest first).
    pub bindings: Vec<Binding>,
    /// What namespaces may define for themselves (`delegations`).
    pub delegations: Vec<Delegation>,
    /// The files it was read from.
    pub files: Vec<PathBuf>,
}

impl Policy {
    /// Loads a policy from files and directories (every `*.yaml`/`*.yml` in a
    /// directory, skipping the `..`-prefixed entries of a ConfigMap volume).
    ///
    /// # Errors
    /// A [`PolicyError`] listing every problem found.
    pub fn load(paths: &[PathBuf]) -> Result<Self, PolicyError> {
        let sources = read_sources(paths)?;
        let mut policy = Self::parse_many(&sources.texts)?;
        policy.files = sources.files;
        Ok(policy)
    }

    /// The policy for an identity whose cluster is not known: only subjects
    /// that name no cluster are kept.
    #[must_use]
    pub fn for_cluster_unnamed(mut self) -> Self {
        for binding in &mut self.bindings {
            binding.subjects.retain(|subject| subject.cluster.is_none());
        }
        self
    }

    /// The policy as the broker of cluster `name` applies it: subjects that
    /// name other clusters are dropped (a binding left without subjects
    /// grants nobody here); the others keep their pattern, which `policy
    /// explain` shows.
    #[must_use]
    pub fn for_cluster(mut self, name: &str) -> Self {
        for binding in &mut self.bindings {
            binding.subjects.retain(|subject| {
                subject
                    .cluster
                    .as_deref()
                    .is_none_or(|pattern| glob::matches(pattern, name))
            });
        }
        self
    }

    /// Parses one policy document; `origin` names it in problems.
    ///
    /// # Errors
    /// A [`PolicyError`] listing every problem found.
    pub fn parse(text: &str, origin: &str) -> Result<Self, PolicyError> {
        Self::parse_many(&[(origin.to_owned(), text.to_owned())])
    }

    /// Parses several documents (file name, text) into one policy.
    ///
    /// # Errors
    /// A [`PolicyError`] listing every problem found.
    pub fn parse_many(texts: &[(String, String)]) -> Result<Self, PolicyError> {
        resources::compile_all(texts, &[]).map(|(policy, _)| policy)
    }

    /// The bindings granted to `identity`, in policy order.
    pub fn granted<'a>(&'a self, identity: &'a Identity) -> impl Iterator<Item = &'a Binding> {
        self.bindings.iter().filter(move |b| b.grants(identity))
    }

    /// The binding `name`, whoever it is granted to (for revoking what a pod
    /// holds even after its grant was removed).
    pub fn binding(&self, name: &str) -> Option<&Binding> {
        self.bindings.iter().find(|b| b.name == name)
    }

    /// The binding `name` if `identity` is granted it. Unknown and not granted
    /// look the same to the caller, so a pod cannot probe binding names.
    pub fn lookup(&self, identity: &Identity, name: &str) -> Option<&Binding> {
        self.bindings
            .iter()
            .find(|b| b.name == name && b.grants(identity))
    }
}

/// Formats a duration the way policies write it: `48h`, `90m`, `45s`.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        format!("{}ms", d.as_millis())
    } else if secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

const BUILT_IN_TTL: Duration = Duration::from_secs(3600);
const BUILT_IN_RENEW_FRACTION: f64 = 0.7;
const BUILT_IN_OVERLAP: Duration = Duration::from_secs(30);

fn at<T>(file: &str, spanned: &Spanned<T>, message: String) -> Problem {
    Problem {
        file: file.to_owned(),
        line: spanned.referenced.line(),
        column: spanned.referenced.column(),
        message,
    }
}

/// A policy compiled from its documents, with what `AccessBinding`s are
/// checked against.
struct Compiled {
    policy: Policy,
    defaults: Option<compile::Defaults>,
}

/// Checks the documents and builds the policy, pushing every problem found.
fn compile(documents: &[(&str, &PolicyBody)], problems: &mut Vec<Problem>) -> Compiled {
    // Limits and defaults: at most one document may set each.
    let mut limits = Limits::default();
    let mut defaults = None;
    let mut limits_file: Option<&str> = None;
    for &(file, doc) in documents {
        if let Some(l) = &doc.limits {
            if let Some(first) = limits_file {
                problems.push(at(
                    file,
                    l,
                    format!("`limits` is already set in {first} (keep one)"),
                ));
                continue;
            }
            limits_file = Some(file);
            compile::apply_limits(file, l, &mut limits, problems);
        }
        if let Some(d) = &doc.defaults {
            if defaults.is_some() {
                problems.push(at(
                    file,
                    d,
                    "`defaults` is set in more than one file (keep one)".to_owned(),
                ));
            } else {
                defaults = Some((file, d));
            }
        }
    }
    let defaults = defaults.map(|(file, d)| compile::check_defaults(file, d, &limits, problems));

    let mut bindings: Vec<Binding> = Vec::new();
    let mut delegations = Vec::new();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for &(file, doc) in documents {
        for raw in &doc.bindings {
            let name = &raw.name.value;
            if let Some(first) = seen.get(name) {
                problems.push(at(
                    file,
                    &raw.name,
                    format!(
                        "binding `{name}` is already defined at {first} (names must be unique)"
                    ),
                ));
                continue;
            }
            seen.insert(
                name.clone(),
                format!("{file}:{}", raw.name.referenced.line()),
            );
            if let Some(binding) =
                compile::compile_binding(file, raw, &limits, defaults.as_ref(), problems)
            {
                bindings.push(binding);
            }
        }
        for raw in &doc.delegations {
            if let Some(delegation) = compile::compile_delegation(file, raw, &limits, problems) {
                delegations.push(delegation);
            }
        }
    }
    Compiled {
        policy: Policy {
            limits,
            bindings,
            delegations,
            files: Vec::new(),
        },
        defaults,
    }
}

/// Whether `name` can be a binding or file name; re-exported for the documents.
fn safe(name: &str) -> bool {
    is_safe_name(name)
}

#[cfg(test)]
mod tests;
