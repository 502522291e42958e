//! OpenTelemetry: one server span per request, exported over OTLP.
//!
//! Spans are queued in a bounded batch processor and sent from its own
//! thread: a slow or absent collector costs dropped spans (counted in
//! `tether_spans_dropped_total`), never a slower request.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    SdkTracer, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use pingora_http::RequestHeader;
use prometheus::IntCounter;
use tether_config::OtlpProtocol;
use tether_filters::record::AuditRecord;

/// A request's span while the request runs.
pub type RequestSpan = opentelemetry_sdk::trace::Span;

/// Span export, or nothing when no collector is configured.
pub struct Telemetry {
    inner: Option<Exporting>,
    propagator: TraceContextPropagator,
}

struct Exporting {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    // Holds the tonic channel's tasks; dropped last.
    _runtime: tokio::runtime::Runtime,
}

impl Telemetry {
    /// Starts export as configured.
    pub fn new(
        config: &tether_config::Telemetry,
        dropped: IntCounter,
    ) -> anyhow::Result<Telemetry> {
        let propagator = TraceContextPropagator::new();
        let Some(otlp) = &config.otlp else {
            return Ok(Telemetry {
                inner: None,
                propagator,
            });
        };
        // tonic needs a Tokio runtime for its connection tasks; a small one
        // of its own keeps export off the proxy's worker threads.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tether-otlp")
            .enable_all()
            .build()?;
        let exporter = runtime.block_on(async {
            match otlp.protocol {
                OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(otlp.endpoint.clone())
                    .with_timeout(Duration::from_secs(5))
                    .build(),
                OtlpProtocol::HttpProtobuf => {
                    let endpoint = if otlp.endpoint.trim_end_matches('/').ends_with("/v1/traces") {
                        otlp.endpoint.clone()
                    } else {
                        format!("{}/v1/traces", otlp.endpoint.trim_end_matches('/'))
                    };
                    opentelemetry_otlp::SpanExporter::builder()
                        .with_http()
                        .with_protocol(Protocol::HttpBinary)
                        .with_endpoint(endpoint)
                        .with_timeout(Duration::from_secs(5))
                        .build()
                }
            }
        })?;
        let processor = ClockedBatchProcessor::start(
            CountingExporter {
                inner: exporter,
                dropped: dropped.clone(),
            },
            runtime.handle().clone(),
            otlp.max_queue,
            Duration::from_millis(otlp.flush_interval_ms),
            dropped,
        )?;
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(
                Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("tether");
        Ok(Telemetry {
            inner: Some(Exporting {
                provider,
                tracer,
                _runtime: runtime,
            }),
            propagator,
        })
    }

    /// Starts the span of a request, as a child of the caller's
    /// `traceparent` when it sent one.
    pub fn start(&self, req: &RequestHeader, started: SystemTime) -> Option<RequestSpan> {
        let exporting = self.inner.as_ref()?;
        let parent = self.propagator.extract(&HeaderExtractor(&req.headers));
        let span = exporting
            .tracer
            .span_builder(req.method.to_string())
            .with_kind(SpanKind::Server)
            .with_start_time(started)
            .start_with_context(&exporting.tracer, &parent);
        Some(span)
    }

    /// Adds the span's `traceparent` to the upstream request, so the API's
    /// own spans join the same trace.
    pub fn inject(&self, span: &RequestSpan, upstream: &mut RequestHeader) {
        let cx = Context::new().with_remote_span_context(span.span_context().clone());
        let mut headers = Vec::new();
        self.propagator
            .inject_context(&cx, &mut HeaderInjector(&mut headers));
        for (name, value) in headers {
            let _ = upstream.insert_header(name, value);
        }
    }

    /// Ends the span with the request's facts.
    pub fn finish(&self, mut span: RequestSpan, record: &AuditRecord<'_>) {
        let name = match record.route {
            Some(route) => format!("{} {route}", record.method),
            None => record.method.to_string(),
        };
        span.update_name(name);
        span.set_attributes(attributes(record));
        if record.status >= 500 {
            span.set_status(Status::error(record.reason));
        }
        span.end();
    }

    /// The trace id of a span, as 32 hex digits.
    pub fn trace_id(span: &RequestSpan) -> String {
        span.span_context().trace_id().to_string()
    }

    /// Sends what is queued and stops export.
    pub fn shutdown(&self) {
        if let Some(exporting) = &self.inner {
            if let Err(e) = exporting.provider.shutdown() {
                log::warn!("OpenTelemetry shutdown: {e}");
            }
        }
    }
}

/// Span attributes: HTTP semantic conventions, plus Tether's facts.
fn attributes(r: &AuditRecord<'_>) -> Vec<KeyValue> {
    let mut a = vec![
        KeyValue::new("http.request.method", r.method.to_string()),
        KeyValue::new("url.path", r.path.to_string()),
        KeyValue::new("http.response.status_code", i64::from(r.status)),
        KeyValue::new("tether.request_id", r.request_id.clone()),
        KeyValue::new("tether.decision", r.decision),
        KeyValue::new("tether.reason", r.reason),
        KeyValue::new("tether.generation", r.generation as i64),
    ];
    let mut text = |key: &'static str, value: Option<&str>| {
        if let Some(v) = value {
            a.push(KeyValue::new(key, v.to_string()));
        }
    };
    text("http.route", r.route);
    text("client.address", r.client.as_deref());
    text("gen_ai.agent.id", r.agent);
    text("tether.identity_kind", r.identity_kind);
    text("tether.owner", r.owner);
    text("tether.team", r.team);
    // The person the agents act for answers for the action too.
    text("enduser.id", r.on_behalf_of);
    text("tether.stage", r.stage);
    text("tether.action", r.action.as_deref());
    text("tether.resource", r.resource.as_deref());
    text("mcp.method.name", r.mcp_method);
    text("gen_ai.tool.name", r.tool);
    if let Some(chain) = &r.delegation_chain {
        a.push(KeyValue::new(
            "tether.delegation.chain",
            string_array(chain),
        ));
        // The chain starts with the subject; the depth counts agents.
        a.push(KeyValue::new(
            "tether.delegation.depth",
            chain.len() as i64 - 1,
        ));
    }
    if !r.policies.is_empty() {
        a.push(KeyValue::new("tether.policies", string_array(r.policies)));
    }
    if let Some(shadow) = &r.shadow {
        a.push(KeyValue::new("tether.shadow.decision", shadow.decision));
    }
    if let Some(cached) = r.cached {
        a.push(KeyValue::new("tether.cached", cached));
    }
    a
}

