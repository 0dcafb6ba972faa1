//! What a Datalog program's verdict can depend on, read from its serialised form: the date
//! constants it holds and whether it can see `attribute` facts. The guard's decision cache
//! ([`crate::guard`]) reuses a verdict only where these say it cannot have changed.
//!
//! Biscuit compares dates only with each other (`<`, `<=`, `>`, `>=`, equality, set
//! membership: no arithmetic, no conversion), and the only date that changes between two
//! calls is the `time` fact the guard supplies. So a verdict reached at second `s` holds for
//! every second before the first date constant at or after `s`, whatever the rules are. A
//! program that calls a foreign function (FFI) could compute anything: it is opaque, and
//! nothing it decides is reused.

use biscuit_auth::format::schema;

/// The predicate the guard's request attributes arrive in (HTTP method and path, SQL…).
const ATTRIBUTE_PREDICATE: &str = "attribute";

/// Unary and binary op kinds that call a foreign function (schema.proto: `Ffi`).
const UNARY_FFI: i32 = 4;
const BINARY_FFI: i32 = 28;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatalogProfile {
    /// Every date constant, ascending, without repeats.
    dates: Vec<u64>,
    /// The symbol `attribute` is interned: a rule may read `attribute(...)` facts (or a string
    /// constant happens to spell it; counted the same, which only costs cache hits).
    sees_attributes: bool,
    /// A foreign function appears: the verdict may depend on anything.
    opaque: bool,
}

impl DatalogProfile {
    /// The profile of a token's blocks (authority, attenuation and third-party), from the
    /// container bytes. Bytes that do not decode give an opaque profile.
    pub fn of_token(bytes: &[u8]) -> DatalogProfile {
        let mut profile = DatalogProfile::default();
        let Ok(container) = <schema::Biscuit as prost::Message>::decode(bytes) else {
            profile.opaque = true;
            return profile;
        };
        for signed in std::iter::once(&container.authority).chain(&container.blocks) {
            match <schema::Block as prost::Message>::decode(signed.block.as_slice()) {
                Ok(block) => {
                    profile.symbols(&block.symbols);
                    profile.facts(&block.facts);
                    profile.rules(&block.rules);
                    profile.checks(&block.checks);
                }
                Err(_) => profile.opaque = true,
            }
        }
        profile.finish()
    }

    /// The profile of an authorizer's own facts, rules, checks and policies.
    pub fn of_authorizer(snapshot: &schema::AuthorizerSnapshot) -> DatalogProfile {
        let mut profile = DatalogProfile::default();
        let world = &snapshot.world;
        profile.symbols(&world.symbols);
        for block in world.blocks.iter().chain([&world.authorizer_block]) {
            profile.facts(&block.facts);
            profile.rules(&block.rules);
            profile.checks(&block.checks);
        }
        for policy in &world.authorizer_policies {
            profile.rules(&policy.queries);
        }
        profile.finish()
    }

    /// Both programs together, as the guard runs them.
    pub fn union(&self, other: &DatalogProfile) -> DatalogProfile {
        let mut dates = self.dates.clone();
        dates.extend_from_slice(&other.dates);
        DatalogProfile {
            dates,
            sees_attributes: self.sees_attributes || other.sees_attributes,
            opaque: self.opaque || other.opaque,
        }
        .finish()
    }

    /// A profile under which nothing is reused.
    pub fn opaque() -> DatalogProfile {
        DatalogProfile {
            opaque: true,
            ..DatalogProfile::default()
        }
    }

    pub fn sees_attributes(&self) -> bool {
        self.sees_attributes
    }

    /// The seconds (since the epoch) over which a verdict reached at `second` stays the same:
    /// `second` up to, not including, the first date constant at or after it. `None` when
    /// nothing can be reused (an opaque program, or a constant at `second` itself).
    pub fn stable_until(&self, second: u64) -> Option<u64> {
        if self.opaque {
            return None;
        }
        let first_at_or_after = self.dates.partition_point(|date| *date < second);
        match self.dates.get(first_at_or_after) {
            Some(date) if *date == second => None,
            Some(date) => Some(*date),
            None => Some(u64::MAX),
        }
    }

    fn finish(mut self) -> DatalogProfile {
        self.dates.sort_unstable();
        self.dates.dedup();
        self
    }

    fn symbols(&mut self, symbols: &[String]) {
        self.sees_attributes |= symbols.iter().any(|s| s == ATTRIBUTE_PREDICATE);
    }

    fn facts(&mut self, facts: &[schema::Fact]) {
        for fact in facts {
            self.predicate(&fact.predicate);
        }
    }

    fn checks(&mut self, checks: &[schema::Check]) {
        for check in checks {
            self.rules(&check.queries);
        }
    }

    fn rules(&mut self, rules: &[schema::Rule]) {
        for rule in rules {
            self.predicate(&rule.head);
            for predicate in &rule.body {
                self.predicate(predicate);
            }
            for expression in &rule.expressions {
                self.ops(&expression.ops);
            }
        }
    }

    fn predicate(&mut self, predicate: &schema::Predicate) {
        for term in &predicate.terms {
            self.term(term);
        }
    }

