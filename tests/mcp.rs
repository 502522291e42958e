//! MCP tool-level authorization end to end: a real JSON-RPC upstream on
//! loopback behind the real binary, the example's MCP policies.

mod support;

use serde_json::{json, Value};
use support::{World, TRIAGE};
use tether::client::Response;

fn world() -> World {
    World::new()
}

trait Mcp {
    fn post(&self, body: &[u8]) -> Response;
    fn call(&self, method: &str, params: Value) -> Response;
}

impl Mcp for World {
    fn post(&self, body: &[u8]) -> Response {
        let client = self.sandbox.client(Some(TRIAGE)).expect("client");
        self.rt
            .block_on(client.send_body(
                "POST",
                "/mcp",
                &[("content-type", "application/json")],
                body,
            ))
            .expect("response")
    }

    fn call(&self, method: &str, params: Value) -> Response {
        self.post(
            json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params})
                .to_string()
                .as_bytes(),
        )
    }
}

fn tool(name: &str, arguments: Value) -> Value {
    json!({"name": name, "arguments": arguments})
}

fn assert_rpc_error(r: &Response, status: u16, code: i64, reason: &str) {
    assert_eq!(r.status, status, "{r:?}");
    let body = r.json().expect("json-rpc body");
    assert_eq!(body["jsonrpc"], "2.0");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(body["error"]["data"]["reason"], reason, "{body}");
}

#[test]
fn an_allowed_tool_call_reaches_the_server_with_its_body() {
    let w = world();
    let r = w.call(
        "tools/call",
        tool("create_issue", json!({"repo": "tether", "title": "hi"})),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let body = r.json().expect("json");
    assert_eq!(body["id"], 7);
    // The upstream received the very call that was decided on.
    assert_eq!(
        body["result"]["received"]["params"]["arguments"]["repo"],
        "tether"
    );
    assert_eq!(
        body["result"]["headers"]["x-tether-owner"],
        "alice@example.org"
    );
    let line = &w.sandbox.audit_lines(1)[0];
    assert_eq!(line["mcp_method"], "tools/call");
    assert_eq!(line["tool"], "create_issue");
    assert_eq!(line["action"], "Action::\"tools/call\"");
    assert_eq!(line["resource"], "Tool::\"create_issue\"");
    assert_eq!(line["policies"], json!(["issue-tools"]));
}

#[test]
fn denied_tools_and_arguments_get_a_json_rpc_error() {
    let w = world();
    // A tool no policy permits.
    assert_rpc_error(
        &w.call("tools/call", tool("delete_repo", json!({"repo": "tether"}))),
        403,
        -32001,
        "policy_denied",
    );
    // A permitted tool, refused for its arguments.
    let r = w.call(
        "tools/call",
        tool("create_issue", json!({"repo": "private-payroll"})),
    );
    assert_rpc_error(&r, 403, -32001, "policy_denied");
    assert_eq!(
        r.json().expect("json")["id"],
        7,
        "the error answers the call"
    );
    // The same tool with other arguments is a different decision.
    assert_eq!(
        w.call(
            "tools/call",
            tool("create_issue", json!({"repo": "public"}))
        )
        .status,
        200
    );
    let lines = w.sandbox.audit_lines(3);
    assert_eq!(lines[1]["policies"], json!(["no-issues-in-private-repos"]));
    assert_eq!(lines[2]["decision"], "allow");
    // A method the schema does not declare.
    assert_rpc_error(
        &w.call("resources/read", json!({"uri": "file:///etc/passwd"})),
        403,
        -32001,
        "no_route",
    );
}

#[test]
fn tools_list_shows_only_the_tools_the_agent_may_call() {
    let w = world();
    let r = w.call("tools/list", json!({}));
    assert_eq!(r.status, 200, "{r:?}");
    let names: Vec<String> = r.json().expect("json")["result"]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .map(|t| t["name"].as_str().unwrap_or("").to_string())
        .collect();
    // delete_repo is offered by the server but no policy permits it;
    // create_issue is permitted depending on its arguments, so it shows.
    assert_eq!(names, ["search_issues", "create_issue"]);
}

#[test]
fn a_tools_list_answer_tether_cannot_filter_is_replaced_by_an_error() {
    let w = world();
    let client = w.sandbox.client(Some(TRIAGE)).expect("client");
    let list = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/list", "params": {}});
    let send = |headers: &[(&str, &str)]| {
        let mut all = vec![("content-type", "application/json")];
        all.extend_from_slice(headers);
        w.rt.block_on(client.send_body("POST", "/mcp", &all, list.to_string().as_bytes()))
            .expect("response")
    };
    // The server answers with HTML, whose tools Tether cannot see.
    let r = send(&[("accept", "text/html")]);
    assert_rpc_error(&r, 502, -32001, "upstream_error");
    assert!(
        !String::from_utf8_lossy(&r.body).contains("delete_repo"),
        "{r:?}"
    );
    // Tether asks for an answer it can read: no encoding.
    let r = send(&[("accept-encoding", "gzip, br")]);
    assert_eq!(r.status, 200, "{r:?}");
    let body = r.json().expect("json");
    assert_eq!(
        body["result"]["_meta"]["accept-encoding"],
        Value::Null,
        "{body}"
    );
}

#[test]
fn tools_list_sent_as_server_sent_events_is_filtered_too() {
    let w = world();
    let client = w.sandbox.client(Some(TRIAGE)).expect("client");
    let list = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/list", "params": {}});
    // What MCP clients send: either, events preferred (the test server
    // answers with events when they come first).
    let r =
        w.rt.block_on(client.send_body(
            "POST",
            "/mcp",
            &[
                ("content-type", "application/json"),
                ("accept", "text/event-stream, application/json"),
            ],
            list.to_string().as_bytes(),
        ))
        .expect("response");
    assert_eq!(r.status, 200, "{r:?}");
    // Tether's own encoding, UTF-8, whatever the server said.
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let body = String::from_utf8(r.body.clone()).expect("utf-8");
    let events: Vec<Value> = body
        .split("\n\n")
        .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|data| serde_json::from_str(data).expect("one JSON line per event"))
        .collect();
    // The server's notification passes; its answer, split over two data
    // lines, arrives whole and filtered.
    assert_eq!(events.len(), 2, "{body}");
    assert_eq!(events[0]["method"], "notifications/progress");
    assert_eq!(events[1]["id"], 7);
    let names: Vec<&str> = events[1]["result"]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["search_issues", "create_issue"], "{body}");
}

