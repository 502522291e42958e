//! Bearer-token identities end to end: the real binary, keys and tokens
//! generated here, a JWKS server on loopback, delegation chains, and
//! tokens bound to client certificates.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use support::{post_reload, rewrite_config, World, TRIAGE};
use tether::client::{Client, Response};
use tether_config::{
    AgentSpec, AgentState, ClientAuth, Config, Expiry, JwksSource, JwtAlgorithm, TokenIssuer,
    TokenKind,
};
use tether_testkit::mint::{self, Minter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ISSUER: &str = "https://spire.example.org";
const PLANNER: &str = "spiffe://example.org/agents/planner";
const CODER: &str = "spiffe://example.org/agents/coder";
const PAUSED: &str = "spiffe://example.org/agents/paused";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn claims(sub: &str) -> Value {
    json!({"iss": ISSUER, "aud": "tether", "sub": sub, "iat": now() - 5, "exp": now() + 300})
}

fn delegated(subject: &str, actors: &[&str]) -> Value {
    // Nested from the agent acting now (outermost) to the first delegate.
    let mut act = Value::Null;
    for actor in actors {
        act = match act {
            Value::Null => json!({"sub": actor}),
            inner => json!({"sub": actor, "act": inner}),
        };
    }
    let mut c = claims(subject);
    c["act"] = act;
    c
}

fn agent(id: &str, state: AgentState) -> AgentSpec {
    AgentSpec {
        id: id.into(),
        owner: "dana@example.org".into(),
        team: "platform".into(),
        purpose: String::new(),
        expires: Expiry::parse("2999-12-31").expect("date"),
        review_by: None,
        state,
    }
}

fn issuer(jwks: JwksSource) -> TokenIssuer {
    TokenIssuer {
        kind: TokenKind::JwtSvid,
        issuer: ISSUER.into(),
        audiences: vec!["tether".into()],
        jwks,
        algorithms: vec![JwtAlgorithm::ES256, JwtAlgorithm::RS256],
        agent_claim: "sub".into(),
        trust_domain: Some("example.org".into()),
        agent_prefix: None,
    }
}

fn jwks_url(url: String) -> JwksSource {
    JwksSource {
        file: None,
        url: Some(url),
        ca: None,
        refresh_seconds: 300,
        max_age_seconds: 3600,
        // The least config allows.
        min_refetch_interval_ms: 1000,
    }
}

/// Tether accepting tokens of `jwks`, client certificates optional, with
/// more agents registered and delegation at most 2 deep.
fn world(jwks: JwksSource) -> World {
    World::with(|c: &mut Config| {
        c.listener.client_auth = ClientAuth::Optional;
        c.tokens.issuers = vec![issuer(jwks)];
        c.tokens.max_delegation_depth = 2;
        c.registry.agents.extend([
            agent(PLANNER, AgentState::Active),
            agent(CODER, AgentState::Active),
            agent(PAUSED, AgentState::Suspended),
        ]);
    })
}

/// A JWKS file holding `minters`, in a folder that outlives the test.
fn jwks_file(dir: &Path, minters: &[&Minter]) -> JwksSource {
    let path = dir.join("jwks.json");
    std::fs::write(&path, Minter::jwks(minters)).expect("jwks file");
    JwksSource {
        file: Some(path),
        url: None,
        ..jwks_url(String::new())
    }
}

fn bearer(w: &World, method: &str, path: &str, token: &str) -> Response {
    w.send(
        None,
        method,
        path,
        &[("authorization", &format!("Bearer {token}"))],
    )
    .expect("response")
}

fn assert_refused(r: &Response, status: u16, reason: &str) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(r.json().expect("json")["reason"], reason, "{r:?}");
}

