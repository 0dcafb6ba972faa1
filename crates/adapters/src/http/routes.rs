//! The route table: `METHOD /path/{param}` -> resource template and verb. A request that
//! matches no route is denied; parameters match one canonical segment of safe characters.

use http::Method;
use serde::Deserialize;

use crate::screen::CanonicalPath;
use crate::Mode;
use capgate_core::operation::Operation;
use capgate_core::scope::{ResourcePattern, Verb};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub method: String,
    pub path: String,
    /// e.g. `http://railway/volumes/{id}`: every `{name}` must be a parameter of `path`.
    pub resource: String,
    pub verb: Verb,
    /// Overrides the proxy's mode for this route.
    #[serde(default)]
    pub mode: Option<Mode>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

#[derive(Debug, Clone)]
pub struct Route {
    method: Method,
    segments: Vec<Segment>,
    /// Alternating literal text and parameter names.
    template: Vec<Segment>,
    pub verb: Verb,
    pub mode: Option<Mode>,
    /// The route as configured, for logs and policy attributes.
    pub label: String,
}

/// What a request matched: the concrete resource and verb the guard is asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    pub resource: String,
    pub verb: Verb,
    pub mode: Option<Mode>,
    pub label: String,
}

impl Matched {
    /// The operation the guard is asked about, the same for the proxy and the tower layer:
    /// the route's resource and verb, and the method, route, canonical path and query as
    /// attributes (policies read them, approval digests bind them).
    pub fn operation(
        &self,
        method: &Method,
        path: &CanonicalPath,
        query: Option<&str>,
        environment: &str,
    ) -> Operation {
        let mut attributes = vec![
            ("method".into(), method.to_string()),
            ("route".into(), self.label.clone()),
            ("path".into(), path.encoded.clone()),
        ];
        if let Some(query) = query {
            attributes.push(("query".into(), query.to_owned()));
        }
        Operation {
            resource: self.resource.clone(),
            verb: self.verb,
            environment: environment.to_owned(),
            attributes,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route {route}: {why}")]
pub struct RouteError {
    pub route: String,
    pub why: String,
}

impl Route {
    pub fn parse(config: &RouteConfig) -> Result<Route, RouteError> {
        let label = format!("{} {}", config.method, config.path);
        let err = |why: &str| RouteError {
            route: label.clone(),
            why: why.to_owned(),
        };
        let method = Method::from_bytes(config.method.as_bytes()).map_err(|_| err("bad method"))?;
        if !config.path.starts_with('/') {
            return Err(err("path must start with /"));
        }
        let segments: Vec<Segment> = config
            .path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(
                |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                    Some(name) => Segment::Param(name.to_owned()),
                    None => Segment::Literal(s.to_owned()),
                },
            )
            .collect();
        let params: Vec<&str> = segments
            .iter()
            .filter_map(|s| match s {
                Segment::Param(name) => Some(name.as_str()),
                Segment::Literal(_) => None,
            })
            .collect();
        let template =
            parse_template(&config.resource).ok_or_else(|| err("unbalanced braces in resource"))?;
        for part in &template {
            if let Segment::Param(name) = part {
                if !params.contains(&name.as_str()) {
                    return Err(err(&format!(
                        "resource names {{{name}}}, which the path does not have"
                    )));
                }
            }
        }
        // The template itself, with placeholder values, must be a valid concrete resource.
        let sample = render(&template, |_| Some("x"));
        if ResourcePattern::parse(&sample).is_err() || sample.ends_with('/') {
            return Err(err("resource template does not make a valid resource name"));
        }
        Ok(Route {
            method,
            segments,
            template,
            verb: config.verb,
            mode: config.mode,
            label,
        })
    }

    fn matches<'a>(&self, method: &Method, segments: &'a [String]) -> Option<Vec<(&str, &'a str)>> {
        if method != self.method || segments.len() != self.segments.len() {
            return None;
        }
        let mut bound = Vec::new();
        for (pattern, actual) in self.segments.iter().zip(segments) {
            match pattern {
                Segment::Literal(literal) if literal == actual => {}
                Segment::Literal(_) => return None,
                Segment::Param(name) if is_safe_param(actual) => {
                    bound.push((name.as_str(), actual.as_str()))
                }
                Segment::Param(_) => return None,
            }
        }
        Some(bound)
    }
}

/// Parameters become part of a resource name, so only plain id characters are accepted.
fn is_safe_param(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 128
        && value != "."
        && value != ".."
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.~:@".contains(c))
}

fn parse_template(resource: &str) -> Option<Vec<Segment>> {
    let mut parts = Vec::new();
    let mut rest = resource;
    while let Some(open) = rest.find('{') {
        let close = rest[open..].find('}')? + open;
        if open > 0 {
            parts.push(Segment::Literal(rest[..open].to_owned()));
        }
        parts.push(Segment::Param(rest[open + 1..close].to_owned()));
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return None;
    }
    if !rest.is_empty() {
        parts.push(Segment::Literal(rest.to_owned()));
    }
    Some(parts)
}

fn render<'a>(template: &[Segment], value: impl Fn(&str) -> Option<&'a str>) -> String {
    template
        .iter()
        .map(|part| match part {
            Segment::Literal(text) => text.as_str(),
            Segment::Param(name) => value(name).unwrap_or(""),
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn new(configs: &[RouteConfig]) -> Result<Self, RouteError> {
        let routes = configs
            .iter()
            .map(Route::parse)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RouteTable { routes })
    }

    /// The route a route-level mode is set on, if any (only the proxy applies those).
    pub fn mode_override(&self) -> Option<&str> {
        self.routes
            .iter()
            .find(|route| route.mode.is_some())
            .map(|route| route.label.as_str())
    }

    /// The first route that matches, with its resource rendered from the path parameters.
    pub fn find(&self, method: &Method, segments: &[String]) -> Option<Matched> {
        self.routes.iter().find_map(|route| {
            let bound = route.matches(method, segments)?;
            let resource = render(&route.template, |name| {
                bound.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
            });
            ResourcePattern::parse(&resource).ok()?;
            Some(Matched {
                resource,
                verb: route.verb,
                mode: route.mode,
                label: route.label.clone(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        let route = |method: &str, path: &str, resource: &str, verb| RouteConfig {
            method: method.into(),
            path: path.into(),
            resource: resource.into(),
            verb,
            mode: None,
        };
        RouteTable::new(&[
            route("GET", "/v2/volumes", "http://railway/volumes", Verb::Read),
            route(
                "GET",
                "/v2/volumes/{id}",
                "http://railway/volumes/{id}",
                Verb::Read,
            ),
            route(
                "DELETE",
                "/v2/volumes/{id}",
                "http://railway/volumes/{id}",
                Verb::Delete,
            ),
        ])
        .expect("routes")
    }

    fn segs(path: &str) -> Vec<String> {
        path.split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn routes_render_resources_from_parameters() {
        let matched = table()
            .find(&Method::DELETE, &segs("/v2/volumes/vol_9"))
            .expect("match");
        assert_eq!(matched.resource, "http://railway/volumes/vol_9");
        assert_eq!(matched.verb, Verb::Delete);
        assert_eq!(
            table()
                .find(&Method::GET, &segs("/v2/volumes"))
                .map(|m| m.verb),
            Some(Verb::Read)
        );
    }

    #[test]
    fn unmatched_and_unsafe_parameters_find_nothing() {
        let t = table();
        assert!(
            t.find(&Method::POST, &segs("/v2/volumes")).is_none(),
            "method not routed"
        );
        assert!(
            t.find(&Method::GET, &segs("/v2/backups/bk_1")).is_none(),
            "path not routed"
        );
        assert!(
            t.find(&Method::GET, &segs("/v2/volumes/a/b")).is_none(),
            "extra segment"
        );
        assert!(t
            .find(&Method::GET, &["v2".into(), "volumes".into(), "a b".into()])
            .is_none());
        assert!(
            t.find(&Method::GET, &["v2".into(), "Volumes".into()])
                .is_none(),
            "case matters"
        );
    }

    #[test]
    fn bad_route_configs_are_refused() {
        let bad = RouteConfig {
            method: "GET".into(),
            path: "/v2/volumes/{id}".into(),
            resource: "http://railway/volumes/{other}".into(),
            verb: Verb::Read,
            mode: None,
        };
        assert!(RouteTable::new(&[bad]).is_err());
    }
}
