//! Method overrides carried in parameters: refused wherever a framework
//! would read one.
//!
//! Laravel and Symfony (with PHP's parameter parsing), Rails'
//! `Rack::MethodOverride` and Express's `method-override` serve a `POST`
//! carrying `_method=DELETE` as a `DELETE`. Tether decides on the method it
//! sees, so such a request would be decided as one action and served as
//! another. The query is checked by the sanitize stage; this stage checks
//! the bodies frameworks parse into parameters:
//!
//! - `application/x-www-form-urlencoded`, and a `POST` with a body and no
//!   `Content-Type` (Rack parses it as a form): read whole, up to
//!   [`MAX_FORM_BODY`], and refused if a parameter names an override;
//! - `multipart/*`: uploads can be of any size, so the body is not held.
//!   Each chunk is scanned as it streams to the upstream
//!   ([`MultipartNames`]), and a part whose `Content-Disposition` names an
//!   override stops the request before that line's chunk is forwarded: the
//!   upstream is left with an incomplete body on a connection that is
//!   closed, which no framework acts on.
//!
//! Names are compared as PHP makes them ([`is_override_name`]).

use pingora_http::RequestHeader;

use crate::{Denial, Filter, Reason, RequestCtx};

/// The largest form-encoded body read to look for an override: what the
/// proxy can hold and replay to the upstream after deciding on it.
pub const MAX_FORM_BODY: usize = 64 * 1024;

/// The longest line of a multipart body that reads like a
/// `Content-Disposition` header.
pub const MAX_PART_HEADER_LINE: usize = 8 * 1024;

/// Refuses a method override in a form or multipart body.
pub struct MethodOverride;

/// How a framework would parse a request's body into parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// `name=value&...`.
    UrlEncoded,
    /// Parts, each named by its `Content-Disposition`.
    Multipart,
    /// Two `Content-Type` headers: a framework may read either.
    Ambiguous,
}

/// Whether the request has a body: a framework parses none without one.
fn has_body(req: &RequestHeader) -> bool {
    req.headers.contains_key(http::header::TRANSFER_ENCODING)
        || req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

fn form(req: &RequestHeader) -> Option<Form> {
    if !has_body(req) {
        return None;
    }
    let mut types = req.headers.get_all(http::header::CONTENT_TYPE).iter();
    match (types.next(), types.next()) {
        // Rack parses the body of a `POST` without a type as a form.
        (None, _) => (req.method == http::Method::POST).then_some(Form::UrlEncoded),
        (Some(_), Some(_)) => Some(Form::Ambiguous),
        (Some(value), None) => {
            let value = value.as_bytes();
            let media_type = value.split(|&b| b == b';').next().unwrap_or_default();
            let media_type = media_type.trim_ascii();
            if media_type.eq_ignore_ascii_case(b"application/x-www-form-urlencoded") {
                Some(Form::UrlEncoded)
            } else if media_type
                .get(..b"multipart/".len())
                .is_some_and(|p| p.eq_ignore_ascii_case(b"multipart/"))
            {
                Some(Form::Multipart)
            } else {
                None
            }
        }
    }
}

impl Filter for MethodOverride {
    fn name(&self) -> &'static str {
        "method_override"
    }

    fn body_limit(&self, req: &RequestHeader, _ctx: &RequestCtx) -> Option<usize> {
        (form(req) == Some(Form::UrlEncoded)).then_some(MAX_FORM_BODY)
    }

    fn apply(&self, req: &mut RequestHeader, ctx: &mut RequestCtx) -> Result<(), Denial> {
        match form(req) {
            None => Ok(()),
            Some(Form::Ambiguous) => Err(Denial::new(
                Reason::BadRequest,
                "two `Content-Type` headers: the body could be read two ways",
            )),
            Some(Form::UrlEncoded) => {
                let Some(body) = &ctx.body else {
                    return Err(Denial::new(Reason::Internal, "form body was not read"));
                };
                if form_overrides_method(body) {
                    return Err(refusal("a `_method` form parameter"));
                }
                Ok(())
            }
            Some(Form::Multipart) => {
                ctx.multipart = Some(Box::default());
                Ok(())
            }
        }
    }
}

fn refusal(what: &str) -> Denial {
    Denial::new(
        Reason::BadRequest,
        format!("{what} (a method override) is not accepted: send the method itself"),
    )
}

/// Whether a query or form-encoded body (`a=1&b=2`, or `;` between
/// parameters, as older parsers split) names a `_method` parameter.
pub fn form_overrides_method(form: &[u8]) -> bool {
    form.split(|&b| b == b'&' || b == b';').any(|param| {
        let name = param.split(|&b| b == b'=').next().unwrap_or_default();
        is_override_name(FormDecoded(name))
    })
}

