//! Request bodies on their way to an upstream. A `POST` body an upstream framework reads
//! parameters from (a form or JSON) is read whole, up to [`MAX_READ_BODY`], and refused if it
//! overrides the method or holds the token. Any other body is read up to [`PREFETCH`] before
//! anything is forwarded: a body that ends there is judged whole; a longer one streams
//! through a search that cuts the request before the bytes holding the token (or a
//! multipart method-override field) leave the proxy, and says why in its [`Tripwire`].
//! A body without a `Content-Type` is forwarded as `application/octet-stream`, what the proxy
//! took it for, so no framework parses it as a form (Rack does, for a `POST`).

use std::sync::{Arc, OnceLock};

use aho_corasick::AhoCorasick;
use axum::body::{Body, Bytes};
use futures_util::StreamExt;
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use http::Method;

use super::overrides::{self, OVERRIDE_FIELD_NAMES};
use super::token::TokenSpellings;
use super::Refusal;

/// The largest form or JSON `POST` body read whole to look for a method override.
pub const MAX_READ_BODY: usize = 1 << 20;

/// How much of any other body is read before anything is forwarded.
pub const PREFETCH: usize = 64 << 10;

/// Set when a streamed body was cut, with the reason, so the adapter answers with that
/// refusal rather than with the upstream error the cut causes.
#[derive(Debug, Default)]
pub struct Tripwire(OnceLock<Refusal>);

impl Tripwire {
    pub fn tripped(&self) -> Option<&Refusal> {
        self.0.get()
    }

    fn trip(&self, refusal: Refusal) {
        let _ = self.0.set(refusal);
    }
}

/// A body cleared for forwarding, and the tripwire of its streamed part.
pub struct Screened {
    pub body: Body,
    pub tripwire: Arc<Tripwire>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Form,
    Json,
    Multipart,
    Other,
}

/// The media type, or `None` without a `Content-Type`. Two of them are refused: the upstream
/// might read the other one.
fn kind(headers: &HeaderMap) -> Result<Option<Kind>, Refusal> {
    let mut values = headers.get_all(CONTENT_TYPE).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Refusal::AmbiguousContentType);
    }
    let text = String::from_utf8_lossy(value.as_bytes()).to_ascii_lowercase();
    let media = text.split(';').next().unwrap_or_default().trim();
    Ok(Some(match media {
        "application/x-www-form-urlencoded" => Kind::Form,
        "multipart/form-data" => Kind::Multipart,
        m if m == "application/json" || m.ends_with("+json") => Kind::Json,
        _ => Kind::Other,
    }))
}

/// Screens `body` as described in the module doc; `token` is `None` when the request carries
/// no token worth searching for.
pub async fn screen_body(
    method: &Method,
    headers: &mut HeaderMap,
    body: Body,
    token: Option<&TokenSpellings>,
) -> Result<Screened, Refusal> {
    let tripwire = Arc::new(Tripwire::default());
    if axum::body::HttpBody::is_end_stream(&body) {
        return Ok(Screened { body, tripwire });
    }
    let kind = match kind(headers)? {
        Some(kind) => kind,
        None => {
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            Kind::Other
        }
    };
    if *method == Method::POST && matches!(kind, Kind::Form | Kind::Json) {
        let bytes = axum::body::to_bytes(body, MAX_READ_BODY)
            .await
            .map_err(|_| Refusal::BodyTooLarge(MAX_READ_BODY))?;
        let found = match kind {
            Kind::Form => overrides::in_urlencoded(&String::from_utf8_lossy(&bytes)),
            _ => overrides::in_json(&bytes),
        };
        if let Some(found) = found {
            return Err(Refusal::MethodOverride(format!("body {found}")));
        }
        check_bytes(&bytes, token, None)?;
        return Ok(Screened {
            body: Body::from(bytes),
            tripwire,
        });
    }
    let search = Search::new(token, kind == Kind::Multipart);
    let Some(search) = search else {
        return Ok(Screened { body, tripwire });
    };
    let mut stream = body.into_data_stream();
    let mut prefix = Vec::new();
    let mut ended = false;
    while prefix.len() < PREFETCH {
        match stream.next().await {
            Some(Ok(chunk)) => prefix.extend_from_slice(&chunk),
            Some(Err(_)) => return Err(Refusal::BodyUnreadable),
            None => {
                ended = true;
                break;
            }
        }
    }
    if ended {
        check_bytes(&prefix, token, Some(&search))?;
        return Ok(Screened {
            body: Body::from(prefix),
            tripwire,
        });
    }
    if let Some(refusal) = search.find(&prefix) {
        return Err(refusal);
    }
    let keep = search.longest.saturating_sub(1).min(prefix.len());
    let carry = prefix.split_off(prefix.len() - keep);
    let state = Streaming {
        rest: stream,
        search: Arc::new(search),
        carry,
        tripwire: tripwire.clone(),
        done: false,
    };
    let head =
        futures_util::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(prefix)) });
    let body = Body::from_stream(head.chain(futures_util::stream::unfold(state, Streaming::next)));
    Ok(Screened { body, tripwire })
}

