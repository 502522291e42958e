//! A throwaway token issuer, for `tether demo` and tests: signs JWTs with
//! keys generated in memory and publishes them as a JWK set. It can also
//! forge the tokens an attacker would send (`none`, HMAC keyed with the
//! public key), so tests prove they are refused. Not for production: use
//! SPIRE, the Kubernetes API server or your OAuth server for real tokens.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use serde_json::{json, Value};

/// Signs tokens with one key.
pub struct Minter {
    /// The key id in headers and the JWK set.
    pub kid: String,
    key: Key,
    rng: SystemRandom,
}

enum Key {
    Es256(EcdsaKeyPair),
    Rs256(RsaKeyPair),
}

impl Minter {
    /// A new ES256 (P-256) key.
    pub fn es256(kid: &str) -> Result<Minter, String> {
        let rng = SystemRandom::new();
        let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|e| e.to_string())?;
        let pair =
            EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).map_err(|e| e.to_string())?;
        Ok(Minter {
            kid: kid.into(),
            key: Key::Es256(pair),
            rng,
        })
    }

    /// An RS256 signer over an RSA private key (PKCS#8 DER); ring cannot
    /// generate RSA keys, so the caller brings one.
    pub fn rs256(kid: &str, pkcs8_der: &[u8]) -> Result<Minter, String> {
        let pair = RsaKeyPair::from_pkcs8(pkcs8_der).map_err(|e| e.to_string())?;
        Ok(Minter {
            kid: kid.into(),
            key: Key::Rs256(pair),
            rng: SystemRandom::new(),
        })
    }

    /// The `alg` this key signs with.
    pub fn alg(&self) -> &'static str {
        match self.key {
            Key::Es256(_) => "ES256",
            Key::Rs256(_) => "RS256",
        }
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> Value {
        match &self.key {
            Key::Es256(pair) => {
                let point = pair.public_key().as_ref();
                json!({
                    "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256",
                    "kid": self.kid,
                    "x": b64(&point[1..33]), "y": b64(&point[33..65]),
                })
            }
            Key::Rs256(pair) => {
                let public: ring::rsa::PublicKeyComponents<Vec<u8>> = pair.public().into();
                json!({
                    "kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid,
                    "n": b64(&public.n), "e": b64(&public.e),
                })
            }
        }
    }

    /// The bytes an attacker would use as an HMAC secret: the public key
    /// (for RSA, its modulus).
    pub fn public_key_bytes(&self) -> Vec<u8> {
        match &self.key {
            Key::Es256(pair) => pair.public_key().as_ref().to_vec(),
            Key::Rs256(pair) => pair.public().as_ref().to_vec(),
        }
    }

    /// A JWK set holding the keys of `minters`.
    pub fn jwks(minters: &[&Minter]) -> String {
        json!({"keys": minters.iter().map(|m| m.jwk()).collect::<Vec<_>>()}).to_string()
    }

    /// A token of `claims` with the usual header (`alg`, `kid`, `typ`).
    pub fn token(&self, claims: &Value) -> String {
        self.sign(
            &json!({"alg": self.alg(), "kid": self.kid, "typ": "JWT"}),
            claims,
        )
    }

    /// A token with exactly `header` and `claims`, signed by this key
    /// whatever the header says.
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let input = signing_input(header, claims);
        let signature = match &self.key {
            Key::Es256(pair) => pair
                .sign(&self.rng, input.as_bytes())
                .map(|s| s.as_ref().to_vec())
                .unwrap_or_default(),
            Key::Rs256(pair) => {
                let mut sig = vec![0; pair.public().modulus_len()];
                match pair.sign(
                    &ring::signature::RSA_PKCS1_SHA256,
                    &self.rng,
                    input.as_bytes(),
                    &mut sig,
                ) {
                    Ok(()) => sig,
                    Err(_) => Vec::new(),
                }
            }
        };
        format!("{input}.{}", b64(&signature))
    }
}

/// A token with `header` and `claims` and an HS256 signature keyed with
/// `secret`: the algorithm-confusion attack when `secret` is a public key.
pub fn hs256(header: &Value, claims: &Value, secret: &[u8]) -> String {
    let input = signing_input(header, claims);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", b64(tag.as_ref()))
}

/// An unsigned token (`alg: none`), as an attacker sends it.
pub fn unsigned(header: &Value, claims: &Value) -> String {
    format!("{}.", signing_input(header, claims))
}

/// The SHA-256 thumbprint of a DER certificate as `cnf.x5t#S256` carries
/// it (RFC 8705).
pub fn x5t_s256(cert_der: &[u8]) -> String {
    b64(ring::digest::digest(&ring::digest::SHA256, cert_der).as_ref())
}

fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}
