//! The running proxy's shared state, built once from the config.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tether_config::Config;
use tether_filters::authorize::{Authorize, DecisionCache};
use tether_filters::credentials::Credentials;
use tether_filters::identity::Identity;
use tether_filters::lifecycle::Lifecycle;
use tether_filters::record::{AuditSink, Metrics};
use tether_filters::route::Routing;
use tether_filters::sanitize::Sanitize;
use tether_filters::{Chain, Snapshot};

use crate::telemetry::Telemetry;

/// Everything the request path shares.
pub struct App {
    /// The config file, for reloads.
    pub config_path: PathBuf,
    /// The config as loaded.
    pub config: Config,
    /// The snapshot new requests are served under.
    pub snapshot: ArcSwap<Snapshot>,
    /// The filter chain.
    pub chain: Chain,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// The decision cache.
    pub cache: Arc<DecisionCache>,
    /// The audit writer.
    pub audit: AuditSink,
    /// Span export.
    pub telemetry: Telemetry,
}

/// The stages every request passes, in order. Each stands where it does
/// because it needs what the ones before it established.
pub fn chain(cache: Arc<DecisionCache>) -> Chain {
    Chain::new(vec![
        // First: strip caller-sent identity headers and normalize the path,
        // so nothing after this reads caller claims or an unnormalized path.
        Box::new(Sanitize),
        // Who is calling: the verified SVID from the TLS handshake.
        Box::new(Identity),
        // Who answers for it: registered, owned, active, unexpired.
        Box::new(Lifecycle),
        // What it is doing: method and normalized path to action and resource.
        Box::new(Routing),
        // Whether policy allows it: needs the principal, agent and route.
        Box::new(Authorize::new(cache)),
        // Last: only an allowed request gets the verified identity headers.
        Box::new(Credentials),
    ])
}

impl App {
    /// Loads and validates everything; nothing serves until all of it is
    /// valid.
    pub fn load(config_path: &Path) -> anyhow::Result<App> {
        let config = Config::load(config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let snapshot =
            Snapshot::load(&config, config_path, 1).map_err(|e| anyhow::anyhow!("{e}"))?;
        let metrics = Arc::new(Metrics::new().context("registering metrics")?);
        metrics.config_generation.set(1);
        let cache = Arc::new(DecisionCache::new(
            config.cache.max_entries,
            Duration::from_secs(config.cache.ttl_seconds),
            metrics.cache_hits.clone(),
            metrics.cache_misses.clone(),
        ));
        let (audit, _writer) = AuditSink::start(
            &config.audit.output,
            config.audit.max_queue,
            metrics.audit_dropped.clone(),
        )
        .with_context(|| format!("opening audit output `{}`", config.audit.output))?;
        let telemetry = Telemetry::new(&config.telemetry, metrics.spans_dropped.clone())
            .context("starting OpenTelemetry export")?;
        Ok(App {
            config_path: config_path.to_path_buf(),
            chain: chain(cache.clone()),
            snapshot: ArcSwap::from_pointee(snapshot),
            config,
            metrics,
            cache,
            audit,
            telemetry,
        })
    }
}
