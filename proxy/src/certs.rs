//! Certificates that rotate: the listener's server certificate and the
//! pod's own X.509-SVID (egress). SVIDs live about an hour under SPIRE, so
//! both are re-read when their files change and swapped in whole: a
//! handshake uses the old pair or the new one, never a mix and never none.
//! A half-written rotation (a new certificate with the old key) does not
//! load, and the old pair keeps serving until the files agree.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use pingora::utils::tls::CertKey;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject as _};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use tether_filters::identity::PeerIdentity;

/// A certificate chain and key read from PEM files, checked to belong
/// together.
pub struct LoadedPair {
    /// The chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
    /// The leaf's expiry, Unix seconds.
    pub not_after: i64,
    certified: Arc<CertifiedKey>,
}

/// A pair of PEM files and the fingerprint of what was last loaded.
struct Files {
    cert: PathBuf,
    key: PathBuf,
    /// The contents last tried, loaded or not: a bad pair is reported
    /// once, not every poll.
    seen: Mutex<u64>,
}

impl Files {
    fn new(cert: &Path, key: &Path) -> Files {
        let files = Files {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            seen: Mutex::new(0),
        };
        *files.seen.lock().unwrap_or_else(|p| p.into_inner()) = files.fingerprint();
        files
    }

    fn fingerprint(&self) -> u64 {
        let mut h = DefaultHasher::new();
        crate::watch::content_hash(&self.cert).hash(&mut h);
        crate::watch::content_hash(&self.key).hash(&mut h);
        h.finish()
    }

    /// If the files changed since last looked at and now hold a valid
    /// pair, hands it to `install`. All of it under the lock: the watcher
    /// and `POST /reload` rotate at once, and an older pair must not be
    /// installed after a newer one.
    fn rotate(&self, what: &str, install: impl FnOnce(LoadedPair) -> anyhow::Result<()>) {
        let now = self.fingerprint();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == now {
            return;
        }
        *seen = now;
        if let Err(e) = load_pair(&self.cert, &self.key).and_then(install) {
            log::warn!(
                "{what}: the changed files are refused, the current certificate stays: {e:#}"
            );
        }
    }
}

/// Reads a PEM chain and key and checks that the key is the leaf's.
pub fn load_pair(cert: &Path, key: &Path) -> anyhow::Result<LoadedPair> {
    let chain = crate::tls::read_certs(cert)?;
    for c in &chain {
        // pingora's own parser panics on bad DER: refuse it here first.
        x509_parser::parse_x509_certificate(c)
            .map_err(|e| anyhow::anyhow!("`{}`: bad certificate: {e}", cert.display()))?;
    }
    let pem = std::fs::read(key).with_context(|| format!("reading `{}`", key.display()))?;
    let key_der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        pem::Error::NoItemsFound => anyhow::anyhow!("`{}` holds no private key", key.display()),
        e => anyhow::anyhow!("parsing PEM in `{}`: {e}", key.display()),
    })?;
    let provider = provider();
    let signing = provider
        .key_provider
        .load_private_key(key_der.clone_key())
        .with_context(|| format!("`{}`: unsupported private key", key.display()))?;
    let certified = CertifiedKey::new(chain.clone(), signing);
    certified.keys_match().with_context(|| {
        format!(
            "`{}` is not the key of the certificate in `{}`",
            key.display(),
            cert.display()
        )
    })?;
    let not_after = x509_parser::parse_x509_certificate(&chain[0])
        .map(|(_, c)| c.validity().not_after.timestamp())
        .map_err(|e| anyhow::anyhow!("`{}`: {e}", cert.display()))?;
    Ok(LoadedPair {
        chain,
        key: key_der,
        not_after,
        certified: Arc::new(certified),
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The listener's certificate: rustls asks for it at every handshake.
pub struct ServerCert {
    files: Files,
    current: ArcSwap<LoadedPair>,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert")
            .field("cert", &self.files.cert)
            .finish_non_exhaustive()
    }
}

impl ServerCert {
    /// Loads the pair; an invalid pair fails the start.
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<ServerCert> {
        // Fingerprinted before reading: a rotation landing in between is
        // seen by the next look, not taken for what was loaded.
        let files = Files::new(cert, key);
        Ok(ServerCert {
            current: ArcSwap::from_pointee(load_pair(cert, key)?),
            files,
        })
    }

    /// Swaps in the files' new pair, if they changed and hold a valid one.
    pub fn rotate(&self) {
        self.files.rotate("listener.tls", |pair| {
            log::info!(
                "listener certificate rotated; it expires at {}",
                pair.not_after
            );
            self.current.store(Arc::new(pair));
            Ok(())
        });
    }

    /// When the current certificate expires, Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.current.load().not_after
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().certified.clone())
    }
}