/// A whole body: the token in any spelling, and multipart override fields.
fn check_bytes(
    bytes: &[u8],
    token: Option<&TokenSpellings>,
    search: Option<&Search>,
) -> Result<(), Refusal> {
    if token.is_some_and(|t| t.found_in(bytes)) {
        return Err(Refusal::TokenMisplaced("body".into()));
    }
    match search.and_then(|s| s.find(bytes)) {
        Some(refusal) => Err(refusal),
        None => Ok(()),
    }
}

/// What a streamed body is searched for: the token's spellings, and for multipart bodies
/// the `name=` of method-override fields (without case).
struct Search {
    automaton: AhoCorasick,
    /// Patterns below this index are token spellings; the rest override fields.
    token_patterns: usize,
    longest: usize,
}

impl Search {
    fn new(token: Option<&TokenSpellings>, multipart: bool) -> Option<Search> {
        let mut patterns: Vec<String> = token.map(|t| t.spellings().to_vec()).unwrap_or_default();
        let token_patterns = patterns.len();
        if multipart {
            for name in OVERRIDE_FIELD_NAMES {
                patterns.push(format!("name=\"{name}\""));
                patterns.push(format!("name={name}"));
                patterns.push(format!("name='{name}'"));
            }
        }
        if patterns.is_empty() {
            return None;
        }
        let longest = patterns.iter().map(String::len).max().unwrap_or(0);
        let automaton = AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(&patterns)
            .ok()?;
        Some(Search {
            automaton,
            token_patterns,
            longest,
        })
    }

    fn find(&self, bytes: &[u8]) -> Option<Refusal> {
        let found = self.automaton.find(bytes)?;
        Some(if found.pattern().as_usize() < self.token_patterns {
            Refusal::TokenMisplaced("body".into())
        } else {
            Refusal::MethodOverride("body multipart field _method (or a relative)".into())
        })
    }
}

/// The streamed remainder of a body. The last `longest - 1` bytes seen are held back until
/// more arrive, so a match spanning two chunks is found before its first byte is sent.
struct Streaming {
    rest: axum::body::BodyDataStream,
    search: Arc<Search>,
    carry: Vec<u8>,
    tripwire: Arc<Tripwire>,
    done: bool,
}

