//! End to end: the real `tether` binary on free loopback ports, real mTLS
//! with certificates generated at test time, real Cedar, a real upstream.

mod support;

use std::process::Command;

use support::{World, TETHER, TRIAGE};
use tether::client::Response;
use tether_config::{AgentSpec, AgentState, Expiry, TrustDomain};
use tether_filters::identity::pki::Pki;

const INTERN: &str = "spiffe://example.org/agents/summer-intern-bot";

fn agent(id: &str, owner: &str, state: AgentState) -> AgentSpec {
    AgentSpec {
        id: id.into(),
        owner: owner.into(),
        team: "platform".into(),
        purpose: String::new(),
        expires: Expiry::parse("2999-12-31").expect("date"),
        review_by: None,
        state,
    }
}

/// The example config in front of `upstream`, a listener the test holds
/// (and answers, or not, as it likes).
fn world_with_upstream(upstream: &std::net::TcpListener) -> World {
    let address = upstream.local_addr().expect("addr").to_string();
    World::with(move |c| {
        if let Some(u) = c.upstream.as_mut() {
            u.address = address;
        }
    })
}

fn assert_refused(r: &Response, status: u16, reason: &str) {
    assert_eq!(r.status, status, "{r:?}");
    let body = r.json().expect("json body");
    assert_eq!(body["reason"], reason, "{body}");
    assert_eq!(
        body["request_id"].as_str(),
        r.header("x-tether-request-id"),
        "the body and header name the same request"
    );
}

#[test]
fn an_owned_agent_is_allowed_and_the_upstream_sees_its_verified_identity() {
    let w = World::new();
    let r = w.get(TRIAGE, "/v1/repos/tether/issues");
    assert_eq!(r.status, 200, "{r:?}");
    let echo = r.json().expect("echo");
    assert_eq!(echo["target"], "/v1/repos/tether/issues");
    assert_eq!(echo["headers"]["x-tether-agent"], TRIAGE);
    assert_eq!(echo["headers"]["x-tether-owner"], "alice@example.org");

    let audit = w.sandbox.audit_lines(1);
    let line = &audit[0];
    assert_eq!(line["decision"], "allow");
    assert_eq!(line["reason"], "allowed");
    assert_eq!(line["agent"], TRIAGE);
    assert_eq!(line["owner"], "alice@example.org");
    assert_eq!(line["policies"][0], "agents-work-issues");
    assert_eq!(line["status"], 200);
    // The example names no upstream: its address stands for it.
    assert!(
        line["upstream"]
            .as_str()
            .is_some_and(|u| u.starts_with("127.0.0.1:")),
        "{line}"
    );
    assert_eq!(line["request_id"].as_str(), r.header("x-tether-request-id"));
}

#[test]
fn a_request_policy_forbids_is_refused_without_revealing_the_policy() {
    let w = World::new();
    let r = w
        .send(Some(TRIAGE), "DELETE", "/v1/repos/tether", &[])
        .expect("response");
    assert_refused(&r, 403, "policy_denied");
    assert!(!String::from_utf8_lossy(&r.body).contains("no-repo-deletion"));
    let line = &w.sandbox.audit_lines(1)[0];
    assert_eq!(line["decision"], "deny");
    assert_eq!(line["stage"], "authorize");
    assert_eq!(line["policies"][0], "no-repo-deletion-by-agents");
}

