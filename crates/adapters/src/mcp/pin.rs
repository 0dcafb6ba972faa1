//! Tool pinning: a digest of each upstream tool's definition, fixed by the operator in the
//! configuration or recorded the first time the gateway sees the tool. A tool whose
//! definition no longer matches its pin is neither listed nor callable until an operator
//! accepts the new digest (writes it into the configuration), so a server cannot change
//! what a tool means ("rug pull") under an agent that already trusts it.
//!
//! Pins live in the pin file, so a restart never pins a changed definition afresh: a first
//! sight is allowed only once it is written (temporary file, fsync, rename), a configured
//! digest is written there at start (an acceptance outlives its line in the configuration),
//! and a file that cannot be read or parsed stops the gateway instead of reading as "no
//! pins". Processes sharing the file (stdio sessions of one configuration) take a lock and
//! re-read it before recording, so none overwrites another's pin.
//!
//! The digest covers what the model reads and what the gateway decides on: name, title,
//! description, input and output schemas, annotations. Icons and `_meta` are left out: they
//! change for cosmetic reasons and neither instructs the model nor reaches a decision.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rmcp::model::Tool;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// `sha256:<hex>` of the canonical JSON (sorted keys, no whitespace) of the definition.
pub fn tool_digest(tool: &Tool) -> String {
    let definition = json!({
        "name": tool.name,
        "title": tool.title,
        "description": tool.description,
        "inputSchema": tool.input_schema.as_ref(),
        "outputSchema": tool.output_schema.as_deref(),
        "annotations": tool.annotations,
    });
    let mut canonical = String::new();
    write_canonical(&definition, &mut canonical);
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    )
}

/// Serialises with object keys sorted at every level, whatever map order serde_json keeps,
/// so the same definition always hashes the same.
pub fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*key).clone()).to_string());
                out.push(':');
                if let Some(v) = map.get(*key) {
                    write_canonical(v, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// `sha256:` and 64 lowercase hex digits: what [`tool_digest`] produces.
pub fn is_digest(text: &str) -> bool {
    text.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinCheck {
    /// Matches the configured pin, or the one recorded when first seen.
    Pinned,
    /// First sight, no configured pin: recorded now (in the pin file).
    Recorded,
    Changed {
        pinned: String,
        seen: String,
    },
    /// First sight, but the pin could not be written: refused, since an unwritten pin would
    /// be taken afresh after a restart.
    Unavailable(String),
}

#[derive(Debug, thiserror::Error)]
pub enum PinFileError {
    #[error("cannot read the pin file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the pin file {path} is not valid ({why}); restore it from a backup, or remove it to pin every tool afresh on first sight"
    )]
    Corrupt { path: PathBuf, why: String },
    #[error(
        "the pin file {path} is writable by others (mode {mode:o}): anyone who can write it can accept a changed tool"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("cannot write the pin file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Pins as the file keeps them: server -> tool -> digest.
type Pins = BTreeMap<String, BTreeMap<String, String>>;

const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PinFile {
    version: u32,
    pins: Pins,
}

/// Pins per (server, tool), kept in the pin file.
pub struct PinBook {
    path: PathBuf,
    /// What this process has read or written; the file is re-read before each first sight.
    pins: Mutex<Pins>,
}

impl PinBook {
    /// Loads the pin file (absent means no pins yet) and records the configured digests in
    /// it: they are the operator's acceptances, and win over anything recorded.
    pub fn open(
        path: &Path,
        configured: &[(String, String, String)],
    ) -> Result<Self, PinFileError> {
        let _lock = FileLock::take(path)?;
        let mut pins = read(path)?;
        let mut changed = false;
        for (server, tool, digest) in configured {
            let slot = pins.entry(server.clone()).or_default();
            if slot.get(tool) != Some(digest) {
                slot.insert(tool.clone(), digest.clone());
                changed = true;
            }
        }
        if changed || !path.exists() {
            write(path, &pins)?;
        }
        Ok(PinBook {
            path: path.to_owned(),
            pins: Mutex::new(pins),
        })
    }

    pub fn check(&self, server: &str, tool: &str, digest: &str) -> PinCheck {
        self.check_all(server, &[(tool, digest)])
            .pop()
            .unwrap_or_else(|| PinCheck::Unavailable("no answer".into()))
    }

    /// Checks several tools of one server, writing the file at most once for all first
    /// sights among them (a first listing sees every tool at once).
    pub fn check_all(&self, server: &str, tools: &[(&str, &str)]) -> Vec<PinCheck> {
        // A poisoned lock cannot tell first sight from a change: refuse.
        let Ok(mut pins) = self.pins.lock() else {
            return tools
                .iter()
                .map(|_| PinCheck::Unavailable("pin book lock poisoned".into()))
                .collect();
        };
        let unknown: Vec<bool> = tools
            .iter()
            .map(|(tool, _)| lookup(&pins, server, tool).is_none())
            .collect();
        let mut failure = None;
        if unknown.contains(&true) {
            match self.record_first_sights(server, tools) {
                Ok(fresh) => *pins = fresh,
                Err(e) => {
                    tracing::error!(error = %e, server, "tool pins not recorded: refusing those tools");
                    failure = Some(e.to_string());
                }
            }
        }
        tools
            .iter()
            .zip(unknown)
            .map(
                |((tool, digest), first_sight)| match lookup(&pins, server, tool) {
                    Some(pinned) if first_sight && pinned == *digest => PinCheck::Recorded,
                    Some(pinned) => compare(pinned, digest),
                    None => PinCheck::Unavailable(
                        failure.clone().unwrap_or_else(|| "not recorded".into()),
                    ),
                },
            )
            .collect()
    }

    /// Under the file lock: re-reads the file (another process's pins win over this first
    /// sight), adds the tools it does not pin yet, writes it. The file is the truth: what
    /// this process knew is replaced by it.
    fn record_first_sights(
        &self,
        server: &str,
        tools: &[(&str, &str)],
    ) -> Result<Pins, PinFileError> {
        let _lock = FileLock::take(&self.path)?;
        let mut pins = read(&self.path)?;
        let slot = pins.entry(server.to_owned()).or_default();
        let mut added = false;
        for (tool, digest) in tools {
            if !slot.contains_key(*tool) {
                tracing::info!(server, tool, digest, "tool pinned on first sight");
                slot.insert((*tool).to_owned(), (*digest).to_owned());
                added = true;
            }
        }
        if added {
            write(&self.path, &pins)?;
        }
        Ok(pins)
    }
}

fn lookup<'a>(pins: &'a Pins, server: &str, tool: &str) -> Option<&'a String> {
    pins.get(server).and_then(|tools| tools.get(tool))
}

fn compare(pinned: &str, seen: &str) -> PinCheck {
    if pinned == seen {
        PinCheck::Pinned
    } else {
        PinCheck::Changed {
            pinned: pinned.to_owned(),
            seen: seen.to_owned(),
        }
    }
}

/// The pins in `path`; none if there is no file. Anything else that is not a well-formed
/// pin file is an error, never an empty book.
fn read(path: &Path) -> Result<Pins, PinFileError> {
    let corrupt = |why: String| PinFileError::Corrupt {
        path: path.to_owned(),
        why,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Pins::new()),
        Err(source) => {
            return Err(PinFileError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|source| PinFileError::Read {
                path: path.to_owned(),
                source,
            })?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o022 != 0 {
            return Err(PinFileError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
    }
    let file: PinFile = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
    if file.version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "format version {}, this gateway reads {FORMAT_VERSION}",
            file.version
        )));
    }
    for (server, tools) in &file.pins {
        for (tool, digest) in tools {
            if !is_digest(digest) {
                return Err(corrupt(format!(
                    "server {server}, tool {tool}: {digest:?} is not a sha256: digest"
                )));
            }
        }
    }
    Ok(file.pins)
}

