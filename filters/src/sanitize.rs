//! The first stage: make the request safe to read.
//!
//! It strips every header a caller could use to claim an identity, so no
//! later stage (and not the upstream) can mistake caller input for verified
//! fact, and it normalizes the path once. Routing, policy and the upstream
//! then all see the same path: a request cannot be decided as one path and
//! served as another.

use pingora_http::RequestHeader;
use smol_str::SmolStr;
use tether_config::EncodedSlash;

use crate::{Denial, Filter, Reason, RequestCtx};

/// Headers a proxy in front of an API sets, so that the API trusts them:
/// who the client is (`x-forwarded-client-cert`, `x-forwarded-for`,
/// `remote-user`, ...), or which method and path it really asked for
/// (`x-http-method-override`, `x-original-url`), which would let a request
/// be decided as one action and served as another. Coming from a caller
/// they are lies; only Tether may speak for what it verified. Matched with
/// `_` for `-` too (`x_forwarded_for`), which CGI-style servers read as the
/// same header.
const SPOOFABLE: &[&str] = &[
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "remote-user",
    "x-remote-user",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-method",
    "x-original-url",
    "x-original-uri",
    "x-rewrite-url",
];
/// Every header with one of these prefixes is spoofable: Tether's own
/// (`x-tether-*`), forwarding (`x-forwarded-*`), auth proxies'
/// (`x-auth-request-*`).
const SPOOFABLE_PREFIXES: &[&str] = &["x-tether-", "x-forwarded-", "x-auth-request-"];

/// The longest request target (path and query) accepted, as nginx's
/// default buffers take it.
pub const MAX_TARGET: usize = 8192;

/// Strips spoofable headers and normalizes the path.
pub struct Sanitize;

impl Filter for Sanitize {
    fn name(&self) -> &'static str {
        "sanitize"
    }

    fn apply(&self, req: &mut RequestHeader, ctx: &mut RequestCtx) -> Result<(), Denial> {
        if req.headers.contains_key(http::header::UPGRADE) {
            // After a `101` the proxy relays raw bytes both ways: a
            // WebSocket would carry any number of actions past every later
            // check, for as long as it stays open.
            return Err(Denial::new(
                Reason::BadRequest,
                "protocol upgrades (`Upgrade`) are not proxied: each request is decided on its own",
            ));
        }
        strip_identity_headers(req);
        if req.raw_path().len() > MAX_TARGET {
            // Each request's target is in its audit line and span: a huge
            // one would crowd other agents' records out of the queues.
            return Err(Denial::new(
                Reason::BadPath,
                format!("request target over {MAX_TARGET} bytes"),
            ));
        }
        // Decide on the target as it came off the wire: pingora keeps a
        // non-origin-form target verbatim and forwards it so, whatever
        // `uri` says.
        let Ok(raw) = std::str::from_utf8(req.raw_path()) else {
            return Err(Denial::new(Reason::BadPath, "request target is not UTF-8"));
        };
        if !raw.starts_with('/') {
            // Absolute form (`GET http://b/x`) names the host, and then
            // `Host` must be ignored (RFC 9112, 3.2.2): move it into `Host`
            // so routing and the upstream read one host, the same one.
            let authority = absolute_form_authority(raw)?;
            req.insert_header(http::header::HOST, authority)
                .map_err(|_| Denial::new(Reason::BadPath, "bad authority in the request target"))?;
        }
        check_host(req)?;
        single_content_length(req)?;
        let raw_path = req.uri.path();
        let slash = ctx.snapshot.encoded_slash;
        let path = normalize_path_as(raw_path, slash)
            .map_err(|e| Denial::new(Reason::BadPath, format!("path `{raw_path}`: {e}")))?;
        // Rejected already when the setting says so; otherwise kept for an
        // upstream that refuses it.
        ctx.encoded_slash = slash != EncodedSlash::Reject && has_encoded_slash(raw_path);
        let query = req.uri.query();
        if query.is_some_and(|q| crate::method_override::form_overrides_method(q.as_bytes())) {
            // Express's method-override, Laravel and Symfony read it (PHP
            // reads `.method` and ` _method` as `_method` too): decided as
            // the POST it says it is, it would be served as a DELETE.
            return Err(Denial::new(
                Reason::BadRequest,
                "a `_method` query parameter (a method override) is not accepted: send the method itself",
            ));
        }
        if !is_target(req.raw_path(), &path, query) {
            // Forward exactly what was decided.
            let decided = match query {
                Some(q) => format!("{path}?{q}"),
                None => path.to_string(),
            };
            let parsed = decided
                .parse()
                .map_err(|_| Denial::new(Reason::BadPath, "normalized path is not a valid URI"))?;
            req.set_uri(parsed);
        }
        ctx.path = path;
        ctx.host = crate::route::request_host(req);
        Ok(())
    }
}

