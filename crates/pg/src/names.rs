//! The proxy's copy of a session's prepared statement names, kept equal to the server's.
//!
//! SQL `PREPARE` and protocol Parse share one namespace on the server (`EXECUTE` runs a
//! Parse'd statement, Bind a PREPAREd one), so they share one map here. A name changes only
//! when upstream confirms it did: every forwarded request leaves here, in order, what each of
//! its messages or statements owes (ParseComplete, CloseComplete, CommandComplete…) and which
//! change its success or failure makes; upstream's answers are matched against that as they
//! pass. Until then, a name with a change in flight may be any of its possible outcomes, and
//! a use of it is judged against all of them. Where the outcome cannot be known (DO and CALL
//! may prepare or deallocate anything; an answer that does not fit what was owed), names
//! become `Unknown`, and a use of an unknown name is a deny.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::classify::{Access, Transaction};

/// One prepared statement as the proxy classified it.
#[derive(Debug)]
pub(super) struct Prepared {
    pub text: String,
    /// Its own accesses, authorized when it was prepared and at each execution.
    pub accesses: Vec<Access>,
    /// Names it runs (`CREATE TABLE x AS EXECUTE p`), resolved at each execution: the server
    /// finds them by name when the statement runs.
    pub executes: Vec<String>,
    /// EXPLAIN without ANALYZE: what it executes is planned, not run.
    pub plans_only: bool,
    pub writes: bool,
    pub transaction: Option<Transaction>,
    /// How running it changes names (a Parse of `PREPARE x AS …` or `DEALLOCATE x`).
    pub changes: Vec<Change>,
    /// Parameter type OIDs its Parse declared (0: unspecified), to show Bind values by.
    pub param_types: Vec<u32>,
}

/// What a name holds on the server, as far as the proxy knows.
#[derive(Debug, Clone)]
pub(super) enum Entry {
    Known(Arc<Prepared>),
    Unknown,
}

/// A change to names, made when the server confirms the message or statement behind it.
#[derive(Debug, Clone)]
pub(super) enum Change {
    Create(String, Arc<Prepared>),
    Drop(String),
    /// `DEALLOCATE ALL`, `DISCARD ALL`: every named statement; the unnamed one stays.
    DropAll,
    /// The name may hold anything now.
    Forget(String),
    /// Every name may hold anything now.
    Doubt,
}

impl Change {
    /// What `name` holds after this change, if it touches `name`: `Some(None)` is absent.
    fn outcome(&self, name: &str) -> Option<Option<Entry>> {
        match self {
            Change::Create(n, prepared) if n == name => Some(Some(Entry::Known(prepared.clone()))),
            Change::Drop(n) if n == name => Some(None),
            Change::DropAll if !name.is_empty() => Some(None),
            Change::Forget(n) if n == name => Some(Some(Entry::Unknown)),
            Change::Doubt => Some(Some(Entry::Unknown)),
            _ => None,
        }
    }
}

/// The answer a forwarded message or statement owes upstream's side of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Owes {
    Parse,
    Bind,
    Describe,
    Execute,
    Close,
    /// One statement of a simple Query.
    Statement,
}

impl Owes {
    /// Whether `tag` is the message that completes this one.
    fn completed_by(self, tag: u8) -> bool {
        match self {
            Owes::Parse => tag == b'1',
            Owes::Bind => tag == b'2',
            Owes::Close => tag == b'3',
            Owes::Describe => matches!(tag, b'T' | b'n'),
            Owes::Execute => matches!(tag, b'C' | b'I' | b's'),
            Owes::Statement => matches!(tag, b'C' | b'I'),
        }
    }
}

/// One message or statement in flight: what it owes, and the name changes its success or its
/// failure (an error, or being skipped after an earlier error) makes.
#[derive(Debug)]
pub(super) struct Step {
    pub owes: Owes,
    pub ok: Vec<Change>,
    pub err: Vec<Change>,
}

impl Step {
    pub fn plain(owes: Owes) -> Step {
        Step {
            owes,
            ok: Vec::new(),
            err: Vec::new(),
        }
    }
}

