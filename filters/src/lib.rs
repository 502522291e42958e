//! Tether's request filter chain.
//!
//! Every request passes the same ordered stages: each reads the request and
//! the per-request [`RequestCtx`], fills in what it learned, and either lets
//! the request continue or denies it with a [`Reason`]. The order is decided
//! in one place, the `proxy` crate's `chain()`; this crate holds the stages.
//!
//! Fail closed: a stage that cannot reach an answer denies.

pub mod authorize;
pub mod context;
pub mod credentials;
pub mod fold;
pub mod headers;
pub mod identity;
pub mod lifecycle;
pub mod lint;
pub mod mcp;
pub mod method_override;
pub mod reason;
pub mod record;
pub mod route;
pub mod sanitize;
pub mod snapshot;
pub mod upstream;

use std::sync::Arc;

use pingora_http::RequestHeader;

pub use context::{IdentityKind, Principal, RequestCtx};
pub use reason::{Denial, Reason};
pub use snapshot::Snapshot;

/// One stage of the chain.
pub trait Filter: Send + Sync {
    /// A stable name, used as the audit `stage` field and in logs.
    fn name(&self) -> &'static str;

    /// Reads (and may rewrite) the request, records what it learned in
    /// `ctx`, and returns `Err` to stop the request.
    fn apply(&self, req: &mut RequestHeader, ctx: &mut RequestCtx) -> Result<(), Denial>;

    /// If this stage must see the request body before it can decide, the
    /// most bytes it accepts. The chain then pauses until the proxy has
    /// read the body into `ctx.body`.
    fn body_limit(&self, _req: &RequestHeader, _ctx: &RequestCtx) -> Option<usize> {
        None
    }

    /// If this stage would refuse for want of an issuer key that an early
    /// fetch might bring (an unknown `kid` after a key rotation), the
    /// source to fetch. The chain then pauses while the proxy waits for
    /// the fetch, once per request.
    fn keys_to_refetch(
        &self,
        _req: &RequestHeader,
        _ctx: &RequestCtx,
    ) -> Option<Arc<identity::jwks::KeySource>> {
        None
    }
}

/// How far a chain run got.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Every stage passed.
    Done,
    /// The stage at `resume_at` needs the body, at most `limit` bytes:
    /// read it into `ctx.body` and call [`Chain::run_from`].
    NeedsBody {
        /// Where to resume.
        resume_at: usize,
        /// The most bytes to read.
        limit: usize,
    },
    /// The stage at `resume_at` needs `source` fetched again: call
    /// [`KeySource::refetch`](identity::jwks::KeySource::refetch), set
    /// `ctx.keys_refetched`, and call [`Chain::run_from`].
    NeedsKeys {
        /// Where to resume.
        resume_at: usize,
        /// The issuer keys to fetch.
        source: Arc<identity::jwks::KeySource>,
    },
}

impl PartialEq for Progress {
    fn eq(&self, other: &Progress) -> bool {
        match (self, other) {
            (Progress::Done, Progress::Done) => true,
            (
                Progress::NeedsBody { resume_at, limit },
                Progress::NeedsBody {
                    resume_at: r,
                    limit: l,
                },
            ) => resume_at == r && limit == l,
            (
                Progress::NeedsKeys { resume_at, source },
                Progress::NeedsKeys {
                    resume_at: r,
                    source: s,
                },
            ) => resume_at == r && Arc::ptr_eq(source, s),
            _ => false,
        }
    }
}

/// The stages in the order they run.
pub struct Chain {
    filters: Vec<Box<dyn Filter>>,
}

impl Chain {
    /// A chain of `filters`, run in the order given.
    pub fn new(filters: Vec<Box<dyn Filter>>) -> Chain {
        Chain { filters }
    }

    /// Runs every stage until one denies or needs the body. The denial and
    /// the stage that made it are kept in `ctx` for the response and the
    /// record.
    pub fn run(&self, req: &mut RequestHeader, ctx: &mut RequestCtx) -> Result<Progress, Denial> {
        self.run_from(0, req, ctx)
    }

    /// Runs the stages from `start` on.
    pub fn run_from(
        &self,
        start: usize,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<Progress, Denial> {
        for (i, filter) in self.filters.iter().enumerate().skip(start) {
            if ctx.body.is_none() {
                if let Some(limit) = filter.body_limit(req, ctx) {
                    return Ok(Progress::NeedsBody {
                        resume_at: i,
                        limit,
                    });
                }
            }
            if !ctx.keys_refetched {
                if let Some(source) = filter.keys_to_refetch(req, ctx) {
                    return Ok(Progress::NeedsKeys {
                        resume_at: i,
                        source,
                    });
                }
            }
            if let Err(denial) = filter.apply(req, ctx) {
                ctx.denied_by = Some(filter.name());
                ctx.denial = Some(denial.clone());
                return Err(denial);
            }
        }
        Ok(Progress::Done)
    }

    /// The name of the stage at `index`.
    pub fn name_at(&self, index: usize) -> &'static str {
        self.filters.get(index).map_or("chain", |f| f.name())
    }

    /// The stage names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.filters.iter().map(|f| f.name()).collect()
    }
}

#[cfg(test)]
pub(crate) mod testing;
