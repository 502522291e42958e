//! Is this action allowed, right now: Cedar, through a decision cache that
//! can never answer differently from a fresh evaluation.
//!
//! That guarantee is structural: [`DecisionInput`] is both the cache key
//! and the only thing [`evaluate`] reads (besides the snapshot whose
//! generation it names). An input policy could read but the key lacks
//! cannot exist, because evaluation has no other way to learn it. The
//! input holds:
//! - the snapshot generation, which covers the policies, the schema, the
//!   routes and the registry (so the principal's attributes): any reload
//!   bumps it and old entries are never hit;
//! - the principal, the action and the resource;
//! - the context (see [`RequestContext`]); the wall clock enters only as a
//!   UTC weekday and hour, so time-of-day policies work and a cached
//!   decision lives at most until the hour turns.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityUid, Policy, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use miette::Diagnostic;
use pingora_http::RequestHeader;
use prometheus::IntCounter;
use quick_cache::sync::GuardResult;
use tether_config::ConfigError;

mod pieces;
mod slices;

use self::slices::Slices;
use crate::lifecycle::Registry;
use crate::lint::Warning;
use crate::route::{CompiledRoute, RouteMatch};
use crate::{Denial, Filter, IdentityKind, Reason, RequestCtx, Snapshot};

/// What Cedar decided, and why.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Decision {
    /// Whether policy permits the request.
    pub allowed: bool,
    /// The policies that determined the decision: the permits that allowed
    /// it, or the forbids that denied it (none for a default deny).
    pub policies: Vec<String>,
    /// Policies that failed to evaluate. Any error denies (fail closed):
    /// an erroring `forbid` must not silently turn into an allow.
    pub errors: Vec<String>,
    /// What the shadow policy set would have decided, when one is loaded.
    /// Recorded, never enforced.
    pub shadow: Option<ShadowDecision>,
}

/// A shadow policy set's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShadowDecision {
    /// Whether the shadow set permits the request (errors deny).
    pub allowed: bool,
    /// The shadow policies that determined it.
    pub policies: Vec<String>,
}

/// The schema, the policies and the principal entities of one snapshot.
pub struct PolicyEngine {
    /// The Cedar schema.
    pub schema: Schema,
    /// Every policy, with ids from `@id` or `FILE#N`.
    pub set: PolicySet,
    /// Cedar's validation warnings about `set`.
    pub warnings: Vec<Warning>,
    /// The registered agents as Cedar entities, with the schema's actions.
    pub entities: Entities,
    /// The schema's actions as entities (their groups as parents): a
    /// decision that builds its own entities needs them for
    /// `action in Action::"group"` to hold.
    actions: Vec<Entity>,
    /// Policies evaluated beside `set` and recorded, never enforced.
    pub shadow: Option<PolicySet>,
    /// `set`, sliced per principal and action for evaluation.
    slices: Slices,
    /// `shadow`, sliced the same way.
    shadow_slices: Option<Slices>,
    authorizer: Authorizer,
}

/// A schema and the policies validated against it.
#[derive(Debug)]
pub struct ParsedPolicies {
    pub schema: Schema,
    pub set: PolicySet,
    /// What Cedar's validator warns of without refusing: strings and
    /// identifiers that mix scripts or hold BIDI controls (text that reads
    /// as one thing and matches another), policies that can never hold.
    pub warnings: Vec<Warning>,
}

/// Policy source: a file name (for ids and errors) and its text.
pub struct PolicySource {
    /// Where it came from.
    pub path: PathBuf,
    /// The Cedar text.
    pub text: String,
}

impl PolicyEngine {
    /// Reads the schema file.
    pub fn read_schema(schema: &Path) -> Result<PolicySource, ConfigError> {
        read_source(schema)
    }

