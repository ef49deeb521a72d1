//! Turns a source's fields into the files of a binding: renames, and templates
//! that combine several fields into one file (a DSN, a `.pgpass`).
//!
//! Templates know one construct, `{{ field }}`, replaced by the field's value.
//! No logic, no escaping rules to get wrong.

use std::collections::BTreeMap;

use crate::secret::Secret;

/// A template split into literal text and field references.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(String),
}

impl Template {
    /// Parses `text`.
    ///
    /// # Errors
    /// An unclosed `{{` or an empty `{{ }}`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_owned()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or_else(|| "unclosed `{{` (write `{{ field }}`)".to_owned())?;
            let name = after[..end].trim();
            if name.is_empty() {
                return Err("empty `{{ }}` (name a field)".to_owned());
            }
            parts.push(Part::Field(name.to_owned()));
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Self { parts })
    }

    /// The field names the template uses.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(name) => Some(name.as_str()),
            Part::Text(_) => None,
        })
    }

    /// Renders with `fields`.
    ///
    /// # Errors
    /// The name of a field the template uses that `fields` lacks.
    pub fn render(&self, fields: &BTreeMap<String, Secret>) -> Result<Secret, String> {
        let mut out = Vec::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.extend_from_slice(text.as_bytes()),
                Part::Field(name) => out.extend_from_slice(
                    fields
                        .get(name)
                        .ok_or_else(|| name.clone())?
                        .expose_secret(),
                ),
            }
        }
        Ok(Secret::new(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_fields_into_text() {
        let t = Template::parse("{{host}}:5432:*:{{ username }}:{{password}}").unwrap();
        let fields: BTreeMap<String, Secret> =
            [("host", "db"), ("username", "u"), ("password", "p")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), Secret::from(v.to_owned())))
                .collect();
        assert_eq!(t.render(&fields).unwrap().expose_secret(), b"db:5432:*:u:p");
        assert_eq!(
            t.fields().collect::<Vec<_>>(),
            ["host", "username", "password"]
        );
    }

    #[test]
    fn rejects_broken_templates() {
        assert!(Template::parse("{{ a").is_err());
        assert!(Template::parse("{{ }}").is_err());
        let t = Template::parse("{{ missing }}").unwrap();
        assert_eq!(t.render(&BTreeMap::new()).unwrap_err(), "missing");
    }
}
