//! Datalog policy files: loading with file-and-line errors, grant evaluation for the broker,
//! and the data-driven policy test runner.
//!
//! Policies are trusted configuration written by operators; request data never becomes
//! policy source. It enters the authorizer only as typed facts.

mod cases;
mod grant;

use std::path::{Path, PathBuf};

use biscuit_auth::AuthorizerBuilder;

pub use cases::{run_cases, CaseOutcome, CaseReport};
pub use grant::{GrantDecision, GrantEvaluator, PolicyEvalError, ScopeOutcome};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policies in {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("no *.dl policy files in {0}: refusing to run without a policy")]
    Empty(PathBuf),
}

/// One loaded policy file.
#[derive(Debug, Clone)]
pub struct PolicyFile {
    pub path: PathBuf,
    pub source: String,
}

/// A directory of policy files, parsed once at start.
#[derive(Debug, Clone)]
pub struct PolicySet {
    files: Vec<PolicyFile>,
    builder: AuthorizerBuilder,
}

impl PolicySet {
    /// Loads every `*.dl` file of `dir` (not recursive), in name order.
    pub fn load_dir(dir: &Path) -> Result<PolicySet, PolicyError> {
        let io = |source| PolicyError::Io {
            path: dir.to_owned(),
            source,
        };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.is_file() && path.extension().is_some_and(|ext| ext == "dl"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(PolicyError::Empty(dir.to_owned()));
        }
        let mut files = Vec::new();
        for path in paths {
            let source = std::fs::read_to_string(&path).map_err(|source| PolicyError::Io {
                path: path.clone(),
                source,
            })?;
            files.push(PolicyFile { path, source });
        }
        Self::from_files(files)
    }

    #[allow(
        clippy::disallowed_methods,
        reason = "policy files are trusted operator configuration, parsed once at start, never request data"
    )]
    pub fn from_files(files: Vec<PolicyFile>) -> Result<PolicySet, PolicyError> {
        let mut builder = AuthorizerBuilder::new();
        for file in &files {
            builder = builder
                .code(&file.source)
                .map_err(|e| parse_error(&file.path, &file.source, e))?;
        }
        Ok(PolicySet { files, builder })
    }

    /// A fresh builder holding every policy; callers add request facts and limits.
    pub fn builder(&self) -> AuthorizerBuilder {
        self.builder.clone()
    }

    pub fn files(&self) -> &[PolicyFile] {
        &self.files
    }
}

/// Locates the first syntax error. biscuit-parser's errors borrow the failing text from the
/// source, so its address gives the exact offset; other errors (parameters) point at line 1.
fn parse_error(path: &Path, source: &str, error: biscuit_auth::error::Token) -> PolicyError {
    let (offset, message) = match biscuit_parser::parser::parse_source(source) {
        Err(errors) => match errors.first() {
            Some(first) => {
                let offset = (first.input.as_ptr() as usize)
                    .checked_sub(source.as_ptr() as usize)
                    .filter(|offset| *offset <= source.len())
                    .unwrap_or(0);
                let message = first
                    .message
                    .clone()
                    .unwrap_or_else(|| "syntax error".to_owned());
                (offset, message)
            }
            None => (0, error.to_string()),
        },
        Ok(_) => (0, error.to_string()),
    };
    let before = source.get(..offset).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    let near: String = source
        .get(offset..)
        .unwrap_or("")
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(60)
        .collect();
    PolicyError::Parse {
        path: path.to_owned(),
        line,
        column,
        message: if near.is_empty() {
            message
        } else {
            format!("{message} near `{near}`")
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_rule_reports_file_and_line() {
        let files = vec![PolicyFile {
            path: PathBuf::from("policies/grants.dl"),
            source: "// ok\ngrant($r, \"read\") <- requested($r, \"read\");\n\ngrant($r <- oops;\n"
                .to_owned(),
        }];
        let err = PolicySet::from_files(files).expect_err("must not parse");
        match err {
            PolicyError::Parse { path, line, .. } => {
                assert_eq!(path, PathBuf::from("policies/grants.dl"));
                assert_eq!(line, 4, "{err}", err = "line");
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn an_empty_directory_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            PolicySet::load_dir(dir.path()),
            Err(PolicyError::Empty(_))
        ));
    }
}
