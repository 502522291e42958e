//! What the request does, in Cedar's terms: method and normalized path
//! matched against route templates give an action and a resource.

use std::borrow::Cow;
use std::sync::Arc;

use cedar_policy::{EntityId, EntityTypeName, EntityUid};
use pingora_http::RequestHeader;
use smallvec::SmallVec;
use smol_str::{SmolStr, SmolStrBuilder, StrExt as _};
use std::collections::HashMap;

use cedar_policy::RestrictedExpression;
use tether_config::{ParamType, Route};

use crate::mcp::McpRoute;
use crate::{Denial, Filter, Reason, RequestCtx};

enum Segment {
    Literal(String),
    Param(ParamType),
}

/// A host a route (or an upstream) matches.
pub enum HostPattern {
    /// One name.
    Exact(String),
    /// `*.example.org`: any name ending in `.example.org`.
    Subdomain(String),
}

impl HostPattern {
    /// `*.domain` or a name; case does not matter.
    pub fn new(pattern: &str) -> HostPattern {
        match pattern.strip_prefix('*') {
            Some(suffix) => HostPattern::Subdomain(suffix.to_ascii_lowercase()),
            None => HostPattern::Exact(pattern.to_ascii_lowercase()),
        }
    }

    /// Whether some host matches both patterns.
    fn overlaps(&self, other: &HostPattern) -> bool {
        match (self, other) {
            (HostPattern::Exact(a), HostPattern::Exact(b)) => a == b,
            (HostPattern::Exact(host), pattern) | (pattern, HostPattern::Exact(host)) => {
                pattern.matches(host)
            }
            (HostPattern::Subdomain(a), HostPattern::Subdomain(b)) => {
                a.ends_with(b.as_str()) || b.ends_with(a.as_str())
            }
        }
    }

    /// Whether `host` (lower case, no port, as [`request_host`] gives it)
    /// matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Subdomain(suffix) => {
                host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
        }
    }
}

/// The host a request names, lower case, without the port.
pub fn request_host(req: &RequestHeader) -> Option<SmolStr> {
    let raw = req
        .headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri.host())?;
    let host = match raw.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => raw.rsplit_once(':').map_or(raw, |(h, _)| h),
    };
    // `api.example.org.` is the same name, fully qualified.
    let host = host.strip_suffix('.').unwrap_or(host);
    Some(host.to_ascii_lowercase_smolstr())
}

enum IdPart {
    Literal(String),
    /// Index of the path parameter, in template order.
    Param(usize),
}

/// A route, compiled for matching.
pub struct CompiledRoute {
    /// The path template, for records (`http.route`).
    pub template: Arc<str>,
    /// The Cedar action id, e.g. `ListIssues`.
    pub action: Arc<str>,
    /// The Cedar action.
    pub action_uid: EntityUid,
    /// The Cedar resource type.
    pub resource_type: EntityTypeName,
    /// Set on MCP routes.
    pub mcp: Option<McpRoute>,
    /// The MCP route whose server answers this route's requests: the
    /// route itself, or the first MCP route that may take requests for
    /// the same path with another method (the `GET` of a Streamable HTTP
    /// server's stream, a `DELETE` ending a session). Answers on such a
    /// route are filtered as MCP answers are, against that route's tools.
    pub mcp_endpoint: Option<usize>,
    /// The resource's attributes, from the route.
    pub resource_attributes: HashMap<String, RestrictedExpression>,
    /// `action_uid` as Cedar writes it, and the start of a resource's
    /// (`Type::"`) and of a tool's: written once here, so a request's
    /// record copies text instead of building and formatting entity ids.
    action_text: Arc<str>,
    resource_prefix: Box<str>,
    tool_prefix: Option<Box<str>>,
    hosts: Option<Vec<HostPattern>>,
    methods: Option<Vec<String>>,
    segments: Vec<Segment>,
    resource_id: Vec<IdPart>,
}

/// A matched route: which one, and the Cedar action and resource it
/// names. Both are held relative to the route (their types are the
/// route's), so a match is small: it is part of every decision's cache key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RouteMatch {
    /// Index of the route in the snapshot's table.
    pub index: usize,
    /// The Cedar action's id, of the route's action type: the route's own,
    /// or on an MCP route the JSON-RPC method.
    pub action: Arc<str>,
    /// The Cedar resource.
    pub resource: ResourceRef,
}

