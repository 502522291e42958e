//! MCP (JSON-RPC 2.0 over HTTP): tool-level authorization.
//!
//! On a route marked `mcp`, the request body is read (bounded) and parsed
//! before anything is forwarded. The JSON-RPC method becomes the Cedar
//! action (`Action::"tools/call"`, `Action::"tools/list"`, ...); a
//! `tools/call` acts on the tool (`Tool::"create_issue"`) and hands its
//! arguments to policy as `context.arguments`; other methods act on the
//! route's resource. Batches, malformed JSON and over-size bodies are
//! refused with a JSON-RPC error and never reach policy or the upstream.

use std::sync::Arc;

use cedar_policy::{EntityId, EntityTypeName, EntityUid, RestrictedExpression};
use pingora_http::RequestHeader;
use serde_json::Value;

use crate::authorize::{DecisionCache, DecisionInput};
use crate::route::ResourceRef;
use crate::{Denial, Filter, Reason, RequestCtx};

/// Largest body an MCP route may accept: what Tether can hold to replay
/// to the upstream after deciding on it.
pub const MAX_BODY: usize = 64 * 1024;
/// Deepest nesting of tool arguments handed to policy.
const MAX_DEPTH: usize = 16;

/// JSON-RPC error codes.
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
/// Server-defined: refused by Tether.
const REFUSED: i64 = -32001;

/// An MCP route's settings, compiled.
#[derive(Debug, Clone)]
pub struct McpRoute {
    /// The Cedar type of tools.
    pub tool_type: EntityTypeName,
    /// Largest body accepted.
    pub max_body: usize,
}

/// The JSON-RPC call a request carries.
#[derive(Debug, Clone)]
pub struct McpCall {
    /// The request id (absent for notifications).
    pub id: Option<Value>,
    /// The JSON-RPC method.
    pub method: String,
    /// For `tools/call`: the tool's name.
    pub tool: Option<String>,
    /// For `tools/call`: the arguments, as canonical JSON.
    pub arguments: Option<Arc<str>>,
}

impl McpCall {
    /// Parses a JSON-RPC request body.
    pub fn parse(body: &[u8]) -> Result<McpCall, Denial> {
        let not_json = |e: serde_json::Error| {
            Denial::new(Reason::BadRequest, format!("body is not JSON: {e}"))
        };
        // Read twice, so that Tether and the server cannot read different
        // calls from one body: `serde_json` keeps the last of two equal
        // keys, other servers the first, and Go's `encoding/json` matches
        // struct fields ignoring case.
        serde::Deserializer::deserialize_any(
            &mut serde_json::Deserializer::from_slice(body),
            UniqueKeys,
        )
        .map_err(not_json)?;
        let value: Value = serde_json::from_slice(body).map_err(not_json)?;
        let Value::Object(obj) = value else {
            let what = if value.is_array() {
                "JSON-RPC batches are not accepted: send one call per request, so each is authorized"
            } else {
                "a JSON-RPC request must be an object"
            };
            return Err(Denial::new(Reason::BadRequest, what));
        };
        no_keys_alike(&obj, "the call")?;
        if let Some(params) = obj.get("params").and_then(Value::as_object) {
            no_keys_alike(params, "`params`")?;
        }
        if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
            return Err(Denial::new(Reason::BadRequest, "`jsonrpc` must be \"2.0\""));
        }
        let Some(method) = obj.get("method").and_then(Value::as_str) else {
            return Err(Denial::new(Reason::BadRequest, "`method` is missing"));
        };
        let mut call = McpCall {
            id: obj.get("id").cloned(),
            method: method.to_string(),
            tool: None,
            arguments: None,
        };
        if method == "tools/call" {
            let params = obj.get("params").and_then(Value::as_object);
            let Some(name) = params.and_then(|p| p.get("name")).and_then(Value::as_str) else {
                return Err(Denial::new(
                    Reason::BadRequest,
                    "`tools/call` without `params.name`",
                ));
            };
            let arguments = params
                .and_then(|p| p.get("arguments"))
                .cloned()
                .unwrap_or(Value::Object(Default::default()));
            if !arguments.is_object() {
                return Err(Denial::new(
                    Reason::BadRequest,
                    "`params.arguments` must be an object",
                ));
            }
            if depth(&arguments) > MAX_DEPTH {
                return Err(Denial::new(
                    Reason::BadRequest,
                    "`params.arguments` is nested too deeply",
                ));
            }
            // Policy reads the arguments too: `{"repo": "public", "Repo":
            // "private"}` must not be one repository to Cedar and another
            // to a server that matches names ignoring case.
            no_keys_alike_within(&arguments, "`params.arguments`")?;
            call.tool = Some(name.to_string());
            call.arguments = Some(arguments.to_string().into());
        }
        Ok(call)
    }
}

