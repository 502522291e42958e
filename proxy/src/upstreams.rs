//! The upstreams' peers: addresses, TLS, and the SPIFFE ID an upstream
//! must present. Which upstream a request goes to is the chain's
//! `upstream` stage (`tether_filters::upstream`); its index names the peer
//! here.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use async_trait::async_trait;
use pingora::connectors::L4Connect;
use pingora::prelude::HttpPeer;
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::protocols::l4::stream::Stream;
use pingora::protocols::l4::virt::{VirtualSockOpt, VirtualSocket, VirtualSocketStream};
use pingora::utils::tls::{parse_x509, WrappedX509};
use prometheus::IntCounterVec;
use rustls::pki_types::ServerName;
use tether_config::spiffe::SpiffeId;
use tether_config::{Config, Upstream};
use tether_filters::identity::tls::{ExpectedServer, SpiffeClientVerifier, SpiffeServerVerifier};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::certs::WorkloadSvid;
use crate::tls;

/// What upstreams authorized by SPIFFE ID take from the running proxy.
pub struct SpiffeUpstreams {
    /// Holds the trust bundles as reload leaves them.
    pub bundles: Arc<SpiffeClientVerifier>,
    /// The SVID presented to upstreams with `client_certificate`.
    pub workload: Option<Arc<WorkloadSvid>>,
    /// Upstream certificates refused, by upstream and reason.
    pub rejected: IntCounterVec,
}

/// The configured upstreams, in match order.
pub struct Upstreams {
    entries: Vec<Entry>,
}

struct Entry {
    name: String,
    /// Boxed as pingora wants it: a `Box`'s clone is written straight
    /// into its new allocation, where cloning the peer (some 500 bytes)
    /// and boxing it copied it twice more, every request.
    peer: Box<HttpPeer>,
    /// Whether pingora presents the workload SVID on its TLS connections
    /// (an upstream authorized by SPIFFE ID presents it from [`SpiffeTls`]).
    client_certificate: bool,
}

