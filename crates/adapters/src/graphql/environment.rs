//! The environment a resource lives in, asked of the provider, never taken from the agent.
//! A resolver is a GraphQL query the adapter sends upstream with its own credential, with the
//! invocation's arguments bound as variables (never formatted into the text), and a path to
//! the environment ids in the answer; each id must map to a Capgate environment. Answers are
//! cached for a TTL; anything that does not resolve cleanly (an upstream error, no id, an id
//! nobody mapped) is a deny.
//!
//! A path is dot-separated steps: `name` (a member), `*` (each element of a list) and
//! `[key=$var]` (keep the objects whose `key` equals the variable's value), so a project's
//! volume list can be narrowed to the volume asked about:
//! `data.project.volumes.edges.*.node.[id=$volumeId].volumeInstances.edges.*.node.environmentId`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use apollo_compiler::validation::Valid;
use apollo_compiler::{ExecutableDocument, Schema};
use http::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::mapping::lookup;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolverConfig {
    /// A GraphQL query (validated against the schema at load).
    pub query: String,
    /// Query variables filled from the invocation's arguments: variable -> argument (or
    /// `input.field`).
    #[serde(default)]
    pub arguments: BTreeMap<String, String>,
    /// Query variables with fixed values (the project the adapter fronts, say).
    #[serde(default)]
    pub constants: BTreeMap<String, String>,
    /// Where the environment ids are in the answer (see the module doc).
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Member(String),
    Each,
    Filter { key: String, variable: String },
}

fn parse_path(path: &str) -> Result<Vec<Step>, String> {
    path.split('.')
        .map(|step| {
            if step == "*" {
                return Ok(Step::Each);
            }
            if let Some(inner) = step.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
                let (key, variable) = inner
                    .split_once("=$")
                    .ok_or_else(|| format!("bad filter step {step}: write [key=$variable]"))?;
                return Ok(Step::Filter {
                    key: key.to_owned(),
                    variable: variable.to_owned(),
                });
            }
            if step.is_empty() || step.contains(['[', ']', '$', '=']) {
                return Err(format!("bad path step {step:?}"));
            }
            Ok(Step::Member(step.to_owned()))
        })
        .collect()
}

/// Every value the path reaches in `answer`.
fn follow<'a>(answer: &'a Value, steps: &[Step], variables: &Map<String, Value>) -> Vec<&'a Value> {
    let mut current = vec![answer];
    for step in steps {
        current = match step {
            Step::Member(name) => current.into_iter().filter_map(|v| v.get(name)).collect(),
            Step::Each => current
                .into_iter()
                .filter_map(Value::as_array)
                .flatten()
                .collect(),
            Step::Filter { key, variable } => {
                let wanted = variables.get(variable);
                current
                    .into_iter()
                    .filter(|v| wanted.is_some() && v.get(key) == wanted)
                    .collect()
            }
        };
    }
    current
}

struct Resolver {
    query: String,
    arguments: BTreeMap<String, Vec<String>>,
    constants: BTreeMap<String, String>,
    path: Vec<Step>,
    /// Variables the query declares: only these are sent (the others serve path filters).
    declared: Vec<String>,
}

/// Where and how the adapter asks the provider.
pub struct Upstream {
    pub url: String,
    pub credential: (HeaderName, HeaderValue),
    pub timeout: Duration,
}

/// All resolvers of an endpoint, the id -> environment map, and the cache.
pub struct Environments {
    resolvers: BTreeMap<String, Resolver>,
    environments: BTreeMap<String, String>,
    ttl: Duration,
    cache: Mutex<HashMap<CacheKey, (Instant, Vec<String>)>>,
    client: reqwest::Client,
    upstream: Upstream,
}

/// A resolver's name and its bound variables (as JSON).
type CacheKey = (String, String);

/// Why a resolution failed (the reason reaches the agent; the provider's answer does not).
pub type Unresolved = String;

impl Environments {
    pub fn new(
        schema: &Valid<Schema>,
        resolvers: &BTreeMap<String, ResolverConfig>,
        environments: BTreeMap<String, String>,
        ttl: Duration,
        upstream: Upstream,
    ) -> Result<Self, String> {
        let mut compiled = BTreeMap::new();
        for (name, config) in resolvers {
            let document = ExecutableDocument::parse_and_validate(
                schema,
                config.query.as_str(),
                "resolver.graphql",
            )
            .map_err(|e| {
                format!(
                    "resolver {name}: query is not valid against the schema: {}",
                    e.errors
                )
            })?;
            let operation = document
                .operations
                .get(None)
                .map_err(|_| format!("resolver {name}: the query must hold one operation"))?;
            let declared: Vec<String> = operation
                .variables
                .iter()
                .map(|v| v.name.to_string())
                .collect();
            let path = parse_path(&config.path).map_err(|e| format!("resolver {name}: {e}"))?;
            for step in &path {
                if let Step::Filter { variable, .. } = step {
                    if !config.arguments.contains_key(variable)
                        && !config.constants.contains_key(variable)
                    {
                        return Err(format!(
                            "resolver {name}: path filters on ${variable}, which is not bound"
                        ));
                    }
                }
            }
            compiled.insert(
                name.clone(),
                Resolver {
                    query: config.query.clone(),
                    arguments: config
                        .arguments
                        .iter()
                        .map(|(var, arg)| {
                            (var.clone(), arg.split('.').map(str::to_owned).collect())
                        })
                        .collect(),
                    constants: config.constants.clone(),
                    path,
                    declared,
                },
            );
        }
        let client = reqwest::Client::builder()
            .timeout(upstream.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("resolver client: {e}"))?;
        Ok(Environments {
            resolvers: compiled,
            environments,
            ttl,
            cache: Mutex::new(HashMap::new()),
            client,
            upstream,
        })
    }

