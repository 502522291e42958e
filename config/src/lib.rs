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
pub use validate::{path_params, template_params, ParamType};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Which side of the wire Tether stands on.
    #[serde(default)]
    pub mode: Mode,
    /// Where agents connect.
    pub listener: Listener,
    /// SPIFFE trust domains whose X.509-SVIDs are accepted, one bundle each.
    #[serde(default)]
    pub trust_domains: Vec<TrustDomain>,
    /// Bearer tokens accepted as identities: JWT-SVIDs, Kubernetes
    /// service-account tokens, OIDC and token-exchange tokens.
    #[serde(default)]
    pub tokens: Tokens,
    /// Egress mode: the pod's own X.509-SVID. It is the principal of every
    /// request and the client certificate Tether presents upstream.
    #[serde(default)]
    pub workload: Option<Workload>,
    /// The loopback admin listener: health, readiness and metrics.
    #[serde(default)]
    pub admin: Admin,
    /// The API that allowed requests are forwarded to (one upstream).
    #[serde(default)]
    pub upstream: Option<Upstream>,
    /// Several upstreams, chosen by host or path prefix, first match wins.
    /// Use either this or `upstream`.
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    /// The registered agents and their human owners.
    pub registry: Registry,
    /// The Cedar schema and policies.
    pub policy: Policy,
    /// Method + path templates mapped to Cedar actions and resources.
    pub routes: Vec<Route>,
    /// How request paths are read, to read them as the upstream does;
    /// reloads with `routes`.
    #[serde(default)]
    pub paths: Paths,
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

/// Hot reload. What reloads: `routes`, `paths`, `registry`, `policy` and
/// the files they name, the `trust_domains` bundles, `tokens` (issuers,
/// their JWKS files, URLs and CA files), and the listener's and the
/// workload's certificates (rotation). Changes to other sections are
/// reported and take effect at the next restart.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Reload {
    /// Poll the files for changes (a Kubernetes ConfigMap or Secret update
    /// swaps a symlink; polling sees it). `POST /reload` on the admin
    /// listener works either way.
    pub watch: bool,
    /// How often to look for changes, in milliseconds.
    #[schemars(range(min = 50))]
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

/// How request paths are read. Routing and policy must read a path as
/// the upstream will, or a request is decided as one path and served as
/// another.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Paths {
    /// What an encoded slash (`%2F`) inside a path segment means.
    pub encoded_slash: EncodedSlash,
    /// Whether route literals match the request's path whatever its case.
    pub case: PathCase,
}

/// What an encoded slash (`%2F`) in a request path means. Servers differ:
/// some keep it inside the segment, some decode it before routing, so a
/// path that holds one can be decided as one resource and served as
/// another.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EncodedSlash {
    /// Refuse the request (`bad_path`).
    #[default]
    Reject,
    /// A character inside its segment: `/v1/repos/a%2Fb` is one repository
    /// `a/b`, and is forwarded as sent.
    Keep,
    /// A separator: `%2F` becomes `/` before dot segments are removed and
    /// routes matched, and the decoded path is what is forwarded.
    Decode,
}

/// Which side of the wire Tether stands on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// In front of an API: agents connect over mTLS (or with tokens).
    #[default]
    Ingress,
    /// Beside an agent pod: the agent speaks plain HTTP to Tether on
    /// loopback, the principal is the pod's own SVID (`workload`), and
    /// Tether originates mTLS to the upstreams.
    Egress,
}

/// The agent-facing listener.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// `host:port` to listen on, e.g. `0.0.0.0:8443`.
    pub address: String,
    /// The server certificate chain and key, PEM files; reloaded when they
    /// change. Absent (egress mode only): plain HTTP on a loopback address.
    #[serde(default)]
    pub tls: Option<ServerTls>,
    /// Whether a client certificate is required. `optional` lets agents
    /// that carry only a bearer token connect; a request with neither is
    /// still refused (`no_identity`).
    #[serde(default)]
    pub client_auth: ClientAuth,
}

