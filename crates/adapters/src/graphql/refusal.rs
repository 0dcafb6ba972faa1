//! Why the GraphQL adapter refused a request before (or instead of) asking the guard: one
//! enum, each variant a stable problem code, answered as problem+json. Nothing of a refused
//! request reaches the upstream.

use ::http::StatusCode;
use axum::response::Response;

use crate::{problem, Mode};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("GraphQL requests are GET (queries only) or POST, not {0}")]
    MethodNotAllowed(String),
    #[error("a mutation cannot be sent with GET (browsers and caches send GETs on their own)")]
    MutationOverGet,
    #[error("a GET request carries no body")]
    BodyOnGet,
    #[error("a POST request carries the GraphQL request in its body, not in the URL query")]
    QueryStringOnPost,
    #[error("unsupported Content-Type {0}: send application/json or application/graphql")]
    UnsupportedContentType(String),
    #[error("the request body is over the {0}-byte limit")]
    BodyTooLarge(usize),
    #[error("malformed GraphQL request: {0}")]
    Malformed(String),
    #[error("a batch of {0} requests is over the limit of {1}")]
    BatchTooLarge(usize, usize),
    #[error("persisted query {0} is unknown here: send the query text (the adapter judges only what it can read)")]
    PersistedQueryUnknown(String),
    #[error("the persisted-query hash does not match the query text sent with it")]
    PersistedQueryMismatch,
    #[error("syntax error: {0}")]
    Syntax(String),
    #[error("the document is over the parser's {0} limit")]
    ParserLimit(&'static str),
    #[error("the document is not valid against the upstream's schema: {0}")]
    Invalid(String),
    #[error("the document has several operations and no operationName chooses one")]
    OperationAmbiguous,
    #[error("the document has no operation named {0}")]
    OperationUnknown(String),
    #[error("variables do not fit the operation: {0}")]
    Variables(String),
    #[error("the selection is {0} levels deep, over the limit of {1}")]
    TooDeep(usize, usize),
    #[error("the document has {0} aliases, over the limit of {1}")]
    TooManyAliases(usize, usize),
    #[error("the operation invokes {0} root fields, over the limit of {1}")]
    TooManyRootFields(usize, usize),
    #[error("subscriptions are not proxied")]
    Subscription,
    #[error("introspection ({0}) is not allowed by this adapter's configuration")]
    Introspection(String),
    #[error("mutation {0} is not mapped to a resource and verb: unmapped mutations are denied")]
    UnmappedMutation(String),
    #[error("{field}: argument {argument} cannot name a resource ({why})")]
    Argument {
        field: String,
        argument: String,
        why: String,
    },
    #[error(
        "{field}: the environment of {resource} could not be resolved at the provider ({why})"
    )]
    EnvironmentUnresolved {
        field: String,
        resource: String,
        why: String,
    },
    #[error("the Capgate token appears in the GraphQL request; send it only in the Authorization or Capgate-Token header")]
    TokenMisplaced,
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::MethodNotAllowed(_) => "graphql_method_not_allowed",
            Refusal::MutationOverGet => "graphql_mutation_over_get",
            Refusal::BodyOnGet | Refusal::QueryStringOnPost => "graphql_request_ambiguous",
            Refusal::UnsupportedContentType(_) => "graphql_content_type",
            Refusal::BodyTooLarge(_) => "body_too_large",
            Refusal::Malformed(_) => "graphql_malformed",
            Refusal::BatchTooLarge(..) => "graphql_batch_too_large",
            Refusal::PersistedQueryUnknown(_) | Refusal::PersistedQueryMismatch => {
                "graphql_persisted_query"
            }
            Refusal::Syntax(_) => "graphql_syntax",
            Refusal::ParserLimit(_) => "graphql_parser_limit",
            Refusal::Invalid(_) => "graphql_invalid",
            Refusal::OperationAmbiguous => "graphql_operation_ambiguous",
            Refusal::OperationUnknown(_) => "graphql_operation_unknown",
            Refusal::Variables(_) => "graphql_variables",
            Refusal::TooDeep(..) => "graphql_too_deep",
            Refusal::TooManyAliases(..) => "graphql_too_many_aliases",
            Refusal::TooManyRootFields(..) => "graphql_too_many_root_fields",
            Refusal::Subscription => "graphql_subscription",
            Refusal::Introspection(_) => "graphql_introspection",
            Refusal::UnmappedMutation(_) => "graphql_unmapped_mutation",
            Refusal::Argument { .. } => "graphql_argument",
            Refusal::EnvironmentUnresolved { .. } => "environment_unresolved",
            Refusal::TokenMisplaced => "token_misplaced",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::UnsupportedContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Refusal::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::Introspection(_) | Refusal::UnmappedMutation(_) => StatusCode::FORBIDDEN,
            Refusal::EnvironmentUnresolved { .. } => StatusCode::FORBIDDEN,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    pub fn response(&self, mode: Mode) -> Response {
        tracing::warn!(code = self.code(), reason = %self, "GraphQL request refused");
        problem(self.status(), self.code(), &self.to_string(), None, mode)
    }
}
