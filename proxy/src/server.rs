//! `tether run`: wires the app into a pingora server and runs it until
//! SIGTERM (graceful) or SIGINT (fast).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use pingora::prelude::HttpPeer;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::listening::Service;
use pingora::utils::tls::{parse_x509, WrappedX509};
use tether_config::Upstream;

use crate::admin::AdminApp;
use crate::app::App;
use crate::proxy::TetherProxy;
use crate::tls;

/// Loads the config and serves until told to stop.
pub fn run(config_path: &Path) -> anyhow::Result<()> {
    let app = Arc::new(App::load(config_path)?);
    let config = &app.config;
    let conf = ServerConf {
        threads: config.server.threads,
        grace_period_seconds: Some(config.server.grace_period_seconds),
        graceful_shutdown_timeout_seconds: Some(config.server.grace_period_seconds),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let upstream = upstream_peer(&config.upstream)?;
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        TetherProxy::new(app.clone(), upstream),
        "tether proxy",
    );
    proxy.add_tls_with_settings(
        &config.listener.address,
        None,
        tls::listener_settings(config, app.verifier.clone())?,
    );
    let mut admin = Service::new("tether admin".to_string(), AdminApp::new(app.clone()));
    admin.add_tcp(&config.admin.address);
    server.add_service(proxy);
    server.add_service(admin);
    app.watch();

    log::info!(
        "tether serving agents on {} (admin on {}), forwarding to {}",
        config.listener.address,
        config.admin.address,
        config.upstream.address
    );
    server.run(RunArgs::default());
    // Send the spans still queued before the process ends.
    app.telemetry.shutdown();
    Ok(())
}

/// The upstream as a pingora peer, with connection reuse (pingora's pool).
fn upstream_peer(upstream: &Upstream) -> anyhow::Result<HttpPeer> {
    let address: std::net::SocketAddr = upstream
        .address
        .parse()
        .with_context(|| format!("upstream.address `{}`", upstream.address))?;
    let Some(tls) = &upstream.tls else {
        return Ok(HttpPeer::new(address, false, String::new()));
    };
    let mut peer = HttpPeer::new(address, true, tls.server_name.clone());
    if let Some(ca) = &tls.ca {
        let certs = tls::read_certs(ca).context("upstream.tls.ca")?;
        let mut wrapped = Vec::with_capacity(certs.len());
        for cert in certs {
            // pingora's parser panics on bad DER: check it first.
            x509_parser::parse_x509_certificate(&cert)
                .map_err(|e| anyhow::anyhow!("upstream.tls.ca: bad certificate: {e}"))?;
            wrapped.push(WrappedX509::new(cert.to_vec(), parse_x509));
        }
        peer.options.ca = Some(wrapped.into());
    }
    Ok(peer)
}