fn string_array<S: AsRef<str>>(items: &[S]) -> opentelemetry::Value {
    opentelemetry::Value::Array(
        items
            .iter()
            .map(|s| s.as_ref().to_string().into())
            .collect::<Vec<opentelemetry::StringValue>>()
            .into(),
    )
}

/// A batch span processor whose export thread wakes on a clock. The SDK's
/// `BatchSpanProcessor` wakes its thread for every span ended (a futex
/// wake-up per request, a few percent of the proxy's CPU); here ending a
/// span only appends to a bounded queue, and the thread takes the whole
/// queue every `interval`.
struct ClockedBatchProcessor<E: SpanExporter> {
    shared: Arc<Shared<E>>,
    thread: std::thread::Thread,
}

/// Spans that wake the export thread before its interval is up.
const EXPORT_BATCH: usize = 512;

struct Shared<E> {
    queue: Mutex<Vec<SpanData>>,
    max_queue: usize,
    /// Spans lost: queue full (here) or export failed (the exporter).
    dropped: IntCounter,
    exporter: Mutex<E>,
    runtime: tokio::runtime::Handle,
    closing: AtomicBool,
}

impl<E: SpanExporter + 'static> ClockedBatchProcessor<E> {
    fn start(
        exporter: E,
        runtime: tokio::runtime::Handle,
        max_queue: usize,
        interval: Duration,
        dropped: IntCounter,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Vec::new()),
            max_queue,
            dropped,
            exporter: Mutex::new(exporter),
            runtime,
            closing: AtomicBool::new(false),
        });
        let worker = shared.clone();
        let handle = std::thread::Builder::new()
            .name("tether-spans".into())
            .spawn(move || loop {
                std::thread::park_timeout(interval);
                // A failed export is counted by the exporter; say why.
                if let Err(e) = worker.export_queued() {
                    log::debug!("span export failed: {e}");
                }
                if worker.closing.load(Ordering::Acquire) {
                    return;
                }
            })?;
        Ok(ClockedBatchProcessor {
            shared,
            thread: handle.thread().clone(),
        })
    }
}

impl<E: SpanExporter> Shared<E> {
    fn export_queued(&self) -> OTelSdkResult {
        let batch = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()));
        if batch.is_empty() {
            return Ok(());
        }
        let exporter = self.exporter.lock().unwrap_or_else(|p| p.into_inner());
        self.runtime.block_on(exporter.export(batch))
    }
}

impl<E: SpanExporter> fmt::Debug for ClockedBatchProcessor<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClockedBatchProcessor")
    }
}

impl<E: SpanExporter + 'static> SpanProcessor for ClockedBatchProcessor<E> {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        let mut queue = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.len() >= self.shared.max_queue {
            drop(queue);
            self.shared.dropped.inc();
            return;
        }
        queue.push(span);
        // A full batch goes at once (one wake-up per batch): memory stays
        // at a batch or so under load, whatever the interval.
        if queue.len().is_multiple_of(EXPORT_BATCH) {
            drop(queue);
            self.thread.unpark();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.shared.export_queued()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.shared.closing.store(true, Ordering::Release);
        self.thread.unpark();
        let result = self.shared.export_queued();
        let exporter = self
            .shared
            .exporter
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        exporter.shutdown_with_timeout(timeout)?;
        result
    }

    fn set_resource(&mut self, resource: &Resource) {
        let mut exporter = self
            .shared
            .exporter
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        exporter.set_resource(resource);
    }
}

/// Counts spans lost to failed exports.
struct CountingExporter<E> {
    inner: E,
    dropped: IntCounter,
}

impl<E> fmt::Debug for CountingExporter<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CountingExporter")
    }
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let result = self.inner.export(batch).await;
        if result.is_err() {
            self.dropped.inc_by(n);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> Result<(), OTelSdkError> {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
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

struct HeaderInjector<'a>(&'a mut Vec<(String, String)>);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_string(), value));
    }
}