impl Upstreams {
    /// Builds the peers of `config`'s upstreams.
    pub fn new(config: &Config, spiffe: &SpiffeUpstreams) -> anyhow::Result<Upstreams> {
        let entries = config
            .all_upstreams()
            .enumerate()
            .map(|(i, u)| {
                let name = u.name.clone().unwrap_or_else(|| u.address.clone());
                let peer = match expected_server(u) {
                    Some(expected) => spiffe_peer(u, i, &name, expected?, spiffe),
                    None => peer(u),
                };
                Ok(Entry {
                    peer: peer
                        .map(Box::new)
                        .with_context(|| format!("upstream `{name}` ({i})"))?,
                    client_certificate: u.tls.as_ref().is_some_and(|t| {
                        t.client_certificate && t.spiffe_id.is_none() && t.trust_domain.is_none()
                    }),
                    name,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Upstreams { entries })
    }

    /// A peer for upstream `index`, presenting the workload's current SVID
    /// when it originates mTLS. Pooled connections are keyed by the
    /// certificate too, so a rotated SVID is used from the next new
    /// connection while open ones finish undisturbed.
    pub fn peer(&self, index: usize, workload: Option<&WorkloadSvid>) -> Option<Box<HttpPeer>> {
        let entry = self.entries.get(index)?;
        let mut peer = entry.peer.clone();
        if entry.client_certificate {
            peer.client_cert_key = Some(workload?.current().cert_key.clone());
        }
        Some(peer)
    }

    /// The addresses, for the start-up log.
    pub fn describe(&self) -> String {
        self.entries
            .iter()
            .map(|e| match e.peer.options.custom_l4 {
                // pingora's peer is plain; the connection is not.
                Some(_) => format!("{} ({}, TLS by SPIFFE ID)", e.name, e.peer),
                None => format!("{} ({})", e.name, e.peer),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// An upstream as a pingora peer, with connection reuse (pingora's pool).
fn peer(upstream: &Upstream) -> anyhow::Result<HttpPeer> {
    let address: std::net::SocketAddr = upstream
        .address
        .parse()
        .with_context(|| format!("address `{}`", upstream.address))?;
    let Some(tls) = &upstream.tls else {
        return Ok(HttpPeer::new(address, false, String::new()));
    };
    let mut peer = HttpPeer::new(address, true, tls.server_name.clone());
    if let Some(ca) = &tls.ca {
        let certs = tls::read_certs(ca).context("tls.ca")?;
        let mut wrapped = Vec::with_capacity(certs.len());
        for cert in certs {
            // pingora's parser panics on bad DER: check it first.
            x509_parser::parse_x509_certificate(&cert)
                .map_err(|e| anyhow::anyhow!("tls.ca: bad certificate: {e}"))?;
            wrapped.push(WrappedX509::new(cert.to_vec(), parse_x509));
        }
        peer.options.ca = Some(wrapped.into());
    }
    Ok(peer)
}

/// The IDs an upstream authorized by SPIFFE ID may present; `None` for
/// one verified by DNS name or plain.
fn expected_server(upstream: &Upstream) -> Option<anyhow::Result<ExpectedServer>> {
    let tls = upstream.tls.as_ref()?;
    if let Some(td) = &tls.trust_domain {
        return Some(Ok(ExpectedServer::TrustDomain(td.clone())));
    }
    let ids = tls.spiffe_id.as_ref()?.values();
    Some(
        ids.into_iter()
            .map(|id| SpiffeId::parse(id).map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<_>>()
            .map(ExpectedServer::Ids)
            .context("tls.spiffe_id"),
    )
}

/// An upstream authorized by SPIFFE ID: plain HTTP to pingora, over the
/// TLS connection [`SpiffeTls`] makes.
fn spiffe_peer(
    upstream: &Upstream,
    index: usize,
    name: &str,
    expected: ExpectedServer,
    spiffe: &SpiffeUpstreams,
) -> anyhow::Result<HttpPeer> {
    let address: std::net::SocketAddr = upstream
        .address
        .parse()
        .with_context(|| format!("address `{}`", upstream.address))?;
    let tls = upstream
        .tls
        .as_ref()
        .context("an upstream authorized by SPIFFE ID has `tls`")?;
    let server_name = ServerName::try_from(tls.server_name.clone())
        .map_err(|e| anyhow::anyhow!("tls.server_name `{}`: {e}", tls.server_name))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = SpiffeServerVerifier::new(
        spiffe.bundles.clone(),
        expected,
        provider.clone(),
        spiffe.rejected.clone(),
        name.to_string(),
    );
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match (tls.client_certificate, &spiffe.workload) {
        (true, Some(workload)) => builder.with_client_cert_resolver(workload.clone()),
        (true, None) => anyhow::bail!("tls.client_certificate: no `workload` SVID to present"),
        (false, _) => builder.with_no_client_auth(),
    };
    // pingora speaks HTTP/1.1 over a connection it did not open.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // A resumed session is not verified again: every connection's chain
    // is judged by the bundles of now.
    config.resumption = rustls::client::Resumption::disabled();
    let mut peer = HttpPeer::new(address, false, tls.server_name.clone());
    peer.options.custom_l4 = Some(Arc::new(SpiffeTls {
        address,
        server_name,
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        upstream: name.to_string(),
    }));
    // Never share a pooled connection with another upstream at the same
    // address, verified for other IDs.
    peer.group_key = index as u64 + 1;
    Ok(peer)
}

/// The TLS connection to an upstream authorized by SPIFFE ID, which
/// Tether makes itself: pingora's rustls connector checks a server's
/// certificate for a DNS name only, with no hook on it (its
/// handshake-complete hook is for OpenSSL builds), so pingora sees a
/// plain-HTTP peer and asks this connector for its transport. pingora
/// pools only connections whose socket it can check against the peer's
/// address, so each request to such an upstream opens a new connection.
struct SpiffeTls {
    address: std::net::SocketAddr,
    server_name: ServerName<'static>,
    connector: tokio_rustls::TlsConnector,
    upstream: String,
}

impl std::fmt::Debug for SpiffeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpiffeTls")
            .field("upstream", &self.upstream)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl L4Connect for SpiffeTls {
    async fn connect(&self, _addr: &PeerAddr) -> pingora::Result<Stream> {
        use pingora::{Error, ErrorType};
        let tcp = TcpStream::connect(self.address).await.map_err(|e| {
            Error::because(
                ErrorType::ConnectError,
                format!("upstream `{}` ({})", self.upstream, self.address),
                e,
            )
        })?;
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| {
                // The verifier's own words when it refused the
                // certificate, not rustls's "unexpected error".
                let why = match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                    Some(rustls::Error::General(detail)) => detail.clone(),
                    _ => e.to_string(),
                };
                Error::explain(
                    ErrorType::TLSHandshakeFailure,
                    format!("upstream `{}`: TLS handshake: {why}", self.upstream),
                )
            })?;
        Ok(Stream::from(VirtualSocketStream::new(Box::new(
            SpiffeStream(tls),
        ))))
    }
}

/// A verified TLS connection, as pingora's transport.
#[derive(Debug)]
struct SpiffeStream(tokio_rustls::client::TlsStream<TcpStream>);

impl VirtualSocket for SpiffeStream {
    fn set_socket_option(&self, opt: VirtualSockOpt) -> std::io::Result<()> {
        match opt {
            VirtualSockOpt::NoDelay => self.0.get_ref().0.set_nodelay(true),
            // Keepalive is set only for peers that ask, which Tether's
            // do not.
            _ => Ok(()),
        }
    }
}

impl AsyncRead for SpiffeStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SpiffeStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