/// Refuses an object with two keys that differ only in ASCII case: a
/// server that matches fields ignoring case could read `Method` where
/// Tether read `method`.
fn no_keys_alike(obj: &serde_json::Map<String, Value>, what: &str) -> Result<(), Denial> {
    let mut seen = std::collections::HashSet::with_capacity(obj.len());
    for key in obj.keys() {
        if !seen.insert(key.to_ascii_lowercase()) {
            return Err(Denial::new(
                Reason::BadRequest,
                format!("{what} has two keys spelled alike but for case, one being `{key}`"),
            ));
        }
    }
    Ok(())
}

/// Walks a JSON document and fails on an object that holds a key twice.
struct UniqueKeys;

impl<'de> serde::de::Visitor<'de> for UniqueKeys {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JSON")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(UniqueKeys)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!(
                    "the key `{key}` appears twice"
                )));
            }
            map.next_value_seed(UniqueKeys)?;
        }
        Ok(())
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for UniqueKeys {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// [`no_keys_alike`] for every object in `v`, however deep.
fn no_keys_alike_within(v: &Value, what: &str) -> Result<(), Denial> {
    match v {
        Value::Array(a) => a.iter().try_for_each(|v| no_keys_alike_within(v, what)),
        Value::Object(o) => {
            no_keys_alike(o, what)?;
            o.values().try_for_each(|v| no_keys_alike_within(v, what))
        }
        _ => Ok(()),
    }
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Tool arguments as a Cedar value: strings, integers, booleans, records
/// and sets map to their Cedar kinds; other numbers become strings; `null`
/// members are left out (Cedar has no null). A policy that reads an
/// argument as another type than it came in errors, and errors deny.
pub fn arguments_expression(json: &str) -> Result<RestrictedExpression, String> {
    let value: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    to_expression(&value).ok_or_else(|| "arguments are not an object".to_string())
}

fn to_expression(v: &Value) -> Option<RestrictedExpression> {
    Some(match v {
        Value::Null => return None,
        Value::Bool(b) => RestrictedExpression::new_bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => RestrictedExpression::new_long(i),
            None => RestrictedExpression::new_string(n.to_string()),
        },
        Value::String(s) => RestrictedExpression::new_string(s.clone()),
        Value::Array(items) => {
            RestrictedExpression::new_set(items.iter().filter_map(to_expression))
        }
        Value::Object(members) => RestrictedExpression::new_record(
            members
                .iter()
                .filter_map(|(k, v)| to_expression(v).map(|e| (k.clone(), e))),
        )
        .ok()?,
    })
}

/// The JSON-RPC error a refused MCP call gets.
pub fn error_body(call: Option<&McpCall>, denial: &Denial, request_id: &str) -> Vec<u8> {
    let code = match denial.reason {
        Reason::BadRequest if denial.detail.starts_with("body is not JSON") => PARSE_ERROR,
        Reason::BadRequest | Reason::BodyTooLarge => INVALID_REQUEST,
        _ => REFUSED,
    };
    let id = call.and_then(|c| c.id.clone()).unwrap_or(Value::Null);
    // Malformed requests are the caller's to fix: say what is wrong.
    // Refusals say only why, as for any other route.
    let message = match denial.reason {
        Reason::BadRequest | Reason::BodyTooLarge => denial.detail.to_string(),
        r => r.message().to_string(),
    };
    serde_json::to_vec(&serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {
            "code": code,
            "message": message,
            "data": {"reason": denial.reason.code(), "request_id": request_id},
        },
    }))
    .unwrap_or_default()
}

