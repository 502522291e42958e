//! `tether run`: wires the app into a pingora server and runs it until
//! SIGTERM (graceful) or SIGINT (fast).

use std::path::Path;
use std::sync::Arc;

use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::listening::Service;

use crate::admin::AdminApp;
use crate::app::App;
use crate::proxy::TetherProxy;
use crate::tls;
use crate::upstreams::{SpiffeUpstreams, Upstreams};

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

    let upstreams = Upstreams::new(
        config,
        &SpiffeUpstreams {
            bundles: app.verifier.clone(),
            workload: app.workload.clone(),
            rejected: app.metrics.upstream_cert_rejected.clone(),
        },
    )?;
    let described = upstreams.describe();
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        TetherProxy::new(app.clone(), upstreams),
        "tether proxy",
    );
    match &app.server_cert {
        Some(cert) => proxy.add_tls_with_settings(
            &config.listener.address,
            None,
            tls::listener_settings(cert.clone(), app.verifier.clone())?,
        ),
        // Egress on loopback (validation allows nothing else): the pod's
        // own SVID is the identity, not the connection.
        None => proxy.add_tcp(&config.listener.address),
    }
    let mut admin = Service::new("tether admin".to_string(), AdminApp::new(app.clone()));
    admin.add_tcp(&config.admin.address);
    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(pingora::services::background::background_service(
        "reload watcher",
        crate::app::Watcher(app.clone()),
    ));
    app.start_background()?;

    log::info!(
        "tether ({:?} mode) serving agents on {} (admin on {}), forwarding to {described}",
        config.mode,
        config.listener.address,
        config.admin.address,
    );
    server.run(RunArgs::default());
    // Requests cut short record themselves as their tasks are dropped,
    // which pingora leaves to run on after it returns; then the audit
    // lines and spans still queued are written and sent before the
    // process ends.
    app.wait_for_requests(std::time::Duration::from_secs(2));
    app.audit.close(std::time::Duration::from_secs(2));
    app.telemetry.shutdown();
    Ok(())
}
