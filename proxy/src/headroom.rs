//! Room in pingora's header maps for the headers Tether adds.
//!
//! pingora sizes the maps of a parsed request or response for exactly the
//! headers that came in, and keeps two of them: the values, and the names
//! in the case they were sent. Each header Tether then adds is inserted
//! into both, and the first few grow and rehash both: under callgrind that
//! was ~1,700 instructions for the one response header and ~4,000 for the
//! three identity headers, 6 grows a request where the bare proxy has none.
//! pingora has no way to reserve room in a header it parsed, so a header
//! short of room is rebuilt once, here, from its parts, with the room it
//! needs and without the case map: header names are case-insensitive
//! (RFC 9110, 5.1), and pingora then writes the standard ones in their
//! usual case and the others in lower case, as HTTP/2 always does.

use http::request::Parts as ReqParts;
use http::response::Parts as RespParts;
use pingora_http::{RequestHeader, ResponseHeader};

/// Makes room in `req` for `additional` more headers.
pub fn make_room_in_request(req: &mut RequestHeader, additional: usize) {
    if has_room(req.has_case(), &req.headers, additional) {
        return;
    }
    // The parts keep no request target that the URI would not reproduce
    // (absolute form, CONNECT, not UTF-8): such a rare one is copied and
    // set again, so what is forwarded is what pingora read.
    let round_trips = req.raw_path_is_utf8()
        && req.uri.path_and_query().map(|p| p.as_str().as_bytes()) == Some(req.raw_path());
    let verbatim = (!round_trips).then(|| req.raw_path().to_vec());
    // Nor whether an HTTP/2 request's headers end its stream.
    let ends_stream = req.send_end_stream();
    let placeholder = RequestHeader::from(http::Request::new(()).into_parts().0);
    let mut parts = ReqParts::from(std::mem::replace(req, placeholder));
    parts.headers.reserve(additional);
    *req = RequestHeader::from(parts);
    if let Some(ends) = ends_stream {
        req.set_send_end_stream(ends);
    }
    if let Some(target) = verbatim {
        // pingora parsed these very bytes with this function, so it cannot
        // refuse them now; if it did, the URI's path would be forwarded,
        // which is the target Tether decided on.
        let _ = req.set_raw_path(&target);
    }
}

/// Makes room in `resp` for `additional` more headers.
pub fn make_room_in_response(resp: &mut ResponseHeader, additional: usize) {
    if has_room(resp.has_case(), &resp.headers, additional) {
        return;
    }
    // The parts keep no reason phrase: a non-standard one is carried over.
    let custom_reason = resp
        .get_reason_phrase()
        .filter(|&reason| Some(reason) != resp.status.canonical_reason())
        .map(str::to_owned);
    let placeholder = ResponseHeader::from(http::Response::new(()).into_parts().0);
    let mut parts = RespParts::from(std::mem::replace(resp, placeholder));
    parts.headers.reserve(additional);
    *resp = ResponseHeader::from(parts);
    if custom_reason.is_some() {
        // Not validated by pingora, so it cannot fail.
        let _ = resp.set_reason_phrase(custom_reason.as_deref());
    }
}

/// Whether `additional` headers fit without a grow, and into one map.
fn has_room(has_case: bool, headers: &http::HeaderMap, additional: usize) -> bool {
    !has_case && headers.capacity() - headers.len() >= additional
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request as pingora's HTTP/1 parser builds one: maps sized for
    /// exactly the headers sent, names kept in their case.
    fn parsed_request(target: &[u8], headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", target, Some(headers.len())).expect("request");
        for &(name, value) in headers {
            req.append_header(name.to_string(), value).expect("header");
        }
        req
    }

    fn header_list(headers: &http::HeaderMap) -> Vec<(String, Vec<u8>)> {
        headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    const SENT: &[(&str, &str)] = &[
        ("Host", "api.example.org"),
        ("User-Agent", "agent/1.0"),
        ("X-Custom", "one"),
        ("x-custom", "two"),
    ];

    #[test]
    fn a_request_gets_room_and_keeps_everything_else() {
        let mut req = parsed_request(b"/v1/repos?page=2", SENT);
        req.set_version(http::Version::HTTP_10);
        assert!(
            req.headers.capacity() - req.headers.len() < 5,
            "no room as parsed"
        );
        let before = header_list(&req.headers);

        make_room_in_request(&mut req, 5);

        assert!(!req.has_case());
        assert_eq!(
            header_list(&req.headers),
            before,
            "same headers, same order"
        );
        assert_eq!(req.method, http::Method::GET);
        assert_eq!(req.version, http::Version::HTTP_10);
        assert_eq!(req.raw_path(), b"/v1/repos?page=2");
        let capacity = req.headers.capacity();
        for name in ["a", "b", "c", "d", "e"] {
            req.insert_header(format!("x-added-{name}"), "v")
                .expect("header");
        }
        assert_eq!(req.headers.capacity(), capacity, "the added headers fit");
    }

    #[test]
    fn an_http2_request_keeps_whether_its_headers_end_the_stream() {
        for ends in [true, false] {
            let mut req = parsed_request(b"/", SENT);
            req.set_version(http::Version::HTTP_2);
            req.set_send_end_stream(ends);
            make_room_in_request(&mut req, 8);
            assert_eq!(req.send_end_stream(), Some(ends));
        }
    }

    #[test]
    fn targets_the_uri_does_not_reproduce_are_kept() {
        for target in [&b"http://api.example.org/v1/x?q=1"[..], b"/caf\xe9", b"*"] {
            let mut req = parsed_request(target, SENT);
            let (raw, utf8, uri) = (
                req.raw_path().to_vec(),
                req.raw_path_is_utf8(),
                req.uri.clone(),
            );
            make_room_in_request(&mut req, 8);
            assert_eq!(req.raw_path(), raw, "{target:?}");
            assert_eq!(req.raw_path_is_utf8(), utf8, "{target:?}");
            assert_eq!(req.uri, uri, "{target:?}");
        }
    }

    #[test]
    fn a_response_gets_room_and_keeps_its_status_and_reason() {
        let mut resp = ResponseHeader::build(299, Some(SENT.len())).expect("response");
        for &(name, value) in SENT {
            resp.append_header(name.to_string(), value).expect("header");
        }
        resp.set_reason_phrase(Some("Fine Enough")).expect("reason");
        let before = header_list(&resp.headers);

        make_room_in_response(&mut resp, 2);

        assert!(!resp.has_case());
        assert_eq!(resp.status.as_u16(), 299);
        assert_eq!(resp.get_reason_phrase(), Some("Fine Enough"));
        assert_eq!(header_list(&resp.headers), before);
        let capacity = resp.headers.capacity();
        resp.insert_header("x-tether-request-id", "r1")
            .expect("header");
        resp.insert_header("x-other", "o").expect("header");
        assert_eq!(resp.headers.capacity(), capacity);

        let mut ok = ResponseHeader::build(200, Some(1)).expect("response");
        make_room_in_response(&mut ok, 1);
        assert_eq!(ok.get_reason_phrase(), Some("OK"));
    }
}