/// Keeps only the tools `visible` allows in a `tools/list` response.
pub fn filter_tools(body: &[u8], visible: impl Fn(&str) -> bool) -> Result<Vec<u8>, String> {
    let value = serde_json::from_slice(body)
        .map_err(|e| format!("tools/list response is not JSON: {e}"))?;
    filter_tools_value(value, visible)
}

fn filter_tools_value(mut value: Value, visible: impl Fn(&str) -> bool) -> Result<Vec<u8>, String> {
    // Two shapes only: a result with its list of tools, or an error. Any
    // other (a batch, a result without `tools`) could hold tools this
    // filter would not see, and is refused rather than passed on.
    if value.get("error").is_some_and(Value::is_object) && value.get("result").is_none() {
        return serde_json::to_vec(&value).map_err(|e| e.to_string());
    }
    let Some(tools) = value
        .get_mut("result")
        .and_then(|r| r.get_mut("tools"))
        .and_then(Value::as_array_mut)
    else {
        return Err("tools/list response has no `result.tools` list and is no error".into());
    };
    tools.retain(|t| t.get("name").and_then(Value::as_str).is_some_and(&visible));
    serde_json::to_vec(&value).map_err(|e| e.to_string())
}

/// A `tools/list` answer sent as Server-Sent Events (the default of the
/// TypeScript SDK and FastMCP), filtered one event at a time as it
/// arrives.
///
/// Every event is written out again from the fields Tether read, never
/// copied, so what the agent's client dispatches is what was decided on:
/// `data` lines are joined and parsed as JSON; a server request or
/// notification (an object with a `method`, no `result` or `error`) goes
/// through re-encoded; anything else must be what [`filter_tools`] accepts
/// and is filtered, or is replaced by `refused(why)`. The JSON written
/// escapes U+2028, U+2029 and U+0085, which some clients split lines at.
/// `event` and `id` are kept when they are printable ASCII, `retry` when
/// it is digits; comments and unknown fields (a leading byte-order mark
/// turns `data` into one) are dropped. At the end, an event without its
/// closing blank line is dropped, as a client drops it.
#[derive(Default)]
pub struct ToolEvents {
    /// Where the next line starts, in what the caller holds.
    line_start: usize,
    /// How far the line from `line_start` is known to hold no line end:
    /// an event arriving a few bytes at a time is searched once, not once
    /// per chunk.
    searched: usize,
}

impl ToolEvents {
    /// Takes `held`, what has arrived and not yet been consumed; returns
    /// the complete events among it, rewritten, and how many bytes they
    /// took (the caller drops those before the next call).
    pub fn filter(
        &mut self,
        held: &[u8],
        at_end: bool,
        visible: impl Fn(&str) -> bool,
        refused: impl Fn(String) -> Vec<u8>,
    ) -> (Vec<u8>, usize) {
        let mut out = Vec::new();
        let mut consumed = 0;
        let mut at = self.line_start;
        let mut from = self.searched.max(at);
        loop {
            let Some(end) = held[from..]
                .iter()
                .position(|&b| b == b'\n' || b == b'\r')
                .map(|i| from + i)
            else {
                from = held.len();
                break;
            };
            // CRLF, LF or a lone CR: a CR that is the last byte so far is
            // not an end until the next byte (or the stream's end) says.
            let next = match (held[end], held.get(end + 1)) {
                (b'\r', Some(b'\n')) => end + 2,
                (b'\r', None) if !at_end => {
                    from = end;
                    break;
                }
                _ => end + 1,
            };
            let blank = end == at;
            at = next;
            from = next;
            if blank {
                let mut event = SseEvent::default();
                for line in lines(&held[consumed..end]) {
                    event.field(line);
                }
                event.write(&mut out, &visible, &refused);
                consumed = at;
            }
        }
        if at_end {
            (consumed, at, from) = (held.len(), held.len(), held.len());
        }
        self.line_start = at - consumed;
        self.searched = from - consumed;
        (out, consumed)
    }
}

