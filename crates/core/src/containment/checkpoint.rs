//! Signed checkpoints of the audit chain's head, kept outside the store. The hash chain
//! alone shows edits inside the trail, but whoever can write the store can also delete its
//! newest records, or rewrite records and recompute every later hash, and the result still
//! chains. A checkpoint (store generation, sequence number, record hash), signed with a key
//! that lives only in the broker's data directory and written there atomically, pins the
//! head: a trail that no longer holds that record with that hash was truncated or rewritten.

use std::io::Write;
use std::path::{Path, PathBuf};

use biscuit_auth::{KeyPair, PublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::audit::{AuditRecord, Tamper, GENESIS};

/// The file in the data directory that holds the newest checkpoint.
pub const CHECKPOINT_FILE: &str = "audit-checkpoint.json";
/// Signed bytes start with this, so a checkpoint signature means nothing anywhere else.
const DOMAIN: &str = "capgate audit checkpoint v1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The store generation the chain belongs to (see `store::Store::generation`).
    pub generation: String,
    /// The head's sequence number (0: the chain was empty).
    pub seq: u64,
    /// The head record's hash (`GENESIS` when empty).
    pub hash: String,
    /// When it was signed, seconds since the epoch.
    pub at: u64,
    /// The signer (`ed25519/…`), for readers that pin it.
    pub public_key: String,
    /// Ed25519 over `DOMAIN`, generation, seq, hash and at; hex.
    pub signature: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {path} is unreadable: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("checkpoint signature does not verify with this broker's checkpoint key: {0}")]
    BadSignature(String),
    #[error("cannot sign checkpoint: {0}")]
    Sign(String),
}

fn message(generation: &str, seq: u64, hash: &str, at: u64) -> Vec<u8> {
    // Fields are fixed-format (hex, decimal, random id), so a newline-joined text is unambiguous.
    format!("{DOMAIN}\n{generation}\n{seq}\n{hash}\n{at}").into_bytes()
}

impl Checkpoint {
    pub fn sign(
        key: &KeyPair,
        generation: &str,
        seq: u64,
        hash: &str,
        at: u64,
    ) -> Result<Self, CheckpointError> {
        let private = key.private().to_bytes();
        let seed: [u8; 32] = private.as_slice().try_into().map_err(|_| {
            CheckpointError::Sign("the checkpoint key is not an Ed25519 key".into())
        })?;
        let signature = SigningKey::from_bytes(&seed).sign(&message(generation, seq, hash, at));
        Ok(Checkpoint {
            generation: generation.to_owned(),
            seq,
            hash: hash.to_owned(),
            at,
            public_key: key.public().to_string(),
            signature: hex::encode(signature.to_bytes()),
        })
    }

    /// Checks the signature against the key the verifier trusts (never the embedded one).
    pub fn verify(&self, trusted: &PublicKey) -> Result<(), CheckpointError> {
        let bad = |why: &str| CheckpointError::BadSignature(why.to_owned());
        let key: [u8; 32] = trusted
            .to_bytes()
            .as_slice()
            .try_into()
            .map_err(|_| bad("the trusted key is not an Ed25519 key"))?;
        let key = VerifyingKey::from_bytes(&key).map_err(|_| bad("unusable public key"))?;
        let bytes = hex::decode(&self.signature).map_err(|_| bad("signature is not hex"))?;
        let signature = Signature::from_slice(&bytes).map_err(|_| bad("malformed signature"))?;
        key.verify_strict(
            &message(&self.generation, self.seq, &self.hash, self.at),
            &signature,
        )
        .map_err(|_| bad("signature mismatch"))
    }

    /// Where `records` (a whole trail, in order) stands against this checkpoint.
    pub fn check(&self, records: &[AuditRecord]) -> Result<(), Tamper> {
        if self.seq == 0 {
            return if self.hash == GENESIS {
                Ok(())
            } else {
                Err(Tamper::CheckpointMismatch { seq: 0 })
            };
        }
        match records.iter().find(|r| r.seq == self.seq) {
            Some(record) if record.hash == self.hash => Ok(()),
            Some(_) => Err(Tamper::CheckpointMismatch { seq: self.seq }),
            None => Err(Tamper::BehindCheckpoint {
                found: records.iter().map(|r| r.seq).max().unwrap_or(0),
                checkpoint: self.seq,
            }),
        }
    }
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(CHECKPOINT_FILE)
}

