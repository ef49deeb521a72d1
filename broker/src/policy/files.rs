//! Finding and reading the policy files a configuration names: a file, or
//! the YAML files of a directory (a mounted ConfigMap).

use std::path::{Path, PathBuf};

use super::{PolicyError, Problem};

/// The policy files found under some paths, and their text.
pub struct Sources {
    /// The files, in load order.
    pub files: Vec<PathBuf>,
    /// (file name, text) for each file.
    pub texts: Vec<(String, String)>,
}

/// Reads every policy file under `paths`.
///
/// # Errors
/// A [`PolicyError`] for paths that do not exist or cannot be read.
pub fn read_sources(paths: &[PathBuf]) -> Result<Sources, PolicyError> {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for path in paths {
        match policy_files(path) {
            Ok(found) => files.extend(found),
            Err(problem) => problems.push(problem),
        }
    }
    let mut texts = Vec::new();
    for file in &files {
        match std::fs::read_to_string(file) {
            Ok(text) => texts.push((file.display().to_string(), text)),
            Err(e) => problems.push(Problem {
                file: file.display().to_string(),
                line: 0,
                column: 0,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    if problems.is_empty() {
        Ok(Sources { files, texts })
    } else {
        Err(PolicyError { problems })
    }
}

/// The policy files a path names: itself, or the YAML files of a directory.
fn policy_files(path: &Path) -> Result<Vec<PathBuf>, Problem> {
    let problem = |message: String| Problem {
        file: path.display().to_string(),
        line: 0,
        column: 0,
        message,
    };
    if !path.is_dir() {
        return if path.exists() {
            Ok(vec![path.to_owned()])
        } else {
            Err(problem("no such file or directory".to_owned()))
        };
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| problem(format!("cannot list: {e}")))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            !name.starts_with("..")
                && (name.ends_with(".yaml") || name.ends_with(".yml"))
                && p.is_file()
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(problem(
            "directory holds no *.yaml or *.yml policy file".to_owned(),
        ));
    }
    Ok(files)
}
