//! Why a request was allowed or refused: the one place where a cause maps
//! to an HTTP status and the words a caller sees.

use std::borrow::Cow;

/// The outcome of a request, as a stable code used in responses, audit
/// lines, spans and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Every stage passed and policy permitted the request.
    Allowed,
    /// The path could not be normalized (bad percent-encoding, NUL, not
    /// origin form).
    BadPath,
    /// The body is malformed for its route (an MCP call that is not one
    /// JSON-RPC request).
    BadRequest,
    /// The body is larger than its route accepts.
    BodyTooLarge,
    /// No verified workload identity came with the request.
    NoIdentity,
    /// The bearer token is not a well-formed JWS (or has a `crit` header).
    TokenMalformed,
    /// The token or its header is over the size limit.
    TokenTooLarge,
    /// `none`, HMAC, an algorithm the issuer does not allow, or one that
    /// does not fit the key.
    TokenAlgorithm,
    /// The issuer has no key with the token's `kid`.
    TokenUnknownKey,
    /// The issuer's keys could not be fetched (or are stale): fail closed.
    TokenKeysUnavailable,
    /// The signature does not verify.
    TokenSignature,
    /// The `iss` is not a configured issuer.
    TokenIssuer,
    /// The `aud` is missing or names none of the issuer's audiences.
    TokenAudience,
    /// Past `exp`.
    TokenExpired,
    /// Before `nbf` (or `iat`).
    TokenNotYetValid,
    /// `exp - iat` is over the maximum lifetime (or `iat` is missing).
    TokenLifetime,
    /// A required claim is missing or does not name an agent.
    TokenClaims,
    /// The token belongs to another workload than the client certificate.
    TokenNotBound,
    /// The delegation chain is deeper than allowed.
    DelegationDepth,
    /// An agent in the delegation chain is not a registered, active agent.
    UnregisteredActor,
    /// The identity is not a registered agent.
    Unregistered,
    /// The agent's registration has expired.
    Expired,
    /// The agent is suspended or offboarded.
    Inactive,
    /// No route matches the method and path.
    NoRoute,
    /// Cedar policy did not permit the request.
    PolicyDenied,
    /// A policy failed to evaluate; Tether denies rather than guess.
    PolicyError,
    /// The upstream could not be reached or failed mid-response.
    UpstreamError,
    /// The client went away (closed, or stopped reading or sending)
    /// before its response was complete.
    ClientClosed,
    /// Tether itself failed.
    Internal,
    /// The request was cut short before it finished: Tether shut down
    /// while it was in flight.
    Aborted,
}

impl Reason {
    /// Every reason, for pre-registering metric labels.
    pub const ALL: [Reason; 30] = [
        Reason::Allowed,
        Reason::BadPath,
        Reason::BadRequest,
        Reason::BodyTooLarge,
        Reason::NoIdentity,
        Reason::TokenMalformed,
        Reason::TokenTooLarge,
        Reason::TokenAlgorithm,
        Reason::TokenUnknownKey,
        Reason::TokenKeysUnavailable,
        Reason::TokenSignature,
        Reason::TokenIssuer,
        Reason::TokenAudience,
        Reason::TokenExpired,
        Reason::TokenNotYetValid,
        Reason::TokenLifetime,
        Reason::TokenClaims,
        Reason::TokenNotBound,
        Reason::DelegationDepth,
        Reason::UnregisteredActor,
        Reason::Unregistered,
        Reason::Expired,
        Reason::Inactive,
        Reason::NoRoute,
        Reason::PolicyDenied,
        Reason::PolicyError,
        Reason::UpstreamError,
        Reason::ClientClosed,
        Reason::Internal,
        Reason::Aborted,
    ];

