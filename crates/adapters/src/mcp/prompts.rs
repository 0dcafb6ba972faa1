//! `prompts/get` as a guard operation, and `prompts/list` per token. A prompt is mapped by
//! name to a resource template filled from its arguments by JSON pointer, exactly as a tool
//! is; an unmapped prompt is denied (`prompt_unmapped`), and the list shows only prompts
//! this token could get, asked afresh for every request.

use std::collections::HashMap;

use rmcp::model::{GetPromptRequestParams, GetPromptResponse, Prompt};
use rmcp::service::RequestContext;
use rmcp::RoleServer;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::config::{McpConfigError, ServerConfig};
use super::mapping::ResourceTemplate;
use super::mediate::{Failure, SessionHandler};
use super::pin::write_canonical;
use super::refusal::{Code, Refusal};
use capgate_core::guard::Request as GuardRequest;
use capgate_core::scope::Verb;

/// One server's prompt map, parsed once at start.
#[derive(Default)]
pub struct PromptMap {
    entries: HashMap<String, (ResourceTemplate, Verb)>,
}

impl PromptMap {
    pub fn compile(server: &ServerConfig) -> Result<Self, McpConfigError> {
        let mut entries = HashMap::new();
        for prompt in &server.prompts {
            let template = ResourceTemplate::parse(&prompt.resource).map_err(|source| {
                McpConfigError::Template {
                    server: server.name.clone(),
                    entry: format!("prompt {}", prompt.name),
                    source,
                }
            })?;
            entries.insert(prompt.name.clone(), (template, prompt.verb));
        }
        Ok(PromptMap { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn get(&self, name: &str) -> Option<&(ResourceTemplate, Verb)> {
        self.entries.get(name)
    }
}

impl SessionHandler {
    pub(super) async fn prompt(
        &self,
        params: GetPromptRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, Failure> {
        let token = self.token(&context)?;
        let maps = self.maps();
        let Some((template, verb)) = maps.prompts.get(&params.name) else {
            return Err(Refusal::new(
                Code::PromptUnmapped,
                format!(
                    "prompt {} is not in the gateway's map: unmapped prompts are denied",
                    params.name
                ),
            )
            .into());
        };
        let arguments = Value::Object(params.arguments.clone().unwrap_or_default());
        let resource = template
            .render(&arguments)
            .map_err(|e| Refusal::new(Code::ArgumentRejected, e.to_string()))?;
        let mut canonical = String::new();
        write_canonical(&arguments, &mut canonical);
        if Self::carries_token(&token, canonical.as_bytes()) {
            return Err(Refusal::new(
                Code::TokenMisplaced,
                "the arguments carry the Capgate token; it never leaves the gateway",
            )
            .into());
        }
        let request = GuardRequest {
            resource,
            verb: *verb,
            environment: self.gateway.config.environment.clone(),
            attributes: vec![
                ("server".into(), self.upstream.name().to_owned()),
                ("mcp_method".into(), "prompts/get".into()),
                ("prompt".into(), params.name.clone()),
                (
                    "arguments_sha256".into(),
                    hex::encode(Sha256::digest(canonical.as_bytes())),
                ),
            ],
        };
        let authorized = self.decide(&token, &request, params).await?;
        let decision_id = authorized.decision_id().to_owned();
        let params = authorized.into_inner();
        let peer = self.peer().await?;
        self.relay(&context, peer.get_prompt_once(params))
            .await?
            .map_err(|error| self.upstream_failure(&decision_id, error))
    }

    /// The server's prompts this token could get.
    pub(super) async fn usable_prompts(
        &self,
        context: RequestContext<RoleServer>,
    ) -> Result<Vec<Prompt>, Refusal> {
        let rights = self.rights(&context)?;
        let maps = self.maps();
        if maps.prompts.is_empty() {
            return Ok(Vec::new());
        }
        let listed = self
            .peer()
            .await?
            .list_all_prompts()
            .await
            .map_err(|e| self.listing_failed("prompts/list", e))?;
        Ok(listed
            .into_iter()
            .filter(|p| {
                maps.prompts
                    .get(&p.name)
                    .is_some_and(|(template, verb)| rights.could_reach(template, *verb))
            })
            .collect())
    }
}
