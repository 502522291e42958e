//! The pingora proxy. It holds no policy: it runs the filter chain, writes
//! refusals, forwards what the chain allowed, and records every outcome.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, Result};
use pingora_http::RequestHeader;
use tether_filters::credentials::REQUEST_ID_HEADER;
use tether_filters::record::AuditRecord;
use tether_filters::{Denial, Reason, RequestCtx};

use crate::app::App;
use crate::telemetry::{RequestSpan, Telemetry};
use crate::tls::peer_identity;

/// Tether's `ProxyHttp`.
pub struct TetherProxy {
    app: Arc<App>,
    upstream: HttpPeer,
}

/// Per-request state: the chain's context plus the span.
pub struct Ctx {
    req: RequestCtx,
    span: Option<RequestSpan>,
}

impl TetherProxy {
    /// A proxy forwarding to `upstream`.
    pub fn new(app: Arc<App>, upstream: HttpPeer) -> TetherProxy {
        TetherProxy { app, upstream }
    }

    async fn refuse(&self, session: &mut Session, ctx: &Ctx, denial: &Denial) -> Result<()> {
        let request_id = ctx.req.request_id.to_string();
        let body = Bytes::from(denial.body(&request_id));
        let mut resp = ResponseHeader::build(denial.reason.status(), Some(4))?;
        resp.insert_header("content-type", "application/json")?;
        resp.insert_header("content-length", body.len().to_string())?;
        resp.insert_header(REQUEST_ID_HEADER, request_id)?;
        session.set_keepalive(None);
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await
    }
}

#[async_trait]
impl ProxyHttp for TetherProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            // The snapshot is taken once, here: the whole request is decided
            // under one version even if a reload lands mid-request.
            req: RequestCtx::new(self.app.snapshot.load_full()),
            span: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        ctx.req.started = SystemTime::now();
        ctx.req.client_addr = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        ctx.req.peer = peer_identity(session);
        ctx.span = self
            .app
            .telemetry
            .start(session.req_header(), ctx.req.started);
        match self.app.chain.run(session.req_header_mut(), &mut ctx.req) {
            Ok(()) => Ok(false),
            Err(denial) => {
                self.refuse(session, ctx, &denial).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.upstream.clone()))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(span) = &ctx.span {
            self.app.telemetry.inject(span, upstream);
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        resp.insert_header(REQUEST_ID_HEADER, ctx.req.request_id.to_string())?;
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let reason = failure_reason(e);
        let denial = Denial::new(reason, e.to_string());
        ctx.req.denial = Some(denial.clone());
        ctx.req.denied_by = Some("upstream");
        // A dead client connection cannot be answered.
        let answerable =
            !matches!(reason, Reason::Internal if e.esource() == &ErrorSource::Downstream);
        if answerable && session.response_written().is_none() {
            if let Err(write) = self.refuse(session, ctx, &denial).await {
                log::debug!("cannot send the error response: {write}");
            }
        }
        FailToProxy {
            error_code: reason.status(),
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let reason = match (&ctx.req.denial, e) {
            (Some(d), _) => d.reason,
            (None, Some(e)) => failure_reason(e),
            (None, None) => Reason::Allowed,
        };
        let method = session.req_header().method.as_str();
        let trace_id = ctx.span.as_ref().map(Telemetry::trace_id);
        let record = AuditRecord::new(&ctx.req, method, reason, status, trace_id);
        self.app.metrics.observe(
            reason,
            SystemTime::now()
                .duration_since(ctx.req.started)
                .unwrap_or_default(),
        );
        self.app.audit.write(&record);
        if let Some(span) = ctx.span.take() {
            self.app.telemetry.finish(span, &record);
        }
    }
}

/// What a proxying error means for the record.
fn failure_reason(e: &Error) -> Reason {
    match e.esource() {
        ErrorSource::Upstream => Reason::UpstreamError,
        _ => Reason::Internal,
    }
}
