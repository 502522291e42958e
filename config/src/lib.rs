//! Tether's configuration: one YAML file, typed with serde.
//!
//! Loading is three steps, each of which reports *where* a problem is:
//! 1. parse ([`Config::from_yaml`]): syntax errors, unknown fields and type
//!    errors come back with the field path and the line and column;
//! 2. resolve: relative file paths are made relative to the config file;
//! 3. validate ([`Config::validate`]): every semantic problem found, not just
//!    the first, each with its field path (and a line when it can be located).
//!
//! Defaults live in one place: the `Default` impls and `default_*` functions
//! in this file. The JSON schema in `deploy/config.schema.json` is generated
//! from these types (`tether schema`) and a test keeps it in sync.

mod locate;
mod registry;
pub mod spiffe;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use registry::{AgentSpec, AgentState, Expiry, RegistryFile};
pub use validate::{template_params, ParamType};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where agents connect: the mTLS listener.
    pub listener: Listener,
    /// SPIFFE trust domains whose X.509-SVIDs are accepted, one bundle each.
    pub trust_domains: Vec<TrustDomain>,
    /// The loopback admin listener: health, readiness and metrics.
    #[serde(default)]
    pub admin: Admin,
    /// The API that allowed requests are forwarded to.
    pub upstream: Upstream,
    /// The registered agents and their human owners.
    pub registry: Registry,
    /// The Cedar schema and policies.
    pub policy: Policy,
    /// Method + path templates mapped to Cedar actions and resources.
    pub routes: Vec<Route>,
    /// The decision cache.
    #[serde(default)]
    pub cache: Cache,
    /// OpenTelemetry trace export.
    #[serde(default)]
    pub telemetry: Telemetry,
    /// The audit log: one JSON line per request.
    #[serde(default)]
    pub audit: Audit,
    /// Process settings.
    #[serde(default)]
    pub server: Server,
    /// Hot reload of policies, schema, registry, routes and trust bundles.
    #[serde(default)]
    pub reload: Reload,
}

/// Hot reload. What reloads: `routes`, `registry`, `policy` and the files
/// they name, and the `trust_domains` bundles. Changes to other sections
/// are reported and take effect at the next restart.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Reload {
    /// Poll the files for changes (a Kubernetes ConfigMap or Secret update
    /// swaps a symlink; polling sees it). `POST /reload` on the admin
    /// listener works either way.
    pub watch: bool,
    /// How often to look for changes, in milliseconds.
    pub poll_interval_ms: u64,
}

impl Default for Reload {
    fn default() -> Self {
        Reload {
            watch: true,
            poll_interval_ms: 1000,
        }
    }
}

/// The agent-facing listener.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// `host:port` to listen on, e.g. `0.0.0.0:8443`.
    pub address: String,
    /// The server certificate chain and key, PEM files.
    pub tls: ServerTls,
}

/// A certificate chain and its private key, as PEM files.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// One SPIFFE trust domain and the CA bundle that vouches for it.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrustDomain {
    /// The trust domain name, e.g. `example.org` (no scheme, no path).
    pub name: String,
    /// PEM file with the trust domain's X.509 authorities. Only certificates
    /// whose SPIFFE ID is in this trust domain are verified against it.
    pub bundle: PathBuf,
}

/// The admin listener. It serves health and metrics and must not be
/// reachable by agents, so it binds to loopback unless told otherwise.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// `host:port` of the admin listener.
    pub address: String,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            address: "127.0.0.1:9901".into(),
        }
    }
}

/// The protected API.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// `host:port` of the API.
    pub address: String,
    /// Connect to the API over TLS. Absent: plain HTTP (for an API on the
    /// same pod or node).
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
}

/// TLS towards the upstream.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// The name the upstream's certificate must carry (SNI and verification).
    pub server_name: String,
    /// PEM bundle of CAs trusted for the upstream. Absent: the system roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

/// Where the registered agents come from.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// A separate YAML file with an `agents:` list (e.g. a ConfigMap key).
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Agents declared inline. Used together with `file`, if both are set.
    #[serde(default)]
    pub agents: Vec<AgentSpec>,
}

/// The Cedar schema and policies.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// A `.cedarschema` file. Policies are validated strictly against it.
    pub schema: PathBuf,
    /// A folder of `.cedar` files (read in name order), or a single file.
    pub policies: PathBuf,
    /// Shadow policies (a folder or a file): evaluated beside the enforced
    /// ones on live traffic, recorded in audit lines, spans and
    /// `tether_shadow_disagreements_total`, never enforced. Try a change
    /// here before moving it to `policies`.
    #[serde(default)]
    pub shadow: Option<PathBuf>,
    /// Cedar namespace of the principal, action and resource types, e.g.
    /// `Api` for `Api::Agent`. Empty: no namespace.
    #[serde(default)]
    pub namespace: String,
}

