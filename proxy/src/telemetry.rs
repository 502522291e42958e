//! OpenTelemetry: one server span per request, exported over OTLP.
//!
//! A span is written as OTLP protobuf straight from the request's audit
//! record ([`crate::otlp`]) into a bounded queue of bytes; an export thread
//! sends the queue on a clock, over gRPC (tonic) or HTTP (reqwest). A slow
//! or absent collector costs dropped spans (counted in
//! `tether_spans_dropped_total`), never a slower request.
//!
//! The SDK still does what it is best at here: W3C trace-context
//! propagation and random ids. Its span objects and exporter are not used:
//! they copied every attribute twice per request (see [`crate::otlp`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use arrayvec::ArrayString;
use bytes::{Buf as _, Bytes};
use http::HeaderValue;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TraceFlags, TraceState};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
use pingora_http::RequestHeader;
use prometheus::IntCounter;
use tether_config::OtlpProtocol;
use tether_filters::context::TraceContext;
use tether_filters::credentials::TRACEPARENT;
use tether_filters::record::{AuditRecord, TraceIdText};

use crate::otlp::{self, SpanHeader};

/// How long one export may take before it counts as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Spans that wake the export thread before its interval is up: memory
/// stays at a batch or so under load, whatever the interval.
const EXPORT_BATCH: usize = 512;

/// Queued bytes that wake the export thread likewise: a span's size is
/// partly the caller's to choose (its path), so a count alone would let a
/// batch grow past what a collector takes.
const EXPORT_BATCH_BYTES: usize = 1 << 20;

/// Bytes the queue holds at most, whatever `max_queue` says: under a
/// collector's default limit on one message (4 MiB for gRPC), so a batch
/// is never refused whole for its size, and memory stays bounded when
/// spans are large.
const MAX_QUEUE_BYTES: usize = (4 << 20) - (64 << 10);

/// Span export, or nothing when no collector is configured.
pub struct Telemetry {
    inner: Option<Exporting>,
    propagator: TraceContextPropagator,
    ids: RandomIdGenerator,
}

struct Exporting {
    shared: Arc<Shared>,
    thread: std::thread::Thread,
    // Runs the transport's connection tasks; dropped last.
    _runtime: tokio::runtime::Runtime,
}

/// `version-traceid-spanid-flags`, version 00: 55 characters.
fn traceparent(context: &SpanContext) -> ArrayString<55> {
    let mut text = *b"00-00000000000000000000000000000000-0000000000000000-00";
    let flags = context.trace_flags() & TraceFlags::SAMPLED;
    // Each id fills its slot exactly: none of these can fail.
    let _ = hex::encode_to_slice(context.trace_id().to_bytes(), &mut text[3..35]);
    let _ = hex::encode_to_slice(context.span_id().to_bytes(), &mut text[36..52]);
    let _ = hex::encode_to_slice([flags.to_u8()], &mut text[53..55]);
    ArrayString::from_byte_string(&text).unwrap_or_default()
}

/// A request's span while the request runs: its identity and start.
pub struct RequestSpan {
    context: SpanContext,
    /// The caller's span, when it sent a `traceparent`.
    parent: Option<opentelemetry::trace::SpanId>,
    start: SystemTime,
}

