//! The pingora proxy. It holds no policy: it runs the filter chain, writes
//! refusals, forwards what the chain allowed, and records every outcome.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, Result};
use tether_config::Mode;
use tether_filters::credentials::{REQUEST_ID, REQUEST_ID_HEADER};
use tether_filters::headers;
use tether_filters::mcp;
use tether_filters::record::AuditRecord;
use tether_filters::{Denial, Progress, Reason, RequestCtx};

use crate::app::App;
use crate::telemetry::{RequestSpan, Telemetry};
use crate::tls::peer_identity;
use crate::upstreams::Upstreams;

/// Tether's `ProxyHttp`.
pub struct TetherProxy {
    app: Arc<App>,
    upstreams: Upstreams,
}

/// Per-request state: the chain's context plus the span.
pub struct Ctx {
    req: RequestCtx,
    span: Option<RequestSpan>,
    /// An answer on an MCP endpoint, being filtered.
    mcp_answer: Option<McpAnswer>,
    /// Whether the current upstream attempt has been sent the MCP call
    /// Tether parsed (it replaces the body received).
    mcp_call_sent: bool,
    /// The request's method, once its head is read.
    method: Option<http::Method>,
    /// Until the request is recorded: where a request dropped unrecorded
    /// writes its record (see `Drop`).
    unrecorded: Option<Arc<App>>,
}

/// pingora records every request it finishes through `logging`; a request
/// whose task is dropped instead (cut short when Tether shuts down) never
/// gets there, and records itself here, as aborted, so that no request
/// that may have reached the upstream leaves no trace.
impl Drop for Ctx {
    fn drop(&mut self) {
        let Some(app) = self.unrecorded.take() else {
            return;
        };
        let method = self.method.as_ref().map_or("", http::Method::as_str);
        let trace_id = self.span.as_ref().map(Telemetry::trace_id);
        let record = AuditRecord::new(&self.req, method, Reason::Aborted, 0, trace_id);
        app.metrics.observe(
            Reason::Aborted,
            self.req.allowed,
            SystemTime::now()
                .duration_since(self.req.started)
                .unwrap_or_default(),
        );
        app.audit.write(&record);
        if let Some(span) = self.span.take() {
            app.telemetry.finish(span, &record);
        }
        app.request_recorded();
    }
}

/// The longest a request's body may take to arrive when it must be read
/// to decide (MCP calls, form bodies).
const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// The longest a request waits for an issuer's keys to be refetched.
const KEY_REFETCH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// An answer on an MCP endpoint being filtered.
enum McpAnswer {
    /// JSON arriving: held until complete (bounded), then filtered.
    Buffering(Held, mcp::Expect),
    /// Server-Sent Events arriving: each event is held until complete
    /// (bounded), then filtered and sent on.
    Events(Held, mcp::ToolEvents),
    /// Not something Tether can filter: replaced by an error, since an
    /// unfiltered list would show tools the agent may not call.
    Refuse,
    /// An event stream that went wrong: its error event has been sent,
    /// and the rest of the stream is dropped.
    EventsRefused,
}

/// Most bytes of an MCP answer (for events, of one event) held for
/// filtering.
const MAX_MCP_ANSWER: usize = 4 * 1024 * 1024;

/// The most bytes of MCP answers held at once, by all requests together:
/// each is bounded, and so is their sum (two hundred agents listing tools
/// at once must not hold 200 × 4 MiB).
const MAX_MCP_ANSWERS_HELD: usize = 64 * 1024 * 1024;

/// Bytes held in [`Held`] answers now.
static MCP_ANSWERS_HELD: AtomicUsize = AtomicUsize::new(0);

/// An MCP answer being held, its bytes counted in [`MCP_ANSWERS_HELD`]
/// until it is dropped.
#[derive(Default)]
struct Held(Vec<u8>);

impl Held {
    /// Adds `chunk`, unless that would take this answer or all of them
    /// over their bound: then `false`, and nothing is added.
    fn extend(&mut self, chunk: &[u8]) -> bool {
        if self.0.len() + chunk.len() > MAX_MCP_ANSWER {
            return false;
        }
        let before = MCP_ANSWERS_HELD.fetch_add(chunk.len(), Ordering::AcqRel);
        if before + chunk.len() > MAX_MCP_ANSWERS_HELD {
            MCP_ANSWERS_HELD.fetch_sub(chunk.len(), Ordering::AcqRel);
            return false;
        }
        self.0.extend_from_slice(chunk);
        true
    }

