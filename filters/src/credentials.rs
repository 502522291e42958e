//! What the upstream receives: the identity Tether verified, in headers
//! only Tether can set (the sanitize stage removed any the caller sent),
//! and the trace context of Tether's span.

use http::HeaderName;
use pingora_http::RequestHeader;

use crate::headers;
use crate::{Denial, Filter, Reason, RequestCtx};

/// The agent's SPIFFE ID.
pub const AGENT_HEADER: &str = "x-tether-agent";
/// The agent's human owner.
pub const OWNER_HEADER: &str = "x-tether-owner";
/// The request id, to join the upstream's logs to Tether's audit.
pub const REQUEST_ID_HEADER: &str = "x-tether-request-id";

/// How many headers this stage adds, at most.
pub const HEADERS_ADDED: usize = 5;

/// The names, parsed once (`http` parses and copies a name given as text
/// on every insert).
const AGENT: HeaderName = HeaderName::from_static(AGENT_HEADER);
const OWNER: HeaderName = HeaderName::from_static(OWNER_HEADER);
pub const REQUEST_ID: HeaderName = HeaderName::from_static(REQUEST_ID_HEADER);
/// The W3C trace-context headers.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Adds the verified identity for the upstream.
pub struct Credentials;

impl Filter for Credentials {
    fn name(&self) -> &'static str {
        "credentials"
    }

    fn apply(&self, req: &mut RequestHeader, ctx: &mut RequestCtx) -> Result<(), Denial> {
        let Some(agent) = &ctx.agent else {
            return Err(Denial::new(
                Reason::Internal,
                "credentials ran before lifecycle",
            ));
        };
        let internal = || Denial::new(Reason::Internal, "cannot set identity headers");
        let request_id = ctx.request_id.header_value();
        headers::edit_request(req, HEADERS_ADDED, |headers| {
            // Built when the registry loaded (non-ASCII owner names travel
            // as raw bytes, which HTTP allows in field values), and shared.
            headers.try_insert(AGENT, agent.id_header.clone())?;
            headers.try_insert(OWNER, agent.owner_header.clone())?;
            headers.try_insert(REQUEST_ID, request_id)?;
            if let Some(trace) = &ctx.trace_context {
                headers.try_insert(TRACEPARENT, trace.traceparent.clone())?;
                match &trace.tracestate {
                    Some(state) => headers.try_insert(TRACESTATE, state.clone()).map(drop)?,
                    None => headers.remove(TRACESTATE).map_or((), drop),
                }
            }
            Ok(())
        })
        .map_err(|_: http::header::MaxSizeReached| internal())
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;
    use crate::context::TraceContext;
    use crate::testing;

    fn header(req: &RequestHeader, name: &str) -> Option<String> {
        req.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or_default().to_string())
    }

    #[test]
    fn the_verified_identity_is_added() {
        let mut ctx = testing::ctx_for(testing::ALICE_BOT, "GET", "/v1/repos/tether/issues");
        let mut req = testing::get("/v1/repos/tether/issues");
        let sent = req.headers.len();
        Credentials.apply(&mut req, &mut ctx).expect("passes");
        assert_eq!(req.headers.len() - sent, 3);
        assert_eq!(
            header(&req, AGENT_HEADER).as_deref(),
            Some(testing::ALICE_BOT)
        );
        assert_eq!(
            header(&req, OWNER_HEADER).as_deref(),
            Some("alice@example.com")
        );
        assert_eq!(
            header(&req, REQUEST_ID_HEADER),
            Some(ctx.request_id.to_string())
        );
        assert_eq!(header(&req, "traceparent"), None, "not traced");
    }

    #[test]
    fn the_trace_context_is_forwarded_and_a_bad_state_is_not() {
        const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for state in [Some("vendor=abc"), None] {
            let mut ctx = testing::ctx_for(testing::ALICE_BOT, "GET", "/v1/repos/tether/issues");
            ctx.trace_context = Some(TraceContext {
                traceparent: HeaderValue::from_static(PARENT),
                tracestate: state.map(HeaderValue::from_static),
            });
            let mut req = testing::get("/v1/repos/tether/issues");
            // What the caller sent is replaced, or removed.
            req.insert_header("traceparent", "00-caller")
                .expect("header");
            req.insert_header("tracestate", "not a state")
                .expect("header");
            let sent = req.headers.len();
            Credentials.apply(&mut req, &mut ctx).expect("passes");
            assert_eq!(header(&req, "traceparent").as_deref(), Some(PARENT));
            assert_eq!(header(&req, "tracestate").as_deref(), state, "{state:?}");
            assert_eq!(req.headers.len(), sent + 3 - usize::from(state.is_none()));
        }
    }
}