impl Telemetry {
    /// Starts export as configured.
    pub fn new(
        config: &tether_config::Telemetry,
        dropped: IntCounter,
    ) -> anyhow::Result<Telemetry> {
        let propagator = TraceContextPropagator::new();
        let ids = RandomIdGenerator::default();
        let Some(otlp) = &config.otlp else {
            return Ok(Telemetry {
                inner: None,
                propagator,
                ids,
            });
        };
        // The transports need a Tokio runtime for their connections; a
        // small one of its own keeps export off the proxy's worker threads.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tether-otlp")
            .enable_all()
            .build()?;
        let transport = {
            let _entered = runtime.enter();
            Transport::new(otlp.protocol, &otlp.endpoint)?
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queued::default()),
            spare: Mutex::new(Vec::new()),
            max_queue: otlp.max_queue,
            envelope: otlp::Envelope::new(&config.service_name),
            dropped,
            transport,
            runtime: runtime.handle().clone(),
            closing: AtomicBool::new(false),
        });
        let worker = shared.clone();
        let interval = Duration::from_millis(otlp.flush_interval_ms);
        let handle = std::thread::Builder::new()
            .name("tether-spans".into())
            .spawn(move || loop {
                std::thread::park_timeout(interval);
                worker.export_queued();
                if worker.closing.load(Ordering::Acquire) {
                    return;
                }
            })?;
        Ok(Telemetry {
            inner: Some(Exporting {
                shared,
                thread: handle.thread().clone(),
                _runtime: runtime,
            }),
            propagator,
            ids,
        })
    }

    /// Starts the span of a request, as a child of the caller's
    /// `traceparent` when it sent one. The caller's sampling flag is
    /// propagated as it came, but does not decide whether Tether's own span
    /// is exported: every request leaves a span, and a caller cannot opt
    /// its actions out of the record by sending `-00`.
    pub fn start(&self, req: &RequestHeader, started: SystemTime) -> Option<RequestSpan> {
        self.inner.as_ref()?;
        // Most requests start a trace: the propagator, which builds a
        // context to say so, is asked only when there is one to continue.
        let caller = if req.headers.contains_key(&TRACEPARENT) {
            let extracted = self.propagator.extract(&HeaderExtractor(&req.headers));
            extracted.span().span_context().clone()
        } else {
            SpanContext::empty_context()
        };
        let span_id = self.ids.new_span_id();
        let (context, parent) = if caller.is_valid() {
            let context = SpanContext::new(
                caller.trace_id(),
                span_id,
                caller.trace_flags(),
                false,
                caller.trace_state().clone(),
            );
            (context, Some(caller.span_id()))
        } else {
            let context = SpanContext::new(
                self.ids.new_trace_id(),
                span_id,
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            );
            (context, None)
        };
        Some(RequestSpan {
            context,
            parent,
            start: started,
        })
    }

    /// The span's `traceparent` (and the caller's `tracestate`) for the
    /// request as forwarded (the credentials stage adds them), so the
    /// API's own spans join the same trace. Written as the SDK's
    /// propagator writes them (a test holds the two equal), without the
    /// context, vector and strings it builds for it.
    pub fn trace_context(&self, span: &RequestSpan) -> Option<TraceContext> {
        // Hex digits and dashes: this cannot fail.
        let traceparent = HeaderValue::from_str(&traceparent(&span.context)).ok()?;
        // An empty or unparsable state from the caller is not passed on.
        let state = span.context.trace_state().header();
        let tracestate = (!state.is_empty())
            .then(|| HeaderValue::from_str(&state).ok())
            .flatten();
        Some(TraceContext {
            traceparent,
            tracestate,
        })
    }

    /// Ends the span with the request's facts: queues it for export.
    pub fn finish(&self, span: RequestSpan, record: &AuditRecord<'_>) {
        let Some(exporting) = &self.inner else {
            return;
        };
        let header = SpanHeader {
            context: &span.context,
            parent: span.parent,
            start: span.start,
            end: SystemTime::now(),
        };
        let mut queue = exporting
            .shared
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let before = queue.bytes.len();
        if queue.closed || queue.spans >= exporting.shared.max_queue || before >= MAX_QUEUE_BYTES {
            drop(queue);
            exporting.shared.dropped.inc();
            return;
        }
        otlp::encode_span(&mut queue.bytes, &header, record);
        if queue.bytes.len() > MAX_QUEUE_BYTES {
            // This one span would take the batch over the bound.
            queue.bytes.truncate(before);
            drop(queue);
            exporting.shared.dropped.inc();
            return;
        }
        queue.spans += 1;
        let big = before < EXPORT_BATCH_BYTES && queue.bytes.len() >= EXPORT_BATCH_BYTES;
        if queue.spans.is_multiple_of(EXPORT_BATCH) || big {
            drop(queue);
            exporting.thread.unpark();
        }
    }

    /// The trace id of a span, as 32 hex digits.
    pub fn trace_id(span: &RequestSpan) -> TraceIdText {
        let mut digits = [0u8; 32];
        // 16 bytes are exactly 32 digits: this cannot fail.
        let _ = hex::encode_to_slice(span.context.trace_id().to_bytes(), &mut digits);
        TraceIdText::from_byte_string(&digits).unwrap_or_default()
    }

    /// Sends what is queued and stops export.
    pub fn shutdown(&self) {
        if let Some(exporting) = &self.inner {
            exporting.shared.closing.store(true, Ordering::Release);
            exporting.thread.unpark();
            exporting.shared.export_queued();
            // A span finished from here on is never sent: it is counted,
            // not left in a queue no one reads.
            let mut queue = exporting
                .shared
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            queue.closed = true;
            let left = std::mem::take(&mut queue.spans);
            queue.bytes.clear();
            drop(queue);
            exporting.shared.dropped.inc_by(left as u64);
        }
    }
}

