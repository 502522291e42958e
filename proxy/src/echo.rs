//! A built-in upstream for the demo and the tests: an HTTP/1.1 server that
//! answers every request with what it received, as JSON, so a caller can
//! see exactly what Tether forwarded.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tether_filters::identity::PeerIdentity;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// Starts the echo server on a free loopback port; it runs until the
/// runtime stops.
pub async fn start() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream, None));
        }
    });
    Ok(addr)
}

/// Starts an echo server that requires mTLS: the client certificate must
/// chain to `client_ca_pem`. Each response names the client's SPIFFE ID
/// and certificate thumbprint (`client`), and closes the connection, so
/// every request shows the certificate of a fresh handshake.
pub async fn start_mtls(
    cert_pem: &str,
    key_pem: &str,
    client_ca_pem: &str,
) -> anyhow::Result<SocketAddr> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(client_ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let chain =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let client = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|leaf| PeerIdentity::from_leaf_der(leaf).ok())
                    .map(|peer| {
                        serde_json::json!({
                            "spiffe_id": peer.id.as_str(),
                            "cert_sha256": peer.cert_sha256.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                        })
                    });
                serve(tls, Some(client.unwrap_or_default())).await;
            });
        }
    });
    Ok(addr)
}

/// A minimal MCP server: `tools/list` offers three tools; any other call
/// is answered with what was received (`raw`: the body's bytes, as text),
/// so a test sees what was forwarded. Two test switches: `params.cursor`
/// `"twins"` adds a `Tools` list beside `tools` and a `Name` beside a
/// tool's `name` (what a Go client would read too); `params._meta.tools`
/// answers any call with the list of tools, as a server replaying an
/// earlier answer would.
fn json_rpc(
    call: &serde_json::Value,
    raw: &[u8],
    headers: &serde_json::Map<String, serde_json::Value>,
) -> serde_json::Value {
    let result = if call["method"] == "tools/list" || call["params"]["_meta"]["tools"] == true {
        let mut result = serde_json::json!({"tools": tools(), "_meta": {"accept-encoding": headers.get("accept-encoding")}});
        if call["params"]["cursor"] == "twins" {
            result["Tools"] = tools();
            result["tools"][0]["Name"] = "delete_repo".into();
        }
        result
    } else {
        serde_json::json!({
            "received": call,
            "raw": String::from_utf8_lossy(raw),
            "headers": headers,
        })
    };
    serde_json::json!({"jsonrpc": "2.0", "id": call["id"], "result": result})
}

/// The tools the server offers.
fn tools() -> serde_json::Value {
    serde_json::json!([
        {"name": "search_issues", "description": "search issues"},
        {"name": "create_issue", "description": "file an issue"},
        {"name": "delete_repo", "description": "delete a repository"},
    ])
}

/// The server's `GET` stream resumed after `Last-Event-ID`, as an SDK
/// event store replays it: the answer to an earlier `tools/list`, whole.
fn replayed_stream() -> String {
    let answer = serde_json::json!({"jsonrpc": "2.0", "id": 3, "result": {"tools": tools()}});
    format!("id: 41\nevent: message\ndata: {answer}\n\n")
}

/// `answer` as MCP's Streamable HTTP sends it when the client prefers
/// Server-Sent Events: after a notification, its JSON split over two
/// `data` lines (a client joins them with a newline, so the split is after
/// the first member, never inside a string).
fn server_sent_events(answer: &str) -> String {
    let (head, tail) = answer.split_at(answer.find(',').map_or(0, |i| i + 1));
    let progress = r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progress":1}}"#;
    format!("event: message\ndata: {progress}\n\nid: 1\ndata: {head}\ndata: {tail}\n\n")
}

/// Serves keep-alive requests on one connection until it closes; with a
/// `client` (an mTLS connection), one request, answered with who the
/// client was.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    client: Option<serde_json::Value>,
) {
    let mut buf = Vec::with_capacity(4096);
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.len() > 64 * 1024 {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap_or_default().split(' ');
        let method = request_line.next().unwrap_or_default().to_string();
        let target = request_line.next().unwrap_or_default().to_string();
        let headers: serde_json::Map<String, serde_json::Value> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().into()))
            .collect();
        let body_len = headers
            .get("content-length")
            .and_then(|v| v.as_str())
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        let mut consumed = head_end + 4;
        while buf.len() < consumed + body_len {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        consumed += body_len;
        let request_body = &buf[head_end + 4..consumed];
        let mut content_type = "application/json";
        let body = match serde_json::from_slice::<serde_json::Value>(request_body) {
            _ if method == "GET" && headers.contains_key("last-event-id") => {
                content_type = "text/event-stream";
                replayed_stream()
            }
            Ok(call) if call.get("jsonrpc").is_some() => {
                let answer = json_rpc(&call, request_body, &headers).to_string();
                let accept = headers.get("accept").and_then(|v| v.as_str());
                match accept {
                    Some(v) if v.starts_with("text/event-stream") => {
                        content_type = "text/event-stream; charset=utf-8";
                        server_sent_events(&answer)
                    }
                    // A server that answers with something else entirely.
                    Some(v) if v.starts_with("text/html") => {
                        content_type = "text/html";
                        format!("<pre>{answer}</pre>")
                    }
                    _ => answer,
                }
            }
            _ => serde_json::json!({
                "upstream": "echo",
                "method": method,
                "target": target,
                "headers": headers,
                "client": client,
            })
            .to_string(),
        };
        let close = if client.is_some() {
            "connection: close\r\n"
        } else {
            ""
        };
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n{close}\r\n{body}",
            body.len()
        );
        buf.drain(..consumed);
        if stream.write_all(response.as_bytes()).await.is_err() || client.is_some() {
            let _ = stream.shutdown().await;
            return;
        }
    }
}
