//! The running proxy's shared state, built once from the config and
//! reloaded all or nothing.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tether_config::{ClientAuth, Config, ConfigErrors, Mode};
use tether_filters::authorize::{Authorize, DecisionCache};
use tether_filters::credentials::Credentials;
use tether_filters::identity::jwt::TokenVerifier;
use tether_filters::identity::tls::SpiffeClientVerifier;
use tether_filters::identity::Identity;
use tether_filters::lifecycle::Lifecycle;
use tether_filters::mcp::Mcp;
use tether_filters::method_override::MethodOverride;
use tether_filters::record::{AuditSink, Metrics};
use tether_filters::route::Routing;
use tether_filters::sanitize::Sanitize;
use tether_filters::upstream::{SelectUpstream, UpstreamTable};
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
    /// Keeps the issuers' URL key sources fresh.
    fetcher: jwks::Fetcher,
    /// The listener's certificate, when it serves TLS; rotates.
    pub server_cert: Option<Arc<ServerCert>>,
    /// Egress: the pod's own SVID; rotates.
    pub workload: Option<Arc<WorkloadSvid>>,
    /// Each trust domain's earliest bundle expiry, Unix seconds.
    bundle_expiry: Mutex<Vec<(String, i64)>>,
    /// Serializes reloads; what the watcher compares against.
    reload_state: Mutex<Watched>,
    /// The CA files of the upstreams as the process read them at start:
    /// only a restart applies a change to them.
    restart_only_files: u64,
    /// Requests begun and not yet recorded (see `proxy::Ctx`).
    in_flight: AtomicUsize,
    /// Signalled when the last request in flight is recorded.
    idle: (Mutex<()>, Condvar),
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
    /// The key sources of its token issuers.
    keys: jwks::IssuerKeys,
    /// When the refused version may be tried again although no file
    /// changed, and the wait before that: it was refused because a key
    /// server could not be reached, which may change by itself.
    retry: Option<(Instant, Duration)>,
}

/// The longest wait before a version refused for want of keys is tried
/// again.
const MAX_KEY_RETRY: Duration = Duration::from_secs(60);

