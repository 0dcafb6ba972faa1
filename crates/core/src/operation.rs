//! One operation an adapter asks the guard about: a resource, a verb, the environment the
//! resource lives in, and protocol attributes. Every adapter's job is one translation, its
//! protocol's traffic in, a list of these out (one per HTTP request, one per GraphQL root
//! field invocation, one per table a statement touches); the guard authorises the list as one
//! request ([`crate::guard::Guard::authorize`]).

/// Every field comes from the adapter's own configuration, its parsing of the request, or its
/// own lookups at the provider, never from anything the agent asserts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    pub resource: String,
    pub verb: crate::scope::Verb,
    /// The environment the resource belongs to (prod, staging): from the adapter's
    /// configuration, or resolved at the provider with the adapter's own credential.
    pub environment: String,
    /// Protocol details (HTTP method, route, GraphQL field and arguments, SQL kind…) that
    /// policies may inspect and that approval digests bind.
    pub attributes: Vec<(String, String)>,
}
