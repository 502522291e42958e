//! No input stops the proxy. A release build aborts on any panic, and so
//! does every build of `tether` (its panic hook): one request that reached
//! a panic would end the process for every agent behind it. Each class of
//! hostile input goes to the real binary over real mTLS; after each, the
//! process must still be running and must still serve a clean request.

mod support;

use std::time::Duration;

use support::{World, TRIAGE};

/// Raw requests, one class of input each, sent as they are.
fn hostile_requests() -> Vec<(&'static str, Vec<u8>)> {
    let get = |target: &str, headers: &str| {
        format!("GET {target} HTTP/1.1\r\nhost: api\r\n{headers}connection: close\r\n\r\n")
            .into_bytes()
    };
    let mcp = |body: &[u8]| {
        let mut r = format!(
            "POST /mcp HTTP/1.1\r\nhost: api\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    };
    let deep = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"x","arguments":{{"a":{}1{}}}}}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    vec![
        ("bad escape", get("/v1/repos/%zz/issues", "")),
        ("truncated escape", get("/v1/repos/x/issues%", "")),
        ("encoded NUL", get("/v1/repos/a%00/issues", "")),
        ("not UTF-8 once decoded", get("/v1/repos/%FF%FE/issues", "")),
        ("raw bytes over 0x7f", {
            let mut r = b"GET /v1/repos/\xff\xfe/issues HTTP/1.1\r\nhost: api\r\n".to_vec();
            r.extend_from_slice(b"connection: close\r\n\r\n");
            r
        }),
        ("dot segments above the root", get("/../../../v1/admin", "")),
        ("backslashes", get("/v1/public/..\\admin", "")),
        ("encoded slash", get("/v1/repos/a%2Fb/issues", "")),
        ("a target over the limit", get(&format!("/v1/{}", "a".repeat(9000)), "")),
        ("huge integer segment", get("/v1/repos/99999999999999999999999999/issues", "")),
        ("asterisk form", get("*", "")),
        ("absolute form", get("http://[::1/v1/x", "")),
        ("authority form", get("api:443", "")),
        ("host list", get("/v1/repos/x/issues", "host: a, b\r\n")),
        ("empty host", {
            b"GET /v1/repos/x/issues HTTP/1.1\r\nhost:\r\nconnection: close\r\n\r\n".to_vec()
        }),
        ("bracket host", get("/v1/repos/x/issues", "host: [\r\n")),
        ("method override", get("/v1/repos/x/issues?_method=DELETE", "")),
        ("odd method", b"FROB\x01 /v1/x HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n".to_vec()),
        ("garbage token", get("/v1/repos/x/issues", "authorization: Bearer a.b.c\r\n")),
        ("token of dots", get("/v1/repos/x/issues", "authorization: Bearer ....\r\n")),
        ("token header not JSON", get("/v1/repos/x/issues", "authorization: Bearer bm90IGpzb24.e30.AA\r\n")),
        ("authorization not text", {
            let mut r = b"GET /v1/repos/x/issues HTTP/1.1\r\nhost: api\r\nauthorization: Bearer \xff\xfe\r\n".to_vec();
            r.extend_from_slice(b"connection: close\r\n\r\n");
            r
        }),
        ("a header not text", {
            let mut r = b"GET /v1/repos/x/issues HTTP/1.1\r\nhost: api\r\nx-note: \xc3\x28\r\n".to_vec();
            r.extend_from_slice(b"connection: close\r\n\r\n");
            r
        }),
        ("many headers", get("/v1/repos/x/issues", &"x-a: b\r\n".repeat(200))),
        ("traceparent garbage", get("/v1/repos/x/issues", "traceparent: 00-zz-yy-01\r\ntracestate: ,,,=\r\n")),
        ("upgrade", get("/v1/repos/x/issues", "connection: upgrade\r\nupgrade: websocket\r\n")),
        ("bad chunk size", {
            b"POST /v1/repos/x/issues HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\nzz\r\nab\r\n0\r\n\r\n".to_vec()
        }),
        ("overflowing chunk size", {
            b"POST /v1/repos/x/issues HTTP/1.1\r\nhost: api\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\nffffffffffffffffffff\r\nab\r\n0\r\n\r\n".to_vec()
        }),
        ("two content lengths", {
            b"POST /v1/repos/x/issues HTTP/1.1\r\nhost: api\r\ncontent-length: 2\r\ncontent-length: 3\r\nconnection: close\r\n\r\n{}".to_vec()
        }),
        ("mcp: not JSON", mcp(b"{\"jsonrpc\":")),
        ("mcp: not UTF-8", mcp(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"\xff\"}")),
        ("mcp: a batch", mcp(br#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"}]"#)),
        ("mcp: nested too deep", mcp(deep.as_bytes())),
        ("mcp: huge numbers", mcp(br#"{"jsonrpc":"2.0","id":1e999,"method":"tools/call","params":{"name":"x","arguments":{"n":1e999,"m":-99999999999999999999999}}}"#)),
        ("mcp: id of every type", mcp(br#"{"jsonrpc":"2.0","id":{"a":[null]},"method":"tools/list"}"#)),
        ("mcp: arguments not an object", mcp(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":[1]}}"#)),
        ("mcp: keys alike", mcp(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"a":1,"A":2}}}"#)),
        ("mcp: a lone surrogate", mcp(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"\ud800","arguments":{}}}"#)),
    ]
}

#[test]
fn no_class_of_hostile_input_stops_the_proxy() {
    let mut w = World::new();
    let client = w.sandbox.client(Some(TRIAGE)).expect("client");
    for (class, raw) in hostile_requests() {
        let answered = w.rt.block_on(async {
            let mut connection = client.connect().await?;
            connection.write(&raw).await?;
            // Answered or closed: either is fine, as long as the proxy lives.
            tokio::time::timeout(Duration::from_secs(15), connection.read_response())
                .await
                .map_err(anyhow::Error::from)?
        });
        if let Ok(r) = &answered {
            assert!(r.status < 500 || r.status == 502, "{class}: {r:?}");
        }
        assert_eq!(w.sandbox.exited(), None, "the proxy died on: {class}");
        let r = w.get(TRIAGE, "/v1/repos/tether/issues");
        assert_eq!(r.status, 200, "after {class}: {r:?}");
    }
}
