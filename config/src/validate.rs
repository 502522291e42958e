//! Semantic checks: everything serde's types cannot say. Every check pushes
//! a located error and carries on, so one run reports every problem.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

use crate::spiffe::{check_trust_domain, SpiffeId};
use crate::{
    AgentSpec, ClientAuth, Config, ConfigError, EncodedSlash, Mode, TokenKind, UpstreamTls,
};

/// HTTP methods a route may name.
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE",
];

struct Problems<'a> {
    file: &'a Path,
    errors: Vec<ConfigError>,
}

impl Problems<'_> {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            position: None,
            field: field.into(),
            message: message.into(),
        });
    }

    fn address(&mut self, field: &str, value: &str) {
        if value.parse::<SocketAddr>().is_err() {
            self.push(
                field,
                format!("`{value}` is not an `ip:port` address (e.g. `127.0.0.1:8443`)"),
            );
        }
    }

    fn file_exists(&mut self, field: &str, path: &Path) {
        if !path.exists() {
            self.push(field, format!("file `{}` does not exist", path.display()));
        }
    }
}

/// Checks a whole config. The config's own file is labelled `config`; the
/// loader replaces it with the real path.
pub(crate) fn config(c: &Config) -> Vec<ConfigError> {
    let file = Path::new("config");
    let mut p = Problems {
        file,
        errors: Vec::new(),
    };

    p.address("listener.address", &c.listener.address);
    match (&c.listener.tls, c.mode) {
        (Some(tls), _) => {
            p.file_exists("listener.tls.cert", &tls.cert);
            p.file_exists("listener.tls.key", &tls.key);
        }
        (None, Mode::Ingress) => p.push(
            "listener.tls",
            "missing: in ingress mode agents connect over TLS (plain HTTP is for egress mode, on loopback)",
        ),
        (None, Mode::Egress) => {}
    }
    // In egress mode whoever reaches the listener speaks as the pod's own
    // SVID, TLS or not: only the pod itself may reach it.
    if c.mode == Mode::Egress
        && c.listener
            .address
            .parse::<SocketAddr>()
            .is_ok_and(|a| !a.ip().is_loopback())
    {
        p.push(
            "listener.address",
            format!(
                "`{}`: an egress listener must bind to loopback (e.g. `127.0.0.1:15001`): \
                 whoever reaches it speaks as the pod's own SVID",
                c.listener.address
            ),
        );
    }
    p.address("admin.address", &c.admin.address);
    check_upstreams(&mut p, c);
    match (&c.workload, c.mode) {
        (Some(w), _) => {
            p.file_exists("workload.cert", &w.cert);
            p.file_exists("workload.key", &w.key);
        }
        (None, Mode::Egress) => p.push(
            "workload",
            "missing: in egress mode the pod's own SVID is the principal",
        ),
        (None, Mode::Ingress) => {}
    }

    let token_identities = !c.tokens.issuers.is_empty();
    if c.mode == Mode::Ingress && c.trust_domains.is_empty() && !token_identities {
        p.push(
            "trust_domains",
            "at least one trust domain (or a token issuer) is needed to verify agents",
        );
    }
    if c.mode == Mode::Ingress
        && c.trust_domains.is_empty()
        && c.listener.client_auth == ClientAuth::Required
    {
        p.push(
            "listener.client_auth",
            "`required` needs `trust_domains` to verify client certificates against; use `optional` for token-only agents",
        );
    }
    let mut seen = HashSet::new();
    for (i, td) in c.trust_domains.iter().enumerate() {
        let field = format!("trust_domains[{i}].name");
        if let Err(e) = check_trust_domain(&td.name) {
            p.push(&field, e);
        }
        if !seen.insert(td.name.as_str()) {
            p.push(
                &field,
                format!("trust domain `{}` is listed twice", td.name),
            );
        }
        p.file_exists(&format!("trust_domains[{i}].bundle"), &td.bundle);
    }
    check_tokens(&mut p, c);

    p.file_exists("policy.schema", &c.policy.schema);
    p.file_exists("policy.policies", &c.policy.policies);
    if let Some(shadow) = &c.policy.shadow {
        p.file_exists("policy.shadow", shadow);
    }
    if !c.policy.namespace.is_empty() && !is_cedar_path(&c.policy.namespace) {
        p.push(
            "policy.namespace",
            format!(
                "`{}` is not a Cedar namespace (e.g. `Api` or `Acme::Api`)",
                c.policy.namespace
            ),
        );
    }

    if c.routes.is_empty() {
        p.push(
            "routes",
            "no routes: every request would be denied (`no_route`)",
        );
    }
    for (i, route) in c.routes.iter().enumerate() {
        check_route(&mut p, i, route);
    }

    if c.cache.max_entries == 0 {
        p.push("cache.max_entries", "must be at least 1");
    }
    if let Some(otlp) = &c.telemetry.otlp {
        // The exporters are built without TLS (no OpenSSL, and the
        // collector is a node-local agent): say so rather than fail later.
        if !otlp.endpoint.starts_with("http://") {
            p.push(
                "telemetry.otlp.endpoint",
                format!(
                    "`{}` must be an `http://` URL (a node-local collector); TLS to the collector is not supported",
                    otlp.endpoint
                ),
            );
        }
        if otlp.max_queue == 0 {
            p.push("telemetry.otlp.max_queue", "must be at least 1");
        }
        if otlp.flush_interval_ms < 10 {
            // The exporter wakes this often; at 0 it would spin, taking
            // the queue's lock from every request.
            p.push("telemetry.otlp.flush_interval_ms", "must be at least 10");
        }
    }
    if c.audit.output.is_empty() {
        p.push("audit.output", "must be `stdout`, `stderr` or a file path");
    }
    if c.audit.max_queue == 0 {
        p.push("audit.max_queue", "must be at least 1");
    }
    if c.reload.poll_interval_ms < 50 {
        p.push("reload.poll_interval_ms", "must be at least 50");
    }
    if c.server.threads == 0 {
        p.push("server.threads", "must be at least 1");
    }

    p.errors
        .extend(agents(&c.registry.agents, c, file, "registry.agents"));
    p.errors
}

