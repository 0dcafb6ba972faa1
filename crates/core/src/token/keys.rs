//! Root signing keys: created in the data directory with 0600 permissions, identified by a
//! numeric key id carried in every token, rotated with an overlap window, and published as a
//! `PublicKeySet` that adapters use to verify tokens offline.
//!
//! Layout: `<data_dir>/keys/ring.json` (ids, public keys, dates) and `<data_dir>/keys/root-<id>.key`
//! (the private key). Key material stays in files; no store (SQLite or Redis) ever holds it.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use biscuit_auth::{KeyPair, PrivateKey, PublicKey};
use serde::{Deserialize, Serialize};

use super::TokenRejected;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key store {path} is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("no key ring in {0}; run `capgate keygen` or `capgate serve` first")]
    Missing(PathBuf),
    #[error("private key file {path} is readable by others (mode {mode:o}); expected 0600")]
    Permissions { path: PathBuf, mode: u32 },
}

/// What `ring.json` and `GET /v1/keys` say about one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishedKey {
    pub key_id: u32,
    pub algorithm: String,
    /// biscuit's textual form, e.g. `ed25519/8f3a…`.
    pub public_key: String,
    pub created_at: String,
    /// After this instant tokens signed by this key no longer verify (RFC 3339). `None` while active.
    #[serde(default)]
    pub verify_until: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySetDocument {
    pub active_key_id: u32,
    pub keys: Vec<PublishedKey>,
}

/// The broker's signing keys, loaded from the data directory.
pub struct Keyring {
    dir: PathBuf,
    document: KeySetDocument,
    active: KeyPair,
    /// Signs approval blocks (third-party blocks), separate from the root key.
    approval: KeyPair,
}

impl Keyring {
    fn ring_path(dir: &Path) -> PathBuf {
        dir.join("ring.json")
    }

    fn key_path(dir: &Path, id: u32) -> PathBuf {
        dir.join(format!("root-{id}.key"))
    }

    fn approval_key_path(dir: &Path) -> PathBuf {
        dir.join("approval.key")
    }

    /// The approval signer, created alongside the first root key (or on first use after an
    /// upgrade). Brokers that share state must share this file too.
    fn load_or_create_approval_key(dir: &Path) -> Result<KeyPair, KeyError> {
        let path = Self::approval_key_path(dir);
        if path.exists() {
            return load_private(&path);
        }
        let keypair = KeyPair::new();
        write_atomically(&path, keypair.private().to_prefixed_string().as_bytes())?;
        Ok(keypair)
    }

    pub fn keys_dir(data_dir: &Path) -> PathBuf {
        data_dir.join("keys")
    }

    /// Loads the ring, creating a first key when none exists. Returns whether one was created.
    pub fn open_or_create(data_dir: &Path) -> Result<(Keyring, bool), KeyError> {
        let dir = Self::keys_dir(data_dir);
        if Self::ring_path(&dir).exists() {
            return Ok((Self::open(data_dir)?, false));
        }
        create_private_dir(&dir)?;
        let document = KeySetDocument {
            active_key_id: 1,
            keys: Vec::new(),
        };
        let ring = Self::add_key(&dir, document, 1)?;
        Ok((ring, true))
    }

    pub fn open(data_dir: &Path) -> Result<Keyring, KeyError> {
        let dir = Self::keys_dir(data_dir);
        let ring_path = Self::ring_path(&dir);
        if !ring_path.exists() {
            return Err(KeyError::Missing(dir));
        }
        let text = fs::read_to_string(&ring_path).map_err(|source| KeyError::Io {
            path: ring_path.clone(),
            source,
        })?;
        let document: KeySetDocument =
            serde_json::from_str(&text).map_err(|e| KeyError::Corrupt {
                path: ring_path.clone(),
                why: e.to_string(),
            })?;
        let active = load_private(&Self::key_path(&dir, document.active_key_id))?;
        let approval = Self::load_or_create_approval_key(&dir)?;
        let published = document
            .keys
            .iter()
            .find(|k| k.key_id == document.active_key_id)
            .ok_or_else(|| KeyError::Corrupt {
                path: ring_path.clone(),
                why: "active key is not listed".into(),
            })?;
        if published.public_key != active.public().to_string() {
            return Err(KeyError::Corrupt {
                path: ring_path,
                why: "active private key does not match its published public key".into(),
            });
        }
        Ok(Keyring {
            dir,
            document,
            active,
            approval,
        })
    }