/// Client certificates on the listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// Every connection presents an X.509-SVID.
    #[default]
    Required,
    /// An SVID is verified when presented; a bearer token may stand alone.
    Optional,
}

/// The pod's own X.509-SVID, as files (the SPIFFE helper or the
/// cert-manager CSI driver keep them fresh; Tether reloads them when they
/// change).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// PEM certificate chain, leaf first: the X.509-SVID.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
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

/// The admin listener: health, metrics and reload, without credentials.
/// It binds to loopback unless told otherwise (`tether check` warns when
/// it is not); in egress mode the pod's agent shares that loopback.
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
    /// A name for records and errors (in `upstreams`).
    #[serde(default)]
    pub name: Option<String>,
    /// In `upstreams`: the request hosts (port ignored) sent here, exact or
    /// `*.domain`. Absent: any host.
    #[serde(default)]
    pub hosts: Option<OneOrMany>,
    /// In `upstreams`: the normalized path prefix sent here, e.g.
    /// `/github/`. Absent: any path.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// `host:port` of the API.
    pub address: String,
    /// Connect to the API over TLS. Absent: plain HTTP (for an API on the
    /// same pod or node).
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
    /// `reject`: refuse requests for this upstream whose path held an
    /// encoded slash, whatever `paths.encoded_slash` lets through (for a
    /// back end that decodes `%2F` before routing). Only `reject`, or the
    /// global value, can be set: paths are normalized before the upstream
    /// is chosen.
    #[serde(default)]
    pub encoded_slash: Option<EncodedSlash>,
}

/// TLS towards the upstream.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// The name sent as SNI, which the upstream's certificate must carry
    /// unless it is authorized by SPIFFE ID (`spiffe_id`, `trust_domain`).
    pub server_name: String,
    /// PEM bundle of CAs trusted for the upstream. Absent: the system roots.
    /// Not with `spiffe_id` or `trust_domain`, which verify by the bundle
    /// of `trust_domains[]`.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The SPIFFE ID, or IDs, the upstream's X.509-SVID must carry, e.g.
    /// `spiffe://example.org/ns/apis/sa/github`: its leaf must chain to the
    /// bundle of the ID's trust domain in `trust_domains`, and its URI SAN
    /// be one of these. Anything else fails the request.
    #[serde(default)]
    pub spiffe_id: Option<OneOrMany>,
    /// Any SPIFFE ID of this trust domain, verified against its bundle in
    /// `trust_domains`: for an API served by many workloads of one domain.
    /// Not with `spiffe_id`.
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// Present the workload's X.509-SVID (`workload`) as the client
    /// certificate: mTLS from the pod to the API.
    #[serde(default)]
    pub client_certificate: bool,
}

