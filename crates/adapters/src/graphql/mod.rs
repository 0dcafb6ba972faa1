//! The GraphQL adapter: one endpoint (Railway's `/graphql/v2`, say) where every call is a
//! POST to the same path, so method and path say nothing. Each request is decoded
//! ([`request`]), parsed and validated against the upstream's schema ([`document`]), and each
//! root-field invocation of the selected operation becomes one guard operation ([`mapping`])
//! whose environment, where configured, the provider is asked for ([`environment`]). The HTTP
//! proxy serves the endpoint on its listener (`[[graphql]]` in its configuration) with its
//! credential injection, header screening and audit, and forwards only the adapter's own
//! encoding of what was judged, once the guard allowed every operation as one batch.

pub mod document;
pub mod environment;
pub mod mapping;
pub mod refusal;
pub mod request;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use apollo_compiler::validation::Valid;
use apollo_compiler::Schema;
use http::Method;
use serde::Deserialize;

use capgate_core::operation::Operation;
use capgate_core::settings::duration;
pub use document::{Invocation, Limits, Root};
pub use environment::{Environments, ResolverConfig, Upstream};
pub use mapping::{FieldMap, FieldRule, Introspection, Pending};
pub use refusal::Refusal;
pub use request::{Decoded, GraphqlRequest};

/// `[[graphql]]` in the HTTP proxy's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphqlConfig {
    /// The endpoint's path, e.g. `/graphql/v2`. Other methods and paths go to `[[routes]]`.
    pub path: String,
    /// The upstream's schema: an introspection result (`.json`) or SDL, relative to the
    /// configuration file.
    pub schema: PathBuf,
    /// The resource every unmapped query field reads: `{field}` is the field's name,
    /// `{$environment}` the proxy's environment.
    pub query_resource: String,
    /// The resource of `__typename` and (when allowed) introspection.
    pub schema_resource: String,
    #[serde(default)]
    pub introspection: Introspection,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub fields: Vec<FieldRule>,
    #[serde(default)]
    pub resolvers: BTreeMap<String, ResolverConfig>,
    /// Provider environment id -> Capgate environment.
    #[serde(default)]
    pub environments: BTreeMap<String, String>,
    /// How long a resolved environment is trusted.
    #[serde(default = "GraphqlConfig::default_ttl", deserialize_with = "duration")]
    pub environment_ttl: Duration,
}

