//! `GET /v1/keys`: the public root keys with their ids and validity, so adapters verify
//! tokens offline and follow rotations.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;

use super::problem::ApiError;
use super::BrokerState;
use capgate_core::token::KeySetDocument;

pub async fn list(State(state): State<Arc<BrokerState>>) -> Result<Json<KeySetDocument>, ApiError> {
    Ok(Json(state.keyring()?.document().clone()))
}