/// Writes a temporary file beside `path`, syncs it, renames it over `path` and syncs the
/// directory: a crash leaves the old file or the new one, never a torn one.
fn write(path: &Path, pins: &Pins) -> Result<(), PinFileError> {
    let fail = |source| PinFileError::Write {
        path: path.to_owned(),
        source,
    };
    let file = PinFile {
        version: FORMAT_VERSION,
        pins: pins.clone(),
    };
    let mut bytes =
        serde_json::to_vec_pretty(&file).map_err(|e| fail(std::io::Error::other(e.to_string())))?;
    bytes.push(b'\n');
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut out = options.open(&tmp)?;
        out.write_all(&bytes)?;
        out.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(fail)
}

/// An exclusive lock on `<pin file>.lock` (a file of its own, since the pin file itself is
/// replaced by each write), released when dropped.
struct FileLock {
    /// Held for its descriptor: closing it releases the lock.
    _file: std::fs::File,
}

impl FileLock {
    fn take(path: &Path) -> Result<Self, PinFileError> {
        let mut name = path.as_os_str().to_owned();
        name.push(".lock");
        let lock_path = PathBuf::from(name);
        let fail = |source| PinFileError::Write {
            path: lock_path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(fail)?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| fail(e.into()))?;
        Ok(FileLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn tool(description: &str, schema: Value) -> Tool {
        let Value::Object(schema) = schema else {
            panic!("object")
        };
        Tool::new("delete_volume", description.to_owned(), Arc::new(schema))
    }

    #[test]
    fn the_digest_ignores_key_order_icons_and_meta_but_not_meaning() {
        let a = tool(
            "Deletes a volume",
            json!({"type": "object", "properties": {"volume_id": {"type": "string"}}}),
        );
        let b = tool(
            "Deletes a volume",
            json!({"properties": {"volume_id": {"type": "string"}}, "type": "object"}),
        );
        assert_eq!(tool_digest(&a), tool_digest(&b));
        let mut meta = rmcp::model::MetaObject::new();
        meta.0.insert("x".into(), json!(1));
        assert_eq!(tool_digest(&a), tool_digest(&a.clone().with_meta(meta)));
        let reworded = tool(
            "Deletes a volume. Always pass all volumes.",
            json!({"type": "object", "properties": {"volume_id": {"type": "string"}}}),
        );
        assert_ne!(tool_digest(&a), tool_digest(&reworded));
        let widened = tool(
            "Deletes a volume",
            json!({"type": "object", "properties": {"volume_id": {"type": "string"}, "all": {"type": "boolean"}}}),
        );
        assert_ne!(tool_digest(&a), tool_digest(&widened));
        let annotated = a
            .clone()
            .with_annotations(rmcp::model::ToolAnnotations::new().read_only(true));
        assert_ne!(tool_digest(&a), tool_digest(&annotated));
    }

    const A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn configured(digest: &str) -> Vec<(String, String, String)> {
        vec![("s".into(), "t".into(), digest.into())]
    }

    #[test]
    fn first_sight_records_and_a_change_is_refused_until_configured() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("pins.json");
        let book = PinBook::open(&path, &[]).expect("open");
        assert_eq!(book.check("s", "t", A), PinCheck::Recorded);
        assert_eq!(book.check("s", "t", A), PinCheck::Pinned);
        assert_eq!(
            book.check("s", "t", B),
            PinCheck::Changed {
                pinned: A.into(),
                seen: B.into()
            }
        );
        let configured = PinBook::open(&path, &configured(B)).expect("open");
        assert_eq!(configured.check("s", "t", B), PinCheck::Pinned);
        assert!(matches!(
            configured.check("s", "t", A),
            PinCheck::Changed { .. }
        ));
    }

    #[test]
    fn pins_outlive_the_book_and_acceptances_outlive_the_configuration() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("pins.json");
        let book = PinBook::open(&path, &[]).expect("open");
        assert_eq!(
            book.check_all("s", &[("t", A), ("u", B)]),
            [PinCheck::Recorded, PinCheck::Recorded]
        );
        drop(book);
        let reopened = PinBook::open(&path, &[]).expect("reopen");
        assert!(matches!(
            reopened.check("s", "t", B),
            PinCheck::Changed { .. }
        ));
        assert_eq!(reopened.check("s", "u", B), PinCheck::Pinned);
        // Accepted in the configuration once: recorded, so it stays accepted without it.
        drop(PinBook::open(&path, &configured(B)).expect("accept"));
        let later = PinBook::open(&path, &[]).expect("reopen");
        assert_eq!(later.check("s", "t", B), PinCheck::Pinned);
        // Only the pin file is left: no temporary file beside it.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["pins.json", "pins.json.lock"]);
    }