impl Streaming {
    async fn next(mut self) -> Option<(Result<Bytes, std::io::Error>, Self)> {
        if self.done {
            return None;
        }
        loop {
            match self.rest.next().await {
                Some(Ok(chunk)) => {
                    let mut window = std::mem::take(&mut self.carry);
                    window.extend_from_slice(&chunk);
                    if let Some(refusal) = self.search.find(&window) {
                        tracing::warn!(reason = %refusal, "streamed request body cut");
                        self.tripwire.trip(refusal);
                        self.done = true;
                        return Some((Err(std::io::Error::other("request body refused")), self));
                    }
                    let keep = self.search.longest.saturating_sub(1).min(window.len());
                    self.carry = window.split_off(window.len() - keep);
                    if !window.is_empty() {
                        return Some((Ok(Bytes::from(window)), self));
                    }
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some((Err(std::io::Error::other(e)), self));
                }
                None => {
                    self.done = true;
                    let last = std::mem::take(&mut self.carry);
                    return (!last.is_empty()).then(|| (Ok(Bytes::from(last)), self));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    const TOKEN: &str = "CAESnQQKsgMKBWFnZW50CgdvcHMtYm90CgdzZXNzaW9uCiAzYmMyYTg2YWIz";

    fn headers(content_type: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(t) = content_type {
            headers.insert(CONTENT_TYPE, HeaderValue::from_str(t).expect("value"));
        }
        headers
    }

    /// A body delivered in small chunks, as a slow client would.
    fn chunked(bytes: Vec<u8>, size: usize) -> Body {
        let chunks: Vec<Result<Bytes, std::io::Error>> = bytes
            .chunks(size)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        Body::from_stream(futures_util::stream::iter(chunks))
    }

    async fn collect(body: Body) -> Result<Vec<u8>, ()> {
        body.collect()
            .await
            .map(|c| c.to_bytes().to_vec())
            .map_err(|_| ())
    }

    #[tokio::test]
    async fn a_token_split_across_chunks_of_a_long_body_is_cut_before_it_leaves() {
        let token = TokenSpellings::new(TOKEN).expect("token");
        for size in [1, 7, 64, 4096] {
            let mut bytes = vec![b'a'; PREFETCH + 10_000];
            bytes.extend_from_slice(TOKEN.as_bytes());
            bytes.extend_from_slice(&[b'z'; 5000]);
            let mut h = headers(Some("application/octet-stream"));
            let screened = screen_body(&Method::PUT, &mut h, chunked(bytes, size), Some(&token))
                .await
                .expect("not decided before streaming");
            let mut stream = screened.body.into_data_stream();
            let mut forwarded = Vec::new();
            let mut failed = false;
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(chunk) => forwarded.extend_from_slice(&chunk),
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            assert!(failed, "chunk size {size}: the stream is cut");
            assert!(
                !forwarded.windows(8).any(|w| w == &TOKEN.as_bytes()[..8]),
                "chunk size {size}: not even the token's start was forwarded"
            );
            assert_eq!(
                screened.tripwire.tripped(),
                Some(&Refusal::TokenMisplaced("body".into()))
            );
        }
    }

    #[tokio::test]
    async fn clean_bodies_pass_unchanged_whatever_their_size() {
        let token = TokenSpellings::new(TOKEN).expect("token");
        for len in [
            0,
            10,
            PREFETCH - 1,
            PREFETCH,
            PREFETCH + 1,
            3 * PREFETCH + 17,
        ] {
            let bytes: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let mut h = headers(Some("application/octet-stream"));
            let screened = screen_body(
                &Method::PUT,
                &mut h,
                chunked(bytes.clone(), 1000),
                Some(&token),
            )
            .await
            .expect("clean");
            assert_eq!(collect(screened.body).await, Ok(bytes), "{len}");
        }
    }

    #[tokio::test]
    async fn small_bodies_are_judged_before_anything_is_forwarded() {
        let token = TokenSpellings::new(TOKEN).expect("token");
        let rows: Vec<(Method, Option<&str>, Vec<u8>, &str)> = vec![
            (
                Method::POST,
                Some("application/x-www-form-urlencoded"),
                b"a=1&%5Fmethod=DELETE".to_vec(),
                "method_override_rejected",
            ),
            (
                Method::POST,
                Some("application/json; charset=utf-8"),
                br#"{"_method":"PUT"}"#.to_vec(),
                "method_override_rejected",
            ),
            (
                Method::PUT,
                Some("multipart/form-data; boundary=b"),
                b"--b\r\nContent-Disposition: form-data; NAME=\"_Method\"\r\n\r\nDELETE\r\n--b--"
                    .to_vec(),
                "method_override_rejected",
            ),
            (
                Method::PUT,
                None,
                format!("x{TOKEN}").into_bytes(),
                "token_misplaced",
            ),
            (
                Method::POST,
                Some("application/x-www-form-urlencoded"),
                format!("t={}", TOKEN.replace('C', "%43")).into_bytes(),
                "token_misplaced",
            ),
        ];
        for (method, content_type, body, code) in rows {
            let mut h = headers(content_type);
            let refused = screen_body(&method, &mut h, Body::from(body), Some(&token)).await;
            assert_eq!(
                refused.err().map(|r| r.code()),
                Some(code),
                "{content_type:?}"
            );
        }
        let mut h = headers(None);
        screen_body(&Method::POST, &mut h, Body::from("_method=DELETE"), None)
            .await
            .expect("untyped bytes");
        assert_eq!(h[CONTENT_TYPE], "application/octet-stream");
        let mut h = headers(Some("application/json"));
        let large = vec![b' '; MAX_READ_BODY + 1];
        let refused = screen_body(&Method::POST, &mut h, Body::from(large), None).await;
        assert_eq!(refused.err().map(|r| r.code()), Some("body_too_large"));
    }
}
