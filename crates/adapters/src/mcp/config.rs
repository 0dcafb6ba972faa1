//! The gateway's TOML configuration: the upstream MCP servers, how each is reached and
//! credentialed, and the maps from each tool, resource URI and prompt to the (resource
//! template, verb) the guard decides on. Validated whole at load; anything not in a map is
//! denied.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::mapping::{ResourceTemplate, TemplateError};
use super::uri::{UriPatternError, UriPrefix, UriTemplate};
use crate::Mode;
use capgate_core::scope::Verb;
use capgate_core::settings::{duration, RunLimits};

#[derive(Debug, thiserror::Error)]
pub enum McpConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("server {server}, {entry}: {source}")]
    Template {
        server: String,
        /// `tool NAME`, `resource URI` or `prompt NAME`.
        entry: String,
        source: TemplateError,
    },
    #[error("server {server}, resource {uri}: {source}")]
    Uri {
        server: String,
        uri: String,
        source: UriPatternError,
    },
    #[error("server {server}: {message}")]
    Server { server: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpConfig {
    /// Where agents reach the gateway over Streamable HTTP (`/mcp/{server}`).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    pub broker: String,
    /// The environment the upstream servers belong to (prod, staging): given to the guard.
    pub environment: String,
    #[serde(default = "McpConfig::default_name")]
    pub name: String,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default = "capgate_core::settings::default_adapter_policies")]
    pub adapter_policies: PathBuf,
    #[serde(
        default = "capgate_core::settings::default_max_staleness",
        deserialize_with = "duration"
    )]
    pub max_staleness: Duration,
    #[serde(default = "McpConfig::default_max_token_bytes")]
    pub max_token_bytes: usize,
    #[serde(default)]
    pub datalog: RunLimits,
    #[serde(default)]
    pub adapter_key_env: Option<String>,
    #[serde(default = "McpConfig::default_spool")]
    pub audit_spool: PathBuf,
    /// Where tool definition digests are kept across restarts (written atomically; an
    /// unreadable or corrupt file stops the gateway). One file per configuration: stdio
    /// sessions started from the same configuration share it under a lock.
    #[serde(default = "McpConfig::default_pin_file")]
    pub pin_file: PathBuf,
    /// Largest JSON-RPC message accepted from an agent (bytes).
    #[serde(default = "McpConfig::default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// `Host` values agents may use (DNS-rebinding protection); loopback by default.
    #[serde(default = "McpConfig::default_allowed_hosts")]
    pub allowed_hosts: Vec<String>,
    /// The operator's approval page, `{id}` replaced by the request id (shown to agents as
    /// the URL-mode elicitation target); the broker's approval resource by default.
    #[serde(default)]
    pub approval_url: Option<String>,
    pub servers: Vec<ServerConfig>,
}

impl McpConfig {
    fn default_name() -> String {
        "mcp-gateway".into()
    }
    fn default_max_token_bytes() -> usize {
        16 * 1024
    }
    fn default_spool() -> PathBuf {
        PathBuf::from("capgate-mcp-audit-spool.jsonl")
    }
    fn default_pin_file() -> PathBuf {
        PathBuf::from("capgate-mcp-pins.json")
    }
    fn default_max_message_bytes() -> usize {
        1 << 20
    }
    fn default_allowed_hosts() -> Vec<String> {
        vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
    }

