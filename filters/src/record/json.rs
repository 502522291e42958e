//! The audit line as JSON, written by hand.
//!
//! Through serde's derive a line cost about 6,000 instructions (a call
//! through the formatter for every key and value, and a table look-up per
//! byte of every string): the largest part of Tether's own work per
//! request. The line has one fixed shape, so it is written here in one
//! pass: keys are constants, and a string is copied whole unless it holds
//! a byte JSON must escape. The derive on [`AuditRecord`] stays the
//! statement of the shape (`tether explain` prints through it); the tests
//! hold the two byte for byte equal, on every field and on arbitrary text.

use super::{AuditRecord, ShadowRecord};

/// `,"name":`, one constant slice per key.
macro_rules! key {
    ($out:expr, $name:literal) => {
        $out.extend_from_slice(concat!(",\"", $name, "\":").as_bytes())
    };
}

/// `,"name":"text"` for text that never needs escaping: digits and
/// letters Tether wrote itself (the time, ids, an address) or one of its
/// fixed codes. A constant and one copy, where [`string`] checks every
/// byte first; the tests compare every line with serde's, and a debug
/// build checks the claim on every line.
macro_rules! plain {
    ($out:expr, $name:literal, $text:expr) => {
        plain_after($out, concat!(",\"", $name, "\":\"").as_bytes(), $text)
    };
}

/// A string field left out when it is `None`, as `skip_serializing_if`
/// does.
macro_rules! optional {
    ($out:expr, $name:literal, $value:expr) => {
        if let Some(text) = $value {
            key!($out, $name);
            string($out, text);
        }
    };
}

impl AuditRecord<'_> {
    /// Appends the record as one JSON object (no newline) to `out`:
    /// exactly what `serde_json::to_writer` writes for it.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        plain_after(out, b"{\"time\":\"", &self.time);
        plain!(out, "request_id", &self.request_id);
        if let Some(trace_id) = &self.trace_id {
            plain!(out, "trace_id", trace_id);
        }
        plain!(out, "decision", self.decision);
        plain!(out, "reason", self.reason);
        optional!(out, "stage", self.stage);
        optional!(out, "detail", self.detail);
        key!(out, "agent");
        nullable(out, self.agent);
        match self.identity_kind {
            Some(kind) => plain!(out, "identity_kind", kind),
            None => out.extend_from_slice(b",\"identity_kind\":null"),
        }
        optional!(out, "on_behalf_of", self.on_behalf_of);
        if let Some(chain) = &self.delegation_chain {
            key!(out, "delegation_chain");
            strings(out, chain);
        }
        key!(out, "owner");
        nullable(out, self.owner);
        key!(out, "team");
        nullable(out, self.team);
        key!(out, "method");
        string(out, self.method);
        key!(out, "path");
        string(out, self.path);
        key!(out, "route");
        nullable(out, self.route);
        key!(out, "action");
        nullable(out, self.action.as_deref());
        key!(out, "resource");
        nullable(out, self.resource.as_deref());
        optional!(out, "mcp_method", self.mcp_method);
        optional!(out, "tool", self.tool);
        optional!(out, "upstream", self.upstream);
        key!(out, "policies");
        strings(out, self.policies);
        key!(out, "cached");
        out.extend_from_slice(match self.cached {
            Some(true) => b"true",
            Some(false) => b"false",
            None => b"null",
        });
        if let Some(ShadowRecord { decision, policies }) = &self.shadow {
            key!(out, "shadow");
            out.extend_from_slice(b"{\"decision\":");
            string(out, decision);
            key!(out, "policies");
            strings(out, policies);
            out.push(b'}');
        }
        key!(out, "status");
        out.extend_from_slice(itoa::Buffer::new().format(self.status).as_bytes());
        match &self.client {
            Some(address) => plain!(out, "client", address),
            None => out.extend_from_slice(b",\"client\":null"),
        }
        key!(out, "duration_ms");
        // serde_json's own float formatting (and `null` for a non-finite
        // value), so the line cannot drift from the derive.
        if serde_json::to_writer(&mut *out, &self.duration_ms).is_err() {
            out.extend_from_slice(b"null");
        }
        key!(out, "generation");
        out.extend_from_slice(itoa::Buffer::new().format(self.generation).as_bytes());
        if self.review_overdue {
            key!(out, "review_overdue");
            out.extend_from_slice(b"true");
        }
        out.push(b'}');
    }
}

fn nullable(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(text) => string(out, text),
        None => out.extend_from_slice(b"null"),
    }
}

fn strings<S: AsRef<str>>(out: &mut Vec<u8>, items: &[S]) {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, item.as_ref());
    }
    out.push(b']');
}

