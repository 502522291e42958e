//! The running proxy's shared state, built once from the config and
//! reloaded all or nothing.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tether_config::{ClientAuth, Config, ConfigErrors};
use tether_filters::authorize::{Authorize, DecisionCache};
use tether_filters::credentials::Credentials;
use tether_filters::identity::jwks::KeySource;
use tether_filters::identity::jwt::TokenVerifier;
use tether_filters::identity::tls::SpiffeClientVerifier;
use tether_filters::identity::Identity;
use tether_filters::lifecycle::Lifecycle;
use tether_filters::mcp::Mcp;
use tether_filters::method_override::MethodOverride;
use tether_filters::record::{AuditSink, Metrics};
use tether_filters::route::Routing;
use tether_filters::sanitize::Sanitize;
use tether_filters::{Chain, Snapshot};

use crate::certs::{ServerCert, WorkloadSvid};
use crate::telemetry::Telemetry;
use crate::{jwks, tls};

/// Everything the request path shares.
pub struct App {
    /// The config file, for reloads.
    pub config_path: PathBuf,
    /// The config the process started with. Sections that do not reload
    /// (listeners, upstream, telemetry, ...) are read from here.
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
    /// The listener's client verifier, whose bundles reload.
    pub verifier: Arc<SpiffeClientVerifier>,
    /// Bearer-token issuers and their keys.
    pub tokens: Arc<TokenVerifier>,
    /// Each issuer's key source, in config order.
    key_sources: Vec<Arc<KeySource>>,
    /// The listener's certificate, when it serves TLS; rotates.
    pub server_cert: Option<Arc<ServerCert>>,
    /// Egress: the pod's own SVID; rotates.
    pub workload: Option<Arc<WorkloadSvid>>,
    /// Each trust domain's earliest bundle expiry, Unix seconds.
    bundle_expiry: Mutex<Vec<(String, i64)>>,
    /// Serializes reloads; what the watcher compares against.
    reload_state: Mutex<Watched>,
    /// The CA files of the upstreams and of JWKS fetches as the process
    /// read them at start: only a restart applies a change to them.
    restart_only_files: u64,
    /// Requests begun and not yet recorded (see `proxy::Ctx`).
    pub in_flight: AtomicUsize,
}

/// The files a reload reads, and their fingerprint when last loaded.
struct Watched {
    fingerprint: u64,
    /// Why the files of that fingerprint did not load, if they did not:
    /// asked again, the answer is the same, and nothing is parsed for it.
    refused: Option<ConfigErrors>,
    /// The config serving now: the files to watch are the ones it names,
    /// not those the process started with.
    config: Config,
}

/// The stages every request passes, in order. Each stands where it does
/// because it needs what the ones before it established.
pub fn chain(cache: Arc<DecisionCache>, metrics: &Metrics, tokens: Arc<TokenVerifier>) -> Chain {
    Chain::new(vec![
        // First: strip caller-sent identity headers and normalize the path,
        // so nothing after this reads caller claims or an unnormalized path.
        Box::new(Sanitize),
        // Who is calling: the verified SVID and bearer token, bound to
        // each other when both are present.
        Box::new(Identity::new(tokens)),
        // Who answers for it: registered, owned, active, unexpired.
        Box::new(Lifecycle),
        // What it is doing: method and normalized path to action and resource.
        Box::new(Routing),
        // On MCP routes, the JSON-RPC method and tool refine the action and
        // resource: it needs the route, and must precede the decision.
        Box::new(Mcp),
        // A `_method` in a form or multipart body would have the upstream
        // serve another method than the one decided: it must precede the
        // decision, and stands after identity so that only a known agent
        // can make Tether read a body.
        Box::new(MethodOverride),
        // Whether policy allows it: needs the principal, agent and route.
        Box::new(Authorize::new(cache, metrics.shadow_disagreements.clone())),
        // Last: only an allowed request gets the verified identity headers.
        Box::new(Credentials),
    ])
}

