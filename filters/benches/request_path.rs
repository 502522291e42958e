//! Micro-benchmarks of the request path, without network: the whole filter
//! chain, a decision-cache hit, uncached Cedar evaluation as the policy set
//! grows, and SPIFFE ID extraction from an X.509-SVID.
//!
//! Everything is generated here at bench time from the crate's public API;
//! `filters/benches/README.md` has the command and the last numbers.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use pingora_http::RequestHeader;
use tether_config::Config;
use tether_filters::authorize::{evaluate, Authorize, DecisionCache, DecisionInput, PolicySource};
use tether_filters::credentials::Credentials;
use tether_filters::identity::jwks::{KeySet, KeySource};
use tether_filters::identity::jwt::TokenVerifier;
use tether_filters::identity::mint::Minter;
use tether_filters::identity::pki::Pki;
use tether_filters::identity::{Identity, PeerIdentity};
use tether_filters::lifecycle::Lifecycle;
use tether_filters::mcp::Mcp;
use tether_filters::record::Metrics;
use tether_filters::route::Routing;
use tether_filters::sanitize::Sanitize;
use tether_filters::{Chain, Filter, Progress, RequestCtx, Snapshot};

const TRUST_DOMAIN: &str = "example.org";
const CONFIG_PATH: &str = "bench.yaml";

/// Policies in the world the chain and cache benches run in; on a cache
/// hit their number does not matter.
const CHAIN_WORLD_POLICIES: usize = 100;

/// Guardrails that apply whoever sends the request, as real policy sets
/// have beside their per-agent permits.
const GUARDRAILS: &str = r#"
@id("no-writes-to-frozen-repos")
forbid(principal, action == Action::"WriteIssues", resource == Repo::"frozen");
@id("no-contractor-writes")
forbid(principal, action == Action::"WriteIssues", resource) when { principal.team == "contractors" };
"#;
const GUARDRAIL_COUNT: usize = 2;

const SCHEMA: &str = r#"
entity Agent { owner: String, team: String };
entity Repo;
type Ctx = {
  identity_kind: String,
  trust_domain: String,
  source_ip?: ipaddr,
  time: { weekday: Long, hour: Long },
};
action ReadIssues, WriteIssues appliesTo { principal: [Agent], resource: [Repo], context: Ctx };
"#;

/// The request every bench sends: the route `ReadIssues` on `Repo::"tether"`.
const REQUEST_PATH: &str = "/v1/repos/tether/issues";

fn agent_id(n: usize) -> String {
    format!("spiffe://{TRUST_DOMAIN}/agents/agent-{n}")
}

/// The `@id` of agent `n`'s permit.
fn permit_id(n: usize) -> String {
    format!("agent-{n}-access")
}

/// A deployment with one agent per permit: `policy_count` policies in all,
/// the guardrails included.
struct World {
    snapshot: Arc<Snapshot>,
    config: Config,
    /// The verified SVID of the agent that sends the benchmark request:
    /// the last agent, whose permit is the last policy written.
    caller_svid: Arc<PeerIdentity>,
    /// The `@id` of the one policy that permits the request.
    caller_permit: String,
}

impl World {
    fn new(policy_count: usize) -> World {
        assert!(policy_count > GUARDRAIL_COUNT, "room for the guardrails");
        let agents = policy_count - GUARDRAIL_COUNT;
        let config = Config::from_yaml(&config_yaml(agents), Path::new(CONFIG_PATH))
            .expect("generated config parses");
        let source = |name: &str, text: String| PolicySource {
            path: PathBuf::from(name),
            text,
        };
        let snapshot = Snapshot::build(
            &config,
            Path::new(CONFIG_PATH),
            1,
            &source("bench.cedarschema", SCHEMA.to_string()),
            &[source("bench.cedar", policies(agents))],
            None,
        )
        .expect("generated snapshot builds");
        assert_eq!(snapshot.policy.set.policies().count(), policy_count);
        let caller = agents - 1;
        let caller_svid = PeerIdentity::from_leaf_der(&svid_der(&agent_id(caller)))
            .expect("the caller's SVID is valid");
        World {
            snapshot: Arc::new(snapshot),
            config,
            caller_svid: Arc::new(caller_svid),
            caller_permit: permit_id(caller),
        }
    }

    /// A new request from the caller, as the TLS handshake hands it to the
    /// chain: the verified peer set, nothing else decided.
    fn request(&self) -> (RequestHeader, RequestCtx) {
        let mut req =
            RequestHeader::build("GET", REQUEST_PATH.as_bytes(), None).expect("request builds");
        for (name, value) in [
            ("host", "api.example.org"),
            ("user-agent", "triage-bot/1.4"),
            ("accept", "application/json"),
        ] {
            req.insert_header(name, value).expect("header is valid");
        }
        let mut ctx = RequestCtx::new(self.snapshot.clone());
        ctx.client_addr = Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
        ctx.peer = Some(self.caller_svid.clone());
        (req, ctx)
    }

