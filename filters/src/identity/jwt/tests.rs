//! Every refusal of RFC 8725 validation, with its reason code, on keys and
//! tokens generated here.

use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rsa::pkcs8::EncodePrivateKey;
use serde_json::{json, Value};
use tether_config::{JwksSource, TokenIssuer, TokenKind, Tokens};
use tether_testkit::mint::{self, Minter};

use super::*;
use crate::identity::jwks::{KeySet, KeySource};

const ISS: &str = "https://issuer.example.org";
const AUD: &str = "tether";
const AGENT: &str = "spiffe://example.org/agents/triage";

/// One RSA key for the whole file: generating one takes a while.
fn rsa() -> &'static Minter {
    static KEY: OnceLock<Minter> = OnceLock::new();
    KEY.get_or_init(|| {
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("RSA key");
        let der = key.to_pkcs8_der().expect("PKCS#8");
        Minter::rs256("rsa-1", der.as_bytes()).expect("minter")
    })
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn issuer(kind: TokenKind, trust_domain: Option<&str>) -> TokenIssuer {
    TokenIssuer {
        kind,
        issuer: ISS.into(),
        audiences: vec![AUD.into()],
        jwks: JwksSource {
            file: None,
            url: None,
            ca: None,
            refresh_seconds: 300,
            max_age_seconds: 3600,
            min_refetch_interval_ms: 1000,
        },
        algorithms: vec![
            tether_config::JwtAlgorithm::RS256,
            tether_config::JwtAlgorithm::ES256,
        ],
        agent_claim: "sub".into(),
        trust_domain: trust_domain.map(Into::into),
        agent_prefix: None,
    }
}

/// A verifier of one issuer of `kind` whose key set holds `minters`.
fn verifier_of(issuer: TokenIssuer, minters: &[&Minter]) -> TokenVerifier {
    let set = KeySet::parse(Minter::jwks(minters).as_bytes()).expect("key set");
    let config = Tokens {
        issuers: vec![issuer],
        max_delegation_depth: 2,
        ..Tokens::default()
    };
    TokenVerifier::new(&config, vec![Arc::new(KeySource::file("test", set))])
}

fn verifier() -> TokenVerifier {
    verifier_of(issuer(TokenKind::JwtSvid, Some("example.org")), &[rsa()])
}

fn claims() -> Value {
    json!({"iss": ISS, "aud": AUD, "sub": AGENT, "iat": now() - 10, "exp": now() + 300})
}

fn with(mut claims: Value, changes: Value) -> Value {
    for (k, v) in changes.as_object().expect("object") {
        if v.is_null() {
            claims.as_object_mut().expect("object").remove(k);
        } else {
            claims[k] = v.clone();
        }
    }
    claims
}

fn check(v: &TokenVerifier, token: &str) -> Result<VerifiedToken, Reason> {
    v.verify(token, now(), Instant::now()).map_err(|d| d.reason)
}

#[test]
fn a_valid_jwt_svid_names_its_agent() {
    let token = check(&verifier(), &rsa().token(&claims())).expect("valid");
    assert_eq!(token.agent.as_str(), AGENT);
    assert_eq!(token.kind, TokenKind::JwtSvid);
    assert!(token.delegation.is_none());
    // `aud` may be a list; ES256 works as well as RS256.
    let es = Minter::es256("ec-1").expect("key");
    let v = verifier_of(
        issuer(TokenKind::JwtSvid, Some("example.org")),
        &[rsa(), &es],
    );
    let listed = with(claims(), json!({"aud": ["other", AUD]}));
    check(&v, &es.token(&listed)).expect("valid");
}

