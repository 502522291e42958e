//! The agent-facing TLS listener: the server certificate, the SPIFFE
//! client verifier, and the handshake callback that hands each connection's
//! verified identity to its requests.

use std::any::Any;
use std::sync::Arc;

use anyhow::Context as _;
use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use tether_config::Config;
use tether_filters::identity::tls::{RejectedPeer, SpiffeClientVerifier, TrustStore, VerifiedPeer};
use tether_filters::identity::PeerIdentity;

use crate::certs::ServerCert;

/// Reads every trust bundle in the config; also returns each trust
/// domain's earliest CA expiry (Unix seconds), for the expiry metric.
pub fn trust_store(config: &Config) -> anyhow::Result<(TrustStore, Vec<(String, i64)>)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut bundles = Vec::new();
    let mut expiry = Vec::new();
    for td in &config.trust_domains {
        let certs =
            read_certs(&td.bundle).with_context(|| format!("trust domain `{}`", td.name))?;
        let first_to_expire = certs
            .iter()
            .filter_map(|c| x509_parser::parse_x509_certificate(c).ok())
            .map(|(_, c)| c.validity().not_after.timestamp())
            .min();
        if let Some(not_after) = first_to_expire {
            expiry.push((td.name.clone(), not_after));
        }
        bundles.push((td.name.clone(), certs));
    }
    let store = TrustStore::new(bundles, &provider).map_err(anyhow::Error::msg)?;
    Ok((store, expiry))
}

/// Every certificate in a PEM file.
pub fn read_certs(path: &std::path::Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading `{}`", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing PEM in `{}`", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("`{}` holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// The listener's TLS settings: the (rotating) server certificate and
/// SPIFFE client authentication by `verifier`.
pub fn listener_settings(
    server_cert: Arc<ServerCert>,
    verifier: Arc<SpiffeClientVerifier>,
) -> anyhow::Result<TlsSettings> {
    let callback = PeerIdentityCallback {
        verifier: verifier.clone(),
    };
    let mut settings = TlsSettings::with_callbacks(Box::new(callback))
        .map_err(|e| anyhow::anyhow!("TLS settings: {e}"))?;
    settings.set_cert_resolver(server_cert);
    settings.set_client_cert_verifier(verifier);
    Ok(settings)
}

/// After a handshake, the client certificate's SPIFFE ID, parsed once per
/// connection rather than once per request, and verified against the
/// bundles loaded now (a resumed session's chain is not seen by the
/// verifier otherwise: see [`SpiffeClientVerifier::verify_peer`]). `None`
/// when there is no certificate; [`RejectedPeer`] when there is one and it
/// does not verify: the connection's requests are then refused, whatever
/// token they carry.
struct PeerIdentityCallback {
    verifier: Arc<SpiffeClientVerifier>,
}

#[async_trait]
impl TlsAccept for PeerIdentityCallback {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        let chain = tls.peer_cert_chain_der()?;
        Some(match self.verifier.verify_connection(chain) {
            Some(peer) => Arc::new(peer),
            None => Arc::new(RejectedPeer),
        })
    }
}

/// The verified identity of a session's connection, if it presented a
/// certificate, judged by the bundles loaded now; `Err` when the one it
/// presented does not verify (any more).
pub fn peer_identity(
    session: &pingora::proxy::Session,
    verifier: &SpiffeClientVerifier,
) -> Result<Option<Arc<PeerIdentity>>, RejectedPeer> {
    let Some(extension) = session
        .digest()
        .and_then(|d| d.ssl_digest.as_ref())
        .map(|tls| &tls.extension)
    else {
        return Ok(None);
    };
    if let Some(connection) = extension.get::<VerifiedPeer>() {
        return verifier.current(connection).map(Some).ok_or(RejectedPeer);
    }
    match extension.get::<RejectedPeer>() {
        Some(_) => Err(RejectedPeer),
        None => Ok(None),
    }
}