    /// Makes a new key active. The old active key keeps verifying until `old_verify_until`,
    /// so tokens it signed stay valid for the rest of their (short) lives.
    pub fn rotate(data_dir: &Path, old_verify_until: SystemTime) -> Result<Keyring, KeyError> {
        let current = Self::open(data_dir)?;
        let mut document = current.document;
        let old_id = document.active_key_id;
        let until = super::rfc3339(old_verify_until);
        for key in &mut document.keys {
            if key.key_id == old_id {
                key.verify_until = Some(until.clone());
            }
        }
        let new_id = document.keys.iter().map(|k| k.key_id).max().unwrap_or(0) + 1;
        Self::add_key(&current.dir, document, new_id)
    }

    fn add_key(dir: &Path, mut document: KeySetDocument, id: u32) -> Result<Keyring, KeyError> {
        let keypair = KeyPair::new();
        write_atomically(
            &Self::key_path(dir, id),
            keypair.private().to_prefixed_string().as_bytes(),
        )?;
        document.keys.push(PublishedKey {
            key_id: id,
            algorithm: "ed25519".into(),
            public_key: keypair.public().to_string(),
            created_at: super::rfc3339(SystemTime::now()),
            verify_until: None,
        });
        document.active_key_id = id;
        let json = serde_json::to_vec_pretty(&document).map_err(|e| KeyError::Corrupt {
            path: Self::ring_path(dir),
            why: e.to_string(),
        })?;
        // The ring is written last so a crash never leaves it naming a missing key file.
        write_atomically(&Self::ring_path(dir), &json)?;
        Ok(Keyring {
            dir: dir.to_owned(),
            document,
            active: keypair,
            approval: Self::load_or_create_approval_key(dir)?,
        })
    }

    pub fn active_key_id(&self) -> u32 {
        self.document.active_key_id
    }

    pub fn signing_key(&self) -> &KeyPair {
        &self.active
    }

    pub fn approval_key(&self) -> &KeyPair {
        &self.approval
    }

    /// Signs audit checkpoints (`containment::checkpoint`). A key of its own, so that no
    /// checkpoint signature can ever stand for a token or approval block signature; created
    /// on first use, 0600 like the others.
    pub fn checkpoint_key(&self) -> Result<KeyPair, KeyError> {
        let path = self.dir.join("checkpoint.key");
        if path.exists() {
            return load_private(&path);
        }
        let keypair = KeyPair::new();
        write_atomically(&path, keypair.private().to_prefixed_string().as_bytes())?;
        Ok(keypair)
    }

    pub fn document(&self) -> &KeySetDocument {
        &self.document
    }

    pub fn public_keys(&self) -> Result<PublicKeySet, KeyError> {
        PublicKeySet::from_document(&self.document).map_err(|why| KeyError::Corrupt {
            path: Self::ring_path(&self.dir),
            why,
        })
    }

    /// The ring file's modification time, so a running broker notices `capgate keys rotate`.
    pub fn ring_modified(data_dir: &Path) -> Option<SystemTime> {
        fs::metadata(Self::ring_path(&Self::keys_dir(data_dir)))
            .and_then(|m| m.modified())
            .ok()
    }
}

/// Public keys by id: all a verifier needs, obtainable offline from `GET /v1/keys`.
#[derive(Debug, Clone)]
pub struct PublicKeySet {
    keys: BTreeMap<u32, (PublicKey, Option<SystemTime>)>,
}

impl PublicKeySet {
    pub fn empty() -> Self {
        PublicKeySet {
            keys: BTreeMap::new(),
        }
    }