/// Bearer-token identities.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Tokens {
    /// The issuers whose tokens are accepted; a token's `iss` picks one,
    /// exactly.
    pub issuers: Vec<TokenIssuer>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`, in seconds.
    pub leeway_seconds: u64,
    /// The longest lifetime (`exp - iat`) accepted, in seconds. Long-lived
    /// tokens are refused (`token_lifetime`): credentials are short-lived.
    #[schemars(range(min = 1, max = 604_800))]
    pub max_lifetime_seconds: u64,
    /// The largest token accepted, in bytes.
    pub max_token_bytes: usize,
    /// The largest decoded JOSE header accepted, in bytes.
    pub max_header_bytes: usize,
    /// The most agents in a delegation chain (`act` claims, RFC 8693).
    pub max_delegation_depth: usize,
}

impl Default for Tokens {
    fn default() -> Self {
        Tokens {
            issuers: Vec::new(),
            leeway_seconds: 30,
            max_lifetime_seconds: 3600,
            max_token_bytes: 8192,
            max_header_bytes: 1024,
            max_delegation_depth: 3,
        }
    }
}

/// One token issuer.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenIssuer {
    /// What kind of tokens it issues.
    pub kind: TokenKind,
    /// The exact `iss` of its tokens.
    pub issuer: String,
    /// Accepted audiences: a token's `aud` must name one of them.
    pub audiences: Vec<String>,
    /// Where its signing keys come from.
    pub jwks: JwksSource,
    /// Signature algorithms accepted. Asymmetric only: `none` and HMAC
    /// are not algorithms Tether knows.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<JwtAlgorithm>,
    /// The claim that names the agent (when the token carries no `act`
    /// delegation). Default: `sub`.
    #[serde(default = "default_agent_claim")]
    pub agent_claim: String,
    /// `jwt_svid`: the trust domain its SPIFFE IDs must be in.
    /// `kubernetes`: the trust domain service accounts map into,
    /// `system:serviceaccount:NS:SA` becoming `spiffe://TD/ns/NS/sa/SA`.
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// `oidc`: claim values that are not SPIFFE IDs become agent ids by
    /// appending them to this prefix, e.g. `spiffe://example.org/oidc/`.
    #[serde(default)]
    pub agent_prefix: Option<String>,
}

fn default_algorithms() -> Vec<JwtAlgorithm> {
    vec![JwtAlgorithm::RS256, JwtAlgorithm::ES256]
}

fn default_agent_claim() -> String {
    "sub".into()
}

/// Kinds of bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TokenKind {
    /// A SPIFFE JWT-SVID: `sub` is the workload's SPIFFE ID.
    JwtSvid,
    /// A projected Kubernetes service-account token.
    Kubernetes,
    /// An OpenID Connect or RFC 8693 token-exchange token.
    Oidc,
}

impl TokenKind {
    /// The name policy and records use.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::JwtSvid => "jwt_svid",
            TokenKind::Kubernetes => "kubernetes",
            TokenKind::Oidc => "oidc",
        }
    }
}

/// Asymmetric JWS algorithms (RFC 7518, RFC 8037).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[allow(clippy::upper_case_acronyms)]
pub enum JwtAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// RSASSA-PSS with SHA-384.
    PS384,
    /// RSASSA-PSS with SHA-512.
    PS512,
    /// ECDSA P-256 with SHA-256.
    ES256,
    /// ECDSA P-384 with SHA-384.
    ES384,
    /// Ed25519.
    EdDSA,
}

impl JwtAlgorithm {
    /// Every algorithm.
    pub const ALL: [JwtAlgorithm; 9] = [
        JwtAlgorithm::RS256,
        JwtAlgorithm::RS384,
        JwtAlgorithm::RS512,
        JwtAlgorithm::PS256,
        JwtAlgorithm::PS384,
        JwtAlgorithm::PS512,
        JwtAlgorithm::ES256,
        JwtAlgorithm::ES384,
        JwtAlgorithm::EdDSA,
    ];

    /// The JOSE `alg` name.
    pub fn as_str(self) -> &'static str {
        match self {
            JwtAlgorithm::RS256 => "RS256",
            JwtAlgorithm::RS384 => "RS384",
            JwtAlgorithm::RS512 => "RS512",
            JwtAlgorithm::PS256 => "PS256",
            JwtAlgorithm::PS384 => "PS384",
            JwtAlgorithm::PS512 => "PS512",
            JwtAlgorithm::ES256 => "ES256",
            JwtAlgorithm::ES384 => "ES384",
            JwtAlgorithm::EdDSA => "EdDSA",
        }
    }

    /// The algorithm a JOSE `alg` names, if Tether accepts it at all.
    pub fn from_name(name: &str) -> Option<JwtAlgorithm> {
        JwtAlgorithm::ALL.into_iter().find(|a| a.as_str() == name)
    }
}

