//! Who is accountable for what happened: one audit line and one set of
//! metrics per request, for every outcome, denials and errors included.
//!
//! [`AuditRecord`] is the one statement of a request's facts; the audit
//! line is it serialized, and the proxy's span attributes are read from it,
//! so the two can never disagree.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use arrayvec::ArrayString;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use serde::Serialize;
use time::OffsetDateTime;

use crate::context::RequestIdText;
use crate::{IdentityKind, Reason, RequestCtx};

mod json;

/// A trace id as text: 32 hex digits.
pub type TraceIdText = ArrayString<32>;

/// A time as RFC 3339 text, to the nanosecond (`2026-12-02T16:09:04.123456789Z`
/// is 30 bytes).
type TimeText = ArrayString<TIME_TEXT>;
const TIME_TEXT: usize = 40;

/// An IP address as text: the longest IPv6 form is 45 bytes.
type AddressText = ArrayString<45>;

/// Tether's Prometheus metrics, all prefixed `tether_`.
pub struct Metrics {
    /// The registry `/metrics` serves.
    pub registry: Registry,
    /// Per reason, its series (`allow` for `allowed`, else `deny`) and,
    /// for a failure that can follow an allow, the `allow` series of it.
    requests: Vec<(IntCounter, Option<IntCounter>)>,
    request_duration: Histogram,
    /// Decisions answered from the cache.
    pub cache_hits: IntCounter,
    /// Decisions evaluated by Cedar.
    pub cache_misses: IntCounter,
    /// Decisions held in the cache, set at scrape time.
    pub cache_entries: IntGauge,
    /// Audit lines dropped because the writer fell behind.
    pub audit_dropped: IntCounter,
    /// Spans dropped because the exporter fell behind.
    pub spans_dropped: IntCounter,
    /// Client certificates refused during the TLS handshake, by reason.
    pub client_cert_rejected: IntCounterVec,
    /// Upstream certificates refused, by upstream and reason.
    pub upstream_cert_rejected: IntCounterVec,
    /// The generation of the snapshot serving requests.
    pub config_generation: IntGauge,
    /// Reloads refused because the new version was invalid.
    pub config_reload_failures: IntCounter,
    /// 1 if the last reload attempt succeeded, 0 if the old version kept
    /// serving because the new one was refused.
    pub config_last_reload_successful: IntGauge,
    /// Requests where the shadow policies decided differently.
    pub shadow_disagreements: IntCounter,
    /// Seconds until each certificate Tether holds expires (negative once
    /// expired), by `certificate`: `listener`, `workload`, `bundle:<td>`.
    /// Set at scrape time.
    pub certificate_expiry: IntGaugeVec,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests_vec = IntCounterVec::new(
            Opts::new(
                "tether_requests_total",
                "Requests handled, by decision (allow or deny) and reason code.",
            ),
            &["decision", "reason"],
        )?;
        registry.register(Box::new(requests_vec.clone()))?;
        // One handle per reason and decision, resolved now: no label
        // lookup per request, and every series exists from the start (at
        // zero). Only reasons that can follow an allow have an allow series.
        let requests = Reason::ALL
            .iter()
            .map(|r| {
                let series = |allowed| {
                    requests_vec.with_label_values(&[decision_label(*r, allowed), r.code()])
                };
                let after_allow = (!r.is_allowed() && r.can_follow_allow()).then(|| series(true));
                (series(false), after_allow)
            })
            .collect();
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let request_duration = Histogram::with_opts(
            HistogramOpts::new(
                "tether_request_duration_seconds",
                "Time from request arrival to the end of the response, all outcomes.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0,
            ]),
        )?;
        registry.register(Box::new(request_duration.clone()))?;
        let client_cert_rejected = IntCounterVec::new(
            Opts::new(
                "tether_client_cert_rejected_total",
                "Client certificates refused during the TLS handshake, by reason.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(client_cert_rejected.clone()))?;
        let upstream_cert_rejected = IntCounterVec::new(
            Opts::new(
                "tether_upstream_cert_rejected_total",
                "Upstream certificates refused during the TLS handshake (an upstream authorized by SPIFFE ID), by upstream and reason.",
            ),
            &["upstream", "reason"],
        )?;
        registry.register(Box::new(upstream_cert_rejected.clone()))?;
        let certificate_expiry = IntGaugeVec::new(
            Opts::new(
                "tether_certificate_expiry_seconds",
                "Seconds until the certificate expires: the listener's, the workload SVID, each trust bundle's first to expire.",
            ),
            &["certificate"],
        )?;
        registry.register(Box::new(certificate_expiry.clone()))?;
        Ok(Metrics {
            certificate_expiry,
            requests,
            request_duration,
            cache_hits: counter(
                "tether_decision_cache_hits_total",
                "Authorization decisions answered from the cache.",
            )?,
            cache_misses: counter(
                "tether_decision_cache_misses_total",
                "Authorization decisions evaluated by Cedar.",
            )?,
            cache_entries: gauge(
                "tether_decision_cache_entries",
                "Decisions held in the cache.",
            )?,
            audit_dropped: counter(
                "tether_audit_dropped_total",
                "Audit lines dropped because the writer fell behind.",
            )?,
            spans_dropped: counter(
                "tether_spans_dropped_total",
                "Spans dropped because the exporter fell behind or failed.",
            )?,
            config_generation: gauge(
                "tether_config_generation",
                "Generation of the configuration serving requests.",
            )?,
            config_reload_failures: counter(
                "tether_config_reload_failures_total",
                "Reloads refused because the new configuration was invalid.",
            )?,
            config_last_reload_successful: gauge(
                "tether_config_last_reload_successful",
                "1 if the last reload succeeded, 0 if the previous version kept serving.",
            )?,
            shadow_disagreements: counter(
                "tether_shadow_disagreements_total",
                "Requests where the shadow policies decided differently from the enforced ones.",
            )?,
            client_cert_rejected,
            upstream_cert_rejected,
            registry,
        })
    }

    /// Counts one finished request.
    /// Counts a finished request: its `reason`, and whether every stage
    /// `allowed` it ([`RequestCtx::allowed`]).
    pub fn observe(&self, reason: Reason, allowed: bool, elapsed: Duration) {
        if let Some(i) = Reason::ALL.iter().position(|r| *r == reason) {
            match &self.requests[i] {
                (_, Some(after_allow)) if allowed => after_allow.inc(),
                (series, _) => series.inc(),
            }
        }
        self.request_duration.observe(elapsed.as_secs_f64());
    }

    /// The count of requests with `reason` so far, allowed or not.
    pub fn requests(&self, reason: Reason) -> u64 {
        Reason::ALL
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| {
                let (series, after_allow) = &self.requests[i];
                series.get() + after_allow.as_ref().map_or(0, IntCounter::get)
            })
    }
}

