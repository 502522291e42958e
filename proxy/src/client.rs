//! A small HTTPS client that presents an SVID, for `tether demo` and the
//! tests: one request per connection, raw HTTP/1.1, so a caller can send
//! exactly the bytes it means (unnormalized paths, spoofed headers).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A response, read whole.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).context("response body is not JSON")
    }
}

/// A client for one server, trusting `ca_pem`, presenting `identity`.
#[derive(Clone)]
pub struct Client {
    connector: TlsConnector,
    addr: SocketAddr,
}

impl Client {
    /// A client of the TLS server at `addr`, whose certificate must chain
    /// to `ca_pem` and name `127.0.0.1`. `identity` is a PEM certificate
    /// and key to present, or none.
    pub fn new(
        addr: SocketAddr,
        ca_pem: &str,
        identity: Option<(&str, &str)>,
    ) -> anyhow::Result<Client> {
        Client::build(addr, ca_pem, identity, false)
    }

    /// As [`Client::new`], but a connection resumes the TLS session of an
    /// earlier one when the server offers it, as most clients do: for
    /// tests of what a resumed session may still do.
    pub fn resuming(
        addr: SocketAddr,
        ca_pem: &str,
        identity: Option<(&str, &str)>,
    ) -> anyhow::Result<Client> {
        Client::build(addr, ca_pem, identity, true)
    }

    fn build(
        addr: SocketAddr,
        ca_pem: &str,
        identity: Option<(&str, &str)>,
        resume: bool,
    ) -> anyhow::Result<Client> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let config = match identity {
            Some((cert_pem, key_pem)) => {
                let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()?;
                let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                    .context("no private key in PEM")?;
                builder.with_client_auth_cert(chain, key)?
            }
            None => builder.with_no_client_auth(),
        };
        // Otherwise every connection a full handshake: a test sees the
        // certificates the server presents now, not those of a resumed
        // session.
        let mut config = config;
        if !resume {
            config.resumption = rustls::client::Resumption::disabled();
        }
        Ok(Client {
            connector: TlsConnector::from(Arc::new(config)),
            addr,
        })
    }

    /// Opens a keep-alive connection for many requests.
    pub async fn connect(&self) -> anyhow::Result<Connection> {
        let tcp = TcpStream::connect(self.addr).await?;
        let name = ServerName::IpAddress(self.addr.ip().into());
        Ok(Connection {
            tls: self.connector.connect(name, tcp).await?,
            host: self.addr.to_string(),
            buf: Vec::new(),
        })
    }

    /// Sends one request and reads the whole response.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Response> {
        self.send_body(method, path, headers, b"").await
    }

    /// Sends one request with a body (framed by `content-length`).
    pub async fn send_body(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<Response> {
        let tcp = TcpStream::connect(self.addr).await?;
        let name = ServerName::IpAddress(self.addr.ip().into());
        let mut tls = self.connector.connect(name, tcp).await?;
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n",
            self.addr
        );
        for (n, v) in headers {
            request.push_str(&format!("{n}: {v}\r\n"));
        }
        if !body.is_empty() {
            request.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        request.push_str("\r\n");
        tls.write_all(request.as_bytes()).await?;
        tls.write_all(body).await?;
        tls.flush().await?;
        let mut raw = Vec::new();
        // A server that closes without close_notify is fine once we have
        // a whole response.
        if let Err(e) = tls.read_to_end(&mut raw).await {
            if raw.is_empty() {
                return Err(e.into());
            }
        }
        parse_response(&raw)
    }
}

impl Client {
    /// Sends `request`, bytes as they are (a chunked body, say), on a
    /// connection of its own, and reads the response until the server
    /// closes the connection.
    pub async fn send_raw(&self, request: &[u8]) -> anyhow::Result<Response> {
        let tcp = TcpStream::connect(self.addr).await?;
        let name = ServerName::IpAddress(self.addr.ip().into());
        let mut tls = self.connector.connect(name, tcp).await?;
        tls.write_all(request).await?;
        tls.flush().await?;
        let mut raw = Vec::new();
        // A server that closes without close_notify is fine once we have
        // a whole response.
        if let Err(e) = tls.read_to_end(&mut raw).await {
            if raw.is_empty() {
                return Err(e.into());
            }
        }
        parse_response(&raw)
    }
}

/// A keep-alive connection: requests one after another, responses framed
/// by `content-length`.
pub struct Connection {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    host: String,
    buf: Vec<u8>,
}

impl Connection {
    /// The server's leaf certificate, DER, as presented in the handshake.
    pub fn server_certificate(&self) -> Option<Vec<u8>> {
        let certs = self.tls.get_ref().1.peer_certificates()?;
        certs.first().map(|c| c.to_vec())
    }

    /// Sends a request on this connection and reads its response.
    pub async fn send(&mut self, method: &str, path: &str) -> anyhow::Result<Response> {
        self.send_body(method, path, b"").await
    }

    /// [`Self::send`] with a body (framed by `content-length`).
    pub async fn send_body(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> anyhow::Result<Response> {
        let mut request = format!("{method} {path} HTTP/1.1\r\nhost: {}\r\n", self.host);
        if !body.is_empty() {
            request.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        request.push_str("\r\n");
        self.write(request.as_bytes()).await?;
        self.write(body).await?;
        self.read_response().await
    }

    /// Writes `bytes` as they are: for requests a well-behaved client would
    /// not send, or not send at once.
    pub async fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.tls.write_all(bytes).await?;
        self.tls.flush().await?;
        Ok(())
    }

    /// Reads until the server closes the connection, and parses what
    /// came as one response (any framing): for a request sent with
    /// `connection: close`.
    pub async fn read_to_close(&mut self) -> anyhow::Result<Response> {
        let mut raw = std::mem::take(&mut self.buf);
        // A server that closes without close_notify is fine once a whole
        // response has arrived.
        if let Err(e) = self.tls.read_to_end(&mut raw).await {
            if raw.is_empty() {
                return Err(e.into());
            }
        }
        parse_response(&raw)
    }

    /// Reads the next response on this connection.
    pub async fn read_response(&mut self) -> anyhow::Result<Response> {
        loop {
            if let Some(head_end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = parse_response(&self.buf[..head_end + 4])?;
                let len: usize = head
                    .header("content-length")
                    .and_then(|v| v.parse().ok())
                    .context("keep-alive response without content-length")?;
                let total = head_end + 4 + len;
                if self.buf.len() >= total {
                    let response = parse_response(&self.buf[..total])?;
                    self.buf.drain(..total);
                    return Ok(response);
                }
            }
            let mut chunk = [0u8; 8192];
            let n = self.tls.read(&mut chunk).await?;
            if n == 0 {
                anyhow::bail!("connection closed by the server");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Decodes a chunked body (extensions and trailers ignored).
fn dechunk(mut raw: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk size")?;
        let size_text = std::str::from_utf8(&raw[..line_end])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size `{size_text}`"))?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = raw.get(..size).context("truncated chunk")?;
        body.extend_from_slice(chunk);
        raw = raw.get(size + 2..).context("truncated chunk end")?;
    }
}

/// Parses a whole HTTP/1.1 response (content-length, chunked, or
/// read-to-close).
pub fn parse_response(raw: &[u8]) -> anyhow::Result<Response> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("connection closed before a whole response")?;
    let head = std::str::from_utf8(&raw[..head_end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line `{status_line}`"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let mut body = raw[head_end + 4..].to_vec();
    if chunked {
        body = dechunk(&body)?;
    } else if let Some(len) = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.truncate(len);
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}
