//! Micro-benchmarks of the request path, without network: the whole filter
//! chain, a decision-cache hit, a request's audit line, uncached Cedar evaluation as the policy set
//! grows, and SPIFFE ID extraction from an X.509-SVID.
//!
//! Everything is generated here at bench time from the crate's public API;
//! `filters/benches/README.md` has the command and the last numbers.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use tether_filters::authorize::evaluate;
use tether_filters::identity::jwks::{KeySet, KeySource};
use tether_filters::identity::jwt::TokenVerifier;
use tether_filters::identity::PeerIdentity;
use tether_filters::record::{AuditRecord, Metrics};
use tether_filters::{Progress, Reason};
use tether_testkit::mint::Minter;

mod world;

use world::*;

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

/// The audit line of an allowed request: the record built from the
/// request's context and written as JSON into a reused buffer, as the
/// audit sink writes it.
fn audit_line(c: &mut Criterion) {
    let world = World::new(CHAIN_WORLD_POLICIES);
    let metrics = metrics();
    let chain = world.chain(world.cache(&metrics), &metrics);
    let (mut req, mut ctx) = world.request();
    assert_eq!(chain.run(&mut req, &mut ctx), Ok(Progress::Done));
    let mut line = Vec::with_capacity(4096);
    let write_line = |line: &mut Vec<u8>| {
        line.clear();
        let record = AuditRecord::new(&ctx, "GET", Reason::Allowed, 200, None);
        serde_json::to_writer(&mut *line, &record).expect("json");
        line.len()
    };
    write_line(&mut line);
    let text = String::from_utf8_lossy(&line);
    assert!(
        text.contains(r#""action":"Action::\"ReadIssues\"","resource":"Repo::\"tether\"""#),
        "{text}"
    );

    c.bench_function("record/audit_line", |b| {
        b.iter(|| black_box(write_line(&mut line)))
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
    audit_line,
    cedar_evaluation_by_policy_count,
    svid_spiffe_id_extraction,
    jwt_svid_verification,
);
criterion_main!(benches);
