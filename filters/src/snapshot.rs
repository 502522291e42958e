//! One version of everything a request is decided against: registry,
//! routes, policies and token issuers, built and validated in full before
//! it serves.
//! Requests hold the snapshot they started with, so a reload never shows a
//! request a mix of two versions.

use std::path::Path;
use std::sync::Arc;

use cedar_policy::EntityTypeName;
use tether_config::{Config, ConfigError, ConfigErrors, EncodedSlash, PathCase, Tokens};

use crate::authorize::{PolicyEngine, PolicySource};
use crate::identity::jwt::TokenVerifier;
use crate::lifecycle::Registry;
use crate::mcp::ArgumentNames;
use crate::route::{qualified, RouteTable};

/// Registry, routes, policies and token issuers of one generation.
pub struct Snapshot {
    /// Bumped by every reload; part of every decision cache key.
    pub generation: u64,
    /// The registered agents.
    pub registry: Registry,
    /// The routes, compiled.
    pub routes: RouteTable,
    /// The Cedar schema, policies and principal entities.
    pub policy: PolicyEngine,
    /// The bearer-token issuers and their keys: none until the proxy,
    /// which reads and fetches the keys, gives them ([`Self::with_tokens`]).
    pub tokens: Arc<TokenVerifier>,
    /// The names the schema declares in `context.arguments`, which MCP
    /// tool calls are checked against.
    pub mcp_arguments: ArgumentNames,
    /// What `%2F` in a request path means (`paths.encoded_slash`).
    pub encoded_slash: EncodedSlash,
}

impl Snapshot {
    /// Builds a snapshot from a loaded config (whose file is `config_path`)
    /// by reading its schema and policy files.
    pub fn load(
        config: &Config,
        config_path: &Path,
        generation: u64,
    ) -> Result<Snapshot, ConfigErrors> {
        let one = |e| ConfigErrors(vec![e]);
        let schema = PolicyEngine::read_schema(&config.policy.schema).map_err(one)?;
        let policies = PolicyEngine::read_policies(&config.policy.policies).map_err(one)?;
        let shadow = match &config.policy.shadow {
            Some(path) => Some(PolicyEngine::read_policies(path).map_err(one)?),
            None => None,
        };
        Snapshot::build(
            config,
            config_path,
            generation,
            &schema,
            &policies,
            shadow.as_deref(),
        )
    }

    /// Builds a snapshot from a config and the text of its schema and
    /// policies. Every problem is returned, located.
    pub fn build(
        config: &Config,
        config_path: &Path,
        generation: u64,
        schema: &PolicySource,
        policies: &[PolicySource],
        shadow: Option<&[PolicySource]>,
    ) -> Result<Snapshot, ConfigErrors> {
        let at = |field: String, message: String| ConfigError {
            file: config_path.to_path_buf(),
            position: None,
            field,
            message,
        };
        let parsed = PolicyEngine::parse(schema, policies).map_err(ConfigErrors)?;
        let mcp_arguments = ArgumentNames::from_schema(&schema.text).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: schema.path.clone(),
                position: None,
                field: String::new(),
                message: format!("cannot read the names of `context.arguments`: {e}"),
            }])
        })?;
        // Shadow policies must be as valid as enforced ones: a broken
        // shadow set would record meaningless disagreements.
        let shadow = match shadow {
            Some(files) => Some(
                PolicyEngine::parse(schema, files)
                    .map_err(ConfigErrors)?
                    .set,
            ),
            None => None,
        };
        let namespace = &config.policy.namespace;
        let principal_type: EntityTypeName = qualified(namespace, "Agent")
            .parse()
            .map_err(|e| ConfigErrors(vec![at("policy.namespace".into(), format!("{e}"))]))?;
        let registry = Registry::new(&config.registry.agents, &principal_type)
            .map_err(|e| ConfigErrors(vec![at("registry".into(), e)]))?;
        let policy = PolicyEngine::assemble(parsed, shadow, &registry)
            .map_err(|e| ConfigErrors(vec![at("registry".into(), e)]))?;
        let routes = RouteTable::new(&config.routes, namespace)
            .map_err(|(i, e)| ConfigErrors(vec![at(format!("routes[{i}]"), e)]))?
            .ignoring_case(config.paths.case == PathCase::Insensitive);
        let errors: Vec<ConfigError> = routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                policy
                    .check_route(r, &principal_type)
                    .err()
                    .map(|e| at(format!("routes[{i}].action"), e))
            })
            .collect();
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        Ok(Snapshot {
            generation,
            registry,
            routes,
            policy,
            tokens: Arc::new(TokenVerifier::new(&Tokens::default(), Vec::new())),
            mcp_arguments,
            encoded_slash: config.paths.encoded_slash,
        })
    }

    /// This snapshot, accepting the tokens `tokens` verifies.
    pub fn with_tokens(self, tokens: Arc<TokenVerifier>) -> Snapshot {
        Snapshot { tokens, ..self }
    }
}