/// Where an issuer's public keys come from: a JWKS file or URL.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwksSource {
    /// A JWKS file (e.g. a SPIRE bundle mounted from a ConfigMap); reloaded
    /// when it changes.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// A JWKS URL (`https://` or `http://`), fetched in the background.
    #[serde(default)]
    pub url: Option<String>,
    /// URL: PEM CAs trusted for an `https://` URL. Absent: the system
    /// roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// URL: how often the key set is fetched, in seconds.
    #[serde(default = "default_jwks_refresh")]
    pub refresh_seconds: u64,
    /// URL: how long a fetched key set stays usable when fetches fail, in
    /// seconds. Past this, tokens of this issuer are refused
    /// (`token_keys_unavailable`) until a fetch succeeds.
    #[serde(default = "default_jwks_max_age")]
    pub max_age_seconds: u64,
    /// URL: the least time between fetches caused by an unknown `kid`, in
    /// milliseconds; doubles after each failed fetch (up to a minute).
    #[serde(default = "default_jwks_cooldown")]
    #[schemars(range(min = 1000))]
    pub min_refetch_interval_ms: u64,
}

fn default_jwks_refresh() -> u64 {
    300
}

fn default_jwks_max_age() -> u64 {
    3600
}

fn default_jwks_cooldown() -> u64 {
    5000
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
    #[schemars(range(min = 1, max = 65536))]
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
    #[serde(default, deserialize_with = "unique_keys")]
    pub attributes: std::collections::BTreeMap<String, serde_json::Value>,
}

/// A map that refuses a key written twice, where YAML would silently keep
/// the last (`{public: 'yes', public: 'no'}`).
fn unique_keys<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<std::collections::BTreeMap<String, serde_json::Value>, D::Error> {
    struct Unique;
    impl<'de> serde::de::Visitor<'de> for Unique {
        type Value = std::collections::BTreeMap<String, serde_json::Value>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map of attributes")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Self::Value::new();
            while let Some((key, value)) = map.next_entry::<String, serde_json::Value>()? {
                if out.contains_key(&key) {
                    return Err(serde::de::Error::custom(format!("`{key}` appears twice")));
                }
                out.insert(key, value);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Unique)
}

/// How route literals compare with a request's path segments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PathCase {
    /// Exactly: `/V1/ADMIN` is not `/v1/admin`, as most servers route.
    #[default]
    Sensitive,
    /// Ignoring case (Unicode simple case folding), for upstreams that
    /// route so (ASP.NET, IIS): `/V1/ADMIN` is decided as `/v1/admin`.
    /// Parameters keep their case, and the path is forwarded as sent.
    Insensitive,
}

/// The decision cache.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Cache {
    /// The most decisions held at once.
    #[schemars(range(min = 1))]
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
    #[schemars(range(min = 10))]
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
    #[serde(deserialize_with = "registry::not_null")]
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
    #[schemars(range(min = 1))]
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
        if let Some(tls) = &mut self.listener.tls {
            join(&mut tls.cert);
            join(&mut tls.key);
        }
        for td in &mut self.trust_domains {
            join(&mut td.bundle);
        }
        for issuer in &mut self.tokens.issuers {
            for p in [&mut issuer.jwks.file, &mut issuer.jwks.ca]
                .into_iter()
                .flatten()
            {
                join(p);
            }
        }
        if let Some(workload) = &mut self.workload {
            join(&mut workload.cert);
            join(&mut workload.key);
        }
        for upstream in self.upstream.iter_mut().chain(&mut self.upstreams) {
            if let Some(ca) = upstream.tls.as_mut().and_then(|t| t.ca.as_mut()) {
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

    /// Every upstream: `upstream`, or the `upstreams` list, in match order.
    pub fn all_upstreams(&self) -> impl Iterator<Item = &Upstream> {
        self.upstream.iter().chain(&self.upstreams)
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

/// The longest `tokens.max_lifetime_seconds` may be: a week.
pub const MAX_TOKEN_LIFETIME_SECONDS: u64 = 7 * 24 * 3600;
