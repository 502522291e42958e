//! Token issuers' public keys: JWK sets (RFC 7517) from a file or a URL.
//!
//! A [`KeySource`] holds the last valid key set and when it was loaded. A
//! file source is always current (a changed file is re-read by reload); a
//! URL source is fetched in the background (the proxy's fetcher) and is
//! usable only while fresh: when fetches keep failing past `max_age`, the
//! issuer's tokens are refused rather than checked against keys that may
//! have been revoked. An unknown `kid` asks the fetcher for an early fetch,
//! no more often than a cool-down that doubles after each failure.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;
use tether_config::JwtAlgorithm;

/// The longest a failing fetcher waits between unknown-`kid` fetches.
const MAX_COOLDOWN: Duration = Duration::from_secs(60);

/// A public key usable to verify signatures.
#[derive(Debug, Clone)]
pub struct Jwk {
    /// Its key id.
    pub kid: Option<String>,
    /// The one algorithm it may be used with, when the set says.
    pub alg: Option<JwtAlgorithm>,
    key: PublicKey,
}

#[derive(Debug, Clone)]
enum PublicKey {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// An uncompressed point, `04 || x || y`.
    P256(Vec<u8>),
    P384(Vec<u8>),
    Ed25519(Vec<u8>),
}

impl Jwk {
    /// Whether `alg` is an algorithm for this key's type (and the one the
    /// key names, if it names one): RFC 8725 section 3.1.
    pub fn fits(&self, alg: JwtAlgorithm) -> bool {
        use JwtAlgorithm::*;
        let family = matches!(
            (&self.key, alg),
            (
                PublicKey::Rsa { .. },
                RS256 | RS384 | RS512 | PS256 | PS384 | PS512
            ) | (PublicKey::P256(_), ES256)
                | (PublicKey::P384(_), ES384)
                | (PublicKey::Ed25519(_), EdDSA)
        );
        family && self.alg.is_none_or(|a| a == alg)
    }

    /// Whether `signature` is this key's signature of `message` by `alg`.
    /// Callers check [`Jwk::fits`] first.
    pub fn verify(&self, alg: JwtAlgorithm, message: &[u8], sig: &[u8]) -> bool {
        use JwtAlgorithm::*;
        let rsa = |params: &'static signature::RsaParameters| match &self.key {
            PublicKey::Rsa { n, e } => RsaPublicKeyComponents { n, e }
                .verify(params, message, sig)
                .is_ok(),
            _ => false,
        };
        let point = |algorithm: &'static dyn signature::VerificationAlgorithm, key: &[u8]| {
            UnparsedPublicKey::new(algorithm, key)
                .verify(message, sig)
                .is_ok()
        };
        match (alg, &self.key) {
            (RS256, _) => rsa(&signature::RSA_PKCS1_2048_8192_SHA256),
            (RS384, _) => rsa(&signature::RSA_PKCS1_2048_8192_SHA384),
            (RS512, _) => rsa(&signature::RSA_PKCS1_2048_8192_SHA512),
            (PS256, _) => rsa(&signature::RSA_PSS_2048_8192_SHA256),
            (PS384, _) => rsa(&signature::RSA_PSS_2048_8192_SHA384),
            (PS512, _) => rsa(&signature::RSA_PSS_2048_8192_SHA512),
            (ES256, PublicKey::P256(k)) => point(&signature::ECDSA_P256_SHA256_FIXED, k),
            (ES384, PublicKey::P384(k)) => point(&signature::ECDSA_P384_SHA384_FIXED, k),
            (EdDSA, PublicKey::Ed25519(k)) => point(&signature::ED25519, k),
            _ => false,
        }
    }
}

/// A JWK as it appears in a set; only the members Tether reads. `x5c`,
/// `x5u` and the rest are ignored: a key is trusted because the set is.
#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    usage: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

#[derive(Deserialize)]
struct RawSet {
    keys: Vec<serde_json::Value>,
}