#[test]
fn every_refusal_has_its_reason() {
    let v = verifier();
    let key = rsa();
    let header = json!({"alg": "RS256", "kid": "rsa-1", "typ": "JWT"});
    let other = Minter::es256("rsa-1").expect("key");
    let cases: Vec<(&str, String, Reason)> = vec![
        (
            "alg none",
            mint::unsigned(&json!({"alg": "none", "typ": "JWT"}), &claims()),
            Reason::TokenAlgorithm,
        ),
        (
            "HS256 keyed with the RSA public key",
            mint::hs256(
                &json!({"alg": "HS256", "kid": "rsa-1"}),
                &claims(),
                &key.public_key_bytes(),
            ),
            Reason::TokenAlgorithm,
        ),
        (
            "alg that does not fit the key",
            key.sign(&json!({"alg": "ES256", "kid": "rsa-1"}), &claims()),
            Reason::TokenAlgorithm,
        ),
        (
            "algorithm the issuer does not allow",
            key.sign(&json!({"alg": "PS256", "kid": "rsa-1"}), &claims()),
            Reason::TokenAlgorithm,
        ),
        (
            "unknown kid",
            key.sign(&json!({"alg": "RS256", "kid": "rsa-2"}), &claims()),
            Reason::TokenUnknownKey,
        ),
        (
            "signed by another key under the same kid",
            other.sign(&json!({"alg": "RS256", "kid": "rsa-1"}), &claims()),
            Reason::TokenSignature,
        ),
        (
            "expired",
            key.token(&with(
                claims(),
                json!({"iat": now() - 400, "exp": now() - 100}),
            )),
            Reason::TokenExpired,
        ),
        (
            "not yet valid",
            key.token(&with(claims(), json!({"nbf": now() + 100}))),
            Reason::TokenNotYetValid,
        ),
        (
            "issued in the future",
            key.token(&with(
                claims(),
                json!({"iat": now() + 100, "exp": now() + 200}),
            )),
            Reason::TokenNotYetValid,
        ),
        (
            "wrong audience",
            key.token(&with(claims(), json!({"aud": "someone-else"}))),
            Reason::TokenAudience,
        ),
        (
            "no audience",
            key.token(&with(claims(), json!({"aud": null}))),
            Reason::TokenAudience,
        ),
        (
            "wrong issuer",
            key.token(&with(claims(), json!({"iss": "https://evil.example"}))),
            Reason::TokenIssuer,
        ),
        (
            "issuer differing only in a trailing slash",
            key.token(&with(claims(), json!({"iss": format!("{ISS}/")}))),
            Reason::TokenIssuer,
        ),
        (
            "lifetime over the maximum",
            key.token(&with(
                claims(),
                json!({"iat": now() - 10, "exp": now() + 7200}),
            )),
            Reason::TokenLifetime,
        ),
        (
            "no iat",
            key.token(&with(claims(), json!({"iat": null}))),
            Reason::TokenLifetime,
        ),
        (
            "no exp",
            key.token(&with(claims(), json!({"exp": null}))),
            Reason::TokenClaims,
        ),
        (
            "oversized token",
            key.token(&with(claims(), json!({"pad": "x".repeat(9000)}))),
            Reason::TokenTooLarge,
        ),
        (
            "oversized header",
            key.sign(
                &json!({"alg": "RS256", "kid": "rsa-1", "pad": "x".repeat(2000)}),
                &claims(),
            ),
            Reason::TokenTooLarge,
        ),
        (
            "crit header",
            key.sign(
                &json!({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]}),
                &claims(),
            ),
            Reason::TokenMalformed,
        ),
        ("two parts", "abc.def".into(), Reason::TokenMalformed),
        (
            "header not base64url",
            format!(
                "!!!.{}",
                key.token(&claims()).split_once('.').expect("dot").1
            ),
            Reason::TokenMalformed,
        ),
        (
            "subject outside the issuer's trust domain",
            key.token(&with(
                claims(),
                json!({"sub": "spiffe://other.org/agents/x"}),
            )),
            Reason::TokenClaims,
        ),
        (
            "subject not a SPIFFE ID",
            key.token(&with(claims(), json!({"sub": "triage"}))),
            Reason::TokenClaims,
        ),
    ];
    for (what, token, expected) in cases {
        assert_eq!(check(&v, &token).map(|t| t.agent), Err(expected), "{what}");
    }
    // The forged-alg token had the right header otherwise: the check is
    // the algorithm, not the shape.
    check(&v, &key.sign(&header, &claims())).expect("the honest token passes");
}

