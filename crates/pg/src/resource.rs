//! The one place a PostgreSQL object becomes a resource name: `pg://<alias>` (the database),
//! `pg://<alias>/<schema>` and `pg://<alias>/<schema>.<table>`.
//!
//! Every (schema, table) pair has exactly one name, and no two pairs share one. An identifier
//! that PostgreSQL could write unquoted in lower case (`bookings`, `public`, `_tmp$1`) keeps
//! that spelling, so existing rights such as `pg://staging/public.bookings` still name what
//! they named. Any other identifier is written in double quotes, as PostgreSQL quotes it
//! (`"Bookings"`, `"x.c"`, a `"` inside doubled), so schema `a` + table `b.c`
//! (`a."b.c"`) and schema `a.b` + table `c` (`"a.b".c`) differ. Inside quotes, the characters
//! a resource name may not hold or that give it structure (`/`, `%`, `*`, whitespace, control
//! characters) are percent-encoded: a name always has exactly the segments
//! `pg:`, ``, alias, object, so a prefix right (`pg://staging/`) covers every object of its
//! database and a table name can never end or extend a segment.

use std::fmt::Write;

use super::classify::Object;

/// The resource name of `object` in the database known to agents as `alias`.
pub fn resource(alias: &str, object: &Object) -> String {
    let mut name = format!("pg://{alias}");
    match object {
        Object::Relation {
            schema,
            name: table,
        } => {
            name.push('/');
            identifier(schema, &mut name);
            name.push('.');
            identifier(table, &mut name);
        }
        Object::Schema(schema) => {
            name.push('/');
            identifier(schema, &mut name);
        }
        Object::Database => {}
    }
    name
}

/// Bare when PostgreSQL would read it back unchanged without quotes (keywords aside, which
/// do not matter here: this is a name, not SQL).
fn is_plain(identifier: &str) -> bool {
    let mut chars = identifier.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$')
}

fn identifier(identifier: &str, out: &mut String) {
    if is_plain(identifier) {
        out.push_str(identifier);
        return;
    }
    out.push('"');
    for c in identifier.chars() {
        match c {
            '"' => out.push_str("\"\""),
            '/' | '%' | '*' => percent(c, out),
            c if c.is_whitespace() || c.is_control() => percent(c, out),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn percent(c: char, out: &mut String) {
    let mut utf8 = [0u8; 4];
    for byte in c.encode_utf8(&mut utf8).bytes() {
        let _ = write!(out, "%{byte:02X}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capgate_core::scope::ResourcePattern;

    fn table(schema: &str, name: &str) -> String {
        resource(
            "staging",
            &Object::Relation {
                schema: schema.into(),
                name: name.into(),
            },
        )
    }

    #[test]
    fn ordinary_identifiers_keep_their_spelling() {
        assert_eq!(table("public", "bookings"), "pg://staging/public.bookings");
        assert_eq!(table("_x", "t$1_2"), "pg://staging/_x.t$1_2");
        assert_eq!(
            resource("staging", &Object::Schema("app".into())),
            "pg://staging/app"
        );
        assert_eq!(resource("staging", &Object::Database), "pg://staging");
    }

    #[test]
    fn identifiers_that_need_it_are_quoted() {
        assert_eq!(
            table("public", "Bookings"),
            "pg://staging/public.\"Bookings\""
        );
        assert_eq!(table("a", "b.c"), "pg://staging/a.\"b.c\"");
        assert_eq!(table("a.b", "c"), "pg://staging/\"a.b\".c");
        assert_eq!(
            table("a", "say \"hi\""),
            "pg://staging/a.\"say%20\"\"hi\"\"\""
        );
        assert_eq!(table("a", "x/../y"), "pg://staging/a.\"x%2F..%2Fy\"");
        assert_eq!(table("1a", "é"), "pg://staging/\"1a\".\"é\"");
    }

    /// Each row is a pair of different objects an attacker could hope to confuse.
    #[test]
    fn different_objects_never_share_a_name() {
        let pairs = [
            (("a", "b.c"), ("a.b", "c")),
            (("a", "b"), ("a", "B")),
            (("a", "\"b\""), ("a", "b")),
            (("a\".\"b", "c"), ("a", "b\".\"c")),
            (("a", "b%2Fc"), ("a", "b/c")),
            (("a", "b%20"), ("a", "b ")),
            (("a", "b\"\""), ("a", "b\"")),
            (("a", "b/c"), ("a/b", "c")),
        ];
        for ((s1, t1), (s2, t2)) in pairs {
            assert_ne!(table(s1, t1), table(s2, t2), "{s1}.{t1} vs {s2}.{t2}");
        }
        let schema = resource("staging", &Object::Schema("a.b".into()));
        assert_ne!(schema, table("a", "b"));
    }

    /// Whatever the identifiers, the name is a valid resource, lies under the database's
    /// prefix, and adds exactly one segment to it.
    #[test]
    fn every_name_is_a_valid_resource_under_its_database() {
        let prefix = ResourcePattern::parse("pg://staging/").expect("prefix");
        let other = ResourcePattern::parse("pg://staging/a/").expect("prefix");
        let hostile = [
            "a",
            "A",
            "a.b",
            "a/b",
            "..",
            ".",
            "a b",
            "a\tb",
            "a\nb",
            "*",
            "%",
            "a//b",
            "\"",
            "é",
            "a\u{2028}b",
            "/",
            "a/",
        ];
        for schema in hostile {
            for name in hostile {
                let resource = table(schema, name);
                let pattern = ResourcePattern::parse(&resource)
                    .unwrap_or_else(|e| panic!("{schema:?}.{name:?}: {e}"));
                assert!(prefix.covers(pattern.as_str()), "{resource}");
                assert!(!other.covers(pattern.as_str()), "{resource}");
                assert_eq!(resource.matches('/').count(), 3, "{resource}");
            }
        }
    }
}