/// Refuses a request whose host is missing or not one name (RFC 9112,
/// section 3.2): routing and upstream choice read it, and a `Host` of
/// `a, b` would be matched whole by Tether while the upstream picks
/// either. HTTP/1.1 requires a `Host`; HTTP/2 names the host in its
/// `:authority`, which the URI holds; HTTP/1.0 may omit it.
fn check_host(req: &RequestHeader) -> Result<(), Denial> {
    let bad = |what: String| Err(Denial::new(Reason::BadRequest, what));
    let mut hosts = req.headers.get_all(http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => bad("two `Host` headers".into()),
        (Some(host), None) if !is_host(host.as_bytes()) => bad(format!(
            "`Host` is not one host name: `{}`",
            host.as_bytes().escape_ascii()
        )),
        (Some(_), None) => Ok(()),
        (None, _) => match req.uri.authority() {
            Some(authority) if !is_host(authority.as_str().as_bytes()) => bad(format!(
                "the authority is not one host name: `{}`",
                authority.as_str().as_bytes().escape_ascii()
            )),
            Some(_) => Ok(()),
            None if req.version >= http::Version::HTTP_11 => {
                bad("an HTTP/1.1 request without `Host`".into())
            }
            None => Ok(()),
        },
    }
}

/// Whether `value` is one host, as `Host` carries it: a DNS name or IPv4
/// address (letters, digits, `-`, `.`, `_`) or an IPv6 literal in `[]`,
/// then an optional `:port`. Stricter than RFC 3986's `reg-name`, which
/// allows `,`, `;`, `%` and more that no DNS name holds and that servers
/// split on.
fn is_host(value: &[u8]) -> bool {
    let port_ok = |port: &[u8]| port.len() <= 5 && port.iter().all(u8::is_ascii_digit);
    if let Some(v6) = value.strip_prefix(b"[") {
        let Some(end) = v6.iter().position(|&b| b == b']') else {
            return false;
        };
        let (literal, rest) = v6.split_at(end);
        let after = rest.get(1..).unwrap_or_default();
        return !literal.is_empty()
            && literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            && (after.is_empty() || after.strip_prefix(b":").is_some_and(port_ok));
    }
    let (name, port) = match value.iter().rposition(|&b| b == b':') {
        Some(colon) => (
            value.get(..colon).unwrap_or_default(),
            value.get(colon + 1..).unwrap_or_default(),
        ),
        None => (value, &b""[..]),
    };
    !name.is_empty()
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && port_ok(port)
}

/// Two `Content-Length` lines of one value, or one line `5, 5`, which
/// pingora accepts as one length (RFC 9110, section 8.6), are forwarded as
/// one line: an upstream that refuses the list, or reads it otherwise,
/// must not frame the body differently from Tether. Differing values are
/// refused (pingora refuses them before this stage; here too, so no path
/// forwards them).
fn single_content_length(req: &mut RequestHeader) -> Result<(), Denial> {
    let mut values = req.headers.get_all(http::header::CONTENT_LENGTH).iter();
    let (Some(first), second) = (values.next(), values.next()) else {
        return Ok(());
    };
    if second.is_none() && !first.as_bytes().contains(&b',') {
        return Ok(()); // nearly every request with a body
    }
    let tokens = || {
        req.headers
            .get_all(http::header::CONTENT_LENGTH)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
    };
    let length = tokens().next().unwrap_or_default();
    if length.is_empty() || !length.iter().all(u8::is_ascii_digit) || tokens().any(|t| t != length)
    {
        return Err(Denial::new(
            Reason::BadRequest,
            "`Content-Length` values differ or are not numbers",
        ));
    }
    let length = http::HeaderValue::from_bytes(length)
        .map_err(|_| Denial::new(Reason::BadRequest, "`Content-Length` is not a number"))?;
    req.insert_header(http::header::CONTENT_LENGTH, length)
        .map_err(|_| Denial::new(Reason::Internal, "cannot set `Content-Length`"))
}