/// The bytes of a form-encoded name as form parsers decode them: `+` is a
/// space, `%XX` the byte it names, and a malformed escape stays as it is
/// (as PHP's `urldecode` leaves it).
#[derive(Clone)]
struct FormDecoded<'a>(&'a [u8]);

impl Iterator for FormDecoded<'_> {
    type Item = u8;

    fn next(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        match (b, rest) {
            (b'+', _) => Some(b' '),
            (b'%', [h, l, tail @ ..]) => match (hex(*h), hex(*l)) {
                (Some(h), Some(l)) => {
                    self.0 = tail;
                    Some(h * 16 + l)
                }
                _ => Some(b'%'),
            },
            (b, _) => Some(b),
        }
    }
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// Whether a parameter name (decoded) is `_method` as PHP registers it
/// (`main/php_variables.c`), ignoring ASCII case (stricter than any
/// framework): the name ends at a NUL (PHP reads it as a C string);
/// leading spaces are dropped; ` ` and `.` become `_`; an `[` with a `]`
/// after it starts an array index (`_method[]` is an array named
/// `_method`), one without becomes `_`. So `.method`, ` _method` and
/// `_method[x]` are all `_method` to Laravel and Symfony.
pub fn is_override_name(name: impl Iterator<Item = u8> + Clone) -> bool {
    const OVERRIDE: &[u8] = b"_method";
    let mut name = name.take_while(|&b| b != 0).skip_while(|&b| b == b' ');
    let mut matched = 0;
    while let Some(b) = name.next() {
        let b = match b {
            b' ' | b'.' => b'_',
            b'[' if name.clone().any(|b| b == b']') => break,
            b'[' => b'_',
            b => b,
        };
        if !OVERRIDE
            .get(matched)
            .is_some_and(|o| o.eq_ignore_ascii_case(&b))
        {
            return false;
        }
        matched += 1;
    }
    matched == OVERRIDE.len()
}

/// Scans a multipart body as it streams for a part named as a method
/// override.
///
/// It does not parse the parts: every line that reads like a
/// `Content-Disposition` header is checked, wherever it stands, so no
/// disagreement about where parts begin (a boundary after a bare LF, a
/// preamble) can hide one. The cost is that a line of an uploaded file
/// that reads `Content-Disposition: ...; name="_method"` is refused too.
/// Lines are checked whole; only the start of a line that may be such a
/// header is held, at most [`MAX_PART_HEADER_LINE`] bytes.
#[derive(Debug, Default)]
pub struct MultipartNames {
    /// The current line so far, while it may be a `Content-Disposition`.
    line: Vec<u8>,
    /// The current line is not one: skip to its end.
    skipping: bool,
}

const DISPOSITION: &[u8] = b"content-disposition";

impl MultipartNames {
    /// Scans the next chunk of the body (`end`: the last).
    pub fn feed(&mut self, mut chunk: &[u8], end: bool) -> Result<(), Denial> {
        while !chunk.is_empty() {
            let line_end = memchr::memchr(b'\n', chunk);
            let (piece, rest) = match line_end {
                Some(i) => (&chunk[..i], &chunk[i + 1..]),
                None => (chunk, &[][..]),
            };
            chunk = rest;
            if !self.skipping {
                let take = piece
                    .len()
                    .min(MAX_PART_HEADER_LINE.saturating_sub(self.line.len()));
                self.line.extend_from_slice(&piece[..take]);
                if !may_be_disposition(&self.line, false) {
                    self.line.clear();
                    self.skipping = true;
                } else if take < piece.len() {
                    if may_be_disposition(&self.line, true) {
                        return Err(Denial::new(
                            Reason::BadRequest,
                            format!(
                                "a multipart `Content-Disposition` line over {MAX_PART_HEADER_LINE} bytes"
                            ),
                        ));
                    }
                    // Blanks alone so far: no header a parser would read.
                    self.line.clear();
                    self.skipping = true;
                }
            }
            if line_end.is_some() {
                self.end_line()?;
            }
        }
        if end {
            self.end_line()?;
        }
        Ok(())
    }

    fn end_line(&mut self) -> Result<(), Denial> {
        let named = !self.skipping && disposition_names_override(&self.line);
        self.line.clear();
        self.skipping = false;
        if named {
            return Err(refusal("a multipart part named `_method`"));
        }
        Ok(())
    }
}