impl GraphqlConfig {
    fn default_ttl() -> Duration {
        Duration::from_secs(60)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GraphqlError {
    #[error("cannot read schema {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("schema {path}: {message}")]
    Schema { path: PathBuf, message: String },
    #[error("graphql endpoint {path}: {message}")]
    Config { path: String, message: String },
}

/// Loads a schema from a file: SDL, or an introspection result (see [`parse_schema`]).
pub fn load_schema(path: &Path) -> Result<Valid<Schema>, GraphqlError> {
    let text = std::fs::read_to_string(path).map_err(|source| GraphqlError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_schema(&text, path)
}

/// A schema from SDL, or from an introspection result (`{"data": {"__schema": …}}` or
/// `{"__schema": …}`) converted to SDL with `cynic-introspection`, validated by
/// `apollo-compiler`. `path` names it in errors.
pub fn parse_schema(text: &str, path: &Path) -> Result<Valid<Schema>, GraphqlError> {
    let error = |message: String| GraphqlError::Schema {
        path: path.to_owned(),
        message,
    };
    let sdl = if text.trim_start().starts_with('{') {
        let mut value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| error(format!("not JSON: {e}")))?;
        if let Some(data) = value.get_mut("data") {
            value = data.take();
        }
        let query: cynic_introspection::IntrospectionQuery = serde_json::from_value(value)
            .map_err(|e| error(format!("not an introspection result: {e}")))?;
        query
            .into_schema()
            .map_err(|e| error(format!("introspection result: {e}")))?
            .to_sdl()
    } else {
        text.to_owned()
    };
    Schema::parse_and_validate(sdl, path).map_err(|e| error(e.errors.to_string()))
}

/// One configured endpoint, compiled.
pub struct Endpoint {
    pub path: String,
    schema: Valid<Schema>,
    fields: FieldMap,
    limits: Limits,
    environments: Environments,
}

/// A request as judged: what to forward and the operations the guard must allow.
#[derive(Debug)]
pub struct Judged {
    pub decoded: Decoded,
    pub pending: Vec<Pending>,
}

impl Endpoint {
    /// `base` resolves a relative schema path (the configuration file's directory).
    pub fn new(
        config: &GraphqlConfig,
        base: &Path,
        upstream: Upstream,
    ) -> Result<Self, GraphqlError> {
        let schema_path = if config.schema.is_relative() {
            base.join(&config.schema)
        } else {
            config.schema.clone()
        };
        Self::with_schema(config, load_schema(&schema_path)?, upstream)
    }

    /// As [`Endpoint::new`], with the schema already loaded (`config.schema` is not read).
    pub fn with_schema(
        config: &GraphqlConfig,
        schema: Valid<Schema>,
        upstream: Upstream,
    ) -> Result<Self, GraphqlError> {
        let bad = |message: String| GraphqlError::Config {
            path: config.path.clone(),
            message,
        };
        if !config.path.starts_with('/') {
            return Err(bad("path must start with /".into()));
        }
        let environments = Environments::new(
            &schema,
            &config.resolvers,
            config.environments.clone(),
            config.environment_ttl,
            upstream,
        )
        .map_err(bad)?;
        let fields = FieldMap::new(
            &schema,
            &config.fields,
            &config.query_resource,
            &config.schema_resource,
            config.introspection,
            &environments.names(),
        )
        .map_err(bad)?;
        Ok(Endpoint {
            path: config.path.clone(),
            schema,
            fields,
            limits: config.limits.clone(),
            environments,
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Decodes, parses, validates and maps a request; no I/O.
    pub fn judge(
        &self,
        method: &Method,
        content_type: Option<&str>,
        url_query: Option<&str>,
        body: &[u8],
    ) -> Result<Judged, Refusal> {
        let decoded =
            request::decode(method, content_type, url_query, body, self.limits.max_batch)?;
        let mut pending = Vec::new();
        for graphql in &decoded.requests {
            let (root, invocations) = document::invocations(&self.schema, graphql, &self.limits)?;
            if decoded.get && root != Root::Query {
                return Err(Refusal::MutationOverGet);
            }
            for invocation in &invocations {
                pending.push(self.fields.pending(invocation)?);
            }
        }
        Ok(Judged { decoded, pending })
    }

    /// The guard operations of a judged request: each pending operation in the environments
    /// its resolver found (one operation per environment), or in `default_environment`.
    pub async fn operations(
        &self,
        pending: &[Pending],
        default_environment: &str,
    ) -> Result<Vec<Operation>, Refusal> {
        let mut operations = Vec::with_capacity(pending.len());
        for item in pending {
            let environments = match &item.resolver {
                None => vec![default_environment.to_owned()],
                Some(resolver) => self
                    .environments
                    .resolve(resolver, &item.arguments)
                    .await
                    .map_err(|why| Refusal::EnvironmentUnresolved {
                        field: item.field.clone(),
                        resource: item.resource.clone(),
                        why,
                    })?,
            };
            for environment in environments {
                let resource = item
                    .resource
                    .replace(mapping::ENVIRONMENT_SLOT, &environment);
                if let Err(e) = capgate_core::scope::ResourcePattern::parse(&resource) {
                    return Err(Refusal::Argument {
                        field: item.field.clone(),
                        argument: "(resource)".into(),
                        why: e.to_string(),
                    });
                }
                let mut attributes = item.attributes.clone();
                // The environment is part of what an approval binds: the same call against
                // a resource that moved to another environment is another operation.
                attributes.push(("environment".into(), environment.clone()));
                operations.push(Operation {
                    resource,
                    verb: item.verb,
                    environment,
                    attributes,
                });
            }
        }
        Ok(operations)
    }
}