#[test]
fn a_refusal_keeps_the_connection_unless_it_leaves_a_body_unread() {
    let w = World::new();
    let client = w.sandbox.client(Some(TRIAGE)).expect("client");
    w.rt.block_on(async {
        let mut conn = client.connect().await.expect("connect");
        // Refused with nothing left to read: the same connection goes on.
        let r = conn.send("DELETE", "/v1/repos/tether").await.expect("r");
        assert_refused(&r, 403, "policy_denied");
        assert_ne!(r.header("connection"), Some("close"), "{r:?}");
        let r = conn.send("GET", "/nowhere").await.expect("r");
        assert_refused(&r, 403, "no_route");
        let r = conn
            .send("GET", "/v1/repos/tether/issues")
            .await
            .expect("r");
        assert_eq!(r.status, 200, "{r:?}");

        // Refused before its body was read: closed, so the body (here a
        // request of its own) is never read as the next request.
        let smuggled = b"GET /v1/repos/tether/issues HTTP/1.1\r\nhost: x\r\n\r\n";
        let r = conn
            .send_body("DELETE", "/v1/repos/tether", smuggled)
            .await
            .expect("r");
        assert_refused(&r, 403, "policy_denied");
        assert_eq!(r.header("connection"), Some("close"), "{r:?}");
        let after = conn.send("GET", "/v1/repos/tether/issues").await;
        assert!(after.is_err(), "{after:?}");
    });
    let lines = w.sandbox.audit_lines(4);
    let reasons: Vec<_> = lines.iter().map(|l| l["reason"].clone()).collect();
    assert_eq!(
        reasons,
        ["policy_denied", "no_route", "allowed", "policy_denied"],
        "{lines:?}"
    );
}