/// A Cedar resource, relative to its route.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResourceRef {
    /// An MCP tool (of the route's tool type), not the route's resource.
    pub tool: bool,
    /// The entity id; a path parameter's worth fits inline, unallocated.
    pub id: SmolStr,
}

impl CompiledRoute {
    /// Whether a request (of any method) could match both `self` and
    /// `other`: paths of as many segments, each one both may match, on a
    /// host both may match. Two parameters are taken to overlap whatever
    /// their types.
    fn may_share_requests(&self, other: &CompiledRoute) -> bool {
        let segments = self.segments.len() == other.segments.len()
            && self
                .segments
                .iter()
                .zip(&other.segments)
                .all(|pair| match pair {
                    (Segment::Literal(a), Segment::Literal(b)) => a == b,
                    (Segment::Literal(l), Segment::Param(p))
                    | (Segment::Param(p), Segment::Literal(l)) => p.accepts(l),
                    (Segment::Param(_), Segment::Param(_)) => true,
                });
        let hosts = match (&self.hosts, &other.hosts) {
            (Some(a), Some(b)) => a.iter().any(|a| b.iter().any(|b| a.overlaps(b))),
            _ => true,
        };
        segments && hosts
    }

    /// The Cedar action `m` names.
    pub fn action_uid(&self, m: &RouteMatch) -> EntityUid {
        if m.action == self.action {
            self.action_uid.clone()
        } else {
            EntityUid::from_type_name_and_id(
                self.action_uid.type_name().clone(),
                EntityId::new(&*m.action),
            )
        }
    }

    /// [`Self::action_uid`] as Cedar writes it (`Action::"ListIssues"`).
    pub fn action_text(&self, m: &RouteMatch) -> Cow<'_, str> {
        if m.action == self.action {
            Cow::Borrowed(&self.action_text)
        } else {
            Cow::Owned(self.action_uid(m).to_string())
        }
    }

    /// [`Self::resource_uid`] as Cedar writes it (`Repo::"tether"`).
    pub fn resource_text(&self, m: &RouteMatch) -> Option<String> {
        let prefix = if m.resource.tool {
            self.tool_prefix.as_deref()?
        } else {
            &self.resource_prefix
        };
        let id = &m.resource.id;
        let mut text = String::with_capacity(prefix.len() + id.len() + 1);
        text.push_str(prefix);
        // Escaped as Cedar's `Display` for an entity id escapes it
        // (`escape_debug`), which leaves printable ASCII but quotes and
        // backslash as it is: nearly every id, copied whole.
        let plain = id
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && !matches!(b, b'"' | b'\'' | b'\\'));
        if plain {
            text.push_str(id);
        } else {
            text.extend(id.escape_debug());
        }
        text.push('"');
        Some(text)
    }

    /// The type of the resource `m` names; `None` for a tool on a route
    /// that is not an MCP route.
    pub fn resource_type_of(&self, m: &RouteMatch) -> Option<&EntityTypeName> {
        if m.resource.tool {
            self.mcp.as_ref().map(|mcp| &mcp.tool_type)
        } else {
            Some(&self.resource_type)
        }
    }

    /// The Cedar resource `m` names; `None` as for [`Self::resource_type_of`].
    pub fn resource_uid(&self, m: &RouteMatch) -> Option<EntityUid> {
        let entity_type = self.resource_type_of(m)?.clone();
        Some(EntityUid::from_type_name_and_id(
            entity_type,
            EntityId::new(&m.resource.id),
        ))
    }
}

/// Every route, tried in order; the first match wins.
#[derive(Default)]
pub struct RouteTable {
    routes: Vec<CompiledRoute>,
    /// `path_case: insensitive`: literals match whatever the request's
    /// case, as an upstream that routes ignoring case (ASP.NET, IIS)
    /// matches them; otherwise `/V1/ADMIN` would miss the `/v1/admin`
    /// route Tether decides on and reach the admin handler all the same.
    ignore_case: bool,
}

