//! OTLP protobuf, written straight from a request's audit record.
//!
//! The SDK path built a `KeyValue` per attribute (a `String` each), moved
//! them into a `SpanData`, copied every string again into
//! `opentelemetry-proto`'s structs and then encoded those: about a third
//! of Tether's CPU per request and tens of MiB of queued spans under load.
//! Tether's span has one fixed shape, so it is encoded here in one pass
//! into the export queue's buffer; the queue holds bytes, not objects.
//!
//! Field numbers are those of `opentelemetry/proto/trace/v1/trace.proto`,
//! `common/v1/common.proto` and `collector/trace/v1/trace_service.proto`
//! (OTLP 1.x). The tests decode what is written here with the
//! `opentelemetry-proto` types, and `tests/otel.rs` sends it to a real
//! collector over gRPC and HTTP.

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanContext, SpanId};
use prost::encoding::{encode_varint, WireType};
use tether_filters::record::AuditRecord;

/// `Span.SpanKind.SPAN_KIND_SERVER`.
const SPAN_KIND_SERVER: u64 = 2;
/// `Status.StatusCode.STATUS_CODE_ERROR`.
const STATUS_CODE_ERROR: u64 = 2;
/// `SpanFlags`: whether the parent is remote is known, and it is.
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

/// An attribute's key as it is written, `KeyValue.key` (field 1) with
/// its length, worked out at compile time: a span has about twenty.
macro_rules! key {
    ($text:literal) => {{
        const TEXT: &str = $text;
        const FIELD: [u8; TEXT.len() + 2] = key_field(TEXT);
        &FIELD
    }};
}

const fn key_field<const N: usize>(text: &str) -> [u8; N] {
    // One byte of length: every key is short.
    assert!(text.len() + 2 == N && text.len() < 0x80);
    let mut field = [0u8; N];
    field[0] = 1 << 3 | WireType::LengthDelimited as u8;
    field[1] = text.len() as u8;
    let mut i = 0;
    while i < text.len() {
        field[i + 2] = text.as_bytes()[i];
        i += 1;
    }
    field
}

/// A request's span identity and timing: what the record does not hold.
pub struct SpanHeader<'a> {
    /// This span's trace and id, flags and trace state.
    pub context: &'a SpanContext,
    /// The caller's span, when it sent a `traceparent`.
    pub parent: Option<SpanId>,
    pub start: SystemTime,
    pub end: SystemTime,
}

/// Appends one span, as a `ScopeSpans.spans` field (number 2), to `buf`.
pub fn encode_span(buf: &mut Vec<u8>, span: &SpanHeader<'_>, r: &AuditRecord<'_>) {
    nested_in_room(buf, 2, 2, |b| {
        bytes(b, 1, &span.context.trace_id().to_bytes());
        bytes(b, 2, &span.context.span_id().to_bytes());
        string(b, 3, &span.context.trace_state().header());
        if let Some(parent) = span.parent {
            bytes(b, 4, &parent.to_bytes());
        }
        // The name is `METHOD /route/template`, or the method alone.
        match r.route {
            Some(route) => string_parts(b, 5, &[r.method, " ", route]),
            None => string(b, 5, r.method),
        }
        varint(b, 6, SPAN_KIND_SERVER);
        fixed64(b, 7, unix_nanos(span.start));
        fixed64(b, 8, unix_nanos(span.end));
        attributes(b, r);
        if r.status >= 500 {
            nested(b, 15, |s| {
                string(s, 2, r.reason);
                varint(s, 3, STATUS_CODE_ERROR);
            });
        }
        let remote = if span.parent.is_some() {
            FLAG_IS_REMOTE
        } else {
            0
        };
        let flags = FLAG_HAS_IS_REMOTE | remote | u32::from(span.context.trace_flags().to_u8());
        put_key(b, 16, WireType::ThirtyTwoBit);
        b.extend_from_slice(&flags.to_le_bytes());
    });
}

