//! Issuers' JWK sets: read from files at load and reload, fetched from URLs
//! in the background.
//!
//! The fetcher runs on a thread of its own with a small runtime, so a slow
//! key server never holds a proxy worker. Each URL is fetched at start,
//! every `refresh_seconds`, and early when a request meets an unknown
//! `kid` (within the source's cool-down); failed fetches are retried with
//! backoff and keep the last good set, usable while fresh.
//!
//! Issuers change at reload. A source whose settings and CA file are
//! unchanged is kept, with its keys and its fetches; any other is read or
//! fetched before the reload applies, so a new issuer's tokens verify
//! from its first request (a key server that cannot be reached refuses
//! the reload), and a source no issuer uses any more stops being fetched.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tether_config::{JwksSource, Tokens};
use tether_filters::identity::jwks::{KeySet, KeySource};

/// Largest JWK set accepted from a URL.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The key sources of a config's issuers, in its order.
pub struct IssuerKeys {
    served: Vec<Served>,
}

/// One issuer's key source and what it was made from.
struct Served {
    source: Arc<KeySource>,
    jwks: JwksSource,
    /// The contents of `jwks.ca` when the source was made: the trust of
    /// its fetches, which a changed file changes.
    ca: Option<Vec<u8>>,
}

impl Served {
    fn is_url(&self) -> bool {
        self.jwks.file.is_none()
    }
}

impl IssuerKeys {
    /// The sources, in the order of the issuers.
    pub fn sources(&self) -> Vec<Arc<KeySource>> {
        self.served.iter().map(|s| s.source.clone()).collect()
    }

    /// The URL sources and their settings.
    pub fn urls(&self) -> impl Iterator<Item = (&Arc<KeySource>, &JwksSource)> {
        self.served
            .iter()
            .filter(|s| s.is_url())
            .map(|s| (&s.source, &s.jwks))
    }
}

