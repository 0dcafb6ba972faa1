//! Who is calling: agents (JWT from an identity provider, or an API key) and operators
//! (operator keys, never accepted as agent credentials and vice versa).
//!
//! JWTs are checked with `jsonwebtoken` against keys from a JWKS or PEM file. Each key carries
//! exactly one asymmetric algorithm and the token's header must name it: symmetric keys are
//! refused at load, so HMAC-with-the-public-key confusion cannot happen, and `alg: none` is not
//! an algorithm jsonwebtoken can even parse.

use std::collections::HashMap;
use std::path::Path;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::{IdentityConfig, JwtIssuer, OperatorEntry};

/// Agent API keys and operator keys start with these, so a leaked string says what it is.
pub const AGENT_KEY_PREFIX: &str = "cgk_";
pub const OPERATOR_KEY_PREFIX: &str = "cgo_";
pub const ADAPTER_KEY_PREFIX: &str = "cga_";

const MAX_CLAIMS: usize = 64;
const MAX_CLAIM_BYTES: usize = 256;

pub use capgate_core::identity::{AuthMethod, ClaimValue, Identity};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no credential presented")]
    MissingCredential,
    #[error("JWT rejected: {0}")]
    Jwt(JwtRejection),
    #[error("unknown API key")]
    UnknownApiKey,
    #[error("not an operator credential")]
    NotAnOperator,
    #[error("not an adapter credential")]
    NotAnAdapter,
    #[error("agent name is empty, too long or has characters outside [A-Za-z0-9._@:/-]")]
    InvalidAgentName,
    #[error("claim {0:?} is too large or there are too many claims")]
    ClaimTooLarge(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtRejection {
    #[error("malformed")]
    Malformed,
    #[error("algorithm not accepted for this key")]
    AlgorithmMismatch,
    #[error("signed by an unknown key")]
    UnknownKey,
    #[error("bad signature")]
    BadSignature,
    #[error("expired")]
    Expired,
    #[error("not yet valid")]
    NotYetValid,
    #[error("wrong issuer")]
    WrongIssuer,
    #[error("wrong audience")]
    WrongAudience,
    #[error("missing claim {0}")]
    MissingClaim(String),
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::MissingCredential => "credential_missing",
            AuthError::Jwt(JwtRejection::Expired) => "jwt_expired",
            AuthError::Jwt(JwtRejection::WrongIssuer) => "jwt_wrong_issuer",
            AuthError::Jwt(JwtRejection::WrongAudience) => "jwt_wrong_audience",
            AuthError::Jwt(JwtRejection::UnknownKey) => "jwt_unknown_key",
            AuthError::Jwt(_) => "jwt_invalid",
            AuthError::UnknownApiKey => "api_key_unknown",
            AuthError::NotAnOperator => "operator_credential_required",
            AuthError::NotAnAdapter => "adapter_credential_required",
            AuthError::InvalidAgentName => "agent_name_invalid",
            AuthError::ClaimTooLarge(_) => "claim_too_large",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityConfigError {
    #[error("cannot read JWT keys {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("JWT keys {path}: {why}")]
    Invalid {
        path: std::path::PathBuf,
        why: String,
    },
}

struct JwtKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

struct JwtVerifier {
    config: JwtIssuer,
    keys: Vec<JwtKey>,
}

/// Checks agent and operator credentials against the configuration.
pub struct Authenticator {
    jwt: Vec<JwtVerifier>,
    api_keys: HashMap<String, (String, Vec<(String, ClaimValue)>)>,
    operators: HashMap<String, String>,
    adapters: HashMap<String, String>,
}

impl Authenticator {
    pub fn from_config(
        identity: &IdentityConfig,
        operators: &[OperatorEntry],
    ) -> Result<Self, IdentityConfigError> {
        Self::with_adapters(identity, operators, &[])
    }

    pub fn with_adapters(
        identity: &IdentityConfig,
        operators: &[OperatorEntry],
        adapters: &[OperatorEntry],
    ) -> Result<Self, IdentityConfigError> {
        let mut jwt = Vec::new();
        for issuer in &identity.jwt {
            jwt.push(JwtVerifier {
                keys: load_jwt_keys(&issuer.keys, issuer.algorithm.as_deref())?,
                config: issuer.clone(),
            });
        }
        let mut api_keys = HashMap::new();
        for entry in &identity.api_keys {
            let claims = entry
                .claims
                .iter()
                .filter_map(|(k, v)| toml_claim(v).map(|v| (k.clone(), v)))
                .collect();
            api_keys.insert(
                entry.sha256.to_ascii_lowercase(),
                (entry.agent.clone(), claims),
            );
        }
        let operators = operators
            .iter()
            .map(|o| (o.sha256.to_ascii_lowercase(), o.name.clone()))
            .collect();
        let adapters = adapters
            .iter()
            .map(|a| (a.sha256.to_ascii_lowercase(), a.name.clone()))
            .collect();
        Ok(Authenticator {
            jwt,
            api_keys,
            operators,
            adapters,
        })
    }

    /// Authenticates an agent from a bearer credential: an agent API key or a JWT.
    pub fn authenticate_agent(&self, credential: &str) -> Result<Identity, AuthError> {
        let credential = credential.trim();
        if credential.is_empty() {
            return Err(AuthError::MissingCredential);
        }
        if credential.starts_with(AGENT_KEY_PREFIX) {
            let (agent, claims) = self
                .api_keys
                .get(&sha256_hex(credential))
                .ok_or(AuthError::UnknownApiKey)?;
            validate_agent_name(agent)?;
            return Ok(Identity {
                agent: agent.clone(),
                method: AuthMethod::ApiKey,
                claims: claims.clone(),
            });
        }
        if credential.starts_with(OPERATOR_KEY_PREFIX) {
            // An operator key is not an agent identity, whatever it hashes to.
            return Err(AuthError::UnknownApiKey);
        }
        self.authenticate_jwt(credential)
    }

    pub fn authenticate_operator(&self, credential: &str) -> Result<Operator, AuthError> {
        let credential = credential.trim();
        if credential.is_empty() {
            return Err(AuthError::MissingCredential);
        }
        if !credential.starts_with(OPERATOR_KEY_PREFIX) {
            return Err(AuthError::NotAnOperator);
        }
        self.operators
            .get(&sha256_hex(credential))
            .map(|name| Operator { name: name.clone() })
            .ok_or(AuthError::NotAnOperator)
    }

    /// Adapters report decisions to the audit trail with their own key (`cga_…`).
    pub fn authenticate_adapter(&self, credential: &str) -> Result<String, AuthError> {
        let credential = credential.trim();
        if !credential.starts_with(ADAPTER_KEY_PREFIX) {
            return Err(AuthError::NotAnAdapter);
        }
        self.adapters
            .get(&sha256_hex(credential))
            .cloned()
            .ok_or(AuthError::NotAnAdapter)
    }

    fn authenticate_jwt(&self, token: &str) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Jwt(JwtRejection::Malformed))?;
        let mut first_error = None;
        for verifier in &self.jwt {
            let Some(key) = verifier.select(header.kid.as_deref()) else {
                continue;
            };
            match verifier.verify(token, header.alg, key) {
                Ok(identity) => return Ok(identity),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or(AuthError::Jwt(JwtRejection::UnknownKey)))
    }
}

impl JwtVerifier {
    fn select(&self, kid: Option<&str>) -> Option<&JwtKey> {
        match kid {
            Some(kid) => self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            None if self.keys.len() == 1 => self.keys.first(),
            None => None,
        }
    }

    fn verify(&self, token: &str, alg: Algorithm, key: &JwtKey) -> Result<Identity, AuthError> {
        if alg != key.algorithm {
            return Err(AuthError::Jwt(JwtRejection::AlgorithmMismatch));
        }
        let mut validation = Validation::new(key.algorithm);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        let data =
            jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key.key, &validation)
                .map_err(|e| AuthError::Jwt(jwt_rejection(e.kind())))?;
        let claims = data.claims;
        let agent = claims
            .get(&self.config.agent_claim)
            .and_then(Value::as_str)
            .ok_or_else(|| {
                AuthError::Jwt(JwtRejection::MissingClaim(self.config.agent_claim.clone()))
            })?
            .to_owned();
        validate_agent_name(&agent)?;
        Ok(Identity {
            agent,
            method: AuthMethod::Jwt,
            claims: json_claims(&claims)?,
        })
    }
}