/// A JSON string, escaped as serde_json escapes: the quote, the backslash
/// and control characters; everything else, UTF-8 included, as it is.
/// Runs between escapes are copied whole: Cedar's ids (`Action::"read"`)
/// carry two quotes each.
fn string(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    if !needs_escape(bytes) {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut clean = 0;
    while let Some(i) = next_escape(bytes, clean) {
        let byte = bytes[i];
        let escape: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            _ => &[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xf)],
            ],
        };
        out.extend_from_slice(&bytes[clean..i]);
        out.extend_from_slice(escape);
        clean = i + 1;
    }
    out.extend_from_slice(&bytes[clean..]);
    out.push(b'"');
}

/// `head` (a key and the opening quote), then `text` as it is, and the
/// closing quote.
#[inline]
fn plain_after(out: &mut Vec<u8>, head: &[u8], text: &str) {
    debug_assert!(!needs_escape(text.as_bytes()), "{text:?} needs escaping");
    out.extend_from_slice(head);
    out.extend_from_slice(text.as_bytes());
    out.push(b'"');
}

/// Whether JSON needs any of `bytes` escaped: [`next_escape`]'s test,
/// with the last word overlapping the one before rather than the last
/// few bytes tested one at a time.
fn needs_escape(bytes: &[u8]) -> bool {
    let word = |at: usize| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[at..at + 8]);
        escapes_in(u64::from_le_bytes(word))
    };
    let Some(last) = bytes.len().checked_sub(8) else {
        return bytes.iter().any(escaped);
    };
    let mut found = word(last);
    let mut at = 0;
    while at < last {
        found |= word(at);
        at += 8;
    }
    found != 0
}

fn escaped(byte: &u8) -> bool {
    *byte < 0x20 || *byte == b'"' || *byte == b'\\'
}