/// The lines of a block of whole lines, each ended by CRLF, LF or CR.
fn lines(mut block: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let end = block.iter().position(|&b| b == b'\n' || b == b'\r')?;
        let line = &block[..end];
        let skip = if block[end..].starts_with(b"\r\n") {
            2
        } else {
            1
        };
        block = &block[end + skip..];
        Some(line)
    })
}

/// One Server-Sent Event's fields, as a client would read them.
#[derive(Default)]
struct SseEvent<'a> {
    /// `event`, `id` and `retry` lines that may go on, in order.
    kept: Vec<&'a [u8]>,
    /// The `data` lines' values, joined by `\n` as a client joins them.
    data: Option<Vec<u8>>,
}

impl<'a> SseEvent<'a> {
    fn field(&mut self, line: &'a [u8]) {
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &[][..]),
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        let printable = || value.iter().all(|b| (b' '..=b'~').contains(b));
        match name {
            b"data" => match &mut self.data {
                Some(data) => {
                    data.push(b'\n');
                    data.extend_from_slice(value);
                }
                None => self.data = Some(value.to_vec()),
            },
            b"event" | b"id" if printable() => self.kept.push(line),
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                self.kept.push(line)
            }
            // Comments, unknown fields, values a client might read
            // otherwise than Tether.
            _ => {}
        }
    }

    fn write(
        &self,
        out: &mut Vec<u8>,
        visible: &impl Fn(&str) -> bool,
        refused: &impl Fn(String) -> Vec<u8>,
    ) {
        for line in &self.kept {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
        // An event with no data (or empty data) is not dispatched.
        if let Some(data) = self.data.as_deref().filter(|d| !d.is_empty()) {
            let message = match serde_json::from_slice::<Value>(data) {
                Ok(v) if is_server_call(&v) => serde_json::to_vec(&v).map_err(|e| e.to_string()),
                Ok(v) => filter_tools_value(v, visible),
                Err(e) => Err(format!("tools/list event is not JSON: {e}")),
            };
            out.extend_from_slice(b"data: ");
            escape_line_breaks(&message.unwrap_or_else(refused), out);
            out.push(b'\n');
        }
        out.push(b'\n');
    }
}

/// Copies `json` to `out` with U+2028, U+2029 and U+0085 escaped: JSON
/// allows them raw in strings, but clients that split lines as Python's
/// `str.splitlines` does would end a `data` line there, and a string could
/// carry an event of its own.
fn escape_line_breaks(json: &[u8], out: &mut Vec<u8>) {
    let mut rest = json;
    while let Some(i) = rest.iter().position(|&b| b == 0xE2 || b == 0xC2) {
        let escape: Option<(usize, &[u8])> = match &rest[i..] {
            [0xE2, 0x80, 0xA8, ..] => Some((3, b"\\u2028")),
            [0xE2, 0x80, 0xA9, ..] => Some((3, b"\\u2029")),
            [0xC2, 0x85, ..] => Some((2, b"\\u0085")),
            _ => None,
        };
        let (len, text) = escape.unwrap_or((1, &rest[i..i + 1]));
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(text);
        rest = &rest[i + len..];
    }
    out.extend_from_slice(rest);
}

/// A request or notification from the server to the client: it answers
/// nothing, so holds no list of tools.
fn is_server_call(message: &Value) -> bool {
    message.get("method").is_some_and(Value::is_string)
        && message.get("result").is_none()
        && message.get("error").is_none()
}