/// Checks registered agents; `prefix` is the field path of the list.
pub(crate) fn agents(
    agents: &[AgentSpec],
    c: &Config,
    file: &Path,
    prefix: &str,
) -> Vec<ConfigError> {
    let mut p = Problems {
        file,
        errors: Vec::new(),
    };
    let domains = reachable_trust_domains(c);
    let mut seen = HashSet::new();
    for (i, agent) in agents.iter().enumerate() {
        let at = |f: &str| format!("{prefix}[{i}].{f}");
        match SpiffeId::parse(&agent.id) {
            Ok(id) if domains.as_ref().is_some_and(|d| !d.contains(id.trust_domain())) => p.push(
                at("id"),
                format!(
                    "trust domain `{}` is not in `trust_domains` nor a token issuer's, so `{}` could never connect",
                    id.trust_domain(),
                    agent.id
                ),
            ),
            Ok(_) => {}
            Err(e) => p.push(at("id"), e),
        }
        if !seen.insert(agent.id.as_str()) {
            p.push(
                at("id"),
                format!("agent `{}` is registered twice", agent.id),
            );
        }
        if agent.owner.trim().is_empty() {
            p.push(at("owner"), "every agent needs a named human owner");
        }
        for (field, value) in [("owner", &agent.owner), ("team", &agent.team)] {
            if value.chars().any(char::is_control) {
                p.push(at(field), "must not contain control characters");
            }
        }
    }
    p.errors
}

/// The trust domains an agent can prove an identity in, or `None` when
/// any is possible (egress mode's workload SVID, OIDC subjects that are
/// SPIFFE IDs of any domain).
fn reachable_trust_domains(c: &Config) -> Option<HashSet<String>> {
    if c.mode == Mode::Egress {
        return None;
    }
    let mut domains: HashSet<String> = c.trust_domains.iter().map(|t| t.name.clone()).collect();
    for issuer in &c.tokens.issuers {
        match (&issuer.trust_domain, &issuer.agent_prefix) {
            (Some(td), _) => {
                domains.insert(td.clone());
            }
            (None, Some(prefix)) => {
                if let Ok(id) = SpiffeId::parse(&format!("{prefix}x")) {
                    domains.insert(id.trust_domain().to_string());
                }
            }
            (None, None) => return None,
        }
    }
    Some(domains)
}

