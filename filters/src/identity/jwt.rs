//! Bearer tokens as workload identities: JWT-SVIDs, Kubernetes
//! service-account tokens, and OIDC or RFC 8693 token-exchange tokens,
//! validated strictly (RFC 8725):
//! - sizes are bounded before anything is decoded;
//! - the token's `iss` picks one configured issuer, exactly;
//! - asymmetric algorithms only, from the issuer's list: `none` and HMAC
//!   are not algorithms Tether knows, so a public key can never become an
//!   HMAC secret; `alg` must fit the key's type and the key's own `alg`;
//! - keys come only from the issuer's configured JWK set: `jku`, `x5u`,
//!   `jwk` and `x5c` in a header are never read; a `crit` header is
//!   refused, as Tether understands no extension;
//! - the signature is checked before any claim is believed;
//! - `exp` and `iat` are required, `nbf` honoured, all with a small leeway,
//!   and `exp - iat` may not exceed the maximum lifetime;
//! - `aud` is required and must name one of the issuer's audiences.
//!
//! Every refusal has its own reason code.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Map, Value};
use tether_config::spiffe::SpiffeId;
use tether_config::{JwtAlgorithm, TokenKind, Tokens};

use quick_cache::sync::Cache;

use super::jwks::{KeySource, LoadedKeys};
use crate::context::Delegation;
use crate::{Denial, Reason};

/// A token that passed every check.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    /// What kind of issuer signed it.
    pub kind: TokenKind,
    /// Its issuer's `iss`.
    pub issuer: Arc<str>,
    /// The agent acting: the outermost `act`, or the agent claim.
    pub agent: SpiffeId,
    /// The delegation chain, when the token carries `act`.
    pub delegation: Option<Arc<Delegation>>,
    /// The RFC 8705 `cnf` `x5t#S256` certificate thumbprint, when bound.
    pub cnf_x5t_s256: Option<[u8; 32]>,
}

/// A token verified before, and what its validity depends on: the times
/// are checked again on every use, and the key set must be the very one
/// it was verified with (a rotation or removal verifies it afresh).
struct Verified {
    token: VerifiedToken,
    keys: Arc<LoadedKeys>,
    exp: i64,
    not_before: i64,
}

/// Most verified tokens remembered: an agent reuses its token for many
/// requests, and a signature check costs tens of microseconds.
const VERIFIED_TOKENS: usize = 4096;

/// One configured issuer and its keys.
pub struct Issuer {
    kind: TokenKind,
    name: Arc<str>,
    audiences: Vec<String>,
    algorithms: Vec<JwtAlgorithm>,
    agent_claim: String,
    trust_domain: Option<String>,
    agent_prefix: Option<String>,
    /// Its signing keys.
    pub keys: Arc<KeySource>,
}

/// Every issuer, by `iss`, and the limits all tokens are held to.
pub struct TokenVerifier {
    issuers: HashMap<String, Issuer>,
    leeway: i64,
    max_lifetime: i64,
    max_token_bytes: usize,
    max_header_bytes: usize,
    max_depth: usize,
    /// Tokens already verified, by their exact text.
    verified: Cache<String, Arc<Verified>>,
}

/// What the header may say; other members (`jku`, `x5u`, `jwk`, `x5c`,
/// ...) are never read.
#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
    /// Checked for JWT-SVIDs only: other issuers differ on it.
    #[serde(default)]
    typ: Option<String>,
}

/// The `typ` values a JWT-SVID may carry (SPIFFE JWT-SVID, 3.1: `JWT` or
/// `JOSE`), compared as RFC 7515, 4.1.9 says media types are: ignoring
/// case, with or without `application/`.
fn is_jwt_svid_typ(typ: &str) -> bool {
    let typ = match typ.get(..12) {
        Some(prefix) if prefix.eq_ignore_ascii_case("application/") => &typ[12..],
        _ => typ,
    };
    typ.eq_ignore_ascii_case("JWT") || typ.eq_ignore_ascii_case("JOSE")
}

