//! What the upstream receives: the identity Tether verified, in headers
//! only Tether can set (the sanitize stage removed any the caller sent).

use pingora_http::RequestHeader;

use crate::{Denial, Filter, Reason, RequestCtx};

/// The agent's SPIFFE ID.
pub const AGENT_HEADER: &str = "x-tether-agent";
/// The agent's human owner.
pub const OWNER_HEADER: &str = "x-tether-owner";
/// The request id, to join the upstream's logs to Tether's audit.
pub const REQUEST_ID_HEADER: &str = "x-tether-request-id";

/// How many headers this stage adds.
pub const HEADERS_ADDED: usize = 3;

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
        // Built when the registry loaded (non-ASCII owner names travel as
        // raw bytes, which HTTP allows in field values), and shared.
        req.insert_header(AGENT_HEADER, agent.id_header.clone())
            .map_err(|_| internal())?;
        req.insert_header(OWNER_HEADER, agent.owner_header.clone())
            .map_err(|_| internal())?;
        let request_id = ctx.request_id.header_value().map_err(|_| internal())?;
        req.insert_header(REQUEST_ID_HEADER, request_id)
            .map_err(|_| internal())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn the_verified_identity_is_added() {
        let mut ctx = testing::ctx_for(testing::ALICE_BOT, "GET", "/v1/repos/tether/issues");
        let mut req = testing::get("/v1/repos/tether/issues");
        let sent = req.headers.len();
        Credentials.apply(&mut req, &mut ctx).expect("passes");
        assert_eq!(
            req.headers.len() - sent,
            HEADERS_ADDED,
            "room is made for them"
        );
        let header = |n: &str| {
            req.headers
                .get(n)
                .map(|v| v.to_str().unwrap_or_default().to_string())
        };
        assert_eq!(header(AGENT_HEADER).as_deref(), Some(testing::ALICE_BOT));
        assert_eq!(header(OWNER_HEADER).as_deref(), Some("alice@example.com"));
        assert_eq!(header(REQUEST_ID_HEADER), Some(ctx.request_id.to_string()));
    }
}