#[test]
fn a_jwt_svid_alone_names_the_agent_and_goes_no_further() {
    let dir = tempfile::tempdir().expect("dir");
    let key = Minter::es256("k1").expect("key");
    let w = world(jwks_file(dir.path(), &[&key]));
    let r = bearer(
        &w,
        "GET",
        "/v1/repos/tether/issues",
        &key.token(&claims(TRIAGE)),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let echo = r.json().expect("echo");
    assert_eq!(echo["headers"]["x-tether-agent"], TRIAGE);
    assert!(
        echo["headers"].get("authorization").is_none(),
        "the token was for Tether; the upstream never sees it: {echo}"
    );
    // Spaces or a tab: one scheme, one token, and it stops here too.
    let token = key.token(&claims(TRIAGE));
    let r = w
        .send(
            None,
            "GET",
            "/v1/repos/tether/issues",
            &[("authorization", &format!("bearer\t{token}"))],
        )
        .expect("response");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.json().expect("echo")["headers"]
        .get("authorization")
        .is_none());
    let line = &w.sandbox.audit_lines(1)[0];
    assert_eq!(line["identity_kind"], "jwt_svid");
    assert_eq!(line["agent"], TRIAGE);
    assert!(
        !w.sandbox.audit_lines(1)[0]
            .to_string()
            .contains(&key.token(&claims(TRIAGE))[..40]),
        "no token in the audit line"
    );
}

#[test]
fn token_refusals_reach_the_caller_with_their_reason() {
    let dir = tempfile::tempdir().expect("dir");
    let key = Minter::es256("k1").expect("key");
    let w = world(jwks_file(dir.path(), &[&key]));
    let expired = json!({"iss": ISSUER, "aud": "tether", "sub": TRIAGE, "iat": now() - 600, "exp": now() - 300});
    let mut other_audience = claims(TRIAGE);
    other_audience["aud"] = "other".into();
    let cases = [
        (key.token(&expired), "token_expired"),
        (key.token(&other_audience), "token_audience"),
        (
            mint::unsigned(&json!({"alg": "none"}), &claims(TRIAGE)),
            "token_algorithm",
        ),
        (
            key.sign(&json!({"alg": "ES256", "kid": "k2"}), &claims(TRIAGE)),
            "token_unknown_key",
        ),
        (
            key.token(&claims("spiffe://example.org/agents/stranger")),
            "unregistered",
        ),
    ];
    for (token, reason) in cases {
        let r = bearer(&w, "GET", "/v1/repos/tether/issues", &token);
        let status = if reason == "unregistered" { 403 } else { 401 };
        assert_refused(&r, status, reason);
    }
    // Two `authorization` headers: which one a server reads is its own.
    let token = key.token(&claims(TRIAGE));
    let auth = format!("Bearer {token}");
    let r = w
        .send(
            None,
            "GET",
            "/v1/repos/tether/issues",
            &[("authorization", &auth), ("authorization", &auth)],
        )
        .expect("response");
    assert_refused(&r, 401, "token_malformed");
    // A DPoP token is bound to a key Tether sees no proof of.
    let r = w
        .send(
            None,
            "GET",
            "/v1/repos/tether/issues",
            &[(
                "authorization",
                &format!("DPoP {}", key.token(&claims(TRIAGE))),
            )],
        )
        .expect("response");
    assert_refused(&r, 401, "token_not_bound");
    // No certificate and no token: nothing to go on.
    let r = w
        .send(None, "GET", "/v1/repos/tether/issues", &[])
        .expect("response");
    assert_refused(&r, 401, "no_identity");
}

#[test]
fn delegation_chains_are_checked_recorded_and_given_to_policy() {
    let dir = tempfile::tempdir().expect("dir");
    let key = Minter::es256("k1").expect("key");
    let w = world(jwks_file(dir.path(), &[&key]));
    let path = "/v1/repos/tether/issues";

    let depth_one = key.token(&delegated("alice@example.org", &[TRIAGE]));
    assert_eq!(bearer(&w, "GET", path, &depth_one).status, 200);
    let depth_two = key.token(&delegated("alice@example.org", &[PLANNER, CODER]));
    let r = bearer(&w, "POST", path, &depth_two);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json().expect("echo")["headers"]["x-tether-agent"], CODER);
    let line = &w.sandbox.audit_lines(2)[1];
    assert_eq!(line["agent"], CODER);
    assert_eq!(line["on_behalf_of"], "alice@example.org");
    assert_eq!(
        line["delegation_chain"],
        json!(["alice@example.org", PLANNER, CODER])
    );

    let too_deep = key.token(&delegated("alice@example.org", &[TRIAGE, PLANNER, CODER]));
    assert_refused(&bearer(&w, "GET", path, &too_deep), 403, "delegation_depth");
    let stranger = key.token(&delegated(
        "alice@example.org",
        &["spiffe://example.org/agents/stranger", CODER],
    ));
    assert_refused(
        &bearer(&w, "GET", path, &stranger),
        403,
        "unregistered_actor",
    );
    let paused = key.token(&delegated("alice@example.org", &[PAUSED, CODER]));
    assert_refused(&bearer(&w, "GET", path, &paused), 403, "unregistered_actor");

    // The example policy reads `context.on_behalf_of`: agents file issues
    // only for people of example.org.
    let outsider = key.token(&delegated("mallory@evil.example", &[CODER]));
    assert_eq!(bearer(&w, "GET", path, &outsider).status, 200);
    assert_refused(&bearer(&w, "POST", path, &outsider), 403, "policy_denied");
}

