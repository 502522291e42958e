//! What the integration tests share: a runtime, the built-in upstream and
//! a sandboxed `tether run` of the example config.

#![allow(dead_code)] // each test file uses a different part

use std::net::SocketAddr;
use std::path::Path;

use tether::client::Response;
use tether::demo::{admin_get, start_sandbox, Sandbox};
use tether_config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The binary under test.
pub const TETHER: &str = env!("CARGO_BIN_EXE_tether");
/// The example's owned, active agent.
pub const TRIAGE: &str = "spiffe://example.org/agents/issue-triage";

/// A runtime for the test's clients and upstream.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A running Tether in front of the echo upstream.
pub struct World {
    pub rt: tokio::runtime::Runtime,
    pub sandbox: Sandbox,
}

impl World {
    /// The example config as is.
    pub fn new() -> World {
        World::with(|_| {})
    }

    /// The example config, changed by `customize` first.
    pub fn with(customize: impl FnOnce(&mut Config)) -> World {
        let rt = runtime();
        let upstream = rt.block_on(tether::echo::start()).expect("echo upstream");
        let sandbox = start_sandbox(Path::new(TETHER), upstream, customize).expect("tether starts");
        World { rt, sandbox }
    }

    /// One request as `agent` (or with no certificate).
    pub fn send(
        &self,
        agent: Option<&str>,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Response> {
        let client = self.sandbox.client(agent)?;
        self.rt.block_on(client.send(method, path, headers))
    }

    /// A GET as `agent`.
    pub fn get(&self, agent: &str, path: &str) -> Response {
        self.send(Some(agent), "GET", path, &[]).expect("response")
    }

    /// The admin listener's `path`.
    pub fn admin(&self, path: &str) -> Response {
        self.rt
            .block_on(admin_get(self.sandbox.admin, path))
            .expect("admin")
    }

    /// The value of a metric without labels.
    pub fn metric(&self, name: &str) -> f64 {
        let body = self.admin("/metrics").body;
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name}"))
    }
}

/// One plain-HTTP request (as an agent speaks to an egress Tether on
/// loopback), read whole.
pub async fn send_plain(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Response> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nconnection: close\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("host: {addr}\r\n"));
    }
    for (n, v) in headers {
        request.push_str(&format!("{n}: {v}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await?;
    tether::client::parse_response(&raw)
}

/// `POST /reload` at `admin`: the status and the JSON answer.
pub async fn post_reload(admin: SocketAddr) -> (u16, serde_json::Value) {
    let mut s = tokio::net::TcpStream::connect(admin).await.expect("admin");
    s.write_all(
        b"POST /reload HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    .await
    .expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let r = tether::client::parse_response(&raw).expect("response");
    (r.status, r.json().expect("json"))
}

/// Rewrites the sandbox's config file with `change` applied, in one
/// step (a watcher never sees it half written).
pub fn rewrite_config(sandbox: &Sandbox, change: impl FnOnce(&mut Config)) {
    let mut config = Config::load(&sandbox.config).expect("config");
    change(&mut config);
    let tmp = sandbox.config.with_extension("tmp");
    std::fs::write(&tmp, config.to_yaml()).expect("write");
    std::fs::rename(&tmp, &sandbox.config).expect("swap");
}