#[test]
fn lifecycle_refusals_unregistered_expired_suspended_offboarded() {
    let w = World::with(|c| {
        c.registry.agents.push(agent(
            "spiffe://example.org/agents/paused",
            "dan@example.org",
            AgentState::Suspended,
        ));
        c.registry.agents.push(agent(
            "spiffe://example.org/agents/gone",
            "erin@example.org",
            AgentState::Offboarded,
        ));
    });
    let path = "/v1/repos/tether/issues";
    assert_refused(
        &w.get("spiffe://example.org/agents/stranger", path),
        403,
        "unregistered",
    );
    assert_refused(&w.get(INTERN, path), 403, "expired");
    assert_refused(
        &w.get("spiffe://example.org/agents/paused", path),
        403,
        "inactive",
    );
    assert_refused(
        &w.get("spiffe://example.org/agents/gone", path),
        403,
        "inactive",
    );
    let reasons: Vec<String> = w
        .sandbox
        .audit_lines(4)
        .iter()
        .map(|l| {
            format!(
                "{}/{}",
                l["stage"].as_str().unwrap_or(""),
                l["reason"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            "lifecycle/unregistered",
            "lifecycle/expired",
            "lifecycle/inactive",
            "lifecycle/inactive"
        ]
    );
}

#[test]
fn certificates_that_are_not_valid_svids_of_a_trusted_domain_are_refused_at_the_handshake() {
    let other = Pki::new("other.org").expect("pki");
    let bundle = std::env::temp_dir().join(format!("tether-e2e-other-{}.pem", std::process::id()));
    std::fs::write(&bundle, other.ca_pem()).expect("bundle");
    let w = World::with(|c| {
        c.trust_domains.push(TrustDomain {
            name: "other.org".into(),
            bundle: bundle.clone(),
        });
        c.registry.agents.push(agent(
            "spiffe://other.org/agents/x",
            "olga@other.org",
            AgentState::Active,
        ));
    });
    let send_with = |pki: &Pki, uris: &[&str]| {
        let leaf = pki.leaf(uris).expect("leaf");
        let client = tether::client::Client::new(
            w.sandbox.proxy,
            &w.sandbox.pki.ca_pem(),
            Some((&leaf.cert_pem, &leaf.key_pem)),
        )
        .expect("client");
        w.rt.block_on(client.send("GET", "/v1/repos/tether/issues", &[]))
    };
    // The other domain's own agent, with its own CA: allowed.
    assert_eq!(
        send_with(&other, &["spiffe://other.org/agents/x"])
            .expect("ok")
            .status,
        200
    );
    // example.org's CA vouching for an other.org identity: refused.
    assert!(send_with(&w.sandbox.pki, &["spiffe://other.org/agents/x"]).is_err());
    // other.org's CA vouching for an example.org identity: refused.
    assert!(send_with(&other, &[TRIAGE]).is_err());
    // Two URI SANs, a non-SPIFFE URI, none at all: refused.
    assert!(send_with(&w.sandbox.pki, &[TRIAGE, "spiffe://example.org/agents/b"]).is_err());
    assert!(send_with(&w.sandbox.pki, &["https://example.org/agents/a"]).is_err());
    assert!(send_with(&w.sandbox.pki, &[]).is_err());
    // A CA nobody trusts.
    let rogue = Pki::new("example.org").expect("pki");
    assert!(send_with(&rogue, &[TRIAGE]).is_err());
    // No client certificate at all.
    assert!(w.send(None, "GET", "/v1/repos/tether/issues", &[]).is_err());

    let metrics = w.admin("/metrics");
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("tether_client_cert_rejected_total{reason=\"chain\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("tether_client_cert_rejected_total{reason=\"many_uris\"} 1"),
        "{text}"
    );
    let _ = std::fs::remove_file(bundle);
}

#[test]
fn spoofed_identity_headers_are_replaced_by_the_verified_ones() {
    let w = World::new();
    let r = w
        .send(
            Some(TRIAGE),
            "GET",
            "/v1/repos/tether/issues",
            &[
                ("x-tether-owner", "ceo@example.org"),
                ("X-Tether-Agent", "spiffe://example.org/agents/admin"),
                ("x-tether-anything", "1"),
                (
                    "x-forwarded-client-cert",
                    "By=spiffe://example.org/agents/admin",
                ),
                ("x_tether_agent", "spiffe://example.org/agents/admin"),
                // What an API behind a proxy trusts: who the client is,
                // which method it meant.
                ("x-forwarded-for", "10.0.0.1"),
                ("x-http-method-override", "DELETE"),
                // The proxy strips what `Connection` names before it
                // forwards: it must not take Tether's headers with it.
                (
                    "connection",
                    "x-tether-agent, x-tether-owner, x-tether-request-id, traceparent",
                ),
            ],
        )
        .expect("response");
    assert_eq!(r.status, 200);
    let headers = &r.json().expect("echo")["headers"];
    assert_eq!(headers["x-tether-owner"], "alice@example.org");
    assert_eq!(headers["x-tether-agent"], TRIAGE);
    assert!(headers.get("x-tether-anything").is_none(), "{headers}");
    assert!(headers.get("x_tether_agent").is_none(), "{headers}");
    assert!(headers.get("x-tether-request-id").is_some(), "{headers}");
    for spoofed in [
        "x-forwarded-client-cert",
        "x-forwarded-for",
        "x-http-method-override",
    ] {
        assert!(headers.get(spoofed).is_none(), "{spoofed}: {headers}");
    }
}

#[test]
fn paths_are_decided_and_forwarded_in_normalized_form() {
    let w = World::new();
    for path in [
        "/v1/public/../admin",
        "/v1/public/%2e%2e/admin",
        "/v1//public/.%2E/./admin",
    ] {
        let r = w.get(TRIAGE, path);
        assert_refused(&r, 403, "policy_denied");
    }
    let lines = w.sandbox.audit_lines(3);
    assert_eq!(lines.len(), 3, "every refusal recorded");
    for line in lines {
        assert_eq!(line["path"], "/v1/admin");
        assert_eq!(line["action"], "Action::\"Administer\"");
    }
    // Allowed after normalization: the upstream gets the normalized path.
    let r = w.get(TRIAGE, "/v1/repos/other/../tether/issues?state=open");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json().expect("echo")["target"],
        "/v1/repos/tether/issues?state=open"
    );
    // An absolute-form target whose authority disagrees with Host is
    // refused outright (by pingora, before Tether's chain: nothing is
    // recorded for it); a consistent one is forwarded in origin form, so
    // the upstream never reads a host routing did not.
    let before = w.sandbox.audit_lines(4).len();
    let r = w.get(TRIAGE, "http://api.example.org/v1/repos/tether/issues");
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.json().is_err(), "not Tether's refusal: {r:?}");
    assert_eq!(
        w.sandbox.audit_lines(before + 1).len(),
        before,
        "never reached the chain"
    );
    let absolute = format!("http://{}/v1/repos/tether/issues", w.sandbox.proxy);
    let r = w.get(TRIAGE, &absolute);
    assert_eq!(r.status, 200, "{r:?}");
    let echo = r.json().expect("echo");
    assert_eq!(echo["target"], "/v1/repos/tether/issues");
    assert_eq!(echo["headers"]["host"], w.sandbox.proxy.to_string());
    // Malformed escapes are a 400, not a guess.
    assert_refused(&w.get(TRIAGE, "/v1/repos/%zz/issues"), 400, "bad_path");
    // No route: refused like any other denial.
    assert_refused(&w.get(TRIAGE, "/v2/anything"), 403, "no_route");
}

