//! `tether check`: everything `run` would load, validated, without serving.

use std::io::Write;
use std::path::Path;

use tether_config::Config;
use tether_filters::Snapshot;

/// Whether `run` could append audit lines to `output`, found without
/// creating anything: an existing file opens for appending, a new one's
/// folder exists.
fn audit_output_writable(output: &str) -> std::io::Result<()> {
    if matches!(output, "stdout" | "stderr") {
        return Ok(());
    }
    let path = Path::new(output);
    if path.exists() {
        return std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map(drop);
    }
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(folder) if !folder.is_dir() => Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "`{output}`: its folder `{}` does not exist",
                folder.display()
            ),
        )),
        _ => Ok(()),
    }
}

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
    if let Err(e) = crate::upstreams::Upstreams::new(&config) {
        return Ok(report(&format!("{}: {e:#}", config_path.display())));
    }
    if let Err(e) = audit_output_writable(&config.audit.output) {
        return Ok(report(&format!(
            "{}: audit.output: {e}",
            config_path.display()
        )));
    }
    let admin_beyond_loopback = config
        .admin
        .address
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| !a.ip().is_loopback());
    if admin_beyond_loopback {
        writeln!(
            out,
            "{}: warning: admin.address: `{}` is reachable beyond this host, and the admin \
             listener asks no credentials (metrics, POST /reload): keep it to the scraper \
             with a NetworkPolicy, or bind it to loopback",
            config_path.display(),
            config.admin.address
        )?;
    }
    for (subject, message) in routes_any_upstream_may_take(&config) {
        writeln!(
            out,
            "{}: warning: {subject}: {message}",
            config_path.display()
        )?;
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

/// Routes that match any host while an upstream chosen by host may take
/// their requests: such a request goes to whichever upstream its `Host`
/// names, and the policy that decided it does not know which. An upstream
/// chosen by path alone that is listed first and takes every path of the
/// route settles it.
fn routes_any_upstream_may_take(config: &Config) -> Vec<(String, String)> {
    let upstreams: Vec<_> = config.all_upstreams().collect();
    let mut found = Vec::new();
    for (i, route) in config.routes.iter().enumerate() {
        if route.host.is_some() {
            continue;
        }
        // The literal start of the template: every path the route matches
        // begins with it.
        let literal = route.path.split('{').next().unwrap_or_default();
        for upstream in &upstreams {
            let prefix = upstream.path_prefix.as_deref();
            match (&upstream.hosts, prefix) {
                (None, None) => break,
                (None, Some(p)) if crate::upstreams::under_prefix(literal, p) => break,
                (None, Some(_)) => {}
                (Some(_), p) => {
                    let overlaps = p.is_none_or(|p| {
                        crate::upstreams::under_prefix(literal, p) || p.starts_with(literal)
                    });
                    if overlaps {
                        let name = upstream.name.as_deref().unwrap_or(&upstream.address);
                        found.push((
                            format!("routes[{i}]"),
                            format!(
                                "`{}` matches any host, and upstream `{name}` is chosen by \
                                 host: a request on it goes where its `Host` says, which the \
                                 policy deciding it does not see; give the route `host`",
                                route.path
                            ),
                        ));
                        break;
                    }
                }
            }
        }
    }
    found
}

fn report(errors: &str) -> bool {
    eprintln!("{errors}");
    false
}
