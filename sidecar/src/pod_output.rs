//! The pod owner's say over a binding's files, within what the broker
//! delivers: renames, and templates rendered from the delivered files
//! (`tessera.dev/files.<binding>` and `tessera.dev/templates.<binding>`,
//! which the webhook checks and passes as `TESSERA_POD_OUTPUT`). A template
//! can use only what the broker sent for that binding, so it can narrow or
//! reshape a credential, never widen it.

use std::collections::BTreeMap;

use serde::Deserialize;
use tessera_template::Template;
use zeroize::Zeroizing;

/// A binding's fields: name to value, zeroed on drop.
pub type Fields = BTreeMap<String, Zeroizing<Vec<u8>>>;

/// Per binding: delivered file to new name, and extra files from templates.
#[derive(Clone, Debug, Default)]
pub struct PodOutput {
    bindings: BTreeMap<String, BindingOutput>,
}

#[derive(Clone, Debug, Default)]
struct BindingOutput {
    files: BTreeMap<String, String>,
    templates: BTreeMap<String, Template>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BindingOutputDoc {
    #[serde(default)]
    files: BTreeMap<String, String>,
    #[serde(default)]
    templates: BTreeMap<String, String>,
}

/// Parses `{"<binding>": {"files": {...}, "templates": {...}}}`.
///
/// # Errors
/// What is wrong, naming the binding and template.
pub fn parse(text: &str) -> Result<PodOutput, String> {
    let docs: BTreeMap<String, BindingOutputDoc> =
        serde_json::from_str(text).map_err(|e| format!("TESSERA_POD_OUTPUT: {e}"))?;
    let mut bindings = BTreeMap::new();
    for (binding, doc) in docs {
        let mut templates = BTreeMap::new();
        for (file, text) in doc.templates {
            let template = Template::parse(&text)
                .map_err(|e| format!("binding `{binding}`: template `{file}`: {e}"))?;
            templates.insert(file, template);
        }
        bindings.insert(
            binding,
            BindingOutput {
                files: doc.files,
                templates,
            },
        );
    }
    Ok(PodOutput { bindings })
}

impl PodOutput {
    /// `fields` as the pod owner shaped them: templates rendered from the
    /// delivered files, then renames.
    ///
    /// # Errors
    /// A template that needs a file the broker did not deliver, a rename of
    /// one it did not deliver, or two outputs with one name.
    pub fn apply(&self, binding: &str, fields: &Fields) -> Result<Option<Fields>, String> {
        let Some(output) = self.bindings.get(binding) else {
            return Ok(None);
        };
        let mut shaped = Fields::new();
        for (field, value) in fields {
            let name = output.files.get(field).unwrap_or(field);
            if shaped.insert(name.clone(), value.clone()).is_some() {
                return Err(format!("binding `{binding}`: two files are named `{name}`"));
            }
        }
        if let Some(missing) = output.files.keys().find(|f| !fields.contains_key(*f)) {
            return Err(format!(
                "binding `{binding}`: tessera.dev/files renames `{missing}`, which the broker did not deliver"
            ));
        }
        for (file, template) in &output.templates {
            let rendered: Zeroizing<Vec<u8>> = template
                .render(|name| fields.get(name).map(|value| value.as_slice()))
                .map_err(|e| format!("binding `{binding}`: template `{file}` needs {e}, which the broker did not deliver"))?;
            if shaped.insert(file.clone(), rendered).is_some() {
                return Err(format!("binding `{binding}`: two files are named `{file}`"));
            }
        }
        Ok(Some(shaped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Fields {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Zeroizing::new(v.as_bytes().to_vec())))
            .collect()
    }

    fn text(fields: &Fields, name: &str) -> String {
        String::from_utf8(fields[name].to_vec()).unwrap()
    }

    #[test]
    fn renames_and_templates_reshape_only_what_was_delivered() {
        let output = parse(
            r#"{"db": {"files": {"password": "db-password"},
                       "templates": {"dsn": "postgresql://{{ username }}:{{ password | urlencode }}@db/orders"}}}"#,
        )
        .unwrap();
        let delivered = fields(&[("username", "app"), ("password", "p@ss")]);
        let shaped = output.apply("db", &delivered).unwrap().unwrap();
        assert_eq!(
            shaped.keys().collect::<Vec<_>>(),
            ["db-password", "dsn", "username"]
        );
        assert_eq!(text(&shaped, "dsn"), "postgresql://app:p%40ss@db/orders");
        assert!(output.apply("other", &delivered).unwrap().is_none());

        let wider = parse(r#"{"db": {"templates": {"x": "{{ root_token }}"}}}"#).unwrap();
        let error = wider.apply("db", &delivered).unwrap_err();
        assert!(
            error.contains("needs root_token, which the broker did not deliver"),
            "{error}"
        );
        let clash = parse(r#"{"db": {"files": {"password": "username"}}}"#).unwrap();
        assert!(
            clash
                .apply("db", &delivered)
                .unwrap_err()
                .contains("two files")
        );
        assert!(
            parse(r#"{"db": {"templates": {"x": "{{ a | nope }}"}}}"#)
                .unwrap_err()
                .contains("unknown filter `nope`")
        );
    }
}