/// A token split into its parts, its header decoded, nothing verified.
struct Parsed<'a> {
    header: Header,
    signing_input: &'a str,
    claims: &'a str,
    signature: &'a str,
}

impl TokenVerifier {
    /// A verifier of `config`'s issuers; `keys` gives each issuer's key
    /// source, in the order of `config.issuers`.
    pub fn new(config: &Tokens, keys: Vec<Arc<KeySource>>) -> TokenVerifier {
        let issuers = config
            .issuers
            .iter()
            .zip(keys)
            .map(|(c, keys)| {
                (
                    c.issuer.clone(),
                    Issuer {
                        kind: c.kind,
                        name: c.issuer.as_str().into(),
                        audiences: c.audiences.clone(),
                        algorithms: c.algorithms.clone(),
                        agent_claim: c.agent_claim.clone(),
                        // An `oidc` issuer with only a prefix names agents
                        // in the prefix's domain, as config validation
                        // assumes when it checks the registry.
                        trust_domain: c.trust_domain.clone().or_else(|| {
                            let prefix = c.agent_prefix.as_deref()?;
                            let id = SpiffeId::parse(&format!("{prefix}x")).ok()?;
                            Some(id.trust_domain().to_string())
                        }),
                        agent_prefix: c.agent_prefix.clone(),
                        keys,
                    },
                )
            })
            .collect();
        TokenVerifier {
            issuers,
            leeway: clamp(config.leeway_seconds),
            max_lifetime: clamp(config.max_lifetime_seconds),
            max_token_bytes: config.max_token_bytes,
            max_header_bytes: config.max_header_bytes,
            max_depth: config.max_delegation_depth,
            // Bounded by count: each hit checks the token's own times and
            // keys again, so an entry past its expiry is never believed.
            verified: Cache::new(VERIFIED_TOKENS),
        }
    }

    /// Whether any issuer is configured: without one, `Authorization`
    /// headers are not Tether's business.
    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// The key source to refetch before verifying `token`: the token names
    /// a `kid` its issuer's current keys lack, and an early fetch is
    /// allowed. Anything else is left to [`Self::verify`] to judge.
    pub fn refetch_for(&self, token: &str, now: Instant) -> Option<Arc<KeySource>> {
        let parsed = self.parse(token).ok()?;
        let kid = parsed.header.kid.as_deref()?;
        let alg = JwtAlgorithm::from_name(&parsed.header.alg)?;
        let claims: Map<String, Value> = decode_json(parsed.claims).ok()?;
        let issuer = self.issuers.get(claims.get("iss")?.as_str()?)?;
        let known = issuer
            .keys
            .usable(now)
            .is_some_and(|k| k.set.find(Some(kid), alg).is_some());
        (!known && issuer.keys.may_refetch(now)).then(|| issuer.keys.clone())
    }

    /// Verifies `token` at `now` (Unix seconds; `instant` for key
    /// freshness). A token verified before is only checked for time and
    /// for its issuer's keys being the same set: the same text under the
    /// same keys and config has the same signature and claims. Anything
    /// else is verified in full, which also gives the precise refusal.
    pub fn verify(&self, token: &str, now: i64, instant: Instant) -> Result<VerifiedToken, Denial> {
        if let Some(hit) = self.verified.get(token) {
            let same_keys = self
                .issuers
                .get(hit.token.issuer.as_ref())
                .and_then(|i| i.keys.usable(instant))
                .is_some_and(|k| Arc::ptr_eq(&k, &hit.keys));
            if same_keys {
                // Its signature held under these keys: an agent still
                // sending it once expired is refused without checking
                // the signature again on every request.
                if let Some(expired) = self.expired(hit.exp, now) {
                    return Err(expired);
                }
                if now.saturating_add(self.leeway) >= hit.not_before {
                    return Ok(hit.token.clone());
                }
            }
        }
        let entry = Arc::new(self.verify_in_full(token, now, instant)?);
        self.verified.insert(token.to_string(), entry.clone());
        Ok(entry.token.clone())
    }

