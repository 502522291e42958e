//! Span export to a real OpenTelemetry collector (rotel), over OTLP/gRPC
//! and OTLP/HTTP: one span per request, allowed and denied, carrying the
//! agent, its owner, the decision and the policies, in the caller's trace.
//!
//! rotel comes from PyPI (`pip install rotel`); `.ci/run` installs it under
//! `target/tools/venv`. Set `TETHER_ROTEL` to use another `rotel-agent`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod support;

use support::{TETHER, TRIAGE};
use tether::demo::{free_port, start_sandbox};
use tether_config::{Otlp, OtlpProtocol};

fn rotel_agent() -> PathBuf {
    if let Some(path) = std::env::var_os("TETHER_ROTEL") {
        return PathBuf::from(path);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/venv/lib");
    let found = std::fs::read_dir(&venv).ok().and_then(|entries| {
        entries
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("site-packages/rotel/rotel-agent"))
            .find(|p| p.exists())
    });
    found.unwrap_or_else(|| {
        panic!(
            "rotel-agent not found: run `python3 -m venv target/tools/venv && \
             target/tools/venv/bin/pip install rotel==0.0.1a15` (as .ci/run does), \
             or set TETHER_ROTEL"
        )
    })
}

struct Collector {
    child: Child,
    output: PathBuf,
    grpc: std::net::SocketAddr,
    http: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Collector {
    fn start() -> Collector {
        let dir = tempfile::tempdir().expect("dir");
        let output = dir.path().join("rotel.out");
        let grpc = free_port().expect("port");
        let http = free_port().expect("port");
        let child = Command::new(rotel_agent())
            .args(["start", "--exporter", "blackhole", "--debug-log", "traces"])
            .args(["--debug-log-verbosity", "detailed"])
            .arg("--otlp-grpc-endpoint")
            .arg(grpc.to_string())
            .arg("--otlp-http-endpoint")
            .arg(http.to_string())
            .env("NO_COLOR", "1")
            .stdout(std::fs::File::create(&output).expect("output"))
            .stderr(Stdio::null())
            .spawn()
            .expect("rotel-agent starts");
        let collector = Collector {
            child,
            output,
            grpc,
            http,
            _dir: dir,
        };
        collector.wait_for(|text| text.contains("Starting Rotel"), "rotel to start");
        collector
    }

    fn wait_for(&self, done: impl Fn(&str) -> bool, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = std::fs::read_to_string(&self.output).unwrap_or_default();
            if done(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Spans as rotel prints them: attribute name to printed value, plus
/// `trace_id`, `parent_id`, `name`, `kind` and the resource's
/// `service.name`.
fn spans(text: &str) -> Vec<HashMap<String, String>> {
    let mut spans = Vec::new();
    let mut service = String::new();
    let mut current: Option<HashMap<String, String>> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with("ResourceSpans #") || trimmed.starts_with("Span #") {
            spans.extend(current.take());
            if trimmed.starts_with("Span #") {
                let mut span = HashMap::new();
                span.insert("service.name".to_string(), service.clone());
                current = Some(span);
            }
        } else if let Some(rest) = trimmed.strip_prefix("-> ") {
            let Some((key, value)) = rest.split_once(": ") else {
                continue;
            };
            match &mut current {
                Some(span) => {
                    span.insert(key.to_string(), value.to_string());
                }
                None if key == "service.name" => service = value.to_string(),
                None => {}
            }
        } else if let Some((field, value)) = trimmed.split_once(" : ") {
            // The span's own fields: `Trace ID       : 4bf9...`.
            let key = match field.trim() {
                "Trace ID" => "trace_id",
                "Parent ID" => "parent_id",
                "ID" => "id",
                "Name" => "name",
                "Kind" => "kind",
                _ => continue,
            };
            if let Some(span) = &mut current {
                span.insert(key.into(), value.trim().to_string());
            }
        }
    }
    spans.extend(current);
    spans
}

#[test]
fn one_span_per_request_reaches_a_real_collector_over_grpc_and_http() {
    let collector = Collector::start();
    let rt = support::runtime();
    let upstream = rt.block_on(tether::echo::start()).expect("upstream");

    for (protocol, endpoint, service) in [
        (
            OtlpProtocol::Grpc,
            format!("http://{}", collector.grpc),
            "tether-grpc",
        ),
        (
            OtlpProtocol::HttpProtobuf,
            format!("http://{}", collector.http),
            "tether-http",
        ),
    ] {
        let sandbox = start_sandbox(Path::new(TETHER), upstream, |c| {
            c.telemetry.service_name = service.into();
            c.telemetry.otlp = Some(Otlp {
                endpoint,
                protocol,
                max_queue: 1024,
                flush_interval_ms: 100,
            });
        })
        .expect("tether starts");
        let client = sandbox.client(Some(TRIAGE)).expect("client");
        let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let traceparent = format!("00-{caller_trace}-00f067aa0ba902b7-01");
        let allowed = rt
            .block_on(client.send(
                "GET",
                "/v1/repos/tether/issues",
                &[("traceparent", &traceparent)],
            ))
            .expect("allowed");
        assert_eq!(allowed.status, 200);
        // The API's request carries the same trace.
        let forwarded = allowed.json().expect("echo")["headers"]["traceparent"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(forwarded.contains(caller_trace), "{forwarded}");
        let denied = rt
            .block_on(client.send("DELETE", "/v1/repos/tether", &[]))
            .expect("denied");
        assert_eq!(denied.status, 403);

        let text = collector.wait_for(
            |t| {
                spans(t)
                    .iter()
                    .filter(|s| s["service.name"] == format!("Str({service})"))
                    .count()
                    >= 2
            },
            "two spans",
        );
        let ours: Vec<_> = spans(&text)
            .into_iter()
            .filter(|s| s["service.name"] == format!("Str({service})"))
            .collect();
        assert_eq!(ours.len(), 2, "{protocol:?}: {ours:?}");
        let find = |decision: &str| {
            ours.iter()
                .find(|s| s.get("tether.decision").map(String::as_str) == Some(decision))
                .unwrap_or_else(|| panic!("{protocol:?}: no {decision} span in {ours:?}"))
        };
        let allow = find("Str(allow)");
        assert_eq!(allow["gen_ai.agent.id"], format!("Str({TRIAGE})"));
        assert_eq!(allow["tether.owner"], "Str(alice@example.org)");
        assert_eq!(allow["http.request.method"], "Str(GET)");
        assert_eq!(allow["http.route"], "Str(/v1/repos/{repo}/issues)");
        assert_eq!(allow["http.response.status_code"], "Int(200)");
        assert!(
            allow["tether.policies"].contains("agents-work-issues"),
            "{allow:?}"
        );
        assert_eq!(allow["trace_id"], caller_trace);
        assert_eq!(allow["parent_id"], "00f067aa0ba902b7", "the caller's span");
        assert_eq!(allow["name"], "GET /v1/repos/{repo}/issues");
        assert_eq!(allow["kind"], "SPAN_KIND_SERVER");
        assert!(
            forwarded.contains(&allow["id"]),
            "the API's parent is our span"
        );

        let deny = find("Str(deny)");
        assert_eq!(deny["tether.reason"], "Str(policy_denied)");
        assert_eq!(deny["tether.owner"], "Str(alice@example.org)");
        assert_eq!(deny["http.response.status_code"], "Int(403)");
        assert!(
            deny["tether.policies"].contains("no-repo-deletion-by-agents"),
            "{deny:?}"
        );

        // The audit lines name the same traces.
        let audit = sandbox.audit_lines(2);
        assert_eq!(audit[0]["trace_id"], caller_trace);
        assert_eq!(
            audit[1]["trace_id"].as_str(),
            Some(deny["trace_id"].as_str())
        );
    }
}
