//! `tether explain` answers as the proxy does: one table of requests, each
//! sent through the real binary and explained offline from the same
//! config, must get the same decision, reason, refusing stage and upstream.

mod support;

use support::{World, TRIAGE};
use tether::explain::{Explainer, Query};

const INTRUDER: &str = "spiffe://example.org/agents/never-registered";

struct Case {
    agent: &'static str,
    method: &'static str,
    path: &'static str,
    host: &'static str,
    body: Option<&'static str>,
}

fn cases() -> Vec<Case> {
    let case = |agent, method, path, host, body| Case {
        agent,
        method,
        path,
        host,
        body,
    };
    vec![
        // Allowed, to the upstream chosen by host.
        case(
            TRIAGE,
            "GET",
            "/v1/repos/tether/issues",
            "api.example.org",
            None,
        ),
        // Allowed by policy, but no upstream takes this host: the proxy
        // refuses it, and so must explain.
        case(
            TRIAGE,
            "GET",
            "/v1/repos/tether/issues",
            "other.example.org",
            None,
        ),
        // Refused by policy before any upstream is chosen.
        case(TRIAGE, "GET", "/v1/admin", "api.example.org", None),
        case(
            TRIAGE,
            "GET",
            "/v1/public/%2e%2e/admin",
            "api.example.org",
            None,
        ),
        // Refused earlier in the chain.
        case(
            TRIAGE,
            "GET",
            "/v1/repos/%zz/issues",
            "api.example.org",
            None,
        ),
        case(
            INTRUDER,
            "GET",
            "/v1/repos/tether/issues",
            "api.example.org",
            None,
        ),
        case(TRIAGE, "GET", "/v2/nothing", "api.example.org", None),
        // MCP calls, to the upstream chosen by path prefix, whatever host.
        case(
            TRIAGE,
            "POST",
            "/mcp",
            "other.example.org",
            Some(
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_issues","arguments":{"repo":"tether"}}}"#,
            ),
        ),
        case(
            TRIAGE,
            "POST",
            "/mcp",
            "other.example.org",
            Some(
                r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"delete_repo","arguments":{}}}"#,
            ),
        ),
        case(
            TRIAGE,
            "POST",
            "/mcp",
            "other.example.org",
            Some(
                r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","paramſ":{"name":"delete_repo"},"params":{"name":"search_issues"}}"#,
            ),
        ),
    ]
}

#[test]
fn explain_and_the_proxy_decide_every_request_alike() {
    let w = World::with(|c| {
        let echo = c.upstream.take().expect("the sandbox's upstream");
        c.upstreams = serde_json::from_value(serde_json::json!([
            {"name": "api", "hosts": ["api.example.org"], "address": echo.address},
            {"name": "mcp", "path_prefix": "/mcp", "address": echo.address},
        ]))
        .expect("upstreams");
    });
    let explainer = Explainer::load(&w.sandbox.config).expect("explain loads the config");
    let cases = cases();
    for (i, case) in cases.iter().enumerate() {
        let client = w.sandbox.client(Some(case.agent)).expect("client");
        let body = case.body.unwrap_or_default();
        let mut request = format!(
            "{} {} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n",
            case.method, case.path, case.host
        );
        if case.body.is_some() {
            request.push_str(&format!(
                "content-type: application/json\r\ncontent-length: {}\r\n",
                body.len()
            ));
        }
        request.push_str("\r\n");
        request.push_str(body);
        w.rt.block_on(async {
            let mut connection = client.connect().await?;
            connection.write(request.as_bytes()).await?;
            connection.read_to_close().await
        })
        .expect("response");
        let served = w.sandbox.audit_lines(i + 1);
        let served = served.get(i).expect("the request's audit line");
        let explained = explainer
            .decide(&Query {
                name: String::new(),
                agent: case.agent.into(),
                method: case.method.into(),
                path: case.path.into(),
                host: Some(case.host.into()),
                source_ip: Some([127, 0, 0, 1].into()),
                at: None,
                body: case.body.map(Into::into),
                expect: None,
            })
            .expect("explained");
        for field in [
            "decision", "reason", "stage", "upstream", "action", "resource",
        ] {
            assert_eq!(
                served[field], explained[field],
                "{} {} (host {}): `{field}` differs\nproxy:   {served}\nexplain: {explained}",
                case.method, case.path, case.host
            );
        }
    }
    // The table holds every kind of answer it is meant to compare.
    let lines = w.sandbox.audit_lines(cases.len());
    let reasons: std::collections::BTreeSet<_> =
        lines.iter().filter_map(|l| l["reason"].as_str()).collect();
    for reason in [
        "allowed",
        "no_route",
        "policy_denied",
        "bad_path",
        "unregistered",
        "bad_request",
    ] {
        assert!(reasons.contains(reason), "no `{reason}` in {reasons:?}");
    }
    let upstreams: std::collections::BTreeSet<_> = lines
        .iter()
        .filter_map(|l| l["upstream"].as_str())
        .collect();
    assert_eq!(upstreams, ["api", "mcp"].into(), "both upstreams chosen");
}