    /// Reads every `.cedar` file under `policies` (a folder, read in name
    /// order, or one file).
    pub fn read_policies(policies: &Path) -> Result<Vec<PolicySource>, ConfigError> {
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
                files.push(read_source(&path)?);
            }
        } else {
            files.push(read_source(policies)?);
        }
        Ok(files)
    }

    /// Parses the schema and policies and validates the policies strictly
    /// against the schema. Every error comes back located.
    pub fn parse(
        schema: &PolicySource,
        policies: &[PolicySource],
    ) -> Result<ParsedPolicies, Vec<ConfigError>> {
        let schema_parsed = Schema::from_cedarschema_str(&schema.text)
            .map(|(s, _warnings)| s)
            .map_err(|e| vec![diagnostic(&schema.path, &schema.text, &e)])?;

        let threads = pieces::threads();
        let mut errors = Vec::new();
        // Every policy, renamed, and the file it came from.
        let mut named: Vec<Policy> = Vec::new();
        let mut files: Vec<usize> = Vec::new();
        for (file_index, source) in policies.iter().enumerate() {
            let in_file = match pieces::parse(&source.text, threads) {
                Some(policies) => policies,
                None => match parse_whole(source) {
                    Ok(policies) => policies,
                    Err(e) => {
                        errors.extend(e);
                        continue;
                    }
                },
            };
            let file_name = source
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            // Named by `@id`, or by file and position.
            let in_file = pieces::rename(in_file, threads, |policy, n| {
                // Found by key rather than `annotation("id")`, which parses
                // the key as a Cedar identifier on every call (4 µs each).
                let annotated = policy.annotations().find(|(key, _)| *key == "id");
                PolicyId::new(match annotated.map(|(_, id)| id) {
                    Some(id) => id.to_string(),
                    None => format!("{file_name}#{}", n + 1),
                })
            });
            files.extend(std::iter::repeat_n(file_index, in_file.len()));
            named.extend(in_file);
        }

        // Validation needs only the policies, so it runs while this thread
        // builds the set, which is where duplicate ids are found.
        let mut set = PolicySet::new();
        // Which file each policy came from, to locate validation errors.
        let mut origin: HashMap<PolicyId, usize> = HashMap::new();
        let in_slices = std::thread::scope(|scope| {
            let validating = errors
                .is_empty()
                .then(|| scope.spawn(|| pieces::validate(&schema.text, &named, threads)));
            for (policy, &file_index) in named.iter().zip(&files) {
                let id = policy.id().clone();
                if let Err(e) = set.add(policy.clone()) {
                    let path = &policies[file_index].path;
                    errors.push(located(path, None, format!("policy `{id}`: {e}")));
                    continue;
                }
                origin.insert(id, file_index);
            }
            validating.and_then(|v| v.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
        });
        drop(named);
        if !errors.is_empty() {
            return Err(errors);
        }

        let warnings = match in_slices {
            Some(warnings) => warnings,
            None => {
                let result =
                    Validator::new(schema_parsed.clone()).validate(&set, ValidationMode::Strict);
                for e in result.validation_errors() {
                    match origin.get(e.policy_id()) {
                        Some(&i) => {
                            let source = &policies[i];
                            errors.push(diagnostic(&source.path, &source.text, e));
                        }
                        None => errors.push(located(&schema.path, None, e.to_string())),
                    }
                }
                if !errors.is_empty() {
                    return Err(errors);
                }
                result
                    .validation_warnings()
                    .map(|w| Warning::from_cedar(&w.to_string()))
                    .collect()
            }
        };
        Ok(ParsedPolicies {
            schema: schema_parsed,
            set,
            warnings,
        })
    }

    /// Assembles the engine: registered agents become principals with
    /// `owner` and `team` attributes, checked against the schema.
    pub fn assemble(
        parsed: ParsedPolicies,
        shadow: Option<PolicySet>,
        registry: &Registry,
    ) -> Result<PolicyEngine, String> {
        let ParsedPolicies {
            schema,
            set,
            warnings,
        } = parsed;
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
        let actions = schema
            .action_entities()
            .map_err(|e| format!("the schema's actions: {e}"))?
            .iter()
            .cloned()
            .collect();
        Ok(PolicyEngine {
            actions,
            slices: Slices::new(&set, &schema),
            shadow_slices: shadow.as_ref().map(|s| Slices::new(s, &schema)),
            schema,
            set,
            warnings,
            entities,
            shadow,
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
        let resource_type = route
            .mcp
            .as_ref()
            .map_or(&route.resource_type, |m| &m.tool_type);
        let resources = self
            .schema
            .resources_for_action(action)
            .into_iter()
            .flatten();
        if !resources.into_iter().any(|r| r == resource_type) {
            return Err(format!(
                "action `{action}` does not apply to resource type `{resource_type}` in the schema"
            ));
        }
        if !route.resource_attributes.is_empty() {
            let sample = Entity::new(
                EntityUid::from_type_name_and_id(
                    route.resource_type.clone(),
                    cedar_policy::EntityId::new("check"),
                ),
                route.resource_attributes.clone(),
                Default::default(),
            )
            .map_err(|e| e.to_string())?;
            Entities::from_entities([sample], Some(&self.schema)).map_err(|e| {
                format!(
                    "resource attributes do not fit the schema's `{}`: {e}",
                    route.resource_type
                )
            })?;
        }
        Ok(())
    }
}

/// What policy sees of a request besides principal, action and resource:
/// Tether's context contract. Cedar receives it as
/// `{ identity_kind: String, trust_domain: String, source_ip: ipaddr,
///    time: { weekday: Long, hour: Long } }` (weekday 1 = Monday, UTC),
/// and, when a token delegates, `on_behalf_of: String` (the subject),
/// `delegation_chain: Set<String>` (every agent in the chain, the
/// principal included) and `delegation_depth: Long`. A schema declares
/// the attributes its policies read (the delegation ones optional: `?`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestContext {
    /// How the caller proved its identity.
    pub identity_kind: IdentityKind,
    /// The TCP peer.
    pub source_ip: Option<IpAddr>,
    /// UTC weekday, 1 (Monday) to 7.
    pub weekday: u8,
    /// UTC hour, 0 to 23.
    pub hour: u8,
    /// An MCP `tools/call`'s arguments, canonical JSON.
    pub arguments: Option<Arc<str>>,
    /// For whom the principal acts, when a token delegates.
    pub delegation: Option<Arc<crate::context::Delegation>>,
}

/// Everything a decision depends on: the cache key, and the only input of
/// [`evaluate`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DecisionInput {
    /// The snapshot generation the request is decided under.
    pub generation: u64,
    /// The agent's SPIFFE ID; its attributes come from the snapshot.
    pub principal: Arc<str>,
    /// The matched route, action and resource (the route itself, from the
    /// snapshot, gives their types and the resource's attributes).
    pub route: RouteMatch,
    /// The context.
    pub context: RequestContext,
}

impl DecisionInput {
    /// The input of a request that has passed identity, lifecycle and
    /// route; `None` if one of them has not run.
    pub fn of(ctx: &RequestCtx) -> Option<DecisionInput> {
        let (principal, agent, route) = (
            ctx.principal.as_ref()?,
            ctx.agent.as_ref()?,
            ctx.route.as_ref()?,
        );
        let started = time::OffsetDateTime::from(ctx.started);
        Some(DecisionInput {
            generation: ctx.snapshot.generation,
            principal: agent.id.as_arc().clone(),
            route: route.clone(),
            context: RequestContext {
                identity_kind: principal.kind,
                source_ip: ctx.client_addr,
                weekday: started.weekday().number_from_monday(),
                hour: started.hour(),
                arguments: ctx.mcp.as_ref().and_then(|m| m.arguments.clone()),
                delegation: principal.delegation.clone(),
            },
        })
    }
}

