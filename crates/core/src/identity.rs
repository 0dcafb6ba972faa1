//! Who an agent is once the broker has authenticated it: the name and claims that become
//! Datalog facts in the grant policy. How credentials are checked is the broker's business.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Jwt,
    ApiKey,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Jwt => "jwt",
            AuthMethod::ApiKey => "api_key",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimValue {
    Str(String),
    Int(i64),
    Bool(bool),
}

/// An authenticated agent: its name and the claims that become Datalog facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub agent: String,
    pub method: AuthMethod,
    pub claims: Vec<(String, ClaimValue)>,
}
