//! The policy from files and from the cluster's resources together, with one
//! precedence: policy files (the ConfigMap) first, then `ClusterAccessPolicy`
//! resources by name, then `AccessBinding`s oldest first. Files are checked
//! as a whole (one problem refuses them all, as `policy check` does); a
//! resource read from the cluster is accepted or rejected on its own, so one
//! team's mistake never takes another's binding away.

use std::{fmt, path::PathBuf};

use super::{
    Policy, PolicyError, Problem, compile,
    document::{self, Parsed, PolicyBody},
    read_sources,
};

/// The resource kinds the broker reads from the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceKind {
    /// Cluster-scoped: the security team's rules and delegations.
    ClusterAccessPolicy,
    /// Namespaced: one app team's binding.
    AccessBinding,
}

impl ResourceKind {
    /// The kind as `kind:` names it.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::ClusterAccessPolicy => "ClusterAccessPolicy",
            ResourceKind::AccessBinding => "AccessBinding",
        }
    }
}

/// Which resource: kind, namespace (for `AccessBinding`) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceKey {
    /// Its kind.
    pub kind: ResourceKind,
    /// Its namespace; `None` for cluster-scoped resources.
    pub namespace: Option<String>,
    /// Its name.
    pub name: String,
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(namespace) => write!(f, "{} {namespace}/{}", self.kind.as_str(), self.name),
            None => write!(f, "{} {}", self.kind.as_str(), self.name),
        }
    }
}

/// One resource as read from the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterResource {
    /// Which one.
    pub key: ResourceKey,
    /// `metadata.generation`: the version of its spec.
    pub generation: i64,
    /// `metadata.creationTimestamp` (RFC 3339), which orders `AccessBinding`s.
    pub created: String,
    /// The object as YAML or JSON (kind, metadata, spec).
    pub text: String,
}

/// What the broker made of one resource, for its status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Which resource.
    pub key: ResourceKey,
    /// The generation judged.
    pub generation: i64,
    /// Why it was rejected; empty when accepted.
    pub problems: Vec<String>,
    /// When rejected: the earlier generation still in force, if any.
    pub in_force: Option<i64>,
}

impl Verdict {
    /// Whether the generation was accepted.
    pub fn accepted(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One document to compile and where it came from.
struct Part {
    origin: String,
    parsed: Parsed,
    /// The cluster resource it is, when read from the cluster.
    resource: Option<usize>,
}

/// Loads the files at `paths` and `resources` read from the cluster for
/// review (`policy check --from-cluster`): a resource's problems are
/// problems like a file's, named after the resource.
///
/// # Errors
/// A [`PolicyError`] listing every problem.
pub fn check_all(paths: &[PathBuf], resources: &[ClusterResource]) -> Result<Policy, PolicyError> {
    let sources = read_sources(paths)?;
    let (mut policy, verdicts) = compile_all(&sources.texts, resources)?;
    let problems: Vec<Problem> = verdicts
        .iter()
        .flat_map(|verdict| {
            verdict.problems.iter().map(|message| Problem {
                file: verdict.key.to_string(),
                line: 0,
                column: 0,
                message: message.clone(),
            })
        })
        .collect();
    if !problems.is_empty() {
        return Err(PolicyError { problems });
    }
    policy.files = sources.files;
    Ok(policy)
}

/// The documents of `texts`, with each `kind: List` (what `kubectl get
/// accessbindings -A -o yaml` prints) replaced by its items, named
/// `file: Kind namespace/name`.
fn expand_lists(texts: &[(String, String)]) -> Vec<(String, String)> {
    #[derive(serde::Deserialize)]
    struct List {
        kind: String,
        #[serde(default)]
        items: Vec<serde_json::Value>,
    }
    let mut expanded = Vec::new();
    for (file, text) in texts {
        let list = serde_saphyr::from_str::<List>(text)
            .ok()
            .filter(|list| list.kind == "List");
        let Some(list) = list else {
            expanded.push((file.clone(), text.clone()));
            continue;
        };
        for item in list.items {
            let text = |key: &str| item[key].as_str().unwrap_or_default().to_owned();
            let metadata = &item["metadata"];
            let name = match (metadata["namespace"].as_str(), metadata["name"].as_str()) {
                (Some(namespace), Some(name)) => format!("{namespace}/{name}"),
                (None, Some(name)) => name.to_owned(),
                _ => "(unnamed)".to_owned(),
            };
            let origin = format!("{file}: {} {name}", text("kind"));
            expanded.push((origin, item.to_string()));
        }
    }
    expanded
}

/// Compiles the policy files `texts` (file name, text: `Policy`,
/// `ClusterAccessPolicy` or `AccessBinding` documents, all checked as a whole)
/// together with `resources` read from the cluster (each accepted or
/// rejected on its own), and says what became of each resource.
///
/// # Errors
/// A [`PolicyError`] listing every problem of the files; a resource's
/// problems are in its [`Verdict`] instead.
pub fn compile_all(
    texts: &[(String, String)],
    resources: &[ClusterResource],
) -> Result<(Policy, Vec<Verdict>), PolicyError> {
    let mut problems = Vec::new();
    let mut rejected: Vec<Vec<String>> = vec![Vec::new(); resources.len()];
    let mut parts = Vec::new();
    for (file, text) in &expand_lists(texts) {
        match document::parse(text) {
            Ok(parsed) => parts.push(Part {
                origin: file.clone(),
                parsed,
                resource: None,
            }),
            Err((line, column, message)) => problems.push(Problem {
                file: file.clone(),
                line,
                column,
                message,
            }),
        }
    }
    let mut order: Vec<usize> = (0..resources.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&resources[a], &resources[b]);
        (a.key.kind, &a.created, &a.key).cmp(&(b.key.kind, &b.created, &b.key))
    });
    for index in order {
        let resource = &resources[index];
        match document::parse(&resource.text) {
            Ok(parsed) => parts.push(Part {
                origin: resource.key.to_string(),
                parsed,
                resource: Some(index),
            }),
            Err((_, _, message)) => rejected[index].push(message),
        }
    }
    // Cluster policies are sorted by name (not age): a rename is the only
    // way to change precedence, and it shows in review.
    parts.sort_by_key(|part| match (&part.parsed, part.resource) {
        (_, None) => (0, String::new()),
        (Parsed::ClusterPolicy(_), Some(i)) => (1, resources[i].key.name.clone()),
        (_, Some(_)) => (2, String::new()),
    });