/// Evaluates policy for one request, uncached. The cache stores exactly
/// what this returns for the same input.
pub fn evaluate(snapshot: &Snapshot, input: &DecisionInput) -> Decision {
    if input.generation != snapshot.generation {
        return error_decision(format!(
            "decision input of generation {} against snapshot {}",
            input.generation, snapshot.generation
        ));
    }
    let Some(agent) = snapshot.registry.get(&input.principal) else {
        return error_decision(format!("`{}` is not registered", input.principal));
    };
    let Some(route) = snapshot.routes.get(input.route.index) else {
        return error_decision("route index out of range".into());
    };
    let action = route.action_uid(&input.route);
    let Some(resource) = route.resource_uid(&input.route) else {
        return error_decision("a tool on a route that is not an MCP route".into());
    };
    let request = cedar_context(agent.id.trust_domain(), &input.context).and_then(|context| {
        Request::new(
            agent.uid.clone(),
            action.clone(),
            resource.clone(),
            context,
            None, // routes were checked against the schema at load
        )
        .map_err(|e| e.to_string())
    });
    let request = match request {
        Ok(r) => r,
        Err(e) => return error_decision(e),
    };
    let engine = &snapshot.policy;
    // A route that gives its resource attributes adds that entity; the
    // rest of the time the agents alone are the entities.
    let with_resource;
    let entities = match resource_entity(route, &input.route, resource) {
        Ok(None) => &engine.entities,
        Ok(Some(resource)) => {
            let agent_entity = engine.entities.get(&agent.uid).cloned();
            let actions = engine.actions.iter().cloned();
            let all = agent_entity.into_iter().chain(actions).chain([resource]);
            match Entities::from_entities(all, None) {
                Ok(e) => {
                    with_resource = e;
                    &with_resource
                }
                Err(e) => return error_decision(e.to_string()),
            }
        }
        Err(e) => return error_decision(e),
    };
    let authorize = |set: &PolicySet| {
        let response = engine.authorizer.is_authorized(&request, set, entities);
        let errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|e| e.to_string())
            .collect();
        // Cedar returns a set; sorted, a decision has one form, so cached
        // and fresh answers compare equal and records are stable. Each id
        // as its `@id` wrote it: `PolicyId`'s `Display` escapes quotes and
        // backslashes, one formatted character at a time.
        let mut policies: Vec<String> = response
            .diagnostics()
            .reason()
            .map(|id| <PolicyId as AsRef<str>>::as_ref(id).to_owned())
            .collect();
        policies.sort_unstable();
        (
            response.decision() == CedarDecision::Allow && errors.is_empty(),
            policies,
            errors,
        )
    };
    let (allowed, policies, errors) = authorize(&engine.slices.get(&agent.uid, &action).set);
    Decision {
        allowed,
        policies,
        errors,
        shadow: engine.shadow_slices.as_ref().map(|slices| {
            let (allowed, policies, _) = authorize(&slices.get(&agent.uid, &action).set);
            ShadowDecision { allowed, policies }
        }),
    }
}

/// The resource as an entity with the route's attributes, when the route
/// gives any (and the request acts on the route's resource, not a tool).
fn resource_entity(
    route: &CompiledRoute,
    matched: &RouteMatch,
    resource: EntityUid,
) -> Result<Option<Entity>, String> {
    if route.resource_attributes.is_empty() || matched.resource.tool {
        return Ok(None);
    }
    Entity::new(
        resource,
        route.resource_attributes.clone(),
        Default::default(),
    )
    .map(Some)
    .map_err(|e| e.to_string())
}

/// Contexts one thread keeps; past it, it starts over. Each is one peer
/// address, identity kind and hour: a sidecar sees a few an hour.
const KEPT_CONTEXTS: usize = 256;

/// What a context of the connection's and the clock's facts alone is
/// built from, besides the trust domain: identity kind, peer address,
/// weekday and hour.
type ContextFacts = (IdentityKind, Option<IpAddr>, u8, u8);

/// Kept contexts, by trust domain, then by the other facts. Hashed with
/// foldhash: SipHash was two thirds of a lookup, and a peer choosing its
/// address can only fill the bounded map sooner, which clears it.
type KeptContexts = HashMap<Box<str>, HashMap<ContextFacts, Context, FastHash>, FastHash>;

type FastHash = foldhash::fast::RandomState;

thread_local! {
    static KEPT_CONTEXTS_BUILT: RefCell<KeptContexts> = RefCell::default();
}

/// The Cedar context of `c`, whose agent is of `trust_domain`.
///
/// Cedar's `Context::from_pairs` evaluates the record it is given, every
/// call: about 7,600 instructions, a quarter of an uncached decision. A
/// context of the connection's and the clock's facts alone (no tool
/// arguments, no delegation) is the same for every request of that peer,
/// identity kind and hour, so it is built once per thread and cloned (its
/// record is reference-counted). The key holds every field the context is
/// built from, so a kept context is the one a fresh build would give.
fn cedar_context(trust_domain: &str, c: &RequestContext) -> Result<Context, String> {
    // Every field named, so that one added to the context cannot be left
    // out of the key unnoticed.
    let RequestContext {
        identity_kind,
        source_ip,
        weekday,
        hour,
        arguments,
        delegation,
    } = c;
    if arguments.is_some() || delegation.is_some() {
        return build_context(trust_domain, c);
    }
    let facts = (*identity_kind, *source_ip, *weekday, *hour);
    KEPT_CONTEXTS_BUILT.with_borrow_mut(|built| {
        if let Some(kept) = built.get(trust_domain).and_then(|by| by.get(&facts)) {
            return Ok(kept.clone());
        }
        let context = build_context(trust_domain, c)?;
        if built.values().map(HashMap::len).sum::<usize>() >= KEPT_CONTEXTS {
            built.clear();
        }
        built
            .entry(trust_domain.into())
            .or_default()
            .insert(facts, context.clone());
        Ok(context)
    })
}

/// The Cedar context of a request, built anew: the contract documented on
/// [`RequestContext`].
fn build_context(trust_domain: &str, c: &RequestContext) -> Result<Context, String> {
    let mut pairs = vec![
        (
            "identity_kind".to_string(),
            RestrictedExpression::new_string(c.identity_kind.as_str().to_string()),
        ),
        (
            "trust_domain".to_string(),
            RestrictedExpression::new_string(trust_domain.to_string()),
        ),
        (
            "time".to_string(),
            RestrictedExpression::new_record([
                (
                    "weekday".to_string(),
                    RestrictedExpression::new_long(c.weekday.into()),
                ),
                (
                    "hour".to_string(),
                    RestrictedExpression::new_long(c.hour.into()),
                ),
            ])
            .map_err(|e| e.to_string())?,
        ),
    ];
    if let Some(arguments) = &c.arguments {
        pairs.push((
            "arguments".to_string(),
            crate::mcp::arguments_expression(arguments)?,
        ));
    }
    if let Some(d) = &c.delegation {
        pairs.push((
            "on_behalf_of".to_string(),
            RestrictedExpression::new_string(d.subject.to_string()),
        ));
        pairs.push((
            "delegation_chain".to_string(),
            RestrictedExpression::new_set(
                d.actors
                    .iter()
                    .map(|a| RestrictedExpression::new_string(a.as_str().to_string())),
            ),
        ));
        pairs.push((
            "delegation_depth".to_string(),
            RestrictedExpression::new_long(d.depth() as i64),
        ));
    }
    if let Some(ip) = c.source_ip {
        pairs.push(("source_ip".to_string(), ip_expression(ip)));
    }
    Context::from_pairs(pairs).map_err(|e| e.to_string())
}