/// The key source of each configured issuer, in config order: files read
/// now (a bad file fails the load), URLs empty until fetched.
pub fn load(tokens: &Tokens) -> anyhow::Result<IssuerKeys> {
    let served = tokens
        .issuers
        .iter()
        .enumerate()
        .map(|(i, issuer)| {
            let j = &issuer.jwks;
            let source = match (&j.file, &j.url) {
                (Some(file), _) => KeySource::file(
                    file.display().to_string(),
                    read_file(file).with_context(|| format!("tokens.issuers[{i}].jwks.file"))?,
                ),
                (None, Some(url)) => url_source(url, j),
                (None, None) => anyhow::bail!("tokens.issuers[{i}].jwks: no file and no url"),
            };
            Ok(Served {
                source: Arc::new(source),
                jwks: j.clone(),
                ca: read_ca(j),
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(IssuerKeys { served })
}

fn url_source(url: &str, j: &JwksSource) -> KeySource {
    KeySource::url(
        url,
        Duration::from_secs(j.max_age_seconds),
        Duration::from_millis(j.min_refetch_interval_ms),
    )
}

fn read_ca(j: &JwksSource) -> Option<Vec<u8>> {
    j.ca.as_ref().and_then(|ca| std::fs::read(ca).ok())
}

/// A reload's key sources, every one read or fetched, none yet in use.
pub struct Prepared {
    /// The sources of the new config's issuers.
    pub keys: IssuerKeys,
    /// Kept file sources and their files' keys, read again: stored when
    /// the reload applies.
    pub file_sets: Vec<(Arc<KeySource>, KeySet)>,
    /// New URL sources, fetched once: to keep fresh once the reload
    /// applies.
    pub new_urls: Vec<(Arc<KeySource>, JwksSource)>,
    /// Running URL sources no issuer uses any more: to stop fetching.
    pub dropped: Vec<Arc<KeySource>>,
}

impl Prepared {
    /// Whether every source is one `running` serves with, in its order.
    pub fn same_sources_as(&self, running: &IssuerKeys) -> bool {
        self.keys.served.len() == running.served.len()
            && self
                .keys
                .served
                .iter()
                .zip(&running.served)
                .all(|(a, b)| Arc::ptr_eq(&a.source, &b.source))
    }
}

/// Why a reload's keys are not ready.
pub struct NotReady {
    /// The issuer's field.
    pub field: String,
    /// What went wrong.
    pub error: anyhow::Error,
    /// When a key server could not be reached or answered wrong, which
    /// may change by itself: how soon to try again (the issuer's
    /// `min_refetch_interval_ms`, which bounds its early fetches too).
    pub retry_after: Option<Duration>,
}

/// The key sources for `tokens`, keeping those of `running` whose
/// settings and CA are unchanged. Files are read and new URLs fetched
/// (through `fetcher`) now, before anything is replaced: a new issuer
/// whose keys cannot be had refuses the whole reload.
pub fn prepare(
    tokens: &Tokens,
    running: &IssuerKeys,
    fetcher: &Fetcher,
) -> Result<Prepared, NotReady> {
    let mut served = Vec::new();
    let mut file_sets = Vec::new();
    let mut new_urls = Vec::new();
    for (i, issuer) in tokens.issuers.iter().enumerate() {
        let j = &issuer.jwks;
        let ca = read_ca(j);
        let kept = running
            .served
            .iter()
            .find(|s| s.jwks == *j && s.ca == ca)
            .map(|s| s.source.clone());
        let source = match (&j.file, &j.url) {
            (Some(file), _) => {
                let set = read_file(file).map_err(|error| NotReady {
                    field: format!("tokens.issuers[{i}].jwks.file"),
                    error,
                    retry_after: None,
                })?;
                match kept {
                    Some(source) => {
                        file_sets.push((source.clone(), set));
                        source
                    }
                    None => Arc::new(KeySource::file(file.display().to_string(), set)),
                }
            }
            (None, Some(url)) => match kept {
                Some(source) => source,
                None => {
                    let set = fetcher.fetch_now(j).map_err(|e| NotReady {
                        field: format!("tokens.issuers[{i}].jwks.url"),
                        error: anyhow::anyhow!(
                            "the keys of `{}` could not be fetched from `{url}`: {e}",
                            issuer.issuer
                        ),
                        retry_after: Some(Duration::from_millis(j.min_refetch_interval_ms)),
                    })?;
                    let source = Arc::new(url_source(url, j));
                    source.store(set);
                    new_urls.push((source.clone(), j.clone()));
                    source
                }
            },
            (None, None) => {
                return Err(NotReady {
                    field: format!("tokens.issuers[{i}].jwks"),
                    error: anyhow::anyhow!("no file and no url"),
                    retry_after: None,
                })
            }
        };
        served.push(Served {
            source,
            jwks: j.clone(),
            ca,
        });
    }
    let dropped = running
        .urls()
        .map(|(source, _)| source)
        .filter(|old| !served.iter().any(|s| Arc::ptr_eq(&s.source, old)))
        .cloned()
        .collect();
    Ok(Prepared {
        keys: IssuerKeys { served },
        file_sets,
        new_urls,
        dropped,
    })
}

/// Reads a JWKS file.
pub fn read_file(path: &Path) -> anyhow::Result<KeySet> {
    let bytes = std::fs::read(path).with_context(|| format!("reading `{}`", path.display()))?;
    KeySet::parse(&bytes)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("`{}`", path.display()))
}

/// Fetches URL sources on a thread of its own, for as long as each is
/// used.
pub struct Fetcher {
    runtime: tokio::runtime::Handle,
    /// The sources being kept fresh, and their tasks.
    tasks: Mutex<Vec<(Arc<KeySource>, tokio::task::AbortHandle)>>,
}

impl Fetcher {
    /// Starts the fetcher's thread, fetching nothing yet.
    pub fn start() -> anyhow::Result<Fetcher> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("JWKS fetcher runtime")?;
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("tether-jwks".into())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))
            .context("starting the JWKS fetcher")?;
        Ok(Fetcher {
            runtime: handle,
            tasks: Mutex::new(Vec::new()),
        })
    }

    /// Fetches `source` from its URL for as long as it is used: at once,
    /// or, when it was `fetched` a moment ago, after `refresh_seconds`.
    pub fn keep_fresh(
        &self,
        source: Arc<KeySource>,
        config: &JwksSource,
        fetched: bool,
    ) -> anyhow::Result<()> {
        let Some(url) = config.url.clone() else {
            return Ok(());
        };
        let first = match fetched {
            true => Duration::from_secs(config.refresh_seconds),
            false => Duration::ZERO,
        };
        let task = self.runtime.spawn(keep_fresh(
            source.clone(),
            url,
            client(config)?,
            config.clone(),
            first,
        ));
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((source, task.abort_handle()));
        Ok(())
    }

    /// Whether `source` is being kept fresh.
    pub fn is_fetching(&self, source: &Arc<KeySource>) -> bool {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(s, _)| Arc::ptr_eq(s, source))
    }

    /// Stops fetching `source`.
    pub fn stop(&self, source: &Arc<KeySource>) {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(s, task)| {
                let stop = Arc::ptr_eq(s, source);
                if stop {
                    task.abort();
                }
                !stop
            });
    }

    /// Fetches the keys `config` names once, waiting for the answer.
    pub fn fetch_now(&self, config: &JwksSource) -> Result<KeySet, String> {
        let url = config.url.clone().ok_or("no url")?;
        let client = client(config).map_err(|e| format!("{e:#}"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            let _ = tx.send(fetch(&client, &url).await);
        });
        rx.recv_timeout(FETCH_TIMEOUT + Duration::from_secs(1))
            .unwrap_or_else(|_| Err(format!("no answer within {} s", FETCH_TIMEOUT.as_secs())))
    }
}