#[test]
fn paths_match_ignoring_case_for_an_upstream_that_routes_so() {
    // By default `/V1/ADMIN` is no route of Tether's (and most servers'):
    // refused. An ASP.NET upstream would serve its admin handler for it,
    // so with `paths.case: insensitive` it is decided as `/v1/admin`.
    let sensitive = World::new();
    assert_refused(&sensitive.get(TRIAGE, "/V1/ADMIN"), 403, "no_route");
    let w = World::with(|c| c.paths.case = tether_config::PathCase::Insensitive);
    assert_refused(&w.get(TRIAGE, "/V1/ADMIN"), 403, "policy_denied");
    let line = &w.sandbox.audit_lines(1)[0];
    assert_eq!(line["action"], "Action::\"Administer\"", "{line}");
    // Allowed, and forwarded as sent: only the matching ignores case.
    let r = w.get(TRIAGE, "/V1/Repos/tether/ISSUES");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json().expect("echo")["target"], "/V1/Repos/tether/ISSUES");
}

#[test]
fn a_cached_decision_is_the_same_as_the_fresh_one() {
    let w = World::new();
    for _ in 0..2 {
        assert_eq!(w.get(TRIAGE, "/v1/repos/tether/issues").status, 200);
        assert_refused(
            &w.send(Some(TRIAGE), "DELETE", "/v1/repos/tether", &[])
                .expect("r"),
            403,
            "policy_denied",
        );
    }
    let lines = w.sandbox.audit_lines(4);
    for (fresh, cached) in [(&lines[0], &lines[2]), (&lines[1], &lines[3])] {
        assert_eq!(fresh["cached"], false);
        assert_eq!(cached["cached"], true);
        for field in [
            "decision", "reason", "policies", "status", "action", "resource",
        ] {
            assert_eq!(fresh[field], cached[field], "{field}");
        }
    }
    let metrics = w.admin("/metrics");
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("tether_decision_cache_hits_total 2"),
        "{text}"
    );
    assert!(
        text.contains("tether_decision_cache_misses_total 2"),
        "{text}"
    );
    assert!(
        text.contains("tether_requests_total{decision=\"allow\",reason=\"allowed\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("tether_requests_total{decision=\"deny\",reason=\"policy_denied\"} 2"),
        "{text}"
    );
}

#[test]
fn the_admin_listener_answers_health_and_readiness() {
    let w = World::new();
    for path in ["/healthz", "/readyz"] {
        let r = w.admin(path);
        assert_eq!(r.status, 200, "{path}");
    }
    let r = w.admin("/nope");
    assert_eq!(r.status, 404);
}