#[derive(Debug)]
enum Pending {
    Step(Step),
    /// The ReadyForQuery that ends a Query or a Sync.
    Ready,
}

/// Messages from upstream that end or advance what a forwarded request owes.
pub(super) fn matters(tag: u8) -> bool {
    matches!(
        tag,
        b'Z' | b'E' | b'1' | b'2' | b'3' | b'C' | b'I' | b's' | b'n' | b'T'
    )
}

#[derive(Debug, Default)]
pub(super) struct Names {
    entries: HashMap<String, Entry>,
    pending: VecDeque<Pending>,
    /// After an error, upstream skips the rest of the request up to its ReadyForQuery.
    skipping: bool,
}

impl Names {
    /// Records what a request about to be forwarded owes; `ready` when it ends in a Query or
    /// Sync that upstream answers with ReadyForQuery.
    pub fn expect(&mut self, steps: Vec<Step>, ready: bool) {
        self.pending.extend(steps.into_iter().map(Pending::Step));
        if ready {
            self.pending.push_back(Pending::Ready);
        }
    }

    /// Follows one message from upstream.
    pub fn observe(&mut self, tag: u8) {
        match tag {
            b'Z' => {
                while let Some(pending) = self.pending.pop_front() {
                    match pending {
                        Pending::Ready => break,
                        Pending::Step(step) => self.apply_all(&step.err),
                    }
                }
                self.skipping = false;
            }
            b'E' => {
                if let Some(Pending::Step(step)) = self.pop_step() {
                    self.apply_all(&step.err);
                }
                self.skipping = true;
                self.skip();
            }
            _ => {
                self.skip();
                let completes = match self.pending.front() {
                    Some(Pending::Step(step)) => step.owes.completed_by(tag),
                    _ => false,
                };
                if completes {
                    if let Some(Pending::Step(step)) = self.pop_step() {
                        self.apply_all(&step.ok);
                    }
                } else if !self.intermediate(tag) {
                    // An answer that fits nothing owed: the proxy no longer knows what the
                    // server did, so it trusts no name until they are prepared again.
                    tracing::warn!(tag = %char::from(tag), "unexpected answer from upstream; statement names in doubt");
                    self.apply(&Change::Doubt);
                }
            }
        }
    }

    /// A message that belongs to the step in progress without ending it.
    fn intermediate(&self, tag: u8) -> bool {
        match self.pending.front() {
            Some(Pending::Step(step)) => match step.owes {
                Owes::Statement => tag == b'T',
                _ => false,
            },
            // An empty query string owes no statement and is answered with 'I'.
            Some(Pending::Ready) | None => tag == b'I',
        }
    }

    fn pop_step(&mut self) -> Option<Pending> {
        match self.pending.front() {
            Some(Pending::Step(_)) => self.pending.pop_front(),
            _ => None,
        }
    }

    /// While upstream skips after an error, the skipped steps fail.
    fn skip(&mut self) {
        while self.skipping {
            match self.pop_step() {
                Some(Pending::Step(step)) => self.apply_all(&step.err),
                _ => break,
            }
        }
    }