/// The authority of an absolute-form request target (`http://b/x`).
fn absolute_form_authority(raw: &str) -> Result<String, Denial> {
    let target: http::Uri = raw.parse().map_err(|_| {
        Denial::new(
            Reason::BadPath,
            format!("request target `{raw}` is not a URI"),
        )
    })?;
    match target.authority().filter(|_| target.scheme().is_some()) {
        Some(authority) => Ok(authority.as_str().to_string()),
        None => Err(Denial::new(
            Reason::BadPath,
            format!("request target `{raw}` is not origin or absolute form"),
        )),
    }
}

/// Whether the request target as sent is `path`, then `?query` if any:
/// then it is forwarded as it came, with nothing to rebuild.
fn is_target(raw: &[u8], path: &str, query: Option<&str>) -> bool {
    let Some(rest) = raw.strip_prefix(path.as_bytes()) else {
        return false;
    };
    match query {
        Some(q) => rest.strip_prefix(b"?") == Some(q.as_bytes()),
        None => rest.is_empty(),
    }
}

/// Headers Tether sets for the upstream besides its own `x-tether-*`:
/// the trace context of its span.
const TRACE_CONTEXT: &[&str] = &["traceparent", "tracestate"];

/// Whether `name` (lower case) is [`SPOOFABLE`], or a spelling of one with
/// `_` for `-` (`x_tether_agent`).
fn is_spoofable(name: &str) -> bool {
    // Nearly every header a request carries fails on its first byte.
    if !matches!(name.as_bytes().first(), Some(b'x' | b'f' | b'r' | b't')) {
        return false;
    }
    let alike = |reserved: &str| {
        name.bytes()
            .zip(reserved.bytes())
            .all(|(b, r)| b == r || (b == b'_' && r == b'-'))
    };
    SPOOFABLE_PREFIXES
        .iter()
        .any(|p| name.len() >= p.len() && alike(p))
        || SPOOFABLE.iter().any(|h| name.len() == h.len() && alike(h))
}

/// Removes every [`SPOOFABLE`] header, and keeps `Connection` from naming
/// a header Tether sets.
pub fn strip_identity_headers(req: &mut RequestHeader) {
    let doomed: Vec<_> = req
        .headers
        .keys()
        .filter(|name| is_spoofable(name.as_str())) // stored lower case
        .cloned()
        .collect();
    for name in doomed {
        req.remove_header(&name);
    }
    if req.headers.contains_key(http::header::CONNECTION) {
        drop_tethers_from_connection(req);
    }
}

/// The proxy removes the headers `Connection` names before it forwards a
/// request, after the stages have run: `Connection: x-tether-agent` would
/// remove the identity Tether adds. Such names are dropped from it (the
/// caller's own headers of those names are gone already); the rest, such
/// as `keep-alive` or `upgrade`, stay.
fn drop_tethers_from_connection(req: &mut RequestHeader) {
    let names_tethers = |token: &str| {
        let token = token.trim().to_ascii_lowercase();
        is_spoofable(&token) || TRACE_CONTEXT.contains(&token.as_str())
    };
    let values: Vec<http::HeaderValue> = req
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .cloned()
        .collect();
    let any = values.iter().any(|v| {
        // A value that is not text names no header the proxy would strip
        // by it; it is left as it is.
        v.to_str().is_ok_and(|v| v.split(',').any(names_tethers))
    });
    if !any {
        return;
    }
    req.remove_header(&http::header::CONNECTION);
    for value in values {
        let Ok(text) = value.to_str() else {
            let _ = req.append_header(http::header::CONNECTION, value);
            continue;
        };
        let kept: Vec<&str> = text
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty() && !names_tethers(t))
            .collect();
        // Tokens of a valid value joined by `, ` make a valid value.
        if let Ok(kept) = http::HeaderValue::from_str(&kept.join(", ")) {
            if !kept.is_empty() {
                let _ = req.append_header(http::header::CONNECTION, kept);
            }
        }
    }
}