    /// Lets go of the first `n` bytes.
    fn consume(&mut self, n: usize) {
        self.0.drain(..n);
        MCP_ANSWERS_HELD.fetch_sub(n, Ordering::AcqRel);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        MCP_ANSWERS_HELD.fetch_sub(self.0.len(), Ordering::AcqRel);
    }
}

impl TetherProxy {
    /// A proxy forwarding to `upstreams`.
    pub fn new(app: Arc<App>, upstreams: Upstreams) -> TetherProxy {
        TetherProxy { app, upstreams }
    }

    /// Every refusal, from a stage of the chain or from a hook (the body
    /// not read in time, the upstream failing), goes through here: the
    /// denial and the stage that made it are what `logging` records, with
    /// the metrics, and the client is answered with the reason's status
    /// and body (JSON, or a JSON-RPC error on an MCP route). The decision
    /// is recorded whether or not the client is still there to read it:
    /// a failed write is logged, and never turns the record into a proxy
    /// error.
    ///
    /// The connection is kept, so a client refused again and again does
    /// not pay a handshake each time, unless the refusal leaves a request
    /// body unread: pingora then closes it (its default
    /// `close_on_response_before_downstream_finish`), so the body is never
    /// read as the next request. `tests/e2e.rs` holds both.
    async fn refuse(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        stage: &'static str,
        denial: Denial,
    ) {
        // A client that went away cannot be answered, and a response begun
        // cannot be replaced.
        let answerable =
            denial.reason != Reason::ClientClosed && session.response_written().is_none();
        ctx.req.denied_by = Some(stage);
        ctx.req.denial = Some(denial);
        let Some(denial) = ctx.req.denial.as_ref().filter(|_| answerable) else {
            return;
        };
        if let Err(e) = write_refusal(session, ctx, denial).await {
            // Whatever reached the client, nothing more goes on this connection.
            session.set_keepalive(None);
            log::debug!("cannot send the refusal: {e}");
        }
    }
}

