//! A throwaway token issuer, for tests and benches: signs JWTs with keys
//! generated in memory and publishes them as a JWK set. It also forges the
//! tokens an attacker would send (`none`, HMAC keyed with the public key),
//! so tests prove they are refused. Never for production: SPIRE, the
//! Kubernetes API server or an OAuth server issues real tokens.

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
    /// (for RSA, its DER `RSAPublicKey`).
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

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{
        RsaPublicKeyComponents, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED,
        RSA_PKCS1_2048_8192_SHA256,
    };
    use rsa::pkcs8::EncodePrivateKey as _;

    fn decode(part: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(part).expect("base64url")
    }

    fn parts(token: &str) -> (Value, Value, &str, Vec<u8>) {
        let mut it = token.split('.');
        let (h, c, s) = (
            it.next().expect("header"),
            it.next().expect("claims"),
            it.next().expect("signature"),
        );
        assert!(it.next().is_none(), "three parts: {token}");
        let header = serde_json::from_slice(&decode(h)).expect("header JSON");
        let claims = serde_json::from_slice(&decode(c)).expect("claims JSON");
        let input_len = h.len() + 1 + c.len();
        (header, claims, &token[..input_len], decode(s))
    }

    /// Verifies `token` with the key the rendered JWK set publishes for
    /// its `kid`, as a verifier would: the set is the only link between
    /// the two.
    fn verifies_against_set(token: &str, jwks: &str) -> bool {
        let (header, _, input, signature) = parts(token);
        let set: Value = serde_json::from_str(jwks).expect("JWKS JSON");
        let Some(jwk) = set["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .find(|k| k["kid"] == header["kid"])
        else {
            return false;
        };
        let field = |name: &str| decode(jwk[name].as_str().expect(name));
        match (jwk["kty"].as_str(), header["alg"].as_str()) {
            (Some("EC"), Some("ES256")) => {
                let mut point = vec![4];
                point.extend(field("x"));
                point.extend(field("y"));
                UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
                    .verify(input.as_bytes(), &signature)
                    .is_ok()
            }
            (Some("RSA"), Some("RS256")) => RsaPublicKeyComponents {
                n: field("n"),
                e: field("e"),
            }
            .verify(&RSA_PKCS1_2048_8192_SHA256, input.as_bytes(), &signature)
            .is_ok(),
            _ => false,
        }
    }

    fn rsa_minter(kid: &str) -> Minter {
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("RSA key");
        let der = key.to_pkcs8_der().expect("PKCS#8");
        Minter::rs256(kid, der.as_bytes()).expect("minter")
    }

    #[test]
    fn a_minted_token_verifies_against_the_rendered_set() {
        let es = Minter::es256("ec-1").expect("key");
        let rs = rsa_minter("rsa-1");
        let jwks = Minter::jwks(&[&es, &rs]);
        let claims = json!({"iss": "https://issuer.example", "sub": "agent"});
        for (minter, alg) in [(&es, "ES256"), (&rs, "RS256")] {
            let token = minter.token(&claims);
            let (header, read, _, _) = parts(&token);
            assert_eq!(header, json!({"alg": alg, "kid": minter.kid, "typ": "JWT"}));
            assert_eq!(read, claims);
            assert!(verifies_against_set(&token, &jwks), "{alg}");
        }
        // The set is what links token and key: another key's set fails it.
        let stranger = Minter::es256("ec-1").expect("key");
        let token = es.token(&claims);
        assert!(!verifies_against_set(&token, &Minter::jwks(&[&stranger])));
    }

    #[test]
    fn sign_keeps_the_header_it_is_given() {
        let es = Minter::es256("ec-1").expect("key");
        let header = json!({"alg": "PS256", "kid": "other", "crit": ["exp"]});
        let token = es.sign(&header, &json!({}));
        let (read, _, input, signature) = parts(&token);
        assert_eq!(read, header);
        // Still this key's signature, whatever the header claims.
        let jwk = es.jwk();
        let mut point = vec![4];
        point.extend(decode(jwk["x"].as_str().expect("x")));
        point.extend(decode(jwk["y"].as_str().expect("y")));
        assert!(UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
            .verify(input.as_bytes(), &signature)
            .is_ok());
    }

    #[test]
    fn unsigned_yields_alg_none_and_no_signature() {
        let token = unsigned(&json!({"alg": "none"}), &json!({"sub": "agent"}));
        assert!(token.ends_with('.'), "{token}");
        let (header, claims, _, signature) = parts(&token);
        assert_eq!(header["alg"], "none");
        assert_eq!(claims["sub"], "agent");
        assert!(signature.is_empty());
    }

    #[test]
    fn hs256_is_keyed_with_the_public_key_it_is_given() {
        let es = Minter::es256("ec-1").expect("key");
        let secret = es.public_key_bytes();
        // The public key the set publishes: what an attacker has.
        let jwk = es.jwk();
        let mut published = vec![4];
        published.extend(decode(jwk["x"].as_str().expect("x")));
        published.extend(decode(jwk["y"].as_str().expect("y")));
        assert_eq!(secret, published);

        let token = hs256(&json!({"alg": "HS256", "kid": "ec-1"}), &json!({}), &secret);
        let (header, _, input, tag) = parts(&token);
        assert_eq!(header["alg"], "HS256");
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
        assert!(ring::hmac::verify(&key, input.as_bytes(), &tag).is_ok());
    }

    #[test]
    fn x5t_s256_is_the_base64url_sha256_of_the_der() {
        // SHA-256 of nothing, RFC 4648 base64url without padding.
        assert_eq!(x5t_s256(b""), "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU");
    }
}
