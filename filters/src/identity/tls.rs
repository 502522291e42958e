//! Certificate verification for SPIFFE trust domains: the listener's
//! clients, and upstreams authorized by SPIFFE ID.
//!
//! Each trust domain has its own bundle, and a leaf is verified only
//! against the bundle of the trust domain its SPIFFE ID names. So a CA of
//! trust domain A can never vouch for an identity in trust domain B, even
//! when both bundles are loaded: the leaf's own claim picks the one set of
//! roots it must chain to.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus::IntCounterVec;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error, RootCertStore, SignatureScheme};
use tether_config::spiffe::SpiffeId;

use super::PeerIdentity;

/// The verifiers of every trusted domain. Swapped whole on reload.
pub struct TrustStore {
    domains: HashMap<String, Arc<dyn ClientCertVerifier>>,
    /// The same bundles as roots, for upstreams' SVIDs (which chain as
    /// servers, not clients).
    roots: HashMap<String, Arc<RootCertStore>>,
}

impl TrustStore {
    /// Builds a store from `(trust domain, CA certificates)` pairs.
    pub fn new(
        bundles: Vec<(String, Vec<CertificateDer<'static>>)>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<TrustStore, String> {
        let mut domains = HashMap::new();
        let mut all_roots = HashMap::new();
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
            let roots = Arc::new(roots);
            let verifier =
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .build()
                    .map_err(|e| format!("trust domain `{name}`: {e}"))?;
            all_roots.insert(name.clone(), roots);
            domains.insert(name, verifier);
        }
        Ok(TrustStore {
            domains,
            roots: all_roots,
        })
    }
}

/// A rustls client verifier that requires an X.509-SVID from a trusted
/// SPIFFE trust domain.
pub struct SpiffeClientVerifier {
    store: ArcSwap<TrustStore>,
    provider: Arc<CryptoProvider>,
    mandatory: bool,
    rejected: IntCounterVec,
    /// The last leaf verified, so that [`Self::verify_peer`] right after
    /// the handshake that verified it need not verify it again.
    last: Mutex<Option<Verified>>,
    /// Bumped by every [`Self::replace`]: a connection verified under an
    /// older one is verified again before it is believed.
    generation: AtomicU64,
}

/// A connection's verified client: its identity, and its chain, kept so
/// that the connection is judged again when the bundles change while it
/// is open (an SVID's CA removed by a reload must stop vouching for the
/// connections it let in, not only for new ones).
pub struct VerifiedPeer {
    peer: Arc<PeerIdentity>,
    chain: Vec<CertificateDer<'static>>,
    /// The store generation the chain last verified against.
    checked: AtomicU64,
}

/// A connection whose client presented a chain that did not verify at the
/// end of its handshake (a resumed session whose SVID has expired since,
/// or whose CA a reload removed). Kept apart from a connection that
/// presented none: a bearer token must not speak alone for it.
pub struct RejectedPeer;

/// A leaf that chained to a store's bundles at a moment.
struct Verified {
    leaf_sha256: [u8; 32],
    /// The store it was verified against, held so that a later store can
    /// never be mistaken for it.
    store: Arc<TrustStore>,
    at: Instant,
}

