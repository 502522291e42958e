//! Who is calling: a verified workload identity, never a header the caller
//! wrote. Two kinds of proof, alone or together:
//! - an X.509-SVID: the client's, verified by the TLS layer
//!   ([`tls::SpiffeClientVerifier`]) and handed to every request on the
//!   connection (ingress), or the pod's own SVID (egress);
//! - a bearer token ([`jwt`]): a JWT-SVID, a Kubernetes service-account
//!   token, or an OIDC / token-exchange token that may delegate.
//!
//! With both, the token must belong to the certificate's workload
//! (`token_not_bound`): a stolen token is useless on another connection.

pub mod jwks;
pub mod jwt;
pub mod pki;
pub mod svid;
pub mod tls;

use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use pingora_http::RequestHeader;

pub use svid::{PeerIdentity, SvidError};

use self::jwks::KeySource;
use self::jwt::{TokenVerifier, VerifiedToken};
use crate::{Denial, Filter, IdentityKind, Principal, Reason, RequestCtx};

/// Turns the verified SVID and bearer token into the request's principal.
/// The token issuers are those of the request's snapshot: a reload that
/// adds or removes one applies from the next request on.
pub struct Identity {
    /// `listener.client_auth: required`: a request whose connection has no
    /// valid SVID is refused, token or not.
    certificate_required: bool,
}

impl Identity {
    /// Identity from SVIDs and from the snapshot's token issuers; with
    /// `certificate_required`, every request needs a valid SVID.
    pub fn new(certificate_required: bool) -> Identity {
        Identity {
            certificate_required,
        }
    }

    /// The bearer token, if the request carries one for Tether. Without
    /// configured issuers, `Authorization` belongs to the upstream.
    fn bearer<'a>(
        tokens: &TokenVerifier,
        req: &'a RequestHeader,
    ) -> Result<Option<&'a str>, Denial> {
        if tokens.is_empty() {
            return Ok(None);
        }
        let mut values = req.headers.get_all(http::header::AUTHORIZATION).iter();
        let Some(value) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(Denial::new(
                Reason::TokenMalformed,
                "more than one `authorization` header",
            ));
        }
        let value = value
            .to_str()
            .map_err(|_| Denial::new(Reason::TokenMalformed, "`authorization` is not ASCII"))?;
        // RFC 9110: the scheme and its credentials are separated by
        // spaces or tabs; a tab must not carry a token past Tether.
        match value.trim_start().split_once([' ', '\t']) {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                Ok(Some(token.trim()))
            }
            // Its issuer bound it to a key whose proof Tether does not
            // check: refused rather than forwarded as if unseen.
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("dpop") => Err(Denial::new(
                Reason::TokenNotBound,
                "DPoP tokens are not accepted: send a token bound to the certificate (`cnf.x5t#S256`)",
            )),
            _ => Ok(None),
        }
    }
}

