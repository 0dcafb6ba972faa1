//! Method overrides in parameters. Rails, Laravel, Symfony, Spring, Sinatra and Express's
//! `method-override` take `_method` (Salesforce `_HttpMethod`, some APIs the header names as
//! parameters) from the query or a form or JSON body as the request's real method, so a
//! `POST` the guard judged as a write would run as a `DELETE`. Parameters are judged as
//! those frameworks read them: percent-decoded (`+` as space), split on `&` and `;`, keys
//! compared without case and without the punctuation PHP and Rack rewrite (`.`, `[]`,
//! spaces). A query is also judged after decoding it whole, up to three times, so an upstream
//! or a proxy in front of it that decodes once more finds nothing either.

use percent_encoding::percent_decode_str;

/// Parameter names that override the method whatever their value, compared without case
/// and without anything but letters and digits (`_method`, `_HttpMethod`, `X-HTTP-Method`…).
const OVERRIDE_KEYS: [&str; 8] = [
    "httpmethod",
    "xhttpmethod",
    "xhttpmethodoverride",
    "xmethodoverride",
    "methodoverride",
    "httpmethodoverride",
    "xmethod",
    "requestmethod",
];

/// Values that name an HTTP method (RFC 9110, WebDAV and a few extensions).
const METHODS: [&str; 23] = [
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "PATCH",
    "DELETE",
    "OPTIONS",
    "TRACE",
    "CONNECT",
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
    "PURGE",
    "MERGE",
    "SEARCH",
    "REPORT",
    "LINK",
    "UNLINK",
    "QUERY",
];

/// Rounds of whole-query decoding judged, for upstreams that decode more than once.
const DECODE_ROUNDS: usize = 3;

/// Multipart part names that override the method (`name="_method"` and relatives).
pub const OVERRIDE_FIELD_NAMES: [&str; 6] = [
    "_method",
    "_httpmethod",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "_http_method",
];

/// Whether one decoded (key, value) pair overrides the method.
pub fn is_override(key: &str, value: &str) -> bool {
    let compact: String = key
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect::<String>()
        .to_ascii_lowercase();
    if OVERRIDE_KEYS.contains(&compact.as_str()) {
        return true;
    }
    if compact == "method" {
        // `_method`, `.method`, `method[]`: the framework spellings; a plain `method`
        // parameter (Flickr-style APIs) only when its value is a method.
        return key.trim() != compact || names_a_method(value);
    }
    compact.contains("method") && names_a_method(value)
}

fn names_a_method(value: &str) -> bool {
    let value = value.trim().to_ascii_uppercase();
    METHODS.contains(&value.as_str())
}

/// The first overriding pair of an `application/x-www-form-urlencoded` text (a query or a
/// form body), described for the agent.
pub fn in_urlencoded(text: &str) -> Option<String> {
    let mut text = text.to_owned();
    for _ in 0..DECODE_ROUNDS {
        if let Some(found) = in_pairs(&text) {
            return Some(found);
        }
        let decoded = percent_decode_str(&text).decode_utf8_lossy().into_owned();
        if decoded == text {
            break;
        }
        text = decoded;
    }
    None
}

fn in_pairs(text: &str) -> Option<String> {
    text.split(['&', ';']).find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (key, value) = (decode_component(key), decode_component(value));
        is_override(&key, &value).then(|| format!("parameter {key:?}"))
    })
}

/// One form component: `+` is a space, then percent-decoding (lossy: bytes that are not
/// UTF-8 cannot spell a method name anyway).
fn decode_component(component: &str) -> String {
    let spaced = component.replace('+', " ");
    percent_decode_str(&spaced).decode_utf8_lossy().into_owned()
}

/// The first overriding member of a JSON body's top-level object (Laravel reads `_method`
/// from JSON input too). Anything but an object overrides nothing.
pub fn in_json(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.as_object()?.iter().find_map(|(key, value)| {
        let text = match value {
            serde_json::Value::String(s) => s.as_str(),
            _ => "",
        };
        is_override(key, text).then(|| format!("JSON member {key:?}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_an_override_is_found() {
        for query in [
            "_method=DELETE",
            "%5Fmethod=DELETE",
            "%5fMETHOD=delete",
            "_%6Dethod=DELETE",
            "%255Fmethod=DELETE",
            "%25255Fmethod=DELETE",
            "a=1;_method=DELETE",
            "a=1%26_method=DELETE",
            "a=1%3B_method%3DDELETE",
            "+_method=DELETE",
            ".method=DELETE",
            "_method[]=DELETE",
            "_method%5B%5D=DELETE",
            "_method",
            "_HttpMethod=PATCH",
            "X-HTTP-Method-Override=PUT",
            "x_http_method=PUT",
            "method=DELETE",
            "method=+delete+",
            "request_method=PUT",
            "verb_method=DELETE",
        ] {
            assert!(in_urlencoded(query).is_some(), "{query}");
        }
        for query in [
            "payment_method=card",
            "method=flickr.photos.search",
            "sort=method",
            "methods=all",
            "a=b&c=d",
            "",
            "%",
            "%zz=1",
        ] {
            assert_eq!(in_urlencoded(query), None, "{query}");
        }
    }

    #[test]
    fn json_members_override_like_form_fields() {
        assert!(in_json(br#"{"_method":"DELETE"}"#).is_some());
        assert!(in_json(br#"{"\u005fmethod":"DELETE"}"#).is_some());
        assert!(in_json(br#"{"a":1,"X-HTTP-Method-Override":"PUT"}"#).is_some());
        assert_eq!(in_json(br#"{"payment_method":"card"}"#), None);
        assert_eq!(in_json(br#"[{"_method":"DELETE"}]"#), None);
        assert_eq!(in_json(b"not json"), None);
    }
}