/// Whether `line` (the start of one) may be a `Content-Disposition`
/// header; with `whole`, whether it has the header's whole name.
fn may_be_disposition(line: &[u8], whole: bool) -> bool {
    let line = line.trim_ascii_start();
    let n = line.len().min(DISPOSITION.len());
    (!whole || n == DISPOSITION.len())
        && line
            .get(..n)
            .zip(DISPOSITION.get(..n))
            .is_some_and(|(l, d)| l.eq_ignore_ascii_case(d))
}

/// Whether a `Content-Disposition` line names a part as an override, by
/// its `name` or `name*` parameter, quoted or not, escapes and
/// percent-encoding decoded or not (parsers differ; any reading that gives
/// `_method` refuses).
fn disposition_names_override(line: &[u8]) -> bool {
    let line = line.trim_ascii();
    let Some(rest) = line.get(DISPOSITION.len()..) else {
        return false;
    };
    if !line
        .get(..DISPOSITION.len())
        .is_some_and(|n| n.eq_ignore_ascii_case(DISPOSITION))
    {
        return false;
    }
    let Some(value) = rest.trim_ascii_start().strip_prefix(b":") else {
        return false;
    };
    value.split(|&b| b == b';').any(|param| {
        let mut kv = param.splitn(2, |&b| b == b'=');
        let key = kv.next().unwrap_or_default().trim_ascii();
        let Some(value) = kv.next() else {
            return false;
        };
        if !key.eq_ignore_ascii_case(b"name") && !key.eq_ignore_ascii_case(b"name*") {
            return false;
        }
        let mut value = value.trim_ascii();
        if key.len() == b"name*".len() {
            // RFC 8187: `charset'language'value`.
            if let Some(v) = value.splitn(3, |&b| b == b'\'').nth(2) {
                value = v;
            }
        }
        let unquoted = match value.split_first() {
            Some((&q @ (b'"' | b'\''), inner)) => inner.strip_suffix(&[q]).unwrap_or(inner),
            _ => value,
        };
        let unescaped = unquoted.iter().copied().filter(|&b| b != b'\\');
        is_override_name(unquoted.iter().copied())
            || is_override_name(unescaped)
            || is_override_name(FormDecoded(unquoted))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn names_php_reads_as_method_are_overrides() {
        for (name, is) in [
            ("_method", true),
            ("_METHOD", true),
            ("%5Fmethod", true),
            (".method", true),
            ("%2Emethod", true),
            ("%20_method", true),
            ("+_method", true),
            ("++.method", true),
            (" method", false),
            ("_method[]", true),
            ("_method[x]", true),
            ("_method%5B%5D", true),
            ("_method%00tail", true),
            ("_method[", false),
            ("_method_", false),
            ("_metho", false),
            ("method", false),
            ("b_method", false),
            ("_method.x", false),
            ("", false),
            ("[]", false),
        ] {
            assert_eq!(
                is_override_name(FormDecoded(name.as_bytes())),
                is,
                "{name:?}"
            );
        }
    }

    #[test]
    fn a_form_naming_an_override_is_found() {
        for (form, found) in [
            (&b"a=1&_method=DELETE"[..], true),
            (b"a=1;.method=DELETE", true),
            (b"%20_method=DELETE", true),
            (b"_method", true),
            (b"a=_method&b_method=1", false),
            (b"title=x&body=y", false),
            (b"", false),
        ] {
            assert_eq!(
                form_overrides_method(form),
                found,
                "{}",
                String::from_utf8_lossy(form)
            );
        }
    }

    fn request(method: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build(method, b"/v1/x", None).expect("request");
        for (n, v) in headers {
            req.append_header(n.to_string(), *v).expect("header");
        }
        req
    }

    #[test]
    fn a_form_body_is_read_and_an_override_in_it_refused() {
        let form = [
            (
                "content-type",
                "application/x-www-form-urlencoded; charset=utf-8",
            ),
            ("content-length", "17"),
        ];
        let req = request("POST", &form);
        assert_eq!(
            MethodOverride.body_limit(&req, &testing::ctx()),
            Some(MAX_FORM_BODY)
        );
        for (body, passes) in [(&b"_method=DELETE"[..], false), (b"title=hello", true)] {
            let mut ctx = testing::ctx();
            ctx.body = Some(bytes::Bytes::copy_from_slice(body));
            let result = MethodOverride.apply(&mut request("POST", &form), &mut ctx);
            assert_eq!(result.is_ok(), passes, "{result:?}");
            if let Err(denial) = result {
                assert_eq!(denial.reason, Reason::BadRequest);
            }
        }
        // Rack reads a POST body without a type as a form.
        let untyped = request("POST", &[("content-length", "17")]);
        assert_eq!(
            MethodOverride.body_limit(&untyped, &testing::ctx()),
            Some(MAX_FORM_BODY)
        );
    }

    #[test]
    fn bodies_no_framework_reads_as_parameters_are_not_read() {
        for req in [
            request("GET", &[]),
            request("POST", &[]),
            request("POST", &[("content-length", "0")]),
            request(
                "POST",
                &[
                    ("content-type", "application/json"),
                    ("content-length", "2"),
                ],
            ),
            request("PUT", &[("content-length", "2")]),
        ] {
            let mut ctx = testing::ctx();
            assert_eq!(MethodOverride.body_limit(&req, &ctx), None);
            let mut req = req;
            assert!(MethodOverride.apply(&mut req, &mut ctx).is_ok());
            assert!(ctx.multipart.is_none());
        }
    }

    #[test]
    fn a_multipart_body_is_scanned_as_it_streams() {
        let mut req = request(
            "POST",
            &[
                ("content-type", "Multipart/Form-Data; boundary=b"),
                ("transfer-encoding", "chunked"),
            ],
        );
        let mut ctx = testing::ctx();
        assert_eq!(MethodOverride.body_limit(&req, &ctx), None, "not held");
        MethodOverride.apply(&mut req, &mut ctx).expect("passes");
        assert!(ctx.multipart.is_some());
        let mut req = request(
            "POST",
            &[
                ("content-type", "multipart/form-data; boundary=b"),
                ("content-type", "application/json"),
                ("content-length", "2"),
            ],
        );
        let denial = MethodOverride
            .apply(&mut req, &mut testing::ctx())
            .expect_err("two types");
        assert_eq!(denial.reason, Reason::BadRequest);
    }

    /// Feeds `body` in chunks of `size` bytes.
    fn scan(body: &[u8], size: usize) -> Result<(), Denial> {
        let mut scanner = MultipartNames::default();
        let chunks: Vec<&[u8]> = body.chunks(size.max(1)).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            scanner.feed(chunk, i + 1 == chunks.len())?;
        }
        Ok(())
    }

    #[test]
    fn a_part_named_as_an_override_is_found_however_the_body_is_cut() {
        let part = |disposition: &str| {
            format!(
                "--b\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nhello\r\n\
                 --b\r\n{disposition}\r\nContent-Type: text/plain\r\n\r\nDELETE\r\n--b--\r\n"
            )
        };
        for (disposition, found) in [
            ("Content-Disposition: form-data; name=\"_method\"", true),
            ("content-disposition:form-data;name=_method", true),
            ("CONTENT-DISPOSITION : form-data; name='.method'", true),
            ("Content-Disposition: form-data; name=\" _method\"", true),
            ("Content-Disposition: form-data; name=\"_method[]\"", true),
            ("Content-Disposition: form-data; name=\"%5Fmethod\"", true),
            ("Content-Disposition: form-data; name*=utf-8''_method", true),
            ("Content-Disposition: form-data; name=\"_me\\thod\"", true),
            (
                "Content-Disposition: form-data; filename=\"x\"; name=\"_method\"",
                true,
            ),
            ("Content-Disposition: form-data; name=\"method\"", false),
            (
                "Content-Disposition: form-data; filename=\"_method\"",
                false,
            ),
            ("Content-Type: text/plain; name=\"_method\"", false),
        ] {
            let body = part(disposition);
            for size in [1, 2, 7, 64, body.len()] {
                let result = scan(body.as_bytes(), size);
                assert_eq!(result.is_err(), found, "{disposition} in chunks of {size}");
            }
        }
        // A boundary after a bare LF, as lenient parsers accept it.
        let bare = "--b\nContent-Disposition: form-data; name=\"_method\"\n\nDELETE\n--b--";
        assert!(scan(bare.as_bytes(), 5).is_err());
    }

    #[test]
    fn only_header_like_lines_are_held() {
        // A long line of file data is skipped, not held or refused.
        let data = format!("--b\r\n\r\n{}\r\n--b--\r\n", "x".repeat(100_000));
        assert!(scan(data.as_bytes(), 4096).is_ok());
        let long = format!(
            "--b\r\nContent-Disposition: form-data; name=\"a\"; x=\"{}\"\r\n",
            "y".repeat(MAX_PART_HEADER_LINE)
        );
        let denial = scan(long.as_bytes(), 1000).expect_err("over the bound");
        assert_eq!(denial.reason, Reason::BadRequest);
    }
}
