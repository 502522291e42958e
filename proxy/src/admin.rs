//! The admin listener: health, readiness, Prometheus metrics and reload.
//! It binds to loopback by default and asks no credentials: in ingress
//! mode agents, on other hosts, do not reach it; in egress mode the agent
//! shares the pod's loopback and can, which is why a reload with nothing
//! changed reads nothing and the metrics say nothing of other pods.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{Encoder, TextEncoder};

use crate::app::App;

/// Serves `/healthz`, `/readyz`, `/metrics` and `POST /reload`.
pub struct AdminApp {
    app: Arc<App>,
}

impl AdminApp {
    /// The admin endpoints of `app`.
    pub fn new(app: Arc<App>) -> AdminApp {
        AdminApp { app }
    }

    /// Reloads off the async threads (it reads files and parses Cedar).
    async fn reload(&self) -> (u16, &'static str, Vec<u8>) {
        let app = self.app.clone();
        let result = tokio::task::spawn_blocking(move || app.reload()).await;
        let (status, body) = match result {
            Ok(Ok((generation, loaded))) => (
                200,
                serde_json::json!({
                    "status": if loaded { "reloaded" } else { "unchanged" },
                    "generation": generation,
                }),
            ),
            Ok(Err(errors)) => (
                422,
                serde_json::json!({
                    "status": "refused",
                    "generation": self.app.snapshot.load().generation,
                    "errors": errors.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                }),
            ),
            Err(e) => (
                500,
                serde_json::json!({"status": "failed", "error": e.to_string()}),
            ),
        };
        (status, "application/json", body.to_string().into_bytes())
    }

    fn metrics(&self) -> Vec<u8> {
        let m = &self.app.metrics;
        m.cache_entries.set(self.app.cache.entry_count() as i64);
        // Only the certificates held now: a trust domain a reload removed
        // must not go on being exported with its last value.
        m.certificate_expiry.reset();
        for (certificate, seconds) in self.app.certificate_expiry() {
            m.certificate_expiry
                .with_label_values(&[certificate.as_str()])
                .set(seconds);
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&m.registry.gather(), &mut out) {
            log::error!("cannot encode metrics: {e}");
        }
        out
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let post = session.req_header().method == http::Method::POST;
        let (status, content_type, body) = match path.as_str() {
            "/reload" if post => self.reload().await,
            "/reload" => (405, "text/plain", b"use POST /reload\n".to_vec()),
            "/healthz" => (200, "text/plain", b"ok\n".to_vec()),
            // Serving at all means the config loaded and the listeners
            // bound: the process refuses to start otherwise.
            "/readyz" => (200, "text/plain", b"ready\n".to_vec()),
            "/metrics" => (200, "text/plain; version=0.0.4", self.metrics()),
            _ => (
                404,
                "text/plain",
                b"not found: try /healthz, /readyz or /metrics\n".to_vec(),
            ),
        };
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .header("content-length", body.len())
            // Lets a supervisor (or a test) tell which process answered.
            .header("x-tether-pid", std::process::id())
            .body(body)
            .unwrap_or_default()
    }
}