    fn ops(&mut self, ops: &[schema::Op]) {
        use schema::op::Content;
        for op in ops {
            match &op.content {
                Some(Content::Value(term)) => self.term(term),
                Some(Content::Unary(unary)) => self.opaque |= unary.kind == UNARY_FFI,
                Some(Content::Binary(binary)) => self.opaque |= binary.kind == BINARY_FFI,
                Some(Content::Closure(closure)) => self.ops(&closure.ops),
                None => self.opaque = true,
            }
        }
    }

    fn term(&mut self, term: &schema::Term) {
        use schema::term::Content;
        match &term.content {
            Some(Content::Date(date)) => self.dates.push(*date),
            Some(Content::Set(set)) => set.set.iter().for_each(|t| self.term(t)),
            Some(Content::Array(array)) => array.array.iter().for_each(|t| self.term(t)),
            Some(Content::Map(map)) => map.entries.iter().for_each(|e| self.term(&e.value)),
            Some(
                Content::Variable(_)
                | Content::Integer(_)
                | Content::String(_)
                | Content::Bytes(_)
                | Content::Bool(_)
                | Content::Null(_),
            ) => {}
            None => self.opaque = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use biscuit_auth::builder::{date, fact, string, BlockBuilder};
    use biscuit_auth::{Biscuit, KeyPair};
    use std::collections::HashMap;
    use std::time::{Duration, UNIX_EPOCH};

    fn at(secs: u64) -> std::time::SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn token(code: &str, dates: &[(&str, u64)]) -> Vec<u8> {
        let params: HashMap<String, _> = dates
            .iter()
            .map(|(name, secs)| ((*name).to_owned(), date(&at(*secs))))
            .collect();
        let block = BlockBuilder::new()
            .fact(fact("agent", &[string("a")]))
            .expect("fact")
            .code_with_params(code, params, HashMap::new())
            .expect("code");
        Biscuit::builder()
            .merge(block)
            .build(&KeyPair::new())
            .expect("build")
            .to_vec()
            .expect("bytes")
    }

    #[test]
    fn a_verdict_holds_until_the_next_date_constant() {
        let bytes = token(
            "check if time($t), $t <= {b}; nbf({a}); other({c});",
            &[("a", 100), ("b", 200), ("c", 300)],
        );
        let profile = DatalogProfile::of_token(&bytes);
        assert_eq!(profile.dates, vec![100, 200, 300]);
        assert_eq!(profile.stable_until(50), Some(100));
        // At a constant itself `$t <= c` and `$t < c` differ from the next second: no reuse.
        assert_eq!(profile.stable_until(100), None);
        assert_eq!(profile.stable_until(101), Some(200));
        assert_eq!(profile.stable_until(250), Some(300));
        assert_eq!(profile.stable_until(301), Some(u64::MAX));
        assert!(!profile.sees_attributes());
    }

    #[test]
    fn dates_inside_sets_and_expressions_count() {
        let bytes = token("check if time($t), $t > {d} || $t == {d};", &[("d", 700)]);
        let mut profile = DatalogProfile::of_token(&bytes);
        assert_eq!(profile.dates, vec![700]);
        let set = schema::Term {
            content: Some(schema::term::Content::Set(schema::TermSet {
                set: vec![schema::Term {
                    content: Some(schema::term::Content::Date(5)),
                }],
            })),
        };
        profile.term(&set);
        assert_eq!(profile.finish().dates, vec![5, 700]);
    }

    #[test]
    fn attribute_facts_are_seen_wherever_they_are_named() {
        let bytes = token("check if attribute(\"method\", \"GET\");", &[]);
        assert!(DatalogProfile::of_token(&bytes).sees_attributes());
        let plain = DatalogProfile::of_token(&token("check if resource(\"x\");", &[]));
        assert!(!plain.sees_attributes());
        assert!(plain
            .union(&DatalogProfile::of_token(&bytes))
            .sees_attributes());
    }

    #[test]
    fn foreign_functions_and_undecodable_bytes_are_opaque() {
        assert_eq!(
            DatalogProfile::of_token(b"\x01\x02garbage").stable_until(1),
            None
        );
        let mut profile = DatalogProfile::default();
        profile.ops(&[schema::Op {
            content: Some(schema::op::Content::Binary(schema::OpBinary {
                kind: BINARY_FFI,
                ffi_name: Some(0),
            })),
        }]);
        assert_eq!(profile.stable_until(1), None);
    }

    #[test]
    fn an_authorizer_policy_contributes_its_dates_and_attributes() {
        #[allow(clippy::disallowed_methods, reason = "test, constant source")]
        let builder = biscuit_auth::AuthorizerBuilder::new()
            .code("allow if attribute(\"method\", \"GET\"), time($t), $t < 2030-01-01T00:00:00Z;")
            .expect("policy");
        let profile = DatalogProfile::of_authorizer(&builder.snapshot().expect("snapshot"));
        assert!(profile.sees_attributes());
        assert_eq!(profile.dates, vec![1_893_456_000]);
    }
}
