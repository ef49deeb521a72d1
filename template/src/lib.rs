//! # tessera-template
//!
//! Templates that combine a credential's fields into one file (a DSN, a
//! `.pgpass`, a JSON config), for the policy's bindings (the broker) and a
//! pod's own files (the sidecar).
//!
//! A template is text with `{{ field }}` references, each optionally passed
//! through filters: `{{ password | urlencode }}`, `{{ port | default("5432") }}`.
//! Nothing else: no logic, no loops, no file or environment access. Values
//! stay in zeroizing buffers from the source to the rendered file.

use std::fmt;

use base64::Engine as _;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
use zeroize::Zeroizing;

/// Every byte but RFC 3986's unreserved characters is percent-encoded: safe
/// in a URL's user, password, path segment or query value.
const URL_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The filters a reference may apply, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Filter {
    /// Percent-encodes all but unreserved characters (URL user, password, query).
    UrlEncode,
    /// A JSON string literal, quotes included.
    Json,
    /// Standard base64 with padding.
    Base64,
    /// Escapes `\` and `:` for a `.pgpass` line.
    Pgpass,
    /// Drops leading and trailing whitespace.
    Trim,
    /// This text when the field is missing or empty.
    Default(String),
}

/// The most filters one reference may chain (each `base64` grows its input
/// by a third: a long chain is a way to fill memory, never a need).
pub const MAX_FILTERS: usize = 8;

/// The largest file a template may render: the default size of the pod's
/// whole credential volume.
pub const MAX_RENDERED_BYTES: usize = 1024 * 1024;

/// Names filters take in a template, for messages.
const FILTERS: &str = "urlencode, json, base64, pgpass, trim, default(\"text\")";

impl Filter {
    fn apply(&self, value: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
        let mut out = Zeroizing::new(Vec::with_capacity(value.len() + 2));
        match self {
            Filter::UrlEncode => {
                for chunk in percent_encoding::percent_encode(value, URL_COMPONENT) {
                    out.extend_from_slice(chunk.as_bytes());
                }
            }
            Filter::Json => {
                let text = std::str::from_utf8(value)
                    .map_err(|_| "the `json` filter needs UTF-8 text".to_owned())?;
                serde_json::to_writer(&mut *out, text).map_err(|e| e.to_string())?;
            }
            Filter::Base64 => {
                out.resize(base64::encoded_len(value.len(), true).unwrap_or(0), 0);
                let written = base64::engine::general_purpose::STANDARD
                    .encode_slice(value, &mut out[..])
                    .map_err(|e| e.to_string())?;
                out.truncate(written);
            }
            Filter::Pgpass => {
                for &byte in value {
                    if byte == b'\\' || byte == b':' {
                        out.push(b'\\');
                    }
                    out.push(byte);
                }
            }
            Filter::Trim => out.extend_from_slice(value.trim_ascii()),
            Filter::Default(text) => {
                out.extend_from_slice(if value.is_empty() {
                    text.as_bytes()
                } else {
                    value
                });
            }
        }
        Ok(out)
    }
}

/// One `{{ field | filter ... }}`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Reference {
    field: String,
    filters: Vec<Filter>,
}

impl Reference {
    /// Whether the reference renders without its field (a `default` comes first).
    fn optional(&self) -> bool {
        matches!(self.filters.first(), Some(Filter::Default(_)))
    }
}

/// A template split into literal text and field references.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Reference),
}

/// Where in the template text a problem is: 1-based line and column.
struct Position {
    line: usize,
    column: usize,
}