async fn write_refusal(session: &mut Session, ctx: &Ctx, denial: &Denial) -> Result<()> {
    let body = Bytes::from(ctx.req.refusal_body(denial));
    let mut resp = ResponseHeader::build(denial.reason.status(), Some(4))?;
    resp.insert_header("content-type", "application/json")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header(REQUEST_ID_HEADER, ctx.req.request_id.header_value())?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

#[async_trait]
impl ProxyHttp for TetherProxy {
    type CTX = Ctx;

    /// No downstream modules. pingora's default is a response compression
    /// module, disabled, which compresses nothing and still costs each
    /// request three allocations and two calls; Tether forwards bodies as
    /// the upstream sent them.
    fn init_downstream_modules(&self, _modules: &mut HttpModules) {}

    fn new_ctx(&self) -> Ctx {
        Ctx {
            // The snapshot is taken once, here: the whole request is decided
            // under one version even if a reload lands mid-request.
            req: RequestCtx::new(self.app.snapshot.load_full()),
            span: None,
            mcp_answer: None,
            mcp_call_sent: false,
            method: None,
            unrecorded: {
                self.app.request_began();
                Some(self.app.clone())
            },
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        ctx.method = Some(session.req_header().method.clone());
        // `started` was stamped by `new_ctx`, which pingora calls once the
        // request's head has been read.
        // On a dual-stack listener an IPv4 client arrives as
        // `::ffff:a.b.c.d`, which Cedar's `isInRange(ip("10.0.0.0/8"))`
        // and `isLoopback()` would not recognize as the address it is.
        ctx.req.client_addr = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_canonical());
        // Egress: the pod's own SVID is the identity of whatever the agent
        // sends; ingress: the client's, from the handshake (an ingress
        // `workload` is only what Tether shows upstreams).
        match (self.app.config.mode, &self.app.workload) {
            (Mode::Egress, Some(workload)) => {
                ctx.req.peer = Some(workload.current().identity.clone())
            }
            _ => match peer_identity(session, &self.app.verifier) {
                Ok(peer) => ctx.req.peer = peer,
                Err(_) => ctx.req.peer_rejected = true,
            },
        }
        let telemetry = &self.app.telemetry;
        ctx.span = telemetry.start(session.req_header(), ctx.req.started);
        // Forwarded by the chain's last stage, with the identity headers.
        ctx.req.trace_context = ctx.span.as_ref().and_then(|s| telemetry.trace_context(s));
        let mut progress = self.app.chain.run(session.req_header_mut(), &mut ctx.req);
        loop {
            let resume_at = match progress {
                Ok(Progress::Done) => break,
                Ok(Progress::NeedsBody { resume_at, limit }) => {
                    // The stages before this decided at `started`, under the
                    // snapshot of then: a body may not keep that decision
                    // open for long (a chunk every minute could hold it for
                    // weeks, past an offboarding or a reload).
                    let read = tokio::time::timeout(BODY_DEADLINE, read_body(session, limit))
                        .await
                        .unwrap_or_else(|_| {
                            Err(Denial::new(
                                Reason::BadRequest,
                                format!("body not received within {} s", BODY_DEADLINE.as_secs()),
                            ))
                        });
                    match read {
                        Ok(body) => ctx.req.body = Some(body),
                        Err(denial) => {
                            let stage = self.app.chain.name_at(resume_at);
                            self.refuse(session, ctx, stage, denial).await;
                            return Ok(true);
                        }
                    }
                    resume_at
                }
                Ok(Progress::NeedsKeys { resume_at, source }) => {
                    // Once per request: a kid still unknown after this is
                    // refused by the identity stage.
                    ctx.req.keys_refetched = true;
                    log::debug!(
                        "unknown key id: waiting for {} to be fetched",
                        source.origin
                    );
                    source.refetch(KEY_REFETCH_WAIT).await;
                    resume_at
                }
                Err(denial) => {
                    let stage = ctx.req.denied_by.unwrap_or("chain");
                    self.refuse(session, ctx, stage, denial).await;
                    return Ok(true);
                }
            };
            progress = self
                .app
                .chain
                .run_from(resume_at, session.req_header_mut(), &mut ctx.req);
        }
        if ctx.req.on_mcp_endpoint() {
            // Its answer is read and filtered: it must come as plain JSON.
            session
                .req_header_mut()
                .remove_header(&http::header::ACCEPT_ENCODING);
        }
        ctx.req.allowed = true;
        Ok(false)
    }

    /// Scans a multipart body on its way to the upstream (see
    /// `method_override`); other bodies pass untouched. A refusal stops
    /// the request before the chunk that completes the offending line is
    /// sent: the upstream connection, left with a partial request, is
    /// closed rather than reused.
    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        ctx.req
            .upstream
            .as_ref()
            .and_then(|u| self.upstreams.peer(u.index, self.app.workload.as_deref()))
            .ok_or_else(|| Error::explain(pingora::ErrorType::InternalError, "no upstream chosen"))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(call) = &ctx.req.mcp else {
            return Ok(());
        };
        // The body sent is the call as parsed, written out again (see
        // `request_body_filter`): framed by its own length, in UTF-8 JSON
        // and unencoded, whatever the client's headers said, so that no
        // server reads it otherwise (as UTF-16, say, for a `charset`).
        // Once per attempt: a retry sends it again.
        ctx.mcp_call_sent = false;
        upstream_request.remove_header(&http::header::TRANSFER_ENCODING);
        upstream_request.remove_header(&http::header::CONTENT_ENCODING);
        upstream_request.insert_header(http::header::CONTENT_LENGTH, call.forward.len())?;
        upstream_request.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        Ok(())
    }

    /// The body on its way to the upstream. On an MCP route, the body the
    /// client sent (held by pingora, and replayed from there) is replaced
    /// by the call Tether parsed, written out again: a server can only
    /// read what was decided on. A multipart body is scanned for a
    /// `_method` part as it streams, and stopped before the chunk that
    /// would complete one.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(call) = &ctx.req.mcp else {
            let Some(scan) = ctx.req.multipart.as_mut() else {
                return Ok(());
            };
            let chunk = body.as_deref().unwrap_or_default();
            if let Err(denial) = scan.feed(chunk, end_of_stream) {
                // Answered and recorded by `fail_to_proxy`, from here.
                let detail = denial.detail.to_string();
                ctx.req.denied_by = Some("method_override");
                ctx.req.denial = Some(denial);
                return Err(
                    Error::explain(pingora::ErrorType::InvalidHTTPHeader, detail).into_down(),
                );
            }
            return Ok(());
        };
        // The whole body was read before deciding, so it comes here as
        // one replayed piece, at its end. Whatever else came is dropped
        // (empty, so as not to end the body sent before the call is in it).
        *body = match (end_of_stream, ctx.mcp_call_sent) {
            (false, _) => Some(Bytes::new()),
            (true, false) => Some(call.forward.clone()),
            (true, true) => None,
        };
        ctx.mcp_call_sent |= end_of_stream;
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let request_id = ctx.req.request_id.header_value();
        // Room for the one header every response gains. pingora sizes the
        // map for the headers the upstream sent, with some slack: room for
        // more than one (a filtered MCP answer adds two) made
        // nearly every response's map grow, rehashing it.
        headers::edit_response(resp, 1, |headers| {
            headers.try_insert(REQUEST_ID, request_id)
        })
        .map_err(|e| Error::because(pingora::ErrorType::InternalError, "response headers", e))?;
        let expect = match &ctx.req.mcp {
            Some(call) if call.method == "tools/list" => mcp::Expect::ToolsList,
            _ if ctx.req.on_mcp_endpoint() => mcp::Expect::Any,
            _ => return Ok(()),
        };
        // An informational response (`100 Continue`) precedes the real one;
        // a `HEAD`, a `204` and a `304` are answered with no body.
        if resp.status.is_informational()
            || matches!(resp.status.as_u16(), 204 | 304)
            || ctx.method == Some(http::Method::HEAD)
        {
            return Ok(());
        }
        let media_type = resp
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let json = media_type.contains("json");
        let events = media_type == "text/event-stream";
        let tools_list = expect == mcp::Expect::ToolsList;
        ctx.mcp_answer = match (json, events, resp.status.is_success() || !tools_list) {
            (true, _, true) => Some(McpAnswer::Buffering(Held::default(), expect)),
            (_, true, true) => Some(McpAnswer::Events(
                Held::default(),
                mcp::ToolEvents::new(expect),
            )),
            // Only a `tools/list` answer must hold a list Tether can see;
            // the server's other answers (a `202` with no body, a page)
            // go on as they came.
            _ if tools_list => Some(McpAnswer::Refuse),
            _ => return Ok(()),
        };
        if !json && !events {
            resp.set_status(502)?;
        }
        // The body is Tether's UTF-8, whatever `charset` the upstream
        // named: a client decoding it as UTF-7 would read `+AAo-` in a
        // string as a line break, and events of its own after it.
        resp.insert_header(
            "content-type",
            if events {
                "text/event-stream"
            } else {
                "application/json"
            },
        )?;
        // The filtered body has another length, and is plain JSON
        // (the request asked for no encoding, and whatever the upstream
        // sent is replaced).
        resp.remove_header("content-length");
        resp.remove_header("content-encoding");
        resp.insert_header("transfer-encoding", "chunked")?;
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<std::time::Duration>> {
        let Some(state) = &mut ctx.mcp_answer else {
            return Ok(None);
        };
        // Nothing the upstream sent goes on as it came.
        let chunk = body.take().unwrap_or_default();
        let req = &ctx.req;
        let visible = |tool: &str| mcp::tool_visible(&self.app.cache, req, tool);
        let refused = |e: String| {
            log::warn!("{e}: replaced by an error");
            mcp::error_body(
                req.mcp.as_ref(),
                &Denial::new(Reason::UpstreamError, e),
                &req.request_id.text(),
            )
        };
        match state {
            McpAnswer::Buffering(held, _) => {
                if !held.extend(&chunk) {
                    *state = McpAnswer::Refuse;
                }
            }
            McpAnswer::Events(held, stream) => {
                if !held.extend(&chunk) {
                    let why = format!("an MCP event over {MAX_MCP_ANSWER} bytes");
                    let mut event = b"data: ".to_vec();
                    event.extend_from_slice(&refused(why));
                    event.extend_from_slice(b"\n\n");
                    *body = Some(event.into());
                    *state = McpAnswer::EventsRefused;
                } else {
                    let (events, used) = stream.filter(&held.0, end_of_stream, visible, refused);
                    held.consume(used);
                    *body = (!events.is_empty()).then(|| events.into());
                }
                return Ok(None);
            }
            McpAnswer::Refuse | McpAnswer::EventsRefused => {}
        }
        if !end_of_stream {
            return Ok(None);
        }
        let filtered = match state {
            McpAnswer::Buffering(held, expect) => mcp::filter_answer(&held.0, *expect, visible),
            McpAnswer::Refuse => Err(format!(
                "MCP response is not JSON Tether can filter, or is over {MAX_MCP_ANSWER} bytes"
            )),
            McpAnswer::Events(..) | McpAnswer::EventsRefused => return Ok(None),
        };
        *body = Some(Bytes::from(filtered.unwrap_or_else(refused)));
        // What was held is let go now, not with the request.
        ctx.mcp_answer = None;
        Ok(None)
    }

    /// What pingora's error log says of a request: never the query, which
    /// may carry a token or other secret the audit line leaves out.
    fn request_summary(&self, session: &Session, ctx: &Ctx) -> String {
        let method = session.req_header().method.as_str();
        let path = match ctx.req.path.as_str() {
            "" => "(not yet normalized)",
            path => path,
        };
        format!("{method} {path}, request {}", ctx.req.request_id.text())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        // A stage that refused while the body streamed (`request_body_filter`)
        // said why; the error only carries it here.
        let (stage, denial) = match (&ctx.req.denial, ctx.req.denied_by) {
            (Some(denial), Some(stage)) => (stage, denial.clone()),
            _ => ("upstream", Denial::new(failure_reason(e), e.to_string())),
        };
        let reason = denial.reason;
        self.refuse(session, ctx, stage, denial).await;
        FailToProxy {
            error_code: reason.status(),
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        // Recorded here, not by `Drop`; counted out of flight only once
        // its record is queued, so a shutdown waiting for the count does
        // not close the queues under it.
        let counted = ctx.unrecorded.take().is_some();
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
            ctx.req.allowed,
            SystemTime::now()
                .duration_since(ctx.req.started)
                .unwrap_or_default(),
        );
        self.app.audit.write(&record);
        if let Some(span) = ctx.span.take() {
            self.app.telemetry.finish(span, &record);
        }
        if counted {
            self.app.request_recorded();
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
    use pingora::ErrorType::*;
    match (e.esource(), &e.etype) {
        (ErrorSource::Upstream, _) => Reason::UpstreamError,
        // Headers pingora itself refuses (after the chain ran), e.g. a
        // `Connection` naming `host`: the caller's to fix, and answered.
        (ErrorSource::Downstream, InvalidHTTPHeader | H1Error | H2Error | InvalidH2) => {
            Reason::BadRequest
        }
        // A chunked body that breaks its framing (a chunk size of `zz`, or
        // one that overflows): malformed, not a client that went away.
        // pingora names these errors but does not export their types.
        (ErrorSource::Downstream, Custom("InvalidChunk" | "InvalidTrailerEnd")) => {
            Reason::BadRequest
        }
        (ErrorSource::Downstream, _) => Reason::ClientClosed,
        _ => Reason::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_chunked_body_is_a_bad_request() {
        let down = |etype| Error::explain(etype, "reading the body").into_down();
        for (etype, reason) in [
            (
                pingora::ErrorType::Custom("InvalidChunk"),
                Reason::BadRequest,
            ),
            (
                pingora::ErrorType::Custom("InvalidTrailerEnd"),
                Reason::BadRequest,
            ),
            (pingora::ErrorType::InvalidHTTPHeader, Reason::BadRequest),
            (pingora::ErrorType::ConnectionClosed, Reason::ClientClosed),
            (pingora::ErrorType::ReadError, Reason::ClientClosed),
        ] {
            assert_eq!(failure_reason(&down(etype.clone())), reason, "{etype:?}");
        }
    }

    #[test]
    fn held_mcp_answers_are_bounded_each_and_together() {
        let mut one = Held::default();
        assert!(one.extend(&vec![b' '; MAX_MCP_ANSWER]));
        assert!(!one.extend(b" "), "one answer over its bound");
        // Together: as many whole answers as the sum allows, then none,
        // until one is let go.
        let mut held = vec![one];
        while held.len() < MAX_MCP_ANSWERS_HELD / MAX_MCP_ANSWER {
            let mut next = Held::default();
            assert!(next.extend(&vec![b' '; MAX_MCP_ANSWER]));
            held.push(next);
        }
        let mut refused = Held::default();
        assert!(!refused.extend(b"{}"), "all answers over their bound");
        held.pop();
        assert!(refused.extend(b"{}"));
        drop(held);
        drop(refused);
        assert_eq!(MCP_ANSWERS_HELD.load(Ordering::Acquire), 0);
    }
}
