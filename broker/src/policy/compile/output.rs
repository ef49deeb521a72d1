//! A binding's `output:` block: which fields become which files, the
//! templates, and the files' mode and group.

use std::collections::{BTreeMap, BTreeSet};

use super::{checks::mode, defaults::Defaults};
use crate::policy::{Output, Problem, Source, at, document::BindingDoc, render::Template, safe};

pub(super) fn compile_output(
    file: &str,
    raw: &BindingDoc,
    name: &str,
    source: &Source,
    defaults: Option<&Defaults>,
    problems: &mut Vec<Problem>,
) -> Output {
    let mut output = Output {
        files: BTreeMap::new(),
        templates: BTreeMap::new(),
        templates_only: false,
        mode: defaults.and_then(|d| d.mode),
        group: defaults.and_then(|d| d.group),
    };
    let Some(doc) = &raw.output else {
        return output;
    };
    let o = &doc.value;
    let known = source.known_fields();
    for (field, file_name) in &o.files {
        if !safe(file_name) {
            problems.push(at(
                file,
                doc,
                format!("binding `{name}`: output file `{file_name}` is not a safe file name"),
            ));
        }
        if let Some(keys) = &known
            && !keys.contains(field)
        {
            problems.push(at(file, doc, format!("binding `{name}`: output.files renames `{field}`, which the source does not deliver")));
        }
    }
    output.files = o.files.clone();
    for (file_name, text) in &o.templates {
        if !safe(file_name) {
            problems.push(at(
                file,
                doc,
                format!("binding `{name}`: template file `{file_name}` is not a safe file name"),
            ));
        }
        match Template::parse(text) {
            Ok(template) => {
                if let Some(keys) = &known
                    && let Some(missing) = template
                        .required_fields()
                        .find(|f| !keys.iter().any(|k| k == f))
                {
                    problems.push(at(
                        file,
                        doc,
                        format!("binding `{name}`: template `{file_name}` uses `{missing}`, which the source does not deliver"),
                    ));
                }
                if let Some(key) = source.pod_key()
                    && template.required_fields().any(|f| f == key.field())
                {
                    problems.push(at(
                        file,
                        doc,
                        format!("binding `{name}`: template `{file_name}` uses `{}`, the private key the pod makes and keeps (the broker never has it: rename its file with output.files instead)", key.field()),
                    ));
                }
                output.templates.insert(file_name.clone(), template);
            }
            Err(e) => problems.push(at(
                file,
                doc,
                format!("binding `{name}`: template `{file_name}`: {e}"),
            )),
        }
    }
    output.templates_only = o.templates_only;
    if o.templates_only && o.templates.is_empty() {
        problems.push(at(
            file,
            doc,
            format!("binding `{name}`: templatesOnly without templates would write nothing"),
        ));
    }
    let mut names = BTreeSet::new();
    // The fields the source delivers; for KV without `keys`, at least those
    // the output names (renamed or used by a template): they must exist.
    let delivered: BTreeSet<String> = match &known {
        Some(keys) => keys.iter().cloned().collect(),
        None => o
            .files
            .keys()
            .cloned()
            .chain(
                output
                    .templates
                    .values()
                    .flat_map(|t| t.fields().map(str::to_owned)),
            )
            .collect(),
    };
    let raw_names: Vec<&String> = if o.templates_only {
        Vec::new()
    } else {
        delivered
            .iter()
            .map(|k| o.files.get(k).unwrap_or(k))
            .collect()
    };
    for n in raw_names.into_iter().chain(o.templates.keys()) {
        if !names.insert(n) {
            problems.push(at(
                file,
                doc,
                format!("binding `{name}`: two outputs are written to file `{n}`"),
            ));
        }
    }
    if let Some(m) = &o.mode {
        output.mode = mode(file, m, problems).or(output.mode);
    }
    if o.group.is_some() {
        output.group = o.group;
    }
    output
}
