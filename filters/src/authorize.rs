//! Is this action allowed, right now: Cedar, through a decision cache that
//! can never answer differently from a fresh evaluation.
//!
//! The cache key holds every input policy can read:
//! - the snapshot generation, which covers the policies, the schema, the
//!   routes and the registry (so the principal's attributes, the action and
//!   the resource type): any reload bumps it and old entries are never hit;
//! - the principal's id, the route index (its action and resource type) and
//!   the resource id;
//! - the context: the identity kind, and the trust domain, which is part of
//!   the principal id.
//!
//! Adding an input to the request or the context means adding it to
//! [`DecisionKey`]; [`evaluate`] is the one place both are built from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId, EntityUid,
    PolicyId, PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use miette::Diagnostic;
use moka::sync::Cache;
use pingora_http::RequestHeader;
use prometheus::IntCounter;
use tether_config::ConfigError;

use crate::lifecycle::{Agent, Registry};
use crate::route::{CompiledRoute, RouteMatch};
use crate::{Denial, Filter, IdentityKind, Reason, RequestCtx, Snapshot};

/// What Cedar decided, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether policy permits the request.
    pub allowed: bool,
    /// The policies that determined the decision: the permits that allowed
    /// it, or the forbids that denied it (none for a default deny).
    pub policies: Vec<String>,
    /// Policies that failed to evaluate. Any error denies (fail closed):
    /// an erroring `forbid` must not silently turn into an allow.
    pub errors: Vec<String>,
}

/// The schema, the policies and the principal entities of one snapshot.
pub struct PolicyEngine {
    /// The Cedar schema.
    pub schema: Schema,
    /// Every policy, with ids from `@id` or `FILE#N`.
    pub set: PolicySet,
    /// The registered agents as Cedar entities.
    pub entities: Entities,
    authorizer: Authorizer,
}

/// Policy source: a file name (for ids and errors) and its text.
pub struct PolicySource {
    /// Where it came from.
    pub path: PathBuf,
    /// The Cedar text.
    pub text: String,
}