/// The verification keys of one issuer.
#[derive(Debug, Clone)]
pub struct KeySet {
    keys: Vec<Jwk>,
}

impl KeySet {
    /// Parses a JWK set. Keys that are not signature keys of a supported
    /// type are skipped (a SPIRE bundle also holds X.509 authorities); a
    /// set with no usable key at all is an error, so a broken source is
    /// never mistaken for an issuer with no keys.
    pub fn parse(json: &[u8]) -> Result<KeySet, String> {
        let raw: RawSet =
            serde_json::from_slice(json).map_err(|e| format!("not a JWK set: {e}"))?;
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for (i, value) in raw.keys.into_iter().enumerate() {
            match serde_json::from_value::<RawJwk>(value)
                .map_err(|e| e.to_string())
                .and_then(parse_key)
            {
                Ok(Some(key)) => keys.push(key),
                Ok(None) => {}
                Err(e) => skipped.push(format!("key {i}: {e}")),
            }
        }
        if keys.is_empty() {
            return Err(format!(
                "no usable signature key in the set{}{}",
                if skipped.is_empty() { "" } else { ": " },
                skipped.join("; ")
            ));
        }
        Ok(KeySet { keys })
    }

    /// The key a token's header points at. With a `kid`, the key with that
    /// id; without, the set's only key that fits `alg` (several would be
    /// guesswork).
    pub fn find(&self, kid: Option<&str>, alg: JwtAlgorithm) -> Option<&Jwk> {
        match kid {
            Some(kid) => self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            None => {
                let mut fitting = self.keys.iter().filter(|k| k.fits(alg));
                match (fitting.next(), fitting.next()) {
                    (Some(one), None) => Some(one),
                    _ => None,
                }
            }
        }
    }

    /// How many keys the set holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set is empty (never, for a parsed set).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

fn parse_key(raw: RawJwk) -> Result<Option<Jwk>, String> {
    // SPIFFE bundles mark JWT-SVID signing keys `jwt-svid` (and hold
    // X.509 authorities as `x509-svid`); plain JWKS mark them `sig`.
    if raw
        .usage
        .as_deref()
        .is_some_and(|u| u != "sig" && u != "jwt-svid")
    {
        return Ok(None); // an encryption key, or a SPIRE `x509-svid` entry
    }
    let alg = match raw.alg.as_deref() {
        None => None,
        Some(name) => Some(
            JwtAlgorithm::from_name(name)
                .ok_or_else(|| format!("algorithm `{name}` is not accepted"))?,
        ),
    };
    let b64 = |field: &str, value: Option<String>| -> Result<Vec<u8>, String> {
        let value = value.ok_or_else(|| format!("`{}` key without `{field}`", raw.kty))?;
        URL_SAFE_NO_PAD
            .decode(value)
            .map_err(|_| format!("`{field}` is not base64url"))
    };
    let curve_point = |x: Vec<u8>, y: Vec<u8>, size: usize| -> Result<Vec<u8>, String> {
        if x.len() != size || y.len() != size {
            return Err("EC coordinates of the wrong length".into());
        }
        Ok([&[4u8][..], &x, &y].concat())
    };
    let key = match (raw.kty.as_str(), raw.crv.as_deref()) {
        ("RSA", _) => PublicKey::Rsa {
            n: b64("n", raw.n)?,
            e: b64("e", raw.e)?,
        },
        ("EC", Some("P-256")) => {
            PublicKey::P256(curve_point(b64("x", raw.x)?, b64("y", raw.y)?, 32)?)
        }
        ("EC", Some("P-384")) => {
            PublicKey::P384(curve_point(b64("x", raw.x)?, b64("y", raw.y)?, 48)?)
        }
        ("OKP", Some("Ed25519")) => PublicKey::Ed25519(b64("x", raw.x)?),
        // Symmetric keys (`oct`) can never verify an asymmetric signature:
        // refusing them here is what keeps HMAC out.
        (kty, crv) => {
            return Err(format!(
                "key type `{kty}`{} is not supported",
                crv.map(|c| format!(" on `{c}`")).unwrap_or_default()
            ))
        }
    };
    let jwk = Jwk {
        kid: raw.kid,
        alg,
        key,
    };
    if let Some(alg) = jwk.alg {
        if !jwk.fits(alg) {
            return Err(format!("`alg` {} does not fit the key type", alg.as_str()));
        }
    }
    Ok(Some(jwk))
}

/// A key set and when it was loaded.
#[derive(Debug)]
pub struct LoadedKeys {
    /// The keys.
    pub set: KeySet,
    /// When they were loaded or fetched.
    pub at: Instant,
}

/// Where one issuer's keys come from, and the keys last loaded.
pub struct KeySource {
    /// The file or URL, for messages.
    pub origin: String,
    current: ArcSwapOption<LoadedKeys>,
    fetch: Option<Fetch>,
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySource")
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// The state of a fetched (URL) source.
struct Fetch {
    max_age: Duration,
    min_interval: Duration,
    gate: Mutex<Gate>,
    /// Woken when a request met an unknown `kid`.
    wanted: tokio::sync::Notify,
    /// Counts finished fetch attempts, so a request can wait for the next.
    attempts: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct Gate {
    last_attempt: Option<Instant>,
    failures: u32,
}

impl Gate {
    fn cooldown(&self, min_interval: Duration) -> Duration {
        min_interval
            .saturating_mul(1 << self.failures.min(16))
            .min(MAX_COOLDOWN.max(min_interval))
    }
}

impl KeySource {
    /// A source whose keys are loaded from a file (and replaced on reload).
    pub fn file(origin: impl Into<String>, set: KeySet) -> KeySource {
        let source = KeySource {
            origin: origin.into(),
            current: ArcSwapOption::empty(),
            fetch: None,
        };
        source.store(set);
        source
    }