/// How long a verification vouches for its leaf to [`SpiffeClientVerifier::verify_peer`].
const VERIFIED_FOR: Duration = Duration::from_secs(1);

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
            last: Mutex::new(None),
            generation: AtomicU64::new(0),
        }
    }

    /// [`Self::verify_peer`], keeping what a connection needs to be judged
    /// again after a reload (see [`Self::current`]).
    pub fn verify_connection(&self, chain: &[CertificateDer<'static>]) -> Option<VerifiedPeer> {
        // Read first: a store replaced during the check is checked again.
        let generation = self.generation.load(Ordering::Acquire);
        let peer = self.verify_peer(chain)?;
        Some(VerifiedPeer {
            peer: Arc::new(peer),
            chain: chain.to_vec(),
            checked: AtomicU64::new(generation),
        })
    }

    /// The identity of a connection for its next request: as verified,
    /// unless the bundles have changed since, when its chain is verified
    /// against them first (once per connection and reload, an atomic load
    /// otherwise). `None` when it no longer verifies.
    pub fn current(&self, connection: &VerifiedPeer) -> Option<Arc<PeerIdentity>> {
        let generation = self.generation.load(Ordering::Acquire);
        if connection.checked.load(Ordering::Acquire) != generation {
            let (leaf, intermediates) = connection.chain.split_first()?;
            self.verify_client_cert(leaf, intermediates, UnixTime::now())
                .ok()?;
            connection.checked.store(generation, Ordering::Release);
        }
        Some(connection.peer.clone())
    }

    /// The identity of a connection's client chain, as verified against
    /// the bundles loaded now; `None` when it does not verify (counted and
    /// logged as any refusal).
    ///
    /// A resumed TLS session brings back the chain of the handshake it
    /// resumes without the verifier seeing it again, so an SVID that has
    /// expired since, or whose CA a reload removed, would otherwise still
    /// connect. Right after a full handshake the chain was verified a
    /// moment ago against this very store, and is not verified twice.
    pub fn verify_peer(&self, chain: &[CertificateDer<'_>]) -> Option<PeerIdentity> {
        let (leaf, intermediates) = chain.split_first()?;
        let peer = PeerIdentity::from_leaf_der(leaf).ok()?;
        let store = self.store.load();
        let just_verified = self
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|v| {
                v.leaf_sha256 == peer.cert_sha256
                    && Arc::ptr_eq(&v.store, &store)
                    && v.at.elapsed() < VERIFIED_FOR
            });
        if just_verified {
            return Some(peer);
        }
        self.verify_client_cert(leaf, intermediates, UnixTime::now())
            .ok()
            .map(|_| peer)
    }

    /// The trusted bundles as loaded now.
    pub fn store(&self) -> Arc<TrustStore> {
        self.store.load_full()
    }

    /// Replaces the trusted bundles. Handshakes in flight finish with the
    /// store they started with; there is never a moment with none.
    pub fn replace(&self, store: TrustStore) {
        self.store.store(Arc::new(store));
        // After the store: whoever sees the new generation verifies
        // against the new store.
        self.generation.fetch_add(1, Ordering::AcqRel);
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
        let store = self.store.load_full();
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
        let verified = verifier
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
            })?;
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(Verified {
            leaf_sha256: peer.cert_sha256,
            store,
            at: Instant::now(),
        });
        Ok(verified)
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

/// The SPIFFE IDs an upstream may present.
#[derive(Debug, Clone)]
pub enum ExpectedServer {
    /// One of these IDs, exactly.
    Ids(Vec<SpiffeId>),
    /// Any ID of this trust domain.
    TrustDomain(String),
}

impl ExpectedServer {
    fn admits(&self, id: &SpiffeId) -> bool {
        match self {
            ExpectedServer::Ids(ids) => ids.contains(id),
            ExpectedServer::TrustDomain(td) => id.trust_domain() == td,
        }
    }
}

impl fmt::Display for ExpectedServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedServer::Ids(ids) => {
                for (i, id) in ids.iter().enumerate() {
                    let sep = match i {
                        0 => "",
                        _ if i + 1 == ids.len() => " or ",
                        _ => ", ",
                    };
                    write!(f, "{sep}`{id}`")?;
                }
                Ok(())
            }
            ExpectedServer::TrustDomain(td) => write!(f, "an ID of trust domain `{td}`"),
        }
    }
}