/// One value or a list of them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One value.
    One(String),
    /// Several values.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The values.
    pub fn values(&self) -> Vec<&str> {
        match self {
            OneOrMany::One(v) => vec![v.as_str()],
            OneOrMany::Many(vs) => vs.iter().map(String::as_str).collect(),
        }
    }
}

/// One route: which requests it matches and what Cedar sees for them.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Method(s) matched, e.g. `GET` or `[GET, HEAD]`; `*` matches any.
    pub method: OneOrMany,
    /// Host(s) matched against the request's `Host` (port ignored): a name
    /// like `api.example.org`, or `*.example.org` for any subdomain.
    /// Absent: any host.
    #[serde(default)]
    pub host: Option<OneOrMany>,
    /// Path template matched against the normalized path, e.g.
    /// `/v1/repos/{repo}/issues`. A parameter matches one whole segment;
    /// a type constrains it: `{id:int}` (digits), `{id:uuid}`, `{name:str}`
    /// (the default).
    pub path: String,
    /// The Cedar action id, e.g. `ListIssues` for `Action::"ListIssues"`.
    /// Required, except on MCP routes, where the JSON-RPC method is the
    /// action.
    #[serde(default)]
    pub action: Option<String>,
    /// The Cedar resource the request acts on (on MCP routes: what methods
    /// other than `tools/call` act on).
    pub resource: ResourceSpec,
    /// Marks an MCP endpoint (JSON-RPC 2.0 over HTTP): the body is read
    /// and each call authorized by its method and tool.
    #[serde(default)]
    pub mcp: Option<McpSpec>,
}

/// An MCP endpoint.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct McpSpec {
    /// The Cedar entity type of tools: `tools/call` of `create_issue` acts
    /// on `<tool_type>::"create_issue"`.
    #[serde(default = "default_tool_type")]
    pub tool_type: String,
    /// Largest request body accepted, at most 65536.
    #[serde(default = "default_mcp_body")]
    pub max_body_bytes: usize,
}

fn default_tool_type() -> String {
    "Tool".into()
}

fn default_mcp_body() -> usize {
    65_536
}

/// A Cedar resource built from a route match.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourceSpec {
    /// The entity type, e.g. `Repo`.
    #[serde(rename = "type")]
    pub entity_type: String,
    /// The entity id: a literal, or a template over the path parameters such
    /// as `{repo}` or `{owner}/{repo}`.
    pub id: String,
    /// Attributes of the resource, given to policy (`resource.visibility`):
    /// strings, integers or booleans, checked against the schema at load.
    #[serde(default)]
    pub attributes: std::collections::BTreeMap<String, serde_json::Value>,
}

/// The decision cache.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Cache {
    /// The most decisions held at once.
    pub max_entries: u64,
    /// How long a decision is kept, in seconds. Reloads invalidate at once
    /// whatever this says.
    pub ttl_seconds: u64,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            max_entries: 100_000,
            ttl_seconds: 300,
        }
    }
}

/// OpenTelemetry.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Telemetry {
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// OTLP trace export. Absent: no spans are exported.
    pub otlp: Option<Otlp>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            service_name: "tether".into(),
            otlp: None,
        }
    }
}

/// An OTLP collector.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Otlp {
    /// Collector URL: `http://host:4317` for gRPC, `http://host:4318` for
    /// HTTP (the `/v1/traces` path is added when missing). Plain HTTP only:
    /// point it at a node-local collector.
    pub endpoint: String,
    /// Transport.
    #[serde(default)]
    pub protocol: OtlpProtocol,
    /// Spans held for export at most; past this, spans are dropped (and
    /// counted), never requests delayed.
    #[serde(default = "default_otlp_queue")]
    pub max_queue: usize,
    /// How often queued spans are sent, in milliseconds.
    #[serde(default = "default_otlp_flush_ms")]
    pub flush_interval_ms: u64,
}

fn default_otlp_queue() -> usize {
    4096
}

fn default_otlp_flush_ms() -> u64 {
    1000
}

/// OTLP transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OtlpProtocol {
    /// OTLP/gRPC.
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies.
    HttpProtobuf,
}

/// The audit log.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Audit {
    /// `stdout`, `stderr`, or a file path (appended to).
    pub output: String,
    /// Audit lines held for writing at most; past this, lines are dropped
    /// and counted in `tether_audit_dropped_total`.
    pub max_queue: usize,
}

impl Default for Audit {
    fn default() -> Self {
        Audit {
            output: "stdout".into(),
            max_queue: 65_536,
        }
    }
}