#[test]
fn batches_malformed_and_oversized_bodies_never_bypass_policy() {
    let w = world();
    let batch = json!([
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": tool("search_issues", json!({}))},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": tool("delete_repo", json!({}))},
    ]);
    assert_rpc_error(
        &w.post(batch.to_string().as_bytes()),
        400,
        -32600,
        "bad_request",
    );
    assert_rpc_error(
        &w.post(b"{\"jsonrpc\":\"2.0\",\"method\":"),
        400,
        -32700,
        "bad_request",
    );
    assert_rpc_error(
        &w.post(b"{\"jsonrpc\":\"2.0\",\"id\":1}"),
        400,
        -32600,
        "bad_request",
    );
    let huge = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": tool("search_issues", json!({"q": "x".repeat(70_000)}))});
    assert_rpc_error(
        &w.post(huge.to_string().as_bytes()),
        413,
        -32600,
        "body_too_large",
    );
    // None of them reached the upstream: every audit line is a refusal.
    let lines = w.sandbox.audit_lines(4);
    assert_eq!(lines.len(), 4, "every refusal recorded");
    for line in lines {
        assert_eq!(line["decision"], "deny", "{line}");
        assert_eq!(line["stage"], "mcp", "{line}");
    }
}

#[test]
fn a_body_that_trickles_in_is_cut_off_and_the_call_never_decided() {
    // The stages before the body decided when the headers came: a call
    // may not hold that decision open a chunk at a time (past an
    // offboarding, or the end of business hours).
    let w = world();
    let client = w.sandbox.client(Some(TRIAGE)).expect("client");
    let started = std::time::Instant::now();
    let r = w.rt.block_on(async {
        let mut c = client.connect().await?;
        c.write(
            b"POST /mcp HTTP/1.1\r\nhost: tether\r\ncontent-type: application/json\r\n\
              transfer-encoding: chunked\r\n\r\n1\r\n \r\n",
        )
        .await?;
        // Nothing more: a slow sender would add a space now and then,
        // each within pingora's 60 s per read.
        c.read_response().await
    });
    let r = r.expect("an answer");
    assert_rpc_error(&r, 400, -32600, "bad_request");
    let elapsed = started.elapsed();
    assert!(
        elapsed < std::time::Duration::from_secs(20),
        "cut off after {elapsed:?}"
    );
    let line = &w.sandbox.audit_lines(1)[0];
    assert!(
        line["detail"]
            .as_str()
            .unwrap_or("")
            .contains("not received within"),
        "{line}"
    );
}

#[test]
fn keys_a_go_server_reads_otherwise_are_refused_and_never_forwarded() {
    // Go's `encoding/json` matches keys under Unicode case folding: `ſ`
    // is `s`, `K` (Kelvin) is `k`. Each body here is one call to Tether
    // and another to such a server.
    let w = world();
    for body in [
        // Decided as `search_issues`; a Go server would run `delete_repo`.
        r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"search_issues","arguments":{}},"param\u017f":{"name":"delete_repo","arguments":{}}}"#,
        // Arguments the forbid never saw.
        r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"create_issue","arguments":{"repo":"public"},"argument\u017f":{"repo":"private-payroll"}}}"#,
        // No `repo` to Cedar, so the forbid on it cannot fire; `repo` to
        // the server.
        r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"create_issue","arguments":{"REPO":"private-payroll"}}}"#,
    ] {
        assert_rpc_error(&w.post(body.as_bytes()), 400, -32600, "bad_request");
    }
    for line in w.sandbox.audit_lines(3) {
        assert_eq!(line["decision"], "deny", "{line}");
        assert_eq!(line["stage"], "mcp", "{line}");
    }
}

