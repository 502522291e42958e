//! `tether demo`: the whole story on one machine, with no setup.
//!
//! It makes a throwaway SPIFFE CA and agent SVIDs, starts a built-in
//! upstream and the real `tether run` (this same binary, as a child
//! process) on free loopback ports with the example policies, drives a
//! few requests, and prints what happened and the audit lines.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tether_config::{AgentSpec, AgentState, Config, Expiry};
use tether_filters::identity::pki::{Issued, Pki};
use time::{Duration as Days, OffsetDateTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::{parse_response, Client, Response};

/// The example policy files, shared with `deploy/examples`.
pub const EXAMPLE_CONFIG: &str = include_str!("../../deploy/examples/tether.yaml");
/// The example Cedar schema.
pub const EXAMPLE_SCHEMA: &str = include_str!("../../deploy/examples/tether.cedarschema");
/// The example policies, by file name.
pub const EXAMPLE_POLICIES: [(&str, &str); 3] = [
    (
        "repos.cedar",
        include_str!("../../deploy/examples/policies/repos.cedar"),
    ),
    (
        "admin.cedar",
        include_str!("../../deploy/examples/policies/admin.cedar"),
    ),
    (
        "mcp.cedar",
        include_str!("../../deploy/examples/policies/mcp.cedar"),
    ),
];

const TRUST_DOMAIN: &str = "example.org";
const TRIAGE: &str = "spiffe://example.org/agents/issue-triage";
const INTERN: &str = "spiffe://example.org/agents/summer-intern-bot";
const STRANGER: &str = "spiffe://example.org/agents/unknown-scraper";

/// A running proxy with its files and ports, stopped on drop.
pub struct Sandbox {
    /// The folder holding config, certificates and the audit log.
    pub dir: tempfile::TempDir,
    /// The CA of `example.org`.
    pub pki: Pki,
    /// The agent-facing listener.
    pub proxy: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// The audit log.
    pub audit: PathBuf,
    /// The config file.
    pub config: PathBuf,
    child: Child,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Sandbox {
    /// Sends the proxy `signal` (`INT`, `TERM`, ...) and waits for it to
    /// exit: how a test sees what a shutdown leaves behind.
    pub fn stop(&mut self, signal: &str) -> anyhow::Result<std::process::ExitStatus> {
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()?;
        anyhow::ensure!(sent.success(), "kill -{signal} failed");
        Ok(self.child.wait()?)
    }

    /// A client presenting a fresh SVID for `spiffe_id` (or none).
    pub fn client(&self, spiffe_id: Option<&str>) -> anyhow::Result<Client> {
        let leaf: Option<Issued> = spiffe_id.map(|id| self.pki.leaf(&[id])).transpose()?;
        Client::new(
            self.proxy,
            &self.pki.ca_pem(),
            leaf.as_ref()
                .map(|l| (l.cert_pem.as_str(), l.key_pem.as_str())),
        )
    }

    /// How the proxy exited, if it has: a test's way to see that no input
    /// stopped it.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The audit lines written so far, waiting up to 5 s for at least `n`.
    pub fn audit_lines(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lines: Vec<serde_json::Value> = std::fs::read_to_string(&self.audit)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            if lines.len() >= n || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The demo's agents: the triage bot is active, the intern bot expired a
/// month ago. Dates are relative to today so the demo never goes stale.
pub fn demo_agents() -> anyhow::Result<Vec<AgentSpec>> {
    let today = OffsetDateTime::now_utc().date();
    let date = |days: i64| {
        Expiry::parse(&(today + Days::days(days)).to_string()).map_err(anyhow::Error::msg)
    };
    Ok(vec![
        AgentSpec {
            id: TRIAGE.into(),
            owner: "alice@example.org".into(),
            team: "platform".into(),
            purpose: "label and route incoming issues".into(),
            expires: date(180)?,
            review_by: Some(date(60)?),
            state: AgentState::Active,
        },
        AgentSpec {
            id: INTERN.into(),
            owner: "carol@example.org".into(),
            team: "platform".into(),
            purpose: "one summer's experiment".into(),
            expires: date(-30)?,
            review_by: None,
            state: AgentState::Active,
        },
    ])
}

/// Writes the example world into a temp folder and starts `tether run` on
/// it. `customize` may change the config before it is written.
pub fn start_sandbox(
    tether: &Path,
    upstream: SocketAddr,
    customize: impl FnOnce(&mut Config),
) -> anyhow::Result<Sandbox> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(TRUST_DOMAIN)?;
    let server = pki.server(&["127.0.0.1", "localhost"])?;
    let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
        let path = dir.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    };
    write("certs/server.pem", &server.cert_pem)?;
    write("certs/server-key.pem", &server.key_pem)?;
    write("certs/example.org.bundle.pem", &pki.ca_pem())?;
    write("tether.cedarschema", EXAMPLE_SCHEMA)?;
    for (name, text) in EXAMPLE_POLICIES {
        write(&format!("policies/{name}"), text)?;
    }

    let audit = dir.path().join("audit.log");
    let mut config = Config::from_yaml(EXAMPLE_CONFIG, Path::new("tether.yaml"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(u) = &mut config.upstream {
        u.address = upstream.to_string();
    }
    config.registry.file = None;
    config.registry.agents = demo_agents()?;
    config.telemetry.otlp = None;
    config.audit.output = audit.display().to_string();
    customize(&mut config);

    // Free ports are picked, released, then bound by the child: another
    // process may take one in between. So a start that fails to bind, or
    // whose port answers from another process, is retried on new ports.
    // A listener on all IPv6 addresses (dual-stack: IPv4 clients arrive
    // as `::ffff:a.b.c.d`) stays one; any other is put on loopback.
    let all_ipv6 = config.listener.address.starts_with("[::]:");
    let mut last_error = None;
    for _ in 0..5 {
        let (proxy, admin) = (free_port()?, free_port()?);
        config.listener.address = match all_ipv6 {
            true => format!("[::]:{}", proxy.port()),
            false => proxy.to_string(),
        };
        config.admin.address = admin.to_string();
        let config_path = write("tether.yaml", &config.to_yaml())?;
        let log = std::fs::File::create(dir.path().join("tether.log"))?;
        let mut child = Command::new(tether)
            .args(["run", "--config"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", tether.display()))?;
        match wait_ready(&mut child, proxy, admin) {
            Ok(()) => {
                return Ok(Sandbox {
                    dir,
                    pki,
                    proxy,
                    admin,
                    audit,
                    config: config_path,
                    child,
                })
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let log =
                    std::fs::read_to_string(dir.path().join("tether.log")).unwrap_or_default();
                last_error = Some(e.context(log));
            }
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow::anyhow!("tether did not start")))
}

/// Waits until `child` itself serves: its admin listener names its pid and
/// its proxy listener accepts connections.
fn wait_ready(child: &mut Child, proxy: SocketAddr, admin: SocketAddr) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let pid = child.id().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("tether exited with {status} before it was ready");
        }
        let ready = rt.block_on(admin_get(admin, "/readyz"));
        match ready {
            Ok(r)
                if r.status == 200
                    && r.header("x-tether-pid") == Some(pid.as_str())
                    && std::net::TcpStream::connect(proxy).is_ok() =>
            {
                return Ok(());
            }
            Ok(r) if r.header("x-tether-pid") != Some(pid.as_str()) => {
                anyhow::bail!("admin port {admin} is served by another process")
            }
            _ => {}
        }
        if Instant::now() > deadline {
            anyhow::bail!("tether was not ready after 20 s");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A plain-HTTP GET to the admin listener.
pub async fn admin_get(admin: SocketAddr, path: &str) -> anyhow::Result<Response> {
    let mut s = tokio::net::TcpStream::connect(admin).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    parse_response(&raw)
}

/// A free loopback port (bound and released: good enough for tests).
pub fn free_port() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

struct Step {
    who: &'static str,
    owner: &'static str,
    request: String,
    expected: &'static str,
    outcome: String,
    note: String,
}

/// Runs the demo; returns whether every step turned out as expected.
pub fn run() -> anyhow::Result<bool> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let upstream = rt.block_on(crate::echo::start())?;
    let tether = std::env::current_exe()?;
    println!(
        "Starting a throwaway SPIFFE CA (trust domain `{TRUST_DOMAIN}`), a demo API and Tether..."
    );
    let sandbox = start_sandbox(&tether, upstream, |_| {})?;
    println!(
        "Tether listens on https://{} (mTLS), admin on http://{}, forwarding to http://{upstream}\n",
        sandbox.proxy, sandbox.admin
    );

    let triage = sandbox.client(Some(TRIAGE))?;
    let mut steps = Vec::new();
    let mut run_step = |who,
                        owner,
                        client: &Client,
                        method: &str,
                        path: &str,
                        headers: &[(&str, &str)],
                        expected| {
        let result = rt.block_on(client.send(method, path, headers));
        let (outcome, note) = describe(result);
        steps.push(Step {
            who,
            owner,
            request: format!("{method} {path}"),
            expected,
            outcome,
            note,
        });
    };

    run_step(
        "issue-triage",
        "alice@example.org",
        &triage,
        "GET",
        "/v1/repos/tether/issues",
        &[],
        "200 allowed",
    );
    run_step(
        "issue-triage",
        "alice@example.org",
        &triage,
        "DELETE",
        "/v1/repos/tether",
        &[],
        "403 policy_denied",
    );
    run_step(
        "issue-triage",
        "alice@example.org",
        &triage,
        "GET",
        "/v1/repos/tether/issues/%2e%2e/%2e%2e/%2e%2e/admin",
        &[],
        "403 policy_denied",
    );
    run_step(
        "unknown-scraper",
        "(none)",
        &sandbox.client(Some(STRANGER))?,
        "GET",
        "/v1/repos/tether/issues",
        &[],
        "403 unregistered",
    );
    run_step(
        "summer-intern-bot",
        "carol@example.org",
        &sandbox.client(Some(INTERN))?,
        "GET",
        "/v1/repos/tether/issues",
        &[],
        "403 expired",
    );
    run_step(
        "(no certificate)",
        "(none)",
        &sandbox.client(None)?,
        "GET",
        "/v1/repos/tether/issues",
        &[],
        "TLS refused",
    );
    run_step(
        "issue-triage",
        "alice@example.org",
        &triage,
        "POST",
        "/v1/repos/tether/issues",
        &[
            ("x-tether-owner", "ceo@example.org"),
            ("content-length", "0"),
        ],
        "200 allowed",
    );

    println!(
        "{:<18} {:<18} {:<54} {:<18} {:<18} note",
        "agent", "owner", "request", "expected", "got"
    );
    println!("{}", "-".repeat(150));
    let mut all_ok = true;
    for s in &steps {
        let ok = s.outcome == s.expected;
        all_ok &= ok;
        println!(
            "{:<18} {:<18} {:<54} {:<18} {:<18} {}{}",
            s.who,
            s.owner,
            s.request,
            s.expected,
            s.outcome,
            if ok { "" } else { "UNEXPECTED " },
            s.note
        );
    }
    let http_requests = steps.iter().filter(|s| s.outcome != "TLS refused").count();
    println!(
        "\nAudit log ({}), one JSON line per request:",
        sandbox.audit.display()
    );
    for line in sandbox.audit_lines(http_requests) {
        println!("{line}");
    }
    println!(
        "\nThe path-traversal request was decided as the path it resolves to (/v1/admin); the \
         spoofed x-tether-owner header was replaced by the registered owner before it reached the API."
    );
    if !all_ok {
        println!("\nSome steps did not turn out as expected; see `got` above.");
    }
    Ok(all_ok)
}

/// `(outcome, note)` for the table: `200 allowed`, `403 expired`, ...
fn describe(result: anyhow::Result<Response>) -> (String, String) {
    match result {
        // Only a TLS alert is the handshake refusing the client; anything
        // else (a refused connection, a reset) is another outcome.
        Err(e)
            if e.chain()
                .any(|c| c.downcast_ref::<rustls::Error>().is_some())
                || root_cause(&e).contains("alert") =>
        {
            (
                "TLS refused".into(),
                format!("handshake failed: {}", root_cause(&e)),
            )
        }
        Err(e) => ("error".into(), root_cause(&e)),
        Ok(r) => {
            let json = r.json().unwrap_or_default();
            if r.status == 200 {
                let owner = json["headers"]["x-tether-owner"].as_str().unwrap_or("?");
                let target = json["target"].as_str().unwrap_or("?");
                (
                    "200 allowed".into(),
                    format!("API got {target} from owner {owner}"),
                )
            } else {
                let reason = json["reason"].as_str().unwrap_or("?");
                (
                    format!("{} {reason}", r.status),
                    json["error"].as_str().unwrap_or("").to_string(),
                )
            }
        }
    }
}

fn root_cause(e: &anyhow::Error) -> String {
    e.chain().last().map(|c| c.to_string()).unwrap_or_default()
}