/// Where the first byte JSON must escape is, from `from` on. Most
/// strings are short (an id, a name, a path): eight bytes are tested at
/// a time as one word, the last few one at a time. (The compiler's
/// vector code for a byte loop starts only at 64 bytes; below that it
/// went byte by byte.)
fn next_escape(bytes: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    while let Some(word) = bytes.get(at..at + 8) {
        let mut array = [0u8; 8];
        array.copy_from_slice(word);
        let found = escapes_in(u64::from_le_bytes(array));
        if found != 0 {
            // The lowest byte marked is always one that needs escaping.
            return Some(at + found.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    let rest = bytes.get(at..)?;
    rest.iter().position(escaped).map(|i| at + i)
}

/// Non-zero if any byte of `word` is below 0x20, a quote or a backslash.
/// `(x - 0x01..) & !x & 0x80..` is non-zero exactly when some byte of `x`
/// is zero, and its lowest marked byte is zero: a borrow, which can mark
/// a byte wrongly, comes only from a truly zero byte below it. Below 0x20
/// is the same test against 0x20 (exact for any limit up to 0x80, so
/// bytes of UTF-8 are never taken for control bytes).
#[inline]
fn escapes_in(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word;
    let quote = word ^ (ONES * b'"' as u64);
    let backslash = word ^ (ONES * b'\\' as u64);
    let zero_in = |x: u64| x.wrapping_sub(ONES) & !x;
    (below_space | zero_in(quote) | zero_in(backslash)) & HIGH
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use proptest::prelude::*;

    use super::*;
    use crate::record::{AddressText, TimeText, TraceIdText};

    fn when<T>(present: bool, value: T) -> Option<T> {
        present.then_some(value)
    }

    fn by_serde(record: &AuditRecord<'_>) -> Vec<u8> {
        serde_json::to_vec(record).expect("serializes")
    }

    fn by_hand(record: &AuditRecord<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        record.write_json(&mut out);
        out
    }

    /// A record with `text` in every string field and every optional
    /// field set or left out as `present` says.
    fn record<'a>(
        text: &'a str,
        present: bool,
        list: &'a [String],
        duration_ms: f64,
    ) -> AuditRecord<'a> {
        AuditRecord {
            time: TimeText::from("2026-12-03T10:00:00.123456789Z").expect("fits"),
            request_id: crate::context::RequestIdText::from("00ff00ff00ff00ff").expect("fits"),
            trace_id: when(
                present,
                TraceIdText::from("0af7651916cd43dd8448eb211c80319c").expect("fits"),
            ),
            decision: "deny",
            reason: "policy_denied",
            stage: when(present, "authorize"),
            detail: when(present, text),
            agent: when(present, text),
            identity_kind: when(present, "spiffe_x509"),
            on_behalf_of: when(present, text),
            delegation_chain: when(present, vec![text, text]),
            owner: when(present, text),
            team: when(present, text),
            method: text,
            path: text,
            route: when(present, text),
            action: when(present, Cow::Borrowed(text)),
            resource: when(present, text.to_string()),
            mcp_method: when(present, text),
            tool: when(present, text),
            upstream: when(present, text),
            policies: list,
            cached: when(present, present),
            shadow: when(
                present,
                ShadowRecord {
                    decision: "allow",
                    policies: list,
                },
            ),
            status: 403,
            client: when(present, AddressText::from("2001:db8::1").expect("fits")),
            duration_ms,
            generation: u64::MAX,
            review_overdue: present,
        }
    }

    #[test]
    fn every_field_present_or_absent_is_written_as_serde_writes_it() {
        let policies = ["read-repos".to_string(), "policy1".to_string()];
        for present in [true, false] {
            for list in [&policies[..], &[]] {
                let r = record("spiffe://example.org/agent", present, list, 0.25);
                assert_eq!(
                    String::from_utf8(by_hand(&r)).expect("utf-8"),
                    String::from_utf8(by_serde(&r)).expect("utf-8"),
                );
            }
        }
    }

    #[test]
    fn the_codes_written_plain_need_no_escape() {
        use crate::context::IdentityKind;
        use tether_config::TokenKind;
        let reasons = crate::Reason::ALL.iter().map(|r| r.code());
        let decisions = crate::Reason::ALL
            .iter()
            .flat_map(|r| [false, true].map(|allowed| crate::record::decision_label(*r, allowed)));
        let kinds = [
            IdentityKind::X509Svid,
            IdentityKind::Token(TokenKind::JwtSvid),
            IdentityKind::Token(TokenKind::Kubernetes),
            IdentityKind::Token(TokenKind::Oidc),
        ]
        .map(IdentityKind::as_str);
        for code in reasons.chain(decisions).chain(kinds) {
            assert!(!needs_escape(code.as_bytes()), "{code:?}");
        }
    }

    #[test]
    fn control_characters_quotes_and_backslashes_are_escaped() {
        let every_control: String = (0u8..0x20).map(char::from).collect();
        for text in [
            every_control.as_str(),
            "\"quoted\" \\ back\\slash",
            "tab\tnew\nline\r\u{7f}",
            "naïve 東京 🦀",
            "",
        ] {
            let r = record(text, true, &[], 1.0);
            assert_eq!(by_hand(&r), by_serde(&r), "{text:?}");
            let parsed: serde_json::Value = serde_json::from_slice(&by_hand(&r)).expect("json");
            assert_eq!(parsed["path"], text);
        }
    }

    #[test]
    fn a_duration_that_is_not_a_number_is_null() {
        for duration in [f64::NAN, f64::INFINITY, 1e300, 5e-324, 0.0] {
            let r = record("x", false, &[], duration);
            assert_eq!(by_hand(&r), by_serde(&r), "{duration}");
        }
    }

    /// The word-at-a-time test against the plain definition: every byte
    /// value at every position of strings of every length to 17, beside
    /// bytes that are plain or not.
    #[test]
    fn needs_escape_finds_every_byte_json_escapes_wherever_it_is() {
        for len in 1..=17 {
            for at in 0..len {
                for fill in [b'a', 0x7f, 0xff, b'!', b'#', b'[', b']', 0x1f] {
                    for byte in 0..=u8::MAX {
                        let mut bytes = vec![fill; len];
                        bytes[at] = byte;
                        let expected = bytes.iter().any(escaped);
                        assert_eq!(needs_escape(&bytes), expected, "{bytes:?}");
                    }
                }
            }
        }
        assert!(!needs_escape(b""));
    }

    /// Escapes written between plain runs, against serde: one or two
    /// bytes to escape at every position of strings of every length to
    /// 17, every byte value among them.
    #[test]
    fn every_escape_at_every_position_is_written_as_serde_writes_it() {
        for len in 1..=17 {
            for at in 0..len {
                for byte in 0..=0x7f {
                    for second in [None, Some(b'"'), Some(0x01)] {
                        let mut bytes = vec![b'#'; len];
                        bytes[at] = byte;
                        if let Some(second) = second {
                            bytes[(at + 3) % len] = second;
                        }
                        let text = String::from_utf8(bytes).expect("ascii");
                        let mut out = Vec::new();
                        string(&mut out, &text);
                        assert_eq!(out, serde_json::to_vec(&text).expect("json"), "{text:?}");
                    }
                }
            }
        }
    }

    proptest! {
        #[test]
        fn any_text_is_written_as_serde_writes_it(
            text in any::<String>(),
            policy in any::<String>(),
            present in any::<bool>(),
            duration in any::<f64>(),
        ) {
            let list = [policy];
            let r = record(&text, present, &list, duration);
            prop_assert_eq!(by_hand(&r), by_serde(&r));
        }
    }
}