/// Process settings.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// Worker threads of the proxy. One is fastest on a small sidecar.
    pub threads: usize,
    /// Seconds to keep serving open connections after SIGTERM.
    pub grace_period_seconds: u64,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            threads: 1,
            grace_period_seconds: 5,
        }
    }
}

/// A problem in a configuration file, located as well as we can.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line and column, when known.
    pub position: Option<(usize, usize)>,
    /// The field path, e.g. `routes[2].action`; empty for the whole file.
    pub field: String,
    /// What is wrong, lowercase, user input in backticks.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found while loading, so an operator fixes them in one go.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Reads, parses, resolves and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = read_file(path).map_err(|e| ConfigErrors(vec![e]))?;
        let mut config = Config::from_yaml(&text, path).map_err(|e| ConfigErrors(vec![e]))?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        let mut errors = locate_all(config.validate(), path, &text);
        // Agents from a separate registry file are part of the config: load
        // them here so that `check` and `run` see the same agents.
        if let Some(file) = config.registry.file.clone() {
            match RegistryFile::load(&file) {
                Ok((registry, registry_text)) => {
                    let problems = validate::agents(&registry.agents, &config, &file, "agents");
                    errors.extend(locate_all(problems, &file, &registry_text));
                    config.registry.agents.extend(registry.agents);
                }
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Parses YAML text. Unknown fields and type errors are refused with
    /// the field path and position; `file` only labels the error.
    pub fn from_yaml(text: &str, file: &Path) -> Result<Config, ConfigError> {
        parse_yaml(text, file)
    }

    /// Makes every relative file path relative to `base` (the folder of the
    /// config file), so a config works from whatever directory it is run.
    pub fn resolve_paths(&mut self, base: &Path) {
        let join = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        join(&mut self.listener.tls.cert);
        join(&mut self.listener.tls.key);
        for td in &mut self.trust_domains {
            join(&mut td.bundle);
        }
        if let Some(tls) = &mut self.upstream.tls {
            if let Some(ca) = &mut tls.ca {
                join(ca);
            }
        }
        if let Some(file) = &mut self.registry.file {
            join(file);
        }
        join(&mut self.policy.schema);
        join(&mut self.policy.policies);
        if let Some(shadow) = &mut self.policy.shadow {
            join(shadow);
        }
        if !matches!(self.audit.output.as_str(), "stdout" | "stderr") {
            let mut p = PathBuf::from(&self.audit.output);
            join(&mut p);
            self.audit.output = p.display().to_string();
        }
    }

    /// Checks everything that types alone cannot, returning every problem
    /// found, each with its field path. Files referenced here are checked
    /// for existence; their contents are checked by their own loaders.
    pub fn validate(&self) -> Vec<ConfigError> {
        validate::config(self)
    }

    /// The config as YAML (what `from_yaml` reads back).
    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).unwrap_or_default()
    }

    /// The JSON schema of the config file.
    pub fn json_schema() -> String {
        let schema = schemars::schema_for!(Config);
        serde_json::to_string_pretty(&schema).unwrap_or_default() + "\n"
    }
}

/// Parses YAML into `T`, naming the field path and position of any error.
pub(crate) fn parse_yaml<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &Path,
) -> Result<T, ConfigError> {
    let de = serde_norway::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = match e.path().to_string() {
            p if p == "." => String::new(),
            p => p,
        };
        let inner = e.into_inner();
        let position = inner.location().map(|l| (l.line(), l.column()));
        // serde_norway appends " at line X column Y"; we print the position
        // ourselves, in the `file:line:col` form editors understand.
        let mut message = inner.to_string();
        if let Some(at) = message.find(" at line ") {
            message.truncate(at);
        }
        // serde_norway starts nested messages with the path of the node it
        // was reading (`routes[2]: unknown field ...`): that is the field
        // to name, and the message need not repeat it.
        let mut field = field;
        if let Some((head, rest)) = message.split_once(": ") {
            if !head.contains(' ') && field.starts_with(head) {
                field = head.to_string();
                message = rest.to_string();
            }
        }
        ConfigError {
            file: file.to_path_buf(),
            position,
            field,
            message,
        }
    })
}

/// Labels errors with `file` and the position of their field in `text`.
fn locate_all(mut errors: Vec<ConfigError>, file: &Path, text: &str) -> Vec<ConfigError> {
    for e in &mut errors {
        e.file = file.to_path_buf();
        if e.position.is_none() {
            e.position = locate::position(text, &e.field);
        }
    }
    errors
}

pub(crate) fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        position: None,
        field: String::new(),
        message: format!("cannot read file: {e}"),
    })
}

#[cfg(test)]
mod tests;