    pub fn names(&self) -> Vec<&str> {
        self.resolvers.keys().map(String::as_str).collect()
    }

    /// The Capgate environments of the resource an invocation touches (several when it spans
    /// several, e.g. a volume with instances in staging and production), sorted.
    pub async fn resolve(
        &self,
        resolver: &str,
        arguments: &BTreeMap<String, Value>,
    ) -> Result<Vec<String>, Unresolved> {
        let config = self
            .resolvers
            .get(resolver)
            .ok_or_else(|| format!("no resolver {resolver}"))?;
        let mut variables = Map::new();
        for (variable, path) in &config.arguments {
            let value = lookup(arguments, path)
                .filter(|v| !v.is_null())
                .ok_or_else(|| format!("argument {} is missing", path.join(".")))?;
            variables.insert(variable.clone(), value.clone());
        }
        for (variable, value) in &config.constants {
            variables.insert(variable.clone(), Value::String(value.clone()));
        }
        let key = (
            resolver.to_owned(),
            Value::Object(variables.clone()).to_string(),
        );
        if let Some(ids) = self.cached(&key) {
            return self.map(ids);
        }
        let ids = self.ask(config, &variables).await?;
        if let Ok(mut cache) = self.cache.lock() {
            // Bounded: an agent could otherwise grow it with ids of its choosing.
            if cache.len() >= 10_000 {
                cache.clear();
            }
            cache.insert(key, (Instant::now(), ids.clone()));
        }
        self.map(ids)
    }

    fn cached(&self, key: &(String, String)) -> Option<Vec<String>> {
        let cache = self.cache.lock().ok()?;
        let (at, ids) = cache.get(key)?;
        (at.elapsed() < self.ttl).then(|| ids.clone())
    }

    fn map(&self, ids: Vec<String>) -> Result<Vec<String>, Unresolved> {
        let mut mapped = BTreeSet::new();
        for id in &ids {
            let environment = self.environments.get(id).ok_or_else(|| {
                format!("provider environment {id} is not mapped to a Capgate environment")
            })?;
            mapped.insert(environment.clone());
        }
        Ok(mapped.into_iter().collect())
    }

    async fn ask(
        &self,
        config: &Resolver,
        variables: &Map<String, Value>,
    ) -> Result<Vec<String>, Unresolved> {
        let sent: Map<String, Value> = variables
            .iter()
            .filter(|(name, _)| config.declared.contains(name))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        let body = serde_json::json!({"query": config.query, "variables": sent});
        let response = self
            .client
            .post(&self.upstream.url)
            .header(
                self.upstream.credential.0.clone(),
                self.upstream.credential.1.clone(),
            )
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("the provider did not answer: {}", e.without_url()))?;
        if !response.status().is_success() {
            return Err(format!("the provider answered {}", response.status()));
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|_| "the provider's answer could not be read".to_owned())?;
        if bytes.len() > 4 << 20 {
            return Err("the provider's answer is too large".into());
        }
        let answer: Value = serde_json::from_slice(&bytes)
            .map_err(|_| "the provider's answer is not JSON".to_owned())?;
        if answer.get("errors").is_some_and(|e| !e.is_null()) {
            return Err("the provider answered with errors".into());
        }
        let mut ids = BTreeSet::new();
        for value in follow(&answer, &config.path, variables) {
            match value {
                Value::String(id) if !id.is_empty() => {
                    ids.insert(id.clone());
                }
                _ => return Err("the answer holds an environment id that is not a string".into()),
            }
        }
        if ids.is_empty() {
            return Err("the provider knows no environment for it".into());
        }
        Ok(ids.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_follow_members_lists_and_filters() {
        let answer = json!({"data": {"project": {"volumes": {"edges": [
            {"node": {"id": "vol_a", "volumeInstances": {"edges": [
                {"node": {"environmentId": "env_staging"}},
                {"node": {"environmentId": "env_prod"}}]}}},
            {"node": {"id": "vol_b", "volumeInstances": {"edges": [
                {"node": {"environmentId": "env_dev"}}]}}}
        ]}}}});
        let path = parse_path(
            "data.project.volumes.edges.*.node.[id=$volumeId].volumeInstances.edges.*.node.environmentId",
        )
        .expect("path");
        let vars = |id: &str| {
            let mut m = Map::new();
            m.insert("volumeId".into(), json!(id));
            m
        };
        let found: Vec<&Value> = follow(&answer, &path, &vars("vol_a"));
        assert_eq!(found, vec![&json!("env_staging"), &json!("env_prod")]);
        assert_eq!(
            follow(&answer, &path, &vars("vol_b")),
            vec![&json!("env_dev")]
        );
        assert!(follow(&answer, &path, &vars("vol_x")).is_empty());
        assert!(parse_path("a.[b]").is_err());
        assert!(parse_path("a..b").is_err());
    }
}
