//! Fixtures shared by the stages' unit tests: one small world of agents,
//! routes and policies.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pingora_http::RequestHeader;
use tether_config::spiffe::SpiffeId;
use tether_config::Config;

use crate::authorize::{DecisionCache, PolicySource};
use crate::identity::PeerIdentity;
use crate::{IdentityKind, Principal, RequestCtx, Snapshot};

pub const ALICE_BOT: &str = "spiffe://example.org/agents/triage";
pub const BOB_BOT: &str = "spiffe://example.org/agents/research";
pub const EXPIRED_BOT: &str = "spiffe://example.org/agents/old";
pub const SUSPENDED_BOT: &str = "spiffe://example.org/agents/paused";
pub const OFFBOARDED_BOT: &str = "spiffe://example.org/agents/gone";

pub const SCHEMA: &str = r#"
entity Agent { owner: String, team: String };
entity Repo, Api;
type Ctx = {
  identity_kind: String,
  trust_domain: String,
  source_ip?: ipaddr,
  time: { weekday: Long, hour: Long },
  on_behalf_of?: String,
  delegation_chain?: Set<String>,
  delegation_depth?: Long,
};
action ListIssues appliesTo { principal: [Agent], resource: [Repo], context: Ctx };
action Admin appliesTo { principal: [Agent], resource: [Api], context: Ctx };
"#;

pub const POLICIES: &str = r#"
@id("read-repos")
permit(principal, action == Action::"ListIssues", resource) when { principal.team == "platform" };
@id("public-repos")
permit(principal, action == Action::"ListIssues", resource == Repo::"public");
@id("no-admin")
forbid(principal, action == Action::"Admin", resource);
"#;

const CONFIG: &str = r#"
listener: {address: "127.0.0.1:0", tls: {cert: c, key: k}}
trust_domains: [{name: example.org, bundle: b}]
upstream: {address: "127.0.0.1:1"}
registry:
  agents:
    - {id: "spiffe://example.org/agents/triage", owner: alice@example.com, team: ALICE_TEAM, expires: "2999-01-01"}
    - {id: "spiffe://example.org/agents/research", owner: bob@example.com, team: research, expires: "2999-01-01"}
    - {id: "spiffe://example.org/agents/old", owner: carol@example.com, expires: "2020-01-01"}
    - {id: "spiffe://example.org/agents/paused", owner: dan@example.com, expires: "2999-01-01", state: suspended}
    - {id: "spiffe://example.org/agents/gone", owner: erin@example.com, expires: "2999-01-01", state: offboarded}
policy: {schema: s, policies: p}
routes:
  - {method: GET, path: "/v1/repos/{repo}/issues", action: ListIssues, resource: {type: Repo, id: "{repo}"}}
  - {method: "*", path: /v1/admin, action: Admin, resource: {type: Api, id: admin}}
"#;

pub fn snapshot() -> Snapshot {
    snapshot_with(1, POLICIES)
}

pub fn snapshot_with(generation: u64, policies: &str) -> Snapshot {
    world(generation, policies, None, "platform")
}

/// The test world's config.
pub fn config() -> Config {
    config_with("platform")
}

fn config_with(alice_team: &str) -> Config {
    Config::from_yaml(
        &CONFIG.replace("ALICE_TEAM", alice_team),
        Path::new("test.yaml"),
    )
    .expect("test config")
}

/// A snapshot of the test world: `policies` enforced, `shadow` beside
/// them, and Alice's bot in `alice_team`.
pub fn world(generation: u64, policies: &str, shadow: Option<&str>, alice_team: &str) -> Snapshot {
    let config = config_with(alice_team);
    let source = |name: &str, text: &str| PolicySource {
        path: PathBuf::from(name),
        text: text.to_string(),
    };
    let shadow = shadow.map(|text| vec![source("shadow.cedar", text)]);
    Snapshot::build(
        &config,
        Path::new("test.yaml"),
        generation,
        &source("test.cedarschema", SCHEMA),
        &[source("test.cedar", policies)],
        shadow.as_deref(),
    )
    .expect("test snapshot")
}

pub fn ctx() -> RequestCtx {
    RequestCtx::new(Arc::new(snapshot()))
}

/// A context as the stages before authorize leave it.
pub fn ctx_for(agent: &str, method: &str, path: &str) -> RequestCtx {
    ctx_in(&Arc::new(snapshot()), agent, method, path)
}

/// [`ctx_for`] under `snapshot`.
pub fn ctx_in(snapshot: &Arc<Snapshot>, agent: &str, method: &str, path: &str) -> RequestCtx {
    let mut ctx = RequestCtx::new(snapshot.clone());
    ctx.path = path.into();
    ctx.principal = Some(Principal {
        id: SpiffeId::parse(agent).expect("id"),
        kind: IdentityKind::X509Svid,
        delegation: None,
    });
    ctx.agent = snapshot.registry.get(agent).cloned();
    ctx.route = snapshot.routes.find(method, path);
    ctx
}

pub fn get(path: &str) -> RequestHeader {
    RequestHeader::build("GET", path.as_bytes(), None).expect("request")
}

pub fn peer(id: &str) -> PeerIdentity {
    PeerIdentity {
        id: SpiffeId::parse(id).expect("id"),
        // Valid for as long as any test runs: 9999-12-31.
        not_after: 253_402_300_799,
        cert_sha256: [0; 32],
    }
}

/// The identity stage (its token issuers are the snapshot's: none).
pub fn identity() -> crate::identity::Identity {
    crate::identity::Identity::new(false)
}

/// The decision input of a request by `agent` for `method path`.
pub fn input(
    snapshot: &Arc<Snapshot>,
    agent: &str,
    method: &str,
    path: &str,
) -> crate::authorize::DecisionInput {
    crate::authorize::DecisionInput::of(&ctx_in(snapshot, agent, method, path)).expect("input")
}

pub fn cache() -> DecisionCache {
    let counter = |n: &str| prometheus::IntCounter::new(n, n).expect("counter");
    DecisionCache::new(1000, Duration::from_secs(60), counter("h"), counter("m"))
}