    fn verify_in_full(&self, token: &str, now: i64, instant: Instant) -> Result<Verified, Denial> {
        let parsed = self.parse(token)?;
        let alg = match parsed.header.alg.as_str() {
            "none" => {
                return Err(refuse(
                    Reason::TokenAlgorithm,
                    "`alg: none` is never accepted",
                ))
            }
            a if a.starts_with("HS") => {
                return Err(refuse(
                    Reason::TokenAlgorithm,
                    format!("`{a}`: HMAC is never accepted, only asymmetric signatures"),
                ))
            }
            a => JwtAlgorithm::from_name(a).ok_or_else(|| {
                refuse(
                    Reason::TokenAlgorithm,
                    format!("algorithm `{a}` is not accepted"),
                )
            })?,
        };
        if parsed.header.crit.is_some() {
            return Err(refuse(
                Reason::TokenMalformed,
                "`crit` names extensions Tether does not understand",
            ));
        }
        let claims: Map<String, Value> = decode_json(parsed.claims)
            .map_err(|e| refuse(Reason::TokenMalformed, format!("claims: {e}")))?;
        let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
        let issuer = self.issuers.get(iss).ok_or_else(|| {
            refuse(
                Reason::TokenIssuer,
                format!("issuer `{}` is not configured", clip(iss)),
            )
        })?;
        if let (TokenKind::JwtSvid, Some(typ)) = (issuer.kind, &parsed.header.typ) {
            // An access token (`at+jwt`) or any other kind of JWT the same
            // issuer signs is not an SVID, whatever its claims say.
            if !is_jwt_svid_typ(typ) {
                return Err(refuse(
                    Reason::TokenMalformed,
                    format!(
                        "a JWT-SVID's `typ` must be `JWT` or `JOSE`, not `{}`",
                        clip(typ)
                    ),
                ));
            }
        }
        if !issuer.algorithms.contains(&alg) {
            return Err(refuse(
                Reason::TokenAlgorithm,
                format!("`{}` is not accepted from `{}`", alg.as_str(), issuer.name),
            ));
        }
        let keys = issuer.keys.usable(instant).ok_or_else(|| {
            refuse(
                Reason::TokenKeysUnavailable,
                format!(
                    "no fresh keys for `{}` from {}",
                    issuer.name, issuer.keys.origin
                ),
            )
        })?;
        let kid = parsed.header.kid.as_deref();
        let key = keys.set.find(kid, alg).ok_or_else(|| {
            refuse(
                Reason::TokenUnknownKey,
                match kid {
                    Some(kid) => format!("`{}` has no key `{}`", issuer.name, clip(kid)),
                    None => format!(
                        "no `kid`, and `{}` has no single {} key",
                        issuer.name,
                        alg.as_str()
                    ),
                },
            )
        })?;
        if !key.fits(alg) {
            return Err(refuse(
                Reason::TokenAlgorithm,
                format!(
                    "`{}` does not fit key `{}`",
                    alg.as_str(),
                    kid.unwrap_or("")
                ),
            ));
        }
        let signature = decode(parsed.signature)
            .map_err(|_| refuse(Reason::TokenMalformed, "signature is not base64url"))?;
        if !key.verify(alg, parsed.signing_input.as_bytes(), &signature) {
            return Err(refuse(Reason::TokenSignature, "signature does not verify"));
        }
        // From here on the claims are the issuer's.
        let times = self.check_times(&claims, now)?;
        check_audience(issuer, &claims)?;
        let (agent, delegation) = self.agent(issuer, &claims)?;
        let cnf_x5t_s256 = cnf_thumbprint(&claims)?;
        let verified = VerifiedToken {
            kind: issuer.kind,
            issuer: issuer.name.clone(),
            agent,
            delegation,
            cnf_x5t_s256,
        };
        let (exp, not_before) = times;
        Ok(Verified {
            token: verified,
            keys,
            exp,
            not_before,
        })
    }