#[test]
fn an_unknown_config_field_is_refused_with_its_path_and_line() {
    let dir = tempfile::tempdir().expect("dir");
    let text = tether::demo::EXAMPLE_CONFIG.replace(
        "    action: DeleteRepo\n",
        "    action: DeleteRepo\n    actoin: typo\n",
    );
    let path = dir.path().join("tether.yaml");
    std::fs::write(&path, &text).expect("write");
    let line = text
        .lines()
        .position(|l| l.contains("actoin"))
        .expect("typo line")
        + 1;
    for command in ["check", "run"] {
        let out = Command::new(TETHER)
            .args([command, "--config"])
            .arg(&path)
            .output()
            .expect("tether runs");
        assert!(!out.status.success(), "{command} accepted an unknown field");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("tether.yaml:{line}:")),
            "{command}: {stderr}"
        );
        assert!(
            stderr.contains("routes[2]: unknown field `actoin`"),
            "{command}: {stderr}"
        );
    }
}

#[test]
fn check_reports_every_problem_located() {
    let dir = tempfile::tempdir().expect("dir");
    let text = tether::demo::EXAMPLE_CONFIG
        .replace("address: 127.0.0.1:8080", "address: localhost")
        .replace("max_entries: 100000", "max_entries: 0");
    let path = dir.path().join("tether.yaml");
    std::fs::write(&path, &text).expect("write");
    let out = Command::new(TETHER)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "upstream.address: `localhost`",
        "cache.max_entries",
        "listener.tls.cert",
        "registry.yaml",
    ] {
        assert!(stderr.contains(expected), "missing {expected}: {stderr}");
    }
}

#[test]
fn a_request_in_flight_at_shutdown_is_recorded_as_aborted() {
    // An upstream that takes the request and never answers: the request
    // is still in flight when Tether is told to stop at once.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut w = world_with_upstream(&silent);
    let client = w.sandbox.client(Some(TRIAGE)).expect("client");
    let pending =
        w.rt.spawn(async move { client.send("GET", "/v1/repos/tether/issues", &[]).await });
    // The request has reached the upstream once the connection is there.
    silent.set_nonblocking(false).expect("blocking");
    let (_held, _) = silent.accept().expect("the proxy connects upstream");
    std::thread::sleep(std::time::Duration::from_millis(100));
    w.sandbox.stop("INT").expect("tether stops");
    let _ = w.rt.block_on(pending);
    let lines = w.sandbox.audit_lines(1);
    let last = lines.last().expect("a line");
    assert_eq!(last["reason"], "aborted", "{last}");
    // It had been allowed, and may have been acted on.
    assert_eq!(last["decision"], "allow", "{last}");
    assert_eq!(last["agent"], TRIAGE, "{last}");
    assert_eq!(last["method"], "GET", "{last}");
}