/// `allow` for a request every stage let through, even if it then failed
/// upstream or the client went away (the reason says so); else `deny`.
fn decision_label(reason: Reason, allowed: bool) -> &'static str {
    if reason.is_allowed() || (allowed && reason.can_follow_allow()) {
        "allow"
    } else {
        "deny"
    }
}

/// The facts of one finished request.
#[derive(Debug, Serialize)]
pub struct AuditRecord<'a> {
    /// When the request arrived, RFC 3339 UTC.
    pub time: TimeText,
    /// Tether's request id.
    pub request_id: RequestIdText,
    /// The trace the request's span belongs to, when tracing is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<TraceIdText>,
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// The reason code.
    pub reason: &'static str,
    /// The stage that refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<&'static str>,
    /// What exactly went wrong, for operators.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
    /// The caller's verified identity.
    pub agent: Option<&'a str>,
    /// How it was verified.
    pub identity_kind: Option<&'static str>,
    /// For whom the agent acts, when a token delegates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_behalf_of: Option<&'a str>,
    /// The whole delegation chain: the subject, then each agent in turn,
    /// the last being `agent`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delegation_chain: Option<Vec<&'a str>>,
    /// The agent's human owner.
    pub owner: Option<&'a str>,
    /// The owner's team.
    pub team: Option<&'a str>,
    /// HTTP method.
    pub method: &'a str,
    /// The normalized path.
    pub path: &'a str,
    /// The matched route template.
    pub route: Option<&'a str>,
    /// The Cedar action.
    pub action: Option<Cow<'a, str>>,
    /// The Cedar resource.
    pub resource: Option<String>,
    /// The JSON-RPC method, on MCP routes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mcp_method: Option<&'a str>,
    /// The tool called, on MCP routes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<&'a str>,
    /// The upstream chosen for it (its `name`, else its address), once
    /// policy allowed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<&'a str>,
    /// The policies that determined the decision.
    pub policies: &'a [String],
    /// Whether the decision came from the cache.
    pub cached: Option<bool>,
    /// What the shadow policies decided, when loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowRecord<'a>>,
    /// The HTTP status sent to the caller.
    pub status: u16,
    /// The TCP peer address.
    pub client: Option<AddressText>,
    /// Milliseconds from arrival to the end of the response.
    pub duration_ms: f64,
    /// The configuration generation the request was decided under.
    pub generation: u64,
    /// The agent's review date has passed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub review_overdue: bool,
}