    fn apply_all(&mut self, changes: &[Change]) {
        for change in changes {
            self.apply(change);
        }
    }

    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::Create(name, prepared) => {
                self.entries
                    .insert(name.clone(), Entry::Known(prepared.clone()));
            }
            Change::Drop(name) => {
                self.entries.remove(name);
            }
            Change::DropAll => self.entries.retain(|name, _| name.is_empty()),
            Change::Forget(name) => {
                self.entries.insert(name.clone(), Entry::Unknown);
            }
            Change::Doubt => {
                for entry in self.entries.values_mut() {
                    *entry = Entry::Unknown;
                }
            }
        }
    }

    /// What `name` may hold when the server reaches a message that follows `overlay` (the
    /// changes of earlier messages of the same request, which all succeeded if it is
    /// reached at all): exactly the last of those that touches `name`; otherwise what it
    /// holds now or after any change still in flight. `None` is absent; a doubt anywhere
    /// that touches it makes it `Unknown`.
    pub fn candidates(&self, name: &str, overlay: &[Change]) -> Vec<Option<Entry>> {
        if let Some(outcome) = overlay.iter().rev().find_map(|c| c.outcome(name)) {
            return vec![outcome];
        }
        let mut candidates = vec![self.entries.get(name).cloned()];
        for pending in &self.pending {
            if let Pending::Step(step) = pending {
                candidates.extend(
                    step.ok
                        .iter()
                        .chain(&step.err)
                        .filter_map(|c| c.outcome(name)),
                );
            }
        }
        candidates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(text: &str) -> Arc<Prepared> {
        Arc::new(Prepared {
            text: text.into(),
            accesses: Vec::new(),
            executes: Vec::new(),
            plans_only: false,
            writes: false,
            transaction: None,
            changes: Vec::new(),
            param_types: Vec::new(),
        })
    }

    fn texts(names: &Names, name: &str) -> Vec<String> {
        names
            .candidates(name, &[])
            .into_iter()
            .map(|c| match c {
                None => "absent".into(),
                Some(Entry::Unknown) => "unknown".into(),
                Some(Entry::Known(p)) => p.text.clone(),
            })
            .collect()
    }

    fn parse(name: &str, text: &str) -> Step {
        Step {
            owes: Owes::Parse,
            ok: vec![Change::Create(name.into(), prepared(text))],
            err: Vec::new(),
        }
    }

    #[test]
    fn a_change_counts_only_once_upstream_confirms_it() {
        let mut names = Names::default();
        names.expect(vec![parse("s", "read")], true);
        assert_eq!(texts(&names, "s"), ["absent", "read"], "in flight: either");
        names.observe(b'1');
        names.observe(b'Z');
        assert_eq!(texts(&names, "s"), ["read"]);
        // A failed Parse (the name exists upstream) changes nothing.
        names.expect(vec![parse("s", "write")], true);
        names.observe(b'E');
        names.observe(b'Z');
        assert_eq!(texts(&names, "s"), ["read"]);
    }

    #[test]
    fn messages_skipped_after_an_error_change_nothing() {
        let mut names = Names::default();
        let close = Step {
            owes: Owes::Close,
            ok: vec![Change::Drop("a".into())],
            err: Vec::new(),
        };
        names.apply(&Change::Create("a".into(), prepared("old")));
        names.expect(
            vec![
                Step::plain(Owes::Bind),
                Step::plain(Owes::Execute),
                close,
                parse("a", "new"),
            ],
            true,
        );
        names.observe(b'2');
        names.observe(b'E'); // the Execute failed: Close and Parse are skipped
        names.observe(b'Z');
        assert_eq!(texts(&names, "a"), ["old"]);
    }

    #[test]
    fn simple_query_statements_are_matched_in_order() {
        let mut names = Names::default();
        let statement = |ok: Vec<Change>| Step {
            owes: Owes::Statement,
            ok,
            err: Vec::new(),
        };
        names.expect(
            vec![
                statement(vec![Change::Create("p".into(), prepared("p1"))]),
                statement(Vec::new()),
                statement(vec![Change::Drop("p".into())]),
            ],
            true,
        );
        for tag in [b'C', b'T', b'C', b'E', b'Z'] {
            names.observe(tag);
        }
        assert_eq!(
            texts(&names, "p"),
            ["p1"],
            "the DEALLOCATE after the error never ran"
        );
        names.expect(vec![statement(vec![Change::DropAll])], true);
        names.observe(b'C');
        names.observe(b'Z');
        assert_eq!(texts(&names, "p"), ["absent"]);
    }

    #[test]
    fn doubt_and_unexpected_answers_make_names_unknown() {
        let mut names = Names::default();
        names.apply(&Change::Create("p".into(), prepared("p1")));
        names.expect(Vec::new(), true);
        names.observe(b'1'); // nothing owed a ParseComplete
        names.observe(b'Z');
        assert_eq!(texts(&names, "p"), ["unknown"]);
        let overlay = [Change::Create("p".into(), prepared("p2"))];
        assert!(matches!(
            names.candidates("p", &overlay)[..],
            [Some(Entry::Known(_))]
        ));
    }
}
