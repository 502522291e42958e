//! Who is accountable for what happened: one audit line and one set of
//! metrics per request, for every outcome, denials and errors included.
//!
//! [`AuditRecord`] is the one statement of a request's facts; the audit
//! line is it serialized (`json`), and the proxy's span attributes are
//! read from it, so the two can never disagree. The line is written by
//! the [`AuditSink`] (`sink`), the counts kept in [`Metrics`] (`metrics`).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::SystemTime;

use arrayvec::ArrayString;
use serde::Serialize;
use time::OffsetDateTime;

use crate::context::RequestIdText;
use crate::{IdentityKind, Reason, RequestCtx};

mod json;
mod metrics;
mod sink;

pub use metrics::Metrics;
pub use sink::AuditSink;

/// A trace id as text: 32 hex digits.
pub type TraceIdText = ArrayString<32>;

/// A time as RFC 3339 text, to the nanosecond (`2026-12-02T16:09:04.123456789Z`
/// is 30 bytes).
type TimeText = ArrayString<TIME_TEXT>;
const TIME_TEXT: usize = 40;

/// An IP address as text: the longest IPv6 form is 45 bytes.
type AddressText = ArrayString<45>;

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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

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
}