/// The shadow policy set's verdict in a record.
#[derive(Debug, Serialize)]
pub struct ShadowRecord<'a> {
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// The shadow policies that determined it.
    pub policies: &'a [String],
}

impl<'a> AuditRecord<'a> {
    /// The record of a finished request. `reason` is the final outcome
    /// (a stage's denial, or what happened upstream).
    pub fn new(
        ctx: &'a RequestCtx,
        method: &'a str,
        reason: Reason,
        status: u16,
        trace_id: Option<TraceIdText>,
    ) -> AuditRecord<'a> {
        let started = OffsetDateTime::from(ctx.started);
        let matched = ctx
            .route
            .as_ref()
            .and_then(|m| Some((m, ctx.snapshot.routes.get(m.index)?)));
        let template = matched.map(|(_, r)| &*r.template);
        let delegation = ctx.principal.as_ref().and_then(|p| p.delegation.as_deref());
        // A request refused before the identity stage named a principal (a
        // bad path, an `Upgrade`, a forged token) still came on a verified
        // connection: the record names that peer and its registered owner,
        // so the probing requests are the ones that are not anonymous.
        let peer = match &ctx.principal {
            Some(_) => None,
            None => ctx.peer.as_deref(),
        };
        let registered = ctx.agent.as_deref().or_else(|| {
            peer.and_then(|p| ctx.snapshot.registry.get(p.id.as_str()))
                .map(|a| &**a)
        });
        AuditRecord {
            time: rfc3339(started),
            request_id: ctx.request_id.text(),
            trace_id,
            decision: decision_label(reason, ctx.allowed),
            reason: reason.code(),
            stage: ctx.denied_by,
            detail: ctx.denial.as_ref().map(|d| d.detail.as_ref()),
            agent: match &ctx.principal {
                Some(p) => Some(p.id.as_str()),
                None => peer.map(|p| p.id.as_str()),
            },
            identity_kind: match &ctx.principal {
                Some(p) => Some(p.kind.as_str()),
                None => peer.map(|_| IdentityKind::X509Svid.as_str()),
            },
            on_behalf_of: delegation.map(|d| &*d.subject),
            delegation_chain: delegation.map(|d| d.chain()),
            owner: registered.map(|a| &*a.owner),
            team: registered.map(|a| &*a.team),
            method,
            path: &ctx.path,
            route: template,
            action: matched.map(|(m, r)| r.action_text(m)),
            resource: matched.and_then(|(m, r)| r.resource_text(m)),
            mcp_method: ctx.mcp.as_ref().map(|m| m.method.as_str()),
            tool: ctx.mcp.as_ref().and_then(|m| m.tool.as_deref()),
            upstream: ctx.upstream.as_ref().map(|u| &*u.name),
            policies: ctx.decision.as_deref().map_or(&[], |d| &d.policies),
            cached: ctx.cache_hit,
            shadow: ctx
                .decision
                .as_deref()
                .and_then(|d| d.shadow.as_ref())
                .map(|s| ShadowRecord {
                    decision: if s.allowed { "allow" } else { "deny" },
                    policies: &s.policies,
                }),
            status,
            client: ctx.client_addr.map(address_text),
            duration_ms: SystemTime::now()
                .duration_since(ctx.started)
                .unwrap_or_default()
                .as_secs_f64()
                * 1000.0,
            generation: ctx.snapshot.generation,
            review_overdue: ctx
                .agent
                .as_deref()
                .is_some_and(|a| a.review_overdue(started)),
        }
    }
}

/// `time` as RFC 3339 text; empty if it cannot be written so (a year past
/// 9999), as the record must still be written.
fn rfc3339(time: OffsetDateTime) -> TimeText {
    let mut bytes = [0u8; TIME_TEXT];
    let mut rest = &mut bytes[..];
    if time
        .format_into(&mut rest, &time::format_description::well_known::Rfc3339)
        .is_err()
    {
        return TimeText::new();
    }
    // What was written is what the cursor moved past: the count
    // `format_into` returns leaves out the fraction of the second.
    let written = TIME_TEXT - rest.len();
    std::str::from_utf8(&bytes[..written])
        .ok()
        .and_then(|text| TimeText::from(text).ok())
        .unwrap_or_default()
}