    /// Splits the token and decodes its header, within the size limits.
    fn parse<'a>(&self, token: &'a str) -> Result<Parsed<'a>, Denial> {
        if token.len() > self.max_token_bytes {
            return Err(refuse(
                Reason::TokenTooLarge,
                format!("token is over {} bytes", self.max_token_bytes),
            ));
        }
        let mut parts = token.split('.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(refuse(
                Reason::TokenMalformed,
                "not a JWS compact token (three parts)",
            ));
        };
        if header.len() / 4 * 3 > self.max_header_bytes {
            return Err(refuse(
                Reason::TokenTooLarge,
                format!("header is over {} bytes", self.max_header_bytes),
            ));
        }
        // RFC 7515, 4: the header is a JSON object. Read straight into
        // `Header`, an array (`["RS256"]`) would fill its fields in order.
        let header: Map<String, Value> = decode_json(header)
            .map_err(|e| refuse(Reason::TokenMalformed, format!("header: {e}")))?;
        let header: Header = serde_json::from_value(Value::Object(header))
            .map_err(|e| refuse(Reason::TokenMalformed, format!("header: {e}")))?;
        Ok(Parsed {
            header,
            signing_input: &token[..token.len() - signature.len() - 1],
            claims,
            signature,
        })
    }

    /// The refusal of a token that expired at `exp`, if it has by `now`.
    fn expired(&self, exp: i64, now: i64) -> Option<Denial> {
        (now > exp.saturating_add(self.leeway))
            .then(|| refuse(Reason::TokenExpired, format!("expired {}s ago", now - exp)))
    }

    /// Checks `exp`, `nbf`, `iat` and the lifetime; returns `exp` and the
    /// earliest time the token is valid (`nbf` or `iat`, the later).
    fn check_times(&self, claims: &Map<String, Value>, now: i64) -> Result<(i64, i64), Denial> {
        let time = |name: &str| -> Result<Option<i64>, Denial> {
            match claims.get(name) {
                None => Ok(None),
                Some(v) => v
                    .as_i64()
                    .or_else(|| v.as_f64().map(|f| f.floor() as i64))
                    .map(Some)
                    .ok_or_else(|| {
                        refuse(Reason::TokenClaims, format!("`{name}` is not a number"))
                    }),
            }
        };
        let exp = time("exp")?.ok_or_else(|| refuse(Reason::TokenClaims, "no `exp`"))?;
        if let Some(expired) = self.expired(exp, now) {
            return Err(expired);
        }
        if let Some(nbf) = time("nbf")? {
            if now.saturating_add(self.leeway) < nbf {
                return Err(refuse(
                    Reason::TokenNotYetValid,
                    format!("not valid for another {}s", nbf - now),
                ));
            }
        }
        let iat = time("iat")?.ok_or_else(|| {
            refuse(
                Reason::TokenLifetime,
                "no `iat`, so its lifetime is unknown",
            )
        })?;
        if now.saturating_add(self.leeway) < iat {
            return Err(refuse(Reason::TokenNotYetValid, "issued in the future"));
        }
        let lifetime = exp.saturating_sub(iat);
        if lifetime > self.max_lifetime {
            return Err(refuse(
                Reason::TokenLifetime,
                format!(
                    "lifetime {lifetime}s is over the maximum {}s",
                    self.max_lifetime
                ),
            ));
        }
        let nbf = time("nbf")?.unwrap_or(iat);
        Ok((exp, nbf.max(iat)))
    }

    /// The acting agent and, under delegation, the chain. With `act`
    /// (RFC 8693), `sub` is the subject the agents act for, and the
    /// nested `act` claims name the agents, outermost acting now.
    fn agent(
        &self,
        issuer: &Issuer,
        claims: &Map<String, Value>,
    ) -> Result<(SpiffeId, Option<Arc<Delegation>>), Denial> {
        let Some(mut act) = claims.get("act") else {
            let value = claims
                .get(&issuer.agent_claim)
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    refuse(
                        Reason::TokenClaims,
                        format!("no `{}` claim", issuer.agent_claim),
                    )
                })?;
            let agent = issuer.agent_id(value)?;
            if issuer.kind == TokenKind::Kubernetes {
                check_kubernetes_claim(claims, value)?;
            }
            return Ok((agent, None));
        };
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| refuse(Reason::TokenClaims, "a delegated token has no `sub`"))?;
        // Outermost first as the token nests them; reversed below so the
        // chain reads from the subject to the agent acting now.
        let mut actors = Vec::new();
        loop {
            if actors.len() == self.max_depth {
                return Err(refuse(
                    Reason::DelegationDepth,
                    format!("delegation chain is deeper than {}", self.max_depth),
                ));
            }
            let sub = act
                .get("sub")
                .and_then(Value::as_str)
                .ok_or_else(|| refuse(Reason::TokenClaims, "an `act` claim has no `sub`"))?;
            actors.push(issuer.agent_id(sub)?);
            match act.get("act") {
                Some(inner) => act = inner,
                None => break,
            }
        }
        actors.reverse();
        let agent = actors
            .last()
            .cloned()
            .ok_or_else(|| refuse(Reason::TokenClaims, "empty `act`"))?;
        Ok((
            agent,
            Some(Arc::new(Delegation {
                subject: subject.into(),
                actors,
            })),
        ))
    }
}

