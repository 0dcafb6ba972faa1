//! Decoding what an agent sent into GraphQL requests (query text, operation name, variables),
//! whichever way it was sent: a JSON body (one object, or an array: a batch), an
//! `application/graphql` body, or `GET ?query=`. Ambiguous shapes are refused rather than
//! guessed at: a body on a GET, URL parameters on a POST (servers differ on which wins), a
//! parameter given twice, a persisted-query hash without the text it stands for. The adapter
//! forwards its own encoding of what it decoded ([`encode`]), never the agent's bytes, so the
//! upstream cannot read the request differently from how it was judged.

use http::Method;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::Refusal;

/// One GraphQL request, as judged and as forwarded.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphqlRequest {
    pub query: String,
    pub operation_name: Option<String>,
    pub variables: Map<String, Value>,
}

/// What the agent sent: one request, or a batch (a JSON array), forwarded in the same shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub requests: Vec<GraphqlRequest>,
    pub batch: bool,
    /// GET requests are forwarded as GET (and may only hold queries).
    pub get: bool,
}

/// Decodes a request from its method, `Content-Type`, URL query and (whole) body.
pub fn decode(
    method: &Method,
    content_type: Option<&str>,
    url_query: Option<&str>,
    body: &[u8],
    max_batch: usize,
) -> Result<Decoded, Refusal> {
    if method == Method::GET {
        if !body.is_empty() {
            return Err(Refusal::BodyOnGet);
        }
        let request = from_url(url_query.unwrap_or_default())?;
        return Ok(Decoded {
            requests: vec![request],
            batch: false,
            get: true,
        });
    }
    if method != Method::POST {
        return Err(Refusal::MethodNotAllowed(method.to_string()));
    }
    if url_query.is_some_and(|q| !q.is_empty()) {
        return Err(Refusal::QueryStringOnPost);
    }
    let media = content_type
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    match media.as_str() {
        "application/json" => from_json(body, max_batch),
        "application/graphql" => {
            let query = std::str::from_utf8(body)
                .map_err(|_| Refusal::Malformed("the body is not UTF-8".into()))?;
            Ok(Decoded {
                requests: vec![GraphqlRequest {
                    query: query.to_owned(),
                    operation_name: None,
                    variables: Map::new(),
                }],
                batch: false,
                get: false,
            })
        }
        "" => Err(Refusal::UnsupportedContentType("(none)".into())),
        other => Err(Refusal::UnsupportedContentType(other.to_owned())),
    }
}

