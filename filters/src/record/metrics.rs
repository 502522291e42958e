//! Tether's Prometheus metrics: one set for the process, every series
//! created at start, so a request looks up no label.

use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use super::decision_label;
use crate::Reason;

/// Tether's Prometheus metrics, all prefixed `tether_`.
pub struct Metrics {
    /// The registry `/metrics` serves.
    pub registry: Registry,
    /// Per reason, its series (`allow` for `allowed`, else `deny`) and,
    /// for a failure that can follow an allow, the `allow` series of it.
    requests: Vec<(IntCounter, Option<IntCounter>)>,
    request_duration: Histogram,
    /// Decisions answered from the cache.
    pub cache_hits: IntCounter,
    /// Decisions evaluated by Cedar.
    pub cache_misses: IntCounter,
    /// Decisions held in the cache, set at scrape time.
    pub cache_entries: IntGauge,
    /// Audit lines dropped because the writer fell behind.
    pub audit_dropped: IntCounter,
    /// Spans dropped because the exporter fell behind.
    pub spans_dropped: IntCounter,
    /// Client certificates refused during the TLS handshake, by reason.
    pub client_cert_rejected: IntCounterVec,
    /// Upstream certificates refused, by upstream and reason.
    pub upstream_cert_rejected: IntCounterVec,
    /// The generation of the snapshot serving requests.
    pub config_generation: IntGauge,
    /// Reloads refused because the new version was invalid.
    pub config_reload_failures: IntCounter,
    /// 1 if the last reload attempt succeeded, 0 if the old version kept
    /// serving because the new one was refused.
    pub config_last_reload_successful: IntGauge,
    /// Requests where the shadow policies decided differently.
    pub shadow_disagreements: IntCounter,
    /// Seconds until each certificate Tether holds expires (negative once
    /// expired), by `certificate`: `listener`, `workload`, `bundle:<td>`.
    /// Set at scrape time.
    pub certificate_expiry: IntGaugeVec,
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests_vec = IntCounterVec::new(
            Opts::new(
                "tether_requests_total",
                "Requests handled, by decision (allow or deny) and reason code.",
            ),
            &["decision", "reason"],
        )?;
        registry.register(Box::new(requests_vec.clone()))?;
        // One handle per reason and decision, resolved now: no label
        // lookup per request, and every series exists from the start (at
        // zero). Only reasons that can follow an allow have an allow series.
        let requests = Reason::ALL
            .iter()
            .map(|r| {
                let series = |allowed| {
                    requests_vec.with_label_values(&[decision_label(*r, allowed), r.code()])
                };
                let after_allow = (!r.is_allowed() && r.can_follow_allow()).then(|| series(true));
                (series(false), after_allow)
            })
            .collect();
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let request_duration = Histogram::with_opts(
            HistogramOpts::new(
                "tether_request_duration_seconds",
                "Time from request arrival to the end of the response, all outcomes.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0,
            ]),
        )?;
        registry.register(Box::new(request_duration.clone()))?;
        let client_cert_rejected = IntCounterVec::new(
            Opts::new(
                "tether_client_cert_rejected_total",
                "Client certificates refused during the TLS handshake, by reason.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(client_cert_rejected.clone()))?;
        let upstream_cert_rejected = IntCounterVec::new(
            Opts::new(
                "tether_upstream_cert_rejected_total",
                "Upstream certificates refused during the TLS handshake (an upstream authorized by SPIFFE ID), by upstream and reason.",
            ),
            &["upstream", "reason"],
        )?;
        registry.register(Box::new(upstream_cert_rejected.clone()))?;
        let certificate_expiry = IntGaugeVec::new(
            Opts::new(
                "tether_certificate_expiry_seconds",
                "Seconds until the certificate expires: the listener's, the workload SVID, each trust bundle's first to expire.",
            ),
            &["certificate"],
        )?;
        registry.register(Box::new(certificate_expiry.clone()))?;
        Ok(Metrics {
            certificate_expiry,
            requests,
            request_duration,
            cache_hits: counter(
                "tether_decision_cache_hits_total",
                "Authorization decisions answered from the cache.",
            )?,
            cache_misses: counter(
                "tether_decision_cache_misses_total",
                "Authorization decisions evaluated by Cedar.",
            )?,
            cache_entries: gauge(
                "tether_decision_cache_entries",
                "Decisions held in the cache.",
            )?,
            audit_dropped: counter(
                "tether_audit_dropped_total",
                "Audit lines dropped because the writer fell behind.",
            )?,
            spans_dropped: counter(
                "tether_spans_dropped_total",
                "Spans dropped because the exporter fell behind or failed.",
            )?,
            config_generation: gauge(
                "tether_config_generation",
                "Generation of the configuration serving requests.",
            )?,
            config_reload_failures: counter(
                "tether_config_reload_failures_total",
                "Reloads refused because the new configuration was invalid.",
            )?,
            config_last_reload_successful: gauge(
                "tether_config_last_reload_successful",
                "1 if the last reload succeeded, 0 if the previous version kept serving.",
            )?,
            shadow_disagreements: counter(
                "tether_shadow_disagreements_total",
                "Requests where the shadow policies decided differently from the enforced ones.",
            )?,
            client_cert_rejected,
            upstream_cert_rejected,
            registry,
        })
    }

    /// Counts one finished request.
    /// Counts a finished request: its `reason`, and whether every stage
    /// `allowed` it ([`RequestCtx::allowed`]).
    pub fn observe(&self, reason: Reason, allowed: bool, elapsed: Duration) {
        if let Some(i) = Reason::ALL.iter().position(|r| *r == reason) {
            match &self.requests[i] {
                (_, Some(after_allow)) if allowed => after_allow.inc(),
                (series, _) => series.inc(),
            }
        }
        self.request_duration.observe(elapsed.as_secs_f64());
    }

    /// The count of requests with `reason` so far, allowed or not.
    pub fn requests(&self, reason: Reason) -> u64 {
        Reason::ALL
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| {
                let (series, after_allow) = &self.requests[i];
                series.get() + after_allow.as_ref().map_or(0, IntCounter::get)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_count_by_reason() {
        let m = Metrics::new().expect("metrics");
        let us = Duration::from_micros(50);
        m.observe(Reason::Allowed, true, us);
        m.observe(Reason::PolicyDenied, false, us);
        m.observe(Reason::PolicyDenied, false, us);
        // Forwarded, then the upstream failed; and failed before a decision.
        m.observe(Reason::UpstreamError, true, us);
        m.observe(Reason::Internal, false, us);
        assert_eq!(m.requests(Reason::Allowed), 1);
        assert_eq!(m.requests(Reason::PolicyDenied), 2);
        assert_eq!(m.requests(Reason::UpstreamError), 1);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&m.registry.gather())
            .expect("encode");
        for series in [
            r#"{decision="allow",reason="allowed"} 1"#,
            r#"{decision="deny",reason="policy_denied"} 2"#,
            r#"{decision="allow",reason="upstream_error"} 1"#,
            r#"{decision="deny",reason="upstream_error"} 0"#,
            r#"{decision="deny",reason="internal"} 1"#,
        ] {
            assert!(
                text.contains(&format!("tether_requests_total{series}")),
                "{series}: {text}"
            );
        }
        assert!(!text.contains(r#"decision="allow",reason="policy_denied""#));
    }
}
