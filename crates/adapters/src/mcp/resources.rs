//! `resources/read` as a guard operation, and the resource listings per token. The URI is
//! matched against the server's resource map (templates and prefixes, `uri`); the matching
//! entry's resource template is filled from the URI's variables and decided with its verb.
//! A URI no entry matches is denied (`resource_unmapped`), never read by default; one that
//! more than one entry matches is denied too (`resource_ambiguous`), since which entry
//! decides would be a guess. `resources/list` and `resources/templates/list` show only what
//! this token could read, asked afresh for every request.

use rmcp::model::{
    CacheScope, ReadResourceRequestParams, ReadResourceResponse, Resource,
    ResourceTemplate as UpstreamTemplate,
};
use rmcp::service::RequestContext;
use rmcp::RoleServer;
use serde_json::{Map, Value};

use super::config::{McpConfigError, ServerConfig, UriPattern};
use super::mapping::ResourceTemplate;
use super::mediate::{Failure, Rights, SessionHandler};
use super::refusal::{Code, Refusal};
use super::uri::{UriRejected, MAX_URI_LEN};
use capgate_core::guard::Request as GuardRequest;
use capgate_core::scope::Verb;

/// Why a URI names no resource to decide on: always a deny.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unresolved {
    #[error("no resource mapping of this server names {0}: unmapped resources are denied")]
    Unmapped(String),
    #[error("{uri} is named by more than one resource mapping ({mappings}): refused rather than guessed")]
    Ambiguous { uri: String, mappings: String },
    #[error(transparent)]
    Rejected(#[from] UriRejected),
    #[error("{0}")]
    BadResource(String),
}

impl Unresolved {
    fn code(&self) -> Code {
        match self {
            Unresolved::Unmapped(_) => Code::ResourceUnmapped,
            Unresolved::Ambiguous { .. } => Code::ResourceAmbiguous,
            Unresolved::Rejected(_) | Unresolved::BadResource(_) => Code::UriRejected,
        }
    }
}

struct Entry {
    pattern: UriPattern,
    template: ResourceTemplate,
    verb: Verb,
}

/// One server's resource map, parsed once at start.
#[derive(Default)]
pub struct ResourceMap {
    entries: Vec<Entry>,
}