#[test]
fn an_allowed_request_whose_client_hangs_up_is_still_recorded_as_allowed() {
    // The upstream has the request (and may act on it) when the client
    // goes away: an agent must not be able to turn an action into a
    // "deny, nothing forwarded" line by hanging up.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let w = world_with_upstream(&silent);
    let client = w.sandbox.client(Some(TRIAGE)).expect("client");
    let mut connection = w.rt.block_on(client.connect()).expect("connect");
    w.rt.block_on(connection.write(
        b"POST /v1/repos/tether/issues HTTP/1.1\r\nhost: api\r\ncontent-length: 2\r\n\r\n{}",
    ))
    .expect("write");
    let (_held, _) = silent.accept().expect("the proxy connects upstream");
    drop(connection);
    let line = &w.sandbox.audit_lines(1)[0];
    assert_eq!(line["decision"], "allow", "{line}");
    assert_eq!(line["reason"], "client_closed", "{line}");
    assert_eq!(line["agent"], TRIAGE, "{line}");
    let metrics = String::from_utf8_lossy(&w.admin("/metrics").body).into_owned();
    assert!(
        metrics.contains(r#"tether_requests_total{decision="allow",reason="client_closed"} 1"#),
        "{metrics}"
    );
}

#[test]
fn a_protocol_upgrade_is_refused() {
    // After a 101 the proxy would relay raw bytes: no request in a
    // WebSocket would ever be decided.
    let w = World::new();
    let r = w
        .send(
            Some(TRIAGE),
            "GET",
            "/v1/repos/tether/issues",
            &[("connection", "Upgrade"), ("upgrade", "websocket")],
        )
        .expect("response");
    assert_refused(&r, 400, "bad_request");
    // A header pingora itself refuses once the chain has run (it will not
    // strip `host` for a `Connection` naming it) is answered, not dropped.
    let r = w
        .send(
            Some(TRIAGE),
            "GET",
            "/v1/repos/tether/issues",
            &[("connection", "x-tether-agent, host")],
        )
        .expect("an answer, not a closed connection");
    assert_refused(&r, 400, "bad_request");
    let lines = w.sandbox.audit_lines(2);
    assert_eq!(lines.len(), 2, "both recorded: {lines:?}");
    assert_eq!(lines[1]["reason"], "bad_request", "{}", lines[1]);
    assert_eq!(lines[1]["stage"], "upstream", "{}", lines[1]);
}

#[test]
fn an_ipv4_client_of_a_dual_stack_listener_is_seen_as_ipv4() {
    // Policy's `context.source_ip` and the audit line's `client` are one
    // value: `::ffff:127.0.0.1` would be neither loopback nor in any IPv4
    // range to Cedar.
    let w = World::with(|c| c.listener.address = "[::]:0".into());
    let r = w.get(TRIAGE, "/v1/repos/tether/issues");
    assert_eq!(r.status, 200, "{r:?}");
    let line = &w.sandbox.audit_lines(1)[0];
    assert_eq!(line["client"], "127.0.0.1", "{line}");
}

#[test]
fn the_error_log_names_a_failed_request_without_its_query() {
    // Nothing listens there: the upstream connection is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let w = world_with_upstream(&closed);
    drop(closed);
    let r = w.get(TRIAGE, "/v1/repos/tether/issues?access_token=s3cret");
    assert_eq!(r.status, 502, "{r:?}");
    let log = std::fs::read_to_string(w.sandbox.dir.path().join("tether.log")).expect("log");
    assert!(log.contains("/v1/repos/tether/issues"), "{log}");
    assert!(!log.contains("s3cret"), "{log}");
}

#[test]
fn a_method_override_in_the_query_or_a_form_body_is_refused() {
    // Laravel and Symfony serve any of these as the DELETE they name,
    // where Tether would decide the POST (`CreateIssue`) it sees.
    let w = World::new();
    let client = w.sandbox.client(Some(TRIAGE)).expect("client");
    let post = |target: &str, content_type: &str, body: &[u8]| {
        let headers = [("content-type", content_type)];
        let headers = if content_type.is_empty() {
            &headers[..0]
        } else {
            &headers[..]
        };
        w.rt.block_on(client.send_body("POST", target, headers, body))
            .expect("response")
    };
    let form = "application/x-www-form-urlencoded";
    let multipart = "multipart/form-data; boundary=xyz";
    let part = |name: &str| {
        format!(
            "--xyz\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nhello\r\n\
             --xyz\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\nDELETE\r\n--xyz--\r\n"
        )
    };
    for target in [
        "/v1/repos/tether/issues?.method=DELETE",
        "/v1/repos/tether/issues?%20_method=DELETE",
    ] {
        assert_refused(&post(target, "", b""), 400, "bad_request");
    }
    let issues = "/v1/repos/tether/issues";
    assert_refused(
        &post(issues, form, b"title=x&_method=DELETE"),
        400,
        "bad_request",
    );
    // Rack reads a POST body without a type as a form.
    assert_refused(&post(issues, "", b"_method=DELETE"), 400, "bad_request");
    assert_refused(
        &post(issues, multipart, part(".method").as_bytes()),
        400,
        "bad_request",
    );
    // Without one, the same bodies are forwarded whole.
    let r = post(issues, form, b"title=x&body=y");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json().expect("echo")["headers"]["content-length"], "14");
    let body = part("description");
    let r = post(issues, multipart, body.as_bytes());
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json().expect("echo")["headers"]["content-length"],
        body.len().to_string()
    );
    let lines = w.sandbox.audit_lines(7);
    let refusals: Vec<String> = lines
        .iter()
        .take(5)
        .map(|l| format!("{}/{}/{}", l["decision"], l["stage"], l["reason"]))
        .collect();
    assert_eq!(
        refusals,
        [
            r#""deny"/"sanitize"/"bad_request""#,
            r#""deny"/"sanitize"/"bad_request""#,
            r#""deny"/"method_override"/"bad_request""#,
            r#""deny"/"method_override"/"bad_request""#,
            r#""deny"/"method_override"/"bad_request""#,
        ],
        "{lines:?}"
    );
}

