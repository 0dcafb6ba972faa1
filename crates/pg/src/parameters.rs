//! The values an extended-protocol statement runs with, as one exact text: read from a Bind
//! (formats and values) and its Parse (parameter types), written so that an approver can
//! read it and an approval digest over it binds every byte.
//!
//! Distinct value lists always give distinct texts: text-format values are quoted with
//! their quotes doubled, binary values are hex unless a fixed-width integer or boolean of
//! a declared type (whose bytes the decimal determines), and a text too long to show is
//! cut with the SHA-256 of the whole appended.

use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use super::wire::WireError;

/// Longest text shown; a longer one is cut and carries the digest of the whole.
const MAX_SHOWN: usize = 4096;

/// One Bind parameter: its format code (0 text, 1 binary) and value (`None` is NULL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Value {
    pub format: i16,
    pub bytes: Option<Vec<u8>>,
}

fn malformed(what: &'static str) -> WireError {
    WireError::Malformed(what)
}

fn take<'a>(body: &mut &'a [u8], n: usize) -> Result<&'a [u8], WireError> {
    if body.len() < n {
        return Err(malformed("Bind message is shorter than its counts say"));
    }
    let (head, rest) = body.split_at(n);
    *body = rest;
    Ok(head)
}

fn int16(body: &mut &[u8]) -> Result<i16, WireError> {
    let b = take(body, 2)?;
    Ok(i16::from_be_bytes([b[0], b[1]]))
}

fn int32(body: &mut &[u8]) -> Result<i32, WireError> {
    let b = take(body, 4)?;
    Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn count(body: &mut &[u8]) -> Result<usize, WireError> {
    usize::try_from(int16(body)?).map_err(|_| malformed("negative count in Bind"))
}

/// Reads a Bind body after its portal and statement names: parameter formats, then values.
/// The formats are resolved per value as PostgreSQL does (none: all text; one: for all).
pub(super) fn read_bind(mut body: &[u8]) -> Result<Vec<Value>, WireError> {
    let formats = (0..count(&mut body)?)
        .map(|_| int16(&mut body))
        .collect::<Result<Vec<_>, _>>()?;
    let n = count(&mut body)?;
    if formats.len() > 1 && formats.len() != n {
        return Err(malformed(
            "Bind has a format count that fits no parameter count",
        ));
    }
    let mut values = Vec::with_capacity(n);
    for i in 0..n {
        let format = match formats.as_slice() {
            [] => 0,
            [one] => *one,
            many => many[i],
        };
        if format != 0 && format != 1 {
            return Err(malformed(
                "Bind has a parameter format other than text or binary",
            ));
        }
        let len = int32(&mut body)?;
        let bytes = match len {
            -1 => None,
            len => {
                let len = usize::try_from(len).map_err(|_| malformed("negative length in Bind"))?;
                Some(take(&mut body, len)?.to_vec())
            }
        };
        values.push(Value { format, bytes });
    }
    Ok(values)
}

/// Reads the parameter type OIDs of a Parse body after its name and SQL (0: unspecified).
pub(super) fn read_parse_types(mut body: &[u8]) -> Result<Vec<u32>, WireError> {
    (0..count(&mut body)?)
        .map(|_| int32(&mut body).map(|oid| oid as u32))
        .collect()
}

/// Type names of the OIDs shown by name, and whether their binary form is shown decoded.
fn type_name(oid: u32) -> Option<&'static str> {
    Some(match oid {
        16 => "bool",
        20 => "int8",
        21 => "int2",
        23 => "int4",
        25 => "text",
        1043 => "varchar",
        _ => return None,
    })
}

fn quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The binary value decoded where its declared type fixes the bytes from the shown form.
fn decoded(oid: u32, bytes: &[u8]) -> Option<String> {
    match (oid, bytes) {
        (16, [0]) => Some("false".into()),
        (16, [1]) => Some("true".into()),
        (21, b) => Some(i16::from_be_bytes(b.try_into().ok()?).to_string()),
        (23, b) => Some(i32::from_be_bytes(b.try_into().ok()?).to_string()),
        (20, b) => Some(i64::from_be_bytes(b.try_into().ok()?).to_string()),
        (25 | 1043, b) => std::str::from_utf8(b).ok().map(quoted),
        _ => None,
    }
}