#[test]
fn embedded_keys_and_key_urls_in_the_header_are_ignored() {
    // An attacker's own key, offered in the header, with its kid: the
    // token is judged against the configured set only.
    let attacker = Minter::es256("rsa-1").expect("key");
    let header = json!({
        "alg": "ES256", "kid": "evil",
        "jwk": attacker.jwk(), "jku": "http://evil.example/jwks", "x5u": "http://evil.example/cert",
    });
    assert_eq!(
        check(&verifier(), &attacker.sign(&header, &claims())).map(|t| t.agent),
        Err(Reason::TokenUnknownKey)
    );
}

#[test]
fn leeway_tolerates_small_clock_skew() {
    let key = rsa();
    // 20 s past `exp` is within the default 30 s leeway; 40 s is not.
    let recent = with(claims(), json!({"iat": now() - 300, "exp": now() - 20}));
    check(&verifier(), &key.token(&recent)).expect("within leeway");
    let old = with(claims(), json!({"iat": now() - 300, "exp": now() - 40}));
    assert_eq!(
        check(&verifier(), &key.token(&old)).map(|t| t.agent),
        Err(Reason::TokenExpired)
    );
}

#[test]
fn delegation_chains_read_from_the_subject_to_the_acting_agent() {
    let v = verifier();
    let a = "spiffe://example.org/agents/planner";
    let b = "spiffe://example.org/agents/coder";
    let depth_two = with(
        claims(),
        json!({"sub": "alice@example.org", "act": {"sub": b, "act": {"sub": a}}}),
    );
    let token = check(&v, &rsa().token(&depth_two)).expect("depth 2");
    assert_eq!(token.agent.as_str(), b);
    let delegation = token.delegation.expect("delegation");
    assert_eq!(delegation.chain(), vec!["alice@example.org", a, b]);
    assert_eq!(delegation.depth(), 2);

    let depth_three = with(
        claims(),
        json!({"sub": "alice@example.org",
               "act": {"sub": b, "act": {"sub": a, "act": {"sub": AGENT}}}}),
    );
    assert_eq!(
        check(&v, &rsa().token(&depth_three)).map(|t| t.agent),
        Err(Reason::DelegationDepth)
    );
    let actor_without_sub = with(claims(), json!({"act": {"client_id": "x"}}));
    assert_eq!(
        check(&v, &rsa().token(&actor_without_sub)).map(|t| t.agent),
        Err(Reason::TokenClaims)
    );
}

#[test]
fn kubernetes_service_accounts_map_into_the_trust_domain() {
    let v = verifier_of(
        issuer(TokenKind::Kubernetes, Some("cluster.local")),
        &[rsa()],
    );
    let sa = with(
        claims(),
        json!({"sub": "system:serviceaccount:agents:triage",
               "kubernetes.io": {"namespace": "agents", "serviceaccount": {"name": "triage", "uid": "u"}}}),
    );
    let token = check(&v, &rsa().token(&sa)).expect("valid");
    assert_eq!(
        token.agent.as_str(),
        "spiffe://cluster.local/ns/agents/sa/triage"
    );
    assert_eq!(token.kind, TokenKind::Kubernetes);
    for sub in [
        "system:serviceaccount:agents",
        "system:node:n1",
        "agents:triage",
    ] {
        let bad = with(claims(), json!({"sub": sub}));
        assert_eq!(
            check(&v, &rsa().token(&bad)).map(|t| t.agent),
            Err(Reason::TokenClaims),
            "{sub}"
        );
    }
    let mismatch = with(
        sa.clone(),
        json!({"kubernetes.io": {"namespace": "other", "serviceaccount": {"name": "triage"}}}),
    );
    assert_eq!(
        check(&v, &rsa().token(&mismatch)).map(|t| t.agent),
        Err(Reason::TokenClaims)
    );
}

