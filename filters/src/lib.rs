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
pub mod identity;
pub mod lifecycle;
pub mod lint;
pub mod reason;
pub mod record;
pub mod route;
pub mod sanitize;
pub mod snapshot;

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

    /// Runs every stage until one denies. The denial and the stage that
    /// made it are kept in `ctx` for the response and the record.
    pub fn run(&self, req: &mut RequestHeader, ctx: &mut RequestCtx) -> Result<(), Denial> {
        for filter in &self.filters {
            if let Err(denial) = filter.apply(req, ctx) {
                ctx.denied_by = Some(filter.name());
                ctx.denial = Some(denial.clone());
                return Err(denial);
            }
        }
        Ok(())
    }

    /// The stage names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.filters.iter().map(|f| f.name()).collect()
    }
}

#[cfg(test)]
pub(crate) mod testing;