/// Span attributes (`Span.attributes`, field 9): HTTP semantic
/// conventions, plus Tether's facts.
fn attributes(b: &mut Vec<u8>, r: &AuditRecord<'_>) {
    let text = |b: &mut Vec<u8>, key: &[u8], value: Option<&str>| {
        if let Some(v) = value {
            text_attribute(b, key, v);
        }
    };
    text(b, key!("http.request.method"), Some(r.method));
    text(b, key!("url.path"), Some(r.path));
    int_attribute(b, key!("http.response.status_code"), i64::from(r.status));
    text(b, key!("tether.request_id"), Some(r.request_id.as_str()));
    text(b, key!("tether.decision"), Some(r.decision));
    text(b, key!("tether.reason"), Some(r.reason));
    int_attribute(b, key!("tether.generation"), r.generation as i64);
    text(b, key!("http.route"), r.route);
    text(b, key!("client.address"), r.client.as_deref());
    text(b, key!("gen_ai.agent.id"), r.agent);
    text(b, key!("tether.identity_kind"), r.identity_kind);
    text(b, key!("tether.owner"), r.owner);
    text(b, key!("tether.team"), r.team);
    // The person the agents act for answers for the action too.
    text(b, key!("enduser.id"), r.on_behalf_of);
    text(b, key!("tether.stage"), r.stage);
    text(b, key!("tether.action"), r.action.as_deref());
    text(b, key!("tether.resource"), r.resource.as_deref());
    text(b, key!("mcp.method.name"), r.mcp_method);
    text(b, key!("gen_ai.tool.name"), r.tool);
    if let Some(chain) = &r.delegation_chain {
        string_array_attribute(b, key!("tether.delegation.chain"), chain.as_slice());
        // The chain starts with the subject; the depth counts agents.
        int_attribute(b, key!("tether.delegation.depth"), chain.len() as i64 - 1);
    }
    if !r.policies.is_empty() {
        string_array_attribute(b, key!("tether.policies"), r.policies);
    }
    if let Some(shadow) = &r.shadow {
        text(b, key!("tether.shadow.decision"), Some(shadow.decision));
    }
    if let Some(cached) = r.cached {
        attribute(b, key!("tether.cached"), |av| {
            varint(av, 2, u64::from(cached))
        });
    }
}

/// A string attribute, `KeyValue { key, value: AnyValue { string_value } }`.
/// Most of a span is these, so they are written with every length worked
/// out first: nothing is written twice or shifted, where writing each of
/// the two enclosing messages in place and then filling in its length
/// cost about a fifth of the span.
fn text_attribute(b: &mut Vec<u8>, key: &[u8], value: &str) {
    // An empty string is protobuf's default, left out: an empty AnyValue.
    let any_value_len = if value.is_empty() {
        0
    } else {
        field_len(value.len())
    };
    let key_value_len = key.len() + field_len(any_value_len);
    b.reserve(field_len(key_value_len));
    put_key(b, 9, WireType::LengthDelimited);
    put_varint(b, key_value_len as u64);
    b.extend_from_slice(key);
    put_key(b, 2, WireType::LengthDelimited);
    put_varint(b, any_value_len as u64);
    string(b, 1, value);
}