/// Addresses whose Cedar expression one thread keeps; past it, it starts
/// over. A sidecar sees a handful of peers; an ingress more, and then
/// pays the build once per address per refill.
const KEPT_IP_EXPRESSIONS: usize = 256;

/// `ip("…")` for `ip`. Cedar's `RestrictedExpression::new_ip` parses the
/// name `ip` with its full parser (building the lexer) on every call:
/// 4 µs, half of an uncached decision. A built expression is cloned
/// instead (its parts are reference-counted).
fn ip_expression(ip: IpAddr) -> RestrictedExpression {
    thread_local! {
        static BUILT: RefCell<HashMap<IpAddr, RestrictedExpression>> = RefCell::default();
    }
    BUILT.with_borrow_mut(|built| {
        if built.len() >= KEPT_IP_EXPRESSIONS && !built.contains_key(&ip) {
            built.clear();
        }
        built
            .entry(ip)
            .or_insert_with(|| RestrictedExpression::new_ip(ip.to_string()))
            .clone()
    })
}

fn error_decision(error: String) -> Decision {
    Decision {
        allowed: false,
        policies: Vec::new(),
        errors: vec![error],
        shadow: None,
    }
}

/// A bounded cache of decisions.
///
/// quick_cache rather than moka: its entries live in one slab per shard,
/// with no per-entry allocations besides the key's own, so a cached
/// decision costs about half the memory (tests/cache_memory.rs measures
/// it), and a hit takes a shard's read lock only.
pub struct DecisionCache {
    cache: quick_cache::sync::Cache<DecisionInput, Cached, ByKeyBytes>,
    /// Distinct decisions, shared by the entries that reached them: there
    /// are few (one per combination of deciding policies) while entries
    /// are many, so each entry holds a pointer rather than its own copy.
    interned: Mutex<HashSet<Arc<Decision>>>,
    /// Entries are kept at most this long.
    ttl: Duration,
    /// The clock entries' deadlines count from.
    born: Instant,
    hits: IntCounter,
    misses: IntCounter,
}

/// A cached decision and when it expires.
#[derive(Clone)]
struct Cached {
    decision: Arc<Decision>,
    /// Milliseconds after [`DecisionCache::born`].
    expires_ms: u64,
    /// What the entry counts for against `max_entries`: see [`weight`].
    weight: u32,
}

/// The bytes of key an entry may hold and still count as one: a resource
/// id, tool arguments and a delegation chain of a few hundred bytes, as
/// nearly every request's are.
const ENTRY_BYTES: usize = 256;

/// What a decision for `input` counts for in the cache: one, and one more
/// for every [`ENTRY_BYTES`] its key holds beyond. So `max_entries` bounds
/// the cache's bytes too, not only its count: an agent asking for 100,000
/// distinct half-megabyte resource ids (or 60 KiB of tool arguments) would
/// otherwise hold gigabytes.
fn weight(input: &DecisionInput) -> u32 {
    let context = &input.context;
    let held = input.route.resource.id.len()
        + context.arguments.as_deref().map_or(0, str::len)
        + context.delegation.as_deref().map_or(0, |d| {
            d.subject.len() + d.actors.iter().map(|a| a.as_str().len()).sum::<usize>()
        });
    u32::try_from(1 + held / ENTRY_BYTES).unwrap_or(u32::MAX)
}

/// Reads [`Cached::weight`], worked out once when the entry was made.
#[derive(Clone, Default)]
struct ByKeyBytes;

impl quick_cache::Weighter<DecisionInput, Cached> for ByKeyBytes {
    fn weight(&self, _: &DecisionInput, cached: &Cached) -> u64 {
        u64::from(cached.weight)
    }
}

/// Keys recently evicted that the cache remembers (CLOCK-PRO's ghosts),
/// as a share of `max_entries`: one seen again comes back as hot. Each
/// takes a full slot, so quick_cache's default (half) would add half the
/// cache's memory once it starts evicting; a tenth still brings back the
/// keys evicted most recently, at a fifth of that cost.
const GHOST_SHARE: f64 = 0.1;

/// A cache of at most `max_entries` decisions (weighed by [`weight`]).
fn bounded_cache(
    max_entries: usize,
) -> quick_cache::sync::Cache<DecisionInput, Cached, ByKeyBytes> {
    let options = quick_cache::OptionsBuilder::new()
        .estimated_items_capacity(max_entries)
        .weight_capacity(max_entries as u64)
        .ghost_allocation(GHOST_SHARE)
        .build()
        .expect("both capacities are set");
    quick_cache::sync::Cache::with_options(
        options,
        ByKeyBytes,
        Default::default(),
        Default::default(),
    )
}

/// Most distinct decisions held for sharing. Past it the set starts over:
/// sharing is lost for a while, correctness never (entries hold their own
/// `Arc`s).
const MAX_INTERNED_DECISIONS: usize = 4096;

impl DecisionCache {
    /// A cache of at most `max_entries` decisions, each kept at most `ttl`.
    pub fn new(
        max_entries: u64,
        ttl: Duration,
        hits: IntCounter,
        misses: IntCounter,
    ) -> DecisionCache {
        DecisionCache {
            cache: bounded_cache(usize::try_from(max_entries).unwrap_or(usize::MAX).max(1)),
            interned: Mutex::new(HashSet::new()),
            ttl,
            born: Instant::now(),
            hits,
            misses,
        }
    }

