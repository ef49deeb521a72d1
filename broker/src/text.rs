//! Text from outside the broker made safe to show.

/// A name someone else chose (a caller's binding name, a KV key from Vault) as
/// errors, logs and the audit log show it: at most the 253 characters a name
/// may have, control characters escaped (a newline in a name must not forge a
/// line in a text log).
pub fn printable(name: &str) -> String {
    name.chars()
        .take(253)
        .flat_map(|c| {
            let escaped = c.is_control().then(|| c.escape_default());
            escaped
                .into_iter()
                .flatten()
                .chain((!c.is_control()).then_some(c))
        })
        .collect()
}