/// Whether a path holds an encoded slash (`%2F`, `%2f`).
pub fn has_encoded_slash(path: &str) -> bool {
    path.as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1] == b'2' && (w[2] | 0x20) == b'f')
}

/// [`normalize_path`], with `%2F` read as `slash` says: refused, kept
/// inside its segment, or decoded to a `/` before dot segments are
/// removed (so `/a%2F..%2Fb` is `/b`).
pub fn normalize_path_as(path: &str, slash: EncodedSlash) -> Result<SmolStr, &'static str> {
    if is_normal(path) {
        return Ok(SmolStr::new(path));
    }
    rewrite_path(path, slash).map(SmolStr::from)
}

/// Normalizes a request path (RFC 3986 section 6.2.2):
/// - percent-encoded unreserved characters are decoded (`%2e` is `.`,
///   `%7E` is `~`), other escapes are kept with upper-case hex, so `%2F`
///   stays a character inside a segment and never becomes a separator
///   (`paths.encoded_slash: keep`; see [`normalize_path_as`]);
/// - `.` and `..` segments are removed (`..` never climbs above `/`);
/// - runs of `/` collapse into one.
///
/// Refused: a path not starting with `/`, malformed escapes, encoded
/// NUL or control characters, and a backslash, raw or encoded (`%5C`):
/// IIS, ASP.NET and several Node and Python servers read it as `/`, so
/// `/v1/public/..\admin` would be decided as a segment under
/// `/v1/public` and served as `/v1/admin`.
pub fn normalize_path(path: &str) -> Result<SmolStr, &'static str> {
    normalize_path_as(path, EncodedSlash::Keep)
}

/// Whether `path` is already what [`normalize_path`] makes of it, as
/// nearly every request's path is: it starts with `/`, has no escapes,
/// no empty, `.` or `..` segment (a trailing `/` aside) and only printable
/// ASCII. Then it is kept as it is, without being rebuilt.
fn is_normal(path: &str) -> bool {
    // Over bytes: splitting the `str` on a `char` searched for each
    // separator through a call apiece, a tenth of the stage.
    let Some((b'/', rest)) = path.as_bytes().split_first() else {
        return false;
    };
    if rest.is_empty() {
        return true;
    }
    let segments = rest.strip_suffix(b"/").unwrap_or(rest);
    path.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'%' && b != b'\\')
        && !segments.is_empty()
        && segments
            .split(|&b| b == b'/')
            .all(|s| !matches!(s, b"" | b"." | b".."))
}

/// [`normalize_path`] for a path that is not already normal.
fn rewrite_path(path: &str, slash: EncodedSlash) -> Result<String, &'static str> {
    if !path.starts_with('/') {
        return Err("must start with `/`");
    }
    let decoded = decode_unreserved(path, slash)?;
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    // Keep a trailing slash (it can matter to the upstream), but not one
    // left behind by a removed `.`/`..` or a run of slashes.
    let last = decoded.rsplit('/').next().unwrap_or_default();
    let trailing = decoded.len() > 1 && (decoded.ends_with('/') || last == "." || last == "..");
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (trailing && !segments.is_empty()) {
        out.push('/');
    }
    Ok(out)
}

fn decode_unreserved(path: &str, slash: EncodedSlash) -> Result<String, &'static str> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).and_then(|c| hex(*c)),
                bytes.get(i + 2).and_then(|c| hex(*c)),
            ) else {
                return Err("malformed percent-encoding");
            };
            let c = h * 16 + l;
            if c < 0x20 || c == 0x7f {
                return Err("encoded control character");
            }
            if c == b'\\' {
                return Err(BACKSLASH);
            }
            if c == b'/' {
                match slash {
                    EncodedSlash::Reject => {
                        return Err("an encoded slash (`%2F`), which servers read differently")
                    }
                    EncodedSlash::Decode => {
                        out.push('/');
                        i += 3;
                        continue;
                    }
                    EncodedSlash::Keep => {}
                }
            }
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                out.push(c as char);
            } else {
                out.push('%');
                out.push(char::from(HEX[usize::from(h)]));
                out.push(char::from(HEX[usize::from(l)]));
            }
            i += 3;
        } else if b < 0x20 || b == 0x7f {
            return Err("control character");
        } else if b == b'\\' {
            return Err(BACKSLASH);
        } else if b >= 0x80 {
            // Raw UTF-8, which the HTTP layer lets through: written as the
            // escapes it stands for, one form for both spellings.
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
            i += 1;
        } else {
            out.push(b as char);
            i += 1;
        }
    }
    Ok(out)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