    /// The stages of the proxy's `chain()` (proxy/src/app.rs) before
    /// authorize, in its order: keep the two in step.
    fn stages_before_authorize(&self) -> Vec<Box<dyn Filter>> {
        // No token issuers are configured: callers prove who they are with
        // their SVID alone. Token verification has its own benchmark.
        let tokens = Arc::new(TokenVerifier::new(&self.config.tokens, Vec::new()));
        vec![
            Box::new(Sanitize),
            Box::new(Identity::new(tokens)),
            Box::new(Lifecycle),
            Box::new(Routing),
            Box::new(Mcp),
        ]
    }

    /// The proxy's whole chain, deciding through `cache`.
    fn chain(&self, cache: Arc<DecisionCache>, metrics: &Metrics) -> Chain {
        let mut stages = self.stages_before_authorize();
        stages.push(Box::new(Authorize::new(
            cache,
            metrics.shadow_disagreements.clone(),
        )));
        stages.push(Box::new(Credentials));
        Chain::new(stages)
    }

    /// The request's decision input, derived by the real stages before
    /// authorize rather than assembled by hand.
    fn decision_input(&self) -> DecisionInput {
        let (mut req, mut ctx) = self.request();
        Chain::new(self.stages_before_authorize())
            .run(&mut req, &mut ctx)
            .expect("the request passes the stages before authorize");
        DecisionInput::of(&ctx).expect("identity, lifecycle and route have run")
    }

    /// A decision cache sized as the config says, as the proxy builds it.
    fn cache(&self, metrics: &Metrics) -> Arc<DecisionCache> {
        Arc::new(DecisionCache::new(
            self.config.cache.max_entries,
            Duration::from_secs(self.config.cache.ttl_seconds),
            metrics.cache_hits.clone(),
            metrics.cache_misses.clone(),
        ))
    }
}

fn config_yaml(agents: usize) -> String {
    let mut yaml = format!(
        r#"
listener: {{address: "127.0.0.1:0", tls: {{cert: c, key: k}}}}
trust_domains: [{{name: {TRUST_DOMAIN}, bundle: b}}]
upstream: {{address: "127.0.0.1:1"}}
policy: {{schema: s, policies: p}}
routes:
  - {{method: GET, path: "/v1/repos/{{repo}}/issues", action: ReadIssues, resource: {{type: Repo, id: "{{repo}}"}}}}
  - {{method: POST, path: "/v1/repos/{{repo}}/issues", action: WriteIssues, resource: {{type: Repo, id: "{{repo}}"}}}}
registry:
  agents:
"#
    );
    for n in 0..agents {
        yaml.push_str(&format!(
            "    - {{id: \"{}\", owner: owner-{n}@example.com, team: team-{}, expires: \"2999-01-01\"}}\n",
            agent_id(n),
            n % 20,
        ));
    }
    yaml
}

/// The guardrails and one permit per agent. Most agents may read issues;
/// every tenth may read and write in working hours only, and every tenth
/// read only while on its team: a mix of plain scopes and `when` clauses.
fn policies(agents: usize) -> String {
    let mut text = GUARDRAILS.to_string();
    for n in 0..agents {
        let agent = agent_id(n);
        let policy = match n % 10 {
            3 => format!(
                "permit(principal == Agent::\"{agent}\", action in [Action::\"ReadIssues\", Action::\"WriteIssues\"], resource)\n  \
                 when {{ context.time.hour >= 8 && context.time.hour < 18 && context.time.weekday <= 5 }};"
            ),
            7 => format!(
                "permit(principal == Agent::\"{agent}\", action == Action::\"ReadIssues\", resource)\n  \
                 when {{ principal.team == \"team-{}\" && context.trust_domain == \"{TRUST_DOMAIN}\" }};",
                n % 20
            ),
            _ => format!(
                "permit(principal == Agent::\"{agent}\", action == Action::\"ReadIssues\", resource);"
            ),
        };
        text.push_str(&format!("@id(\"{}\")\n{policy}\n", permit_id(n)));
    }
    text
}

/// An X.509-SVID for `spiffe_id`, DER, from a fresh test CA.
fn svid_der(spiffe_id: &str) -> Vec<u8> {
    let ca = Pki::new(TRUST_DOMAIN).expect("test CA");
    let svid = ca.leaf(&[spiffe_id]).expect("SVID issues");
    svid.der().to_vec()
}

fn metrics() -> Metrics {
    Metrics::new().expect("metrics register")
}