/// A rustls server verifier for an upstream authorized by SPIFFE ID, as
/// SPIFFE clients authorize servers: its leaf must be an X.509-SVID that
/// chains to the bundle of the trust domain its ID names (the bundles
/// loaded now, so a reload reaches new connections), and that ID must be
/// one the upstream is expected to have. The DNS name is not checked: a
/// workload of the domain can get an SVID carrying any name, and SVIDs
/// need not carry one.
pub struct SpiffeServerVerifier {
    /// Whose bundles are the trusted ones: the listener's verifier, which
    /// reload updates.
    bundles: Arc<SpiffeClientVerifier>,
    expected: ExpectedServer,
    provider: Arc<CryptoProvider>,
    /// Counted by reason, labelled with `upstream`.
    rejected: IntCounterVec,
    upstream: String,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("upstream", &self.upstream)
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl SpiffeServerVerifier {
    /// A verifier of upstream `upstream`'s SVID against the bundles
    /// `bundles` holds. Refusals are counted in `rejected`, labelled
    /// `upstream` and `reason`.
    pub fn new(
        bundles: Arc<SpiffeClientVerifier>,
        expected: ExpectedServer,
        provider: Arc<CryptoProvider>,
        rejected: IntCounterVec,
        upstream: String,
    ) -> SpiffeServerVerifier {
        SpiffeServerVerifier {
            bundles,
            expected,
            provider,
            rejected,
            upstream,
        }
    }

    /// The ID of an upstream's chain, if it is an SVID that chains to the
    /// bundle of its trust domain and is expected; otherwise why not, as
    /// a metric reason and a message.
    pub fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, (&'static str, String)> {
        let peer = PeerIdentity::from_leaf_der(end_entity)
            .map_err(|e| (e.code(), format!("certificate: {e}")))?;
        let store = self.bundles.store();
        let Some(roots) = store.roots.get(peer.id.trust_domain()) else {
            return Err((
                "untrusted_domain",
                format!(
                    "presented `{}`: trust domain `{}` is not trusted",
                    peer.id,
                    peer.id.trust_domain()
                ),
            ));
        };
        let parsed = ParsedCertificate::try_from(end_entity)
            .map_err(|e| ("malformed", format!("certificate: {e}")))?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )
        .map_err(|e| {
            (
                "chain",
                format!(
                    "presented `{}`, which does not chain to the bundle of `{}`: {e}",
                    peer.id,
                    peer.id.trust_domain()
                ),
            )
        })?;
        if !self.expected.admits(&peer.id) {
            return Err((
                "spiffe_id",
                format!("presented `{}`, expected {}", peer.id, self.expected),
            ));
        }
        Ok(peer.id)
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self.verify_chain(end_entity, intermediates, now) {
            Ok(_) => Ok(ServerCertVerified::assertion()),
            Err((reason, detail)) => {
                self.rejected
                    .with_label_values(&[self.upstream.as_str(), reason])
                    .inc();
                log::warn!("upstream `{}` refused: {detail}", self.upstream);
                Err(Error::General(detail))
            }
        }
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
    fn a_chain_verified_before_a_store_replacement_is_verified_again() {
        // What a resumed session brings back is judged by the bundles of
        // now, even right after the same leaf was verified.
        let a = Pki::new("a.example").expect("pki");
        let v = verifier(&[&a]);
        let leaf = a.leaf(&["spiffe://a.example/agent"]).expect("leaf");
        let chain = [CertificateDer::from(leaf.der().to_vec())];
        assert!(v
            .verify_client_cert(&chain[0], &[], UnixTime::now())
            .is_ok());
        let peer = v.verify_peer(&chain).expect("just verified");
        assert_eq!(peer.id.as_str(), "spiffe://a.example/agent");
        let successor = Pki::new("a.example").expect("pki");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        v.replace(
            TrustStore::new(
                vec![(
                    a.trust_domain.clone(),
                    vec![successor.ca_der().to_vec().into()],
                )],
                &provider,
            )
            .expect("store"),
        );
        assert!(v.verify_peer(&chain).is_none());
        assert_eq!(v.rejected.with_label_values(&["chain"]).get(), 1);
        // Never verified at all: verified now.
        let other = a.leaf(&["spiffe://a.example/other"]).expect("leaf");
        assert!(v
            .verify_peer(&[CertificateDer::from(other.der().to_vec())])
            .is_none());
    }

    #[test]
    fn an_open_connection_is_judged_again_when_the_bundles_change() {
        let a = Pki::new("a.example").expect("pki");
        let v = verifier(&[&a]);
        let leaf = a.leaf(&["spiffe://a.example/agent"]).expect("leaf");
        let connection = v
            .verify_connection(&[CertificateDer::from(leaf.der().to_vec())])
            .expect("verified");
        assert!(v.current(&connection).is_some());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let store = |pki: &Pki| {
            TrustStore::new(
                vec![(pki.trust_domain.clone(), vec![pki.ca_der().to_vec().into()])],
                &provider,
            )
            .expect("store")
        };
        // The same CA again: still good.
        v.replace(store(&a));
        assert!(v.current(&connection).is_some());
        // Its CA replaced by another: the connection no longer vouches.
        v.replace(store(&Pki::new("a.example").expect("pki")));
        assert!(v.current(&connection).is_none());
        assert_eq!(v.rejected.with_label_values(&["chain"]).get(), 1);
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

    fn upstream_verifier(
        bundles: &[&Pki],
        expected: ExpectedServer,
    ) -> (Arc<SpiffeClientVerifier>, SpiffeServerVerifier) {
        let listener = Arc::new(verifier(bundles));
        let counter = IntCounterVec::new(prometheus::Opts::new("u", "u"), &["upstream", "reason"])
            .expect("counter");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let upstream =
            SpiffeServerVerifier::new(listener.clone(), expected, provider, counter, "api".into());
        (listener, upstream)
    }

    fn serve_as(v: &SpiffeServerVerifier, pki: &Pki, uri: &str) -> Result<(), Error> {
        let leaf = pki.server_svid(uri, &["localhost"]).expect("leaf");
        let name = ServerName::try_from("localhost").expect("name");
        v.verify_server_cert(
            &leaf.der().to_vec().into(),
            &[],
            &name,
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
    }

    fn ids(ids: &[&str]) -> ExpectedServer {
        ExpectedServer::Ids(
            ids.iter()
                .map(|id| SpiffeId::parse(id).expect("id"))
                .collect(),
        )
    }

    #[test]
    fn an_upstream_is_accepted_only_with_an_expected_id_of_a_trusted_chain() {
        let a = Pki::new("a.example").expect("pki");
        let b = Pki::new("b.example").expect("pki");
        let (_, v) = upstream_verifier(
            &[&a, &b],
            ids(&["spiffe://a.example/api", "spiffe://b.example/api"]),
        );
        assert!(serve_as(&v, &a, "spiffe://a.example/api").is_ok());
        assert!(serve_as(&v, &b, "spiffe://b.example/api").is_ok());
        // Another workload of the same domain, same CA, same DNS name.
        let e = serve_as(&v, &a, "spiffe://a.example/other").expect_err("another id");
        assert!(
            e.to_string().contains(
                "presented `spiffe://a.example/other`, expected `spiffe://a.example/api` \
                 or `spiffe://b.example/api`"
            ),
            "{e}"
        );
        // An expected ID, signed by the other domain's CA.
        assert!(serve_as(&v, &b, "spiffe://a.example/api").is_err());
        // A certificate for the name only, no SPIFFE ID.
        let plain = a.server(&["localhost"]).expect("server");
        let name = ServerName::try_from("localhost").expect("name");
        assert!(v
            .verify_server_cert(
                &plain.der().to_vec().into(),
                &[],
                &name,
                &[],
                UnixTime::now()
            )
            .is_err());
        for (reason, count) in [("spiffe_id", 1), ("chain", 1), ("no_spiffe_id", 1)] {
            assert_eq!(
                v.rejected.with_label_values(&["api", reason]).get(),
                count,
                "{reason}"
            );
        }
    }

    #[test]
    fn a_trust_domain_admits_any_of_its_ids_and_no_other() {
        let a = Pki::new("a.example").expect("pki");
        let b = Pki::new("b.example").expect("pki");
        let (_, v) = upstream_verifier(&[&a, &b], ExpectedServer::TrustDomain("a.example".into()));
        assert!(serve_as(&v, &a, "spiffe://a.example/api").is_ok());
        assert!(serve_as(&v, &a, "spiffe://a.example/other").is_ok());
        assert!(serve_as(&v, &b, "spiffe://b.example/api").is_err());
        assert_eq!(v.rejected.with_label_values(&["api", "spiffe_id"]).get(), 1);
    }

    #[test]
    fn an_upstream_is_verified_against_the_bundles_loaded_now() {
        let a = Pki::new("a.example").expect("pki");
        let (listener, v) = upstream_verifier(&[&a], ids(&["spiffe://a.example/api"]));
        assert!(serve_as(&v, &a, "spiffe://a.example/api").is_ok());
        let successor = Pki::new("a.example").expect("pki");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        listener.replace(
            TrustStore::new(
                vec![(
                    successor.trust_domain.clone(),
                    vec![successor.ca_der().to_vec().into()],
                )],
                &provider,
            )
            .expect("store"),
        );
        assert!(serve_as(&v, &a, "spiffe://a.example/api").is_err());
        assert!(serve_as(&v, &successor, "spiffe://a.example/api").is_ok());
    }
}