fn from_json(body: &[u8], max_batch: usize) -> Result<Decoded, Refusal> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Refusal::Malformed(format!("the body is not JSON: {e}")))?;
    let (items, batch) = match value {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(Refusal::Malformed("an empty batch".into()));
            }
            if items.len() > max_batch {
                return Err(Refusal::BatchTooLarge(items.len(), max_batch));
            }
            (items, true)
        }
        other => (vec![other], false),
    };
    let requests = items
        .into_iter()
        .map(|item| match item {
            Value::Object(object) => from_object(object),
            _ => Err(Refusal::Malformed(
                "a GraphQL request is a JSON object".into(),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Decoded {
        requests,
        batch,
        get: false,
    })
}

fn from_object(mut object: Map<String, Value>) -> Result<GraphqlRequest, Refusal> {
    let query = match object.remove("query") {
        Some(Value::String(query)) => Some(query),
        None | Some(Value::Null) => None,
        Some(_) => return Err(Refusal::Malformed("`query` must be a string".into())),
    };
    let operation_name = match object.remove("operationName") {
        Some(Value::String(name)) => Some(name),
        None | Some(Value::Null) => None,
        Some(_) => {
            return Err(Refusal::Malformed(
                "`operationName` must be a string".into(),
            ))
        }
    };
    let variables = match object.remove("variables") {
        Some(Value::Object(variables)) => variables,
        None | Some(Value::Null) => Map::new(),
        Some(_) => return Err(Refusal::Malformed("`variables` must be an object".into())),
    };
    let extensions = object.remove("extensions");
    let query = persisted(query, extensions.as_ref())?;
    Ok(GraphqlRequest {
        query,
        operation_name,
        variables,
    })
}

/// The query text, checked against a persisted-query hash if one came with it. A hash alone
/// names a document the adapter never saw (the upstream would run whatever it stored), so it
/// is refused; a hash with text must be the text's, or the upstream might prefer the hash.
fn persisted(query: Option<String>, extensions: Option<&Value>) -> Result<String, Refusal> {
    let hash = extensions.and_then(|e| e.get("persistedQuery")).map(|p| {
        p.get("sha256Hash")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    });
    match (query, hash) {
        (Some(query), None) => Ok(query),
        (Some(query), Some(hash)) => {
            if hex::encode(Sha256::digest(query.as_bytes())) == hash.to_ascii_lowercase() {
                Ok(query)
            } else {
                Err(Refusal::PersistedQueryMismatch)
            }
        }
        (None, Some(hash)) => Err(Refusal::PersistedQueryUnknown(
            hash.chars().take(80).collect(),
        )),
        (None, None) => Err(Refusal::Malformed("the request has no `query`".into())),
    }
}

fn from_url(query: &str) -> Result<GraphqlRequest, Refusal> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
        .map_err(|e| Refusal::Malformed(format!("the URL query does not decode: {e}")))?;
    let mut object = Map::new();
    for (key, value) in pairs {
        let value = match key.as_str() {
            "variables" | "extensions" => serde_json::from_str(&value)
                .map_err(|e| Refusal::Malformed(format!("`{key}` is not JSON: {e}")))?,
            _ => Value::String(value),
        };
        // Servers differ on which of two spellings wins: refuse rather than guess.
        if object.insert(key.clone(), value).is_some() {
            return Err(Refusal::Malformed(format!("parameter `{key}` given twice")));
        }
    }
    from_object(object)
}

/// The body forwarded for a POST: the judged requests, in the shape they came in.
pub fn encode(decoded: &Decoded) -> Vec<u8> {
    let objects: Vec<Value> = decoded.requests.iter().map(to_object).collect();
    let value = match (decoded.batch, objects.len()) {
        (false, 1) => objects.into_iter().next().unwrap_or(Value::Null),
        _ => Value::Array(objects),
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

/// The URL query forwarded for a GET.
pub fn encode_url(request: &GraphqlRequest) -> String {
    let mut pairs = vec![("query", request.query.clone())];
    if let Some(name) = &request.operation_name {
        pairs.push(("operationName", name.clone()));
    }
    if !request.variables.is_empty() {
        pairs.push((
            "variables",
            Value::Object(request.variables.clone()).to_string(),
        ));
    }
    serde_urlencoded::to_string(pairs).unwrap_or_default()
}

fn to_object(request: &GraphqlRequest) -> Value {
    let mut object = Map::new();
    object.insert("query".into(), Value::String(request.query.clone()));
    if let Some(name) = &request.operation_name {
        object.insert("operationName".into(), Value::String(name.clone()));
    }
    if !request.variables.is_empty() {
        object.insert("variables".into(), Value::Object(request.variables.clone()));
    }
    Value::Object(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(content_type: &str, body: &str) -> Result<Decoded, Refusal> {
        decode(&Method::POST, Some(content_type), None, body.as_bytes(), 4)
    }

    #[test]
    fn every_shape_decodes_to_the_same_request() {
        let json = post("application/json", r#"{"query":"{ me { id } }"}"#).expect("json");
        let graphql = post("application/graphql; charset=utf-8", "{ me { id } }").expect("g");
        let get = decode(
            &Method::GET,
            None,
            Some("query=%7B%20me%20%7B%20id%20%7D%20%7D"),
            b"",
            4,
        )
        .expect("get");
        assert_eq!(json.requests, graphql.requests);
        assert_eq!(json.requests, get.requests);
        assert!(get.get && !json.get && !json.batch);
    }

    #[test]
    fn ambiguous_and_unknown_shapes_are_refused() {
        let cases: &[(Result<Decoded, Refusal>, &str)] = &[
            (post("text/plain", "{ me { id } }"), "graphql_content_type"),
            (post("application/json", "[]"), "graphql_malformed"),
            (post("application/json", "[1]"), "graphql_malformed"),
            (
                post("application/json", r#"{"query":1}"#),
                "graphql_malformed",
            ),
            (
                post(
                    "application/json",
                    &format!("[{}]", [r#"{"query":"{a}"}"#; 5].join(",")),
                ),
                "graphql_batch_too_large",
            ),
            (
                post(
                    "application/json",
                    r#"{"extensions":{"persistedQuery":{"version":1,"sha256Hash":"abc"}}}"#,
                ),
                "graphql_persisted_query",
            ),
            (
                post(
                    "application/json",
                    r#"{"query":"{a}","extensions":{"persistedQuery":{"version":1,"sha256Hash":"abc"}}}"#,
                ),
                "graphql_persisted_query",
            ),
            (
                decode(
                    &Method::GET,
                    None,
                    Some("query=%7Ba%7D&query=%7Bb%7D"),
                    b"",
                    4,
                ),
                "graphql_malformed",
            ),
            (
                decode(&Method::GET, None, Some("query=%7Ba%7D"), b"x", 4),
                "graphql_request_ambiguous",
            ),
            (
                decode(
                    &Method::POST,
                    Some("application/json"),
                    Some("query=%7Ba%7D"),
                    br#"{"query":"{b}"}"#,
                    4,
                ),
                "graphql_request_ambiguous",
            ),
            (
                decode(&Method::PUT, Some("application/json"), None, b"{}", 4),
                "graphql_method_not_allowed",
            ),
        ];
        for (result, code) in cases {
            match result {
                Err(refusal) => assert_eq!(refusal.code(), *code, "{refusal}"),
                Ok(decoded) => panic!("expected {code}, decoded {decoded:?}"),
            }
        }
    }

    #[test]
    fn a_matching_persisted_hash_is_accepted_and_dropped() {
        let query = "{ me { id } }";
        let hash = hex::encode(Sha256::digest(query.as_bytes()));
        let body = format!(
            r#"{{"query":"{query}","extensions":{{"persistedQuery":{{"version":1,"sha256Hash":"{hash}"}}}}}}"#
        );
        let decoded = post("application/json", &body).expect("decoded");
        assert_eq!(
            String::from_utf8(encode(&decoded)).expect("utf8"),
            r#"{"query":"{ me { id } }"}"#
        );
    }
}
