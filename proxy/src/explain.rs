//! `tether explain`: decides a described request offline, through the same
//! chain the proxy runs, and shows why. With `--cases`, checks a file of
//! requests against their expected decisions: policy unit tests.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use pingora_http::RequestHeader;
use serde::Deserialize;
use tether_config::spiffe::SpiffeId;
use tether_config::Config;
use tether_filters::authorize::DecisionCache;
use tether_filters::identity::PeerIdentity;
use tether_filters::record::{AuditRecord, Metrics};
use tether_filters::{Chain, Progress, Reason, RequestCtx, Snapshot};

/// A described request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    /// A name for the case (cases files only).
    #[serde(default)]
    pub name: String,
    /// The caller's SPIFFE ID, as its verified SVID would say.
    pub agent: String,
    /// HTTP method.
    #[serde(default = "default_method")]
    pub method: String,
    /// Request path (normalized as the proxy would).
    pub path: String,
    /// The `Host` the request names: routes with `host:` match only with
    /// one.
    #[serde(default)]
    pub host: Option<String>,
    /// The caller's address.
    #[serde(default)]
    pub source_ip: Option<IpAddr>,
    /// When the request is made (RFC 3339); default now.
    #[serde(default)]
    pub at: Option<String>,
    /// The request body (an MCP JSON-RPC call, on MCP routes).
    #[serde(default)]
    pub body: Option<String>,
    /// Expected outcome (cases files only).
    #[serde(default)]
    pub expect: Option<Expect>,
}

fn default_method() -> String {
    "GET".into()
}

/// What a case expects. Absent fields are not checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// `allow` or `deny`.
    pub decision: String,
    /// A reason code.
    #[serde(default)]
    pub reason: Option<String>,
    /// The determining policies, in any order.
    #[serde(default)]
    pub policies: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Cases {
    cases: Vec<Query>,
}

/// The loaded config, ready to decide requests.
pub struct Explainer {
    snapshot: Arc<Snapshot>,
    chain: Chain,
}

impl Explainer {
    /// Loads a config as `run` would.
    pub fn load(config_path: &Path) -> anyhow::Result<Explainer> {
        let config = Config::load(config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let snapshot =
            Snapshot::load(&config, config_path, 1).map_err(|e| anyhow::anyhow!("{e}"))?;
        let metrics = Metrics::new()?;
        let cache = Arc::new(DecisionCache::new(
            1024,
            Duration::from_secs(60),
            metrics.cache_hits.clone(),
            metrics.cache_misses.clone(),
        ));
        Ok(Explainer {
            snapshot: Arc::new(snapshot),
            // Explained requests name their agent as an SVID would; tokens
            // are not part of the question (the snapshot has no issuers).
            chain: crate::app::chain(&config, cache, &metrics),
        })
    }

    /// Decides `q` and returns the audit record the proxy would write.
    pub fn decide(&self, q: &Query) -> anyhow::Result<serde_json::Value> {
        let id = SpiffeId::parse(&q.agent).map_err(anyhow::Error::msg)?;
        let mut req = RequestHeader::build(q.method.as_str(), q.path.as_bytes(), None)
            .with_context(|| format!("request `{} {}`", q.method, q.path))?;
        match &q.host {
            Some(host) => {
                req.insert_header(http::header::HOST, host)
                    .with_context(|| format!("host `{host}`"))?;
            }
            // An HTTP/1.1 request without `Host` is refused; a question
            // that names no host asks about a request that has none, as
            // HTTP/1.0 may send it.
            None => req.set_version(http::Version::HTTP_10),
        }
        let mut ctx = RequestCtx::new(self.snapshot.clone());
        if let Some(at) = &q.at {
            let t = time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                .with_context(|| format!("`{at}` is not an RFC 3339 instant"))?;
            ctx.started = SystemTime::from(t);
        }
        ctx.client_addr = q.source_ip;
        ctx.peer = Some(Arc::new(PeerIdentity {
            id,
            // A certificate valid whenever the question is asked: explain
            // is about policy, not certificates.
            not_after: i64::MAX,
            cert_sha256: [0; 32],
        }));
        let mut progress = self.chain.run(&mut req, &mut ctx);
        if let Ok(Progress::NeedsBody { resume_at, .. }) = progress {
            ctx.body = Some(q.body.clone().unwrap_or_default().into());
            progress = self.chain.run_from(resume_at, &mut req, &mut ctx);
        }
        let reason = match progress {
            Ok(_) => Reason::Allowed,
            Err(denial) => denial.reason,
        };
        let status = if reason.is_allowed() {
            200
        } else {
            reason.status()
        };
        let record = AuditRecord::new(&ctx, &q.method, reason, status, None);
        let mut json = serde_json::to_value(&record)?;
        if let (Some(d), Some(obj)) = (&ctx.decision, json.as_object_mut()) {
            obj.insert("errors".into(), serde_json::json!(d.errors));
        }
        Ok(json)
    }
}

/// `tether explain` for one request: prints the explanation; returns
/// whether it was allowed.
pub fn run(config_path: &Path, q: &Query, as_json: bool) -> anyhow::Result<bool> {
    let out = Explainer::load(config_path)?.decide(q)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", render(q, &out));
    }
    Ok(out["decision"] == "allow")
}