impl Filter for Identity {
    fn name(&self) -> &'static str {
        "identity"
    }

    fn keys_to_refetch(&self, req: &RequestHeader, ctx: &RequestCtx) -> Option<Arc<KeySource>> {
        let tokens = &ctx.snapshot.tokens;
        let token = Identity::bearer(tokens, req).ok()??;
        tokens.refetch_for(token, Instant::now())
    }

    fn apply(&self, req: &mut RequestHeader, ctx: &mut RequestCtx) -> Result<(), Denial> {
        let now = ctx
            .started
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if ctx.peer_rejected {
            // Not the same as no certificate: a token alone would make its
            // own agent the principal, unbound, on a connection whose
            // certificate Tether no longer believes (a stolen token on the
            // thief's resumed session).
            return Err(Denial::new(
                Reason::NoIdentity,
                "the client certificate of this connection does not verify (expired, or its CA is no longer trusted): reconnect with a current SVID",
            ));
        }
        if self.certificate_required && ctx.peer.is_none() {
            return Err(Denial::new(
                Reason::NoIdentity,
                "no client certificate on this connection, and `client_auth` is `required`",
            ));
        }
        if let Some(peer) = &ctx.peer {
            // Verified at the handshake, but a connection can outlive its
            // certificate: an SVID lives about an hour, a keep-alive
            // connection as long as it is used.
            if peer.not_after < now {
                return Err(Denial::new(
                    Reason::NoIdentity,
                    format!(
                        "the certificate of `{}` expired {} s ago",
                        peer.id,
                        now - peer.not_after
                    ),
                ));
            }
        }
        let tokens = &ctx.snapshot.tokens;
        let token = match Identity::bearer(tokens, req)? {
            None => None,
            Some(token) => Some(tokens.verify(token, now, Instant::now())?),
        };
        ctx.principal = Some(match (token, &ctx.peer) {
            (None, None) => {
                return Err(Denial::new(
                    Reason::NoIdentity,
                    "no client certificate and no bearer token",
                ))
            }
            (None, Some(peer)) => Principal {
                id: peer.id.clone(),
                kind: IdentityKind::X509Svid,
                delegation: None,
            },
            (Some(token), peer) => {
                match peer {
                    Some(peer) => bind(&token, peer)?,
                    // RFC 8705: a token bound to a certificate is good only
                    // with that certificate.
                    None if token.cnf_x5t_s256.is_some() => {
                        return Err(Denial::new(
                            Reason::TokenNotBound,
                            format!(
                                "token of `{}` is bound to a certificate, and none was presented",
                                token.agent
                            ),
                        ))
                    }
                    None => {}
                }
                // The token was for Tether (its audience), not the API: it
                // goes no further, so the upstream cannot replay it.
                req.remove_header(&http::header::AUTHORIZATION);
                Principal {
                    id: token.agent,
                    kind: IdentityKind::Token(token.kind),
                    delegation: token.delegation,
                }
            }
        });
        Ok(())
    }
}

/// A token presented with an SVID must be that workload's (RFC 8705 when
/// the token says which certificate it is bound to; else its acting agent
/// must be the SVID's SPIFFE ID).
fn bind(token: &VerifiedToken, peer: &PeerIdentity) -> Result<(), Denial> {
    let bound = match &token.cnf_x5t_s256 {
        // A certificate's hash is public: plain comparison is fine.
        Some(thumbprint) => thumbprint[..] == peer.cert_sha256[..],
        None => token.agent == peer.id,
    };
    if bound {
        Ok(())
    } else {
        Err(Denial::new(
            Reason::TokenNotBound,
            format!(
                "token of `{}` on the certificate of `{}`",
                token.agent, peer.id
            ),
        ))
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
        testing::identity()
            .apply(&mut testing::get("/"), &mut ctx)
            .expect("passes");
        let p = ctx.principal.expect("principal");
        assert_eq!(p.id.as_str(), "spiffe://example.org/agents/a");
        assert_eq!(p.kind, IdentityKind::X509Svid);
    }

    #[test]
    fn a_certificate_that_expired_since_the_handshake_is_no_identity() {
        let mut ctx = testing::ctx();
        let mut peer = testing::peer("spiffe://example.org/agents/a");
        let now = ctx
            .started
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs() as i64;
        peer.not_after = now - 1;
        ctx.peer = Some(Arc::new(peer));
        let denial = testing::identity()
            .apply(&mut testing::get("/"), &mut ctx)
            .expect_err("denied");
        assert_eq!(denial.reason, Reason::NoIdentity);
        assert!(denial.detail.contains("expired"), "{}", denial.detail);
    }

    #[test]
    fn a_rejected_certificate_is_not_mistaken_for_none() {
        // With token issuers, a connection with no certificate may name its
        // agent by token; one whose certificate no longer verifies may not.
        let mut ctx = testing::ctx();
        ctx.peer_rejected = true;
        let denial = testing::identity()
            .apply(&mut testing::get("/"), &mut ctx)
            .expect_err("denied");
        assert_eq!(denial.reason, Reason::NoIdentity);
        assert!(
            denial.detail.contains("does not verify"),
            "{}",
            denial.detail
        );
    }

    #[test]
    fn a_required_certificate_is_required_of_every_request() {
        let denial = Identity::new(true)
            .apply(&mut testing::get("/"), &mut testing::ctx())
            .expect_err("denied");
        assert_eq!(denial.reason, Reason::NoIdentity);
        assert!(denial.detail.contains("required"), "{}", denial.detail);
    }

    #[test]
    fn no_peer_is_no_identity() {
        let denial = testing::identity()
            .apply(&mut testing::get("/"), &mut testing::ctx())
            .expect_err("denied");
        assert_eq!(denial.reason, Reason::NoIdentity);
    }
}