fn check_upstreams(p: &mut Problems<'_>, c: &Config) {
    match (&c.upstream, c.upstreams.is_empty()) {
        (None, true) => p.push("upstreams", "missing: name an `upstream` or `upstreams`"),
        (Some(_), false) => p.push(
            "upstreams",
            "give either `upstream` (one API) or `upstreams` (several), not both",
        ),
        _ => {}
    }
    let fields: Vec<String> = match &c.upstream {
        Some(_) => vec!["upstream".into()],
        None => (0..c.upstreams.len())
            .map(|i| format!("upstreams[{i}]"))
            .collect(),
    };
    let mut names = HashSet::new();
    for (field, upstream) in fields.iter().zip(c.all_upstreams()) {
        p.address(&format!("{field}.address"), &upstream.address);
        if let Some(name) = &upstream.name {
            if !names.insert(name.as_str()) {
                p.push(format!("{field}.name"), format!("`{name}` is used twice"));
            }
        }
        if upstream
            .hosts
            .as_ref()
            .is_some_and(|h| h.values().is_empty())
        {
            p.push(
                format!("{field}.hosts"),
                "names no host, so the upstream would take nothing by host: leave it out",
            );
        }
        for host in upstream.hosts.iter().flat_map(|h| h.values()) {
            check_host(p, &format!("{field}.hosts"), host);
        }
        if let Some(prefix) = &upstream.path_prefix {
            if !prefix.starts_with('/') {
                p.push(
                    format!("{field}.path_prefix"),
                    format!("`{prefix}` must start with `/`"),
                );
            }
        }
        if let Some(slash) = upstream.encoded_slash {
            if slash != EncodedSlash::Reject && slash != c.paths.encoded_slash {
                p.push(
                    format!("{field}.encoded_slash"),
                    "only `reject` can be set per upstream (paths are normalized before the \
                     upstream is chosen): set `paths.encoded_slash` to change how every path is \
                     read",
                );
            }
        }
        if let Some(tls) = &upstream.tls {
            if tls.server_name.is_empty() {
                p.push(format!("{field}.tls.server_name"), "must not be empty");
            }
            if let Some(ca) = &tls.ca {
                p.file_exists(&format!("{field}.tls.ca"), ca);
            }
            if tls.client_certificate && c.workload.is_none() {
                p.push(
                    format!("{field}.tls.client_certificate"),
                    "needs `workload`: the SVID to present",
                );
            }
            check_upstream_spiffe(p, c, field, tls);
        }
    }
}

/// An upstream authorized by SPIFFE ID: which IDs, and the bundle of
/// their trust domain, which must be one of `trust_domains`.
fn check_upstream_spiffe(p: &mut Problems<'_>, c: &Config, field: &str, tls: &UpstreamTls) {
    let mut domains = Vec::new();
    match (&tls.spiffe_id, &tls.trust_domain) {
        (Some(_), Some(_)) => p.push(
            format!("{field}.tls.trust_domain"),
            "not with `spiffe_id`, whose IDs name their trust domain: give one or the other",
        ),
        (Some(ids), None) => {
            if ids.values().is_empty() {
                p.push(
                    format!("{field}.tls.spiffe_id"),
                    "names no ID, so no upstream could ever be accepted: leave it out",
                );
            }
            for id in ids.values() {
                match SpiffeId::parse(id) {
                    Ok(id) => domains.push(id.trust_domain().to_string()),
                    Err(e) => p.push(format!("{field}.tls.spiffe_id"), e),
                }
            }
        }
        (None, Some(td)) => match check_trust_domain(td) {
            Ok(()) => domains.push(td.clone()),
            Err(e) => p.push(format!("{field}.tls.trust_domain"), e),
        },
        (None, None) => return,
    }
    if tls.ca.is_some() {
        p.push(
            format!("{field}.tls.ca"),
            "not with `spiffe_id` or `trust_domain`: the upstream's SVID is verified against \
             the bundle of its trust domain in `trust_domains`",
        );
    }
    domains.sort();
    domains.dedup();
    for domain in domains
        .iter()
        .filter(|d| !c.trust_domains.iter().any(|td| td.name == **d))
    {
        p.push(
            format!("{field}.tls"),
            format!(
                "trust domain `{domain}` is not in `trust_domains`, whose bundle would verify \
                 the upstream's SVID"
            ),
        );
    }
}

