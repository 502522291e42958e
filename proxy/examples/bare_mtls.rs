//! The load test's yardstick: a bare pingora proxy that terminates mTLS and
//! forwards every request to one upstream, with nothing else. It is built
//! from the same crates, with the same release profile, allocator and TLS
//! provider as `tether`, so the gap between the two is what enforcement
//! (identity, registry, Cedar, audit, spans) costs per request.
//!
//! ```text
//! cargo build --release -p tether --example bare_mtls
//! target/release/examples/bare_mtls --listen 127.0.0.1:8443 \
//!     --upstream 127.0.0.1:8080 --cert server.pem --key server.key --ca bundle.pem
//! ```

use std::sync::Arc;

use anyhow::Context as _;
use async_trait::async_trait;
use clap::Parser;
use pingora::listeners::tls::TlsSettings;
use pingora::modules::http::HttpModules;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use rustls::server::WebPkiClientVerifier;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Where clients connect (TLS, client certificate required).
    #[arg(long)]
    listen: String,
    /// The plain-HTTP upstream every request goes to.
    #[arg(long)]
    upstream: std::net::SocketAddr,
    /// Server certificate chain (PEM).
    #[arg(long)]
    cert: String,
    /// Server private key (PEM).
    #[arg(long)]
    key: String,
    /// CA bundle client certificates must chain to (PEM).
    #[arg(long)]
    ca: std::path::PathBuf,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

struct Bare {
    upstream: std::net::SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    /// No downstream modules, as in Tether: pingora's default, a disabled
    /// compression module, does nothing but cost allocations per request.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let provider = rustls::crypto::ring::default_provider();
    let _ = provider.clone().install_default();

    let mut roots = rustls::RootCertStore::empty();
    for cert in tether::tls::read_certs(&args.ca)? {
        roots.add(cert).context("CA bundle")?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::new(provider))
        .build()
        .context("client verifier")?;
    let mut tls = TlsSettings::intermediate(&args.cert, &args.key)
        .map_err(|e| anyhow::anyhow!("server certificate: {e}"))?;
    tls.set_client_cert_verifier(verifier);

    let conf = ServerConf {
        threads: args.threads,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Bare {
            upstream: args.upstream,
        },
        "bare mTLS proxy",
    );
    proxy.add_tls_with_settings(&args.listen, None, tls);
    server.add_service(proxy);
    server.run(RunArgs::default());
    Ok(())
}