    /// A source fetched from a URL, empty until the first fetch: tokens of
    /// its issuer are refused until then.
    pub fn url(url: impl Into<String>, max_age: Duration, min_interval: Duration) -> KeySource {
        KeySource {
            origin: url.into(),
            current: ArcSwapOption::empty(),
            fetch: Some(Fetch {
                max_age,
                min_interval,
                gate: Mutex::new(Gate::default()),
                wanted: tokio::sync::Notify::new(),
                attempts: tokio::sync::watch::Sender::new(0),
            }),
        }
    }

    /// Replaces the keys with a newly loaded set.
    pub fn store(&self, set: KeySet) {
        self.current.store(Some(Arc::new(LoadedKeys {
            set,
            at: Instant::now(),
        })));
    }

    /// The keys, if they may be used at `now`: a fetched set only while
    /// it is younger than `max_age`.
    pub fn usable(&self, now: Instant) -> Option<Arc<LoadedKeys>> {
        let keys = self.current.load_full()?;
        match &self.fetch {
            Some(f) if now.saturating_duration_since(keys.at) > f.max_age => None,
            _ => Some(keys),
        }
    }

    /// Whether an early fetch may be asked for now (URL sources outside
    /// their cool-down).
    pub fn may_refetch(&self, now: Instant) -> bool {
        let Some(f) = &self.fetch else {
            return false;
        };
        let gate = f.gate.lock().unwrap_or_else(|p| p.into_inner());
        gate.last_attempt
            .is_none_or(|last| now.saturating_duration_since(last) >= gate.cooldown(f.min_interval))
    }

    /// Asks the fetcher for a fetch now and waits, at most `timeout`, for
    /// an attempt to finish (whatever its outcome).
    pub async fn refetch(&self, timeout: Duration) {
        let Some(f) = &self.fetch else {
            return;
        };
        let mut attempts = f.attempts.subscribe();
        attempts.mark_unchanged();
        f.wanted.notify_one();
        let _ = tokio::time::timeout(timeout, attempts.changed()).await;
    }

    /// For the fetcher: resolves when a request wants an early fetch.
    pub async fn wanted(&self) {
        match &self.fetch {
            Some(f) => f.wanted.notified().await,
            None => std::future::pending().await,
        }
    }