/// `tether explain --cases FILE`: every case checked; returns whether all
/// matched.
pub fn run_cases(config_path: &Path, cases_path: &Path) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(cases_path)
        .with_context(|| format!("reading {}", cases_path.display()))?;
    let cases: Cases = serde_norway::from_str(&text)
        .with_context(|| format!("parsing {}", cases_path.display()))?;
    let explainer = Explainer::load(config_path)?;
    let mut failures = 0;
    for (i, case) in cases.cases.iter().enumerate() {
        let name = if case.name.is_empty() {
            format!("cases[{i}]")
        } else {
            case.name.clone()
        };
        let Some(expect) = &case.expect else {
            anyhow::bail!("{}: case `{name}` has no `expect`", cases_path.display());
        };
        let got = explainer.decide(case)?;
        let mut problems = Vec::new();
        if got["decision"] != expect.decision.as_str() {
            problems.push(format!(
                "decision `{}`, expected `{}`",
                got["decision"].as_str().unwrap_or("?"),
                expect.decision
            ));
        }
        if let Some(reason) = &expect.reason {
            if got["reason"] != reason.as_str() {
                problems.push(format!(
                    "reason `{}`, expected `{reason}`",
                    got["reason"].as_str().unwrap_or("?")
                ));
            }
        }
        if let Some(policies) = &expect.policies {
            let mut want = policies.clone();
            want.sort();
            let have: Vec<String> =
                serde_json::from_value(got["policies"].clone()).unwrap_or_default();
            if have != want {
                problems.push(format!("policies {have:?}, expected {want:?}"));
            }
        }
        if problems.is_empty() {
            println!("ok    {name}");
        } else {
            failures += 1;
            println!("FAIL  {name}: {}", problems.join("; "));
        }
    }
    println!("{} passed, {failures} failed", cases.cases.len() - failures);
    Ok(failures == 0)
}

fn render(q: &Query, r: &serde_json::Value) -> String {
    let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
    let mut out = String::new();
    let decision = s("decision").to_uppercase();
    out.push_str(&format!(
        "{decision}  {} {}  ({})\n",
        q.method,
        q.path,
        s("reason")
    ));
    out.push_str(&format!("  agent      {}\n", s("agent")));
    out.push_str(&format!(
        "  owner      {} (team {})\n",
        s("owner"),
        s("team")
    ));
    out.push_str(&format!("  path       {} (normalized)\n", s("path")));
    out.push_str(&format!("  route      {}\n", s("route")));
    out.push_str(&format!("  action     {}\n", s("action")));
    out.push_str(&format!("  resource   {}\n", s("resource")));
    let policies: Vec<String> = serde_json::from_value(r["policies"].clone()).unwrap_or_default();
    out.push_str(&format!(
        "  policies   {}\n",
        if policies.is_empty() {
            "none (no permit applied)".into()
        } else {
            policies.join(", ")
        }
    ));
    if let Some(upstream) = r["upstream"].as_str() {
        out.push_str(&format!("  upstream   {upstream}\n"));
    }
    if let Some(stage) = r["stage"].as_str() {
        out.push_str(&format!("  refused by {stage}: {}\n", s("detail")));
    }
    if let Some(errors) = r["errors"].as_array().filter(|e| !e.is_empty()) {
        for e in errors {
            out.push_str(&format!("  error      {}\n", e.as_str().unwrap_or("")));
        }
    }
    if r["shadow"].is_object() {
        out.push_str(&format!(
            "  shadow     {} ({})\n",
            r["shadow"]["decision"].as_str().unwrap_or("-"),
            r["shadow"]["policies"]
        ));
    }
    out
}