/// The certificate thumbprint a token is bound to (RFC 8705), if any. A
/// token bound another way (a DPoP key's `jkt`, a `jwk`) is refused, not
/// taken for a bearer token: its issuer said it only counts with proof of
/// a key, and Tether checks no such proof.
fn cnf_thumbprint(claims: &Map<String, Value>) -> Result<Option<[u8; 32]>, Denial> {
    let Some(cnf) = claims.get("cnf") else {
        return Ok(None);
    };
    let thumbprint = cnf
        .as_object()
        .filter(|c| c.len() == 1)
        .and_then(|c| c.get("x5t#S256"))
        .ok_or_else(|| {
            refuse(
                Reason::TokenNotBound,
                "`cnf` binds the token by a method Tether does not check (only `x5t#S256`)",
            )
        })?;
    thumbprint
        .as_str()
        .and_then(|s| decode(s).ok())
        .and_then(|t| <[u8; 32]>::try_from(t).ok())
        .map(Some)
        .ok_or_else(|| {
            refuse(
                Reason::TokenClaims,
                "`cnf.x5t#S256` is not a SHA-256 thumbprint",
            )
        })
}

impl Issuer {
    /// The agent a claim value names, by the issuer's kind.
    fn agent_id(&self, value: &str) -> Result<SpiffeId, Denial> {
        let bad = |why: String| refuse(Reason::TokenClaims, why);
        let in_domain = |id: SpiffeId| match &self.trust_domain {
            Some(td) if id.trust_domain() != td => Err(bad(format!(
                "`{id}` is not in trust domain `{td}` of `{}`",
                self.name
            ))),
            _ => Ok(id),
        };
        match self.kind {
            TokenKind::JwtSvid => in_domain(SpiffeId::parse(value).map_err(bad)?),
            TokenKind::Kubernetes => {
                if value.starts_with("spiffe://") {
                    return in_domain(SpiffeId::parse(value).map_err(bad)?);
                }
                let (namespace, account) = service_account(value).ok_or_else(|| {
                    bad(format!(
                        "`{}` is not `system:serviceaccount:NS:SA`",
                        clip(value)
                    ))
                })?;
                let td = self.trust_domain.as_deref().unwrap_or_default();
                SpiffeId::parse(&format!("spiffe://{td}/ns/{namespace}/sa/{account}")).map_err(bad)
            }
            // Whatever the claim says, the agent is in the issuer's trust
            // domain (a partner's IdP cannot name one of ours), and under
            // its prefix when it has one: whoever names clients at the IdP
            // names agents there, not the mTLS agents beside them.
            TokenKind::Oidc => match (&self.agent_prefix, value.starts_with("spiffe://")) {
                (None, true) => in_domain(SpiffeId::parse(value).map_err(bad)?),
                (Some(prefix), spiffe) => {
                    let id = match spiffe {
                        true => SpiffeId::parse(value),
                        false => SpiffeId::parse(&format!("{prefix}{value}")),
                    }
                    .map_err(bad)?;
                    if !id.as_str().starts_with(prefix.as_str()) {
                        return Err(bad(format!(
                            "`{id}` is not under `{prefix}`, the agent prefix of `{}`",
                            self.name
                        )));
                    }
                    in_domain(id)
                }
                (None, false) => Err(bad(format!(
                    "`{}` is not a SPIFFE ID and `{}` has no `agent_prefix`",
                    clip(value),
                    self.name
                ))),
            },
        }
    }
}