/// The bytes a length-delimited field with a one-byte key (every field
/// number written here is under 16) takes for a body of `len` bytes.
fn field_len(len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// A `KeyValue` (field 9 of a span, 1 of a resource): the key, and an
/// `AnyValue` that `value` writes.
fn attribute(b: &mut Vec<u8>, key: &[u8], value: impl FnOnce(&mut Vec<u8>)) {
    attribute_in(b, 9, key, value);
}

fn attribute_in(b: &mut Vec<u8>, field: u32, key: &[u8], value: impl FnOnce(&mut Vec<u8>)) {
    nested(b, field, |kv| {
        kv.extend_from_slice(key);
        nested(kv, 2, value);
    });
}

fn int_attribute(b: &mut Vec<u8>, key: &[u8], value: i64) {
    // int64 is a plain varint of the two's complement.
    attribute(b, key, |av| varint(av, 3, value as u64));
}

fn string_array_attribute<S: AsRef<str>>(b: &mut Vec<u8>, key: &[u8], items: &[S]) {
    attribute(b, key, |av| {
        nested(av, 5, |array| {
            for item in items {
                nested(array, 1, |v| string(v, 1, item.as_ref()));
            }
        })
    });
}

/// What comes before the spans in an `ExportTraceServiceRequest` of one
/// resource (`service.name`) and one scope (`tether`). The queued spans
/// follow it as [`encode_span`] wrote them, never moved: an export
/// copies them once, into the transport's buffer, where wrapping them
/// in their three enclosing fields shifted the whole batch three times.
pub struct Envelope {
    /// `ResourceSpans.resource`, field and all.
    resource: Vec<u8>,
    /// `ScopeSpans.scope`, field and all.
    scope: Vec<u8>,
}

impl Envelope {
    pub fn new(service_name: &str) -> Envelope {
        let mut resource = Vec::new();
        nested(&mut resource, 1, |resource| {
            attribute_in(resource, 1, key!("service.name"), |av| {
                string(av, 1, service_name)
            });
        });
        let mut scope = Vec::new();
        nested(&mut scope, 1, |scope| {
            string(scope, 1, "tether");
            string(scope, 2, env!("CARGO_PKG_VERSION"));
        });
        Envelope { resource, scope }
    }

    /// The request's bytes up to `spans_len` bytes of spans: the lengths
    /// of the enclosing fields are known before the spans are written.
    pub fn head(&self, spans_len: usize) -> Vec<u8> {
        let scope_spans_len = self.scope.len() + spans_len;
        let mut scope_spans_key = Vec::with_capacity(11);
        put_key(&mut scope_spans_key, 2, WireType::LengthDelimited);
        put_varint(&mut scope_spans_key, scope_spans_len as u64);
        let resource_spans_len = self.resource.len() + scope_spans_key.len() + scope_spans_len;

        let mut head = Vec::with_capacity(11 + resource_spans_len - spans_len);
        put_key(&mut head, 1, WireType::LengthDelimited);
        put_varint(&mut head, resource_spans_len as u64);
        head.extend_from_slice(&self.resource);
        head.extend_from_slice(&scope_spans_key);
        head.extend_from_slice(&self.scope);
        head
    }
}

/// A length-delimited field whose body `body` writes, in place after a
/// one-byte length: most bodies here are under 128 bytes.
fn nested(b: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>)) {
    nested_in_room(b, field, 1, body);
}

/// A length-delimited field whose body `body` writes in place after
/// `room` bytes left for its length. A body whose length takes more (or
/// fewer) bytes is shifted to fit: a span leaves two, which every span
/// from 128 bytes to 16 KiB takes, so a span is never moved.
fn nested_in_room(b: &mut Vec<u8>, field: u32, room: usize, body: impl FnOnce(&mut Vec<u8>)) {
    put_key(b, field, WireType::LengthDelimited);
    let at = b.len();
    b.resize(at + room, 0);
    body(b);
    let end = b.len();
    let len = end - at - room;
    if room == 1 && len < 0x80 {
        b[at] = len as u8;
        return;
    }
    // On the stack: a `Vec` here was an allocation per request.
    let mut prefix = [0u8; 10];
    let mut cursor = &mut prefix[..];
    encode_varint(len as u64, &mut cursor);
    let written = 10 - cursor.len();
    if written > room {
        b.resize(end + written - room, 0);
    }
    if written != room {
        b.copy_within(at + room..end, at + written);
        b.truncate(at + written + len);
    }
    b[at..at + written].copy_from_slice(&prefix[..written]);
}

/// A string field; empty strings are the default and are left out, as
/// protobuf does.
fn string(b: &mut Vec<u8>, field: u32, s: &str) {
    if !s.is_empty() {
        bytes(b, field, s.as_bytes());
    }
}

/// A string field written from its parts.
fn string_parts(b: &mut Vec<u8>, field: u32, parts: &[&str]) {
    put_key(b, field, WireType::LengthDelimited);
    put_varint(b, parts.iter().map(|p| p.len()).sum::<usize>() as u64);
    for part in parts {
        b.extend_from_slice(part.as_bytes());
    }
}