    /// The decision for `input`, from the cache or freshly evaluated.
    /// Returns whether it was a hit.
    pub fn decide(&self, snapshot: &Snapshot, input: DecisionInput) -> (Arc<Decision>, bool) {
        let now = self.now_ms();
        // Concurrent misses of one key evaluate once: the first holds a
        // placeholder the others wait on. The key is cloned only when it
        // is inserted.
        let fresh = match self.cache.get_value_or_guard(&input, None) {
            GuardResult::Value(cached) if now < cached.expires_ms => {
                self.hits.inc();
                return (cached.decision, true);
            }
            GuardResult::Value(_) => {
                // Expired: decided afresh, replaced.
                let decision = self.intern(evaluate(snapshot, &input));
                let entry = self.entry(&decision, &input, now);
                self.cache.insert(input, entry);
                decision
            }
            GuardResult::Guard(placeholder) => {
                let decision = self.intern(evaluate(snapshot, &input));
                // Refused only if the entry was replaced meanwhile: the
                // decision stands either way.
                let _ = placeholder.insert(self.entry(&decision, &input, now));
                decision
            }
            // Without a timeout the wait never times out; were it to, the
            // request is still decided, just not cached.
            GuardResult::Timeout => self.intern(evaluate(snapshot, &input)),
        };
        self.misses.inc();
        (fresh, false)
    }

    fn entry(&self, decision: &Arc<Decision>, input: &DecisionInput, now_ms: u64) -> Cached {
        Cached {
            decision: decision.clone(),
            expires_ms: now_ms.saturating_add(self.ttl.as_millis() as u64),
            weight: weight(input),
        }
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// The shared copy of `decision`.
    fn intern(&self, decision: Decision) -> Arc<Decision> {
        let mut interned = self.interned.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = interned.get(&decision) {
            return shared.clone();
        }
        if interned.len() >= MAX_INTERNED_DECISIONS {
            interned.clear();
        }
        let shared = Arc::new(decision);
        interned.insert(shared.clone());
        shared
    }

    /// How many decisions are held.
    pub fn entry_count(&self) -> u64 {
        self.cache.len() as u64
    }
}

/// Asks Cedar, through the cache.
pub struct Authorize {
    cache: Arc<DecisionCache>,
    shadow_disagreements: IntCounter,
}

impl Authorize {
    /// Authorizes through `cache`; counts shadow disagreements.
    pub fn new(cache: Arc<DecisionCache>, shadow_disagreements: IntCounter) -> Authorize {
        Authorize {
            cache,
            shadow_disagreements,
        }
    }
}

impl Filter for Authorize {
    fn name(&self) -> &'static str {
        "authorize"
    }