    pub fn from_document(document: &KeySetDocument) -> Result<Self, String> {
        let mut keys = BTreeMap::new();
        for key in &document.keys {
            if key.algorithm != "ed25519" {
                return Err(format!(
                    "key {} has unsupported algorithm {}",
                    key.key_id, key.algorithm
                ));
            }
            let public: PublicKey = key
                .public_key
                .parse()
                .map_err(|e| format!("key {}: {e}", key.key_id))?;
            let until = key
                .verify_until
                .as_deref()
                .map(humantime::parse_rfc3339)
                .transpose()
                .map_err(|e| format!("key {}: verify_until: {e}", key.key_id))?;
            if keys.insert(key.key_id, (public, until)).is_some() {
                return Err(format!("key id {} is listed twice", key.key_id));
            }
        }
        Ok(PublicKeySet { keys })
    }

    /// The key a token names, if it is known and still valid for verification at `now`.
    pub fn lookup(&self, key_id: Option<u32>, now: SystemTime) -> Result<PublicKey, TokenRejected> {
        let id = key_id.ok_or(TokenRejected::MissingKeyId)?;
        let (key, until) = self
            .keys
            .get(&id)
            .ok_or(TokenRejected::UnknownRootKey(id))?;
        match until {
            Some(until) if *until <= now => Err(TokenRejected::RetiredRootKey(id)),
            _ => Ok(*key),
        }
    }

    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.keys.keys().copied()
    }
}

fn create_private_dir(dir: &Path) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: dir.to_owned(),
        source,
    };
    fs::create_dir_all(dir).map_err(io)?;
    set_mode(dir, 0o700).map_err(io)
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> std::io::Result<()> {
    Ok(())
}

/// Writes to a 0600 temporary file, syncs it, then renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

fn load_private(path: &Path) -> Result<KeyPair, KeyError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = fs::metadata(path).map_err(|source| KeyError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
    }
    let text = fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.to_owned(),
        source,
    })?;
    let private: PrivateKey = text.trim().parse().map_err(|e| KeyError::Corrupt {
        path: path.to_owned(),
        why: format!("{e}"),
    })?;
    Ok(KeyPair::from(&private))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn first_open_creates_a_private_key_with_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ring, created) = Keyring::open_or_create(dir.path()).expect("ring");
        assert!(created);
        assert_eq!(ring.active_key_id(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let path = Keyring::key_path(&Keyring::keys_dir(dir.path()), 1);
            let mode = fs::metadata(path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let (again, created) = Keyring::open_or_create(dir.path()).expect("reopen");
        assert!(!created);
        assert_eq!(
            again.signing_key().public().to_string(),
            ring.signing_key().public().to_string()
        );
    }

    #[test]
    fn rotation_keeps_the_old_key_until_its_date() {
        let dir = tempfile::tempdir().expect("tempdir");
        Keyring::open_or_create(dir.path()).expect("ring");
        let now = SystemTime::now();
        let ring = Keyring::rotate(dir.path(), now + Duration::from_secs(60)).expect("rotate");
        assert_eq!(ring.active_key_id(), 2);
        let keys = ring.public_keys().expect("keys");
        assert!(keys.lookup(Some(1), now).is_ok());
        assert!(keys.lookup(Some(2), now).is_ok());
        assert_eq!(
            keys.lookup(Some(1), now + Duration::from_secs(61)),
            Err(TokenRejected::RetiredRootKey(1))
        );
        assert_eq!(
            keys.lookup(Some(9), now),
            Err(TokenRejected::UnknownRootKey(9))
        );
        assert_eq!(keys.lookup(None, now), Err(TokenRejected::MissingKeyId));
    }

    #[cfg(unix)]
    #[test]
    fn a_world_readable_private_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        Keyring::open_or_create(dir.path()).expect("ring");
        let path = Keyring::key_path(&Keyring::keys_dir(dir.path()), 1);
        set_mode(&path, 0o644).expect("chmod");
        assert!(matches!(
            Keyring::open(dir.path()),
            Err(KeyError::Permissions { .. })
        ));
    }
}
