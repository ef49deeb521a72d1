//! Who a binding is for.

use crate::policy::{Problem, Subject, at, document::BindingDoc, glob};

/// The binding's subjects; each one's namespace and service account checked.
pub(super) fn compile_subjects(
    file: &str,
    raw: &BindingDoc,
    name: &str,
    problems: &mut Vec<Problem>,
) -> Vec<Subject> {
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
        if let Some(cluster) = &s.cluster
            && (cluster.value.is_empty() || cluster.value.contains('/'))
        {
            problems.push(at(
                file,
                cluster,
                format!(
                    "binding `{name}`: subject cluster `{}` is empty or contains `/` (a cluster.name, or a glob like prod-*)",
                    cluster.value
                ),
            ));
        }
        subjects.push(Subject {
            cluster: s.cluster.as_ref().map(|c| c.value.clone()),
            namespace: s.namespace.value.clone(),
            service_account: s.service_account.value.clone(),
            pod_labels: s.pod_labels.clone(),
        });
    }
    subjects
}