/// Whether a `tools/list` response should show `tool` to the caller: it
/// may call it, or it may depending on the arguments (a policy that reads
/// them cannot be evaluated without them). What is certainly refused is
/// hidden; each call is still decided on its own when it is made.
pub fn tool_visible(cache: &DecisionCache, ctx: &RequestCtx, tool: &str) -> bool {
    let Some(mut input) = DecisionInput::of(ctx) else {
        return false;
    };
    let Some(compiled) = ctx
        .route
        .as_ref()
        .and_then(|m| ctx.snapshot.routes.get(m.index))
    else {
        return false;
    };
    if compiled.mcp.is_none() {
        return false;
    }
    input.route.action = compiled.action.clone(); // `tools/call` on MCP routes
    input.route.resource = ResourceRef {
        tool: true,
        id: tool.into(),
    };
    input.context.arguments = None;
    let (decision, _) = cache.decide(&ctx.snapshot, input);
    decision.allowed || !decision.errors.is_empty()
}

/// Maps the JSON-RPC call on an MCP route to its Cedar action and resource.
pub struct Mcp;

impl Filter for Mcp {
    fn name(&self) -> &'static str {
        "mcp"
    }

    fn body_limit(&self, _req: &RequestHeader, ctx: &RequestCtx) -> Option<usize> {
        let route = ctx.route.as_ref()?;
        let mcp = ctx.snapshot.routes.get(route.index)?.mcp.as_ref()?;
        Some(mcp.max_body)
    }

    fn apply(&self, req: &mut RequestHeader, ctx: &mut RequestCtx) -> Result<(), Denial> {
        let Some(limit) = self.body_limit(req, ctx) else {
            return Ok(()); // not an MCP route
        };
        let Some(body) = &ctx.body else {
            return Err(Denial::new(
                Reason::Internal,
                "MCP route without a read body",
            ));
        };
        if body.len() > limit {
            return Err(Denial::new(
                Reason::BodyTooLarge,
                format!("body is over {limit} bytes"),
            ));
        }
        let call = McpCall::parse(body)?;
        let Some(route) = ctx.route.as_mut() else {
            return Err(Denial::new(Reason::Internal, "mcp ran before route"));
        };
        let compiled = ctx.snapshot.routes.get(route.index);
        let Some(compiled) = compiled.filter(|c| c.mcp.is_some()) else {
            return Err(Denial::new(Reason::Internal, "MCP route vanished"));
        };
        let action = EntityUid::from_type_name_and_id(
            compiled.action_uid.type_name().clone(),
            EntityId::new(&call.method),
        );
        // A method the schema does not declare is one no policy can
        // permit: refuse it here, clearly, rather than ask Cedar.
        if ctx
            .snapshot
            .policy
            .schema
            .principals_for_action(&action)
            .is_none()
        {
            let detail = format!(
                "MCP method `{}` is not an action in the schema",
                call.method
            );
            ctx.mcp = Some(call);
            return Err(Denial::new(Reason::NoRoute, detail));
        }
        route.action = call.method.as_str().into();
        if let Some(tool) = &call.tool {
            route.resource = ResourceRef {
                tool: true,
                id: tool.into(),
            };
        }
        ctx.mcp = Some(call);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tools_call_names_the_tool_and_keeps_the_arguments() {
        let call = McpCall::parse(
            br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"create_issue","arguments":{"repo":"x","n":2}}}"#,
        )
        .expect("valid");
        assert_eq!(call.method, "tools/call");
        assert_eq!(call.tool.as_deref(), Some("create_issue"));
        assert_eq!(call.id, Some(Value::from(7)));
        let args: Value =
            serde_json::from_str(call.arguments.as_deref().expect("args")).expect("json");
        assert_eq!(args["repo"], "x");
        assert!(arguments_expression(call.arguments.as_deref().expect("args")).is_ok());
    }

    #[test]
    fn malformed_calls_are_refused_with_a_reason() {
        for (body, expected) in [
            (&br#"{"jsonrpc":"2.0","#[..], "not JSON"),
            (br#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"}]"#, "batches"),
            (br#"{"jsonrpc":"1.0","id":1,"method":"tools/list"}"#, "jsonrpc"),
            (br#"{"jsonrpc":"2.0","id":1}"#, "method"),
            (br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}}"#, "params.name"),
            (
                br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":[1]}}"#,
                "must be an object",
            ),
            // One body, two readings: refused, whichever a server takes.
            (
                br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","Method":"tools/call","params":{"name":"rm"}}"#,
                "spelled alike",
            ),
            (
                br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"ok","Name":"rm"}}"#,
                "spelled alike",
            ),
            (
                br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"repo":"public","Repo":"private"}}}"#,
                "spelled alike",
            ),
            (
                br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"a":[{"b":1,"B":2}]}}}"#,
                "spelled alike",
            ),
            (
                br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call"}"#,
                "appears twice",
            ),
            (
                br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"a":{"b":1,"b":2}}}}"#,
                "appears twice",
            ),
        ] {
            let denial = McpCall::parse(body).expect_err("refused");
            assert_eq!(denial.reason, Reason::BadRequest);
            assert!(denial.detail.contains(expected), "{}: {}", expected, denial.detail);
        }
        let deep = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"t","arguments":{}1{}}}}}"#,
            r#"{"a":"#.repeat(20),
            "}".repeat(20)
        );
        assert!(McpCall::parse(deep.as_bytes()).is_err());
    }

    #[test]
    fn errors_are_json_rpc_with_the_call_id() {
        let call =
            McpCall::parse(br#"{"jsonrpc":"2.0","id":"a1","method":"tools/list"}"#).expect("valid");
        let body = error_body(
            Some(&call),
            &Denial::new(Reason::PolicyDenied, "secret"),
            "r1",
        );
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["id"], "a1");
        assert_eq!(v["error"]["code"], REFUSED);
        assert_eq!(v["error"]["data"]["reason"], "policy_denied");
        assert!(!String::from_utf8_lossy(&body).contains("secret"));
        let parse = error_body(
            None,
            &Denial::new(Reason::BadRequest, "body is not JSON: eof"),
            "r2",
        );
        let v: Value = serde_json::from_slice(&parse).expect("json");
        assert_eq!(v["error"]["code"], PARSE_ERROR);
        assert_eq!(v["id"], Value::Null);
    }

    #[test]
    fn tools_list_keeps_only_visible_tools() {
        let body =
            br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"a"},{"name":"b"},{"x":1}]}}"#;
        let filtered = filter_tools(body, |name| name == "b").expect("filtered");
        let v: Value = serde_json::from_slice(&filtered).expect("json");
        assert_eq!(v["result"]["tools"], serde_json::json!([{"name": "b"}]));
    }

    #[test]
    fn a_tools_list_response_of_another_shape_is_refused_not_passed_on() {
        let error = br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"no"}}"#;
        assert!(filter_tools(error, |_| false).is_ok(), "an error passes");
        for body in [
            &br#"[{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"rm"}]}}]"#[..],
            br#"{"jsonrpc":"2.0","id":1,"result":{"tools":{"name":"rm"}}}"#,
            br#"{"jsonrpc":"2.0","id":1,"result":{}}"#,
        ] {
            assert!(
                filter_tools(body, |_| false).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    /// Feeds `stream` to a [`ToolEvents`] cut at `cuts`, as chunks arrive,
    /// keeping what each call leaves for the next.
    fn filter_events_in_chunks(stream: &[u8], cuts: &[usize]) -> String {
        let mut events = ToolEvents::default();
        let mut held = Vec::new();
        let mut out = Vec::new();
        let mut from = 0;
        for &to in cuts.iter().chain([&stream.len()]) {
            held.extend_from_slice(&stream[from..to]);
            from = to;
            let at_end = to == stream.len();
            let (filtered, used) =
                events.filter(&held, at_end, |name| name == "b", |why| why.into_bytes());
            out.extend_from_slice(&filtered);
            held.drain(..used);
        }
        assert!(held.is_empty());
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn a_tools_list_event_stream_is_filtered_wherever_its_chunks_end() {
        // A notification first, the answer's JSON over two data lines,
        // CRLF, lone-CR and LF line ends, a comment, an unknown field.
        let stream = concat!(
            ": keep-alive\r\n",
            "event: message\r\n",
            "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\r\n\r\n",
            "id: 7\r",
            "data: {\"jsonrpc\":\"2.0\",\"id\":1,\r",
            "data: \"result\":{\"tools\":[{\"name\":\"a\"},{\"name\":\"b\"}]}}\r",
            "mystery: data\r\r",
            "retry: 10\n\n",
        )
        .as_bytes();
        let expected = concat!(
            "event: message\n",
            "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\n",
            "id: 7\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"b\"}]}}\n\n",
            "retry: 10\n\n",
        );
        assert_eq!(filter_events_in_chunks(stream, &[]), expected);
        for cut in 1..stream.len() {
            assert_eq!(
                filter_events_in_chunks(stream, &[cut]),
                expected,
                "cut at {cut}"
            );
        }
        let every_byte: Vec<usize> = (1..stream.len()).collect();
        assert_eq!(filter_events_in_chunks(stream, &every_byte), expected);
    }

    #[test]
    fn an_event_arriving_a_little_at_a_time_is_searched_once() {
        let mut events = ToolEvents::default();
        let mut held = b"data: ".to_vec();
        for _ in 0..1000 {
            held.push(b'x');
            let (out, used) = events.filter(&held, false, |_| true, |why| why.into_bytes());
            assert_eq!((out.len(), used), (0, 0));
            // The next call starts where this one stopped, not at the
            // event's first byte.
            assert_eq!(events.searched, held.len());
        }
        held.extend_from_slice(b"\r");
        let (_, used) = events.filter(&held, false, |_| true, |why| why.into_bytes());
        assert_eq!((used, events.searched), (0, held.len() - 1), "a CR waits");
        held.extend_from_slice(b"\n\n");
        let (out, used) = events.filter(&held, false, |_| true, |why| why.into_bytes());
        assert_eq!(used, held.len());
        assert!(out.starts_with(b"data: tools/list event is not JSON"));
        assert_eq!((events.line_start, events.searched), (0, 0));
    }

    #[test]
    fn an_event_tether_cannot_filter_is_replaced_and_an_unfinished_one_dropped() {
        for (stream, expected) in [
            // A batch could hold a list this filter would not see.
            (
                "data: [{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"a\"}]}}]\n\n",
                "data: tools/list response has no `result.tools` list and is no error\n\n",
            ),
            ("data: {\"tools\":\n\n", "data: tools/list event is not JSON"),
            // A byte-order mark makes the field a client's `data`, not ours.
            (
                "\u{feff}data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"a\"}]}}\n\n",
                "\n",
            ),
            // No closing blank line: a client never dispatches it.
            (
                "data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"a\"}]}}\n",
                "",
            ),
            // An error answer and an empty event pass.
            (
                "data: {\"error\":{\"code\":1},\"id\":1}\n\ndata:\n\n",
                "data: {\"error\":{\"code\":1},\"id\":1}\n\n\n",
            ),
            // Lines some clients split further (U+2028, as Python's
            // `str.splitlines` does) never go on as they came.
            (
                ": x\u{2028}data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"a\"}]}}\u{2028}\u{2028}\n\n",
                "\n",
            ),
            (
                "event: m\u{2028}data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"a\"}]}}\nretry: 1x\n\n",
                "\n",
            ),
            (
                "data: {\"jsonrpc\":\"2.0\",\"method\":\"n\",\"params\":{\"s\":\"\u{2028}data: {\\\"result\\\":{\\\"tools\\\":[{\\\"name\\\":\\\"a\\\"}]}}\u{2029}\u{85}\"}}\n\n",
                "data: {\"jsonrpc\":\"2.0\",\"method\":\"n\",\"params\":{\"s\":\"\\u2028data: ",
            ),
        ] {
            let out = filter_events_in_chunks(stream.as_bytes(), &[]);
            assert!(out.starts_with(expected), "{stream:?} gave {out:?}");
            assert!(!out.contains("\"a\""), "{out}");
        }
    }
}