/// `system:serviceaccount:NS:SA` into its namespace and name.
fn service_account(sub: &str) -> Option<(&str, &str)> {
    let rest = sub.strip_prefix("system:serviceaccount:")?;
    let (namespace, account) = rest.split_once(':')?;
    let dns_label = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    };
    (dns_label(namespace) && dns_label(account)).then_some((namespace, account))
}

/// The `kubernetes.io` claim, when present, must name the same service
/// account as `sub`.
fn check_kubernetes_claim(claims: &Map<String, Value>, sub: &str) -> Result<(), Denial> {
    let Some(k8s) = claims.get("kubernetes.io") else {
        return Ok(());
    };
    let namespace = k8s.get("namespace").and_then(Value::as_str);
    let account = k8s
        .get("serviceaccount")
        .and_then(|s| s.get("name"))
        .and_then(Value::as_str);
    match (service_account(sub), namespace, account) {
        (Some((ns, sa)), Some(n), Some(a)) if ns == n && sa == a => Ok(()),
        _ => Err(refuse(
            Reason::TokenClaims,
            "`kubernetes.io` names another service account than `sub`",
        )),
    }
}

fn check_audience(issuer: &Issuer, claims: &Map<String, Value>) -> Result<(), Denial> {
    let accepted = |v: &Value| {
        v.as_str()
            .is_some_and(|a| issuer.audiences.iter().any(|x| x == a))
    };
    let ok = match claims.get("aud") {
        Some(Value::Array(auds)) => auds.iter().any(accepted),
        Some(aud) => accepted(aud),
        None => false,
    };
    if ok {
        Ok(())
    } else {
        Err(refuse(
            Reason::TokenAudience,
            format!("`aud` names none of the audiences of `{}`", issuer.name),
        ))
    }
}

fn decode(part: &str) -> Result<Vec<u8>, base64::DecodeError> {
    URL_SAFE_NO_PAD.decode(part)
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, String> {
    let bytes = decode(part).map_err(|_| "not base64url".to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| format!("not a JSON object: {e}"))
}

fn refuse(reason: Reason, detail: impl Into<std::borrow::Cow<'static, str>>) -> Denial {
    Denial::new(reason, detail)
}

/// Caller-supplied text in a log detail, cut short: a token's claims are
/// not logged whole.
fn clip(s: &str) -> String {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let cut = if end < s.len() { "…" } else { "" };
    format!("{}{cut}", s[..end].escape_debug())
}

fn clamp(seconds: u64) -> i64 {
    i64::try_from(seconds).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