/// One allowed request through every stage, its decision already cached.
/// Building the request and context is left out; dropping them too.
fn whole_chain_on_cache_hit(c: &mut Criterion) {
    let world = World::new(CHAIN_WORLD_POLICIES);
    let metrics = metrics();
    let chain = world.chain(world.cache(&metrics), &metrics);
    let (mut req, mut ctx) = world.request();
    assert_eq!(chain.run(&mut req, &mut ctx), Ok(Progress::Done));
    let (mut req, mut ctx) = world.request();
    assert_eq!(chain.run(&mut req, &mut ctx), Ok(Progress::Done));
    assert_eq!(ctx.cache_hit, Some(true), "the second request is a hit");

    c.bench_function("chain/allowed_cache_hit", |b| {
        b.iter_batched(
            || world.request(),
            |(mut req, mut ctx)| {
                let progress = chain.run(&mut req, &mut ctx);
                black_box(progress).expect("allowed");
                (req, ctx)
            },
            BatchSize::SmallInput,
        )
    });
}

/// `DecisionCache::decide` for an input already cached. The input is cloned
/// outside the timing: the authorize stage builds it fresh anyway.
fn decision_cache_hit(c: &mut Criterion) {
    let world = World::new(CHAIN_WORLD_POLICIES);
    let cache = world.cache(&metrics());
    let input = world.decision_input();
    cache.decide(&world.snapshot, input.clone());
    let (decision, hit) = cache.decide(&world.snapshot, input.clone());
    assert!(hit && decision.allowed, "cached and allowed");

    c.bench_function("decision_cache/hit", |b| {
        b.iter_batched(
            || input.clone(),
            |input| black_box(cache.decide(&world.snapshot, input)),
            BatchSize::SmallInput,
        )
    });
}

/// `authorize::evaluate`, uncached, as the policy set grows. The request is
/// permitted by exactly one policy, the last agent's.
fn cedar_evaluation_by_policy_count(c: &mut Criterion) {
    let mut group = c.benchmark_group("cedar_evaluate");
    for policy_count in [10, 100, 1_000, 10_000] {
        let world = World::new(policy_count);
        let input = world.decision_input();
        let decision = evaluate(&world.snapshot, &input);
        assert!(decision.allowed, "{decision:?}");
        assert_eq!(decision.policies, [world.caller_permit.as_str()]);

        group.bench_with_input(
            BenchmarkId::from_parameter(policy_count),
            &input,
            |b, input| b.iter(|| evaluate(&world.snapshot, black_box(input))),
        );
    }
    group.finish();
}

/// `PeerIdentity::from_leaf_der` on an X.509-SVID: what the TLS layer does
/// once per connection.
fn svid_spiffe_id_extraction(c: &mut Criterion) {
    let caller = agent_id(0);
    let svid = svid_der(&caller);
    let peer = PeerIdentity::from_leaf_der(&svid).expect("a valid SVID");
    assert_eq!(peer.id.as_str(), caller);

    c.bench_function("svid/spiffe_id_from_der", |b| {
        b.iter(|| PeerIdentity::from_leaf_der(black_box(&svid)))
    });
}

/// `TokenVerifier::verify` of a JWT-SVID (ES256, key from a JWK set): what
/// the identity stage does per request that carries a bearer token.
fn jwt_svid_verification(c: &mut Criterion) {
    let key = Minter::es256("k1").expect("key");
    let set = KeySet::parse(Minter::jwks(&[&key]).as_bytes()).expect("key set");
    let tokens: tether_config::Tokens = serde_norway::from_str(
        r#"
issuers:
  - kind: jwt_svid
    issuer: https://spire.example.org
    audiences: [tether]
    jwks: {file: jwks.json}
    algorithms: [ES256]
    trust_domain: example.org
"#,
    )
    .expect("tokens config");
    let verifier = TokenVerifier::new(&tokens, vec![Arc::new(KeySource::file("bench", set))]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let token_for = |jti: u64| {
        key.token(&serde_json::json!({
            "iss": "https://spire.example.org", "aud": "tether", "sub": agent_id(0),
            "iat": now, "exp": now + 3600, "jti": jti,
        }))
    };
    let token = token_for(0);
    let verified = verifier
        .verify(&token, now, Instant::now())
        .expect("a valid token");
    assert_eq!(verified.agent.as_str(), agent_id(0));

    // A token seen for the first time: signature and every claim checked.
    let mut jti = 0;
    c.bench_function("jwt/verify_es256_first_use", |b| {
        b.iter_batched(
            || {
                jti += 1;
                token_for(jti)
            },
            |token| verifier.verify(black_box(&token), now, Instant::now()),
            BatchSize::SmallInput,
        )
    });
    // The same token again: remembered, only time and keys re-checked.
    c.bench_function("jwt/verify_remembered", |b| {
        b.iter(|| verifier.verify(black_box(&token), now, Instant::now()))
    });
}

criterion_group!(
    benches,
    whole_chain_on_cache_hit,
    decision_cache_hit,
    cedar_evaluation_by_policy_count,
    svid_spiffe_id_extraction,
    jwt_svid_verification,
);
criterion_main!(benches);