/// The newest checkpoint, if one was ever written.
pub fn load(data_dir: &Path) -> Result<Option<Checkpoint>, CheckpointError> {
    let path = path(data_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CheckpointError::Io { path, source }),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| CheckpointError::Corrupt {
            path,
            why: e.to_string(),
        })
}

/// Writes a temporary file, syncs it, renames it over the checkpoint and syncs the
/// directory: a crash leaves the old checkpoint or the new one, never half of one.
pub fn store(data_dir: &Path, checkpoint: &Checkpoint) -> Result<(), CheckpointError> {
    let target = path(data_dir);
    let io = |source| CheckpointError::Io {
        path: target.clone(),
        source,
    };
    let json = serde_json::to_vec_pretty(checkpoint).map_err(|e| CheckpointError::Corrupt {
        path: target.clone(),
        why: e.to_string(),
    })?;
    let tmp = target.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(&json).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &target).map_err(io)?;
    if let Ok(dir) = std::fs::File::open(data_dir) {
        dir.sync_all().map_err(io)?;
    }
    Ok(())
}

/// Keeps a checkpoint of a generation that is being left behind (a lost store accepted by an
/// operator) beside the new one, so exports of the old trail can still be checked.
pub fn archive(data_dir: &Path, checkpoint: &Checkpoint) -> Result<PathBuf, CheckpointError> {
    let target = data_dir.join(format!("audit-checkpoint.{}.json", checkpoint.generation));
    let json = serde_json::to_vec_pretty(checkpoint).map_err(|e| CheckpointError::Corrupt {
        path: target.clone(),
        why: e.to_string(),
    })?;
    std::fs::write(&target, json).map_err(|source| CheckpointError::Io {
        path: target.clone(),
        source,
    })?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containment::audit::{next_record, AuditEvent, AuditKind};

    fn log(n: u64) -> Vec<AuditRecord> {
        let mut records: Vec<AuditRecord> = Vec::new();
        for i in 0..n {
            let event = AuditEvent {
                kind: AuditKind::Decision,
                actor: None,
                detail: serde_json::json!({ "i": i }),
            };
            let previous = records.last().map(|r| (r.seq, r.hash.as_str()));
            records.push(next_record(previous, event, 1000 + i));
        }
        records
    }

    #[test]
    fn a_checkpoint_pins_the_head_and_its_signature_binds_every_field() {
        let key = KeyPair::new();
        let records = log(5);
        let head = &records[4];
        let checkpoint = Checkpoint::sign(&key, "gen", 5, &head.hash, 99).expect("sign");
        checkpoint.verify(&key.public()).expect("verifies");
        assert_eq!(checkpoint.check(&records), Ok(()));
        assert_eq!(
            checkpoint.check(&records[..3]),
            Err(Tamper::BehindCheckpoint {
                found: 3,
                checkpoint: 5
            })
        );
        let mut rewritten = records.clone();
        rewritten[4].hash = "f".repeat(64);
        assert_eq!(
            checkpoint.check(&rewritten),
            Err(Tamper::CheckpointMismatch { seq: 5 })
        );
        // Any field changed after signing, or another signer, fails the signature.
        for forged in [
            Checkpoint {
                seq: 3,
                ..checkpoint.clone()
            },
            Checkpoint {
                hash: records[2].hash.clone(),
                ..checkpoint.clone()
            },
            Checkpoint {
                generation: "other".into(),
                ..checkpoint.clone()
            },
        ] {
            assert!(forged.verify(&key.public()).is_err(), "{forged:?}");
        }
        assert!(checkpoint.verify(&KeyPair::new().public()).is_err());
    }

    #[test]
    fn store_and_load_round_trip_atomically() {
        let dir = tempfile::tempdir().expect("dir");
        assert!(load(dir.path()).expect("load").is_none());
        let checkpoint = Checkpoint::sign(&KeyPair::new(), "g", 0, GENESIS, 1).expect("sign");
        store(dir.path(), &checkpoint).expect("store");
        assert_eq!(load(dir.path()).expect("load"), Some(checkpoint));
        assert!(!dir.path().join("audit-checkpoint.json.tmp").exists());
    }
}