/// An HTTP client for one key server: rustls with ring (the proxy's one
/// crypto stack), trusting the configured CA or the system roots.
fn client(config: &JwksSource) -> anyhow::Result<reqwest::Client> {
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca {
        Some(ca) => {
            for cert in crate::tls::read_certs(ca)? {
                roots.add(cert).context("jwks.ca")?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().unwrap_or_default() {
                let _ = roots.add(cert);
            }
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut builder = reqwest::Client::builder();
    // Plain http:// is allowed to loopback only, where no one is on the
    // path: an `HTTP_PROXY` from the environment would put someone there.
    if config
        .url
        .as_deref()
        .is_some_and(|u| !u.to_ascii_lowercase().starts_with("https://"))
    {
        builder = builder.no_proxy();
    }
    builder
        .tls_backend_preconfigured(tls)
        .timeout(FETCH_TIMEOUT)
        .connect_timeout(FETCH_TIMEOUT)
        // A redirect could lead anywhere: the configured URL is the source.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("JWKS HTTP client")
}

/// Fetches `url` into `source`, the first time after `first`, until the
/// task is aborted.
async fn keep_fresh(
    source: Arc<KeySource>,
    url: String,
    client: reqwest::Client,
    config: JwksSource,
    first: Duration,
) {
    let refresh = Duration::from_secs(config.refresh_seconds);
    let mut wait = first;
    let mut failures = 0u32;
    loop {
        let early = tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            _ = source.wanted() => true,
        };
        if !source.begin_fetch(early) {
            continue; // an early fetch inside the cool-down: keep waiting
        }
        log::debug!("fetching JWKS `{url}` (early: {early})");
        match source.end_fetch(fetch(&client, &url).await) {
            Ok(()) => {
                if failures > 0 {
                    log::info!("JWKS `{url}` fetched again");
                }
                failures = 0;
                wait = refresh;
            }
            Err(e) => {
                failures += 1;
                log::warn!("JWKS `{url}`: {e} (attempt {failures}; the last good keys stay in use while fresh)");
                wait = Duration::from_secs(1 << failures.min(6)).min(refresh);
            }
        }
    }
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<KeySet, String> {
    let mut response = client
        .get(url)
        .header("accept", "application/json")
        .send()
        .await
        .map_err(|e| format!("fetch failed: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("status {}", response.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("reading: {e}"))?
    {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(format!("key set is over {MAX_JWKS_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    KeySet::parse(&body)
}