impl Position {
    fn of(text: &str, offset: usize) -> Self {
        let before = &text[..offset];
        Self {
            line: before.matches('\n').count() + 1,
            column: before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1,
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// Reads `{{ ... }}`'s inside: a field name, then `| filter` or
/// `| default("text")` any number of times.
fn parse_reference(inner: &str) -> Result<Reference, String> {
    let mut rest = inner.trim_start();
    let ident_end = |s: &str| {
        s.find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
            .unwrap_or(s.len())
    };
    let end = ident_end(rest);
    if end == 0 {
        return Err(if rest.trim().is_empty() {
            "empty `{{ }}` (name a field)".to_owned()
        } else {
            format!("`{}` is not a field name", rest.trim())
        });
    }
    let field = rest[..end].to_owned();
    rest = rest[end..].trim_start();
    let mut filters = Vec::new();
    while !rest.is_empty() {
        let Some(after_bar) = rest.strip_prefix('|') else {
            return Err(format!(
                "expected `|` or `}}}}` after `{field}`, found `{}`",
                rest.trim_end()
            ));
        };
        rest = after_bar.trim_start();
        let end = ident_end(rest);
        let name = &rest[..end];
        rest = rest[end..].trim_start();
        let filter = match name {
            "urlencode" => Filter::UrlEncode,
            "json" => Filter::Json,
            "base64" => Filter::Base64,
            "pgpass" => Filter::Pgpass,
            "trim" => Filter::Trim,
            "default" => {
                let (text, after) =
                    parse_argument(rest).ok_or_else(|| "write `default(\"text\")`".to_owned())?;
                rest = after.trim_start();
                Filter::Default(text)
            }
            "" => return Err(format!("`|` without a filter (known: {FILTERS})")),
            other => return Err(format!("unknown filter `{other}` (known: {FILTERS})")),
        };
        filters.push(filter);
        if filters.len() > MAX_FILTERS {
            return Err(format!(
                "more than {MAX_FILTERS} filters on `{field}` (a chain that long only grows the file)"
            ));
        }
    }
    if filters
        .iter()
        .skip(1)
        .any(|f| matches!(f, Filter::Default(_)))
    {
        return Err("`default` must come first (it stands in for the field)".to_owned());
    }
    Ok(Reference { field, filters })
}

/// `("text")` with `\"` and `\\` escapes; the text and what follows.
fn parse_argument(rest: &str) -> Option<(String, &str)> {
    let inner = rest.strip_prefix('(')?.trim_start().strip_prefix('"')?;
    let mut text = String::new();
    let mut chars = inner.char_indices();
    while let Some((index, c)) = chars.next() {
        match c {
            '\\' => text.push(chars.next()?.1),
            '"' => {
                let after = inner[index + 1..].trim_start().strip_prefix(')')?;
                return Some((text, after));
            }
            other => text.push(other),
        }
    }
    None
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Filter::UrlEncode => f.write_str("urlencode"),
            Filter::Json => f.write_str("json"),
            Filter::Base64 => f.write_str("base64"),
            Filter::Pgpass => f.write_str("pgpass"),
            Filter::Trim => f.write_str("trim"),
            Filter::Default(text) => write!(f, "default({text:?})"),
        }
    }
}

/// The template in its canonical spelling (`{{ field | filter }}`), for
/// reviewers: `policy diff` shows a changed template this way.
impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in &self.parts {
            match part {
                Part::Text(text) => f.write_str(text)?,
                Part::Field(reference) => {
                    write!(f, "{{{{ {}", reference.field)?;
                    for filter in &reference.filters {
                        write!(f, " | {filter}")?;
                    }
                    f.write_str(" }}")?;
                }
            }
        }
        Ok(())
    }
}