/// Spans waiting for export, encoded.
#[derive(Default)]
struct Queued {
    bytes: Vec<u8>,
    spans: usize,
    /// Export has stopped: new spans are dropped and counted.
    closed: bool,
}

/// One `ExportTraceServiceRequest`: the envelope's head, then the spans
/// as they were queued. The transport reads the two in turn, so the
/// batch is never copied to put the head in front of it.
struct ExportMessage {
    head: Bytes,
    spans: Bytes,
}

/// The OTLP/HTTP request body: the head, then the spans, each a frame;
/// its exact length becomes the request's `content-length`.
impl http_body::Body for ExportMessage {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let next = if this.head.is_empty() {
            std::mem::take(&mut this.spans)
        } else {
            std::mem::take(&mut this.head)
        };
        std::task::Poll::Ready((!next.is_empty()).then(|| Ok(http_body::Frame::data(next))))
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_empty() && self.spans.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact((self.head.len() + self.spans.len()) as u64)
    }
}

struct Shared {
    queue: Mutex<Queued>,
    /// Swapped with the queue's buffer at each export, and kept with its
    /// capacity from one export to the next: in steady state an export
    /// allocates no large buffer, and none is freed on a thread other
    /// than the one that made it (which costs the allocator pages it is
    /// slow to take back).
    spare: Mutex<Vec<u8>>,
    max_queue: usize,
    envelope: otlp::Envelope,
    /// Spans lost: queue full, or export failed.
    dropped: IntCounter,
    transport: Transport,
    runtime: tokio::runtime::Handle,
    closing: AtomicBool,
}

impl Shared {
    /// Sends everything queued as one request; a failure drops (and
    /// counts) those spans rather than hold memory for a collector that
    /// may not come back.
    fn export_queued(&self) {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        let count = {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            // The queue gets the (empty) buffer of the previous export.
            std::mem::swap(&mut queue.bytes, &mut spare);
            std::mem::take(&mut queue.spans)
        };
        if count == 0 {
            return;
        }
        let message = ExportMessage {
            head: self.envelope.head(spare.len()).into(),
            // Lent to the transport and taken back.
            spans: Bytes::from(std::mem::take(&mut *spare)),
        };
        let spans = message.spans.clone();
        let sent = self.runtime.block_on(async {
            tokio::time::timeout(EXPORT_TIMEOUT, self.transport.send(message))
                .await
                .unwrap_or_else(|_| Err("timed out".into()))
        });
        // The transport has let go of the spans unless the send was cut
        // short; then the next export starts a new buffer.
        if let Ok(back) = spans.try_into_mut() {
            let mut back = Vec::from(back);
            back.clear();
            *spare = back;
        }
        if let Err(e) = sent {
            self.dropped.inc_by(count as u64);
            log::debug!("span export failed: {e}");
        }
    }
}

/// How spans reach the collector (plain HTTP: validation refuses TLS).
enum Transport {
    /// OTLP/gRPC: `TraceService/Export` over HTTP/2.
    Grpc(tonic::client::Grpc<tonic::transport::Channel>),
    /// OTLP/HTTP: a protobuf POST to `/v1/traces`.
    Http {
        client: reqwest::Client,
        url: String,
    },
}

/// The gRPC method of OTLP trace export.
const GRPC_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

impl Transport {
    /// A transport to `endpoint`; connects on first use. Must be called
    /// within a Tokio runtime.
    fn new(protocol: OtlpProtocol, endpoint: &str) -> anyhow::Result<Transport> {
        match protocol {
            OtlpProtocol::Grpc => {
                let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
                    .context("telemetry.otlp.endpoint")?
                    .connect_timeout(EXPORT_TIMEOUT)
                    .connect_lazy();
                Ok(Transport::Grpc(tonic::client::Grpc::new(channel)))
            }
            OtlpProtocol::HttpProtobuf => {
                let base = endpoint.trim_end_matches('/');
                let url = if base.ends_with("/v1/traces") {
                    base.to_string()
                } else {
                    format!("{base}/v1/traces")
                };
                // reqwest is built without a crypto provider; it gets ours,
                // unused, as the endpoint is plain HTTP.
                let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
                let client = reqwest::Client::builder()
                    .tls_backend_preconfigured(tls)
                    .connect_timeout(EXPORT_TIMEOUT)
                    .build()
                    .context("OTLP HTTP client")?;
                Ok(Transport::Http { client, url })
            }
        }
    }

