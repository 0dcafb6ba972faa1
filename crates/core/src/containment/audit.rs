//! The audit trail: append-only records, each chained to the previous one by a SHA-256 hash,
//! so that any edited, removed or reordered record is detected and named by `verify`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The `prev_hash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    Issuance,
    Decision,
    Approval,
    Revocation,
    Freeze,
    /// The store itself: a lost store recovered, a rollback accepted.
    Integrity,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEvent {
    pub kind: AuditKind,
    /// Who did it (agent or operator), when known.
    pub actor: Option<String>,
    /// Kind-specific detail; decisions keep what a replay needs (request facts, time, token).
    pub detail: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub seq: u64,
    /// Seconds since the epoch, from the appender's clock.
    pub at: u64,
    pub prev_hash: String,
    pub hash: String,
    pub event: AuditEvent,
}

#[derive(Serialize)]
struct Hashed<'a> {
    seq: u64,
    at: u64,
    prev_hash: &'a str,
    event: &'a AuditEvent,
}

pub fn record_hash(seq: u64, at: u64, prev_hash: &str, event: &AuditEvent) -> String {
    let canonical = serde_json::to_vec(&Hashed {
        seq,
        at,
        prev_hash,
        event,
    })
    .unwrap_or_default();
    hex::encode(Sha256::digest(&canonical))
}

/// The record that follows `previous` (or starts the chain).
pub fn next_record(previous: Option<(u64, &str)>, event: AuditEvent, at: u64) -> AuditRecord {
    let (seq, prev_hash) = match previous {
        // A store whose head is u64::MAX was tampered with: repeating the number makes
        // `verify` name it instead of overflowing.
        Some((seq, hash)) => (seq.saturating_add(1), hash.to_owned()),
        None => (1, GENESIS.to_owned()),
    };
    AuditRecord {
        hash: record_hash(seq, at, &prev_hash, &event),
        seq,
        at,
        prev_hash,
        event,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Tamper {
    #[error("record {seq} was edited (its hash does not match its content)")]
    Edited { seq: u64 },
    #[error("records {from} to {to} are missing")]
    Missing { from: u64, to: u64 },
    #[error("record {seq} is out of order")]
    Reordered { seq: u64 },
    #[error("record {seq} does not chain to the record before it")]
    BrokenLink { seq: u64 },
    #[error("the log ends at record {found} but the store's head is {head}: records were removed from the end")]
    Truncated { found: u64, head: u64 },
    #[error(
        "records {} to {checkpoint} are missing: the signed checkpoint names record {checkpoint} \
         but the trail ends at record {found} (removed from the end, or the store rolled back)",
        .found.saturating_add(1)
    )]
    BehindCheckpoint { found: u64, checkpoint: u64 },
    #[error(
        "record {seq} does not match the signed checkpoint: it, or records before it, were \
         rewritten and the chain recomputed"
    )]
    CheckpointMismatch { seq: u64 },
}

/// Checks a whole log in its stored order. `head` is the store's last sequence number, which
/// catches removal of the newest records. Returns the number of records checked.
pub fn verify(records: &[AuditRecord], head: Option<u64>) -> Result<usize, Vec<Tamper>> {
    let mut problems = Vec::new();
    let mut expected_seq = 1;
    let mut previous_hash = GENESIS.to_owned();
    for record in records {
        if record_hash(record.seq, record.at, &record.prev_hash, &record.event) != record.hash {
            problems.push(Tamper::Edited { seq: record.seq });
        }
        if record.seq < expected_seq {
            problems.push(Tamper::Reordered { seq: record.seq });
        } else if record.seq > expected_seq {
            problems.push(Tamper::Missing {
                from: expected_seq,
                to: record.seq - 1,
            });
        } else if record.prev_hash != previous_hash {
            problems.push(Tamper::BrokenLink { seq: record.seq });
        }
        expected_seq = expected_seq.max(record.seq.saturating_add(1));
        previous_hash = record.hash.clone();
    }
    let last = records.iter().map(|r| r.seq).max().unwrap_or(0);
    if let Some(head) = head {
        if head > last {
            problems.push(Tamper::Truncated { found: last, head });
        }
    }
    if problems.is_empty() {
        Ok(records.len())
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn log(n: u64) -> Vec<AuditRecord> {
        let mut records: Vec<AuditRecord> = Vec::new();
        for i in 0..n {
            let event = AuditEvent {
                kind: AuditKind::Decision,
                actor: Some("bot".into()),
                detail: json!({"i": i}),
            };
            let previous = records.last().map(|r| (r.seq, r.hash.as_str()));
            let record = next_record(previous, event, 1000 + i);
            records.push(record);
        }
        records
    }

    #[test]
    fn an_honest_log_verifies() {
        assert_eq!(verify(&log(5), Some(5)), Ok(5));
    }

    /// `audit verify --file` reads whatever file it is given: a record claiming the last
    /// sequence number is named as tampering, never an arithmetic overflow.
    #[test]
    fn a_record_at_the_end_of_the_sequence_space_is_named_not_a_panic() {
        let mut records = log(2);
        records[1].seq = u64::MAX;
        records[1].hash = record_hash(
            u64::MAX,
            records[1].at,
            &records[1].prev_hash.clone(),
            &records[1].event,
        );
        let after = next_record(Some((u64::MAX, "x")), records[0].event.clone(), 1);
        records.push(after);
        let problems = verify(&records, None).expect_err("tampered");
        assert!(
            problems.contains(&Tamper::Missing {
                from: 2,
                to: u64::MAX - 1
            }),
            "{problems:?}"
        );
    }

    /// One row per kind of tampering; each is detected and named.
    #[test]
    fn every_kind_of_tampering_is_named() {
        let mut edited = log(5);
        edited[2].event.detail = json!({"i": 99});
        assert_eq!(
            verify(&edited, Some(5)),
            Err(vec![Tamper::Edited { seq: 3 }])
        );

        let mut rehashed = log(5);
        rehashed[2].event.detail = json!({"i": 99});
        rehashed[2].hash = record_hash(
            3,
            rehashed[2].at,
            &rehashed[2].prev_hash.clone(),
            &rehashed[2].event,
        );
        assert_eq!(
            verify(&rehashed, Some(5)),
            Err(vec![Tamper::BrokenLink { seq: 4 }])
        );

        let mut removed = log(5);
        removed.remove(1);
        assert_eq!(
            verify(&removed, Some(5)),
            Err(vec![Tamper::Missing { from: 2, to: 2 }])
        );

        let mut reordered = log(5);
        reordered.swap(1, 2);
        let problems = verify(&reordered, Some(5)).expect_err("reordered");
        assert!(
            problems.contains(&Tamper::Reordered { seq: 2 }),
            "{problems:?}"
        );

        let truncated = log(3);
        assert_eq!(
            verify(&truncated, Some(5)),
            Err(vec![Tamper::Truncated { found: 3, head: 5 }])
        );
    }
}