fn address_text(address: IpAddr) -> AddressText {
    let mut text = AddressText::new();
    match address {
        // Four numbers by hand: `fmt` cost a thousand instructions a
        // request for them.
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text.push('.');
                }
                text.push_str(itoa::Buffer::new().format(octet));
            }
        }
        // IPv6's shortest form (RFC 5952) is left to `fmt`. Every address
        // fits: IPv6's longest form is the capacity.
        IpAddr::V6(_) => {
            let _ = write!(text, "{address}");
        }
    }
    text
}

/// Writes audit lines on a thread of its own, so a slow disk or a full pipe
/// never holds up a request. The queue is bounded: past it, lines are
/// dropped and counted, never buffered without limit.
///
/// Lines are serialized straight into one shared buffer, which the writer
/// swaps for its own empty one: no allocation per line, and no buffer is
/// freed on a thread other than the one that grew it (an allocation per
/// line, freed by the writer, cost CPU and megabytes of pages the
/// allocator was slow to take back).
pub struct AuditSink {
    queue: Arc<AuditQueue>,
    writer: std::thread::Thread,
    /// Hears from the writer when it has written its last batch.
    done: Mutex<mpsc::Receiver<()>>,
}

struct AuditQueue {
    pending: Mutex<PendingLines>,
    max_queue: usize,
    dropped: IntCounter,
    closing: AtomicBool,
}

/// Lines waiting for the writer, each ending in `\n`.
#[derive(Default)]
struct PendingLines {
    bytes: Vec<u8>,
    lines: usize,
    /// The writer has taken its last batch: a line now would never be
    /// written, and is counted as dropped instead.
    finished: bool,
}

/// Bytes the queue holds at most, whatever `max_queue` says: a line's
/// size is the caller's to choose (its path, for one), so a count alone
/// would not bound memory.
const MAX_QUEUE_BYTES: usize = 32 << 20;

/// How often the writer wakes to write what is queued. Queuing a line
/// never wakes a thread (a wake-up per request cost about a tenth of the
/// proxy's CPU).
const AUDIT_FLUSH_EVERY: Duration = Duration::from_millis(20);