/// Accepts the proxy's connection on `upstream` and reads what arrives on
/// it until `whole` says the request is complete (then answers `200` and
/// closes, so the next request takes a new connection) or the proxy
/// closes it; returns the bytes and whether the proxy closed it.
fn upstream_receives(
    upstream: std::net::TcpListener,
    whole: impl Fn(&[u8]) -> bool + Send + 'static,
) -> std::thread::JoinHandle<(Vec<u8>, bool)> {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        upstream.set_nonblocking(true).expect("nonblocking");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut conn = loop {
            match upstream.accept() {
                Ok((conn, _)) => break conn,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("the proxy never connected upstream: {e}"),
            }
        };
        conn.set_nonblocking(false).expect("blocking");
        conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => return (received, true),
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(_) => return (received, false),
            }
            if whole(&received) {
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
                return (received, false);
            }
        }
    })
}

#[test]
fn requests_whose_host_or_framing_the_rfc_refuses_are_refused() {
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let w = world_with_upstream(&upstream);
    let client = w.sandbox.client(Some(TRIAGE)).expect("client");
    let raw = |request: &[u8]| {
        w.rt.block_on(async {
            let mut conn = client.connect().await.expect("connect");
            conn.write(request).await.expect("write");
            conn.read_response().await.expect("response")
        })
    };
    // A list in `Host`: Tether would route on the whole string, the
    // upstream on either name. No `Host` at all in HTTP/1.1.
    let r = raw(b"GET /v1/repos/tether/issues HTTP/1.1\r\nhost: localhost, evil.example\r\n\r\n");
    assert_refused(&r, 400, "bad_request");
    let r = raw(b"GET /v1/repos/tether/issues HTTP/1.1\r\n\r\n");
    assert_refused(&r, 400, "bad_request");
    // Two `Host` lines are refused by pingora before the chain.
    let r = w
        .send(
            Some(TRIAGE),
            "GET",
            "/v1/repos/tether/issues",
            &[("host", "b")],
        )
        .expect("response");
    assert_eq!(r.status, 400, "{r:?}");
    let lines = w.sandbox.audit_lines(2);
    for line in &lines {
        assert_eq!(line["stage"], "sanitize", "{line}");
        assert_eq!(line["reason"], "bad_request", "{line}");
    }

    // Two `Content-Length` lines of one value reach the upstream as one.
    let receives = upstream_receives(upstream.try_clone().expect("listener"), |r| {
        r.ends_with(b"\r\n\r\n{}")
    });
    let r = raw(b"POST /v1/repos/tether/issues HTTP/1.1\r\nhost: api\r\n\
          content-type: application/json\r\n\
          content-length: 2\r\ncontent-length: 2\r\n\r\n{}");
    assert_eq!(r.status, 200, "{r:?}");
    let (received, _) = receives.join().expect("upstream");
    let head = String::from_utf8_lossy(&received).to_ascii_lowercase();
    assert_eq!(head.matches("content-length:").count(), 1, "{head}");

    // A chunk size that is not hex: the request is malformed, refused, and
    // the upstream, which had its head and first chunk, never gets the
    // rest: its connection is closed, not reused.
    let receives = upstream_receives(upstream, |_| false);
    let r = w.rt.block_on(async {
        let mut conn = client.connect().await.expect("connect");
        conn.write(
            b"POST /v1/repos/tether/issues HTTP/1.1\r\nhost: api\r\n\
              content-type: application/json\r\n\
              transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n",
        )
        .await
        .expect("write");
        // The upstream has the head and the first chunk by now.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        conn.write(b"zz\r\nmore\r\n0\r\n\r\n").await.expect("write");
        conn.read_response().await.expect("response")
    });
    assert_refused(&r, 400, "bad_request");
    let (received, closed) = receives.join().expect("upstream");
    assert!(closed, "the upstream connection is closed");
    let received = String::from_utf8_lossy(&received);
    assert!(received.contains("{}"), "{received}");
    assert!(!received.contains("more"), "{received}");
    assert!(!received.ends_with("0\r\n\r\n"), "{received}");
    let lines = w.sandbox.audit_lines(4);
    let last = lines.last().expect("a line");
    assert_eq!(last["decision"], "deny", "{last}");
    assert_eq!(last["reason"], "bad_request", "{last}");
    assert_eq!(last["status"], 400, "{last}");
}