#[test]
fn a_token_must_belong_to_the_client_certificate() {
    let dir = tempfile::tempdir().expect("dir");
    let key = Minter::es256("k1").expect("key");
    let w = world(jwks_file(dir.path(), &[&key]));
    let leaf = w.sandbox.pki.leaf(&[TRIAGE]).expect("leaf");
    let other = w.sandbox.pki.leaf(&[TRIAGE]).expect("leaf");
    let client = Client::new(
        w.sandbox.proxy,
        &w.sandbox.pki.ca_pem(),
        Some((&leaf.cert_pem, &leaf.key_pem)),
    )
    .expect("client");
    let send = |token: String| {
        let auth = format!("Bearer {token}");
        w.rt.block_on(client.send(
            "GET",
            "/v1/repos/tether/issues",
            &[("authorization", &auth)],
        ))
        .expect("response")
    };
    // The SVID's own token: bound by identity.
    assert_eq!(send(key.token(&claims(TRIAGE))).status, 200);
    // Another agent's token on this certificate.
    assert_refused(&send(key.token(&claims(CODER))), 401, "token_not_bound");
    // RFC 8705: a `cnf` thumbprint must be this very certificate's.
    let mut bound = claims(TRIAGE);
    bound["cnf"] = json!({"x5t#S256": mint::x5t_s256(leaf.der())});
    assert_eq!(send(key.token(&bound)).status, 200);
    bound["cnf"] = json!({"x5t#S256": mint::x5t_s256(other.der())});
    assert_refused(&send(key.token(&bound)), 401, "token_not_bound");
    // A bound token stolen and sent with no certificate at all.
    bound["cnf"] = json!({"x5t#S256": mint::x5t_s256(leaf.der())});
    assert_refused(
        &bearer(&w, "GET", "/v1/repos/tether/issues", &key.token(&bound)),
        401,
        "token_not_bound",
    );
}

/// A JWKS server on loopback whose key set can change, counting fetches.
struct JwksServer {
    addr: SocketAddr,
    body: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(body: String) -> JwksServer {
        JwksServer::start_on("127.0.0.1:0".parse().expect("address"), body).await
    }

    async fn start_on(addr: SocketAddr, body: String) -> JwksServer {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let body = Arc::new(Mutex::new(body));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (b, f) = (body.clone(), fetches.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                f.fetch_add(1, Ordering::SeqCst);
                let json = b.lock().expect("lock").clone();
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{json}",
                    json.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            }
        });
        JwksServer {
            addr,
            body,
            fetches,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/keys", self.addr)
    }
}

