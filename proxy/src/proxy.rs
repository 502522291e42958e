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
use tether_filters::mcp;
use tether_filters::record::AuditRecord;
use tether_filters::{Denial, Progress, Reason, RequestCtx};

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
    tools_list: Option<ToolsList>,
}

/// A `tools/list` response being filtered.
enum ToolsList {
    /// JSON arriving: held until complete (bounded), then filtered.
    Buffering(Vec<u8>),
    /// Not something Tether can filter: replaced by an error, since an
    /// unfiltered list would show tools the agent may not call.
    Refuse,
}

/// Most bytes of a `tools/list` response held for filtering.
const MAX_TOOLS_LIST: usize = 4 * 1024 * 1024;

impl TetherProxy {
    /// A proxy forwarding to `upstream`.
    pub fn new(app: Arc<App>, upstream: HttpPeer) -> TetherProxy {
        TetherProxy { app, upstream }
    }

    async fn refuse(&self, session: &mut Session, ctx: &Ctx, denial: &Denial) -> Result<()> {
        let request_id = ctx.req.request_id.to_string();
        let body = Bytes::from(ctx.req.refusal_body(denial));
        let mut resp = ResponseHeader::build(denial.reason.status(), Some(4))?;
        resp.insert_header("content-type", "application/json")?;
        resp.insert_header("content-length", body.len().to_string())?;
        resp.insert_header(REQUEST_ID_HEADER, request_id)?;
        // A refused request's body may be unread: closing the connection is
        // the one safe way not to read it as the next request.
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
            tools_list: None,
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
        let mut progress = self.app.chain.run(session.req_header_mut(), &mut ctx.req);
        loop {
            match progress {
                Ok(Progress::Done) => return Ok(false),
                Ok(Progress::NeedsBody { resume_at, limit }) => {
                    match read_body(session, limit).await {
                        Ok(body) => ctx.req.body = Some(body),
                        Err(denial) => {
                            ctx.req.denied_by = Some(self.app.chain.name_at(resume_at));
                            ctx.req.denial = Some(denial.clone());
                            self.refuse(session, ctx, &denial).await?;
                            return Ok(true);
                        }
                    }
                    progress =
                        self.app
                            .chain
                            .run_from(resume_at, session.req_header_mut(), &mut ctx.req);
                }
                Err(denial) => {
                    self.refuse(session, ctx, &denial).await?;
                    return Ok(true);
                }
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
        if ctx
            .req
            .mcp
            .as_ref()
            .is_some_and(|m| m.method == "tools/list")
        {
            let json = resp
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("json"));
            ctx.tools_list = Some(if json && resp.status.is_success() {
                ToolsList::Buffering(Vec::new())
            } else {
                ToolsList::Refuse
            });
            if !json {
                resp.set_status(502)?;
                resp.insert_header("content-type", "application/json")?;
            }
            // The filtered body has another length.
            resp.remove_header("content-length");
            resp.insert_header("transfer-encoding", "chunked")?;
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<std::time::Duration>> {
        let Some(state) = &mut ctx.tools_list else {
            return Ok(None);
        };
        if let (ToolsList::Buffering(held), Some(chunk)) = (&mut *state, body.take()) {
            if held.len() + chunk.len() > MAX_TOOLS_LIST {
                *state = ToolsList::Refuse;
            } else {
                held.extend_from_slice(&chunk);
            }
        }
        if !end_of_stream {
            return Ok(None);
        }
        let filtered = match state {
            ToolsList::Buffering(held) => mcp::filter_tools(held, |tool| {
                mcp::tool_visible(&self.app.cache, &ctx.req, tool)
            }),
            ToolsList::Refuse => Err("tools/list response is not JSON Tether can filter".into()),
        };
        *body = Some(Bytes::from(filtered.unwrap_or_else(|e| {
            log::warn!("{e}: replaced by an error");
            mcp::error_body(
                ctx.req.mcp.as_ref(),
                &Denial::new(Reason::UpstreamError, e),
                &ctx.req.request_id.to_string(),
            )
        })));
        Ok(None)
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

/// Reads the request body, at most `limit` bytes, into pingora's replay
/// buffer too, so the upstream still receives it after we decided on it.
async fn read_body(session: &mut Session, limit: usize) -> std::result::Result<Bytes, Denial> {
    session.enable_retry_buffering();
    let mut body = bytes::BytesMut::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(Denial::new(
                        Reason::BodyTooLarge,
                        format!("body is over {limit} bytes"),
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body.freeze()),
            Err(e) => {
                return Err(Denial::new(
                    Reason::BadRequest,
                    format!("cannot read the body: {e}"),
                ))
            }
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
