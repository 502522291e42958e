//! The per-request context the stages fill in, in chain order.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use arrayvec::ArrayString;
use bytes::Bytes;
use http::HeaderValue;
use smol_str::SmolStr;
use tether_config::spiffe::SpiffeId;
use tether_config::TokenKind;

use crate::authorize::Decision;
use crate::identity::PeerIdentity;
use crate::lifecycle::Agent;
use crate::mcp::McpCall;
use crate::method_override::MultipartNames;
use crate::route::RouteMatch;
use crate::upstream::UpstreamChoice;
use crate::{Denial, Snapshot};

/// How the caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentityKind {
    /// A SPIFFE X.509-SVID: presented on the mTLS connection (ingress), or
    /// the pod's own (egress).
    X509Svid,
    /// A bearer token of this kind.
    Token(TokenKind),
}

impl IdentityKind {
    /// The name policy and records use: `x509_svid`, `jwt_svid`,
    /// `kubernetes` or `oidc`.
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::X509Svid => "x509_svid",
            IdentityKind::Token(kind) => kind.as_str(),
        }
    }
}

/// A verified caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The acting workload's SPIFFE ID.
    pub id: SpiffeId,
    /// How it was verified.
    pub kind: IdentityKind,
    /// For whom it acts, when a token delegates (RFC 8693 `act`).
    pub delegation: Option<Arc<Delegation>>,
}

/// A delegation chain: a subject (usually a person) and the agents that
/// act for it, in order, the last acting now.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Delegation {
    /// The token's `sub`: on whose behalf the agents act.
    pub subject: Arc<str>,
    /// The agents, from the first one the subject delegated to, to the
    /// one making this request (the principal).
    pub actors: Vec<SpiffeId>,
}

impl Delegation {
    /// How many agents the chain holds.
    pub fn depth(&self) -> usize {
        self.actors.len()
    }

    /// The whole chain, subject first, as records show it.
    pub fn chain(&self) -> Vec<&str> {
        std::iter::once(&*self.subject)
            .chain(self.actors.iter().map(SpiffeId::as_str))
            .collect()
    }
}

/// A request id: random, printed as 16 hex digits. The digits are written
/// once, as a header value whose bytes the request, the response and
/// pingora's copy of the request for the upstream all share; the audit
/// line, the span and a refusal's body read them as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(HeaderValue);

/// A request id as text, held inline: it goes into the audit line, the
/// span and a refusal's body, and costs no allocation.
pub type RequestIdText = ArrayString<16>;

impl RequestId {
    pub fn new(id: u64) -> RequestId {
        let mut digits = [0u8; 16];
        // 8 bytes are exactly 16 digits: this cannot fail.
        let _ = hex::encode_to_slice(id.to_be_bytes(), &mut digits);
        // Hex digits are always a valid value: the decimal fallback is
        // never reached, and keeps this infallible without a panic.
        let value = HeaderValue::from_maybe_shared(Bytes::from_owner(digits))
            .unwrap_or_else(|_| HeaderValue::from(id));
        RequestId(value)
    }

    /// The id as its 16 hex digits.
    pub fn text(&self) -> RequestIdText {
        let text = self.0.to_str().unwrap_or_default();
        RequestIdText::from(text).unwrap_or_default()
    }

