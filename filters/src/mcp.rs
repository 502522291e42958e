//! MCP (JSON-RPC 2.0 over HTTP): tool-level authorization.
//!
//! On a route marked `mcp`, the request body is read (bounded) and parsed
//! before anything is forwarded. The JSON-RPC method becomes the Cedar
//! action (`Action::"tools/call"`, `Action::"tools/list"`, ...); a
//! `tools/call` acts on the tool (`Tool::"create_issue"`) and hands its
//! arguments to policy as `context.arguments`; other methods act on the
//! route's resource. Batches, malformed JSON and over-size bodies are
//! refused with a JSON-RPC error and never reach policy or the upstream.
//! What is forwarded is the call as parsed, written out again.

use std::sync::Arc;

use bytes::Bytes;
use cedar_policy::{EntityId, EntityTypeName, EntityUid, RestrictedExpression};
use pingora_http::RequestHeader;
use serde_json::{Map, Value};

use crate::authorize::{DecisionCache, DecisionInput};
use crate::fold::{alike as keys_alike, folded};
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

/// The members of a call Tether reads, and of its `params`: a key a server
/// may read as one of them (`Params`, `paramſ`) is refused, as it could
/// hold a call Tether never saw.
const CALL_MEMBERS: [&str; 4] = ["jsonrpc", "method", "params", "id"];
const PARAMS_MEMBERS: [&str; 2] = ["name", "arguments"];

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
    /// The body forwarded instead of the one received: the call as Tether
    /// parsed it, written out again, so a server reads no escape, number
    /// or duplicate otherwise than Tether did.
    pub forward: Bytes,
}

impl McpCall {
    /// Parses a JSON-RPC request body. `argument_names` are the names
    /// policy may read in `context.arguments`.
    pub fn parse(body: &[u8], argument_names: &ArgumentNames) -> Result<McpCall, Denial> {
        let not_json = |e: serde_json::Error| {
            Denial::new(Reason::BadRequest, format!("body is not JSON: {e}"))
        };
        // Read twice, so that Tether and the server cannot read different
        // calls from one body: `serde_json` keeps the last of two equal
        // keys, other servers the first, and Go's `encoding/json` matches
        // struct fields under Unicode case folding (see [`keys_alike`]).
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
        no_keys_alike(&obj, "the call", &CALL_MEMBERS)?;
        if let Some(params) = obj.get("params").and_then(Value::as_object) {
            no_keys_alike(params, "`params`", &PARAMS_MEMBERS)?;
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
            forward: Bytes::new(),
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
            // to a server that matches names ignoring case, nor `REPO`
            // alone no `repo` to Cedar and `repo` to the server.
            no_argument_keys_alike(&arguments, argument_names, "`params.arguments`")?;
            call.tool = Some(name.to_string());
            call.arguments = Some(arguments.to_string().into());
        }
        let forward = serde_json::to_vec(&obj).map_err(|e| {
            Denial::new(
                Reason::Internal,
                format!("cannot write the call again: {e}"),
            )
        })?;
        call.forward = forward.into();
        Ok(call)
    }
}

/// Objects with more keys than this are checked through a set of folded
/// keys; smaller ones (nearly all) pair by pair, with nothing allocated.
const PAIRWISE_KEYS: usize = 12;

/// Refuses an object with two keys a server may read as one (see
/// [`keys_alike`]): it could read `Method` where Tether read `method`.
/// Refuses too a key a server may read as one of `members` without being
/// it: alone, `paramſ` is no `params` to Tether, and `params` to a Go
/// server.
fn no_keys_alike(obj: &Map<String, Value>, what: &str, members: &[&str]) -> Result<(), Denial> {
    let alike = |key: &str| {
        Denial::new(
            Reason::BadRequest,
            format!("{what} has two keys spelled alike but for case, one being `{key}`"),
        )
    };
    if obj.len() <= PAIRWISE_KEYS {
        for (i, key) in obj.keys().enumerate() {
            if obj.keys().skip(i + 1).any(|other| keys_alike(key, other)) {
                return Err(alike(key));
            }
        }
    } else {
        let mut seen = std::collections::HashSet::with_capacity(obj.len());
        for key in obj.keys() {
            if !seen.insert(folded(key)) {
                return Err(alike(key));
            }
        }
    }
    for key in obj.keys() {
        if let Some(member) = members.iter().find(|m| *m != key && keys_alike(key, m)) {
            return Err(Denial::new(
                Reason::BadRequest,
                format!("{what} has the key `{key}`, which a server may read as `{member}`"),
            ));
        }
    }
    Ok(())
}