impl Template {
    /// Parses `text`.
    ///
    /// # Errors
    /// What is wrong and where (`line 1, column 12: unknown filter ...`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut offset = 0;
        while let Some(found) = text[offset..].find("{{") {
            let start = offset + found;
            if start > offset {
                parts.push(Part::Text(text[offset..start].to_owned()));
            }
            let inner_start = start + 2;
            let end = text[inner_start..].find("}}").ok_or_else(|| {
                format!(
                    "{}: unclosed `{{{{` (write `{{{{ field }}}}`)",
                    Position::of(text, start)
                )
            })?;
            let reference = parse_reference(&text[inner_start..inner_start + end])
                .map_err(|e| format!("{}: {e}", Position::of(text, start)))?;
            parts.push(Part::Field(reference));
            offset = inner_start + end + 2;
        }
        if offset < text.len() {
            parts.push(Part::Text(text[offset..].to_owned()));
        }
        Ok(Self { parts })
    }

    fn references(&self) -> impl Iterator<Item = &Reference> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(reference) => Some(reference),
            Part::Text(_) => None,
        })
    }

    /// The field names the template uses.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.references().map(|r| r.field.as_str())
    }

    /// The field names the template cannot render without (no `default`).
    pub fn required_fields(&self) -> impl Iterator<Item = &str> {
        self.references()
            .filter(|r| !r.optional())
            .map(|r| r.field.as_str())
    }

    /// Renders with the values `field` looks up by name.
    ///
    /// # Errors
    /// A field the template needs that `field` lacks (its name), or a filter
    /// that cannot take its value (`json` of bytes that are not UTF-8).
    pub fn render<'a>(
        &self,
        field: impl Fn(&str) -> Option<&'a [u8]>,
    ) -> Result<Zeroizing<Vec<u8>>, String> {
        let mut out = Zeroizing::new(Vec::new());
        for part in &self.parts {
            match part {
                Part::Text(text) => out.extend_from_slice(text.as_bytes()),
                Part::Field(reference) => {
                    let mut value = field(&reference.field).map(|v| Zeroizing::new(v.to_vec()));
                    for filter in &reference.filters {
                        let input = match (&value, filter) {
                            (Some(value), _) => value.as_slice(),
                            (None, Filter::Default(_)) => &[],
                            (None, _) => return Err(reference.field.clone()),
                        };
                        let applied = filter
                            .apply(input)
                            .map_err(|e| format!("`{}`: {e}", reference.field))?;
                        too_large(applied.len())?;
                        value = Some(applied);
                    }
                    let value = value.ok_or_else(|| reference.field.clone())?;
                    out.extend_from_slice(&value);
                }
            }
            too_large(out.len())?;
        }
        Ok(out)
    }
}