    fn apply(&self, _req: &mut RequestHeader, ctx: &mut RequestCtx) -> Result<(), Denial> {
        let Some(input) = DecisionInput::of(ctx) else {
            return Err(Denial::new(
                Reason::Internal,
                "authorize ran before identity, lifecycle and route",
            ));
        };
        let (decision, hit) = self.cache.decide(&ctx.snapshot, input);
        ctx.cache_hit = Some(hit);
        if decision
            .shadow
            .as_ref()
            .is_some_and(|s| s.allowed != decision.allowed)
        {
            self.shadow_disagreements.inc();
        }
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

/// A file's policies in source order, parsed in one pass: every error
/// located.
fn parse_whole(source: &PolicySource) -> Result<Vec<Policy>, Vec<ConfigError>> {
    let parsed = PolicySet::from_str(&source.text).map_err(|e| {
        e.iter()
            .map(|e| diagnostic(&source.path, &source.text, e))
            .collect::<Vec<_>>()
    })?;
    if parsed.templates().next().is_some() {
        return Err(vec![located(
            &source.path,
            None,
            "policy templates are not supported; write static policies".into(),
        )]);
    }
    Ok(pieces::in_source_order(&parsed))
}

fn read_source(path: &Path) -> Result<PolicySource, ConfigError> {
    std::fs::read_to_string(path)
        .map(|text| PolicySource {
            path: path.to_path_buf(),
            text,
        })
        .map_err(|e| located(path, None, format!("cannot read file: {e}")))
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
    use tether_config::spiffe::SpiffeId;

    fn source(name: &str, text: &str) -> PolicySource {
        PolicySource {
            path: PathBuf::from(name),
            text: text.to_string(),
        }
    }

    #[test]
    fn policies_are_named_by_id_annotation_or_file_and_position() {
        let set = PolicyEngine::parse(
            &source("s.cedarschema", testing::SCHEMA),
            &[source(
                "repos.cedar",
                "permit(principal, action == Action::\"ListIssues\", resource);\n\
                 @id(\"no-admin\") forbid(principal, action == Action::\"Admin\", resource);",
            )],
        )
        .expect("valid")
        .set;
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
        let snapshot = Arc::new(testing::snapshot());
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
            let d = evaluate(&snapshot, &testing::input(&snapshot, agent, method, path));
            assert_eq!(d.allowed, allowed, "{agent} {path}");
            assert_eq!(d.policies, policies, "{path}");
            assert!(d.errors.is_empty());
        }
    }

    #[test]
    fn the_context_contract_reaches_policy() {
        let snapshot = Arc::new(testing::snapshot_with(
            1,
            r#"@id("office-hours-from-loopback")
            permit(principal, action, resource)
            when { context has source_ip && context.source_ip.isLoopback()
                   && context.time.hour >= 0 && context.time.weekday <= 7
                   && context.identity_kind == "x509_svid" && context.trust_domain == "example.org" };"#,
        ));
        let mut input = testing::input(&snapshot, testing::ALICE_BOT, "GET", "/v1/admin");
        input.context.source_ip = Some("127.0.0.1".parse().expect("ip"));
        assert!(evaluate(&snapshot, &input).allowed);
        input.context.source_ip = Some("10.1.2.3".parse().expect("ip"));
        assert!(!evaluate(&snapshot, &input).allowed);
        // No address (a Unix socket): `has` guards it, and nothing permits.
        input.context.source_ip = None;
        let d = evaluate(&snapshot, &input);
        assert!(!d.allowed && d.errors.is_empty(), "{d:?}");
    }

    #[test]
    fn kept_ip_expressions_are_the_ones_cedar_builds_past_the_bound() {
        let addresses = (0..KEPT_IP_EXPRESSIONS as u32 * 2 + 3)
            .map(|i| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)))
            .chain(["::1".parse().expect("ip"), "fe80::1".parse().expect("ip")]);
        // Twice round: the second pass reads what the first kept, across
        // the refills the bound forces.
        for address in addresses.clone().chain(addresses) {
            assert_eq!(
                ip_expression(address),
                RestrictedExpression::new_ip(address.to_string()),
                "{address}"
            );
        }
        // A kept expression still decides: loopback, and not.
        let snapshot = Arc::new(testing::snapshot_with(
            1,
            r#"permit(principal, action, resource)
            when { context has source_ip && context.source_ip.isLoopback() };"#,
        ));
        let mut input = testing::input(&snapshot, testing::ALICE_BOT, "GET", "/v1/admin");
        for (ip, allowed) in [("::1", true), ("10.0.0.1", false), ("::1", true)] {
            input.context.source_ip = Some(ip.parse().expect("ip"));
            assert_eq!(evaluate(&snapshot, &input).allowed, allowed, "{ip}");
        }
    }

    #[test]
    fn kept_contexts_are_the_ones_cedar_builds_past_the_bound() {
        let kinds = [
            IdentityKind::X509Svid,
            IdentityKind::Token(tether_config::TokenKind::JwtSvid),
        ];
        let facts = (0..KEPT_CONTEXTS as u32 + 40).flat_map(|i| {
            ["example.org", "other.org"].map(move |domain| {
                let context = RequestContext {
                    identity_kind: kinds[i as usize % 2],
                    source_ip: (i % 7 != 0)
                        .then(|| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i % 50))),
                    weekday: (i % 7 + 1) as u8,
                    hour: (i % 24) as u8,
                    arguments: None,
                    delegation: None,
                };
                (domain, context)
            })
        });
        // Twice round: the second pass reads what the first kept, across
        // the refills the bound forces.
        for (domain, context) in facts.clone().chain(facts) {
            let kept = cedar_context(domain, &context).expect("context");
            assert_eq!(kept, build_context(domain, &context).expect("context"));
            let held = KEPT_CONTEXTS_BUILT
                .with_borrow(|kept| kept.values().map(HashMap::len).sum::<usize>());
            assert!((1..=KEPT_CONTEXTS).contains(&held), "{held} kept");
        }
        // Tool arguments and delegation are per request: built, not kept.
        let held = || KEPT_CONTEXTS_BUILT.with_borrow(|kept| kept.len());
        KEPT_CONTEXTS_BUILT.with_borrow_mut(HashMap::clear);
        let mut context = RequestContext {
            identity_kind: IdentityKind::X509Svid,
            source_ip: None,
            weekday: 1,
            hour: 9,
            arguments: Some(r#"{"repo":"tether"}"#.into()),
            delegation: None,
        };
        let built = cedar_context("example.org", &context).expect("context");
        assert_eq!(
            built,
            build_context("example.org", &context).expect("context")
        );
        assert_eq!(held(), 0);
        context.arguments = None;
        let plain = cedar_context("example.org", &context).expect("context");
        assert_ne!(plain, built, "the arguments are in the context");
        assert_eq!(held(), 1);
    }

    #[test]
    fn decisions_name_policies_as_their_ids_are_written() {
        let id = r#"o'brien's "quoted" \ policy"#;
        let snapshot = Arc::new(testing::snapshot_with(
            1,
            // Debug's escapes are Cedar's: `\"` and `\\`.
            &format!("@id({id:?})\npermit(principal, action, resource);"),
        ));
        let d = evaluate(
            &snapshot,
            &testing::input(&snapshot, testing::ALICE_BOT, "GET", "/v1/admin"),
        );
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.policies, [id]);
    }

    #[test]
    fn a_cached_decision_is_identical_to_a_fresh_one() {
        let snapshot = Arc::new(testing::snapshot());
        let cache = testing::cache();
        for path in [
            "/v1/repos/tether/issues",
            "/v1/admin",
            "/v1/repos/other/issues",
        ] {
            let input = testing::input(&snapshot, testing::ALICE_BOT, "GET", path);
            let fresh = evaluate(&snapshot, &input);
            let (first, hit1) = cache.decide(&snapshot, input.clone());
            let (second, hit2) = cache.decide(&snapshot, input);
            assert!(!hit1 && hit2, "{path}: miss then hit");
            assert_eq!(*first, fresh);
            assert_eq!(*second, fresh);
        }
    }

    #[test]
    fn entries_live_at_most_their_ttl_and_equal_decisions_are_shared() {
        let snapshot = Arc::new(testing::snapshot());
        let counter = |n: &str| prometheus::IntCounter::new(n, n).expect("counter");
        let input = |path: &str| testing::input(&snapshot, testing::ALICE_BOT, "GET", path);
        let expired = DecisionCache::new(10, Duration::ZERO, counter("h"), counter("m"));
        let (first, hit) = expired.decide(&snapshot, input("/v1/repos/tether/issues"));
        assert!(first.allowed && !hit);
        let (again, hit) = expired.decide(&snapshot, input("/v1/repos/tether/issues"));
        assert!(!hit, "an expired entry is decided afresh");
        assert_eq!(again, first);

        let cache = DecisionCache::new(10, Duration::from_secs(3600), counter("h"), counter("m"));
        let (one, _) = cache.decide(&snapshot, input("/v1/repos/tether/issues"));
        let (hit_again, hit) = cache.decide(&snapshot, input("/v1/repos/tether/issues"));
        assert!(hit && Arc::ptr_eq(&one, &hit_again));
        // Another resource, the same verdict by the same policy: one copy.
        let (other, hit) = cache.decide(&snapshot, input("/v1/repos/other/issues"));
        assert!(!hit && Arc::ptr_eq(&one, &other), "{one:?} {other:?}");
        assert_eq!(cache.entry_count(), 2);
    }

    #[test]
    fn a_new_generation_never_hits_old_decisions() {
        let old = Arc::new(testing::snapshot());
        let cache = testing::cache();
        let input = testing::input(&old, testing::ALICE_BOT, "GET", "/v1/admin");
        let (denied, _) = cache.decide(&old, input);
        assert!(!denied.allowed);

        // The next generation drops the forbid: the cache must not answer
        // with the old denial.
        let new = Arc::new(testing::snapshot_with(
            old.generation + 1,
            "@id(\"admin\") permit(principal, action == Action::\"Admin\", resource);",
        ));
        let input = testing::input(&new, testing::ALICE_BOT, "GET", "/v1/admin");
        let (allowed, hit) = cache.decide(&new, input);
        assert!(!hit);
        assert!(allowed.allowed);
    }

    #[test]
    fn shadow_policies_are_recorded_and_counted_but_never_enforced() {
        let snapshot = Arc::new(testing::world(
            1,
            testing::POLICIES,
            Some("@id(\"lockdown\") forbid(principal, action, resource);"),
            "platform",
        ));
        let counter = prometheus::IntCounter::new("d", "d").expect("counter");
        let filter = Authorize::new(Arc::new(testing::cache()), counter.clone());
        let mut ctx = testing::ctx_for(testing::ALICE_BOT, "GET", "/v1/repos/tether/issues");
        ctx.snapshot = snapshot;
        filter
            .apply(&mut testing::get("/v1/repos/tether/issues"), &mut ctx)
            .expect("the enforced set allows it");
        let d = ctx.decision.expect("decision");
        assert_eq!(
            d.shadow,
            Some(ShadowDecision {
                allowed: false,
                policies: vec!["lockdown".into()]
            })
        );
        assert_eq!(counter.get(), 1);
    }

    /// A config for ALICE_BOT alone with `routes` (YAML list items).
    fn config_with_routes(routes: &str) -> tether_config::Config {
        let yaml = format!(
            "listener: {{address: '127.0.0.1:0', tls: {{cert: c, key: k}}}}\n\
             trust_domains: [{{name: example.org, bundle: b}}]\n\
             upstream: {{address: '127.0.0.1:1'}}\n\
             registry: {{agents: [{{id: '{}', owner: a, team: t, expires: '2999-01-01'}}]}}\n\
             policy: {{schema: s, policies: p}}\n\
             routes:\n{routes}",
            testing::ALICE_BOT
        );
        tether_config::Config::from_yaml(&yaml, Path::new("t.yaml")).expect("config")
    }

    #[test]
    fn route_attributes_reach_policy_and_are_checked_against_the_schema() {
        let schema = "entity Agent { owner: String, team: String };\n\
                      entity Doc { visibility: String };\n\
                      action Read appliesTo { principal: [Agent], resource: [Doc] };";
        let config = |attributes: &str| {
            config_with_routes(&format!(
                "- {{method: GET, path: '/public/{{doc}}', action: Read, resource: {{type: Doc, id: '{{doc}}', attributes: {attributes}}}}}\n\
                 - {{method: GET, path: '/private/{{doc}}', action: Read, resource: {{type: Doc, id: '{{doc}}', attributes: {{visibility: private}}}}}}\n"
            ))
        };
        let build = |config: &tether_config::Config| {
            Snapshot::build(
                config,
                Path::new("t.yaml"),
                1,
                &source("s.cedarschema", schema),
                &[source(
                    "p.cedar",
                    "@id(\"public-docs\") permit(principal, action, resource) when { resource.visibility == \"public\" };",
                )],
                None,
            )
        };
        let snapshot = Arc::new(build(&config("{visibility: public}")).expect("valid"));
        let public = testing::input(&snapshot, testing::ALICE_BOT, "GET", "/public/readme");
        let private = testing::input(&snapshot, testing::ALICE_BOT, "GET", "/private/readme");
        // Same resource uid, different routes: different inputs, different answers.
        assert_eq!(public.route.resource, private.route.resource);
        assert!(evaluate(&snapshot, &public).allowed);
        assert!(!evaluate(&snapshot, &private).allowed);
        let cache = testing::cache();
        assert!(cache.decide(&snapshot, public).0.allowed);
        assert!(!cache.decide(&snapshot, private).0.allowed);

        let errors = build(&config("{visibility: 3}")).err().expect("refused").0;
        assert_eq!(errors[0].field, "routes[0].action");
        assert!(
            errors[0].message.contains("resource attributes do not fit"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn a_route_with_resource_attributes_keeps_the_action_groups() {
        // A `forbid` on an action group must hold on a route that builds
        // its own entities for the resource's attributes: without the
        // schema's actions among them, `action in Action::"Write"` is
        // false and the forbid never fires.
        let schema = "entity Agent { owner: String, team: String };\n\
                      entity Repo { protected: Bool };\n\
                      action Write;\n\
                      action Delete in [Write] appliesTo { principal: [Agent], resource: [Repo] };";
        let config = config_with_routes(
            "- {method: DELETE, path: '/prod/{r}', action: Delete, resource: {type: Repo, id: '{r}', attributes: {protected: true}}}\n\
             - {method: DELETE, path: '/dev/{r}', action: Delete, resource: {type: Repo, id: '{r}', attributes: {protected: false}}}\n",
        );
        let policies = "@id(\"all\") permit(principal, action, resource);\n\
                        @id(\"no-protected-writes\") forbid(principal, action in Action::\"Write\", resource) \
                        when { resource.protected };";
        let snapshot = Arc::new(
            Snapshot::build(
                &config,
                Path::new("t.yaml"),
                1,
                &source("s.cedarschema", schema),
                &[source("p.cedar", policies)],
                None,
            )
            .expect("valid"),
        );
        let prod = evaluate(
            &snapshot,
            &testing::input(&snapshot, testing::ALICE_BOT, "DELETE", "/prod/api"),
        );
        assert!(!prod.allowed, "{prod:?}");
        assert_eq!(prod.policies, ["no-protected-writes"]);
        let dev = evaluate(
            &snapshot,
            &testing::input(&snapshot, testing::ALICE_BOT, "DELETE", "/dev/api"),
        );
        assert!(dev.allowed, "{dev:?}");
    }

    #[test]
    fn a_policy_that_fails_to_evaluate_refuses_even_beside_a_permit() {
        // The forbid overflows (weekday is at least 1): were its error
        // ignored, the permit would let the request through.
        let snapshot = Arc::new(testing::snapshot_with(
            1,
            r#"@id("all") permit(principal, action, resource);
            @id("overflows") forbid(principal, action, resource)
            when { context.time.weekday + 9223372036854775807 > 0 };"#,
        ));
        let mut ctx = testing::ctx_in(&snapshot, testing::ALICE_BOT, "GET", "/v1/admin");
        let counter = prometheus::IntCounter::new("d", "d").expect("counter");
        let denial = Authorize::new(Arc::new(testing::cache()), counter)
            .apply(&mut testing::get("/v1/admin"), &mut ctx)
            .expect_err("refused");
        assert_eq!(denial.reason, Reason::PolicyError, "{denial:?}");
        assert!(denial.detail.contains("overflows"), "{}", denial.detail);
    }

    #[test]
    fn time_and_delegation_reach_policy_as_the_readme_says() {
        let snapshot = Arc::new(testing::snapshot_with(
            1,
            r#"permit(principal, action, resource)
            when { context.time.weekday == 2 && context.time.hour == 15
                   && context has delegation_depth && context.delegation_depth == 2
                   && context has delegation_chain
                   && context.delegation_chain.contains("spiffe://example.org/agents/planner")
                   && context has on_behalf_of && context.on_behalf_of == "alice@example.org" };"#,
        ));
        let at = |instant: &str| {
            let mut ctx = testing::ctx_in(&snapshot, testing::ALICE_BOT, "GET", "/v1/admin");
            let t = time::OffsetDateTime::parse(
                instant,
                &time::format_description::well_known::Rfc3339,
            )
            .expect("instant");
            ctx.started = std::time::SystemTime::from(t);
            if let Some(p) = ctx.principal.as_mut() {
                p.delegation = Some(Arc::new(crate::context::Delegation {
                    subject: "alice@example.org".into(),
                    actors: ["spiffe://example.org/agents/planner", testing::ALICE_BOT]
                        .map(|a| SpiffeId::parse(a).expect("id"))
                        .to_vec(),
                }));
            }
            DecisionInput::of(&ctx).expect("input")
        };
        // A Tuesday at 15:00 UTC, as an offset elsewhere writes it too.
        for instant in ["2026-12-01T15:00:00Z", "2026-12-01T16:00:00+01:00"] {
            let input = at(instant);
            assert_eq!(
                (input.context.weekday, input.context.hour),
                (2, 15),
                "{instant}"
            );
            assert!(evaluate(&snapshot, &input).allowed, "{instant}");
        }
        // Monday is 1, Sunday 7; another hour is another hour.
        for instant in [
            "2026-11-30T15:00:00Z",
            "2026-12-06T15:00:00Z",
            "2026-12-01T14:59:59Z",
        ] {
            assert!(!evaluate(&snapshot, &at(instant)).allowed, "{instant}");
        }
        assert_eq!(at("2026-12-06T12:00:00Z").context.weekday, 7);
    }

    #[test]
    fn the_filter_denies_with_the_policy_reason() {
        let mut ctx = testing::ctx_for(testing::ALICE_BOT, "GET", "/v1/admin");
        let counter = prometheus::IntCounter::new("d", "d").expect("counter");
        let denial = Authorize::new(Arc::new(testing::cache()), counter)
            .apply(&mut testing::get("/v1/admin"), &mut ctx)
            .expect_err("denied");
        assert_eq!(denial.reason, Reason::PolicyDenied);
        assert!(denial.detail.contains("no-admin"));
        assert_eq!(ctx.cache_hit, Some(false));
    }

    mod property {
        //! The cache can never answer differently from a fresh evaluation:
        //! random request sequences, with reloads of policies and registry
        //! in between, through both paths.
        use proptest::prelude::*;

        use super::*;

        const POLICY_SETS: [&str; 3] = [
            testing::POLICIES,
            "@id(\"all\") permit(principal, action, resource);",
            "@id(\"team\") permit(principal, action, resource) when { principal.team == \"platform\" };\n\
             @id(\"hours\") forbid(principal, action == Action::\"Admin\", resource) when { context.time.hour < 6 };",
        ];
        const TEAMS: [&str; 2] = ["platform", "research"];
        const AGENTS: [&str; 3] = [testing::ALICE_BOT, testing::BOB_BOT, testing::ALICE_BOT];
        const PATHS: [(&str, &str); 4] = [
            ("GET", "/v1/repos/tether/issues"),
            ("GET", "/v1/repos/public/issues"),
            ("POST", "/v1/admin"),
            ("GET", "/v1/admin"),
        ];

        #[derive(Debug, Clone)]
        enum Step {
            Request {
                agent: usize,
                path: usize,
                hour: u8,
                loopback: bool,
            },
            Reload {
                policies: usize,
                team: usize,
            },
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                4 => (0..AGENTS.len(), 0..PATHS.len(), 0u8..24, any::<bool>())
                    .prop_map(|(agent, path, hour, loopback)| Step::Request { agent, path, hour, loopback }),
                1 => (0..POLICY_SETS.len(), 0..TEAMS.len())
                    .prop_map(|(policies, team)| Step::Reload { policies, team }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            #[test]
            fn cached_and_fresh_decisions_always_agree(steps in prop::collection::vec(step(), 1..60)) {
                let cache = testing::cache();
                let mut generation = 1;
                let mut snapshot = Arc::new(testing::world(generation, POLICY_SETS[0], None, TEAMS[0]));
                for step in steps {
                    match step {
                        Step::Reload { policies, team } => {
                            generation += 1;
                            snapshot = Arc::new(testing::world(generation, POLICY_SETS[policies], None, TEAMS[team]));
                        }
                        Step::Request { agent, path, hour, loopback } => {
                            let (method, path) = PATHS[path];
                            let mut input = testing::input(&snapshot, AGENTS[agent], method, path);
                            input.context.hour = hour;
                            input.context.source_ip =
                                Some(if loopback { "127.0.0.1" } else { "10.0.0.1" }.parse().expect("ip"));
                            let fresh = evaluate(&snapshot, &input);
                            let (cached, _) = cache.decide(&snapshot, input);
                            prop_assert_eq!(&*cached, &fresh);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn line_columns_count_from_one() {
        assert_eq!(line_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
    }
}
