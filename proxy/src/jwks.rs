//! Issuers' JWK sets: read from files at load and reload, fetched from URLs
//! in the background.
//!
//! The fetcher runs on a thread of its own with a small runtime, so a slow
//! key server never holds a proxy worker. Each URL is fetched at start,
//! every `refresh_seconds`, and early when a request meets an unknown
//! `kid` (within the source's cool-down); failed fetches are retried with
//! backoff and keep the last good set, usable while fresh.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tether_config::{JwksSource, Tokens};
use tether_filters::identity::jwks::{KeySet, KeySource};

/// Largest JWK set accepted from a URL.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The key source of each configured issuer, in config order: files read
/// now (a bad file fails the load), URLs empty until fetched.
pub fn sources(tokens: &Tokens) -> anyhow::Result<Vec<Arc<KeySource>>> {
    tokens
        .issuers
        .iter()
        .enumerate()
        .map(|(i, issuer)| {
            let j = &issuer.jwks;
            Ok(Arc::new(match (&j.file, &j.url) {
                (Some(file), _) => KeySource::file(
                    file.display().to_string(),
                    read_file(file).with_context(|| format!("tokens.issuers[{i}].jwks.file"))?,
                ),
                (None, Some(url)) => KeySource::url(
                    url.clone(),
                    Duration::from_secs(j.max_age_seconds),
                    Duration::from_millis(j.min_refetch_interval_ms),
                ),
                (None, None) => anyhow::bail!("tokens.issuers[{i}].jwks: no file and no url"),
            }))
        })
        .collect()
}

/// Reads a JWKS file.
pub fn read_file(path: &Path) -> anyhow::Result<KeySet> {
    let bytes = std::fs::read(path).with_context(|| format!("reading `{}`", path.display()))?;
    KeySet::parse(&bytes)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("`{}`", path.display()))
}

/// Starts fetching every URL source. `sources` pairs each with its config.
pub fn start_fetcher(sources: Vec<(Arc<KeySource>, JwksSource)>) -> anyhow::Result<()> {
    if sources.is_empty() {
        return Ok(());
    }
    let mut tasks = Vec::new();
    for (source, config) in sources {
        let Some(url) = config.url.clone() else {
            continue;
        };
        tasks.push((source, url, client(&config)?, config));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("JWKS fetcher runtime")?;
    std::thread::Builder::new()
        .name("tether-jwks".into())
        .spawn(move || {
            runtime.block_on(async move {
                let handles: Vec<_> = tasks
                    .into_iter()
                    .map(|(source, url, client, config)| {
                        tokio::spawn(keep_fresh(source, url, client, config))
                    })
                    .collect();
                for handle in handles {
                    let _ = handle.await;
                }
            })
        })
        .context("starting the JWKS fetcher")?;
    Ok(())
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

/// Fetches `url` into `source` for as long as the process lives.
async fn keep_fresh(
    source: Arc<KeySource>,
    url: String,
    client: reqwest::Client,
    config: JwksSource,
) {
    let refresh = Duration::from_secs(config.refresh_seconds);
    let mut wait = Duration::ZERO; // the first fetch happens at once
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