impl AuditSink {
    /// Starts the writer for `output` (`stdout`, `stderr` or a file path,
    /// appended to), holding at most `max_queue` lines.
    pub fn start(
        output: &str,
        max_queue: usize,
        dropped: IntCounter,
    ) -> std::io::Result<(AuditSink, JoinHandle<()>)> {
        let writer: Box<dyn Write + Send> = match output {
            "stdout" => Box::new(std::io::stdout()),
            "stderr" => Box::new(std::io::stderr()),
            path => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let queue = Arc::new(AuditQueue {
            pending: Mutex::new(PendingLines::default()),
            max_queue,
            dropped,
            closing: AtomicBool::new(false),
        });
        let (done, finished) = mpsc::channel();
        let q = queue.clone();
        let handle = std::thread::Builder::new()
            .name("tether-audit".into())
            .spawn(move || {
                write_lines(&q, writer);
                let _ = done.send(());
            })?;
        let sink = AuditSink {
            queue,
            writer: handle.thread().clone(),
            done: Mutex::new(finished),
        };
        Ok((sink, handle))
    }

    /// Writes what is queued and stops the writer, waiting up to `timeout`:
    /// at shutdown, so no line is lost with the process.
    pub fn close(&self, timeout: Duration) {
        self.stop();
        let done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        // Finished, timed out, or gone (a writer that ended without a
        // word): nothing more to wait for in any case.
        let _ = done.recv_timeout(timeout);
    }

    fn stop(&self) {
        self.queue.closing.store(true, Ordering::Release);
        self.writer.unpark();
    }

    /// Queues one record.
    pub fn write(&self, record: &AuditRecord<'_>) {
        let queue = &self.queue;
        let mut pending = queue.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.finished
            || pending.lines >= queue.max_queue
            || pending.bytes.len() >= MAX_QUEUE_BYTES
        {
            drop(pending);
            queue.dropped.inc();
            return;
        }
        record.write_json(&mut pending.bytes);
        pending.bytes.push(b'\n');
        pending.lines += 1;
    }
}

impl Drop for AuditSink {
    /// The writer writes what is left and ends.
    fn drop(&mut self) {
        self.stop();
    }
}

fn write_lines(queue: &AuditQueue, writer: Box<dyn Write + Send>) {
    let mut out = writer;
    let mut batch = Vec::new();
    // Wake on a clock, take everything queued, write it in one call.
    loop {
        std::thread::park_timeout(AUDIT_FLUSH_EVERY);
        // Read before taking the lines, so none queued before closing is
        // left behind.
        let closing = queue.closing.load(Ordering::Acquire);
        let lines = {
            let mut pending = queue.pending.lock().unwrap_or_else(|p| p.into_inner());
            // The queue gets the writer's emptied buffer, capacity kept.
            std::mem::swap(&mut pending.bytes, &mut batch);
            pending.finished = closing;
            std::mem::take(&mut pending.lines)
        };
        if !batch.is_empty() {
            if let Err(e) = out.write_all(&batch).and_then(|()| out.flush()) {
                // A full disk or a closed pipe loses the batch: counted
                // whole, as how much of it reached the output is unknown.
                queue.dropped.inc_by(lines as u64);
                log::error!("cannot write {lines} audit lines: {e}");
            }
        }
        batch.clear();
        if batch.capacity() > MAX_QUEUE_BYTES {
            // A burst of huge lines does not keep its buffer for good.
            batch = Vec::new();
        }
        if closing {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use crate::{Denial, Reason};

    #[test]
    fn a_refusal_before_identity_names_the_verified_peer_and_its_owner() {
        // Refused by sanitize on a verified connection: no principal yet.
        let mut ctx = testing::ctx();
        ctx.peer = Some(Arc::new(testing::peer(testing::ALICE_BOT)));
        ctx.denied_by = Some("sanitize");
        ctx.denial = Some(Denial::new(Reason::BadPath, "bad escape"));
        let mut line = Vec::new();
        AuditRecord::new(&ctx, "GET", Reason::BadPath, 400, None).write_json(&mut line);
        let v: serde_json::Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(v["agent"], testing::ALICE_BOT, "{v}");
        assert_eq!(v["identity_kind"], "x509_svid", "{v}");
        assert_eq!(v["owner"], "alice@example.com", "{v}");
        assert_eq!(v["decision"], "deny", "{v}");
        // An unregistered peer is named, with no owner to name.
        let stranger = "spiffe://example.org/agents/stranger";
        ctx.peer = Some(Arc::new(testing::peer(stranger)));
        let mut line = Vec::new();
        AuditRecord::new(&ctx, "GET", Reason::BadPath, 400, None).write_json(&mut line);
        let v: serde_json::Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(v["agent"], stranger, "{v}");
        assert_eq!(v["owner"], serde_json::Value::Null, "{v}");
    }

    #[test]
    fn the_time_is_written_as_rfc_3339_to_the_nanosecond() {
        use time::format_description::well_known::Rfc3339;
        let now = OffsetDateTime::now_utc();
        for t in [
            now,
            now.replace_nanosecond(0).expect("valid"),
            now.replace_nanosecond(999_999_999).expect("valid"),
            now.replace_nanosecond(120_000_000).expect("valid"),
            OffsetDateTime::UNIX_EPOCH,
        ] {
            let expected = t.format(&Rfc3339).expect("formats");
            assert_eq!(rfc3339(t).as_str(), expected);
        }
    }

    #[test]
    fn addresses_are_written_as_std_writes_them() {
        for text in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "::1",
            "::ffff:192.0.2.1",
            "2001:db8::8a2e:370:7334",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            let address: IpAddr = text.parse().expect("address");
            assert_eq!(address_text(address).as_str(), address.to_string());
        }
    }

    #[test]
    fn an_allowed_request_is_recorded_with_its_owner_and_policies() {
        let mut ctx = testing::ctx_for(testing::ALICE_BOT, "GET", "/v1/repos/tether/issues");
        ctx.decision = Some(std::sync::Arc::new(crate::authorize::Decision {
            allowed: true,
            policies: vec!["read-repos".into()],
            errors: vec![],
            shadow: None,
        }));
        ctx.cache_hit = Some(true);
        let record = AuditRecord::new(
            &ctx,
            "GET",
            Reason::Allowed,
            200,
            TraceIdText::from("ab").ok(),
        );
        let json: serde_json::Value =
            serde_json::from_slice(&serde_json::to_vec(&record).expect("json")).expect("parse");
        assert_eq!(json["decision"], "allow");
        assert_eq!(json["agent"], testing::ALICE_BOT);
        assert_eq!(json["owner"], "alice@example.com");
        assert_eq!(json["route"], "/v1/repos/{repo}/issues");
        assert_eq!(json["action"], "Action::\"ListIssues\"");
        assert_eq!(json["resource"], "Repo::\"tether\"");
        assert_eq!(json["policies"][0], "read-repos");
        assert_eq!(json["cached"], true);
        assert_eq!(json["trace_id"], "ab");
        assert!(json.get("stage").is_none());
    }

    #[test]
    fn a_denial_is_recorded_with_its_stage_and_detail() {
        let mut ctx = testing::ctx();
        ctx.path = "/x".into();
        ctx.denial = Some(Denial::new(Reason::NoIdentity, "no client certificate"));
        ctx.denied_by = Some("identity");
        let record = AuditRecord::new(&ctx, "GET", Reason::NoIdentity, 401, None);
        assert_eq!(record.decision, "deny");
        assert_eq!(record.reason, "no_identity");
        assert_eq!(record.stage, Some("identity"));
        assert_eq!(record.detail, Some("no client certificate"));
        assert_eq!(record.agent, None);
    }

    /// Sends `lines` records through a sink holding at most `max_queue`,
    /// closes it, and returns what reached the file and how many it
    /// counted as dropped.
    fn through_a_sink(name: &str, max_queue: usize, lines: usize) -> (String, u64) {
        let metrics = Metrics::new().expect("metrics");
        let path =
            std::env::temp_dir().join(format!("tether-audit-{name}-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let (sink, handle) = AuditSink::start(
            path.to_str().expect("utf-8"),
            max_queue,
            metrics.audit_dropped.clone(),
        )
        .expect("sink");
        let ctx = testing::ctx();
        for _ in 0..lines {
            sink.write(&AuditRecord::new(&ctx, "GET", Reason::NoRoute, 403, None));
        }
        drop(sink);
        handle.join().expect("writer");
        let text = std::fs::read_to_string(&path).expect("audit file");
        let _ = std::fs::remove_file(&path);
        (text, metrics.audit_dropped.get())
    }

    #[test]
    fn the_shadow_verdict_and_an_overdue_review_reach_the_record() {
        let mut ctx = testing::ctx_for(testing::ALICE_BOT, "GET", "/v1/repos/tether/issues");
        let mut agent = (**ctx.agent.as_ref().expect("registered")).clone();
        agent.review_by = Some(tether_config::Expiry::parse("2020-01-01").expect("date"));
        ctx.agent = Some(Arc::new(agent));
        ctx.decision = Some(Arc::new(crate::authorize::Decision {
            allowed: true,
            policies: vec!["read-repos".into()],
            errors: Vec::new(),
            shadow: Some(crate::authorize::ShadowDecision {
                allowed: false,
                policies: vec!["stricter".into()],
            }),
        }));
        let record = AuditRecord::new(&ctx, "GET", Reason::Allowed, 200, None);
        let mut line = Vec::new();
        record.write_json(&mut line);
        let v: serde_json::Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(v["shadow"]["decision"], "deny", "{v}");
        assert_eq!(v["shadow"]["policies"][0], "stricter", "{v}");
        assert_eq!(v["review_overdue"], true, "{v}");
        // Neither, when neither holds.
        let plain = testing::ctx_for(testing::ALICE_BOT, "GET", "/v1/repos/tether/issues");
        let mut line = Vec::new();
        AuditRecord::new(&plain, "GET", Reason::Allowed, 200, None).write_json(&mut line);
        let v: serde_json::Value = serde_json::from_slice(&line).expect("json");
        assert!(
            v.get("shadow").is_none() && v.get("review_overdue").is_none(),
            "{v}"
        );
    }

    #[test]
    fn a_line_written_after_the_sink_closed_is_counted_not_lost() {
        let metrics = Metrics::new().expect("metrics");
        let (sink, handle) =
            AuditSink::start("stderr", 16, metrics.audit_dropped.clone()).expect("sink");
        sink.close(Duration::from_secs(5));
        handle.join().expect("writer");
        let ctx = testing::ctx();
        sink.write(&AuditRecord::new(&ctx, "GET", Reason::Aborted, 0, None));
        assert_eq!(metrics.audit_dropped.get(), 1);
    }

    #[test]
    fn the_sink_writes_lines_and_counts_what_it_drops() {
        let (text, dropped) = through_a_sink("some", 4, 3);
        // Room for all three: all written, none dropped.
        assert_eq!((text.lines().count(), dropped), (3, 0));
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("json line");
            assert_eq!(v["reason"], "no_route");
        }
    }

    #[test]
    fn lines_a_full_disk_refuses_are_counted_as_dropped() {
        // /dev/full takes the open and refuses every write (ENOSPC).
        let metrics = Metrics::new().expect("metrics");
        let (sink, handle) =
            AuditSink::start("/dev/full", 100, metrics.audit_dropped.clone()).expect("sink");
        let ctx = testing::ctx();
        for _ in 0..5 {
            sink.write(&AuditRecord::new(&ctx, "GET", Reason::NoRoute, 403, None));
        }
        drop(sink);
        handle.join().expect("writer");
        assert_eq!(metrics.audit_dropped.get(), 5);
    }

    #[test]
    fn the_queue_holds_a_bounded_number_of_bytes_whatever_the_lines_hold() {
        use std::os::fd::AsRawFd as _;
        // The output is a pipe nobody reads: the writer's first write
        // blocks once the pipe is full, and the queue is left to fill.
        let (reader, writer) = std::io::pipe().expect("pipe");
        let output = format!("/proc/self/fd/{}", writer.as_raw_fd());
        let metrics = Metrics::new().expect("metrics");
        let (sink, handle) =
            AuditSink::start(&output, 1_000_000, metrics.audit_dropped.clone()).expect("sink");
        drop(writer);
        let mut ctx = testing::ctx();
        let line = 1 << 20;
        let long = format!("/{}", "a".repeat(line));
        ctx.path = long.as_str().into();
        // The writer may hold one queue's worth when its write blocks.
        let lines = 2 * (MAX_QUEUE_BYTES / line) + 8;
        for _ in 0..lines {
            sink.write(&AuditRecord::new(&ctx, "GET", Reason::NoRoute, 403, None));
        }
        let held = sink.queue.pending.lock().expect("lock").bytes.len();
        assert!(held < MAX_QUEUE_BYTES + 2 * line, "{held} bytes held");
        assert!(
            metrics.audit_dropped.get() >= 8,
            "lines over the bound were refused"
        );
        // The reader goes: every write fails, and every line is counted,
        // those refused and those the writer could not write alike.
        drop(sink);
        drop(reader);
        handle.join().expect("writer");
        assert_eq!(metrics.audit_dropped.get(), lines as u64);
    }

    #[test]
    fn a_full_queue_drops_and_counts_every_line_it_cannot_hold() {
        // A queue with no room: whatever the writer's timing, every line
        // is dropped and counted, and nothing reaches the file.
        let (text, dropped) = through_a_sink("full", 0, 3);
        assert_eq!(dropped, 3);
        assert_eq!(text, "");
    }

    #[test]
    fn metrics_count_by_reason() {
        let m = Metrics::new().expect("metrics");
        let us = Duration::from_micros(50);
        m.observe(Reason::Allowed, true, us);
        m.observe(Reason::PolicyDenied, false, us);
        m.observe(Reason::PolicyDenied, false, us);
        // Forwarded, then the upstream failed; and failed before a decision.
        m.observe(Reason::UpstreamError, true, us);
        m.observe(Reason::Internal, false, us);
        assert_eq!(m.requests(Reason::Allowed), 1);
        assert_eq!(m.requests(Reason::PolicyDenied), 2);
        assert_eq!(m.requests(Reason::UpstreamError), 1);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&m.registry.gather())
            .expect("encode");
        for series in [
            r#"{decision="allow",reason="allowed"} 1"#,
            r#"{decision="deny",reason="policy_denied"} 2"#,
            r#"{decision="allow",reason="upstream_error"} 1"#,
            r#"{decision="deny",reason="upstream_error"} 0"#,
            r#"{decision="deny",reason="internal"} 1"#,
        ] {
            assert!(
                text.contains(&format!("tether_requests_total{series}")),
                "{series}: {text}"
            );
        }
        assert!(!text.contains(r#"decision="allow",reason="policy_denied""#));
    }
}