    /// The stable code.
    pub fn code(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::BadPath => "bad_path",
            Reason::BadRequest => "bad_request",
            Reason::BodyTooLarge => "body_too_large",
            Reason::NoIdentity => "no_identity",
            Reason::TokenMalformed => "token_malformed",
            Reason::TokenTooLarge => "token_too_large",
            Reason::TokenAlgorithm => "token_algorithm",
            Reason::TokenUnknownKey => "token_unknown_key",
            Reason::TokenKeysUnavailable => "token_keys_unavailable",
            Reason::TokenSignature => "token_signature",
            Reason::TokenIssuer => "token_issuer",
            Reason::TokenAudience => "token_audience",
            Reason::TokenExpired => "token_expired",
            Reason::TokenNotYetValid => "token_not_yet_valid",
            Reason::TokenLifetime => "token_lifetime",
            Reason::TokenClaims => "token_claims",
            Reason::TokenNotBound => "token_not_bound",
            Reason::DelegationDepth => "delegation_depth",
            Reason::UnregisteredActor => "unregistered_actor",
            Reason::Unregistered => "unregistered",
            Reason::Expired => "expired",
            Reason::Inactive => "inactive",
            Reason::NoRoute => "no_route",
            Reason::PolicyDenied => "policy_denied",
            Reason::PolicyError => "policy_error",
            Reason::UpstreamError => "upstream_error",
            Reason::ClientClosed => "client_closed",
            Reason::Internal => "internal",
            Reason::Aborted => "aborted",
        }
    }

    /// The HTTP status a refusal gets. Every authorization refusal is a
    /// 403, so a caller cannot tell a missing route from a forbidden one.
    pub fn status(self) -> u16 {
        match self {
            Reason::Allowed => 200,
            Reason::BadPath | Reason::BadRequest => 400,
            Reason::BodyTooLarge => 413,
            // Authentication failed: the caller may fix its credentials.
            Reason::NoIdentity
            | Reason::TokenNotBound
            | Reason::TokenMalformed
            | Reason::TokenTooLarge
            | Reason::TokenAlgorithm
            | Reason::TokenUnknownKey
            | Reason::TokenSignature
            | Reason::TokenIssuer
            | Reason::TokenAudience
            | Reason::TokenExpired
            | Reason::TokenNotYetValid
            | Reason::TokenLifetime
            | Reason::TokenClaims => 401,
            // Tether cannot check tokens right now: retry later.
            Reason::TokenKeysUnavailable => 503,
            Reason::DelegationDepth
            | Reason::UnregisteredActor
            | Reason::Unregistered
            | Reason::Expired
            | Reason::Inactive
            | Reason::NoRoute
            | Reason::PolicyDenied
            | Reason::PolicyError => 403,
            Reason::UpstreamError => 502,
            // nginx's code for it: no one reads the answer.
            Reason::ClientClosed => 499,
            Reason::Internal => 500,
            Reason::Aborted => 503,
        }
    }

    /// What the caller is told. Nothing about the policies' contents.
    pub fn message(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::BadPath => "the request path is malformed",
            Reason::BadRequest => "the request body is malformed",
            Reason::BodyTooLarge => "the request body is too large",
            Reason::NoIdentity => "no verified workload identity was presented",
            Reason::TokenMalformed
            | Reason::TokenTooLarge
            | Reason::TokenAlgorithm
            | Reason::TokenUnknownKey
            | Reason::TokenSignature
            | Reason::TokenIssuer
            | Reason::TokenAudience
            | Reason::TokenExpired
            | Reason::TokenNotYetValid
            | Reason::TokenLifetime
            | Reason::TokenClaims => "the bearer token is not valid",
            Reason::TokenNotBound => "the bearer token belongs to another workload",
            Reason::TokenKeysUnavailable => "the token issuer's keys are unavailable; retry later",
            Reason::DelegationDepth => "the delegation chain is too deep",
            Reason::UnregisteredActor => {
                "an agent in the delegation chain is not a registered, active agent"
            }
            Reason::Unregistered => "the identity is not a registered agent",
            Reason::Expired => "the agent's registration has expired",
            Reason::Inactive => "the agent is suspended or offboarded",
            Reason::NoRoute | Reason::PolicyDenied => "the request is not permitted",
            Reason::PolicyError => "the request could not be authorized",
            Reason::UpstreamError => "the upstream service failed",
            Reason::ClientClosed => "the client closed the connection",
            Reason::Internal => "internal error",
            Reason::Aborted => "the request was cut short: the proxy shut down",
        }
    }

    /// Whether the request was let through.
    pub fn is_allowed(self) -> bool {
        self == Reason::Allowed
    }

    /// Whether a request every stage allowed can still end with this
    /// reason: it failed on the way to or from the upstream, or was cut
    /// short. Its record says `allow`, with this reason.
    pub fn can_follow_allow(self) -> bool {
        matches!(
            self,
            Reason::Allowed
                | Reason::UpstreamError
                | Reason::ClientClosed
                | Reason::Internal
                | Reason::Aborted
        )
    }
}

/// A refusal: the reason, and a detail for the audit record and logs (never
/// sent to the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// Why.
    pub reason: Reason,
    /// What exactly, for operators.
    pub detail: Cow<'static, str>,
}

impl Denial {
    /// A denial with a detail.
    pub fn new(reason: Reason, detail: impl Into<Cow<'static, str>>) -> Denial {
        Denial {
            reason,
            detail: detail.into(),
        }
    }

    /// The JSON body sent to the caller: `{"error", "reason", "request_id"}`.
    pub fn body(&self, request_id: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "error": self.reason.message(),
            "reason": self.reason.code(),
            "request_id": request_id,
        }))
        .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_statuses_are_refusals() {
        let mut codes: Vec<_> = Reason::ALL.iter().map(|r| r.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Reason::ALL.len());
        for r in Reason::ALL.into_iter().filter(|r| !r.is_allowed()) {
            assert!(r.status() >= 400, "{r:?}");
        }
    }

    #[test]
    fn the_body_names_the_reason_and_nothing_of_the_detail() {
        let d = Denial::new(Reason::PolicyDenied, "forbid policy `secret-rule`");
        let body: serde_json::Value = serde_json::from_slice(&d.body("abc")).expect("json");
        assert_eq!(body["reason"], "policy_denied");
        assert_eq!(body["request_id"], "abc");
        assert!(!String::from_utf8_lossy(&d.body("abc")).contains("secret-rule"));
    }
}