fn check_tokens(p: &mut Problems<'_>, c: &Config) {
    let t = &c.tokens;
    for (field, value) in [
        (
            "tokens.max_lifetime_seconds",
            t.max_lifetime_seconds as usize,
        ),
        ("tokens.max_token_bytes", t.max_token_bytes),
        ("tokens.max_header_bytes", t.max_header_bytes),
        ("tokens.max_delegation_depth", t.max_delegation_depth),
    ] {
        if value == 0 {
            p.push(field, "must be at least 1");
        }
    }
    if t.max_lifetime_seconds > crate::MAX_TOKEN_LIFETIME_SECONDS {
        p.push(
            "tokens.max_lifetime_seconds",
            format!(
                "must be at most {} (a week): a token that lives longer is a \
                 shared secret by another name",
                crate::MAX_TOKEN_LIFETIME_SECONDS
            ),
        );
    }
    let mut seen = HashSet::new();
    for (i, issuer) in t.issuers.iter().enumerate() {
        let at = |f: &str| format!("tokens.issuers[{i}].{f}");
        if issuer.issuer.is_empty() {
            p.push(at("issuer"), "must not be empty");
        }
        if !seen.insert(issuer.issuer.as_str()) {
            p.push(
                at("issuer"),
                format!("issuer `{}` is listed twice", issuer.issuer),
            );
        }
        if issuer.audiences.is_empty() || issuer.audiences.iter().any(String::is_empty) {
            p.push(
                at("audiences"),
                "name at least one audience (RFC 8725: a token without one is refused)",
            );
        }
        if issuer.algorithms.is_empty() {
            p.push(at("algorithms"), "name at least one algorithm");
        }
        if issuer.agent_claim.is_empty() {
            p.push(at("agent_claim"), "must not be empty");
        }
        let jwks = &issuer.jwks;
        match (&jwks.file, &jwks.url) {
            (Some(file), None) => p.file_exists(&at("jwks.file"), file),
            (None, Some(url)) => {
                if let Err(e) = check_jwks_url(url) {
                    p.push(at("jwks.url"), e);
                }
                if jwks.refresh_seconds == 0 || jwks.max_age_seconds < jwks.refresh_seconds {
                    p.push(
                        at("jwks.max_age_seconds"),
                        "must be at least `refresh_seconds`, which must be at least 1",
                    );
                }
                // An unknown `kid` costs a fetch: without a pause between
                // fetches, any caller could make Tether fetch on every
                // request.
                if jwks.min_refetch_interval_ms < MIN_REFETCH_INTERVAL_MS {
                    p.push(
                        at("jwks.min_refetch_interval_ms"),
                        format!(
                            "must be at least {MIN_REFETCH_INTERVAL_MS}: a token with an unknown \
                             `kid` triggers a fetch, and anyone can send one"
                        ),
                    );
                }
            }
            _ => p.push(at("jwks"), "give exactly one of `file` and `url`"),
        }
        if let Some(ca) = &jwks.ca {
            p.file_exists(&at("jwks.ca"), ca);
        }
        if let Some(td) = &issuer.trust_domain {
            if let Err(e) = check_trust_domain(td) {
                p.push(at("trust_domain"), e);
            }
        }
        match issuer.kind {
            TokenKind::JwtSvid | TokenKind::Kubernetes if issuer.trust_domain.is_none() => p.push(
                at("trust_domain"),
                format!(
                    "missing: a `{}` issuer names the trust domain of its agents",
                    issuer.kind.as_str()
                ),
            ),
            // Without one, the issuer could name an agent of any trust
            // domain: a partner's IdP would speak for ours.
            TokenKind::Oidc if issuer.trust_domain.is_none() && issuer.agent_prefix.is_none() => p
                .push(
                    at("trust_domain"),
                    "missing: an `oidc` issuer names the trust domain of its agents \
                     (`trust_domain`, or the domain of its `agent_prefix`)",
                ),
            _ => {}
        }
        if let Some(prefix) = &issuer.agent_prefix {
            if issuer.kind != TokenKind::Oidc {
                p.push(
                    at("agent_prefix"),
                    "only `oidc` issuers map claims by prefix",
                );
            } else {
                match SpiffeId::parse(&format!("{prefix}x")) {
                    Ok(id) if prefix.ends_with('/') => {
                        if let Some(td) = issuer
                            .trust_domain
                            .as_deref()
                            .filter(|td| *td != id.trust_domain())
                        {
                            p.push(
                                at("agent_prefix"),
                                format!(
                                    "`{prefix}` is not in the issuer's trust domain `{td}`: \
                                     every agent it maps would be refused"
                                ),
                            );
                        }
                    }
                    _ => p.push(
                        at("agent_prefix"),
                        format!("`{prefix}` must be a SPIFFE ID prefix ending in `/`, e.g. `spiffe://example.org/oidc/`"),
                    ),
                }
            }
        }
    }
}