/// `$1 = 1 (int4, binary), $2 = 'x' (text)`: every value with what it is read as. Empty
/// when there are no parameters.
pub(super) fn render(values: &[Value], types: &[u32]) -> String {
    let mut out = String::new();
    for (i, value) in values.iter().enumerate() {
        let oid = types.get(i).copied().unwrap_or(0);
        let kind = match (type_name(oid), oid) {
            (Some(name), _) => name.to_owned(),
            (None, 0) => "type unspecified".to_owned(),
            (None, oid) => format!("type {oid}"),
        };
        let binary = value.format == 1;
        let shown = match &value.bytes {
            None => "NULL".to_owned(),
            Some(bytes) if binary => {
                decoded(oid, bytes).unwrap_or_else(|| format!("x'{}'", hex::encode(bytes)))
            }
            Some(bytes) => match std::str::from_utf8(bytes) {
                Ok(s) => quoted(s),
                Err(_) => format!("x'{}' (not UTF-8)", hex::encode(bytes)),
            },
        };
        if i > 0 {
            out.push_str(", ");
        }
        let format = if binary { ", binary" } else { "" };
        let _ = write!(out, "${} = {shown} ({kind}{format})", i + 1);
    }
    bounded(out)
}

/// A text cut to [`MAX_SHOWN`] bytes (at a character boundary) gains the SHA-256 of the
/// whole, so a digest over it still binds what was cut.
pub(super) fn bounded(text: String) -> String {
    if text.len() <= MAX_SHOWN {
        return text;
    }
    let mut end = MAX_SHOWN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}… (cut; sha256 of the whole: {})",
        &text[..end],
        hex::encode(Sha256::digest(text.as_bytes()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind(formats: &[i16], values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(formats.len() as i16).to_be_bytes());
        for f in formats {
            b.extend_from_slice(&f.to_be_bytes());
        }
        b.extend_from_slice(&(values.len() as i16).to_be_bytes());
        for v in values {
            match v {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v);
                }
            }
        }
        b.extend_from_slice(&0i16.to_be_bytes());
        b
    }

    #[test]
    fn values_are_shown_exactly_with_their_types_and_formats() {
        let values = read_bind(&bind(
            &[1, 0, 1],
            &[Some(&1i32.to_be_bytes()), Some(b"it's"), None],
        ))
        .expect("bind");
        assert_eq!(
            render(&values, &[23, 0, 25]),
            "$1 = 1 (int4, binary), $2 = 'it''s' (type unspecified), $3 = NULL (text, binary)"
        );
        let untyped = read_bind(&bind(&[1], &[Some(&2i32.to_be_bytes())])).expect("bind");
        assert_eq!(
            render(&untyped, &[]),
            "$1 = x'00000002' (type unspecified, binary)"
        );
        assert_eq!(render(&[], &[]), "");
    }

    #[test]
    fn different_values_never_render_alike() {
        let texts = [
            render(&read_bind(&bind(&[], &[Some(b"1")])).expect("b"), &[23]),
            render(
                &read_bind(&bind(&[1], &[Some(&1i32.to_be_bytes())])).expect("b"),
                &[23],
            ),
            render(
                &read_bind(&bind(&[1], &[Some(&1i64.to_be_bytes())])).expect("b"),
                &[23],
            ),
            render(&read_bind(&bind(&[], &[Some(b"'1'")])).expect("b"), &[23]),
            render(&read_bind(&bind(&[], &[None])).expect("b"), &[23]),
            render(&read_bind(&bind(&[], &[Some(b"NULL")])).expect("b"), &[23]),
        ];
        for (i, a) in texts.iter().enumerate() {
            for b in &texts[i + 1..] {
                assert_ne!(a, b);
            }
        }
        let long = |last: u8| {
            let mut v = vec![b'a'; 10_000];
            v.push(last);
            render(&read_bind(&bind(&[], &[Some(&v)])).expect("b"), &[25])
        };
        assert_ne!(
            long(b'b'),
            long(b'c'),
            "the cut keeps a digest of the whole"
        );
        assert!(long(b'b').len() < 4300);
    }

    #[test]
    fn malformed_binds_are_errors_not_panics() {
        for body in [
            vec![],
            vec![0, 1],
            vec![0, 2, 0, 1, 0, 1, 0, 3],
            vec![0, 0, 0, 1, 0, 0, 0, 9, b'x'],
            vec![0, 0, 0, 1, 0xff, 0xff, 0xff, 0xfe],
            vec![0, 1, 0, 7, 0, 1, 0, 0, 0, 0],
            vec![0xff, 0xff],
        ] {
            assert!(read_bind(&body).is_err(), "{body:?}");
        }
        assert!(read_parse_types(&[0, 2, 0, 0, 0, 23]).is_err());
        assert_eq!(read_parse_types(&[0, 1, 0, 0, 0, 23]).ok(), Some(vec![23]));
        assert_eq!(read_parse_types(&[]).ok(), None);
    }
}