    /// For the fetcher: whether to fetch now. Periodic fetches always may;
    /// early ones respect the cool-down. Records the attempt.
    pub fn begin_fetch(&self, early: bool) -> bool {
        let Some(f) = &self.fetch else {
            return false;
        };
        let now = Instant::now();
        let mut gate = f.gate.lock().unwrap_or_else(|p| p.into_inner());
        if early
            && gate.last_attempt.is_some_and(|last| {
                now.saturating_duration_since(last) < gate.cooldown(f.min_interval)
            })
        {
            return false;
        }
        gate.last_attempt = Some(now);
        true
    }

    /// For the fetcher: the outcome of the attempt [`Self::begin_fetch`]
    /// allowed. A failure keeps the previous keys (usable while fresh).
    pub fn end_fetch(&self, outcome: Result<KeySet, String>) -> Result<(), String> {
        let result = match outcome {
            Ok(set) => {
                self.store(set);
                Ok(())
            }
            Err(e) => Err(e),
        };
        if let Some(f) = &self.fetch {
            let mut gate = f.gate.lock().unwrap_or_else(|p| p.into_inner());
            gate.failures = if result.is_ok() { 0 } else { gate.failures + 1 };
            drop(gate);
            f.attempts.send_modify(|n| *n += 1);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_testkit::mint::Minter;

    #[test]
    fn a_set_keeps_signature_keys_and_skips_the_rest() {
        let es = Minter::es256("k1").expect("key");
        let json = serde_json::json!({"keys": [
            es.jwk(),
            {"kty": "oct", "k": "c2VjcmV0"},
            {"kty": "EC", "crv": "P-256", "use": "enc", "x": "AA", "y": "AA"},
        ]});
        let set = KeySet::parse(json.to_string().as_bytes()).expect("set");
        assert_eq!(set.len(), 1);
        assert!(set.find(Some("k1"), JwtAlgorithm::ES256).is_some());
        assert!(set.find(Some("k2"), JwtAlgorithm::ES256).is_none());
        // Without a kid, the one fitting key.
        assert!(set.find(None, JwtAlgorithm::ES256).is_some());
        assert!(set.find(None, JwtAlgorithm::RS256).is_none());
    }

    #[test]
    fn a_set_without_usable_keys_is_an_error() {
        for json in [
            r#"{"keys": []}"#,
            r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#,
            r#"{"keys": [{"kty": "EC", "crv": "P-256", "alg": "RS256", "x": "AA", "y": "AA"}]}"#,
            r#"not json"#,
        ] {
            assert!(KeySet::parse(json.as_bytes()).is_err(), "{json}");
        }
    }

    #[test]
    fn a_fetched_set_goes_stale_and_refetches_cool_down() {
        let es = Minter::es256("k1").expect("key");
        let set = KeySet::parse(Minter::jwks(&[&es]).as_bytes()).expect("set");
        let source = KeySource::url(
            "http://keys",
            Duration::from_secs(60),
            Duration::from_secs(10),
        );
        let now = Instant::now();
        assert!(source.usable(now).is_none(), "empty before the first fetch");
        assert!(source.may_refetch(now));
        assert!(source.begin_fetch(true));
        source.end_fetch(Ok(set)).expect("stored");
        assert!(source.usable(Instant::now()).is_some());
        assert!(source
            .usable(Instant::now() + Duration::from_secs(61))
            .is_none());
        // An early fetch right after one is refused; a failure doubles it.
        assert!(!source.may_refetch(Instant::now()));
        assert!(source.may_refetch(Instant::now() + Duration::from_secs(10)));
        assert!(source.begin_fetch(false));
        assert!(source.end_fetch(Err("down".into())).is_err());
        assert!(!source.may_refetch(Instant::now() + Duration::from_secs(10)));
        assert!(source.may_refetch(Instant::now() + Duration::from_secs(20)));
    }
}