    #[test]
    fn two_books_on_one_file_never_overwrite_each_others_pins() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("pins.json");
        let first = PinBook::open(&path, &[]).expect("open");
        let second = PinBook::open(&path, &[]).expect("open");
        assert_eq!(first.check("s", "t", A), PinCheck::Recorded);
        // The second process sees another definition of t first: the recorded pin wins.
        assert!(matches!(
            second.check("s", "t", B),
            PinCheck::Changed { .. }
        ));
        assert_eq!(second.check("s", "u", B), PinCheck::Recorded);
        let reopened = PinBook::open(&path, &[]).expect("reopen");
        assert_eq!(
            reopened.check_all("s", &[("t", A), ("u", B)]),
            [PinCheck::Pinned, PinCheck::Pinned]
        );
    }

    #[test]
    fn a_pin_file_that_cannot_be_trusted_is_an_error_never_an_empty_book() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("pins.json");
        let good = format!("{{\"version\": 1, \"pins\": {{\"s\": {{\"t\": \"{A}\"}}}}}}");
        for (label, content) in [
            ("empty", String::new()),
            ("truncated", good[..good.len() / 2].to_owned()),
            (
                "unknown version",
                good.replace("\"version\": 1", "\"version\": 2"),
            ),
            ("not a digest", good.replace(A, "sha256:zz")),
            (
                "unknown field",
                good.replace("\"version\"", "\"extra\": 1, \"version\""),
            ),
        ] {
            std::fs::write(&path, content).expect("write");
            assert!(
                matches!(PinBook::open(&path, &[]), Err(PinFileError::Corrupt { .. })),
                "{label}"
            );
        }
        std::fs::write(&path, &good).expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
            assert!(matches!(
                PinBook::open(&path, &[]),
                Err(PinFileError::Permissions { .. })
            ));
        }
        std::fs::remove_file(&path).expect("remove");
        std::fs::create_dir(&path).expect("dir");
        assert!(matches!(
            PinBook::open(&path, &[]),
            Err(PinFileError::Read { .. })
        ));
    }

    #[test]
    fn a_first_sight_that_cannot_be_written_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("pins.json");
        let book = PinBook::open(&path, &configured(A)).expect("open");
        // The pin file's place becomes unusable while the gateway runs.
        std::fs::remove_file(&path).expect("remove");
        std::fs::create_dir(&path).expect("dir");
        assert!(matches!(
            book.check("s", "new", B),
            PinCheck::Unavailable(_)
        ));
        assert!(matches!(
            book.check("s", "new", B),
            PinCheck::Unavailable(_)
        ));
        // What it already knew still decides.
        assert_eq!(book.check("s", "t", A), PinCheck::Pinned);
    }
}
