//! Which request headers may travel to an upstream. Frameworks and proxies in front of an
//! upstream take some headers as the real path (`X-Original-URL`, `X-Forwarded-Prefix`),
//! method (`X-HTTP-Method-Override`), host or scheme (`X-Forwarded-Host`, `Forwarded`), or as
//! internal instructions (`X-Envoy-*`, `X-Accel-*`). Such a header would make the upstream
//! act on something other than what the guard judged, so it is refused (or stripped, where
//! configured) and never forwarded.
//!
//! Two layers, so a new member of a family cannot slip through: families are recognised
//! by the words in a header's name, not by a list of names, and the proxy forwards only an
//! allowlist of end-to-end headers anyway; everything else is dropped.

use http::header::{HeaderMap, HeaderName};
use serde::Deserialize;

/// What a routing header tells an upstream to take as the request's real …
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Path,
    Method,
    Host,
    Scheme,
    /// … or an instruction meant for a proxy in front of it (Envoy, nginx, Next.js).
    Internal,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Path => "path",
            Family::Method => "method",
            Family::Host => "host",
            Family::Scheme => "scheme",
            Family::Internal => "proxy-internal",
        }
    }
}

/// What an adapter does with a header of a routing family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutingHeaders {
    /// 400 `header_rejected` (or `method_override_rejected`), naming the header.
    #[default]
    Refuse,
    /// Remove it and go on: for deployments behind a TLS terminator that adds
    /// `X-Forwarded-Proto` and the like to every request.
    Strip,
}

/// Words in a header name that make it a routing instruction, by family.
const PATH_WORDS: [&str; 7] = [
    "url",
    "uri",
    "path",
    "prefix",
    "rewrite",
    "script",
    "destination",
];
const HOST_WORDS: [&str; 3] = ["host", "server", "authority"];
const SCHEME_WORDS: [&str; 5] = ["proto", "scheme", "ssl", "https", "port"];
/// Prefixes of headers proxies and frameworks treat as their own instructions.
const INTERNAL_PREFIXES: [&str; 7] = [
    "x-envoy-",
    "x-accel-",
    "x-middleware-",
    "x-sendfile",
    "x-forwarded-",
    "x-original-",
    "x-rewrite-",
];
/// Client-address headers: not routing instructions, and never forwarded either (they are
/// not on the allowlist). Kept apart so a forward proxy on the agent's side that adds them
/// does not get every request refused.
const CLIENT_ADDRESS: [&str; 3] = ["x-forwarded-for", "x-real-ip", "x-client-ip"];

/// The routing family of a header name, if it has one. Names are compared in lowercase with
/// `-` and `_` alike (CGI turns both into `_`).
pub fn family(name: &str) -> Option<Family> {
    let name = name.to_ascii_lowercase().replace('_', "-");
    // `Host` is the request's own (the proxy replaces it); CORS preflight headers name
    // methods and headers the browser wants, not overrides.
    if name == "host"
        || CLIENT_ADDRESS.contains(&name.as_str())
        || name.starts_with("access-control-")
    {
        return None;
    }
    if name == "forwarded" {
        return Some(Family::Host);
    }
    let words: Vec<&str> = name.split('-').filter(|w| !w.is_empty()).collect();
    let has = |set: &[&str]| words.iter().any(|w| set.contains(w));
    if has(&["method"]) {
        Some(Family::Method)
    } else if has(&PATH_WORDS) {
        Some(Family::Path)
    } else if has(&HOST_WORDS) {
        Some(Family::Host)
    } else if has(&SCHEME_WORDS) {
        Some(Family::Scheme)
    } else if INTERNAL_PREFIXES.iter().any(|p| name.starts_with(p)) {
        Some(Family::Internal)
    } else {
        None
    }
}

/// The first header of a routing family in `headers`, with its family.
pub fn first_routing_header(headers: &HeaderMap) -> Option<(HeaderName, Family)> {
    headers
        .keys()
        .find_map(|name| family(name.as_str()).map(|f| (name.clone(), f)))
}

/// Removes every header of a routing family.
pub fn strip_routing_headers(headers: &mut HeaderMap) {
    while let Some((name, _)) = first_routing_header(headers) {
        headers.remove(name);
    }
}

/// End-to-end request headers every upstream gets: content description, caching and
/// conditional requests, content negotiation, idempotency and trace context. The token
/// headers, `Host`, cookies, hop-by-hop and vendor headers are not on it.
pub const DEFAULT_FORWARDED: [&str; 26] = [
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "cache-control",
    "content-digest",
    "content-disposition",
    "content-encoding",
    "content-language",
    "content-length",
    "content-range",
    "content-type",
    "idempotency-key",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "pragma",
    "prefer",
    "range",
    "repr-digest",
    "traceparent",
    "tracestate",
    "user-agent",
    "want-content-digest",
];

/// Headers that may never be added to the allowlist: the agent's token, what the proxy sets
/// itself, and hop-by-hop headers.
const NEVER_FORWARDED: [&str; 13] = [
    "authorization",
    super::super::TOKEN_HEADER,
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
];

/// The request headers an upstream gets: the default list plus the upstream's own.
#[derive(Debug, Clone)]
pub struct ForwardedHeaders {
    names: Vec<HeaderName>,
}