fn jwt_rejection(kind: &jsonwebtoken::errors::ErrorKind) -> JwtRejection {
    use jsonwebtoken::errors::ErrorKind;
    match kind {
        ErrorKind::ExpiredSignature => JwtRejection::Expired,
        ErrorKind::ImmatureSignature => JwtRejection::NotYetValid,
        ErrorKind::InvalidIssuer => JwtRejection::WrongIssuer,
        ErrorKind::InvalidAudience => JwtRejection::WrongAudience,
        ErrorKind::InvalidSignature => JwtRejection::BadSignature,
        ErrorKind::InvalidAlgorithm => JwtRejection::AlgorithmMismatch,
        ErrorKind::MissingRequiredClaim(claim) => JwtRejection::MissingClaim(claim.clone()),
        _ => JwtRejection::Malformed,
    }
}

/// Top-level scalar claims, and arrays of scalars as one fact per element.
fn json_claims(
    claims: &serde_json::Map<String, Value>,
) -> Result<Vec<(String, ClaimValue)>, AuthError> {
    let mut out = Vec::new();
    for (key, value) in claims {
        let values: Vec<&Value> = match value {
            Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        for value in values {
            let claim = match value {
                Value::String(s) => ClaimValue::Str(s.clone()),
                Value::Bool(b) => ClaimValue::Bool(*b),
                Value::Number(n) => match n.as_i64() {
                    Some(i) => ClaimValue::Int(i),
                    None => continue,
                },
                // Nested objects are not flattened; policies cannot see them.
                _ => continue,
            };
            let too_large = key.len() > MAX_CLAIM_BYTES
                || matches!(&claim, ClaimValue::Str(s) if s.len() > MAX_CLAIM_BYTES);
            // Dropping a claim could dodge a `refuse` rule that names it, so refuse instead.
            if too_large || out.len() >= MAX_CLAIMS {
                return Err(AuthError::ClaimTooLarge(key.chars().take(40).collect()));
            }
            out.push((key.clone(), claim));
        }
    }
    Ok(out)
}

fn toml_claim(value: &toml::Value) -> Option<ClaimValue> {
    match value {
        toml::Value::String(s) => Some(ClaimValue::Str(s.clone())),
        toml::Value::Integer(i) => Some(ClaimValue::Int(*i)),
        toml::Value::Boolean(b) => Some(ClaimValue::Bool(*b)),
        _ => None,
    }
}

pub fn validate_agent_name(name: &str) -> Result<(), AuthError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._@:/-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(AuthError::InvalidAgentName)
    }
}