impl PolicyEngine {
    /// Reads the schema and every `.cedar` file under `policies` (a folder,
    /// read in name order, or one file).
    pub fn read_sources(
        schema: &Path,
        policies: &Path,
    ) -> Result<(PolicySource, Vec<PolicySource>), ConfigError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .map(|text| PolicySource {
                    path: path.to_path_buf(),
                    text,
                })
                .map_err(|e| located(path, None, format!("cannot read file: {e}")))
        };
        let schema = read(schema)?;
        let mut files = Vec::new();
        if policies.is_dir() {
            let entries = std::fs::read_dir(policies)
                .map_err(|e| located(policies, None, format!("cannot read folder: {e}")))?;
            let mut paths: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
                .collect();
            paths.sort();
            for path in paths {
                files.push(read(&path)?);
            }
        } else {
            files.push(read(policies)?);
        }
        Ok((schema, files))
    }

    /// Parses the schema and policies and validates the policies strictly
    /// against the schema. Every error comes back located.
    pub fn parse(
        schema: &PolicySource,
        policies: &[PolicySource],
    ) -> Result<(Schema, PolicySet), Vec<ConfigError>> {
        let schema_parsed = Schema::from_cedarschema_str(&schema.text)
            .map(|(s, _warnings)| s)
            .map_err(|e| vec![diagnostic(&schema.path, &schema.text, &e)])?;

        let mut errors = Vec::new();
        let mut set = PolicySet::new();
        // Which file each policy came from, to locate validation errors.
        let mut origin: HashMap<PolicyId, usize> = HashMap::new();
        for (file_index, source) in policies.iter().enumerate() {
            let parsed = match PolicySet::from_str(&source.text) {
                Ok(p) => p,
                Err(e) => {
                    errors.extend(e.iter().map(|e| diagnostic(&source.path, &source.text, e)));
                    continue;
                }
            };
            if parsed.templates().next().is_some() {
                errors.push(located(
                    &source.path,
                    None,
                    "policy templates are not supported; write static policies".into(),
                ));
            }
            // The parser names policies `policy0`, `policy1`, ... in source
            // order; we name them by `@id` or by file and position.
            let mut in_file: Vec<_> = parsed.policies().collect();
            in_file.sort_by_key(|p| {
                p.id()
                    .to_string()
                    .trim_start_matches("policy")
                    .parse::<usize>()
                    .unwrap_or(usize::MAX)
            });
            let file_name = source
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            for (n, policy) in in_file.into_iter().enumerate() {
                let id = match policy.annotation("id") {
                    Some(id) => id.to_string(),
                    None => format!("{file_name}#{}", n + 1),
                };
                let id = PolicyId::new(id);
                let renamed = policy.new_id(id.clone());
                if let Err(e) = set.add(renamed) {
                    errors.push(located(&source.path, None, format!("policy `{id}`: {e}")));
                    continue;
                }
                origin.insert(id, file_index);
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }

        let result = Validator::new(schema_parsed.clone()).validate(&set, ValidationMode::Strict);
        for e in result.validation_errors() {
            match origin.get(e.policy_id()) {
                Some(&i) => {
                    let source = &policies[i];
                    errors.push(diagnostic(&source.path, &source.text, e));
                }
                None => errors.push(located(&schema.path, None, e.to_string())),
            }
        }
        if errors.is_empty() {
            Ok((schema_parsed, set))
        } else {
            Err(errors)
        }
    }

    /// Assembles the engine: registered agents become principals with
    /// `owner` and `team` attributes, checked against the schema.
    pub fn assemble(
        schema: Schema,
        set: PolicySet,
        registry: &Registry,
    ) -> Result<PolicyEngine, String> {
        let agents = registry.agents().map(|a| {
            let attrs = HashMap::from([
                (
                    "owner".to_string(),
                    RestrictedExpression::new_string(a.owner.to_string()),
                ),
                (
                    "team".to_string(),
                    RestrictedExpression::new_string(a.team.to_string()),
                ),
            ]);
            Entity::new(a.uid.clone(), attrs, Default::default()).map_err(|e| e.to_string())
        });
        let agents = agents.collect::<Result<Vec<_>, _>>()?;
        let entities = Entities::from_entities(agents, Some(&schema)).map_err(|e| {
            format!(
                "registered agents do not fit the schema: {e}; the principal type must be \
                 declared as `entity Agent {{ owner: String, team: String }}`"
            )
        })?;
        Ok(PolicyEngine {
            schema,
            set,
            entities,
            authorizer: Authorizer::new(),
        })
    }

    /// Checks that `route`'s action is in the schema and applies to the
    /// principal type and the route's resource type.
    pub fn check_route(
        &self,
        route: &CompiledRoute,
        principal_type: &cedar_policy::EntityTypeName,
    ) -> Result<(), String> {
        let action = &route.action_uid;
        let Some(principals) = self.schema.principals_for_action(action) else {
            return Err(format!("action `{action}` is not declared in the schema"));
        };
        if !principals.into_iter().any(|p| p == principal_type) {
            return Err(format!(
                "action `{action}` does not apply to principal type `{principal_type}` in the schema"
            ));
        }
        let resources = self
            .schema
            .resources_for_action(action)
            .into_iter()
            .flatten();
        if !resources.into_iter().any(|r| *r == route.resource_type) {
            return Err(format!(
                "action `{action}` does not apply to resource type `{}` in the schema",
                route.resource_type
            ));
        }
        Ok(())
    }
}

/// Evaluates policy for one request, uncached. The cache stores exactly
/// what this returns; [`DecisionKey`] must cover every input it reads.
pub fn evaluate(
    snapshot: &Snapshot,
    agent: &Agent,
    route: &RouteMatch,
    kind: IdentityKind,
) -> Decision {
    let engine = &snapshot.policy;
    let Some(compiled) = snapshot.routes.get(route.index) else {
        return error_decision("route index out of range".into());
    };
    let resource = EntityUid::from_type_name_and_id(
        compiled.resource_type.clone(),
        EntityId::new(&route.resource_id),
    );
    let context = Context::from_pairs([
        (
            "identity_kind".to_string(),
            RestrictedExpression::new_string(kind.as_str().to_string()),
        ),
        (
            "trust_domain".to_string(),
            RestrictedExpression::new_string(agent.id.trust_domain().to_string()),
        ),
    ]);
    let context = match context {
        Ok(c) => c,
        Err(e) => return error_decision(e.to_string()),
    };
    let request = match Request::new(
        agent.uid.clone(),
        compiled.action_uid.clone(),
        resource,
        context,
        None, // routes were checked against the schema at load
    ) {
        Ok(r) => r,
        Err(e) => return error_decision(e.to_string()),
    };
    let response = engine
        .authorizer
        .is_authorized(&request, &engine.set, &engine.entities);
    let errors: Vec<String> = response
        .diagnostics()
        .errors()
        .map(|e| e.to_string())
        .collect();
    Decision {
        allowed: response.decision() == CedarDecision::Allow && errors.is_empty(),
        policies: response
            .diagnostics()
            .reason()
            .map(|id| id.to_string())
            .collect(),
        errors,
    }
}

fn error_decision(error: String) -> Decision {
    Decision {
        allowed: false,
        policies: Vec::new(),
        errors: vec![error],
    }
}

/// Everything a decision depends on. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DecisionKey {
    generation: u64,
    principal: Arc<str>,
    route: usize,
    resource_id: Box<str>,
    kind: IdentityKind,
}

