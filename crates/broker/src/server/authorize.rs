//! `POST /v1/authorize`: the dry run. Runs the real guard over a token, resource and verb and
//! returns the decision with its explanation (which policy allowed, or which checks failed).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;

use super::problem::{parse_json, require_json, ApiError, Body};
use super::BrokerState;
use capgate_core::guard::{Decision, Request};
use capgate_core::scope::{ResourcePattern, Verb};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DryRunRequest {
    token: String,
    resource: String,
    verb: Verb,
    #[serde(default)]
    attributes: std::collections::BTreeMap<String, String>,
}

pub async fn dry_run(
    State(state): State<Arc<BrokerState>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Json<Decision>, ApiError> {
    require_json(&headers)?;
    let request: DryRunRequest = parse_json(&body)?;
    let resource = ResourcePattern::parse(&request.resource).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_resource",
            e.to_string(),
        )
    })?;
    let environment = state.config.environment_of(&resource).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_environment",
            "resource belongs to no configured environment",
        )
    })?;
    let guard_request = Request {
        resource: resource.to_string(),
        verb: request.verb,
        environment: environment.to_owned(),
        attributes: request.attributes.into_iter().collect(),
    };
    Ok(Json(state.guard.decide(&request.token, &guard_request)))
}