impl RouteTable {
    /// Compiles validated routes. Types are resolved in `namespace`.
    pub fn new(routes: &[Route], namespace: &str) -> Result<RouteTable, (usize, String)> {
        let mut compiled = Vec::with_capacity(routes.len());
        for (i, r) in routes.iter().enumerate() {
            compiled.push(compile(r, namespace).map_err(|e| (i, e))?);
        }
        // Decided once here, so a request pays nothing to know it.
        let endpoints: Vec<Option<usize>> = compiled
            .iter()
            .enumerate()
            .map(|(i, r)| match r.mcp {
                Some(_) => Some(i),
                None => compiled
                    .iter()
                    .position(|m| m.mcp.is_some() && r.may_share_requests(m)),
            })
            .collect();
        for (route, endpoint) in compiled.iter_mut().zip(endpoints) {
            route.mcp_endpoint = endpoint;
        }
        Ok(RouteTable {
            routes: compiled,
            ignore_case: false,
        })
    }

    /// This table, matching path literals ignoring case (Unicode simple
    /// case folding, [`crate::fold`]) when `ignore_case`.
    pub fn ignoring_case(self, ignore_case: bool) -> RouteTable {
        RouteTable {
            ignore_case,
            ..self
        }
    }

    /// The route at `index`.
    pub fn get(&self, index: usize) -> Option<&CompiledRoute> {
        self.routes.get(index)
    }

    /// Every route, in match order.
    pub fn iter(&self) -> impl Iterator<Item = &CompiledRoute> {
        self.routes.iter()
    }

    /// The first route matching `method` and the normalized `path`, on
    /// any host.
    pub fn find(&self, method: &str, path: &str) -> Option<RouteMatch> {
        self.find_on(None, method, path)
    }

    /// The first route matching `host` (lower case, no port), `method` and
    /// the normalized `path`. A route with hosts never matches a request
    /// without one.
    pub fn find_on(&self, host: Option<&str>, method: &str, path: &str) -> Option<RouteMatch> {
        // Segments are matched decoded, as servers route: `documents%3Apurge`
        // must take the `documents:purge` route, not fall through to a
        // later `{collection}` one. A segment that is not text matches no
        // route. Paths rarely have more than a few segments.
        let mut segments: SmallVec<[Option<Cow<'_, str>>; 8]> = SmallVec::new();
        segments.extend(
            split_segments(path.strip_prefix('/').unwrap_or(path))
                .map(crate::sanitize::segment_value),
        );
        let mut params: SmallVec<[&str; 8]> = SmallVec::new();
        'routes: for (index, route) in self.routes.iter().enumerate() {
            if let Some(methods) = &route.methods {
                // Servers answer HEAD with their GET handler: a HEAD that
                // skipped the GET route could land on a later, looser one.
                let head_as_get = method == "HEAD" && methods.iter().any(|m| m == "GET");
                if !head_as_get && !methods.iter().any(|m| m == method) {
                    continue;
                }
            }
            if let Some(hosts) = &route.hosts {
                if !host.is_some_and(|h| hosts.iter().any(|p| p.matches(h))) {
                    continue;
                }
            }
            if route.segments.len() != segments.len() {
                continue;
            }
            params.clear();
            for (segment, value) in route.segments.iter().zip(&segments) {
                let Some(value) = value.as_deref() else {
                    continue 'routes;
                };
                match segment {
                    Segment::Literal(lit) if lit == value => {}
                    Segment::Literal(lit) if self.ignore_case && crate::fold::alike(lit, value) => {
                    }
                    Segment::Literal(_) => continue 'routes,
                    Segment::Param(kind) if !kind.accepts(value) => continue 'routes,
                    Segment::Param(_) => params.push(value),
                }
            }
            let mut resource_id = SmolStrBuilder::new();
            for part in &route.resource_id {
                match part {
                    IdPart::Literal(s) => resource_id.push_str(s),
                    // Decoded, as the upstream decodes it: `%40` and `@`
                    // name one resource.
                    IdPart::Param(i) => match params.get(*i) {
                        Some(value) => resource_id.push_str(value),
                        // Compiled routes name only their own parameters
                        // (`path_params`); were one ever not to, the
                        // request matches no route rather than stopping
                        // the proxy.
                        None => continue 'routes,
                    },
                }
            }
            return Some(RouteMatch {
                index,
                action: route.action.clone(),
                resource: ResourceRef {
                    tool: false,
                    id: resource_id.finish(),
                },
            });
        }
        None
    }
}

/// `path.split('/')`, scanning bytes: `str::split` on a `char` searches
/// with a call per segment, a hundred instructions each for segments of
/// a few bytes. A `/` is ASCII, so every piece is whole UTF-8.
fn split_segments(path: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(path);
    std::iter::from_fn(move || {
        let text = rest?;
        match text.bytes().position(|b| b == b'/') {
            Some(slash) => {
                rest = Some(&text[slash + 1..]);
                Some(&text[..slash])
            }
            None => {
                rest = None;
                Some(text)
            }
        }
    })
}

