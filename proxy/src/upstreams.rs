//! Where an allowed request goes: one upstream in front of an API, or, on
//! the agent's side, several chosen by host or path prefix. Chosen after
//! the chain allowed the request, from the same host and normalized path
//! the route was matched on; nothing leaves without a match.

use anyhow::Context as _;
use pingora::prelude::HttpPeer;
use pingora::utils::tls::{parse_x509, WrappedX509};
use tether_config::{Config, EncodedSlash, Upstream};
use tether_filters::route::HostPattern;

use crate::certs::WorkloadSvid;
use crate::tls;

/// The configured upstreams, in match order.
pub struct Upstreams {
    entries: Vec<Entry>,
}

struct Entry {
    name: String,
    hosts: Option<Vec<HostPattern>>,
    path_prefix: Option<String>,
    /// Boxed as pingora wants it: a `Box`'s clone is written straight
    /// into its new allocation, where cloning the peer (some 500 bytes)
    /// and boxing it copied it twice more, every request.
    peer: Box<HttpPeer>,
    client_certificate: bool,
    /// `encoded_slash: reject`: a back end that decodes `%2F` before
    /// routing, which a path holding one must not reach.
    rejects_encoded_slash: bool,
}

impl Upstreams {
    /// Builds the peers of `config`'s upstreams.
    pub fn new(config: &Config) -> anyhow::Result<Upstreams> {
        let entries = config
            .all_upstreams()
            .enumerate()
            .map(|(i, u)| {
                let name = u.name.clone().unwrap_or_else(|| u.address.clone());
                Ok(Entry {
                    hosts: u
                        .hosts
                        .as_ref()
                        .map(|h| h.values().into_iter().map(HostPattern::new).collect()),
                    path_prefix: u.path_prefix.clone(),
                    peer: peer(u)
                        .map(Box::new)
                        .with_context(|| format!("upstream `{name}` ({i})"))?,
                    client_certificate: u.tls.as_ref().is_some_and(|t| t.client_certificate),
                    rejects_encoded_slash: u.encoded_slash == Some(EncodedSlash::Reject),
                    name,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Upstreams { entries })
    }

    /// The first upstream whose hosts and path prefix match.
    pub fn select(&self, host: Option<&str>, path: &str) -> Option<usize> {
        self.entries.iter().position(|e| {
            let host_ok = match &e.hosts {
                None => true,
                Some(patterns) => host.is_some_and(|h| patterns.iter().any(|p| p.matches(h))),
            };
            host_ok
                && e.path_prefix
                    .as_deref()
                    .is_none_or(|p| under_prefix(path, p))
        })
    }

    /// Whether upstream `index` refuses a path that held `%2F`.
    pub fn rejects_encoded_slash(&self, index: usize) -> bool {
        self.entries
            .get(index)
            .is_some_and(|e| e.rejects_encoded_slash)
    }

    /// The name of upstream `index`, for records.
    pub fn name(&self, index: usize) -> &str {
        self.entries.get(index).map_or("", |e| &e.name)
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
            .map(|e| format!("{} ({})", e.name, e.peer))
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

/// Whether `path` is `prefix` or below it, by whole segments: `/mcp` holds
/// `/mcp` and `/mcp/x`, never `/mcpadmin`.
pub(crate) fn under_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::under_prefix;

    #[test]
    fn a_path_prefix_matches_whole_segments() {
        for (path, prefix, under) in [
            ("/mcp", "/mcp", true),
            ("/mcp/tools", "/mcp", true),
            ("/mcpadmin/x", "/mcp", false),
            ("/mcp", "/mcp/", false),
            ("/v1/repos/x", "/v1/repos/", true),
            ("/v1/reposx", "/v1/repos/", false),
            ("/anything", "/", true),
        ] {
            assert_eq!(under_prefix(path, prefix), under, "{path} under {prefix}");
        }
    }
}