const BACKSLASH: &str = "a backslash, which some servers read as `/`";

/// A normalized path segment's value: its escapes decoded, as the
/// upstream's framework decodes a path parameter, so that `ceo%40x.org`
/// and `ceo@x.org` name the same resource. `None` when the bytes are not
/// UTF-8.
pub fn segment_value(segment: &str) -> Option<std::borrow::Cow<'_, str>> {
    if !segment.contains('%') {
        return Some(std::borrow::Cow::Borrowed(segment));
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1..i + 3)) {
            (b'%', Some(&[h, l])) => {
                out.push(hex(h)? * 16 + hex(l)?);
                i += 3;
            }
            (b'%', _) => return None,
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok().map(std::borrow::Cow::Owned)
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    /// A request as a client sends it: with a `Host`.
    fn request(method: &str, target: &[u8]) -> RequestHeader {
        let mut req = RequestHeader::build(method, target, None).expect("request");
        req.insert_header("host", "api.example.org")
            .expect("header");
        req
    }

    #[test]
    fn raw_utf8_is_written_as_its_escapes_and_segments_decode_to_text() {
        assert_eq!(
            normalize_path("/docs/café").as_deref(),
            Ok("/docs/caf%C3%A9")
        );
        assert_eq!(
            normalize_path("/docs/caf%c3%a9").as_deref(),
            Ok("/docs/caf%C3%A9")
        );
        assert_eq!(segment_value("caf%C3%A9").as_deref(), Some("café"));
        assert_eq!(
            segment_value("ceo%40example.com").as_deref(),
            Some("ceo@example.com")
        );
        assert_eq!(segment_value("plain").as_deref(), Some("plain"));
        assert_eq!(segment_value("%FF"), None, "not UTF-8");
        assert_eq!(segment_value("%4"), None);
    }

    #[test]
    fn normalization_table() {
        for (input, expected) in [
            ("/", "/"),
            ("/v1/repos", "/v1/repos"),
            ("/v1/repos/", "/v1/repos/"),
            ("//v1///repos", "/v1/repos"),
            ("/v1/public/../admin", "/v1/admin"),
            ("/v1/public/%2e%2e/admin", "/v1/admin"),
            ("/v1/public/%2E%2e/admin", "/v1/admin"),
            ("/v1/public/.%2e/admin", "/v1/admin"),
            ("/v1/./admin", "/v1/admin"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/v1/..", "/"),
            ("/v1/a/.", "/v1/a/"),
            ("/v1/%7Euser", "/v1/~user"),
            ("/v1/%41%42c", "/v1/ABc"),
            ("/v1/a%2fb", "/v1/a%2Fb"),
            ("/v1/a%2Fb/..", "/v1/"),
            ("/v1/%20x", "/v1/%20x"),
            ("//", "/"),
            ("/a//", "/a/"),
            ("/a/b c", "/a/b c"),
        ] {
            assert_eq!(normalize_path(input).as_deref(), Ok(expected), "{input}");
        }
    }

    #[test]
    fn malformed_paths_are_refused() {
        for input in [
            "",
            "v1",
            "*",
            "/a%2",
            "/a%zz",
            "/a%00b",
            "/a%0a",
            "/a%7f",
            "/v1/public/..\\admin",
            "/a\\b",
            "/a%5Cb",
            "/a%5cb",
            "/v1/public/%2e%2e%5cadmin",
        ] {
            assert!(normalize_path(input).is_err(), "accepted {input:?}");
        }
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        for input in ["/a/./b/../c//d/", "/%2e%2e/x", "/a%2fb/%7e"] {
            let once = normalize_path(input).expect("valid");
            assert_eq!(normalize_path(&once).expect("valid"), once);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// A path kept as it is, because it looks normal already, is
        /// exactly what the full rewrite makes of it; and every path is
        /// normalized as the rewrite would.
        #[test]
        fn a_path_kept_as_it_is_is_what_the_rewrite_makes(
            path in "/?(([a.~%]|%2[eEfF]|\\.\\.|/| |\\x7f|\\x01|é){0,6})"
        ) {
            let rewritten = rewrite_path(&path, EncodedSlash::Keep);
            if is_normal(&path) {
                proptest::prop_assert_eq!(rewritten.as_deref(), Ok(path.as_str()));
            }
            let normalized = normalize_path(&path);
            proptest::prop_assert_eq!(normalized.as_deref(), rewritten.as_deref());
        }
    }

    #[test]
    fn a_method_override_in_the_query_is_refused() {
        for (target, passes) in [
            ("/v1/x?_method=DELETE", false),
            ("/v1/x?a=1&_METHOD=delete", false),
            ("/v1/x?a=1;%5Fmethod=delete", false),
            // As PHP mangles names: Laravel and Symfony read these as `_method`.
            ("/v1/x?.method=DELETE", false),
            ("/v1/x?%20_method=DELETE", false),
            ("/v1/x?+_method=DELETE", false),
            ("/v1/x?_method[]=DELETE", false),
            ("/v1/x?%2Emethod=DELETE", false),
            ("/v1/x?a=_method&b_method=1", true),
            ("/v1/x?method=GET", true),
        ] {
            let mut req = request("POST", target.as_bytes());
            let result = Sanitize.apply(&mut req, &mut testing::ctx());
            assert_eq!(result.is_ok(), passes, "{target}");
        }
    }

    #[test]
    fn a_target_over_the_limit_is_refused() {
        let fits = format!("/v1/{}", "a".repeat(MAX_TARGET - 4));
        let over = format!("{fits}b");
        for (target, passes) in [(fits, true), (over, false)] {
            let mut req = request("GET", target.as_bytes());
            let result = Sanitize.apply(&mut req, &mut testing::ctx());
            assert_eq!(result.is_ok(), passes, "{} bytes", target.len());
        }
    }

    #[test]
    fn spoofable_headers_are_stripped_and_the_path_rewritten() {
        let mut req = request("GET", b"/v1/public/%2e%2e/admin?x=1");
        for name in [
            "X-Tether-Owner",
            "x-tether-agent",
            "X_Tether_Agent",
            "x-tether_owner",
            "X-Forwarded-Client-Cert",
            "X-Forwarded-For",
            "x_forwarded_host",
            "Forwarded",
            "X-Real-IP",
            "Remote-User",
            "X-Auth-Request-Email",
            "X-HTTP-Method-Override",
            "X-Original-URL",
        ] {
            req.insert_header(name, "spoofed").expect("header");
        }
        req.insert_header("x-forwarded", "kept: not the prefix")
            .expect("header");
        req.insert_header("forwarded-for", "kept: not the header")
            .expect("header");
        req.insert_header("x-keep", "yes").expect("header");
        req.insert_header("x_tether", "kept: not the prefix")
            .expect("header");
        let mut ctx = testing::ctx();
        Sanitize.apply(&mut req, &mut ctx).expect("passes");
        assert_eq!(ctx.path, "/v1/admin");
        assert_eq!(req.uri.to_string(), "/v1/admin?x=1");
        for gone in [
            "x-tether-owner",
            "x-tether-agent",
            "x_tether_agent",
            "x-tether_owner",
            "x-forwarded-client-cert",
            "x-forwarded-for",
            "x_forwarded_host",
            "forwarded",
            "x-real-ip",
            "remote-user",
            "x-auth-request-email",
            "x-http-method-override",
            "x-original-url",
        ] {
            assert!(req.headers.get(gone).is_none(), "{gone}");
        }
        assert!(req.headers.get("x_tether").is_some());
        assert!(req.headers.get("x-forwarded").is_some());
        assert!(req.headers.get("forwarded-for").is_some());
        assert_eq!(
            req.headers.get("x-keep").map(|v| v.as_bytes()),
            Some(&b"yes"[..])
        );
    }

    #[test]
    fn an_upgrade_is_refused() {
        let mut req = RequestHeader::build("GET", b"/v1/x", None).expect("request");
        req.insert_header("connection", "Upgrade").expect("header");
        req.insert_header("upgrade", "websocket").expect("header");
        let denial = Sanitize
            .apply(&mut req, &mut testing::ctx())
            .expect_err("refused");
        assert_eq!(denial.reason, Reason::BadRequest);
        assert!(denial.detail.contains("Upgrade"), "{}", denial.detail);
    }

    #[test]
    fn connection_cannot_name_the_headers_tether_sets() {
        let connection = |values: &[&str]| {
            let mut req = request("GET", b"/v1/x");
            for v in values {
                req.append_header("connection", *v).expect("header");
            }
            Sanitize
                .apply(&mut req, &mut testing::ctx())
                .expect("passes");
            let kept: Vec<String> = req
                .headers
                .get_all("connection")
                .iter()
                .map(|v| v.to_str().expect("text").to_string())
                .collect();
            kept
        };
        assert_eq!(
            connection(&[
                "keep-alive, X-Tether-Agent,x-tether-owner",
                "TraceParent , x-custom"
            ]),
            ["keep-alive", "x-custom"]
        );
        assert_eq!(
            connection(&["x_tether_request_id, tracestate, x-forwarded-client-cert"]),
            Vec::<String>::new()
        );
        assert_eq!(connection(&["close"]), ["close"]);
    }

    #[test]
    fn an_absolute_form_target_becomes_origin_form_with_its_host() {
        let mut req =
            RequestHeader::build("GET", b"http://b.example/v1/x?q=1", None).expect("request");
        req.insert_header("host", "a.example").expect("header");
        let mut ctx = testing::ctx();
        Sanitize.apply(&mut req, &mut ctx).expect("passes");
        assert_eq!(req.raw_path(), b"/v1/x?q=1", "forwarded in origin form");
        assert_eq!(
            req.headers.get("host").map(|v| v.as_bytes()),
            Some(&b"b.example"[..])
        );
        assert_eq!(ctx.host.as_deref(), Some("b.example"), "routed by it");
    }

    #[test]
    fn the_host_is_routed_lower_case_without_its_port() {
        let mut req = testing::get("/v1/x");
        req.insert_header("host", "API.Example.org:8443")
            .expect("header");
        let mut ctx = testing::ctx();
        Sanitize.apply(&mut req, &mut ctx).expect("passes");
        assert_eq!(ctx.host.as_deref(), Some("api.example.org"));
    }

    #[test]
    fn a_bad_path_is_denied_as_bad_path() {
        let mut req = request("GET", b"/a%zz");
        let denial = Sanitize
            .apply(&mut req, &mut testing::ctx())
            .expect_err("denied");
        assert_eq!(denial.reason, Reason::BadPath);
    }

    #[test]
    fn a_host_that_is_missing_or_not_one_name_is_refused() {
        for (host, passes) in [
            (Some("api.example.org"), true),
            (Some("API.example.org.:8443"), true),
            (Some("127.0.0.1:8443"), true),
            (Some("[::1]:8443"), true),
            (Some("[::1]"), true),
            (Some("svc_name.ns"), true),
            (Some("localhost, evil.example"), false),
            (Some("localhost,evil.example"), false),
            (Some("a b"), false),
            (Some(""), false),
            (Some(":8443"), false),
            (Some("a:port"), false),
            (Some("a:123456"), false),
            (Some("[::1"), false),
            (Some("[::1]x"), false),
            (Some("[]"), false),
            (Some("a%2eb"), false),
            (None, false),
        ] {
            let mut req = RequestHeader::build("GET", b"/v1/x", None).expect("request");
            if let Some(host) = host {
                req.insert_header("host", host).expect("header");
            }
            let result = Sanitize.apply(&mut req, &mut testing::ctx());
            assert_eq!(result.is_ok(), passes, "{host:?}: {result:?}");
            if let Err(denial) = result {
                assert_eq!(denial.reason, Reason::BadRequest, "{host:?}");
            }
        }
        let mut two = request("GET", b"/v1/x");
        two.append_header("host", "evil.example").expect("header");
        assert!(Sanitize.apply(&mut two, &mut testing::ctx()).is_err());
        // HTTP/1.0 may omit it.
        let mut old = RequestHeader::build("GET", b"/v1/x", None).expect("request");
        old.set_version(http::Version::HTTP_10);
        assert!(Sanitize.apply(&mut old, &mut testing::ctx()).is_ok());
    }

    #[test]
    fn an_http2_request_names_its_host_in_its_authority() {
        let h2 = |uri: &str| {
            let (parts, ()) = http::Request::builder()
                .version(http::Version::HTTP_2)
                .uri(uri)
                .body(())
                .expect("request")
                .into_parts();
            RequestHeader::from(parts)
        };
        let mut req = h2("https://API.example.org/v1/x");
        let mut ctx = testing::ctx();
        Sanitize.apply(&mut req, &mut ctx).expect("passes");
        assert_eq!(ctx.host.as_deref(), Some("api.example.org"));
        assert_eq!(ctx.path, "/v1/x");
        assert!(Sanitize
            .apply(&mut h2("/v1/x"), &mut testing::ctx())
            .is_err());
    }

    #[test]
    fn content_length_lines_of_one_value_become_one() {
        let lengths = |values: &[&str]| {
            let mut req = request("POST", b"/v1/x");
            for v in values {
                req.append_header("content-length", *v).expect("header");
            }
            let result = Sanitize.apply(&mut req, &mut testing::ctx());
            result.map(|()| {
                req.headers
                    .get_all("content-length")
                    .iter()
                    .map(|v| v.to_str().expect("text").to_string())
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(lengths(&["5"]), Ok(vec!["5".to_string()]));
        assert_eq!(lengths(&["5", "5"]), Ok(vec!["5".to_string()]));
        assert_eq!(lengths(&["5, 5"]), Ok(vec!["5".to_string()]));
        assert_eq!(lengths(&[]), Ok(vec![]));
        for differing in [&["5", "6"][..], &["5, 6"], &["5", ""], &["x", "x"]] {
            let denial = lengths(differing).expect_err("refused");
            assert_eq!(denial.reason, Reason::BadRequest, "{differing:?}");
        }
    }

    #[test]
    fn an_encoded_slash_is_refused_kept_or_decoded_as_configured() {
        use EncodedSlash::*;
        for (input, reject, keep, decode) in [
            (
                "/v1/repos/a%2Fb/issues",
                None,
                Some("/v1/repos/a%2Fb/issues"),
                Some("/v1/repos/a/b/issues"),
            ),
            (
                "/v1/repos/a%2fb",
                None,
                Some("/v1/repos/a%2Fb"),
                Some("/v1/repos/a/b"),
            ),
            (
                "/v1/public%2F..%2Fadmin",
                None,
                Some("/v1/public%2F..%2Fadmin"),
                Some("/v1/admin"),
            ),
            (
                "/v1/a%252Fb",
                Some("/v1/a%252Fb"),
                Some("/v1/a%252Fb"),
                Some("/v1/a%252Fb"),
            ),
            (
                "/v1/plain",
                Some("/v1/plain"),
                Some("/v1/plain"),
                Some("/v1/plain"),
            ),
        ] {
            for (slash, expected) in [(Reject, reject), (Keep, keep), (Decode, decode)] {
                let got = normalize_path_as(input, slash);
                assert_eq!(got.as_deref().ok(), expected, "{input} with {slash:?}");
            }
        }
        assert!(has_encoded_slash("/a%2fb") && has_encoded_slash("/a%2F"));
        assert!(!has_encoded_slash("/a%252Fb") && !has_encoded_slash("/a/b%2"));
    }

    #[test]
    fn the_stage_refuses_an_encoded_slash_by_default() {
        let mut ctx = testing::ctx();
        assert_eq!(ctx.snapshot.encoded_slash, EncodedSlash::Reject);
        let denial = Sanitize
            .apply(&mut request("GET", b"/v1/repos/a%2Fb/issues"), &mut ctx)
            .expect_err("refused");
        assert_eq!(denial.reason, Reason::BadPath);
    }
}