/// `Name` or `Namespace::Name`.
pub fn qualified(namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        name.to_string()
    } else {
        format!("{namespace}::{name}")
    }
}

fn compile(r: &Route, namespace: &str) -> Result<CompiledRoute, String> {
    let params = tether_config::path_params(&r.path)?;
    let mut param_types = params.iter().map(|(_, kind)| *kind);
    let segments = r
        .path
        .strip_prefix('/')
        .unwrap_or(&r.path)
        .split('/')
        .map(|s| {
            if s.starts_with('{') && s.ends_with('}') {
                Ok(Segment::Param(param_types.next().unwrap_or(ParamType::Str)))
            } else if s.contains('{') {
                Err(format!(
                    "`{}`: a parameter must be a whole path segment",
                    r.path
                ))
            } else {
                // Compared with the request's decoded segments: written
                // `caf%C3%A9` or `café`, `documents%3Apurge` or
                // `documents:purge`, it is one literal.
                match crate::sanitize::segment_value(s) {
                    Some(literal) if !literal.contains('/') => {
                        Ok(Segment::Literal(literal.into_owned()))
                    }
                    _ => Err(format!(
                        "`{}`: `{s}` is not a path segment (bad escape, not UTF-8, or an encoded `/`)",
                        r.path
                    )),
                }
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut resource_id = Vec::new();
    let mut rest = r.resource.id.as_str();
    while let Some(open) = rest.find('{') {
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("`{}` has an unclosed `{{`", r.resource.id))?;
        if open > 0 {
            resource_id.push(IdPart::Literal(rest[..open].to_string()));
        }
        let name = &rest[open + 1..open + close];
        let i = params
            .iter()
            .position(|(p, _)| p == name)
            .ok_or_else(|| format!("`{{{name}}}` is not a parameter of `{}`", r.path))?;
        resource_id.push(IdPart::Param(i));
        rest = &rest[open + close + 1..];
    }
    if !rest.is_empty() {
        resource_id.push(IdPart::Literal(rest.to_string()));
    }
    let methods = r.method.values();
    let methods = if methods.contains(&"*") {
        None
    } else {
        Some(methods.into_iter().map(String::from).collect())
    };
    let hosts = r
        .host
        .as_ref()
        .map(|h| h.values().into_iter().map(HostPattern::new).collect());
    let resource_attributes = r
        .resource
        .attributes
        .iter()
        .map(|(name, value)| {
            let expr = match value {
                serde_json::Value::String(s) => RestrictedExpression::new_string(s.clone()),
                serde_json::Value::Bool(b) => RestrictedExpression::new_bool(*b),
                v => match v.as_i64() {
                    Some(i) => RestrictedExpression::new_long(i),
                    None => {
                        return Err(format!(
                            "attribute `{name}`: not a string, integer or boolean"
                        ))
                    }
                },
            };
            Ok((name.clone(), expr))
        })
        .collect::<Result<_, String>>()?;
    let action_type: EntityTypeName = qualified(namespace, "Action")
        .parse()
        .map_err(|e| format!("action type: {e}"))?;
    // On an MCP route the JSON-RPC method is the action; `tools/call`
    // stands for the route when checking it against the schema.
    let (action, mcp) = match (&r.action, &r.mcp) {
        (_, Some(spec)) => {
            let tool_type = qualified(namespace, &spec.tool_type)
                .parse()
                .map_err(|e| format!("`{}`: {e}", spec.tool_type))?;
            let mcp = McpRoute {
                tool_type,
                max_body: spec.max_body_bytes.min(crate::mcp::MAX_BODY),
            };
            ("tools/call".to_string(), Some(mcp))
        }
        (Some(action), None) => (action.clone(), None),
        (None, None) => return Err("the route names no action".into()),
    };
    let resource_type: EntityTypeName = qualified(namespace, &r.resource.entity_type)
        .parse()
        .map_err(|e| format!("`{}`: {e}", r.resource.entity_type))?;
    let action_uid = EntityUid::from_type_name_and_id(action_type, EntityId::new(&action));
    Ok(CompiledRoute {
        template: r.path.as_str().into(),
        action_text: action_uid.to_string().into(),
        action_uid,
        action: action.into(),
        resource_prefix: format!("{resource_type}::\"").into(),
        tool_prefix: mcp.as_ref().map(|m| format!("{}::\"", m.tool_type).into()),
        resource_type,
        mcp_endpoint: None,
        mcp,
        resource_attributes,
        hosts,
        methods,
        segments,
        resource_id,
    })
}

/// Maps the request to a route, or denies with `no_route`.
pub struct Routing;

impl Filter for Routing {
    fn name(&self) -> &'static str {
        "route"
    }

    fn apply(&self, req: &mut RequestHeader, ctx: &mut RequestCtx) -> Result<(), Denial> {
        let method = req.method.as_str();
        match ctx
            .snapshot
            .routes
            .find_on(ctx.host.as_deref(), method, &ctx.path)
        {
            Some(m) => {
                ctx.route = Some(m);
                Ok(())
            }
            None => Err(Denial::new(
                Reason::NoRoute,
                format!("no route for `{method} {}`", ctx.path),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn segments_split_as_str_split_does() {
        for path in [
            "",
            "/",
            "a",
            "a/b",
            "a//b/",
            "/v1/repos/café/issues",
            "//",
            "x/",
        ] {
            assert_eq!(
                split_segments(path).collect::<Vec<_>>(),
                path.split('/').collect::<Vec<_>>(),
                "{path:?}"
            );
        }
    }

    fn table() -> RouteTable {
        let routes: Vec<Route> = serde_json::from_value(serde_json::json!([
            {"method": "GET", "path": "/v1/repos/{owner}/{repo}/issues", "action": "ListIssues",
             "resource": {"type": "Repo", "id": "{owner}/{repo}"}},
            {"method": ["POST", "PUT"], "path": "/v1/repos/{owner}/{repo}/issues", "action": "WriteIssue",
             "resource": {"type": "Repo", "id": "{owner}/{repo}"}},
            {"method": "*", "path": "/v1/admin", "action": "Admin",
             "resource": {"type": "Api", "id": "admin"}},
            // Literals written decoded and encoded.
            {"method": "GET", "path": "/v1/docs:purge", "action": "Purge",
             "resource": {"type": "Api", "id": "purge"}},
            {"method": "GET", "path": "/v1/caf%C3%A9", "action": "Cafe",
             "resource": {"type": "Api", "id": "cafe"}},
            {"method": "GET", "path": "/v1/{anything}", "action": "Read",
             "resource": {"type": "Api", "id": "item-{anything}"}},
        ]))
        .expect("routes");
        RouteTable::new(&routes, "").expect("compiles")
    }

    #[test]
    fn routes_that_may_take_an_mcp_endpoints_requests_are_its_endpoint() {
        let routes: Vec<Route> = serde_json::from_value(serde_json::json!([
            {"method": "POST", "path": "/mcp", "mcp": {}, "host": "*.example.org",
             "resource": {"type": "Server", "id": "s"}},
            // Its stream and session end, on its path: its answers.
            {"method": "GET", "path": "/mcp", "action": "Listen",
             "resource": {"type": "Server", "id": "s"}},
            {"method": "DELETE", "path": "/{any}", "action": "End", "host": "tools.example.org",
             "resource": {"type": "Server", "id": "s"}},
            // Other paths, or hosts the MCP route never takes, are not.
            {"method": "GET", "path": "/mcp/x", "action": "Other",
             "resource": {"type": "Server", "id": "s"}},
            {"method": "GET", "path": "/{n:int}", "action": "Other",
             "resource": {"type": "Server", "id": "s"}},
            {"method": "GET", "path": "/mcp", "action": "Other", "host": ["example.org", "*.example.com"],
             "resource": {"type": "Server", "id": "s"}},
            {"method": "POST", "path": "/mcp", "mcp": {}, "host": "other.test",
             "resource": {"type": "Server", "id": "s"}},
            {"method": "GET", "path": "/mcp", "action": "Listen", "host": "other.test",
             "resource": {"type": "Server", "id": "s"}},
        ]))
        .expect("routes");
        let t = RouteTable::new(&routes, "").expect("compiles");
        let endpoints: Vec<Option<usize>> = t.iter().map(|r| r.mcp_endpoint).collect();
        assert_eq!(
            endpoints,
            [
                Some(0),
                Some(0),
                Some(0),
                None,
                None,
                None,
                Some(6),
                Some(6)
            ]
        );
    }

    #[test]
    fn literals_match_ignoring_case_only_when_asked() {
        let sensitive = table();
        let insensitive = table().ignoring_case(true);
        for (path, exact, ignoring) in [
            ("/v1/admin", Some(2), Some(2)),
            ("/V1/ADMIN", None, Some(2)),
            ("/v1/Admin", Some(5), Some(2)),
            ("/v1/DOCS:PURGE", Some(5), Some(3)),
            // Simple case folding: `ſ` (U+017F) is `s`, `É` is `é`.
            ("/v1/doc%C5%BF:purge", Some(5), Some(3)),
            ("/v1/CAF%C3%89", Some(5), Some(4)),
            ("/V1/REPOS/Acme/Tether/ISSUES", None, Some(0)),
        ] {
            let found = |t: &RouteTable| t.find("GET", path).map(|m| m.index);
            assert_eq!(found(&sensitive), exact, "{path}");
            assert_eq!(found(&insensitive), ignoring, "{path}");
        }
        // Parameters keep the case they were sent in: ids are values.
        let m = insensitive
            .find("GET", "/V1/REPOS/Acme/Tether/ISSUES")
            .expect("matched");
        assert_eq!(m.resource.id, "Acme/Tether");
    }

    #[test]
    fn route_table() {
        let t = table();
        for (method, path, expected) in [
            (
                "GET",
                "/v1/repos/acme/tether/issues",
                Some((0, "acme/tether")),
            ),
            (
                "PUT",
                "/v1/repos/acme/tether/issues",
                Some((1, "acme/tether")),
            ),
            ("DELETE", "/v1/repos/acme/tether/issues", None),
            ("DELETE", "/v1/admin", Some((2, "admin"))),
            ("GET", "/v1/admin", Some((2, "admin"))),
            ("GET", "/v1/widgets", Some((5, "item-widgets"))),
            ("GET", "/v1/repos/acme/tether/issues/1", None),
            ("GET", "/v1/repos/acme/issues", None),
            // Parameters are decoded, as the upstream decodes them.
            ("GET", "/v1/users%40acme", Some((5, "item-users@acme"))),
            ("GET", "/v1/caf%C3%A9", Some((4, "cafe"))),
            ("GET", "/v1/caf%C3%A9s", Some((5, "item-cafés"))),
            ("GET", "/v1/%FF", None),
            // Literals too: this is the admin route, not an item.
            ("GET", "/v1/adm%69n", Some((2, "admin"))),
            ("GET", "/v1/docs%3Apurge", Some((3, "purge"))),
            ("GET", "/v1/docs:purge", Some((3, "purge"))),
            // HEAD is decided as the GET the server will run.
            (
                "HEAD",
                "/v1/repos/acme/tether/issues",
                Some((0, "acme/tether")),
            ),
            ("GET", "/v1/", None),
            ("GET", "/", None),
        ] {
            let got = t.find(method, path);
            let id = got.as_ref().map(|m| m.resource.id.to_string());
            let got = got.as_ref().map(|m| m.index).zip(id);
            let expected = expected.map(|(i, id)| (i, id.to_string()));
            assert_eq!(got, expected, "{method} {path}");
        }
    }

    #[test]
    fn a_literal_that_is_no_path_segment_is_refused() {
        for path in ["/v1/a%2Fb", "/v1/%FF", "/v1/%zz"] {
            let routes: Vec<Route> = serde_json::from_value(serde_json::json!([
                {"method": "GET", "path": path, "action": "Read", "resource": {"type": "Api", "id": "x"}},
            ]))
            .expect("routes");
            assert!(RouteTable::new(&routes, "").is_err(), "{path}");
        }
    }

    #[test]
    fn a_parameter_that_is_no_whole_segment_is_refused() {
        // Two parameters in one segment compiled to one, and a resource id
        // naming the second indexed past the values a request gave.
        for path in ["/v1/compare/{base}...{head}", "/v1/{a}.json"] {
            let routes: Vec<Route> = serde_json::from_value(serde_json::json!([
                {"method": "GET", "path": path, "action": "Read", "resource": {"type": "Api", "id": "{head}"}},
            ]))
            .expect("routes");
            assert!(RouteTable::new(&routes, "").is_err(), "{path}");
        }
    }

    #[test]
    fn hosts_and_typed_parameters_narrow_a_match() {
        let routes: Vec<Route> = serde_json::from_value(serde_json::json!([
            {"method": "GET", "host": "api.example.org", "path": "/v1/items/{id:int}", "action": "ReadItem",
             "resource": {"type": "Item", "id": "{id}"}},
            {"method": "GET", "host": ["*.example.org"], "path": "/v1/items/{id:uuid}", "action": "ReadUuid",
             "resource": {"type": "Item", "id": "{id}"}},
        ]))
        .expect("routes");
        let t = RouteTable::new(&routes, "").expect("compiles");
        let uuid = "/v1/items/123e4567-e89b-12d3-a456-426614174000";
        for (host, path, expected) in [
            (Some("api.example.org"), "/v1/items/42", Some(0)),
            (Some("api.example.org"), "/v1/items/abc", None),
            (Some("other.org"), "/v1/items/42", None),
            (None, "/v1/items/42", None),
            (Some("eu.example.org"), uuid, Some(1)),
            (Some("api.example.org"), uuid, Some(1)),
            (Some("example.org"), uuid, None),
            (Some("eu.example.org"), "/v1/items/42", None),
        ] {
            assert_eq!(
                t.find_on(host, "GET", path).map(|m| m.index),
                expected,
                "{host:?} {path}"
            );
        }
    }

    #[test]
    fn the_request_host_is_lower_case_without_port() {
        let mut req = testing::get("/");
        req.insert_header("host", "API.Example.org:8443")
            .expect("header");
        assert_eq!(request_host(&req).as_deref(), Some("api.example.org"));
        req.insert_header("host", "[::1]:8443").expect("header");
        assert_eq!(request_host(&req).as_deref(), Some("::1"));
        // Fully qualified, the same name.
        req.insert_header("host", "api.example.org.:8443")
            .expect("header");
        assert_eq!(request_host(&req).as_deref(), Some("api.example.org"));
    }

    #[test]
    fn actions_and_types_are_namespaced() {
        let routes: Vec<Route> = serde_json::from_value(serde_json::json!([
            {"method": "GET", "path": "/x", "action": "Read", "resource": {"type": "Doc", "id": "x"}}
        ]))
        .expect("routes");
        let t = RouteTable::new(&routes, "Api").expect("compiles");
        let r = t.get(0).expect("route");
        assert_eq!(r.action_uid.to_string(), r#"Api::Action::"Read""#);
        assert_eq!(r.resource_type.to_string(), "Api::Doc");
    }

    #[test]
    fn recorded_actions_and_resources_are_written_as_cedar_writes_them() {
        let routes: Vec<Route> = serde_json::from_value(serde_json::json!([
            {"method": "GET", "path": "/x/{id}", "action": "Read", "resource": {"type": "Doc", "id": "{id}"}},
            {"method": "POST", "path": "/mcp", "mcp": {}, "resource": {"type": "Server", "id": "s"}}
        ]))
        .expect("routes");
        let t = RouteTable::new(&routes, "Api").expect("compiles");
        let ids = [
            "plain",
            "with \"quotes\"",
            r"back\slash",
            "line\nbreak",
            "zürich ✓",
            "it's",
            "tab\there",
            "del\u{7f}",
            "",
        ];
        for (index, action, tool) in [
            (0, "Read", false),
            (1, "tools/call", false),
            (1, "tools/call", true),
        ] {
            let r = t.get(index).expect("route");
            for action in [action, "Other \"one\""] {
                for id in ids {
                    let m = RouteMatch {
                        index,
                        action: action.into(),
                        resource: ResourceRef {
                            tool,
                            id: id.into(),
                        },
                    };
                    assert_eq!(r.action_text(&m), r.action_uid(&m).to_string());
                    let resource = r.resource_uid(&m).map(|u| u.to_string());
                    assert_eq!(r.resource_text(&m), resource, "{id:?}");
                }
            }
        }
        // A tool on a route that is not an MCP route names no resource.
        let m = RouteMatch {
            index: 0,
            action: "Read".into(),
            resource: ResourceRef {
                tool: true,
                id: "t".into(),
            },
        };
        assert_eq!(t.get(0).expect("route").resource_text(&m), None);
    }

    #[test]
    fn no_match_is_no_route() {
        let mut ctx = testing::ctx();
        ctx.path = "/nowhere".into();
        let denial = Routing
            .apply(&mut testing::get("/nowhere"), &mut ctx)
            .expect_err("denied");
        assert_eq!(denial.reason, Reason::NoRoute);
    }
}