#[test]
fn a_backslash_in_the_path_is_refused() {
    // IIS, ASP.NET and several Node and Python servers read `\` as `/`:
    // decided as issues of a repository `x\..\..\admin` (which policy
    // allows), these would be served as `/v1/admin/issues`.
    let w = World::new();
    for path in [
        "/v1/repos/x\\..\\..\\admin/issues",
        "/v1/repos/x%5C..%5C..%5Cadmin/issues",
        "/v1/repos/x%5c..%5c..%5cadmin/issues",
    ] {
        assert_refused(&w.get(TRIAGE, path), 400, "bad_path");
    }
}

#[test]
fn an_encoded_slash_is_refused_kept_or_decoded_as_configured() {
    use tether_config::EncodedSlash;
    // By default: refused, since back ends differ on what it means.
    let w = World::new();
    assert_refused(
        &w.get(TRIAGE, "/v1/repos/te%2Fther/issues"),
        400,
        "bad_path",
    );
    let line = &w.sandbox.audit_lines(1)[0];
    assert_eq!(line["stage"], "sanitize", "{line}");
    drop(w);

    // `keep`: one segment, the repository `te/ther`, forwarded as sent.
    let w = World::with(|c| c.paths.encoded_slash = EncodedSlash::Keep);
    let r = w.get(TRIAGE, "/v1/repos/te%2Fther/issues");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json().expect("echo")["target"],
        "/v1/repos/te%2Fther/issues"
    );
    let line = &w.sandbox.audit_lines(1)[0];
    assert_eq!(line["resource"], "Repo::\"te/ther\"", "{line}");
    drop(w);

    // `decode`: separators before dot segments and routing, and the
    // decoded path is what the upstream gets.
    let w = World::with(|c| c.paths.encoded_slash = EncodedSlash::Decode);
    let r = w.get(TRIAGE, "/v1/repos/x%2F..%2Ftether/issues");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json().expect("echo")["target"], "/v1/repos/tether/issues");
    assert_refused(
        &w.get(TRIAGE, "/v1/public%2F..%2Fadmin"),
        403,
        "policy_denied",
    );
    drop(w);

    // An upstream may refuse what the global setting keeps.
    let w = World::with(|c| {
        c.paths.encoded_slash = EncodedSlash::Keep;
        if let Some(u) = c.upstream.as_mut() {
            u.encoded_slash = Some(EncodedSlash::Reject);
        }
    });
    assert_refused(
        &w.get(TRIAGE, "/v1/repos/te%2Fther/issues"),
        400,
        "bad_path",
    );
    assert_eq!(w.get(TRIAGE, "/v1/repos/tether/issues").status, 200);
    let line = &w.sandbox.audit_lines(1)[0];
    assert_eq!(line["stage"], "upstream", "{line}");
    assert_eq!(line["reason"], "bad_path", "{line}");
}
