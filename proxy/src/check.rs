//! `tether check`: everything `run` would load, validated, without serving.

use std::io::Write;
use std::path::Path;

use tether_config::Config;
use tether_filters::Snapshot;

/// Validates the config and all it refers to. Prints every problem,
/// located (errors to stderr, warnings and the summary to `out`), and
/// returns whether there were none.
pub fn run(config_path: &Path, out: &mut impl Write) -> anyhow::Result<bool> {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(errors) => return Ok(report(&errors.to_string())),
    };
    let snapshot = match Snapshot::load(&config, config_path, 1) {
        Ok(s) => s,
        Err(errors) => return Ok(report(&errors.to_string())),
    };
    if let Err(e) = crate::tls::trust_store(&config) {
        return Ok(report(&format!(
            "{}: trust_domains: {e:#}",
            config_path.display()
        )));
    }
    // The files a start would load: each pair must match, each key set
    // must hold a usable key.
    let pairs = [
        (
            "listener.tls",
            config.listener.tls.as_ref().map(|t| (&t.cert, &t.key)),
        ),
        (
            "workload",
            config.workload.as_ref().map(|w| (&w.cert, &w.key)),
        ),
    ];
    for (field, pair) in pairs {
        if let Some((cert, key)) = pair {
            if let Err(e) = crate::certs::load_pair(cert, key) {
                return Ok(report(&format!(
                    "{}: {field}: {e:#}",
                    config_path.display()
                )));
            }
        }
    }
    if let Err(e) = crate::jwks::sources(&config.tokens) {
        return Ok(report(&format!("{}: {e:#}", config_path.display())));
    }
    for w in tether_filters::lint::lint(&snapshot) {
        writeln!(
            out,
            "{}: warning: {}: {}",
            config_path.display(),
            w.subject,
            w.message
        )?;
    }
    writeln!(
        out,
        "{}: ok: {} agents, {} routes, {} policies, {} trust domains, {} token issuers",
        config_path.display(),
        snapshot.registry.len(),
        snapshot.routes.iter().count(),
        snapshot.policy.set.policies().count(),
        config.trust_domains.len(),
        config.tokens.issuers.len()
    )?;
    Ok(true)
}

fn report(errors: &str) -> bool {
    eprintln!("{errors}");
    false
}