/// The names the Cedar schema declares in `context.arguments`, at each
/// depth (a record's attributes, each with its own when it is a record or
/// a set of records), of every action. Collected when the schema loads.
#[derive(Debug, Default)]
pub struct ArgumentNames {
    names: Vec<(String, ArgumentNames)>,
}

/// What an undeclared argument holds: no names.
static NO_NAMES: ArgumentNames = ArgumentNames { names: Vec::new() };

impl ArgumentNames {
    /// The argument names of every action's context in `schema` (Cedar
    /// schema text).
    pub fn from_schema(schema: &str) -> Result<ArgumentNames, String> {
        let (json, _warnings) = cedar_policy::schema_str_to_json_with_resolved_types(schema)
            .map_err(|e| e.to_string())?;
        let mut names = ArgumentNames::default();
        let namespaces = json.as_object().into_iter().flat_map(Map::values);
        for namespace in namespaces {
            let actions = namespace.get("actions").and_then(Value::as_object);
            for action in actions.into_iter().flat_map(Map::values) {
                let context = action
                    .get("appliesTo")
                    .and_then(|a| a.get("context"))
                    .and_then(|c| resolve(&json, c));
                let arguments = context
                    .and_then(|c| c.get("attributes"))
                    .and_then(|a| a.get("arguments"));
                if let Some(arguments) = arguments {
                    names.add(&json, arguments, 0);
                }
            }
        }
        Ok(names)
    }

    /// Adds the attribute names of the record type `ty` (in the schema
    /// `json`), or of its elements' type for a set.
    fn add(&mut self, json: &Value, ty: &Value, depth: usize) {
        let Some(ty) = resolve(json, ty) else {
            return;
        };
        if depth > MAX_DEPTH {
            return;
        }
        match ty.get("type").and_then(Value::as_str) {
            Some("Set") => {
                if let Some(element) = ty.get("element") {
                    self.add(json, element, depth + 1);
                }
            }
            Some("Record") => {
                let attributes = ty.get("attributes").and_then(Value::as_object);
                for (name, attribute) in attributes.into_iter().flatten() {
                    let at = match self.names.iter().position(|(n, _)| n == name) {
                        Some(at) => at,
                        None => {
                            self.names.push((name.clone(), ArgumentNames::default()));
                            self.names.len() - 1
                        }
                    };
                    if let Some((_, inner)) = self.names.get_mut(at) {
                        inner.add(json, attribute, depth + 1);
                    }
                }
            }
            _ => {}
        }
    }

    /// The names within the declared argument `name`.
    fn within(&self, name: &str) -> Option<&ArgumentNames> {
        self.names.iter().find(|(n, _)| n == name).map(|(_, a)| a)
    }
}