/// A bounded cache of decisions.
pub struct DecisionCache {
    cache: Cache<DecisionKey, Arc<Decision>>,
    hits: IntCounter,
    misses: IntCounter,
}

impl DecisionCache {
    /// A cache of at most `max_entries` decisions, each kept at most `ttl`.
    pub fn new(
        max_entries: u64,
        ttl: Duration,
        hits: IntCounter,
        misses: IntCounter,
    ) -> DecisionCache {
        DecisionCache {
            cache: Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(ttl)
                .build(),
            hits,
            misses,
        }
    }

    /// The decision for a request, from the cache or freshly evaluated.
    /// Returns whether it was a hit.
    pub fn decide(
        &self,
        snapshot: &Snapshot,
        agent: &Agent,
        route: &RouteMatch,
        kind: IdentityKind,
    ) -> (Arc<Decision>, bool) {
        let key = DecisionKey {
            generation: snapshot.generation,
            principal: agent.id.as_arc().clone(),
            route: route.index,
            resource_id: route.resource_id.as_str().into(),
            kind,
        };
        let entry = self
            .cache
            .entry(key)
            .or_insert_with(|| Arc::new(evaluate(snapshot, agent, route, kind)));
        let hit = !entry.is_fresh();
        if hit {
            self.hits.inc();
        } else {
            self.misses.inc();
        }
        (entry.into_value(), hit)
    }

    /// How many decisions are held (approximate, as moka counts).
    pub fn entry_count(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }
}

/// Asks Cedar, through the cache.
pub struct Authorize {
    cache: Arc<DecisionCache>,
}

impl Authorize {
    /// Authorizes through `cache`.
    pub fn new(cache: Arc<DecisionCache>) -> Authorize {
        Authorize { cache }
    }
}

impl Filter for Authorize {
    fn name(&self) -> &'static str {
        "authorize"
    }

    fn apply(&self, _req: &mut RequestHeader, ctx: &mut RequestCtx) -> Result<(), Denial> {
        let (Some(principal), Some(agent), Some(route)) = (&ctx.principal, &ctx.agent, &ctx.route)
        else {
            return Err(Denial::new(
                Reason::Internal,
                "authorize ran before identity, lifecycle and route",
            ));
        };
        let (decision, hit) = self
            .cache
            .decide(&ctx.snapshot, agent, route, principal.kind);
        ctx.cache_hit = Some(hit);
        let outcome = if !decision.errors.is_empty() {
            Err(Denial::new(
                Reason::PolicyError,
                format!("policy evaluation failed: {}", decision.errors.join("; ")),
            ))
        } else if !decision.allowed {
            Err(Denial::new(
                Reason::PolicyDenied,
                if decision.policies.is_empty() {
                    "no policy permits the request".to_string()
                } else {
                    format!("forbidden by {}", decision.policies.join(", "))
                },
            ))
        } else {
            Ok(())
        };
        ctx.decision = Some(decision);
        outcome
    }
}

fn located(path: &Path, position: Option<(usize, usize)>, message: String) -> ConfigError {
    ConfigError {
        file: path.to_path_buf(),
        position,
        field: String::new(),
        message,
    }
}