#[test]
fn the_server_receives_the_call_as_parsed_written_out_again() {
    let w = world();
    let client = w.sandbox.client(Some(TRIAGE)).expect("client");
    // Escapes, spaces and a number written long, sent in chunks with a
    // `charset` no server should decode it by.
    let body = br#"{ "jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "cre\u0061te_issue", "arguments": {"repo": "tether", "title": "caf\u00e9", "n": 1.50}}}"#;
    let mut request = b"POST /mcp HTTP/1.1\r\nhost: tether\r\nconnection: close\r\n\
        content-type: application/json; charset=utf-16\r\ntransfer-encoding: chunked\r\n\r\n"
        .to_vec();
    let (head, tail) = body.split_at(40);
    for chunk in [head, tail] {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let r = w.rt.block_on(client.send_raw(&request)).expect("response");
    assert_eq!(r.status, 200, "{r:?}");
    let answer = r.json().expect("json");
    let forwarded = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"create_issue","arguments":{"repo":"tether","title":"café","n":1.5}}}"#;
    assert_eq!(answer["result"]["raw"], forwarded, "{answer}");
    let headers = &answer["result"]["headers"];
    assert_eq!(
        headers["content-length"],
        forwarded.len().to_string(),
        "{headers}"
    );
    assert_eq!(headers["content-type"], "application/json", "{headers}");
    assert_eq!(headers.get("transfer-encoding"), None, "{headers}");
}

/// The example world with the MCP endpoint's `GET` (the server's stream
/// of a Streamable HTTP session) routed, as the session it belongs to.
fn world_with_mcp_stream() -> World {
    World::with(|c| {
        let mcp = c
            .routes
            .iter()
            .find(|r| r.mcp.is_some())
            .expect("an MCP route")
            .clone();
        let mut stream = mcp;
        stream.method = tether_config::OneOrMany::One("GET".into());
        stream.mcp = None;
        stream.action = Some("initialize".into());
        c.routes.push(stream);
    })
}

#[test]
fn a_get_stream_replaying_a_tools_list_reaches_the_client_filtered() {
    let w = world_with_mcp_stream();
    // Resumed after `Last-Event-ID`, the server replays the answer to an
    // earlier `tools/list`: the client takes it by its id, whichever
    // request's stream it came on.
    let r = w
        .send(
            Some(TRIAGE),
            "GET",
            "/mcp",
            &[("accept", "text/event-stream"), ("last-event-id", "40")],
        )
        .expect("response");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let body = String::from_utf8(r.body.clone()).expect("utf-8");
    assert!(!body.contains("delete_repo"), "{body}");
    let data = body
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("an event");
    let event: Value = serde_json::from_str(data).expect("json");
    assert_eq!(event["id"], 3);
    let names: Vec<&str> = event["result"]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["search_issues", "create_issue"], "{body}");
    assert!(body.starts_with("id: 41\nevent: message\n"), "{body}");
}

#[test]
fn tools_in_another_answer_and_twins_a_client_reads_are_filtered_too() {
    let w = world();
    let names = |r: &Response| -> Vec<String> {
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            !String::from_utf8_lossy(&r.body).contains("delete_repo"),
            "{r:?}"
        );
        r.json().expect("json")["result"]["tools"]
            .as_array()
            .expect("tools")
            .iter()
            .map(|t| t["name"].as_str().unwrap_or("").to_string())
            .collect()
    };
    // A `Tools` list beside `tools`, a `Name` beside a kept tool's `name`:
    // a Go client would read either. Only what Tether read goes on.
    let r = w.call("tools/list", json!({"cursor": "twins"}));
    assert_eq!(names(&r), ["search_issues", "create_issue"]);
    let answer = r.json().expect("json");
    assert_eq!(answer["result"].get("Tools"), None, "{answer}");
    assert_eq!(answer["result"]["tools"][0].get("Name"), None, "{answer}");
    // An answer to another method that carries a list of tools.
    let r = w.call("initialize", json!({"_meta": {"tools": true}}));
    assert_eq!(names(&r), ["search_issues", "create_issue"]);
    // Other answers pass as they were read.
    let r = w.call("tools/call", tool("search_issues", json!({"q": "bug"})));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json().expect("json")["result"]["received"]["params"]["arguments"]["q"],
        "bug"
    );
}