/// The type `ty` names in the schema `json`: itself, or the common type
/// it refers to (`"N::Args"`, in namespace `N`), followed a few times.
fn resolve<'a>(json: &'a Value, mut ty: &'a Value) -> Option<&'a Value> {
    for _ in 0..MAX_DEPTH {
        let name = ty.get("type").and_then(Value::as_str)?;
        if matches!(
            name,
            "Record" | "Set" | "String" | "Long" | "Boolean" | "Entity" | "Extension"
        ) {
            return Some(ty);
        }
        let (namespace, common) = name.rsplit_once("::").unwrap_or(("", name));
        ty = json.get(namespace)?.get("commonTypes")?.get(common)?;
    }
    None
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

/// [`no_keys_alike`] for every object in the arguments `v`, however deep;
/// and no key a server may read as an argument name policy reads
/// (`names`) without being it.
fn no_argument_keys_alike(v: &Value, names: &ArgumentNames, what: &str) -> Result<(), Denial> {
    match v {
        Value::Array(a) => a
            .iter()
            .try_for_each(|v| no_argument_keys_alike(v, names, what)),
        Value::Object(o) => {
            no_keys_alike(o, what, &[])?;
            for (key, value) in o {
                let within = names.within(key);
                if within.is_none() {
                    if let Some((name, _)) = names.names.iter().find(|(n, _)| keys_alike(key, n)) {
                        return Err(Denial::new(
                            Reason::BadRequest,
                            format!(
                                "{what} has the key `{key}`, which a server may read as `{name}`"
                            ),
                        ));
                    }
                }
                no_argument_keys_alike(value, within.unwrap_or(&NO_NAMES), what)?;
            }
            Ok(())
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

/// What an answer on an MCP endpoint must be to go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The answer to a `tools/list`: a result with its list of tools, or
    /// an error. Any other shape (a batch, a result without `tools`) could
    /// hold tools this filter would not see, and is refused rather than
    /// passed on.
    ToolsList,
    /// Any other answer (another method's, the server's `GET` stream):
    /// any JSON-RPC messages, a batch included. A server may still send a
    /// list of tools there (an event store replaying a stream after
    /// `Last-Event-ID`, an answer to a pending `tools/list` on another
    /// request's stream), and a client takes it by its `id`: each message
    /// with a `result.tools` is filtered as well.
    Any,
}

impl Expect {
    fn what(self) -> &'static str {
        match self {
            Expect::ToolsList => "tools/list",
            Expect::Any => "MCP",
        }
    }
}

/// Filters a whole JSON answer: every list of tools in it keeps only the
/// tools `visible` allows. What goes on is written out again from what
/// Tether read (see [`scrub`]); an answer that is not JSON, or not as
/// `expect`s, is an error. An empty answer other than to a `tools/list`
/// (a `202 Accepted`) holds nothing and stays empty.
pub fn filter_answer(
    body: &[u8],
    expect: Expect,
    visible: impl Fn(&str) -> bool,
) -> Result<Vec<u8>, String> {
    if expect == Expect::Any && body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let value = serde_json::from_slice(body)
        .map_err(|e| format!("{} response is not JSON: {e}", expect.what()))?;
    filter_message(value, expect, &visible)
}

fn filter_message(
    mut value: Value,
    expect: Expect,
    visible: &impl Fn(&str) -> bool,
) -> Result<Vec<u8>, String> {
    match expect {
        Expect::Any => scrub_within(&mut value, visible)?,
        Expect::ToolsList => {
            scrub(&mut value, visible)?;
            let is_error =
                value.get("error").is_some_and(Value::is_object) && value.get("result").is_none();
            let has_tools = value
                .get("result")
                .and_then(|r| r.get("tools"))
                .is_some_and(Value::is_array);
            if !is_error && !has_tools {
                return Err(
                    "tools/list response has no `result.tools` list and is no error".into(),
                );
            }
        }
    }
    serde_json::to_vec(&value).map_err(|e| e.to_string())
}

/// [`scrub`] for a message, or each message of a batch.
fn scrub_within(value: &mut Value, visible: &impl Fn(&str) -> bool) -> Result<(), String> {
    match value {
        Value::Array(messages) => messages
            .iter_mut()
            .try_for_each(|m| scrub_within(m, visible)),
        message => scrub(message, visible),
    }
}

/// Keeps only the visible tools of a message's `result.tools`, and drops
/// what a client could read instead of the members Tether read: a key a
/// client may read as `result`, `tools` or a tool's `name` (see
/// [`keys_alike`]) but that is not it. `{"tools": [...], "Tools": [...]}`
/// would reach a Go client with the unfiltered twin; `{"name": "search",
/// "Name": "delete"}` would show it a tool Tether never saw.
fn scrub(message: &mut Value, visible: &impl Fn(&str) -> bool) -> Result<(), String> {
    let Value::Object(message) = message else {
        return Ok(());
    };
    drop_twins(message, "result");
    let Some(Value::Object(result)) = message.get_mut("result") else {
        return Ok(());
    };
    drop_twins(result, "tools");
    let Some(tools) = result.get_mut("tools") else {
        return Ok(());
    };
    let Value::Array(tools) = tools else {
        return Err("`result.tools` is not a list".into());
    };
    tools.retain_mut(|tool| {
        if let Value::Object(tool) = tool {
            drop_twins(tool, "name");
        }
        tool.get("name")
            .and_then(Value::as_str)
            .is_some_and(visible)
    });
    Ok(())
}

/// Removes the keys of `object` that a client may read as `member` but
/// that are not it.
fn drop_twins(object: &mut Map<String, Value>, member: &str) {
    let twin = |key: &str| key != member && keys_alike(key, member);
    if object.keys().any(|k| twin(k)) {
        object.retain(|k, _| !twin(k));
    }
}

/// An answer on an MCP endpoint sent as Server-Sent Events (a
/// `tools/list` answer, as the TypeScript SDK and FastMCP send it by
/// default; the server's `GET` stream), filtered one event at a time as it
/// arrives.
///
/// Every event is written out again from the fields Tether read, never
/// copied, so what the agent's client dispatches is what was decided on:
/// `data` lines are joined and parsed as JSON; a server request or
/// notification (an object with a `method`, no `result` or `error`) goes
/// through re-encoded; anything else must be what [`filter_answer`]
/// accepts as `expect`ed and is filtered, or is replaced by
/// `refused(why)`. Every message is scrubbed of what a client could read
/// instead of what Tether read (see [`scrub`]). The JSON written escapes
/// U+2028, U+2029 and U+0085, which some clients split lines at. `event`
/// and `id` are kept when they are printable ASCII, `retry` when it is
/// digits; comments and unknown fields (a leading byte-order mark turns
/// `data` into one) are dropped. At the end, an event without its closing
/// blank line is dropped, as a client drops it.
pub struct ToolEvents {
    /// What the events must be.
    expect: Expect,
    /// Where the next line starts, in what the caller holds.
    line_start: usize,
    /// How far the line from `line_start` is known to hold no line end:
    /// an event arriving a few bytes at a time is searched once, not once
    /// per chunk.
    searched: usize,
}

impl ToolEvents {
    /// A stream whose events must be as `expect`ed.
    pub fn new(expect: Expect) -> ToolEvents {
        ToolEvents {
            expect,
            line_start: 0,
            searched: 0,
        }
    }

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
                event.write(&mut out, self.expect, &visible, &refused);
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
        expect: Expect,
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
                Ok(v) if is_server_call(&v) => filter_message(v, Expect::Any, visible),
                Ok(v) => filter_message(v, expect, visible),
                Err(e) => Err(format!("{} event is not JSON: {e}", expect.what())),
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

/// Whether an MCP answer (a `tools/list` one, mostly) should show `tool`
/// to the caller: it may call it, or it may depending on the arguments (a
/// policy that reads them cannot be evaluated without them). What is
/// certainly refused is hidden; each call is still decided on its own
/// when it is made.
pub fn tool_visible(cache: &DecisionCache, ctx: &RequestCtx, tool: &str) -> bool {
    let Some(mut input) = DecisionInput::of(ctx) else {
        return false;
    };
    // Asked of the MCP route the answer comes from, whichever route (a
    // `GET` one on its path, say) the request took.
    let endpoint = ctx
        .route
        .as_ref()
        .and_then(|m| ctx.snapshot.routes.get(m.index))
        .and_then(|r| r.mcp_endpoint);
    let Some((index, compiled)) = endpoint
        .and_then(|i| Some((i, ctx.snapshot.routes.get(i)?)))
        .filter(|(_, r)| r.mcp.is_some())
    else {
        return false;
    };
    input.route.index = index;
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
        let call = McpCall::parse(body, &ctx.snapshot.mcp_arguments)?;
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
            &ArgumentNames::default(),
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
            let denial = McpCall::parse(body, &ArgumentNames::default()).expect_err("refused");
            assert_eq!(denial.reason, Reason::BadRequest);
            assert!(denial.detail.contains(expected), "{}: {}", expected, denial.detail);
        }
        let deep = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"t","arguments":{}1{}}}}}"#,
            r#"{"a":"#.repeat(20),
            "}".repeat(20)
        );
        assert!(McpCall::parse(deep.as_bytes(), &ArgumentNames::default()).is_err());
    }

    #[test]
    fn errors_are_json_rpc_with_the_call_id() {
        let call = McpCall::parse(
            br#"{"jsonrpc":"2.0","id":"a1","method":"tools/list"}"#,
            &ArgumentNames::default(),
        )
        .expect("valid");
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
        let filtered =
            filter_answer(body, Expect::ToolsList, |name| name == "b").expect("filtered");
        let v: Value = serde_json::from_slice(&filtered).expect("json");
        assert_eq!(v["result"]["tools"], serde_json::json!([{"name": "b"}]));
    }

    #[test]
    fn a_tools_list_response_of_another_shape_is_refused_not_passed_on() {
        let error = br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"no"}}"#;
        assert!(
            filter_answer(error, Expect::ToolsList, |_| false).is_ok(),
            "an error passes"
        );
        for body in [
            &br#"[{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"rm"}]}}]"#[..],
            br#"{"jsonrpc":"2.0","id":1,"result":{"tools":{"name":"rm"}}}"#,
            br#"{"jsonrpc":"2.0","id":1,"result":{}}"#,
        ] {
            assert!(
                filter_answer(body, Expect::ToolsList, |_| false).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    /// Feeds `stream` to a [`ToolEvents`] cut at `cuts`, as chunks arrive,
    /// keeping what each call leaves for the next.
    fn filter_events_in_chunks(stream: &[u8], cuts: &[usize]) -> String {
        filter_events_as(Expect::ToolsList, stream, cuts)
    }

    fn filter_events_as(expect: Expect, stream: &[u8], cuts: &[usize]) -> String {
        let mut events = ToolEvents::new(expect);
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
        let mut events = ToolEvents::new(Expect::ToolsList);
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

    /// A schema whose `tools/call` context declares arguments through a
    /// common type, a nested record and a set of records.
    const ARGUMENTS_SCHEMA: &str = r#"
        namespace N {
          type Args = { repo?: String, scope?: String, opts?: { visibility: String }, items?: Set<{ kind: String }> };
          entity Agent; entity Tool;
          action "tools/call" appliesTo { principal: [Agent], resource: [Tool], context: { arguments: Args } };
        }
        entity Other;
        action other appliesTo { principal: [N::Agent], resource: [Other], context: { arguments: { title?: String } } };
    "#;

    #[test]
    fn argument_names_are_read_from_the_schema_at_every_depth() {
        let names = ArgumentNames::from_schema(ARGUMENTS_SCHEMA).expect("names");
        let mut top: Vec<&str> = names.names.iter().map(|(n, _)| n.as_str()).collect();
        top.sort_unstable();
        assert_eq!(top, ["items", "opts", "repo", "scope", "title"]);
        let within = |n: &str| -> Vec<String> {
            names
                .within(n)
                .map(|a| a.names.iter().map(|(n, _)| n.clone()).collect())
                .unwrap_or_default()
        };
        assert_eq!(within("opts"), ["visibility"]);
        assert_eq!(within("items"), ["kind"]);
        assert!(within("repo").is_empty());
        // A schema without arguments has none; one Cedar refuses, an error.
        let plain = ArgumentNames::from_schema(crate::testing::SCHEMA).expect("names");
        assert!(plain.names.is_empty());
        assert!(ArgumentNames::from_schema("entity A = { a: Missing };").is_err());
    }

    #[test]
    fn keys_a_server_reads_as_another_name_are_refused() {
        let names = ArgumentNames::from_schema(ARGUMENTS_SCHEMA).expect("names");
        let call = |params: &str| {
            format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{params}}}"#)
        };
        for (body, expected) in [
            // Twins: Tether decides on one, a Go server may run the other.
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_issues"},"param\u017f":{"name":"delete_repo"}}"#.to_string(),
                "spelled alike",
            ),
            (
                call(r#"{"name":"search_issues","arguments":{},"argument\u017f":{"repo":"private"}}"#),
                "spelled alike",
            ),
            (call(r#"{"name":"t","arguments":{"a":1,"\u212a":2,"k":3}}"#), "spelled alike"),
            (call(r#"{"name":"t","arguments":{"x":[{"stra\u00dfe":1,"STRA\u1e9eE":2}]}}"#), "spelled alike"),
            // Alone: no member to Tether, the member to a Go server.
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","param\u017f":{}}"#.to_string(),
                "may read as `params`",
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"METHOD":"tools/call","method":"tools/list"}"#.to_string(),
                "spelled alike",
            ),
            (
                r#"{"JSONRPC":"2.0","id":1,"method":"tools/list"}"#.to_string(),
                "may read as `jsonrpc`",
            ),
            (call(r#"{"name":"t","Arguments":{"repo":"x"}}"#), "may read as `arguments`"),
            (call(r#"{"name":"t","NAME":"rm"}"#), "spelled alike"),
            // An argument policy reads, spelled as policy does not.
            (call(r#"{"name":"t","arguments":{"REPO":"private-vault"}}"#), "may read as `repo`"),
            (call(r#"{"name":"t","arguments":{"\u017fcope":"private"}}"#), "may read as `scope`"),
            (call(r#"{"name":"t","arguments":{"opts":{"Visibility":"public"}}}"#), "may read as `visibility`"),
            (call(r#"{"name":"t","arguments":{"items":[{"kind":"a"},{"\u212aind":"b"}]}}"#), "may read as `kind`"),
        ] {
            let denial = McpCall::parse(body.as_bytes(), &names).expect_err(&body);
            assert_eq!(denial.reason, Reason::BadRequest);
            assert!(denial.detail.contains(expected), "{body}: {}", denial.detail);
        }
        // What no schema name or protocol member is alike may be spelled
        // any way; declared names nest only where the schema nests them.
        for params in [
            r#"{"name":"t","arguments":{"Title2":"x","REPOS":1,"ıd":2}}"#,
            r#"{"name":"t","arguments":{"x":{"REPO":"y"}},"_meta":{"progressToken":1}}"#,
            r#"{"name":"t","arguments":{"opts":{"visibility":"public","Kind":1}}}"#,
        ] {
            let body = call(params);
            assert!(McpCall::parse(body.as_bytes(), &names).is_ok(), "{body}");
        }
    }

    #[test]
    fn objects_with_many_keys_are_checked_alike() {
        let mut arguments: Map<String, Value> =
            (0..40).map(|i| (format!("k{i}"), 1.into())).collect();
        let body = |arguments: &Map<String, Value>| {
            serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                               "params": {"name": "t", "arguments": arguments}})
            .to_string()
        };
        let names = ArgumentNames::default();
        assert!(McpCall::parse(body(&arguments).as_bytes(), &names).is_ok());
        arguments.insert("K3\u{17F}".into(), 2.into());
        arguments.insert("k3s".into(), 2.into());
        let denial = McpCall::parse(body(&arguments).as_bytes(), &names).expect_err("twins");
        assert!(denial.detail.contains("spelled alike"), "{}", denial.detail);
    }

    #[test]
    fn what_is_forwarded_is_the_call_as_parsed() {
        let call = McpCall::parse(
            b"{ \"jsonrpc\" : \"2.0\", \"id\" : 7,\n \"method\":\"tools/call\",\"params\":{\"name\":\"cre\\u0061te_issue\",\"arguments\":{\"repo\":\"caf\\u00e9\",\"n\":1.50}}}",
            &ArgumentNames::default(),
        )
        .expect("valid");
        assert_eq!(
            std::str::from_utf8(&call.forward).expect("utf-8"),
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"create_issue","arguments":{"repo":"café","n":1.5}}}"#
        );
        assert_eq!(call.tool.as_deref(), Some("create_issue"));
    }

    #[test]
    fn twins_of_result_tools_and_name_never_reach_the_client() {
        let visible = |name: &str| name == "b";
        for expect in [Expect::ToolsList, Expect::Any] {
            for (body, expected) in [
                (
                    r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"b"}],"Tools":[{"name":"a"}],"tool\u017f":[{"name":"a"}]}}"#,
                    r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"b"}]}}"#,
                ),
                (
                    r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"b","Name":"a","description":"d"},{"NAME":"b"}]}}"#,
                    r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"b","description":"d"}]}}"#,
                ),
                (
                    r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[]},"RESULT":{"tools":[{"name":"a"}]}}"#,
                    r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}"#,
                ),
                (
                    r#"{"jsonrpc":"2.0","id":1,"error":{"code":1},"Re\u017fult":{"tools":[{"name":"a"}]}}"#,
                    r#"{"jsonrpc":"2.0","id":1,"error":{"code":1}}"#,
                ),
            ] {
                let out = filter_answer(body.as_bytes(), expect, visible).expect(body);
                assert_eq!(
                    std::str::from_utf8(&out).expect("utf-8"),
                    expected,
                    "{expect:?}"
                );
            }
        }
        // A list a client would read under another spelling alone is no
        // list to Tether: dropped, and then no answer to a `tools/list`.
        let twin_only = br#"{"jsonrpc":"2.0","id":1,"result":{"Tools":[{"name":"a"}]}}"#;
        assert!(filter_answer(twin_only, Expect::ToolsList, visible).is_err());
        let out = filter_answer(twin_only, Expect::Any, visible).expect("any");
        assert_eq!(out, br#"{"jsonrpc":"2.0","id":1,"result":{}}"#);
        // The same in an event stream.
        let stream = "data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"b\",\"N\\u0061ME\":\"a\"}],\"TOOLS\":[{\"name\":\"a\"}]}}\n\n";
        let out = filter_events_in_chunks(stream.as_bytes(), &[]);
        assert_eq!(
            out,
            "data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"tools\":[{\"name\":\"b\"}]}}\n\n"
        );
    }

    #[test]
    fn any_answer_on_an_mcp_endpoint_has_its_tools_filtered() {
        let visible = |name: &str| name == "b";
        let filter = |body: &str| {
            filter_answer(body.as_bytes(), Expect::Any, visible)
                .map(|out| String::from_utf8(out).expect("utf-8"))
        };
        // An answer to another call, or a batch, carrying a list of tools.
        assert_eq!(
            filter(r#"{"jsonrpc":"2.0","id":8,"result":{"tools":[{"name":"a"},{"name":"b"}]}}"#),
            Ok(r#"{"jsonrpc":"2.0","id":8,"result":{"tools":[{"name":"b"}]}}"#.into())
        );
        assert_eq!(
            filter(r#"[{"jsonrpc":"2.0","id":7,"result":{"content":[]}},{"jsonrpc":"2.0","id":8,"result":{"tools":[{"name":"a"}]}}]"#),
            Ok(r#"[{"jsonrpc":"2.0","id":7,"result":{"content":[]}},{"jsonrpc":"2.0","id":8,"result":{"tools":[]}}]"#.into())
        );
        // Other answers go on as they were read; nothing stays nothing.
        let other = r#"{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"tools"}],"isError":false}}"#;
        assert_eq!(filter(other), Ok(other.into()));
        assert_eq!(filter(" \r\n"), Ok(String::new()));
        // What Tether cannot read, a client might: refused.
        assert!(
            filter(r#"{"jsonrpc":"2.0","id":8,"result":{"tools":[{"name":"a"}]},"x":NaN}"#)
                .is_err()
        );
        assert!(filter(r#"{"jsonrpc":"2.0","id":8,"result":{"tools":{"name":"a"}}}"#).is_err());

        // The server's stream, replayed after `Last-Event-ID`: a request
        // of its own, then an earlier answer to a `tools/list`.
        let stream = concat!(
            "id: 4\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"roots/list\",\"Result\":{\"tools\":[{\"name\":\"a\"}]}}\n\n",
            "id: 5\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":2,\"result\":{\"tools\":[{\"name\":\"a\"},{\"name\":\"b\"}]}}\n\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":6,\"result\":{\"content\":[]}}\n\n",
            "data: endpoint\n\n",
        );
        let expected = concat!(
            "id: 4\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"roots/list\"}\n\n",
            "id: 5\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":2,\"result\":{\"tools\":[{\"name\":\"b\"}]}}\n\n",
            "data: {\"jsonrpc\":\"2.0\",\"id\":6,\"result\":{\"content\":[]}}\n\n",
            "data: MCP event is not JSON",
        );
        for cut in [0, 10, 100, 150] {
            let out = filter_events_as(Expect::Any, stream.as_bytes(), &[cut]);
            assert!(out.starts_with(expected), "cut at {cut}: {out}");
        }
    }
}