impl ResourceMap {
    pub fn compile(server: &ServerConfig) -> Result<Self, McpConfigError> {
        let mut entries = Vec::new();
        for resource in &server.resources {
            let pattern = resource.pattern(&server.name)?;
            let template = ResourceTemplate::parse(&resource.resource).map_err(|source| {
                McpConfigError::Template {
                    server: server.name.clone(),
                    entry: format!("resource {}", pattern.text()),
                    source,
                }
            })?;
            entries.push(Entry {
                pattern,
                template,
                verb: resource.verb,
            });
        }
        Ok(ResourceMap { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The resource reading `uri` names, and the verb it is decided with.
    pub fn resolve(&self, uri: &str) -> Result<(String, Verb), Unresolved> {
        if uri.len() > MAX_URI_LEN {
            return Err(UriRejected::TooLong.into());
        }
        let mut found = Vec::new();
        for entry in &self.entries {
            let values = match &entry.pattern {
                UriPattern::Template(template) => match template.matches(uri) {
                    Some(values) => values,
                    None => continue,
                },
                UriPattern::Prefix(prefix) => match prefix.matches(uri) {
                    Some(Ok(())) => Map::new(),
                    // One mapping finding the URI hostile is enough to refuse it.
                    Some(Err(rejected)) => return Err(rejected.into()),
                    None => continue,
                },
            };
            let resource = entry
                .template
                .render(&Value::Object(values))
                .map_err(|e| Unresolved::BadResource(e.to_string()))?;
            found.push((entry, resource));
        }
        match found.len() {
            0 => Err(Unresolved::Unmapped(uri.to_owned())),
            1 => {
                let (entry, resource) = found.remove(0);
                Ok((resource, entry.verb))
            }
            _ => Err(Unresolved::Ambiguous {
                uri: uri.to_owned(),
                mappings: found
                    .iter()
                    .map(|(entry, _)| entry.pattern.text())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// Could this token read some URI of the upstream's template `uri_template`? Only a
    /// template mapped as written, or one under a mapped prefix, can be.
    fn template_readable(&self, uri_template: &str, rights: &Rights) -> bool {
        self.entries.iter().any(|entry| match &entry.pattern {
            UriPattern::Template(template) => {
                template.as_str() == uri_template && rights.could_reach(&entry.template, entry.verb)
            }
            UriPattern::Prefix(prefix) => {
                uri_template.len() > prefix.as_str().len()
                    && uri_template.starts_with(prefix.as_str())
                    && entry
                        .template
                        .render(&Value::Object(Map::new()))
                        .is_ok_and(|resource| rights.covers(&resource, entry.verb))
            }
        })
    }
}

impl SessionHandler {
    pub(super) async fn read(
        &self,
        params: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, Failure> {
        let token = self.token(&context)?;
        if Self::carries_token(&token, params.uri.as_bytes()) {
            return Err(Refusal::new(
                Code::TokenMisplaced,
                "the URI carries the Capgate token; it never leaves the gateway",
            )
            .into());
        }
        let (resource, verb) = self
            .maps()
            .resources
            .resolve(&params.uri)
            .map_err(|e| Refusal::new(e.code(), e.to_string()))?;
        let request = GuardRequest {
            resource,
            verb,
            environment: self.gateway.config.environment.clone(),
            attributes: vec![
                ("server".into(), self.upstream.name().to_owned()),
                ("mcp_method".into(), "resources/read".into()),
                ("uri".into(), params.uri.clone()),
            ],
        };
        let authorized = self.decide(&token, &request, params).await?;
        let decision_id = authorized.decision_id().to_owned();
        let params = authorized.into_inner();
        let peer = self.peer().await?;
        match self
            .relay(&context, peer.read_resource_once(params))
            .await?
        {
            // Decided for this token: nobody may serve it to another from a cache.
            Ok(ReadResourceResponse::Complete(mut result)) => {
                result.cache_scope = Some(CacheScope::Private);
                Ok(ReadResourceResponse::Complete(result))
            }
            Ok(other) => Ok(other),
            Err(error) => Err(self.upstream_failure(&decision_id, error)),
        }
    }

    /// The server's resources this token could read.
    pub(super) async fn readable_resources(
        &self,
        context: RequestContext<RoleServer>,
    ) -> Result<Vec<Resource>, Refusal> {
        let rights = self.rights(&context)?;
        let maps = self.maps();
        if maps.resources.is_empty() {
            return Ok(Vec::new());
        }
        let listed = self
            .peer()
            .await?
            .list_all_resources()
            .await
            .map_err(|e| self.listing_failed("resources/list", e))?;
        Ok(listed
            .into_iter()
            .filter(|r| {
                maps.resources
                    .resolve(&r.uri)
                    .is_ok_and(|(resource, verb)| rights.covers(&resource, verb))
            })
            .collect())
    }

    /// The server's resource templates some read of which this token could make.
    pub(super) async fn readable_templates(
        &self,
        context: RequestContext<RoleServer>,
    ) -> Result<Vec<UpstreamTemplate>, Refusal> {
        let rights = self.rights(&context)?;
        let maps = self.maps();
        if maps.resources.is_empty() {
            return Ok(Vec::new());
        }
        let listed = self
            .peer()
            .await?
            .list_all_resource_templates()
            .await
            .map_err(|e| self.listing_failed("resources/templates/list", e))?;
        Ok(listed
            .into_iter()
            .filter(|t| maps.resources.template_readable(&t.uri_template, &rights))
            .collect())
    }

    pub(super) fn listing_failed(
        &self,
        method: &str,
        error: rmcp::service::ServiceError,
    ) -> Refusal {
        tracing::error!(error = %error, server = self.upstream.name(), method, "upstream listing failed");
        Refusal::new(
            Code::UpstreamUnavailable,
            "the upstream server did not answer",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &str) -> ResourceMap {
        let config: ServerConfig =
            toml::from_str(&format!("name = \"r\"\nurl = \"http://h/mcp\"\n{entries}"))
                .expect("server");
        ResourceMap::compile(&config).expect("map")
    }

    const ENTRIES: &str = r#"
[[resources]]
uri = "railway://volumes/{volume_id}/logs"
resource = "http://railway/volumes/{/volume_id}"
verb = "read"

[[resources]]
uri_prefix = "railway://docs/"
resource = "http://railway/docs"
verb = "read"

[[resources]]
uri = "railway://docs/{name}"
resource = "http://railway/docs/{/name}"
verb = "read"
"#;

    #[test]
    fn a_uri_resolves_through_exactly_one_mapping() {
        let map = map(ENTRIES);
        assert_eq!(
            map.resolve("railway://volumes/vol_1/logs"),
            Ok(("http://railway/volumes/vol_1".into(), Verb::Read))
        );
        assert_eq!(
            map.resolve("railway://docs/runbooks/restore.md"),
            Ok(("http://railway/docs".into(), Verb::Read))
        );
        assert!(matches!(
            map.resolve("railway://docs/readme"),
            Err(Unresolved::Ambiguous { .. })
        ));
        assert_eq!(
            map.resolve("railway://secrets/x"),
            Err(Unresolved::Unmapped("railway://secrets/x".into()))
        );
        assert!(matches!(
            map.resolve("railway://docs/../secrets/x"),
            Err(Unresolved::Rejected(UriRejected::BadRemainder { .. }))
        ));
        let long = format!("railway://docs/{}", "a/".repeat(1100));
        assert_eq!(
            map.resolve(&long),
            Err(Unresolved::Rejected(UriRejected::TooLong))
        );
    }

    #[test]
    fn an_empty_map_resolves_nothing() {
        assert!(matches!(
            ResourceMap::default().resolve("railway://volumes/vol_1/logs"),
            Err(Unresolved::Unmapped(_))
        ));
    }
}
