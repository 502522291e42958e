//! Who is calling: a verified workload identity, never a header the caller
//! wrote. Today that is a SPIFFE X.509-SVID on the mTLS connection; the TLS
//! layer verifies the chain ([`tls::SpiffeClientVerifier`]) and the
//! handshake hands the parsed [`PeerIdentity`] to every request on the
//! connection.

pub mod pki;
pub mod svid;
pub mod tls;

use pingora_http::RequestHeader;

pub use svid::{PeerIdentity, SvidError};

use crate::{Denial, Filter, IdentityKind, Principal, Reason, RequestCtx};

/// Turns the connection's verified SVID into the request's principal.
pub struct Identity;

impl Filter for Identity {
    fn name(&self) -> &'static str {
        "identity"
    }

    fn apply(&self, _req: &mut RequestHeader, ctx: &mut RequestCtx) -> Result<(), Denial> {
        let Some(peer) = &ctx.peer else {
            return Err(Denial::new(
                Reason::NoIdentity,
                "no client certificate on the connection",
            ));
        };
        ctx.principal = Some(Principal {
            id: peer.id.clone(),
            kind: IdentityKind::X509Svid,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::testing;

    #[test]
    fn a_verified_peer_becomes_the_principal() {
        let mut ctx = testing::ctx();
        ctx.peer = Some(Arc::new(testing::peer("spiffe://example.org/agents/a")));
        Identity
            .apply(&mut testing::get("/"), &mut ctx)
            .expect("passes");
        let p = ctx.principal.expect("principal");
        assert_eq!(p.id.as_str(), "spiffe://example.org/agents/a");
        assert_eq!(p.kind, IdentityKind::X509Svid);
    }

    #[test]
    fn no_peer_is_no_identity() {
        let denial = Identity
            .apply(&mut testing::get("/"), &mut testing::ctx())
            .expect_err("denied");
        assert_eq!(denial.reason, Reason::NoIdentity);
    }
}