impl App {
    /// Loads and validates everything; nothing serves until all of it is
    /// valid.
    pub fn load(config_path: &Path) -> anyhow::Result<App> {
        let config = Config::load(config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
        // Taken before the files are read: one changed while they load is
        // seen by the first poll, not taken for what serves.
        let seen = fingerprint(config_path, &config);
        let restart_only = restart_only_files(&config);
        let snapshot =
            Snapshot::load(&config, config_path, 1).map_err(|e| anyhow::anyhow!("{e}"))?;
        let metrics = Arc::new(Metrics::new().context("registering metrics")?);
        metrics.config_generation.set(1);
        metrics.config_last_reload_successful.set(1);
        let (trust, bundle_expiry) = tls::trust_store(&config)?;
        let verifier = Arc::new(SpiffeClientVerifier::new(
            trust,
            Arc::new(rustls::crypto::ring::default_provider()),
            config.listener.client_auth == ClientAuth::Required,
            metrics.client_cert_rejected.clone(),
        ));
        let key_sources = jwks::sources(&config.tokens)?;
        let tokens = Arc::new(TokenVerifier::new(&config.tokens, key_sources.clone()));
        let server_cert = match &config.listener.tls {
            Some(t) => Some(Arc::new(
                ServerCert::load(&t.cert, &t.key).context("listener.tls")?,
            )),
            None => None,
        };
        let workload = match &config.workload {
            Some(w) => Some(Arc::new(
                WorkloadSvid::load(&w.cert, &w.key).context("workload")?,
            )),
            None => None,
        };
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
            chain: chain(cache.clone(), &metrics, tokens.clone()),
            snapshot: ArcSwap::from_pointee(snapshot),
            restart_only_files: restart_only,
            reload_state: Mutex::new(Watched {
                fingerprint: seen,
                refused: None,
                config: config.clone(),
            }),
            config,
            metrics,
            cache,
            audit,
            telemetry,
            verifier,
            tokens,
            key_sources,
            server_cert,
            workload,
            bundle_expiry: Mutex::new(bundle_expiry),
            in_flight: AtomicUsize::new(0),
        })
    }

    /// Waits up to `timeout` for the requests in flight to be recorded: at
    /// shutdown, pingora's runtimes drop their tasks in the background,
    /// and a dropped request writes its audit line as it goes.
    pub fn wait_for_requests(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while self.in_flight.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Starts what runs beside the proxy: the reload and rotation watcher
    /// and the JWKS fetcher.
    pub fn start_background(self: &Arc<Self>) -> anyhow::Result<()> {
        let url_sources = self
            .config
            .tokens
            .issuers
            .iter()
            .zip(self.key_sources.iter().cloned())
            .filter(|(issuer, _)| issuer.jwks.url.is_some())
            .map(|(issuer, source)| (source, issuer.jwks.clone()))
            .collect();
        jwks::start_fetcher(url_sources)?;
        self.watch();
        Ok(())
    }

    /// Seconds until each certificate Tether holds expires, by name.
    pub fn certificate_expiry(&self) -> Vec<(String, i64)> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut out = Vec::new();
        if let Some(cert) = &self.server_cert {
            out.push(("listener".to_string(), cert.not_after() - now));
        }
        if let Some(workload) = &self.workload {
            out.push((
                "workload".to_string(),
                workload.current().identity.not_after - now,
            ));
        }
        for (domain, not_after) in self
            .bundle_expiry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            out.push((format!("bundle:{domain}"), not_after - now));
        }
        out
    }

    /// Swaps in rotated certificates whose files changed.
    pub fn rotate_certificates(&self) {
        if let Some(cert) = &self.server_cert {
            cert.rotate();
        }
        if let Some(workload) = &self.workload {
            workload.rotate();
        }
    }

    /// Reloads policies, schema, registry, routes and trust bundles, all or
    /// nothing: the new version is read and validated in full before it
    /// replaces the old; if anything is wrong the old one keeps serving.
    /// Returns the generation now serving, and whether this call loaded
    /// it: when no file changed since the last successful load, nothing is
    /// read again (a caller that can reach the admin port, as an egress
    /// pod's agent can, cannot make Tether re-parse its policies and drop
    /// its decision cache at will).
    pub fn reload(&self) -> Result<(u64, bool), ConfigErrors> {
        let mut watched = self
            .reload_state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Certificates rotate with a reload too, whether or not the
        // watcher runs.
        self.rotate_certificates();
        let current = self.snapshot.load().generation;
        // Taken before reading: a change made while we load is seen by the
        // next poll rather than lost. (When the new config names other
        // files, their fingerprint differs from this one, and the next
        // poll reloads once more, to the same effect.)
        let seen = fingerprint(&self.config_path, &watched.config);
        if seen == watched.fingerprint {
            return match &watched.refused {
                Some(refused) => Err(refused.clone()),
                None => Ok((current, false)),
            };
        }
        let attempt = (|| {
            let config = Config::load(&self.config_path)?;
            let error = |field: &str, e: anyhow::Error| {
                ConfigErrors(vec![tether_config::ConfigError {
                    file: self.config_path.clone(),
                    position: None,
                    field: field.into(),
                    message: format!("{e:#}"),
                }])
            };
            let mut restart_only = restart_only_changes(&self.config, &config);
            if restart_only_files(&config) != self.restart_only_files {
                // A CA dropped from the file (rotated, or compromised)
                // must not stay trusted while the reload says it is done.
                restart_only.push("the CA files of upstreams (tls.ca) or JWKS fetches (jwks.ca)");
            }
            if !restart_only.is_empty() {
                // Applying the rest would leave these silently as they
                // were: an issuer an operator removed still accepted, say.
                return Err(error(
                    &restart_only.join(", "),
                    anyhow::anyhow!(
                        "changed, and only a restart applies it: restart Tether, or undo the \
                         change to reload the rest"
                    ),
                ));
            }
            let snapshot = Snapshot::load(&config, &self.config_path, current + 1)?;
            let trust = tls::trust_store(&config).map_err(|e| error("trust_domains", e))?;
            // JWKS files of the running issuers (issuers themselves change
            // at restart), all read before any is replaced.
            let mut key_sets = Vec::new();
            for (issuer, source) in self
                .config
                .tokens
                .issuers
                .iter()
                .zip(self.key_sources.iter().cloned())
            {
                if let Some(file) = &issuer.jwks.file {
                    key_sets.push((
                        source,
                        jwks::read_file(file).map_err(|e| error("tokens", e))?,
                    ));
                }
            }
            Ok((config, snapshot, trust, key_sets))
        })();
        match attempt {
            Ok((config, snapshot, (trust, bundle_expiry), key_sets)) => {
                *watched = Watched {
                    fingerprint: seen,
                    refused: None,
                    config,
                };
                // Keys and bundles first: a new agent's credentials must
                // verify by the time its registration is live.
                for (source, set) in key_sets {
                    source.store(set);
                }
                self.verifier.replace(trust);
                *self.bundle_expiry.lock().unwrap_or_else(|p| p.into_inner()) = bundle_expiry;
                self.snapshot.store(Arc::new(snapshot));
                let generation = current + 1;
                self.metrics.config_generation.set(generation as i64);
                self.metrics.config_last_reload_successful.set(1);
                log::info!(
                    "reloaded {}: generation {generation} serving",
                    self.config_path.display()
                );
                Ok((generation, true))
            }
            Err(errors) => {
                // Remember this version and why it was refused: neither
                // the watcher nor a POST (which an egress pod's agent can
                // send) parses it again until a file changes.
                watched.fingerprint = seen;
                watched.refused = Some(errors.clone());
                self.metrics.config_reload_failures.inc();
                self.metrics.config_last_reload_successful.set(0);
                log::error!("reload refused, generation {current} keeps serving:\n{errors}");
                Err(errors)
            }
        }
    }

    /// Polls the config and every file it names; reloads on change.
    fn watch(self: &Arc<Self>) {
        if !self.config.reload.watch {
            return;
        }
        let app = Arc::clone(self);
        let interval = Duration::from_millis(self.config.reload.poll_interval_ms);
        let spawned = std::thread::Builder::new()
            .name("tether-reload".into())
            .spawn(move || loop {
                std::thread::sleep(interval);
                app.rotate_certificates();
                let changed = {
                    let watched = app
                        .reload_state
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    // The files the serving config names, as reload()
                    // fingerprints them.
                    fingerprint(&app.config_path, &watched.config) != watched.fingerprint
                };
                if changed {
                    let _ = app.reload();
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start the reload watcher: {e}");
        }
    }
}

/// The sections that only a restart applies and that differ between the
/// running config and `new`.
fn restart_only_changes(running: &Config, new: &Config) -> Vec<&'static str> {
    let sections = |c: &Config| {
        [
            ("listener", serde_json::to_value(&c.listener).ok()),
            ("admin", serde_json::to_value(&c.admin).ok()),
            ("mode", serde_json::to_value(c.mode).ok()),
            ("upstream", serde_json::to_value(&c.upstream).ok()),
            ("upstreams", serde_json::to_value(&c.upstreams).ok()),
            ("tokens", serde_json::to_value(&c.tokens).ok()),
            ("workload", serde_json::to_value(&c.workload).ok()),
            ("cache", serde_json::to_value(&c.cache).ok()),
            ("telemetry", serde_json::to_value(&c.telemetry).ok()),
            ("audit", serde_json::to_value(&c.audit).ok()),
            ("server", serde_json::to_value(&c.server).ok()),
            ("reload", serde_json::to_value(&c.reload).ok()),
        ]
    };
    sections(running)
        .into_iter()
        .zip(sections(new))
        .filter(|((_, old), (_, new))| old != new)
        .map(|((name, _), _)| name)
        .collect()
}