    // The policy documents, leaving out each resource whose problems are
    // its own until none is left (at most once per resource).
    let mut left_out = vec![false; parts.len()];
    let compiled = loop {
        let bodies: Vec<(&str, &PolicyBody)> = parts
            .iter()
            .zip(&left_out)
            .filter(|(_, out)| !**out)
            .filter_map(|(part, _)| match &part.parsed {
                Parsed::Policy(body) | Parsed::ClusterPolicy(body) => {
                    Some((part.origin.as_str(), body))
                }
                Parsed::AccessBinding { .. } => None,
            })
            .collect();
        let mut found = Vec::new();
        let compiled = compile(&bodies, &mut found);
        let mut again = false;
        for problem in found {
            match parts
                .iter()
                .position(|p| p.resource.is_some() && p.origin == problem.file)
            {
                Some(at) => {
                    left_out[at] = true;
                    again = true;
                    if let Some(index) = parts[at].resource {
                        rejected[index].push(problem.message);
                    }
                }
                None => problems.push(problem),
            }
        }
        if !again || !problems.is_empty() {
            break compiled;
        }
    };
    let super::Compiled {
        mut policy,
        defaults,
    } = compiled;
    // A resource read from the cluster has no lines to point at: its name
    // is where a binding or delegation is defined.
    for part in parts.iter().filter(|p| p.resource.is_some()) {
        let prefix = format!("{}:", part.origin);
        let places = policy
            .bindings
            .iter_mut()
            .map(|b| &mut b.defined_at)
            .chain(policy.delegations.iter_mut().map(|d| &mut d.defined_at));
        for place in places.filter(|p| p.starts_with(&prefix)) {
            place.clone_from(&part.origin);
        }
    }

    // Then each `AccessBinding` on its own, within the delegations.
    for (part, _) in parts.into_iter().zip(left_out).filter(|(_, out)| !*out) {
        let Parsed::AccessBinding { metadata, spec } = part.parsed else {
            continue;
        };
        let namespace = metadata.namespace.clone().unwrap_or_default();
        let mut found = Vec::new();
        let name = metadata.name;
        if let Some(first) = policy.binding(&name.value) {
            found.push(super::at(
                &part.origin,
                &name,
                format!(
                    "binding `{}` is already defined at {} (names are unique across the cluster: rename this AccessBinding, e.g. `{namespace}-{}`)",
                    name.value,
                    if part.resource.is_some() { "another resource or the policy file".to_owned() } else { first.defined_at.clone() },
                    name.value
                ),
            ));
        } else {
            let source_at = super::at(&part.origin, &spec, String::new());
            let raw = spec.value.into_binding(name, &namespace);
            if let Some(mut binding) = compile::compile_binding(
                &part.origin,
                &raw,
                &policy.limits,
                defaults.as_ref(),
                &mut found,
            ) {
                match super::delegation::check(&policy.delegations, &namespace, &binding) {
                    Ok(()) => {
                        if part.resource.is_some() {
                            binding.defined_at.clone_from(&part.origin);
                        }
                        policy.bindings.push(binding);
                    }
                    Err(message) => found.push(Problem {
                        message,
                        ..source_at
                    }),
                }
            }
        }
        match part.resource {
            Some(index) => rejected[index].extend(found.into_iter().map(|p| p.message)),
            None => problems.extend(found),
        }
    }
    if !problems.is_empty() {
        return Err(PolicyError { problems });
    }
    let verdicts = resources
        .iter()
        .zip(rejected)
        .map(|(resource, problems)| Verdict {
            key: resource.key.clone(),
            generation: resource.generation,
            problems,
            in_force: None,
        })
        .collect();
    Ok((policy, verdicts))
}

#[cfg(test)]
mod tests;