    /// Sends one `ExportTraceServiceRequest`.
    async fn send(&self, message: ExportMessage) -> Result<(), String> {
        match self {
            Transport::Grpc(grpc) => {
                let mut grpc = grpc.clone();
                grpc.ready().await.map_err(|e| e.to_string())?;
                let path = http::uri::PathAndQuery::from_static(GRPC_EXPORT);
                grpc.unary(tonic::Request::new(message), path, EncodedCodec)
                    .await
                    .map(drop)
                    .map_err(|status| status.to_string())
            }
            Transport::Http { client, url } => {
                let response = client
                    .post(url)
                    .header("content-type", "application/x-protobuf")
                    .body(reqwest::Body::wrap(message))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                match response.status() {
                    s if s.is_success() => Ok(()),
                    s => Err(format!("the collector answered {s}")),
                }
            }
        }
    }
}

/// A gRPC codec for messages already encoded: the request goes as it is;
/// the response (an `ExportTraceServiceResponse`) is read and ignored, a
/// failure being reported in the gRPC status.
#[derive(Debug, Clone, Copy)]
struct EncodedCodec;

impl tonic::codec::Codec for EncodedCodec {
    type Encode = ExportMessage;
    type Decode = ();
    type Encoder = EncodedCodec;
    type Decoder = EncodedCodec;

    fn encoder(&mut self) -> Self::Encoder {
        EncodedCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        EncodedCodec
    }
}

impl tonic::codec::Encoder for EncodedCodec {
    type Item = ExportMessage;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: ExportMessage,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        dst.put_slice(&item.head);
        dst.put_slice(&item.spans);
        Ok(())
    }
}

impl tonic::codec::Decoder for EncodedCodec {
    type Item = ();
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<()>, tonic::Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use tether_config::{Otlp, OtlpProtocol};

    use opentelemetry::propagation::Injector;
    use opentelemetry::Context;
    use tether_filters::credentials::TRACESTATE;

    use super::*;
    use crate::otlp::tests::record;