#[test]
fn keys_from_a_url_are_cached_rotated_kept_while_fresh_and_required() {
    let k1 = Minter::es256("k1").expect("key");
    let k2 = Minter::es256("k2").expect("key");
    let rt = support::runtime();
    let server = rt.block_on(JwksServer::start(Minter::jwks(&[&k1])));
    let w = world(jwks_url(server.url()));
    let path = "/v1/repos/tether/issues";

    for _ in 0..5 {
        let r = bearer(&w, "GET", path, &k1.token(&claims(TRIAGE)));
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert!(
        server.fetches.load(Ordering::SeqCst) <= 2,
        "keys are cached, not fetched per request"
    );

    // The issuer rotates to k2: the unknown kid brings an early fetch
    // (once the 1 s cool-down since the last fetch has passed).
    *server.body.lock().expect("lock") = Minter::jwks(&[&k2]);
    let before = server.fetches.load(Ordering::SeqCst);
    std::thread::sleep(std::time::Duration::from_millis(1050));
    let r = bearer(&w, "GET", path, &k2.token(&claims(TRIAGE)));
    assert_eq!(r.status, 200, "rotation picked up: {r:?}");
    assert_eq!(
        server.fetches.load(Ordering::SeqCst),
        before + 1,
        "one early fetch"
    );

    // The key server goes away: the fetched keys serve while fresh.
    server.task.abort();
    rt.block_on(async {
        while !server.task.is_finished() {
            tokio::task::yield_now().await
        }
    });
    let r = bearer(&w, "GET", path, &k2.token(&claims(TRIAGE)));
    assert_eq!(r.status, 200, "fresh cache while the server is down: {r:?}");
    // An unknown kid while it is down: refused, not waited on forever.
    let r = bearer(&w, "GET", path, &k1.token(&claims(TRIAGE)));
    assert_refused(&r, 401, "token_unknown_key");

    // A Tether that never got keys refuses the issuer's tokens (503).
    let dead = tether::demo::free_port().expect("port");
    let cold = world(jwks_url(format!("http://{dead}/keys")));
    let r = bearer(&cold, "GET", path, &k1.token(&claims(TRIAGE)));
    assert_refused(&r, 503, "token_keys_unavailable");
}

#[test]
fn a_certificate_that_no_longer_verifies_is_not_taken_for_none() {
    // Certificates optional, tokens accepted: a token alone may name its
    // agent on a connection that presented no certificate. A connection
    // whose certificate Tether stopped believing (its CA removed by a
    // reload) is another thing: a token stolen from another agent must
    // not become the principal there, unbound.
    use tether_config::TrustDomain;
    use tether_filters::identity::pki::Pki;
    const OTHER: &str = "spiffe://other.org/agents/x";
    let dir = tempfile::tempdir().expect("dir");
    let key = Minter::es256("k1").expect("key");
    let jwks = jwks_file(dir.path(), &[&key]);
    let other = Pki::new("other.org").expect("pki");
    let bundle = dir.path().join("other.pem");
    std::fs::write(&bundle, other.ca_pem()).expect("bundle");
    let configured = bundle.clone();
    let w = World::with(move |c: &mut Config| {
        c.listener.client_auth = ClientAuth::Optional;
        c.tokens.issuers = vec![issuer(jwks)];
        c.trust_domains.push(TrustDomain {
            name: "other.org".into(),
            bundle: configured,
        });
        let mut x = agent(OTHER, AgentState::Active);
        x.owner = "olga@other.org".into();
        c.registry
            .agents
            .extend([x, agent(CODER, AgentState::Active)]);
    });
    let leaf = other.leaf(&[OTHER]).expect("leaf");
    let client = Client::new(
        w.sandbox.proxy,
        &w.sandbox.pki.ca_pem(),
        Some((&leaf.cert_pem, &leaf.key_pem)),
    )
    .expect("client");
    let mut open = w.rt.block_on(client.connect()).expect("connect");
    let stolen = key.token(&claims(CODER));
    let mut send = |token: Option<&str>| {
        let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
        let request = format!("GET /v1/repos/tether/issues HTTP/1.1\r\nhost: tether\r\n{auth}\r\n");
        w.rt.block_on(async {
            open.write(request.as_bytes()).await?;
            open.read_response().await
        })
        .expect("response")
    };
    assert_eq!(send(None).status, 200, "the connection's own identity");
    // While the certificate verifies, the other agent's token is not bound.
    assert_refused(&send(Some(&stolen)), 401, "token_not_bound");

    std::fs::write(&bundle, Pki::new("other.org").expect("pki").ca_pem()).expect("bundle");
    let (status, body) = w.rt.block_on(post_reload(w.sandbox.admin));
    assert_eq!(status, 200, "{body}");
    assert_refused(&send(None), 401, "no_identity");
    assert_refused(&send(Some(&stolen)), 401, "no_identity");
    let audit = w.sandbox.audit_lines(4);
    let last = audit.last().expect("the refusal's line");
    assert_eq!(last["agent"], serde_json::Value::Null, "{last}");
    assert!(
        last["detail"]
            .as_str()
            .is_some_and(|d| d.contains("does not verify")),
        "{last}"
    );
    // A connection that presents no certificate still may use a token.
    assert_eq!(
        bearer(&w, "GET", "/v1/repos/tether/issues", &stolen).status,
        200,
        "a token alone, on a connection without a certificate"
    );
}

#[test]
fn issuers_are_added_and_removed_by_reload_with_their_keys_fetched_first() {
    const SECOND: &str = "https://second.example.org";
    let dir = tempfile::tempdir().expect("dir");
    let (first_key, second_key) = (
        Minter::es256("k1").expect("key"),
        Minter::es256("k2").expect("key"),
    );
    let rt = support::runtime();
    let server = rt.block_on(JwksServer::start(Minter::jwks(&[&second_key])));
    let w = World::with(|c: &mut Config| {
        c.reload.watch = false;
        c.listener.client_auth = ClientAuth::Optional;
        c.tokens.issuers = vec![issuer(jwks_file(dir.path(), &[&first_key]))];
    });
    let path = "/v1/repos/tether/issues";
    let first = || first_key.token(&claims(TRIAGE));
    let second = || {
        let mut c = claims(TRIAGE);
        c["iss"] = json!(SECOND);
        second_key.token(&c)
    };
    let second_issuer = |url: String| TokenIssuer {
        issuer: SECOND.into(),
        ..issuer(jwks_url(url))
    };
    let reload = || rt.block_on(post_reload(w.sandbox.admin));
    assert_eq!(bearer(&w, "GET", path, &first()).status, 200);
    assert_refused(&bearer(&w, "GET", path, &second()), 401, "token_issuer");

    // A new issuer: its keys are fetched before the new version serves,
    // so its first token verifies.
    rewrite_config(&w.sandbox, |c| {
        c.tokens.issuers.push(second_issuer(server.url()));
    });
    let (status, body) = reload();
    assert_eq!(status, 200, "{body}");
    assert!(server.fetches.load(Ordering::SeqCst) >= 1, "fetched first");
    let r = bearer(&w, "GET", path, &second());
    assert_eq!(r.status, 200, "{r:?}");
    let verified = first();
    assert_eq!(bearer(&w, "GET", path, &verified).status, 200);

    // A removed issuer is refused from the reload on, even a token it
    // verified a moment ago.
    rewrite_config(&w.sandbox, |c| {
        c.tokens.issuers.remove(0);
    });
    let (status, body) = reload();
    assert_eq!(status, 200, "{body}");
    assert_refused(&bearer(&w, "GET", path, &verified), 401, "token_issuer");
    assert_refused(&bearer(&w, "GET", path, &first()), 401, "token_issuer");
    assert_eq!(bearer(&w, "GET", path, &second()).status, 200);

    // A new issuer whose key server cannot be reached: the whole reload
    // is refused, naming it, and the issuers serving go on serving.
    const THIRD: &str = "https://third.example.org";
    let third_key = Minter::es256("k3").expect("key");
    let third = || {
        let mut c = claims(TRIAGE);
        c["iss"] = json!(THIRD);
        third_key.token(&c)
    };
    let dead = tether::demo::free_port().expect("port");
    let generation = w.metric("tether_config_generation");
    rewrite_config(&w.sandbox, |c| {
        c.tokens.issuers.push(TokenIssuer {
            issuer: THIRD.into(),
            ..issuer(jwks_url(format!("http://{dead}/keys")))
        });
        c.tokens
            .issuers
            .push(issuer(jwks_file(dir.path(), &[&first_key])));
    });
    let (status, body) = reload();
    assert_eq!(status, 422, "{body}");
    let text = body.to_string();
    assert!(
        text.contains("tokens.issuers[1].jwks.url")
            && text.contains(&format!("the keys of `{THIRD}` could not be fetched")),
        "{body}"
    );
    assert_eq!(w.metric("tether_config_last_reload_successful"), 0.0);
    assert_eq!(w.metric("tether_config_generation"), generation);
    assert_eq!(bearer(&w, "GET", path, &second()).status, 200);
    assert_refused(&bearer(&w, "GET", path, &third()), 401, "token_issuer");
    // Nothing of the refused version serves, the issuer re-added with it
    // included.
    assert_refused(&bearer(&w, "GET", path, &first()), 401, "token_issuer");

    // Once the key server answers, the same version loads when tried
    // again (no file changed; at most every `min_refetch_interval_ms`).
    let _third_server = rt.block_on(JwksServer::start_on(dead, Minter::jwks(&[&third_key])));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (status, body) = reload();
    assert_eq!(status, 200, "{body}");
    for token in [first(), second(), third()] {
        assert_eq!(bearer(&w, "GET", path, &token).status, 200);
    }
}