#[test]
fn oidc_claims_map_by_prefix_and_the_agent_claim_is_configurable() {
    let mut oidc = issuer(TokenKind::Oidc, None);
    oidc.agent_claim = "azp".into();
    oidc.agent_prefix = Some("spiffe://example.org/oidc/".into());
    let v = verifier_of(oidc, &[rsa()]);
    let token = check(
        &v,
        &rsa().token(&with(claims(), json!({"azp": "report-bot"}))),
    )
    .expect("valid");
    assert_eq!(token.agent.as_str(), "spiffe://example.org/oidc/report-bot");
    assert_eq!(
        check(&v, &rsa().token(&with(claims(), json!({"azp": "a/../b"})))).map(|t| t.agent),
        Err(Reason::TokenClaims)
    );
    // A SPIFFE ID as the claim stays under the prefix: not another
    // agent of its trust domain, nor of another.
    let inside = json!({"azp": "spiffe://example.org/oidc/report-bot"});
    assert!(check(&v, &rsa().token(&with(claims(), inside))).is_ok());
    for outside in [
        "spiffe://example.org/agents/triage",
        "spiffe://example.org/oidc",
        "spiffe://partner.example/oidc/x",
    ] {
        assert_eq!(
            check(&v, &rsa().token(&with(claims(), json!({"azp": outside})))).map(|t| t.agent),
            Err(Reason::TokenClaims),
            "{outside}"
        );
    }
}

#[test]
fn an_oidc_issuer_names_agents_of_its_trust_domain_only() {
    // A partner's IdP, configured for its own domain, naming one of ours.
    let mut oidc = issuer(TokenKind::Oidc, Some("partner.example"));
    oidc.agent_prefix = Some("spiffe://partner.example/oidc/".into());
    let v = verifier_of(oidc, &[rsa()]);
    let ours = json!({"sub": "spiffe://example.org/agents/payments"});
    assert_eq!(
        check(&v, &rsa().token(&with(claims(), ours))).map(|t| t.agent),
        Err(Reason::TokenClaims)
    );
    let theirs = json!({"sub": "spiffe://partner.example/oidc/bot"});
    assert!(check(&v, &rsa().token(&with(claims(), theirs))).is_ok());
}