/// Refuses a rendering past [`MAX_RENDERED_BYTES`].
fn too_large(len: usize) -> Result<(), String> {
    if len > MAX_RENDERED_BYTES {
        Err(format!(
            "the rendered file would exceed {MAX_RENDERED_BYTES} bytes (the credential volume's default size)"
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
            .collect()
    }

    fn render(template: &Template, values: &BTreeMap<String, Vec<u8>>) -> Result<Vec<u8>, String> {
        template
            .render(|name| values.get(name).map(Vec::as_slice))
            .map(|rendered| rendered.to_vec())
    }

    fn rendered(template: &str, pairs: &[(&str, &str)]) -> String {
        let bytes = render(&Template::parse(template).unwrap(), &fields(pairs)).unwrap();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn a_chain_of_filters_cannot_grow_a_file_without_bound() {
        let chain = |n: usize| format!("{{{{ password{} }}}}", " | base64".repeat(n));
        let error = Template::parse(&chain(45)).unwrap_err();
        assert!(error.contains("more than 8 filters"), "{error}");
        let eight = Template::parse(&chain(8)).unwrap();
        let big = "x".repeat(200 * 1024);
        let error = render(&eight, &fields(&[("password", &big)])).unwrap_err();
        assert!(error.contains("would exceed 1048576 bytes"), "{error}");
        assert!(render(&eight, &fields(&[("password", "p")])).is_ok());
    }

    #[test]
    fn renders_fields_into_text() {
        let t = Template::parse("{{host}}:5432:*:{{ username }}:{{password}}").unwrap();
        let values = fields(&[("host", "db"), ("username", "u"), ("password", "p")]);
        assert_eq!(render(&t, &values).unwrap(), b"db:5432:*:u:p");
        assert_eq!(
            t.fields().collect::<Vec<_>>(),
            ["host", "username", "password"]
        );
    }

    #[test]
    fn filters_make_any_password_safe_in_a_dsn_pgpass_jdbc_url_and_json() {
        let values = [("username", "app"), ("password", "p@ss:w/rd%1 \"\\")];
        assert_eq!(
            rendered(
                "postgresql://{{ username }}:{{ password | urlencode }}@db:5432/orders",
                &values
            ),
            "postgresql://app:p%40ss%3Aw%2Frd%251%20%22%5C@db:5432/orders"
        );
        assert_eq!(
            rendered(
                "db:5432:orders:{{ username | pgpass }}:{{ password | pgpass }}",
                &values
            ),
            "db:5432:orders:app:p@ss\\:w/rd%1 \"\\\\"
        );
        assert_eq!(
            rendered(
                "jdbc:postgresql://db:5432/orders?user={{username|urlencode}}&password={{password|urlencode}}",
                &values
            ),
            "jdbc:postgresql://db:5432/orders?user=app&password=p%40ss%3Aw%2Frd%251%20%22%5C"
        );
        assert_eq!(
            rendered(
                r#"{"user": {{ username | json }}, "password": {{ password | json }}}"#,
                &values
            ),
            r#"{"user": "app", "password": "p@ss:w/rd%1 \"\\"}"#
        );
        assert_eq!(rendered("{{ username | base64 }}", &values), "YXBw");
        assert_eq!(
            rendered("{{ pad | trim | base64 }}", &[("pad", " x \n")]),
            "eA=="
        );
    }

    #[test]
    fn default_stands_in_for_a_missing_or_empty_field() {
        let t = Template::parse(r#"{{ host }}:{{ port | default("5432") }}"#).unwrap();
        assert_eq!(t.required_fields().collect::<Vec<_>>(), ["host"]);
        assert_eq!(t.fields().collect::<Vec<_>>(), ["host", "port"]);
        assert_eq!(rendered(r#"{{ port | default("5432") }}"#, &[]), "5432");
        assert_eq!(
            rendered(r#"{{ port | default("5432") }}"#, &[("port", "")]),
            "5432"
        );
        assert_eq!(
            rendered(r#"{{ port | default("5432") }}"#, &[("port", "6432")]),
            "6432"
        );
        assert_eq!(
            rendered(r#"{{ note | default("a \"b\" | }") | urlencode }}"#, &[]),
            "a%20%22b%22%20%7C%20%7D"
        );
    }

    #[test]
    fn mistakes_name_their_line_and_column() {
        for (template, expected) in [
            ("{{ a", "line 1, column 1: unclosed `{{`"),
            ("x {{ }}", "line 1, column 3: empty `{{ }}`"),
            (
                "ok\n  {{ password | urlencod }}",
                "line 2, column 3: unknown filter `urlencod` (known: urlencode",
            ),
            ("{{ password | }}", "`|` without a filter"),
            (
                "{{ password urlencode }}",
                "expected `|` or `}}` after `password`",
            ),
            ("{{ port | default(5432) }}", "write `default(\"text\")`"),
            (
                "{{ port | urlencode | default(\"1\") }}",
                "`default` must come first",
            ),
            ("{{ $x }}", "`$x` is not a field name"),
        ] {
            let error = Template::parse(template).unwrap_err();
            assert!(
                error.starts_with(expected) || error.contains(expected),
                "{template}: {error}"
            );
        }
    }

    #[test]
    fn rendering_names_what_is_missing_or_unencodable() {
        let t = Template::parse("{{ missing | urlencode }}").unwrap();
        assert_eq!(render(&t, &BTreeMap::new()).unwrap_err(), "missing");
        let binary: BTreeMap<String, Vec<u8>> = [("key".to_owned(), vec![0xff, 0xfe])].into();
        let error = render(&Template::parse("{{ key | json }}").unwrap(), &binary).unwrap_err();
        assert_eq!(error, "`key`: the `json` filter needs UTF-8 text");
        let encoded = render(&Template::parse("{{ key | base64 }}").unwrap(), &binary).unwrap();
        assert_eq!(encoded, b"//4=");
    }
}