fn bytes(b: &mut Vec<u8>, field: u32, value: &[u8]) {
    put_key(b, field, WireType::LengthDelimited);
    put_varint(b, value.len() as u64);
    b.extend_from_slice(value);
}

/// A varint. Nearly every one written here (field keys, most lengths)
/// takes one byte: that case is inlined, where prost's general encoder
/// was a call for each, 26 a span.
#[inline]
fn put_varint(b: &mut Vec<u8>, value: u64) {
    if value < 0x80 {
        b.push(value as u8);
    } else {
        encode_varint(value, b);
    }
}

#[inline]
fn put_key(b: &mut Vec<u8>, field: u32, wire_type: WireType) {
    put_varint(b, u64::from(field << 3 | wire_type as u32));
}

fn varint(b: &mut Vec<u8>, field: u32, value: u64) {
    put_key(b, field, WireType::Varint);
    put_varint(b, value);
}

fn fixed64(b: &mut Vec<u8>, field: u32, value: u64) {
    put_key(b, field, WireType::SixtyFourBit);
    b.extend_from_slice(&value.to_le_bytes());
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::common::v1::KeyValue;
    use prost::Message as _;

    use super::*;

    pub(crate) fn record<'a>(
        policies: &'a [String],
        chain: Option<Vec<&'a str>>,
    ) -> AuditRecord<'a> {
        AuditRecord {
            time: "2026-12-02T10:00:00Z".try_into().expect("fits"),
            request_id: "00112233aabbccdd".try_into().expect("fits"),
            trace_id: None,
            decision: "allow",
            reason: "allowed",
            stage: None,
            detail: None,
            agent: Some("spiffe://example.org/agents/triage"),
            identity_kind: Some("x509_svid"),
            on_behalf_of: chain.as_ref().map(|c| c[0]),
            delegation_chain: chain,
            owner: Some("alice@example.org"),
            team: Some("platform"),
            method: "GET",
            path: "/v1/repos/tether/issues",
            route: Some("/v1/repos/{repo}/issues"),
            action: Some("Action::\"ListIssues\"".into()),
            resource: Some("Repo::\"tether\"".into()),
            mcp_method: None,
            tool: None,
            upstream: Some("127.0.0.1:8080"),
            policies,
            cached: Some(true),
            shadow: None,
            status: 200,
            client: Some("127.0.0.1".try_into().expect("fits")),
            duration_ms: 0.2,
            generation: 3,
            review_overdue: false,
        }
    }

    fn sampled_root() -> SpanContext {
        SpanContext::new(
            TraceId::from(7),
            SpanId::from(9),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        )
    }

    /// A root span that starts and ends at the epoch.
    fn at_epoch(context: &SpanContext) -> SpanHeader<'_> {
        SpanHeader {
            context,
            parent: None,
            start: UNIX_EPOCH,
            end: UNIX_EPOCH,
        }
    }

    /// A whole request, as an export sends it: the head, then the spans.
    fn export_request(service_name: &str, spans: &[u8]) -> Vec<u8> {
        let mut body = Envelope::new(service_name).head(spans.len());
        body.extend_from_slice(spans);
        body
    }

    fn value(attributes: &[KeyValue], key: &str) -> Option<Value> {
        attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.clone()?.value)
    }

    fn text(s: &str) -> Option<Value> {
        Some(Value::StringValue(s.into()))
    }

    #[test]
    fn spans_decode_with_the_reference_otlp_types() {
        let context = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").expect("trace id"),
            SpanId::from_hex("1122334455667788").expect("span id"),
            TraceFlags::SAMPLED,
            false,
            TraceState::from_key_value([("vendor", "x")]).expect("state"),
        );
        let start = UNIX_EPOCH + Duration::from_nanos(1_764_669_600_123_456_789);
        let header = SpanHeader {
            context: &context,
            parent: Some(SpanId::from_hex("00f067aa0ba902b7").expect("parent")),
            start,
            end: start + Duration::from_micros(250),
        };
        // Long enough that every length prefix needs two bytes.
        let policies: Vec<String> = (0..20).map(|i| format!("policy-{i}")).collect();
        let chain = vec!["user:alice", "spiffe://example.org/agents/triage"];
        let mut spans = Vec::new();
        let mut allowed = record(&policies, Some(chain));
        allowed.shadow = Some(tether_filters::record::ShadowRecord {
            decision: "deny",
            policies: &[],
        });
        encode_span(&mut spans, &header, &allowed);
        // A value long enough for two-byte lengths, and an empty one.
        let long_path = format!("/v1/{}", "a".repeat(200));
        let mut denied = record(&[], None);
        denied.path = &long_path;
        denied.owner = Some("");
        denied.route = None;
        denied.status = 502;
        denied.decision = "deny";
        denied.reason = "upstream_unavailable";
        encode_span(&mut spans, &header, &denied);

        let body = export_request("tether-test", &spans);
        let request = ExportTraceServiceRequest::decode(body.as_slice()).expect("valid OTLP");
        let [resource_spans] = request.resource_spans.as_slice() else {
            panic!("one resource: {request:?}");
        };
        let resource = resource_spans.resource.as_ref().expect("resource");
        assert_eq!(
            value(&resource.attributes, "service.name"),
            text("tether-test")
        );
        let [scope_spans] = resource_spans.scope_spans.as_slice() else {
            panic!("one scope");
        };
        let scope = scope_spans.scope.as_ref().expect("scope");
        assert_eq!(scope.name, "tether");
        assert_eq!(scope.version, env!("CARGO_PKG_VERSION"));
        let [allowed, refused] = scope_spans.spans.as_slice() else {
            panic!("two spans: {:?}", scope_spans.spans);
        };

        assert_eq!(allowed.trace_id, context.trace_id().to_bytes());
        assert_eq!(allowed.span_id, context.span_id().to_bytes());
        assert_eq!(
            allowed.parent_span_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!(allowed.trace_state, "vendor=x");
        assert_eq!(allowed.name, "GET /v1/repos/{repo}/issues");
        assert_eq!(allowed.kind, 2, "server");
        assert_eq!(allowed.start_time_unix_nano, 1_764_669_600_123_456_789);
        assert_eq!(allowed.end_time_unix_nano, 1_764_669_600_123_706_789);
        assert_eq!(allowed.flags, 0x301, "remote parent, sampled");
        assert_eq!(allowed.status, None, "unset");
        let a = &allowed.attributes;
        assert_eq!(value(a, "http.request.method"), text("GET"));
        assert_eq!(value(a, "url.path"), text("/v1/repos/tether/issues"));
        assert_eq!(
            value(a, "http.response.status_code"),
            Some(Value::IntValue(200))
        );
        assert_eq!(value(a, "tether.request_id"), text("00112233aabbccdd"));
        assert_eq!(value(a, "tether.decision"), text("allow"));
        assert_eq!(value(a, "tether.shadow.decision"), text("deny"));
        assert_eq!(value(a, "tether.generation"), Some(Value::IntValue(3)));
        assert_eq!(value(a, "http.route"), text("/v1/repos/{repo}/issues"));
        assert_eq!(value(a, "client.address"), text("127.0.0.1"));
        assert_eq!(
            value(a, "gen_ai.agent.id"),
            text("spiffe://example.org/agents/triage")
        );
        assert_eq!(value(a, "tether.owner"), text("alice@example.org"));
        assert_eq!(value(a, "enduser.id"), text("user:alice"));
        assert_eq!(value(a, "tether.action"), text("Action::\"ListIssues\""));
        assert_eq!(value(a, "tether.resource"), text("Repo::\"tether\""));
        assert_eq!(value(a, "tether.cached"), Some(Value::BoolValue(true)));
        assert_eq!(
            value(a, "tether.delegation.depth"),
            Some(Value::IntValue(1))
        );
        let strings = |v: Option<Value>| match v {
            Some(Value::ArrayValue(array)) => array
                .values
                .into_iter()
                .map(|v| match v.value {
                    Some(Value::StringValue(s)) => s,
                    other => panic!("not a string: {other:?}"),
                })
                .collect::<Vec<_>>(),
            other => panic!("not an array: {other:?}"),
        };
        assert_eq!(strings(value(a, "tether.policies")), policies);
        assert_eq!(
            strings(value(a, "tether.delegation.chain")),
            ["user:alice", "spiffe://example.org/agents/triage"]
        );
        assert_eq!(value(a, "tether.stage"), None, "absent facts are left out");

        assert_eq!(refused.name, "GET");
        let status = refused.status.as_ref().expect("an error status");
        assert_eq!(
            (status.code, status.message.as_str()),
            (2, "upstream_unavailable")
        );
        assert_eq!(value(&refused.attributes, "url.path"), text(&long_path));
        let owner = refused
            .attributes
            .iter()
            .find(|kv| kv.key == "tether.owner");
        assert_eq!(
            owner.and_then(|kv| kv.value.as_ref()).map(|v| &v.value),
            Some(&None),
            "an empty string is an empty AnyValue, as protobuf leaves defaults out"
        );
        assert_eq!(value(&refused.attributes, "tether.team"), text("platform"));
        assert_eq!(value(&refused.attributes, "tether.policies"), None);
        assert_eq!(
            value(&refused.attributes, "http.response.status_code"),
            Some(Value::IntValue(502))
        );
    }

    #[test]
    fn a_batch_of_any_size_is_one_valid_request() {
        let context = sampled_root();
        let header = at_epoch(&context);
        let long_name = "s".repeat(300);
        // Batches whose length takes one, two and three bytes to write.
        for count in [0, 1, 30, 200] {
            let mut spans = Vec::new();
            for _ in 0..count {
                encode_span(&mut spans, &header, &record(&[], None));
            }
            let request =
                ExportTraceServiceRequest::decode(export_request(&long_name, &spans).as_slice())
                    .expect("valid OTLP");
            let [resource_spans] = request.resource_spans.as_slice() else {
                panic!("one resource: {request:?}");
            };
            let resource = resource_spans.resource.as_ref().expect("resource");
            assert_eq!(
                value(&resource.attributes, "service.name"),
                text(&long_name)
            );
            let [scope_spans] = resource_spans.scope_spans.as_slice() else {
                panic!("one scope");
            };
            assert_eq!(scope_spans.scope.as_ref().expect("scope").name, "tether");
            assert_eq!(scope_spans.spans.len(), count, "{} bytes", spans.len());
        }
    }

    #[test]
    fn a_nested_field_takes_the_shortest_length_whatever_room_was_left() {
        for room in [1, 2] {
            for len in [0, 1, 127, 128, 300, 16_383, 16_384, 70_000] {
                let mut b = vec![0xee];
                nested_in_room(&mut b, 2, room, |b| {
                    b.extend((0..len).map(|i| i as u8));
                });
                b.push(0xff);
                let mut rest = &b[1..];
                let key = prost::encoding::decode_varint(&mut rest).expect("key");
                assert_eq!(key, 2 << 3 | 2, "field 2, length-delimited");
                let before = rest.len();
                let decoded = prost::encoding::decode_varint(&mut rest).expect("length");
                assert_eq!(decoded, len as u64);
                assert_eq!(
                    before - rest.len(),
                    prost::encoding::encoded_len_varint(len as u64),
                    "room {room}, {len} bytes: the shortest length"
                );
                assert!(rest[..len].iter().enumerate().all(|(i, &v)| v == i as u8));
                assert_eq!(rest[len..], [0xff], "nothing lost or left after it");
                assert_eq!(b[0], 0xee, "nothing before it touched");
            }
        }
    }

    #[test]
    fn a_root_span_has_no_parent_and_says_so() {
        let context = sampled_root();
        let header = at_epoch(&context);
        let mut spans = Vec::new();
        encode_span(&mut spans, &header, &record(&[], None));
        let body = export_request("t", &spans);
        let request = ExportTraceServiceRequest::decode(body.as_slice()).expect("valid OTLP");
        let span = &request.resource_spans[0].scope_spans[0].spans[0];
        assert!(span.parent_span_id.is_empty());
        assert_eq!(span.flags, 0x101, "local root, sampled");
        assert!(span.trace_state.is_empty());
    }
}
