//! The documentation's links: every relative link in README.md, docs/ and the
//! crates' and chart's READMEs points at a file that exists, and every
//! `#anchor` at a heading of that file (GitHub's heading slugs).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use tessera_tests::workspace_root;

/// The Markdown files a reader follows links through.
fn documents() -> Vec<PathBuf> {
    let root = workspace_root();
    let mut files = vec![
        root.join("README.md"),
        root.join("client/README.md"),
        root.join("deploy/helm/tessera/README.md"),
        root.join("CONTRIBUTING.md"),
        root.join("SECURITY.md"),
    ];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// The text outside fenced code blocks, where links render; code lines are
/// blanked, so line numbers stay those of the file.
fn prose(text: &str) -> String {
    let mut fenced = false;
    let mut out = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// GitHub's anchor for a heading: lower case, spaces to hyphens, punctuation
/// other than `-` and `_` dropped.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// Every anchor of a Markdown file, numbered duplicates included.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for line in prose(text).lines() {
        let Some(heading) = line.strip_prefix('#') else {
            continue;
        };
        let base = slug(heading.trim_start_matches('#'));
        let mut anchor = base.clone();
        let mut n = 0;
        while seen.contains(&anchor) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
        seen.insert(anchor);
    }
    seen
}

/// `(target, line)` of every inline link `[text](target)`.
fn links(text: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    for (number, line) in prose(text).lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            found.push((after[..end].to_owned(), number + 1));
            rest = &after[end..];
        }
    }
    found
}

/// What is wrong with `target` linked from `from`, if anything.
fn broken(from: &Path, target: &str) -> Option<String> {
    if target.contains("://") || target.starts_with("mailto:") {
        return None;
    }
    let (path, anchor) = match target.split_once('#') {
        Some((path, anchor)) => (path, Some(anchor)),
        None => (target, None),
    };
    let file = if path.is_empty() {
        from.to_owned()
    } else {
        from.parent().unwrap().join(path)
    };
    if !file.exists() {
        return Some(format!("{} does not exist", file.display()));
    }
    let anchor = anchor?;
    let text = std::fs::read_to_string(&file).ok()?;
    (!anchors(&text).contains(anchor)).then(|| format!("no heading `#{anchor}` in {path}"))
}

#[test]
fn every_relative_link_and_anchor_in_the_docs_resolves() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for document in documents() {
        let text = std::fs::read_to_string(&document).unwrap();
        for (target, line) in links(&text) {
            checked += 1;
            if let Some(problem) = broken(&document, &target) {
                let shown = document.strip_prefix(workspace_root()).unwrap().display();
                problems.push(format!("{shown}:{line}: ({target}): {problem}"));
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} links found: the parser is wrong"
    );
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_link_check_finds_what_it_should() {
    assert_eq!(
        slug(" Fail closed, without deadlock"),
        "fail-closed-without-deadlock"
    );
    assert_eq!(slug(" Vault's side"), "vaults-side");
    let text = "# A\n## A\n```\n# not a heading\n```\nsee [x](#a-1) and [y](other.md#b)\n";
    assert_eq!(
        anchors(text),
        BTreeSet::from(["a".to_owned(), "a-1".to_owned()])
    );
    assert_eq!(
        links(text),
        [("#a-1".to_owned(), 6), ("other.md#b".to_owned(), 6)]
    );
    let dir = tempfile::tempdir().unwrap();
    let from = dir.path().join("doc.md");
    std::fs::write(&from, text).unwrap();
    assert!(broken(&from, "#a-1").is_none());
    assert!(broken(&from, "#a-2").is_some());
    assert!(broken(&from, "missing.md").is_some());
}