pub fn sha256_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new random agent API key or operator key and the hash to put in the configuration.
pub fn new_key(prefix: &str) -> (String, String) {
    let key = format!("{prefix}{}", capgate_core::token::random_id());
    let hash = sha256_hex(&key);
    (key, hash)
}

fn load_jwt_keys(
    path: &Path,
    pem_algorithm: Option<&str>,
) -> Result<Vec<JwtKey>, IdentityConfigError> {
    let invalid = |why: String| IdentityConfigError::Invalid {
        path: path.to_owned(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|source| IdentityConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    if text.trim_start().starts_with('{') {
        let set: JwkSet = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if set.keys.is_empty() {
            return Err(invalid("the JWKS has no keys".into()));
        }
        return set
            .keys
            .iter()
            .map(|jwk| {
                let algorithm = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                        Algorithm::ES256
                    }
                    AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                        Algorithm::EdDSA
                    }
                    AlgorithmParameters::OctetKey(_) => {
                        return Err(invalid(
                            "symmetric (oct) keys are not accepted: only RS256, ES256 and EdDSA".into(),
                        ))
                    }
                    _ => return Err(invalid("unsupported key type or curve".into())),
                };
                let declared = jwk.common.key_algorithm;
                let matches = match declared {
                    None => true,
                    Some(KeyAlgorithm::RS256) => algorithm == Algorithm::RS256,
                    Some(KeyAlgorithm::ES256) => algorithm == Algorithm::ES256,
                    Some(KeyAlgorithm::EdDSA) => algorithm == Algorithm::EdDSA,
                    Some(_) => false,
                };
                if !matches {
                    return Err(invalid(format!(
                        "key {:?} declares an algorithm other than RS256, ES256 or EdDSA for its type",
                        jwk.common.key_id
                    )));
                }
                let key = DecodingKey::from_jwk(jwk).map_err(|e| invalid(e.to_string()))?;
                Ok(JwtKey {
                    kid: jwk.common.key_id.clone(),
                    algorithm,
                    key,
                })
            })
            .collect();
    }
    let algorithm = match pem_algorithm {
        Some("RS256") => Algorithm::RS256,
        Some("ES256") => Algorithm::ES256,
        Some("EdDSA") => Algorithm::EdDSA,
        Some(other) => {
            return Err(invalid(format!(
                "algorithm {other} is not accepted: use RS256, ES256 or EdDSA"
            )))
        }
        None => {
            return Err(invalid(
                "a PEM key needs `algorithm` (RS256, ES256 or EdDSA)".into(),
            ))
        }
    };
    let bytes = text.as_bytes();
    let key = match algorithm {
        Algorithm::RS256 => DecodingKey::from_rsa_pem(bytes),
        Algorithm::ES256 => DecodingKey::from_ec_pem(bytes),
        _ => DecodingKey::from_ed_pem(bytes),
    }
    .map_err(|e| invalid(e.to_string()))?;
    Ok(vec![JwtKey {
        kid: None,
        algorithm,
        key,
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_names_are_restricted() {
        assert!(validate_agent_name("deploy-bot").is_ok());
        assert!(validate_agent_name("ci@github:org/repo").is_ok());
        for bad in ["", "a b", "a\"b", "x\n", &"a".repeat(129)] {
            assert_eq!(
                validate_agent_name(bad),
                Err(AuthError::InvalidAgentName),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn operator_and_agent_keys_are_not_interchangeable() {
        let (agent_key, agent_hash) = new_key(AGENT_KEY_PREFIX);
        let (operator_key, operator_hash) = new_key(OPERATOR_KEY_PREFIX);
        let identity = IdentityConfig {
            jwt: vec![],
            api_keys: vec![crate::config::ApiKeyEntry {
                agent: "bot".into(),
                sha256: agent_hash,
                claims: toml::Table::new(),
            }],
        };
        let operators = vec![OperatorEntry {
            name: "alice".into(),
            sha256: operator_hash,
        }];
        let auth = Authenticator::from_config(&identity, &operators).expect("auth");
        assert_eq!(
            auth.authenticate_agent(&agent_key).map(|i| i.agent),
            Ok("bot".into())
        );
        assert_eq!(
            auth.authenticate_operator(&operator_key).map(|o| o.name),
            Ok("alice".into())
        );
        assert_eq!(
            auth.authenticate_operator(&agent_key),
            Err(AuthError::NotAnOperator)
        );
        assert_eq!(
            auth.authenticate_agent(&operator_key),
            Err(AuthError::UnknownApiKey)
        );
        assert_eq!(
            auth.authenticate_agent("cgk_nope"),
            Err(AuthError::UnknownApiKey)
        );
        assert_eq!(
            auth.authenticate_agent("not.a.jwt"),
            Err(AuthError::Jwt(JwtRejection::Malformed))
        );
    }
}