#[test]
fn cnf_thumbprints_are_read() {
    let cnf = with(
        claims(),
        json!({"cnf": {"x5t#S256": mint::x5t_s256(b"certificate")}}),
    );
    let token = check(&verifier(), &rsa().token(&cnf)).expect("valid");
    assert_eq!(token.cnf_x5t_s256.map(|t| t.len()), Some(32));
    let bad = with(claims(), json!({"cnf": {"x5t#S256": "short"}}));
    assert_eq!(
        check(&verifier(), &rsa().token(&bad)).map(|t| t.agent),
        Err(Reason::TokenClaims)
    );
    // Bound by a key Tether cannot see proven: never a bearer token.
    for cnf in [
        json!({"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}),
        json!({"jwk": {"kty": "EC"}}),
        json!({"x5t#S256": mint::x5t_s256(b"certificate"), "jkt": "x"}),
        json!("garbage"),
    ] {
        let bound = with(claims(), json!({ "cnf": cnf }));
        assert_eq!(
            check(&verifier(), &rsa().token(&bound)).map(|t| t.agent),
            Err(Reason::TokenNotBound),
            "{cnf}"
        );
    }
}

#[test]
fn an_issuer_without_fresh_keys_fails_closed() {
    let config = Tokens {
        issuers: vec![issuer(TokenKind::JwtSvid, Some("example.org"))],
        ..Tokens::default()
    };
    let source = Arc::new(KeySource::url(
        "http://127.0.0.1:9/keys",
        std::time::Duration::from_secs(60),
        std::time::Duration::from_secs(1),
    ));
    let v = TokenVerifier::new(&config, vec![source.clone()]);
    let token = rsa().token(&claims());
    assert_eq!(
        check(&v, &token).map(|t| t.agent),
        Err(Reason::TokenKeysUnavailable)
    );
    // An unknown kid on a URL source asks for an early fetch.
    assert!(v.refetch_for(&token, Instant::now()).is_some());
}

#[test]
fn an_unknown_kid_asks_for_an_early_fetch_outside_the_cool_down() {
    let config = Tokens {
        issuers: vec![issuer(TokenKind::JwtSvid, Some("example.org"))],
        ..Tokens::default()
    };
    let source = Arc::new(KeySource::url(
        "http://127.0.0.1:9/keys",
        std::time::Duration::from_secs(60),
        std::time::Duration::from_millis(100),
    ));
    let v = TokenVerifier::new(&config, vec![source.clone()]);
    let k1 = Minter::es256("k1").expect("key");
    let k2 = Minter::es256("k2").expect("key");
    assert!(source.begin_fetch(false));
    source
        .end_fetch(KeySet::parse(Minter::jwks(&[&k1]).as_bytes()))
        .expect("stored");
    let later = Instant::now() + std::time::Duration::from_millis(150);
    assert!(
        v.refetch_for(&k1.token(&claims()), later).is_none(),
        "known kid"
    );
    assert!(
        v.refetch_for(&k2.token(&claims()), Instant::now())
            .is_none(),
        "cooling down"
    );
    assert!(
        v.refetch_for(&k2.token(&claims()), later).is_some(),
        "unknown kid"
    );
}

#[test]
fn a_remembered_token_is_still_checked_for_time_and_keys() {
    let k1 = Minter::es256("k1").expect("key");
    let k2 = Minter::es256("k2").expect("key");
    let set = |m: &Minter| KeySet::parse(Minter::jwks(&[m]).as_bytes()).expect("set");
    let source = Arc::new(KeySource::file("test", set(&k1)));
    let config = Tokens {
        issuers: vec![issuer(TokenKind::JwtSvid, Some("example.org"))],
        ..Tokens::default()
    };
    let v = TokenVerifier::new(&config, vec![source.clone()]);
    let token = k1.token(&claims());
    let at = |t: i64| {
        v.verify(&token, t, Instant::now())
            .map(|t| t.agent)
            .map_err(|d| d.reason)
    };
    at(now()).expect("valid");
    at(now()).expect("valid again, remembered");
    // Time moves on: the remembered token expires like any other.
    assert_eq!(at(now() + 400), Err(Reason::TokenExpired));
    // The issuer drops k1: the remembered token is verified afresh.
    source.store(set(&k2));
    assert_eq!(at(now()), Err(Reason::TokenUnknownKey));
}

#[test]
fn a_header_that_is_no_json_object_is_malformed() {
    // Valid claims and signature: only the header's shape is wrong. Read
    // into the header struct, the array's first item was taken for `alg`.
    for header in [json!(["RS256"]), json!(["RS256", "rsa-1"]), json!("RS256")] {
        assert_eq!(
            check(&verifier(), &rsa().sign(&header, &claims())).map(|t| t.agent),
            Err(Reason::TokenMalformed),
            "{header}"
        );
    }
}

#[test]
fn a_jwt_svid_typ_is_jwt_or_jose() {
    let key = rsa();
    for (typ, accepted) in [
        ("JWT", true),
        ("jwt", true),
        ("JOSE", true),
        ("application/jwt", true),
        ("Application/JOSE", true),
        ("at+jwt", false),
        ("application/at+jwt", false),
        ("JWT+x", false),
        ("", false),
    ] {
        let header = json!({"alg": "RS256", "kid": "rsa-1", "typ": typ});
        let result = check(&verifier(), &key.sign(&header, &claims()));
        assert_eq!(result.is_ok(), accepted, "typ {typ:?}: {:?}", result.err());
        if !accepted {
            assert_eq!(result.map(|t| t.agent), Err(Reason::TokenMalformed));
        }
    }
    // Absent, it is no claim to check.
    let header = json!({"alg": "RS256", "kid": "rsa-1"});
    check(&verifier(), &key.sign(&header, &claims())).expect("no typ");
    // Other issuers' tokens are typed as they like: an OIDC access token
    // is `at+jwt` (RFC 9068).
    let oidc = verifier_of(issuer(TokenKind::Oidc, Some("example.org")), &[key]);
    let header = json!({"alg": "RS256", "kid": "rsa-1", "typ": "at+jwt"});
    check(&oidc, &key.sign(&header, &claims())).expect("an OIDC access token");
}
