//! Semantic checks: everything serde's types cannot say. Every check pushes
//! a located error and carries on, so one run reports every problem.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

use crate::spiffe::{check_trust_domain, SpiffeId};
use crate::{AgentSpec, Config, ConfigError};

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
    p.file_exists("listener.tls.cert", &c.listener.tls.cert);
    p.file_exists("listener.tls.key", &c.listener.tls.key);
    p.address("admin.address", &c.admin.address);
    p.address("upstream.address", &c.upstream.address);
    if let Some(tls) = &c.upstream.tls {
        if tls.server_name.is_empty() {
            p.push("upstream.tls.server_name", "must not be empty");
        }
        if let Some(ca) = &tls.ca {
            p.file_exists("upstream.tls.ca", ca);
        }
    }

    if c.trust_domains.is_empty() {
        p.push(
            "trust_domains",
            "at least one trust domain is needed to verify agents",
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
    let domains: HashSet<&str> = c.trust_domains.iter().map(|t| t.name.as_str()).collect();
    let mut seen = HashSet::new();
    for (i, agent) in agents.iter().enumerate() {
        let at = |f: &str| format!("{prefix}[{i}].{f}");
        match SpiffeId::parse(&agent.id) {
            Ok(id) if !domains.contains(id.trust_domain()) => p.push(
                at("id"),
                format!(
                    "trust domain `{}` is not in `trust_domains`, so `{}` could never connect",
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

fn check_route(p: &mut Problems<'_>, i: usize, route: &crate::Route) {
    let methods = route.method.values();
    for host in route.host.iter().flat_map(|h| h.values()) {
        let name = host.strip_prefix("*.").unwrap_or(host);
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            p.push(
                format!("routes[{i}].host"),
                format!("`{host}` is not a host name (or `*.` and one)"),
            );
        }
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
    let params = match template_params(&route.path) {
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

/// The `{name}` or `{name:type}` parameters of a template, in order. A
/// parameter must be a whole path segment in a path template; names are
/// identifiers.
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