/// The shortest pause between two JWKS fetches an unknown `kid` causes.
const MIN_REFETCH_INTERVAL_MS: u64 = 1000;

/// A JWKS URL must be `https://`: the keys it serves decide who may mint
/// tokens, and over plain HTTP anyone on the path could serve their own.
/// Plain `http://` is allowed to a loopback address only (a node-local
/// agent or a test), where there is no path to be on.
fn check_jwks_url(url: &str) -> Result<(), String> {
    if url.starts_with("https://") {
        return Ok(());
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!("`{url}` is not an https:// URL"));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host_port.split(':').next().unwrap_or_default(),
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(format!(
            "`{url}` would fetch the signing keys without TLS, and anyone on the path could \
             then mint tokens: use https:// (plain http:// only to a loopback address)"
        ))
    }
}

fn check_host(p: &mut Problems<'_>, field: &str, host: &str) {
    let name = host.strip_prefix("*.").unwrap_or(host);
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        p.push(
            field,
            format!("`{host}` is not a host name (or `*.` and one)"),
        );
    }
}

fn check_route(p: &mut Problems<'_>, i: usize, route: &crate::Route) {
    let methods = route.method.values();
    if route.host.as_ref().is_some_and(|h| h.values().is_empty()) {
        p.push(
            format!("routes[{i}].host"),
            "names no host, so the route would match nothing: leave it out for any host",
        );
    }
    for host in route.host.iter().flat_map(|h| h.values()) {
        check_host(p, &format!("routes[{i}].host"), host);
    }
    for (name, value) in &route.resource.attributes {
        if !(value.is_string() || value.is_boolean() || value.is_i64()) {
            p.push(
                format!("routes[{i}].resource.attributes.{name}"),
                "must be a string, an integer or a boolean",
            );
        }
    }
    if methods.is_empty() {
        p.push(format!("routes[{i}].method"), "names no method");
    }
    for m in methods {
        if m != "*" && !METHODS.contains(&m) {
            p.push(
                format!("routes[{i}].method"),
                format!("`{m}` is not an HTTP method (use upper case, or `*` for any)"),
            );
        }
    }
    let params = match path_params(&route.path) {
        Ok(params) => params.into_iter().map(|(name, _)| name).collect(),
        Err(e) => {
            p.push(format!("routes[{i}].path"), e);
            Vec::new()
        }
    };
    match (&route.action, &route.mcp) {
        (Some(action), _) if action.is_empty() || action.contains('"') => p.push(
            format!("routes[{i}].action"),
            "must be a Cedar action id such as `ListIssues`",
        ),
        (None, None) => p.push(
            format!("routes[{i}].action"),
            "missing: every route but an MCP one names its Cedar action",
        ),
        // Each JSON-RPC method is the action there: a policy on this one
        // would never be asked.
        (Some(_), Some(_)) => p.push(
            format!("routes[{i}].action"),
            "an MCP route's actions are its JSON-RPC methods (`tools/call`, ...): leave `action` out",
        ),
        _ => {}
    }
    if let Some(mcp) = &route.mcp {
        if !is_cedar_path(&mcp.tool_type) {
            p.push(
                format!("routes[{i}].mcp.tool_type"),
                format!("`{}` is not a Cedar entity type name", mcp.tool_type),
            );
        }
        if mcp.max_body_bytes == 0 || mcp.max_body_bytes > 65_536 {
            p.push(
                format!("routes[{i}].mcp.max_body_bytes"),
                "must be between 1 and 65536 (Tether holds the body to replay it upstream)",
            );
        }
    }
    if !is_cedar_path(&route.resource.entity_type) {
        p.push(
            format!("routes[{i}].resource.type"),
            format!(
                "`{}` is not a Cedar entity type name",
                route.resource.entity_type
            ),
        );
    }
    match template_params(&format!("/{}", route.resource.id)) {
        Ok(used) => {
            for (name, _) in used {
                if !params.contains(&name) {
                    p.push(
                        format!("routes[{i}].resource.id"),
                        format!("`{{{name}}}` is not a parameter of path `{}`", route.path),
                    );
                }
            }
        }
        Err(e) => p.push(format!("routes[{i}].resource.id"), e),
    }
}