/// Hashes the contents of the config file and every file the running
/// config names (following symlinks, as a ConfigMap mount needs), so any
/// change, however it is made, changes the fingerprint.
fn fingerprint(config_path: &Path, config: &Config) -> u64 {
    let mut h = DefaultHasher::new();
    let mut file = |p: &Path| {
        p.hash(&mut h);
        std::fs::read(p).ok().hash(&mut h);
    };
    file(config_path);
    // The running config's paths are resolved already; the config file on
    // disk may name others, which its own change covers.
    if let Some(registry) = &config.registry.file {
        file(registry);
    }
    file(&config.policy.schema);
    for folder in [Some(&config.policy.policies), config.policy.shadow.as_ref()]
        .into_iter()
        .flatten()
    {
        if folder.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(folder)
                .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            entries.sort();
            for entry in entries
                .iter()
                .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
            {
                file(entry);
            }
        } else {
            file(folder);
        }
    }
    for td in &config.trust_domains {
        file(&td.bundle);
    }
    for issuer in &config.tokens.issuers {
        if let Some(jwks) = &issuer.jwks.file {
            file(jwks);
        }
    }
    restart_only_files(config).hash(&mut h);
    h.finish()
}

/// Hashes the contents of the CA files read once at start: every
/// upstream's `tls.ca` and every JWKS fetch's `jwks.ca`.
fn restart_only_files(config: &Config) -> u64 {
    let mut h = DefaultHasher::new();
    let upstreams = config
        .all_upstreams()
        .filter_map(|u| u.tls.as_ref()?.ca.as_ref());
    let jwks = config
        .tokens
        .issuers
        .iter()
        .filter_map(|i| i.jwks.ca.as_ref());
    for ca in upstreams.chain(jwks) {
        ca.hash(&mut h);
        std::fs::read(ca).ok().hash(&mut h);
    }
    h.finish()
}
