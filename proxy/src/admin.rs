//! The admin listener: health, readiness and Prometheus metrics. It binds
//! to loopback by default; agents never reach it.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{Encoder, TextEncoder};

use crate::app::App;

/// Serves `/healthz`, `/readyz` and `/metrics`.
pub struct AdminApp {
    app: Arc<App>,
}

impl AdminApp {
    /// The admin endpoints of `app`.
    pub fn new(app: Arc<App>) -> AdminApp {
        AdminApp { app }
    }

    fn metrics(&self) -> Vec<u8> {
        let m = &self.app.metrics;
        m.cache_entries.set(self.app.cache.entry_count() as i64);
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
        let (status, content_type, body) = match path.as_str() {
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
            .body(body)
            .unwrap_or_default()
    }
}