    pub fn load(path: &Path) -> Result<Self, McpConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| McpConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: McpConfig = toml::from_str(&text).map_err(|e| McpConfigError::Invalid {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        if config.adapter_policies.is_relative() {
            config.adapter_policies = base.join(&config.adapter_policies);
        }
        if config.audit_spool.is_relative() {
            config.audit_spool = base.join(&config.audit_spool);
        }
        if config.pin_file.is_relative() {
            config.pin_file = base.join(&config.pin_file);
        }
        config.validate()?;
        Ok(config)
    }

    /// Every template parses, names are unique, each server has one way to reach it.
    pub fn validate(&self) -> Result<(), McpConfigError> {
        let mut names = std::collections::HashSet::new();
        for server in &self.servers {
            let fail = |message: String| McpConfigError::Server {
                server: server.name.clone(),
                message,
            };
            if server.name.is_empty()
                || !server
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(fail(
                    "a server name is letters, digits, '-' and '_' (it is a URL segment)".into(),
                ));
            }
            if !names.insert(server.name.as_str()) {
                return Err(fail("server named twice".into()));
            }
            match (&server.url, &server.command) {
                (Some(url), None) if url.starts_with("http://") => {}
                (Some(_), None) => return Err(fail("url must be http://host:port/path".into())),
                (None, Some(command)) if !command.is_empty() => {}
                _ => return Err(fail("set exactly one of url and command".into())),
            }
            let template = |entry: String, text: &str| {
                ResourceTemplate::parse(text).map_err(|source| McpConfigError::Template {
                    server: server.name.clone(),
                    entry,
                    source,
                })
            };
            let mut tools = std::collections::HashSet::new();
            for tool in &server.tools {
                if !tools.insert(tool.name.as_str()) {
                    return Err(fail(format!("tool {} mapped twice", tool.name)));
                }
                template(format!("tool {}", tool.name), &tool.resource)?;
                if let Some(digest) = &tool.digest {
                    if !super::pin::is_digest(digest) {
                        return Err(fail(format!(
                            "tool {}: digest must be sha256: and 64 lowercase hex digits",
                            tool.name
                        )));
                    }
                }
            }
            let mut uris = std::collections::HashSet::new();
            for resource in &server.resources {
                let uri = resource.pattern(&server.name)?;
                if !uris.insert(uri.text().to_owned()) {
                    return Err(fail(format!("resource {} mapped twice", uri.text())));
                }
                let filled = template(format!("resource {}", uri.text()), &resource.resource)?;
                // Every placeholder must be one a match fills: a template variable by name,
                // and nothing at all for a prefix (its rest is no single value).
                let variables: Vec<&str> = match &uri {
                    UriPattern::Template(t) => t.variables().collect(),
                    UriPattern::Prefix(_) => Vec::new(),
                };
                let unfilled = filled
                    .pointers()
                    .find(|p| !variables.iter().any(|v| p.strip_prefix('/') == Some(*v)))
                    .map(str::to_owned);
                if let Some(pointer) = unfilled {
                    return Err(fail(format!(
                        "resource {}: placeholder {{{pointer}}} names no variable of the URI (a template's are {{/name}}; a prefix has none)",
                        uri.text()
                    )));
                }
            }
            let mut prompts = std::collections::HashSet::new();
            for prompt in &server.prompts {
                if !prompts.insert(prompt.name.as_str()) {
                    return Err(fail(format!("prompt {} mapped twice", prompt.name)));
                }
                template(format!("prompt {}", prompt.name), &prompt.resource)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The URL segment agents use: `/mcp/{name}`.
    pub name: String,
    /// A Streamable HTTP server, e.g. `http://127.0.0.1:9000/mcp`…
    #[serde(default)]
    pub url: Option<String>,
    /// …or a local command started with the credential in its environment (stdio).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Where the real credential comes from (the gateway's environment).
    #[serde(default)]
    pub credential_env: Option<String>,
    /// HTTP: header that carries it (`authorization` by default, as `Bearer <secret>`).
    #[serde(default = "ServerConfig::default_header")]
    pub credential_header: String,
    #[serde(default = "ServerConfig::default_prefix")]
    pub credential_prefix: String,
    /// stdio: the variable the server process reads its credential from.
    #[serde(default)]
    pub credential_child_env: Option<String>,
    #[serde(default)]
    pub tools: Vec<ToolConfig>,
    #[serde(default)]
    pub resources: Vec<ResourceConfig>,
    #[serde(default)]
    pub prompts: Vec<PromptConfig>,
}

impl ServerConfig {
    fn default_header() -> String {
        "authorization".into()
    }
    fn default_prefix() -> String {
        "Bearer ".into()
    }

    /// Configured pins as (server, tool, digest): the operator's acceptances.
    pub fn pins(&self) -> Vec<(String, String, String)> {
        self.tools
            .iter()
            .filter_map(|t| {
                t.digest
                    .as_ref()
                    .map(|d| (self.name.clone(), t.name.clone(), d.clone()))
            })
            .collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolConfig {
    pub name: String,
    /// e.g. `http://railway/volumes/{/volume_id}`: placeholders are JSON pointers into the
    /// call's arguments.
    pub resource: String,
    pub verb: Verb,
    /// The accepted definition digest (`sha256:…`), recorded in the pin file at start;
    /// without it, the first one seen is pinned.
    #[serde(default)]
    pub digest: Option<String>,
}

/// A resource URI mapping: which URIs (a template or a prefix) and what reading one is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    /// `railway://volumes/{volume_id}/logs`: simple variables, each one value…
    #[serde(default)]
    pub uri: Option<String>,
    /// …or `railway://docs/`: every URI under it (plain segments only), one resource.
    #[serde(default)]
    pub uri_prefix: Option<String>,
    /// e.g. `http://railway/volumes/{/volume_id}`: placeholders are JSON pointers into the
    /// URI's variables.
    pub resource: String,
    pub verb: Verb,
}

/// Which URIs a resource mapping covers, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UriPattern {
    Template(UriTemplate),
    Prefix(UriPrefix),
}

impl UriPattern {
    pub fn text(&self) -> &str {
        match self {
            UriPattern::Template(t) => t.as_str(),
            UriPattern::Prefix(p) => p.as_str(),
        }
    }
}

impl ResourceConfig {
    pub fn pattern(&self, server: &str) -> Result<UriPattern, McpConfigError> {
        let uri_error = |uri: &str, source| McpConfigError::Uri {
            server: server.to_owned(),
            uri: uri.to_owned(),
            source,
        };
        match (&self.uri, &self.uri_prefix) {
            (Some(uri), None) => UriTemplate::parse(uri)
                .map(UriPattern::Template)
                .map_err(|e| uri_error(uri, e)),
            (None, Some(prefix)) => UriPrefix::parse(prefix)
                .map(UriPattern::Prefix)
                .map_err(|e| uri_error(prefix, e)),
            _ => Err(McpConfigError::Server {
                server: server.to_owned(),
                message: format!(
                    "resource {}: set exactly one of uri and uri_prefix",
                    self.resource
                ),
            }),
        }
    }
}

/// A prompt mapping: its name, and the resource its arguments name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptConfig {
    pub name: String,
    /// Placeholders are JSON pointers into the prompt's arguments, as for tools.
    pub resource: String,
    pub verb: Verb,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_configuration_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/mcp-gateway.toml");
        let config = McpConfig::load(&path).expect("example loads");
        assert_eq!(config.servers[0].tools.len(), 4);
        assert!(!config.servers[0].resources.is_empty());
        assert!(!config.servers[0].prompts.is_empty());
    }

    #[test]
    fn a_bad_template_or_an_ambiguous_server_stops_the_gateway() {
        let base = r#"
broker = "http://127.0.0.1:8080"
environment = "prod"
"#;
        for (label, servers) in [
            (
                "template without a pointer",
                "[[servers]]\nname = \"r\"\nurl = \"http://h/mcp\"\n[[servers.tools]]\nname = \"t\"\nresource = \"http://r/{id}\"\nverb = \"read\"\n",
            ),
            (
                "url and command",
                "[[servers]]\nname = \"r\"\nurl = \"http://h/mcp\"\ncommand = [\"x\"]\n",
            ),
            ("neither url nor command", "[[servers]]\nname = \"r\"\n"),
            (
                "server name that is no URL segment",
                "[[servers]]\nname = \"r/../x\"\nurl = \"http://h/mcp\"\n",
            ),
            (
                "a digest that is not sha256",
                "[[servers]]\nname = \"r\"\nurl = \"http://h/mcp\"\n[[servers.tools]]\nname = \"t\"\nresource = \"http://r/a\"\nverb = \"read\"\ndigest = \"md5:00\"\n",
            ),
            (
                "a resource with both uri and uri_prefix",
                "[[servers]]\nname = \"r\"\nurl = \"http://h/mcp\"\n[[servers.resources]]\nuri = \"r://a/{id}\"\nuri_prefix = \"r://a/\"\nresource = \"http://r/a\"\nverb = \"read\"\n",
            ),
            (
                "a resource placeholder no URI variable fills",
                "[[servers]]\nname = \"r\"\nurl = \"http://h/mcp\"\n[[servers.resources]]\nuri = \"r://a/{id}\"\nresource = \"http://r/a/{/other}\"\nverb = \"read\"\n",
            ),
            (
                "a prefix filling a placeholder",
                "[[servers]]\nname = \"r\"\nurl = \"http://h/mcp\"\n[[servers.resources]]\nuri_prefix = \"r://a/\"\nresource = \"http://r/a/{/id}\"\nverb = \"read\"\n",
            ),
            (
                "a URI template that splits two ways",
                "[[servers]]\nname = \"r\"\nurl = \"http://h/mcp\"\n[[servers.resources]]\nuri = \"r://a/{x}-{y}\"\nresource = \"http://r/a/{/x}\"\nverb = \"read\"\n",
            ),
            (
                "a prompt mapped twice",
                "[[servers]]\nname = \"r\"\nurl = \"http://h/mcp\"\n[[servers.prompts]]\nname = \"p\"\nresource = \"http://r/a\"\nverb = \"read\"\n[[servers.prompts]]\nname = \"p\"\nresource = \"http://r/b\"\nverb = \"read\"\n",
            ),
            (
                "a tool mapped twice",
                "[[servers]]\nname = \"r\"\nurl = \"http://h/mcp\"\n[[servers.tools]]\nname = \"t\"\nresource = \"http://r/a\"\nverb = \"read\"\n[[servers.tools]]\nname = \"t\"\nresource = \"http://r/b\"\nverb = \"delete\"\n",
            ),
        ] {
            let config: McpConfig = toml::from_str(&format!("{base}{servers}")).expect(label);
            assert!(config.validate().is_err(), "{label}");
        }
    }
}
