//! Client certificate verification for SPIFFE trust domains.
//!
//! Each trust domain has its own bundle, and a leaf is verified only
//! against the bundle of the trust domain its SPIFFE ID names. So a CA of
//! trust domain A can never vouch for an identity in trust domain B, even
//! when both bundles are loaded: the leaf's own claim picks the one set of
//! roots it must chain to.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus::IntCounterVec;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, Error, RootCertStore, SignatureScheme};

use super::PeerIdentity;

/// The verifiers of every trusted domain. Swapped whole on reload.
pub struct TrustStore {
    domains: HashMap<String, Arc<dyn ClientCertVerifier>>,
}

impl TrustStore {
    /// Builds a store from `(trust domain, CA certificates)` pairs.
    pub fn new(
        bundles: Vec<(String, Vec<CertificateDer<'static>>)>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<TrustStore, String> {
        let mut domains = HashMap::new();
        for (name, certs) in bundles {
            let mut roots = RootCertStore::empty();
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("trust domain `{name}`: bad CA certificate: {e}"))?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "trust domain `{name}`: bundle holds no certificate"
                ));
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| format!("trust domain `{name}`: {e}"))?;
            domains.insert(name, verifier);
        }
        Ok(TrustStore { domains })
    }
}

/// A rustls client verifier that requires an X.509-SVID from a trusted
/// SPIFFE trust domain.
pub struct SpiffeClientVerifier {
    store: ArcSwap<TrustStore>,
    provider: Arc<CryptoProvider>,
    mandatory: bool,
    rejected: IntCounterVec,
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("mandatory", &self.mandatory)
            .finish_non_exhaustive()
    }
}

impl SpiffeClientVerifier {
    /// A verifier over `store`. With `mandatory`, a client without a
    /// certificate fails the handshake. Refusals are counted in `rejected`
    /// by reason.
    pub fn new(
        store: TrustStore,
        provider: Arc<CryptoProvider>,
        mandatory: bool,
        rejected: IntCounterVec,
    ) -> SpiffeClientVerifier {
        SpiffeClientVerifier {
            store: ArcSwap::from_pointee(store),
            provider,
            mandatory,
            rejected,
        }
    }

    /// Replaces the trusted bundles. Handshakes in flight finish with the
    /// store they started with; there is never a moment with none.
    pub fn replace(&self, store: TrustStore) {
        self.store.store(Arc::new(store));
    }

    fn reject(&self, reason: &str, detail: String) -> Error {
        self.rejected.with_label_values(&[reason]).inc();
        log::info!("client certificate refused: {detail}");
        Error::General(detail)
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // SPIFFE clients present their SVID without hints, and not naming
        // our CAs tells a scanner nothing.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let peer = PeerIdentity::from_leaf_der(end_entity)
            .map_err(|e| self.reject(e.code(), e.to_string()))?;
        let store = self.store.load();
        let Some(verifier) = store.domains.get(peer.id.trust_domain()) else {
            return Err(self.reject(
                "untrusted_domain",
                format!(
                    "`{}`: trust domain `{}` is not trusted",
                    peer.id,
                    peer.id.trust_domain()
                ),
            ));
        };
        verifier
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| {
                self.reject(
                    "chain",
                    format!(
                        "`{}` does not chain to the bundle of `{}`: {e}",
                        peer.id,
                        peer.id.trust_domain()
                    ),
                )
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::super::pki::Pki;
    use super::*;

    fn verifier(bundles: &[&Pki]) -> SpiffeClientVerifier {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let store = TrustStore::new(
            bundles
                .iter()
                .map(|p| (p.trust_domain.clone(), vec![p.ca_der().to_vec().into()]))
                .collect(),
            &provider,
        )
        .expect("store");
        let counter =
            IntCounterVec::new(prometheus::Opts::new("r", "r"), &["reason"]).expect("counter");
        SpiffeClientVerifier::new(store, provider, true, counter)
    }

    fn verify(v: &SpiffeClientVerifier, pki: &Pki, uri: &str) -> Result<(), Error> {
        let leaf = pki.leaf(&[uri]).expect("leaf");
        v.verify_client_cert(&leaf.der().to_vec().into(), &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn each_trust_domain_vouches_only_for_itself() {
        let a = Pki::new("a.example").expect("pki");
        let b = Pki::new("b.example").expect("pki");
        let v = verifier(&[&a, &b]);
        assert!(verify(&v, &a, "spiffe://a.example/agent").is_ok());
        assert!(verify(&v, &b, "spiffe://b.example/agent").is_ok());
        // A's CA signs a leaf that claims to be in B: refused.
        assert!(verify(&v, &a, "spiffe://b.example/agent").is_err());
        assert_eq!(v.rejected.with_label_values(&["chain"]).get(), 1);
    }

    #[test]
    fn unknown_trust_domains_and_non_svids_are_refused() {
        let a = Pki::new("a.example").expect("pki");
        let c = Pki::new("c.example").expect("pki");
        let v = verifier(&[&a]);
        assert!(verify(&v, &c, "spiffe://c.example/agent").is_err());
        assert_eq!(v.rejected.with_label_values(&["untrusted_domain"]).get(), 1);
        assert!(verify(&v, &a, "https://a.example/agent").is_err());
        assert_eq!(v.rejected.with_label_values(&["not_spiffe"]).get(), 1);
    }

    #[test]
    fn replacing_the_store_takes_effect_at_once() {
        let a = Pki::new("a.example").expect("pki");
        let b = Pki::new("b.example").expect("pki");
        let v = verifier(&[&a]);
        assert!(verify(&v, &b, "spiffe://b.example/agent").is_err());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        v.replace(
            TrustStore::new(
                vec![(b.trust_domain.clone(), vec![b.ca_der().to_vec().into()])],
                &provider,
            )
            .expect("store"),
        );
        assert!(verify(&v, &b, "spiffe://b.example/agent").is_ok());
        assert!(verify(&v, &a, "spiffe://a.example/agent").is_err());
    }
}