/// A Cedar diagnostic as a located error: the position of its first label
/// in `text`, and its message with its help.
fn diagnostic(path: &Path, text: &str, e: &(impl Diagnostic + ?Sized)) -> ConfigError {
    let position = e
        .labels()
        .and_then(|mut labels| labels.next())
        .map(|label| line_column(text, label.offset()));
    let mut message = e.to_string();
    if let Some(help) = e.help() {
        message.push_str(&format!(" (help: {help})"));
    }
    located(path, position, message)
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    fn source(name: &str, text: &str) -> PolicySource {
        PolicySource {
            path: PathBuf::from(name),
            text: text.to_string(),
        }
    }

    #[test]
    fn policies_are_named_by_id_annotation_or_file_and_position() {
        let (_, set) = PolicyEngine::parse(
            &source("s.cedarschema", testing::SCHEMA),
            &[source(
                "repos.cedar",
                "permit(principal, action == Action::\"ListIssues\", resource);\n\
                 @id(\"no-admin\") forbid(principal, action == Action::\"Admin\", resource);",
            )],
        )
        .expect("valid");
        let mut ids: Vec<String> = set.policies().map(|p| p.id().to_string()).collect();
        ids.sort();
        assert_eq!(
            ids,
            vec!["no-admin".to_string(), "repos.cedar#1".to_string()]
        );
    }

    #[test]
    fn syntax_errors_are_located() {
        let errors = PolicyEngine::parse(
            &source("s.cedarschema", testing::SCHEMA),
            &[source(
                "bad.cedar",
                "permit(principal, action, resource);\npermit(principal,, resource);",
            )],
        )
        .expect_err("invalid");
        assert_eq!(errors[0].file, PathBuf::from("bad.cedar"));
        assert_eq!(errors[0].position.map(|p| p.0), Some(2));
    }

    #[test]
    fn policies_are_validated_strictly_against_the_schema() {
        let errors = PolicyEngine::parse(
            &source("s.cedarschema", testing::SCHEMA),
            &[source(
                "typo.cedar",
                "permit(principal, action, resource)\nwhen { principal.ownr == \"x\" };",
            )],
        )
        .expect_err("invalid");
        assert_eq!(errors[0].file, PathBuf::from("typo.cedar"));
        assert_eq!(errors[0].position.map(|p| p.0), Some(2));
        assert!(errors[0].message.contains("ownr"), "{}", errors[0].message);
    }

    #[test]
    fn schema_errors_are_located() {
        let errors = PolicyEngine::parse(
            &source("s.cedarschema", "entity Agent {\n  owner: Strin,\n};"),
            &[],
        )
        .expect_err("invalid");
        assert_eq!(errors[0].file, PathBuf::from("s.cedarschema"));
    }

    #[test]
    fn decision_table() {
        let snapshot = testing::snapshot();
        for (agent, method, path, allowed, policies) in [
            (
                testing::ALICE_BOT,
                "GET",
                "/v1/repos/tether/issues",
                true,
                vec!["read-repos"],
            ),
            (
                testing::ALICE_BOT,
                "GET",
                "/v1/admin",
                false,
                vec!["no-admin"],
            ),
            (
                testing::BOB_BOT,
                "GET",
                "/v1/repos/tether/issues",
                false,
                vec![],
            ),
            (
                testing::BOB_BOT,
                "GET",
                "/v1/repos/public/issues",
                true,
                vec!["public-repos"],
            ),
        ] {
            let agent = snapshot.registry.get(agent).expect("agent");
            let route = snapshot.routes.find(method, path).expect("route");
            let d = evaluate(&snapshot, agent, &route, IdentityKind::X509Svid);
            assert_eq!(d.allowed, allowed, "{agent:?} {path}");
            assert_eq!(d.policies, policies, "{path}");
            assert!(d.errors.is_empty());
        }
    }

    #[test]
    fn a_cached_decision_is_identical_to_a_fresh_one() {
        let snapshot = testing::snapshot();
        let cache = testing::cache();
        let agent = snapshot.registry.get(testing::ALICE_BOT).expect("agent");
        for path in [
            "/v1/repos/tether/issues",
            "/v1/admin",
            "/v1/repos/other/issues",
        ] {
            let route = snapshot.routes.find("GET", path).expect("route");
            let fresh = evaluate(&snapshot, agent, &route, IdentityKind::X509Svid);
            let (first, hit1) = cache.decide(&snapshot, agent, &route, IdentityKind::X509Svid);
            let (second, hit2) = cache.decide(&snapshot, agent, &route, IdentityKind::X509Svid);
            assert!(!hit1 && hit2, "{path}: miss then hit");
            assert_eq!(*first, fresh);
            assert_eq!(*second, fresh);
        }
    }

    #[test]
    fn a_new_generation_never_hits_old_decisions() {
        let old = testing::snapshot();
        let cache = testing::cache();
        let agent = old.registry.get(testing::ALICE_BOT).expect("agent");
        let route = old.routes.find("GET", "/v1/admin").expect("route");
        let (denied, _) = cache.decide(&old, agent, &route, IdentityKind::X509Svid);
        assert!(!denied.allowed);

        // The next generation drops the forbid: the cache must not answer
        // with the old denial.
        let new = testing::snapshot_with(
            old.generation + 1,
            "@id(\"admin\") permit(principal, action == Action::\"Admin\", resource);",
        );
        let agent = new.registry.get(testing::ALICE_BOT).expect("agent");
        let (allowed, hit) = cache.decide(&new, agent, &route, IdentityKind::X509Svid);
        assert!(!hit);
        assert!(allowed.allowed);
    }

    #[test]
    fn the_filter_denies_with_the_policy_reason() {
        let mut ctx = testing::ctx_for(testing::ALICE_BOT, "GET", "/v1/admin");
        let denial = Authorize::new(Arc::new(testing::cache()))
            .apply(&mut testing::get("/v1/admin"), &mut ctx)
            .expect_err("denied");
        assert_eq!(denial.reason, Reason::PolicyDenied);
        assert!(denial.detail.contains("no-admin"));
        assert_eq!(ctx.cache_hit, Some(false));
    }

    #[test]
    fn line_columns_count_from_one() {
        assert_eq!(line_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
    }
}