    /// The id as a header value: a handle on the same bytes.
    pub fn header_value(&self) -> HeaderValue {
        self.0.clone()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// The W3C trace context the upstream receives, so that the API's own
/// spans join the trace of Tether's span for the request.
#[derive(Debug, Clone)]
pub struct TraceContext {
    pub traceparent: HeaderValue,
    /// The caller's `tracestate`, passed on; `None` removes one the
    /// caller sent that was empty or unparsable.
    pub tracestate: Option<HeaderValue>,
}

/// Everything known about one request. Stages fill it in order: a field
/// is `None` until the stage that owns it has run (and stays `None` if an
/// earlier stage denied).
pub struct RequestCtx {
    /// Random id returned to the caller and recorded everywhere.
    pub request_id: RequestId,
    /// When the request arrived.
    pub started: SystemTime,
    /// Config, registry, routes and policies, one version for the whole
    /// request: a reload mid-request never mixes two versions.
    pub snapshot: Arc<Snapshot>,
    /// The TCP peer's address.
    pub client_addr: Option<IpAddr>,
    /// Set by the proxy when it traces the request; the credentials
    /// stage forwards it.
    pub trace_context: Option<TraceContext>,
    /// The verified X.509-SVID: the client's, from the TLS handshake
    /// (ingress), or the pod's own (egress).
    pub peer: Option<Arc<PeerIdentity>>,
    /// The connection presented a client certificate that does not verify
    /// now (`peer` is then `None`): its requests are refused, whatever
    /// else they carry.
    pub peer_rejected: bool,
    /// Whether the request already waited for an issuer's keys to be
    /// refetched (it waits at most once).
    pub keys_refetched: bool,
    /// The normalized path (no query), as routed, decided and forwarded.
    /// (A `SmolStr`: most paths fit inline, so no allocation.)
    pub path: SmolStr,
    /// sanitize: the path as sent held an encoded slash (`%2F`), which
    /// `paths.encoded_slash` let through; an upstream may still refuse it.
    pub encoded_slash: bool,
    /// The host, lower case and without port, as routed and as the
    /// upstream is chosen by.
    pub host: Option<SmolStr>,
    /// The request body, when a stage needed it (bounded by that stage).
    pub body: Option<bytes::Bytes>,
    /// identity: the verified caller.
    pub principal: Option<Principal>,
    /// lifecycle: the registered agent behind the principal.
    pub agent: Option<Arc<Agent>>,
    /// route: the matched route and the resource it names.
    pub route: Option<RouteMatch>,
    /// mcp: the JSON-RPC call, on MCP routes.
    pub mcp: Option<McpCall>,
    /// method_override: on a multipart body, the scan its chunks pass
    /// through on their way to the upstream.
    pub multipart: Option<Box<MultipartNames>>,
    /// authorize: Cedar's decision.
    pub decision: Option<Arc<Decision>>,
    /// authorize: whether the decision came from the cache.
    pub cache_hit: Option<bool>,
    /// upstream: where the request goes, once allowed.
    pub upstream: Option<UpstreamChoice>,
    /// The refusal, if a stage refused.
    pub denial: Option<Denial>,
    /// The stage that refused.
    pub denied_by: Option<&'static str>,
    /// Every stage let the request through and an upstream was chosen:
    /// it is being forwarded. What fails after this (the upstream, the
    /// client going away) does not make it a denial.
    pub allowed: bool,
}

impl RequestCtx {
    /// A fresh context for a request served under `snapshot`.
    pub fn new(snapshot: Arc<Snapshot>) -> RequestCtx {
        RequestCtx {
            request_id: RequestId::new(rand_u64()),
            started: SystemTime::now(),
            snapshot,
            client_addr: None,
            trace_context: None,
            peer: None,
            peer_rejected: false,
            keys_refetched: false,
            path: SmolStr::default(),
            encoded_slash: false,
            host: None,
            body: None,
            principal: None,
            agent: None,
            route: None,
            mcp: None,
            multipart: None,
            decision: None,
            cache_hit: None,
            upstream: None,
            denial: None,
            denied_by: None,
            allowed: false,
        }
    }
}

impl RequestCtx {
    /// Whether the request is on an MCP route.
    pub fn is_mcp(&self) -> bool {
        self.route
            .as_ref()
            .and_then(|m| self.snapshot.routes.get(m.index))
            .is_some_and(|r| r.mcp.is_some())
    }

    /// Whether the request's answer comes from an MCP server: the request
    /// is on an MCP route, or on a route that shares one's path (see
    /// [`CompiledRoute::mcp_endpoint`](crate::route::CompiledRoute)).
    pub fn on_mcp_endpoint(&self) -> bool {
        self.route
            .as_ref()
            .and_then(|m| self.snapshot.routes.get(m.index))
            .is_some_and(|r| r.mcp_endpoint.is_some())
    }

    /// The body a refusal is answered with: a JSON-RPC error on MCP
    /// routes (what an MCP client can read), `{"error", "reason",
    /// "request_id"}` elsewhere.
    pub fn refusal_body(&self, denial: &Denial) -> Vec<u8> {
        let request_id = self.request_id.text();
        if self.is_mcp() {
            crate::mcp::error_body(self.mcp.as_ref(), denial, &request_id)
        } else {
            denial.body(&request_id)
        }
    }
}

/// A random u64 from the standard library's per-process random hasher
/// keys, mixed with a counter: unique per process, unpredictable enough
/// for a request id (it is not a secret).
fn rand_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static KEYS: OnceLock<RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = KEYS.get_or_init(RandomState::new).build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_id_reads_the_same_as_text_header_and_display() {
        for n in [0, 1, 0xabcdef, 0x0123_4567_89ab_cdef, u64::MAX, rand_u64()] {
            let id = RequestId::new(n);
            let printed = format!("{n:016x}");
            assert_eq!(id.text().as_str(), printed);
            assert_eq!(id.to_string(), printed);
            assert_eq!(id.header_value(), printed.as_str());
        }
    }
}