impl ForwardedHeaders {
    /// Refuses an extra name that is not a header name, is of a routing family, or may
    /// never be forwarded.
    pub fn new(extra: &[String]) -> Result<Self, String> {
        let mut names: Vec<HeaderName> = DEFAULT_FORWARDED
            .iter()
            .map(|n| HeaderName::from_static(n))
            .collect();
        for name in extra {
            let parsed = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| format!("forward_headers: {name:?} is not a header name"))?;
            if let Some(family) = family(parsed.as_str()) {
                return Err(format!(
                    "forward_headers: {parsed} is a {} routing header and is never forwarded",
                    family.as_str()
                ));
            }
            if NEVER_FORWARDED.contains(&parsed.as_str()) {
                return Err(format!("forward_headers: {parsed} is never forwarded"));
            }
            if !names.contains(&parsed) {
                names.push(parsed);
            }
        }
        Ok(ForwardedHeaders { names })
    }

    /// Drops every header not on the list.
    pub fn retain(&self, headers: &mut HeaderMap) {
        let dropped: Vec<HeaderName> = headers
            .keys()
            .filter(|name| !self.names.contains(name))
            .cloned()
            .collect();
        for name in dropped {
            tracing::debug!(header = %name, "request header not on the allowlist: dropped");
            headers.remove(name);
        }
    }
}

/// Response headers a server in front of Capgate (nginx, Apache, lighttpd, perlbal) would
/// act on: serve an internal location or a local file instead of the response.
const RESPONSE_INSTRUCTIONS: [&str; 4] = [
    "x-accel-",
    "x-sendfile",
    "x-lighttpd-send-file",
    "x-reproxy-url",
];

/// Removes response headers that instruct a fronting server.
pub fn strip_response_instructions(headers: &mut HeaderMap) {
    let found: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            RESPONSE_INSTRUCTIONS
                .iter()
                .any(|p| name.as_str().starts_with(p))
        })
        .cloned()
        .collect();
    for name in found {
        tracing::warn!(header = %name, "upstream response instruction removed");
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More members than any list: each is recognised by the words in its name.
    #[test]
    fn routing_families_are_recognised_by_their_words() {
        let rows = [
            ("X-Original-URL", Family::Path),
            ("X-Rewrite-URL", Family::Path),
            ("X-Override-URL", Family::Path),
            ("X-Original-URI", Family::Path),
            ("X-Forwarded-Prefix", Family::Path),
            ("X-Forwarded-Path", Family::Path),
            ("X-Forwarded-Uri", Family::Path),
            ("X-Envoy-Original-Path", Family::Path),
            ("X-Request-URI", Family::Path),
            ("X-Script-Name", Family::Path),
            ("Destination", Family::Path),
            ("x_original_url", Family::Path),
            ("X-Some-Future-Url-Header", Family::Path),
            ("X-HTTP-Method-Override", Family::Method),
            ("X-HTTP-Method", Family::Method),
            ("X-Method-Override", Family::Method),
            ("X-Original-Method", Family::Method),
            ("x_http_method_override", Family::Method),
            ("X-Forwarded-Host", Family::Host),
            ("X-Forwarded-Server", Family::Host),
            ("X-Host", Family::Host),
            ("X-Original-Host", Family::Host),
            ("Forwarded", Family::Host),
            ("X-Forwarded-Proto", Family::Scheme),
            ("X-Forwarded-Scheme", Family::Scheme),
            ("X-Forwarded-Port", Family::Scheme),
            ("X-Forwarded-Ssl", Family::Scheme),
            ("Front-End-Https", Family::Scheme),
            ("X-Envoy-Internal", Family::Internal),
            ("X-Envoy-Retry-On", Family::Internal),
            ("X-Accel-Buffering", Family::Internal),
            ("X-Middleware-Subrequest", Family::Internal),
            ("X-Forwarded-Client-Cert", Family::Internal),
        ];
        for (name, expected) in rows {
            assert_eq!(family(name), Some(expected), "{name}");
        }
        for plain in [
            "host",
            "accept",
            "content-type",
            "if-none-match",
            "user-agent",
            "x-request-id",
            "x-forwarded-for",
            "x-real-ip",
            "access-control-request-method",
            "sec-websocket-protocol",
            "report-to",
            "idempotency-key",
            "traceparent",
        ] {
            assert_eq!(family(plain), None, "{plain}");
        }
        for name in DEFAULT_FORWARDED {
            assert_eq!(family(name), None, "allowlisted {name}");
        }
    }

    #[test]
    fn the_allowlist_refuses_routing_token_and_hop_by_hop_headers() {
        for bad in [
            "x-original-url",
            "x-forwarded-host",
            "authorization",
            "capgate-token",
            "host",
            "transfer-encoding",
            "not a header",
        ] {
            assert!(ForwardedHeaders::new(&[bad.into()]).is_err(), "{bad}");
        }
        let list = ForwardedHeaders::new(&["X-Railway-Team".into()]).expect("list");
        let mut headers = HeaderMap::new();
        headers.insert("x-railway-team", "t".parse().expect("value"));
        headers.insert("accept", "*/*".parse().expect("value"));
        headers.insert("x-unlisted", "1".parse().expect("value"));
        headers.insert("cookie", "a=b".parse().expect("value"));
        list.retain(&mut headers);
        let mut kept: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["accept", "x-railway-team"]);
    }

    #[test]
    fn stripping_removes_every_routing_header_and_response_instruction() {
        let mut headers = HeaderMap::new();
        for name in ["x-original-url", "x-forwarded-proto", "forwarded", "accept"] {
            headers.insert(HeaderName::from_static(name), "v".parse().expect("value"));
        }
        strip_routing_headers(&mut headers);
        assert_eq!(
            headers.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["accept"]
        );
        let mut response = HeaderMap::new();
        for name in ["x-accel-redirect", "x-sendfile", "x-reproxy-url", "etag"] {
            response.insert(HeaderName::from_static(name), "v".parse().expect("value"));
        }
        strip_response_instructions(&mut response);
        assert_eq!(
            response.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["etag"]
        );
    }
}