/// The stages every request passes, in order. Each stands where it does
/// because it needs what the ones before it established.
pub fn chain(config: &Config, cache: Arc<DecisionCache>, metrics: &Metrics) -> Chain {
    // Ingress with `client_auth: required`: every request's connection has
    // a valid SVID (egress requests carry the pod's own).
    let certificate_required =
        config.mode == Mode::Ingress && config.listener.client_auth == ClientAuth::Required;
    Chain::new(vec![
        // First: strip caller-sent identity headers and normalize the path,
        // so nothing after this reads caller claims or an unnormalized path.
        Box::new(Sanitize),
        // Who is calling: the verified SVID and bearer token, bound to
        // each other when both are present.
        Box::new(Identity::new(certificate_required)),
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
        // Where it goes, by the host and normalized path routing read:
        // after the decision, so a refused request is recorded as policy
        // refused it, and a request no upstream takes goes nowhere.
        // Upstreams change only at a restart: the table is the config's.
        Box::new(SelectUpstream::new(Arc::new(UpstreamTable::new(config)))),
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
        let keys = jwks::load(&config.tokens)?;
        let tokens = Arc::new(TokenVerifier::new(&config.tokens, keys.sources()));
        let snapshot = Snapshot::load(&config, config_path, 1)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_tokens(tokens);
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
            chain: chain(&config, cache.clone(), &metrics),
            snapshot: ArcSwap::from_pointee(snapshot),
            restart_only_files: restart_only,
            reload_state: Mutex::new(Watched {
                fingerprint: seen,
                refused: None,
                config: config.clone(),
                keys,
                retry: None,
            }),
            config,
            metrics,
            cache,
            audit,
            telemetry,
            verifier,
            fetcher: jwks::Fetcher::start()?,
            server_cert,
            workload,
            bundle_expiry: Mutex::new(bundle_expiry),
            in_flight: AtomicUsize::new(0),
            idle: (Mutex::new(()), Condvar::new()),
        })
    }

    /// A request began: it is in flight until [`Self::request_recorded`].
    pub fn request_began(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request's record is queued.
    pub fn request_recorded(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Taken so a waiter between its check and its wait is woken.
            let _held = self.idle.0.lock().unwrap_or_else(|p| p.into_inner());
            self.idle.1.notify_all();
        }
    }

    /// Waits up to `timeout` for the requests in flight to be recorded: at
    /// shutdown, pingora's runtimes drop their tasks in the background,
    /// and a dropped request writes its audit line as it goes.
    pub fn wait_for_requests(&self, timeout: Duration) {
        let held = self.idle.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.idle.1.wait_timeout_while(held, timeout, |_| {
            self.in_flight.load(Ordering::Acquire) > 0
        });
    }

    /// Starts the fetches of the issuers' URL key sources. (The reload and
    /// rotation watcher is a service of the server: [`Watcher`].)
    pub fn start_background(self: &Arc<Self>) -> anyhow::Result<()> {
        {
            let watched = self
                .reload_state
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for (source, config) in watched.keys.urls() {
                if !self.fetcher.is_fetching(source) {
                    self.fetcher.keep_fresh(source.clone(), config, false)?;
                }
            }
        }
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

    /// Reloads policies, schema, registry, routes, token issuers and trust
    /// bundles, all or nothing: the new version is read and validated in
    /// full (a new issuer's keys fetched) before it replaces the old; if
    /// anything is wrong the old one keeps serving.
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
            let due = watched.retry.is_some_and(|(at, _)| Instant::now() >= at);
            match &watched.refused {
                Some(refused) if !due => return Err(refused.clone()),
                Some(_) => {}
                None => return Ok((current, false)),
            }
        }
        let mut retry_after = None;
        let running = &watched.keys;
        let running_tokens = &watched.config.tokens;
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
                restart_only.push("the CA files of upstreams (tls.ca)");
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
            // Last, as it may wait on key servers: every issuer's keys,
            // read or fetched before any is replaced.
            let prepared = jwks::prepare(&config.tokens, running, &self.fetcher).map_err(|e| {
                retry_after = e.retry_after;
                error(&e.field, e.error)
            })?;
            // Unchanged issuers keep their verifier, and the tokens it
            // has verified.
            let same_issuers = serde_json::to_value(&config.tokens).ok()
                == serde_json::to_value(running_tokens).ok();
            let tokens = if same_issuers && prepared.same_sources_as(running) {
                self.snapshot.load().tokens.clone()
            } else {
                Arc::new(TokenVerifier::new(&config.tokens, prepared.keys.sources()))
            };
            Ok((config, snapshot.with_tokens(tokens), trust, prepared))
        })();
        match attempt {
            Ok((config, snapshot, (trust, bundle_expiry), prepared)) => {
                let jwks::Prepared {
                    keys,
                    file_sets,
                    new_urls,
                    dropped,
                } = prepared;
                *watched = Watched {
                    fingerprint: seen,
                    refused: None,
                    config,
                    keys,
                    retry: None,
                };
                // Keys and bundles first: a new agent's credentials must
                // verify by the time its registration is live.
                for (source, set) in file_sets {
                    source.store(set);
                }
                self.verifier.replace(trust);
                *self.bundle_expiry.lock().unwrap_or_else(|p| p.into_inner()) = bundle_expiry;
                self.snapshot.store(Arc::new(snapshot));
                // A removed issuer is refused from the swap on; its keys
                // are no longer fetched.
                for source in &dropped {
                    self.fetcher.stop(source);
                }
                for (source, config) in new_urls {
                    if let Err(e) = self.fetcher.keep_fresh(source, &config, true) {
                        log::error!("JWKS: cannot keep the keys fresh: {e:#}");
                    }
                }
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
                // send) parses it again until a file changes, or, when a
                // key server could not be reached, until it is due to be
                // tried again (sooner the first time, then backing off).
                let again = seen == watched.fingerprint;
                watched.retry = retry_after.map(|first| {
                    let wait = match watched.retry {
                        Some((_, last)) if again => (last * 2).min(MAX_KEY_RETRY),
                        _ => first,
                    };
                    (Instant::now() + wait, wait)
                });
                watched.fingerprint = seen;
                watched.refused = Some(errors.clone());
                self.metrics.config_reload_failures.inc();
                self.metrics.config_last_reload_successful.set(0);
                log::error!("reload refused, generation {current} keeps serving:\n{errors}");
                Err(errors)
            }
        }
    }

    /// One poll of the watched files: rotates certificates whose files
    /// changed, and reloads when the files the serving config names
    /// changed (or a version refused for want of keys is due again).
    fn poll_files(&self) {
        self.rotate_certificates();
        let changed = {
            let watched = self
                .reload_state
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            fingerprint(&self.config_path, &watched.config) != watched.fingerprint
                || watched.retry.is_some_and(|(at, _)| Instant::now() >= at)
        };
        if changed {
            let _ = self.reload();
        }
    }
}

/// The reload and rotation watcher, a pingora background service: it polls
/// the files every `reload.poll_interval_ms` until the server shuts down.
pub struct Watcher(pub Arc<App>);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Watcher {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let app = &self.0;
        if !app.config.reload.watch {
            return;
        }
        let mut every =
            tokio::time::interval(Duration::from_millis(app.config.reload.poll_interval_ms));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is at once: the files were read at start.
        every.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = every.tick() => {}
            }
            // Reading files and parsing policies blocks: not on the
            // runtime's one thread, where the shutdown signal is heard.
            let app = app.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || app.poll_files()).await {
                log::error!("the reload watcher's poll failed: {e}");
            }
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
/// change, however it is made, changes the fingerprint. A file whose
/// metadata has not changed is not read again ([`crate::watch`]).
fn fingerprint(config_path: &Path, config: &Config) -> u64 {
    let mut h = DefaultHasher::new();
    let mut file = |p: &Path| {
        p.hash(&mut h);
        crate::watch::content_hash(p).hash(&mut h);
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
        // A changed CA file makes the issuer's keys be fetched again.
        for path in [&issuer.jwks.file, &issuer.jwks.ca].into_iter().flatten() {
            file(path);
        }
    }
    restart_only_files(config).hash(&mut h);
    h.finish()
}

/// Hashes the contents of the CA files read once at start: every
/// upstream's `tls.ca`.
fn restart_only_files(config: &Config) -> u64 {
    let mut h = DefaultHasher::new();
    let upstreams = config
        .all_upstreams()
        .filter_map(|u| u.tls.as_ref()?.ca.as_ref());
    for ca in upstreams {
        ca.hash(&mut h);
        crate::watch::content_hash(ca).hash(&mut h);
    }
    h.finish()
}