/// The pod's own SVID: the principal of egress requests, and the client
/// certificate of upstream mTLS.
pub struct WorkloadSvid {
    files: Files,
    current: ArcSwap<Workload>,
}

impl std::fmt::Debug for WorkloadSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadSvid")
            .field("cert", &self.files.cert)
            .finish_non_exhaustive()
    }
}

/// One version of the workload SVID.
pub struct Workload {
    /// Its SPIFFE ID and thumbprint.
    pub identity: Arc<PeerIdentity>,
    /// The certificate and key for pingora's upstream TLS.
    pub cert_key: Arc<CertKey>,
    /// The same, for the TLS Tether makes itself (see `upstreams`).
    certified: Arc<CertifiedKey>,
}

impl WorkloadSvid {
    /// Loads the SVID; it must be a valid X.509-SVID with its key.
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<WorkloadSvid> {
        // Fingerprinted before reading, as the listener's certificate is.
        let files = Files::new(cert, key);
        Ok(WorkloadSvid {
            current: ArcSwap::from_pointee(workload(load_pair(cert, key)?)?),
            files,
        })
    }

    /// The current version.
    pub fn current(&self) -> Arc<Workload> {
        self.current.load_full()
    }

    /// Swaps in the files' new SVID, if they changed and hold a valid one.
    pub fn rotate(&self) {
        self.files.rotate("workload", |pair| {
            let w = workload(pair)?;
            log::info!(
                "workload SVID `{}` rotated; it expires at {}",
                w.identity.id,
                w.identity.not_after
            );
            self.current.store(Arc::new(w));
            Ok(())
        });
    }
}

/// The SVID shown to upstreams authorized by SPIFFE ID: the current one
/// at each handshake.
impl ResolvesClientCert for WorkloadSvid {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn workload(pair: LoadedPair) -> anyhow::Result<Workload> {
    let identity = PeerIdentity::from_leaf_der(&pair.chain[0])
        .map_err(|e| anyhow::anyhow!("workload.cert is not an X.509-SVID: {e}"))?;
    let cert_key = CertKey::new(
        pair.chain.iter().map(|c| c.to_vec()).collect(),
        pair.key.secret_der().to_vec(),
    );
    Ok(Workload {
        identity: Arc::new(identity),
        cert_key: Arc::new(cert_key),
        certified: pair.certified,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_filters::identity::pki::Pki;

    #[test]
    fn a_pair_loads_and_a_key_file_without_a_key_is_named() {
        let pki = Pki::new("example.org").expect("pki");
        let leaf = pki.server(&["127.0.0.1"]).expect("leaf");
        let dir = tempfile::tempdir().expect("dir");
        let (cert, key, not_key) = (
            dir.path().join("cert.pem"),
            dir.path().join("key.pem"),
            dir.path().join("not-key.pem"),
        );
        std::fs::write(&cert, &leaf.cert_pem).expect("cert");
        std::fs::write(&key, &leaf.key_pem).expect("key");
        std::fs::write(&not_key, &leaf.cert_pem).expect("not a key");
        load_pair(&cert, &key).expect("the leaf's own key");
        let e = load_pair(&cert, &not_key).err().expect("refused");
        assert!(e.to_string().contains("holds no private key"), "{e:#}");
        let e = load_pair(&cert, &cert.with_file_name("absent.pem"))
            .err()
            .expect("refused");
        assert!(e.to_string().contains("absent.pem"), "{e:#}");
    }
}
