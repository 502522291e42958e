//! `tether check`: everything `run` would load, validated, without serving.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use tether_config::{Config, PathCase};
use tether_filters::identity::tls::SpiffeClientVerifier;
use tether_filters::record::Metrics;
use tether_filters::Snapshot;

use crate::upstreams::{SpiffeUpstreams, Upstreams};

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
    let trust = match crate::tls::trust_store(&config) {
        Ok((store, _)) => store,
        Err(e) => {
            return Ok(report(&format!(
                "{}: trust_domains: {e:#}",
                config_path.display()
            )))
        }
    };
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
    if let Err(e) = crate::jwks::load(&config.tokens) {
        return Ok(report(&format!("{}: {e:#}", config_path.display())));
    }
    let workload = match &config.workload {
        Some(w) => match crate::certs::WorkloadSvid::load(&w.cert, &w.key) {
            Ok(svid) => Some(Arc::new(svid)),
            Err(e) => {
                return Ok(report(&format!(
                    "{}: workload: {e:#}",
                    config_path.display()
                )))
            }
        },
        None => None,
    };
    // Counters no one reads: `check` makes no connection.
    let metrics = Metrics::new()?;
    let spiffe = SpiffeUpstreams {
        bundles: Arc::new(SpiffeClientVerifier::new(
            trust,
            Arc::new(rustls::crypto::ring::default_provider()),
            true,
            metrics.client_cert_rejected.clone(),
        )),
        workload,
        rejected: metrics.upstream_cert_rejected,
    };
    if let Err(e) = Upstreams::new(&config, &spiffe) {
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
    let warnings = routes_any_upstream_may_take(&config)
        .into_iter()
        .chain(upstreams_trusting_a_spiffe_bundle(&config));
    for (subject, message) in warnings {
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
        "{}: ok: {} agents, {} routes, {} policies, {} trust domains, {} token issuers; \
         route paths match {}",
        config_path.display(),
        snapshot.registry.len(),
        snapshot.routes.iter().count(),
        snapshot.policy.set.policies().count(),
        config.trust_domains.len(),
        config.tokens.issuers.len(),
        // A choice about the upstream that decides what policy sees:
        // said on every check, so that a reviewer reads it.
        match config.paths.case {
            PathCase::Sensitive => "case-sensitively (`paths.case: sensitive`)",
            PathCase::Insensitive => "ignoring case (`paths.case: insensitive`)",
        }
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
                (None, Some(p)) if tether_filters::upstream::under_prefix(literal, p) => break,
                (None, Some(_)) => {}
                (Some(_), p) => {
                    let overlaps = p.is_none_or(|p| {
                        tether_filters::upstream::under_prefix(literal, p) || p.starts_with(literal)
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

/// Upstreams verified by DNS name against a CA file that is a SPIFFE
/// trust bundle (it shares a CA with a `trust_domains` bundle, or a CA in
/// it names a trust domain in its URI SAN): any workload of that domain
/// whose SVID carries the name passes, which only a SPIFFE ID settles.
fn upstreams_trusting_a_spiffe_bundle(config: &Config) -> Vec<(String, String)> {
    let bundles: Vec<(&str, Vec<CertificateDer<'static>>)> = config
        .trust_domains
        .iter()
        .map(|td| {
            let certs = crate::tls::read_certs(&td.bundle).unwrap_or_default();
            (td.name.as_str(), certs)
        })
        .collect();
    let fields = match &config.upstream {
        Some(_) => vec!["upstream".to_string()],
        None => (0..config.upstreams.len())
            .map(|i| format!("upstreams[{i}]"))
            .collect(),
    };
    let mut found = Vec::new();
    for (field, upstream) in fields.into_iter().zip(config.all_upstreams()) {
        let Some(tls) = &upstream.tls else { continue };
        let Some(ca) = &tls.ca else { continue };
        if tls.spiffe_id.is_some() || tls.trust_domain.is_some() {
            continue;
        }
        let certs = crate::tls::read_certs(ca).unwrap_or_default();
        let shared = bundles
            .iter()
            .find(|(_, bundle)| certs.iter().any(|c| bundle.contains(c)))
            .map(|(name, _)| name.to_string());
        let Some(domain) = shared.or_else(|| certs.iter().find_map(|c| named_trust_domain(c)))
        else {
            continue;
        };
        found.push((
            format!("{field}.tls.ca"),
            format!(
                "the SPIFFE bundle of `{domain}`, with no `spiffe_id`: any workload of \
                 `{domain}` whose SVID carries the name `{}` passes for the upstream; set \
                 `tls.spiffe_id` to the upstream's own ID (or `tls.trust_domain` to accept \
                 any of the domain)",
                tls.server_name
            ),
        ));
    }
    found
}

/// The trust domain a SPIFFE CA certificate names in its URI SAN.
fn named_trust_domain(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).ok()?;
    if !cert.is_ca() {
        return None;
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => uri
            .strip_prefix("spiffe://")
            .map(|td| td.trim_end_matches('/').to_string())
            .filter(|td| !td.is_empty() && !td.contains('/')),
        _ => None,
    })
}

fn report(errors: &str) -> bool {
    eprintln!("{errors}");
    false
}