/// What a path parameter accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    /// Any segment.
    Str,
    /// Decimal digits.
    Int,
    /// A UUID, `8-4-4-4-12` hex digits.
    Uuid,
}

impl ParamType {
    /// Whether `segment` is of this type.
    pub fn accepts(self, segment: &str) -> bool {
        match self {
            ParamType::Str => !segment.is_empty(),
            ParamType::Int => !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()),
            ParamType::Uuid => {
                let groups: Vec<&str> = segment.split('-').collect();
                groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
                    && groups
                        .iter()
                        .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
            }
        }
    }
}

/// The parameters of a route's path template, in order: as
/// [`template_params`], and each parameter a whole path segment. A request
/// segment is one value; `/v1/compare/{base}...{head}` would ask one
/// segment for two, which routing cannot give.
pub fn path_params(template: &str) -> Result<Vec<(String, ParamType)>, String> {
    let params = template_params(template)?;
    for segment in template.split('/') {
        let braces = segment.bytes().filter(|b| matches!(b, b'{' | b'}')).count();
        let whole = segment.starts_with('{') && segment.ends_with('}') && braces == 2;
        if braces > 0 && !whole {
            return Err(format!(
                "`{template}`: `{segment}` is not a whole-segment parameter (one `{{name}}` per path segment)"
            ));
        }
    }
    Ok(params)
}

/// The `{name}` or `{name:type}` parameters of a template, in order;
/// names are identifiers. A route's path takes them only as whole
/// segments: see [`path_params`].
pub fn template_params(template: &str) -> Result<Vec<(String, ParamType)>, String> {
    if !template.starts_with('/') {
        return Err(format!("`{template}` must start with `/`"));
    }
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            return Err(format!("`{template}` has a `{{` with no closing `}}`"));
        };
        let spec = &rest[open + 1..open + close];
        let (name, kind) = match spec.split_once(':') {
            None | Some((_, "str")) => (spec.split(':').next().unwrap_or(spec), ParamType::Str),
            Some((name, "int")) => (name, ParamType::Int),
            Some((name, "uuid")) => (name, ParamType::Uuid),
            Some((_, other)) => {
                return Err(format!(
                "`{{{spec}}}` in `{template}`: unknown type `{other}` (use `str`, `int` or `uuid`)"
            ))
            }
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "`{{{name}}}` in `{template}` is not a parameter name (letters, digits, `_`)"
            ));
        }
        if names.iter().any(|(n, _)| n == name) {
            return Err(format!(
                "parameter `{{{name}}}` appears twice in `{template}`"
            ));
        }
        names.push((name.to_string(), kind));
        rest = &rest[open + close + 1..];
    }
    if rest.contains('}') {
        return Err(format!("`{template}` has a `}}` with no opening `{{`"));
    }
    Ok(names)
}

fn is_cedar_ident(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_cedar_path(s: &str) -> bool {
    !s.is_empty() && s.split("::").all(is_cedar_ident)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwks_urls_are_https_or_loopback_http() {
        for ok in [
            "https://login.example.org/jwks.json",
            "http://127.0.0.1:8081/keys",
            "http://localhost/keys",
            "http://[::1]:80/keys",
            "http://127.9.9.9",
        ] {
            assert_eq!(check_jwks_url(ok), Ok(()), "{ok}");
        }
        for refused in [
            "http://login.example.org/jwks.json",
            "http://10.0.0.1/keys",
            // The host is what follows userinfo, not what precedes it.
            "http://127.0.0.1@evil.example/keys",
            "http://localhost.evil.example/keys",
            "ftp://127.0.0.1/keys",
            "login.example.org/jwks.json",
        ] {
            assert!(check_jwks_url(refused).is_err(), "{refused}");
        }
    }
}
