//! The shell commands a document tells its reader to run: its `sh` blocks,
//! continuation lines joined, here-documents kept whole, and `#   command`
//! lines (documented alternatives) included. Tests run them as written.

/// The commands of `doc`, in order.
pub fn commands(doc: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    let mut current = String::new();
    let mut heredoc: Option<String> = None;
    for line in doc.lines() {
        if let Some(end) = &heredoc {
            current.push('\n');
            current.push_str(line);
            if line.trim() == end {
                heredoc = None;
                out.push(std::mem::take(&mut current));
            }
            continue;
        }
        if line.starts_with("```") {
            in_block = line == "```sh";
            continue;
        }
        if !in_block {
            continue;
        }
        let line = line.strip_prefix("#   ").unwrap_or(line);
        if current.is_empty() && (line.starts_with('#') || line.trim().is_empty()) {
            continue;
        }
        if let Some(at) = line.find("<<'") {
            let end = line[at + 3..]
                .split('\'')
                .next()
                .unwrap_or("EOF")
                .to_owned();
            current.push_str(line);
            heredoc = Some(end);
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_joined_and_here_documents_kept() {
        let doc = "text\n```sh\n# a comment\nvault write a \\\n    b=c   # why\n#   kubectl get x\ncat > f <<'EOF'\nk: v\nEOF\n```\n```yaml\nnot: a command\n```\n";
        assert_eq!(
            commands(doc),
            [
                "vault write a     b=c   # why",
                "kubectl get x",
                "cat > f <<'EOF'\nk: v\nEOF"
            ]
        );
    }
}
