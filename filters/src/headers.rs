//! Editing the headers of pingora's requests and responses in place.
//!
//! pingora gives no mutable access to a header map: each insert goes
//! through a name it parses, lower-cases and copies again (an allocation
//! for every name `http` does not know, such as Tether's own), and into a
//! second map that keeps names in the case they were sent. It also sizes
//! a parsed request's or response's maps for exactly the headers that came
//! in, so the first few added grow and rehash both. Under callgrind the
//! headers Tether adds cost ~6,000 instructions a request that way, where
//! the bare proxy pays none. pingora does convert a header to its parts and
//! back, so an edit here takes the parts, reserves the room the edit needs,
//! writes to the `http::HeaderMap` with names parsed once, at compile time,
//! and rebuilds the header, without the case map: names are
//! case-insensitive (RFC 9110, 5.1), and pingora then writes the standard
//! ones in their usual case and the others in lower case, as HTTP/2
//! always does.

use http::request::Parts as ReqParts;
use http::response::Parts as RespParts;
use http::HeaderMap;
use pingora_http::{RequestHeader, ResponseHeader};

/// Runs `edit` on `req`'s headers, with room made for `additional` more.
pub fn edit_request<R>(
    req: &mut RequestHeader,
    additional: usize,
    edit: impl FnOnce(&mut HeaderMap) -> R,
) -> R {
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
    let edited = edit(&mut parts.headers);
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
    edited
}

/// Runs `edit` on `resp`'s headers, with room made for `additional` more.
pub fn edit_response<R>(
    resp: &mut ResponseHeader,
    additional: usize,
    edit: impl FnOnce(&mut HeaderMap) -> R,
) -> R {
    // The parts keep no reason phrase: a non-standard one is carried over.
    let custom_reason = resp
        .get_reason_phrase()
        .filter(|&reason| Some(reason) != resp.status.canonical_reason())
        .map(str::to_owned);
    let placeholder = ResponseHeader::from(http::Response::new(()).into_parts().0);
    let mut parts = RespParts::from(std::mem::replace(resp, placeholder));
    parts.headers.reserve(additional);
    let edited = edit(&mut parts.headers);
    *resp = ResponseHeader::from(parts);
    if custom_reason.is_some() {
        // Not validated by pingora, so it cannot fail.
        let _ = resp.set_reason_phrase(custom_reason.as_deref());
    }
    edited
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

    /// Inserts `x-added-a`, `x-added-b`, ... and says whether the map
    /// had room for them all.
    fn insert_fits(headers: &mut HeaderMap, count: usize) -> bool {
        let capacity = headers.capacity();
        for name in ["a", "b", "c", "d", "e"].into_iter().take(count) {
            let name = http::HeaderName::try_from(format!("x-added-{name}")).expect("name");
            headers.insert(name, http::HeaderValue::from_static("v"));
        }
        headers.capacity() == capacity
    }

    #[test]
    fn a_request_is_edited_with_room_and_keeps_everything_else() {
        let mut req = parsed_request(b"/v1/repos?page=2", SENT);
        req.set_version(http::Version::HTTP_10);
        assert!(
            req.headers.capacity() - req.headers.len() < 5,
            "no room as parsed"
        );
        let before = header_list(&req.headers);

        let fit = edit_request(&mut req, 5, |headers| insert_fits(headers, 5));

        assert!(fit, "the added headers fit without a grow");
        assert!(!req.has_case());
        assert_eq!(
            header_list(&req.headers)[..before.len()],
            before,
            "same headers, same order"
        );
        assert_eq!(req.headers.len(), before.len() + 5);
        assert_eq!(req.headers["x-added-e"], "v");
        assert_eq!(req.method, http::Method::GET);
        assert_eq!(req.version, http::Version::HTTP_10);
        assert_eq!(req.raw_path(), b"/v1/repos?page=2");
    }

    #[test]
    fn an_http2_request_keeps_whether_its_headers_end_the_stream() {
        for ends in [true, false] {
            let mut req = parsed_request(b"/", SENT);
            req.set_version(http::Version::HTTP_2);
            req.set_send_end_stream(ends);
            edit_request(&mut req, 8, |_| ());
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
            edit_request(&mut req, 8, |_| ());
            assert_eq!(req.raw_path(), raw, "{target:?}");
            assert_eq!(req.raw_path_is_utf8(), utf8, "{target:?}");
            assert_eq!(req.uri, uri, "{target:?}");
        }
    }

    #[test]
    fn a_response_is_edited_with_room_and_keeps_its_status_and_reason() {
        let mut resp = ResponseHeader::build(299, Some(SENT.len())).expect("response");
        for &(name, value) in SENT {
            resp.append_header(name.to_string(), value).expect("header");
        }
        resp.set_reason_phrase(Some("Fine Enough")).expect("reason");
        let before = header_list(&resp.headers);

        let fit = edit_response(&mut resp, 2, |headers| insert_fits(headers, 2));

        assert!(fit, "the added headers fit without a grow");
        assert!(!resp.has_case());
        assert_eq!(resp.status.as_u16(), 299);
        assert_eq!(resp.get_reason_phrase(), Some("Fine Enough"));
        assert_eq!(header_list(&resp.headers)[..before.len()], before);
        assert_eq!(resp.headers["x-added-b"], "v");

        let mut ok = ResponseHeader::build(200, Some(1)).expect("response");
        edit_response(&mut ok, 1, |_| ());
        assert_eq!(ok.get_reason_phrase(), Some("OK"));
    }
}
