//! A built-in upstream for the demo and the tests: an HTTP/1.1 server that
//! answers every request with what it received, as JSON, so a caller can
//! see exactly what Tether forwarded.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Starts the echo server on a free loopback port; it runs until the
/// runtime stops.
pub async fn start() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream));
        }
    });
    Ok(addr)
}

/// A minimal MCP server: `tools/list` offers three tools; any other call
/// is answered with what was received, so a test sees what was forwarded.
fn json_rpc(
    call: &serde_json::Value,
    headers: &serde_json::Map<String, serde_json::Value>,
) -> serde_json::Value {
    let result = if call["method"] == "tools/list" {
        serde_json::json!({"tools": [
            {"name": "search_issues", "description": "search issues"},
            {"name": "create_issue", "description": "file an issue"},
            {"name": "delete_repo", "description": "delete a repository"},
        ]})
    } else {
        serde_json::json!({"received": call, "headers": headers})
    };
    serde_json::json!({"jsonrpc": "2.0", "id": call["id"], "result": result})
}

/// Serves keep-alive requests on one connection until it closes.
async fn serve(mut stream: TcpStream) {
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
        let body = match serde_json::from_slice::<serde_json::Value>(request_body) {
            Ok(call) if call.get("jsonrpc").is_some() => json_rpc(&call, &headers),
            _ => serde_json::json!({
                "upstream": "echo",
                "method": method,
                "target": target,
                "headers": headers,
            }),
        }
        .to_string();
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        buf.drain(..consumed);
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}
