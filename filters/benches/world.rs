//! The world the benches (and `tests/cache_memory.rs`) run in: a
//! deployment of agents, one permit each, generated from the crate's
//! public API. Each includer uses part of it.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pingora_http::RequestHeader;
use tether_config::Config;
use tether_filters::authorize::{Authorize, DecisionCache, DecisionInput, PolicySource};
use tether_filters::credentials::Credentials;
use tether_filters::identity::pki::Pki;
use tether_filters::identity::{Identity, PeerIdentity};
use tether_filters::lifecycle::Lifecycle;
use tether_filters::mcp::Mcp;
use tether_filters::method_override::MethodOverride;
use tether_filters::record::Metrics;
use tether_filters::route::Routing;
use tether_filters::sanitize::Sanitize;
use tether_filters::upstream::{SelectUpstream, UpstreamTable};
use tether_filters::{Chain, Filter, RequestCtx, Snapshot};

pub const TRUST_DOMAIN: &str = "example.org";
pub const CONFIG_PATH: &str = "bench.yaml";

/// Policies in the world the chain and cache benches run in; on a cache
/// hit their number does not matter.
pub const CHAIN_WORLD_POLICIES: usize = 100;

/// Guardrails that apply whoever sends the request, as real policy sets
/// have beside their per-agent permits.
pub const GUARDRAILS: &str = r#"
@id("no-writes-to-frozen-repos")
forbid(principal, action == Action::"WriteIssues", resource == Repo::"frozen");
@id("no-contractor-writes")
forbid(principal, action == Action::"WriteIssues", resource) when { principal.team == "contractors" };
"#;
pub const GUARDRAIL_COUNT: usize = 2;

pub const SCHEMA: &str = r#"
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
pub const REQUEST_PATH: &str = "/v1/repos/tether/issues";

pub fn agent_id(n: usize) -> String {
    format!("spiffe://{TRUST_DOMAIN}/agents/agent-{n}")
}

/// The `@id` of agent `n`'s permit.
pub fn permit_id(n: usize) -> String {
    format!("agent-{n}-access")
}

/// A deployment with one agent per permit: `policy_count` policies in all,
/// the guardrails included.
pub struct World {
    pub snapshot: Arc<Snapshot>,
    pub config: Config,
    /// The verified SVID of the agent that sends the benchmark request:
    /// the last agent, whose permit is the last policy written.
    pub caller_svid: Arc<PeerIdentity>,
    /// The `@id` of the one policy that permits the request.
    pub caller_permit: String,
}

impl World {
    pub fn new(policy_count: usize) -> World {
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
    pub fn request(&self) -> (RequestHeader, RequestCtx) {
        self.request_to(REQUEST_PATH)
    }

    /// [`Self::request`] for `GET path`.
    pub fn request_to(&self, path: &str) -> (RequestHeader, RequestCtx) {
        let mut req = RequestHeader::build("GET", path.as_bytes(), None).expect("request builds");
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
    pub fn stages_before_authorize(&self) -> Vec<Box<dyn Filter>> {
        // No token issuers are configured (the snapshot has none):
        // callers prove who they are with their SVID alone. Token
        // verification has its own benchmark.
        vec![
            Box::new(Sanitize),
            Box::new(Identity::new(false)),
            Box::new(Lifecycle),
            Box::new(Routing),
            Box::new(Mcp),
            Box::new(MethodOverride),
        ]
    }

    /// The proxy's whole chain, deciding through `cache`.
    pub fn chain(&self, cache: Arc<DecisionCache>, metrics: &Metrics) -> Chain {
        Chain::new(self.stages(cache, metrics))
    }

    /// The stages of [`Self::chain`], in its order.
    pub fn stages(&self, cache: Arc<DecisionCache>, metrics: &Metrics) -> Vec<Box<dyn Filter>> {
        let mut stages = self.stages_before_authorize();
        stages.push(Box::new(Authorize::new(
            cache,
            metrics.shadow_disagreements.clone(),
        )));
        stages.push(Box::new(SelectUpstream::new(Arc::new(UpstreamTable::new(
            &self.config,
        )))));
        stages.push(Box::new(Credentials));
        stages
    }

    /// The request's decision input, derived by the real stages before
    /// authorize rather than assembled by hand.
    pub fn decision_input(&self) -> DecisionInput {
        self.decision_input_to(REQUEST_PATH)
    }

    /// [`Self::decision_input`] for `GET path`.
    pub fn decision_input_to(&self, path: &str) -> DecisionInput {
        let (mut req, mut ctx) = self.request_to(path);
        Chain::new(self.stages_before_authorize())
            .run(&mut req, &mut ctx)
            .expect("the request passes the stages before authorize");
        DecisionInput::of(&ctx).expect("identity, lifecycle and route have run")
    }

    /// A decision cache sized as the config says, as the proxy builds it.
    pub fn cache(&self, metrics: &Metrics) -> Arc<DecisionCache> {
        Arc::new(DecisionCache::new(
            self.config.cache.max_entries,
            Duration::from_secs(self.config.cache.ttl_seconds),
            metrics.cache_hits.clone(),
            metrics.cache_misses.clone(),
        ))
    }
}

pub fn config_yaml(agents: usize) -> String {
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
pub fn policies(agents: usize) -> String {
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
pub fn svid_der(spiffe_id: &str) -> Vec<u8> {
    let ca = Pki::new(TRUST_DOMAIN).expect("test CA");
    let svid = ca.leaf(&[spiffe_id]).expect("SVID issues");
    svid.der().to_vec()
}
