//! Where an allowed request goes: one upstream in front of an API, or, on
//! the agent's side, several chosen by host or path prefix. Chosen from the
//! same host and normalized path the route was matched on; a request no
//! upstream takes is refused (`no_route`), never sent anywhere by default.
//!
//! A stage like the others, so that `tether explain` chooses as the proxy
//! does. The proxy holds the peers (addresses, TLS) by the same index.

use std::sync::Arc;

use tether_config::{Config, EncodedSlash};

use crate::route::HostPattern;
use crate::{Denial, Filter, Reason, RequestCtx};

/// The upstream chosen for a request.
#[derive(Debug, Clone)]
pub struct UpstreamChoice {
    /// Its position in the config (`upstream` first, then `upstreams`):
    /// the proxy's peers are in the same order.
    pub index: usize,
    /// Its `name`, else its address: what records call it.
    pub name: Arc<str>,
}

/// The configured upstreams, in match order.
pub struct UpstreamTable {
    entries: Vec<Entry>,
}

struct Entry {
    name: Arc<str>,
    hosts: Option<Vec<HostPattern>>,
    path_prefix: Option<String>,
    /// `encoded_slash: reject`: a back end that decodes `%2F` before
    /// routing, which a path holding one must not reach.
    rejects_encoded_slash: bool,
}

impl UpstreamTable {
    /// The upstreams of `config`, in the order they are matched.
    pub fn new(config: &Config) -> UpstreamTable {
        let entries = config
            .all_upstreams()
            .map(|u| Entry {
                name: u.name.as_deref().unwrap_or(&u.address).into(),
                hosts: u
                    .hosts
                    .as_ref()
                    .map(|h| h.values().into_iter().map(HostPattern::new).collect()),
                path_prefix: u.path_prefix.clone(),
                rejects_encoded_slash: u.encoded_slash == Some(EncodedSlash::Reject),
            })
            .collect();
        UpstreamTable { entries }
    }

    /// The first upstream whose hosts and path prefix match `host` (lower
    /// case, no port) and the normalized `path`.
    pub fn select(&self, host: Option<&str>, path: &str) -> Option<UpstreamChoice> {
        self.position(host, path).map(|index| UpstreamChoice {
            index,
            name: self.entries[index].name.clone(),
        })
    }

    fn position(&self, host: Option<&str>, path: &str) -> Option<usize> {
        self.entries.iter().position(|e| {
            let host_ok = match &e.hosts {
                None => true,
                Some(patterns) => host.is_some_and(|h| patterns.iter().any(|p| p.matches(h))),
            };
            host_ok
                && e.path_prefix
                    .as_deref()
                    .is_none_or(|p| under_prefix(path, p))
        })
    }
}

/// Whether `path` is `prefix` or below it, by whole segments: `/mcp` holds
/// `/mcp` and `/mcp/x`, never `/mcpadmin`.
pub fn under_prefix(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

/// Chooses the upstream.
pub struct SelectUpstream {
    table: Arc<UpstreamTable>,
}

impl SelectUpstream {
    /// Chooses among `table`'s upstreams.
    pub fn new(table: Arc<UpstreamTable>) -> SelectUpstream {
        SelectUpstream { table }
    }
}

impl Filter for SelectUpstream {
    fn name(&self) -> &'static str {
        "upstream"
    }

    fn apply(
        &self,
        _req: &mut pingora_http::RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<(), Denial> {
        let host = ctx.host.as_deref();
        let Some(index) = self.table.position(host, &ctx.path) else {
            return Err(Denial::new(
                Reason::NoRoute,
                format!("no upstream for host {host:?} and path `{}`", ctx.path),
            ));
        };
        let entry = &self.table.entries[index];
        if ctx.encoded_slash && entry.rejects_encoded_slash {
            // `paths.encoded_slash` let it through; this upstream's back
            // end would read it otherwise than the route did. No path in
            // the detail: with `decode` it holds no `%2F` any more, and
            // the record has the normalized one.
            return Err(Denial::new(
                Reason::BadPath,
                format!(
                    "the path held an encoded slash (`%2F`), which upstream `{}` refuses",
                    entry.name
                ),
            ));
        }
        ctx.upstream = Some(UpstreamChoice {
            index,
            name: entry.name.clone(),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn a_path_prefix_matches_whole_segments() {
        for (path, prefix, under) in [
            ("/mcp", "/mcp", true),
            ("/mcp/tools", "/mcp", true),
            ("/mcpadmin/x", "/mcp", false),
            ("/mcp", "/mcp/", false),
            ("/v1/repos/x", "/v1/repos/", true),
            ("/v1/reposx", "/v1/repos/", false),
            ("/anything", "/", true),
        ] {
            assert_eq!(under_prefix(path, prefix), under, "{path} under {prefix}");
        }
    }

    #[test]
    fn the_first_upstream_taking_the_host_and_path_is_chosen() {
        let mut config = testing::config();
        config.upstream = None;
        config.upstreams = serde_json::from_value(serde_json::json!([
            {"name": "github", "hosts": ["api.github.com"], "address": "127.0.0.1:1"},
            {"name": "mcp", "path_prefix": "/mcp", "address": "127.0.0.1:2"},
            {"name": "internal", "hosts": ["*.internal.example.org"], "path_prefix": "/v1", "address": "127.0.0.1:3"},
        ]))
        .expect("upstreams");
        let stage = SelectUpstream::new(Arc::new(UpstreamTable::new(&config)));
        for (host, path, expected) in [
            (Some("api.github.com"), "/repos", Some((0, "github"))),
            (Some("api.github.com"), "/mcp", Some((0, "github"))),
            (None, "/mcp/x", Some((1, "mcp"))),
            (
                Some("a.internal.example.org"),
                "/v1/x",
                Some((2, "internal")),
            ),
            (Some("a.internal.example.org"), "/v2/x", None),
            (None, "/mcpadmin", None),
            (None, "/v1/x", None),
        ] {
            let mut ctx = testing::ctx();
            ctx.host = host.map(Into::into);
            ctx.path = path.into();
            let result = stage.apply(&mut testing::get(path), &mut ctx);
            match expected {
                Some((index, name)) => {
                    result.expect("chosen");
                    let choice = ctx.upstream.expect("choice");
                    assert_eq!(
                        (choice.index, &*choice.name),
                        (index, name),
                        "{host:?} {path}"
                    );
                }
                None => {
                    let denial = result.expect_err("refused");
                    assert_eq!(denial.reason, Reason::NoRoute, "{host:?} {path}");
                    assert!(ctx.upstream.is_none());
                }
            }
        }
    }
}