    struct HeaderInjector<'a>(&'a mut Vec<(String, String)>);

    impl Injector for HeaderInjector<'_> {
        fn set(&mut self, key: &str, value: String) {
            self.0.push((key.to_string(), value));
        }
    }

    /// What the SDK's propagator injects for `span`, without empty values.
    fn sdk_injects(telemetry: &Telemetry, span: &RequestSpan) -> Vec<(String, String)> {
        let cx = Context::new().with_remote_span_context(span.context.clone());
        let mut headers = Vec::new();
        telemetry
            .propagator
            .inject_context(&cx, &mut HeaderInjector(&mut headers));
        headers.retain(|(_, value)| !value.is_empty());
        headers.sort();
        headers
    }

    #[test]
    fn trace_context_is_injected_as_the_sdk_injects_it() {
        let (telemetry, _) = telemetry(OtlpProtocol::Grpc, closed_port(), 16, 600_000);
        let callers = [
            None,
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
        ];
        for caller in callers {
            for state in [None, Some("vendor=abc,other=x-1"), Some("not a state")] {
                let mut from_caller = request(caller);
                if let Some(state) = state {
                    from_caller
                        .insert_header(TRACESTATE, state)
                        .expect("header");
                }
                let span = telemetry
                    .start(&from_caller, SystemTime::now())
                    .expect("a span");
                let trace = telemetry.trace_context(&span).expect("a trace context");
                let mut sent: Vec<(String, String)> = [
                    (TRACEPARENT, Some(trace.traceparent)),
                    (TRACESTATE, trace.tracestate),
                ]
                .into_iter()
                .filter_map(|(name, value)| {
                    let value = value?.to_str().expect("ascii").to_string();
                    Some((name.to_string(), value))
                })
                .collect();
                sent.sort();
                assert_eq!(sent, sdk_injects(&telemetry, &span), "{caller:?} {state:?}");
                assert_eq!(sent[0].1.len(), 55, "{sent:?}");
                // The records' trace id is the one the traceparent carries.
                let trace_id = Telemetry::trace_id(&span);
                assert_eq!(trace_id.as_str(), span.context.trace_id().to_string());
                assert_eq!(&sent[0].1[3..35], trace_id.as_str());
            }
        }
    }

    fn telemetry(
        protocol: OtlpProtocol,
        endpoint: String,
        max_queue: usize,
        flush_interval_ms: u64,
    ) -> (Telemetry, IntCounter) {
        let dropped = IntCounter::new("dropped", "dropped").expect("counter");
        let config = tether_config::Telemetry {
            otlp: Some(Otlp {
                endpoint,
                protocol,
                max_queue,
                flush_interval_ms,
            }),
            ..Default::default()
        };
        let telemetry = Telemetry::new(&config, dropped.clone()).expect("telemetry");
        (telemetry, dropped)
    }

    fn request(traceparent: Option<&str>) -> RequestHeader {
        let mut req =
            RequestHeader::build("GET", b"/v1/repos/tether/issues", None).expect("request");
        if let Some(tp) = traceparent {
            req.insert_header("traceparent", tp).expect("header");
        }
        req
    }

    fn queued(telemetry: &Telemetry) -> usize {
        let shared = &telemetry.inner.as_ref().expect("exporting").shared;
        shared.queue.lock().expect("queue").spans
    }

    /// A loopback port nothing listens on.
    fn closed_port() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        format!("http://{addr}")
    }

    #[test]
    fn an_unsampled_caller_trace_is_propagated_and_still_exported() {
        // The export thread never runs within the test (a long interval),
        // so the queue shows exactly what `finish` kept.
        let (telemetry, _) = telemetry(OtlpProtocol::Grpc, closed_port(), 16, 600_000);
        let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let span = telemetry
            .start(&request(Some(caller)), SystemTime::now())
            .expect("a span");
        let trace = telemetry.trace_context(&span).expect("a trace context");
        let sent = trace.traceparent.to_str().expect("ascii");
        assert!(
            sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{sent}"
        );
        assert!(sent.ends_with("-00"), "unsampled stays unsampled: {sent}");
        assert!(
            !sent.contains("00f067aa0ba902b7"),
            "our span is the API's parent: {sent}"
        );
        let policies = Vec::new();
        telemetry.finish(span, &record(&policies, None));
        assert_eq!(queued(&telemetry), 1, "every request leaves a span");
        let sampled = telemetry
            .start(
                &request(Some(&caller.replace("-00", "-01"))),
                SystemTime::now(),
            )
            .expect("a span");
        telemetry.finish(sampled, &record(&policies, None));
        let root = telemetry
            .start(&request(None), SystemTime::now())
            .expect("a span");
        assert!(root.parent.is_none() && root.context.is_sampled());
        assert_eq!(queued(&telemetry), 2, "a sampled caller's span is queued");
    }

    #[test]
    fn the_queue_holds_a_bounded_number_of_bytes_whatever_the_spans_hold() {
        // A collector that takes the connection and never answers: the
        // first export waits, and the queue is left to fill.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let endpoint = format!("http://{}", silent.local_addr().expect("addr"));
        let (telemetry, dropped) = telemetry(OtlpProtocol::Grpc, endpoint, 1_000_000, 600_000);
        let policies = Vec::new();
        let long = format!("/{}", "a".repeat(256 << 10));
        let mut sent = 0;
        while dropped.get() < 4 {
            let span = telemetry
                .start(&request(None), SystemTime::now())
                .expect("a span");
            let mut record = record(&policies, None);
            record.path = &long;
            telemetry.finish(span, &record);
            sent += 1;
            let shared = &telemetry.inner.as_ref().expect("exporting").shared;
            let held = shared.queue.lock().expect("queue").bytes.len();
            assert!(held <= MAX_QUEUE_BYTES, "{held} bytes queued");
            assert!(sent < 200, "nothing was ever dropped");
        }
    }

    #[test]
    fn spans_a_collector_never_takes_are_dropped_and_counted() {
        for protocol in [OtlpProtocol::Grpc, OtlpProtocol::HttpProtobuf] {
            let (telemetry, dropped) = telemetry(protocol, closed_port(), 2, 20);
            let policies = Vec::new();
            for _ in 0..3 {
                let span = telemetry
                    .start(&request(None), SystemTime::now())
                    .expect("a span");
                telemetry.finish(span, &record(&policies, None));
            }
            // One over the queue's bound at once; the two queued when the
            // export to the closed port fails.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while dropped.get() < 3 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            assert_eq!(dropped.get(), 3, "{protocol:?}");
            assert_eq!(queued(&telemetry), 0, "{protocol:?}: nothing held");
            telemetry.shutdown();
            // After shutdown no one exports: a span is counted, not held.
            let span = telemetry
                .start(&request(None), SystemTime::now())
                .expect("a span");
            telemetry.finish(span, &record(&policies, None));
            assert_eq!(dropped.get(), 4, "{protocol:?}");
            assert_eq!(queued(&telemetry), 0, "{protocol:?}");
        }
    }
}
