//! Structured outputs and tool calling at the edge: the request fields that
//! ask for them, parsed into the engine's grammar and the generic tool
//! format (`model::tools`), and the reply read back into OpenAI's
//! `tool_calls`.
//!
//! Fields:
//! - `response_format`: `{"type": "text"}`, `{"type": "json_object"}`,
//!   `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
//!   The output parses and matches the schema (`strict` or not: decoding is
//!   constrained either way). `strict: true` also closes every object
//!   schema that does not say otherwise (`additionalProperties: false`), as
//!   it does on a function tool; every schema's numbers, strings and open
//!   values are bounded (the engine's `schema.rs`).
//! - `tools` (functions with JSON-schema `parameters`), `tool_choice`
//!   (`"none"`, `"auto"`, `"required"`, `{"type": "function", "function":
//!   {"name"}}`), `parallel_tool_calls` (default true). With tools and
//!   `response_format` together, a plain answer (under `auto`) follows the
//!   format.
//! - Extensions for other grammars, in the body (vLLM's names), also on
//!   `/v1/completions`: `guided_json` (a schema), `guided_regex`,
//!   `guided_grammar` (a Lark grammar in llguidance's dialect, which can
//!   embed schemas with `%json {...}`). At most one constraint per request.
//!
//! With `tool_choice: "none"` the tools are still described (the
//! conversation's prefix, and so its cache, stays the same from turn to
//! turn) and the reply is constrained to the format's plain answer. Without
//! tools, a history with tool calls and results still renders in the
//! generic format.

use engine::tools::{self, AnswerSchema, Reply, ToolCall, ToolChoice, ToolSpec, Turn};
use engine::{Grammar, GrammarSpec};
use serde::Deserialize;

use crate::error::ApiError;

/// Most tools one request may define.
pub(crate) const MAX_TOOLS: usize = 128;

fn invalid(param: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

/// A tool call in an assistant message of the history.
#[derive(Debug, Deserialize)]
pub(crate) struct WireToolCall {
    id: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    function: WireFunctionCall,
}

#[derive(Debug, Deserialize)]
struct WireFunctionCall {
    name: String,
    arguments: String,
}

/// The vLLM-style grammar extensions (`guided_*`).
#[derive(Clone, Debug, Default, Deserialize)]
pub(crate) struct Guided {
    guided_json: Option<serde_json::Value>,
    guided_regex: Option<String>,
    guided_grammar: Option<String>,
}

impl Guided {
    /// The one grammar these fields ask for, if any.
    pub(crate) fn grammar(&mut self) -> Result<Option<Grammar>, ApiError> {
        let asked = [self.guided_json.is_some(), self.guided_regex.is_some(), self.guided_grammar.is_some()];
        if asked.iter().filter(|&&a| a).count() > 1 {
            return Err(invalid("guided_json", "send at most one of guided_json, guided_regex and guided_grammar"));
        }
        Ok(if let Some(schema) = self.guided_json.take() {
            Some(Grammar::new(GrammarSpec::JsonSchema { schema, strict: false }, "guided_json"))
        } else if let Some(rx) = self.guided_regex.take() {
            Some(Grammar::new(GrammarSpec::Regex(rx), "guided_regex"))
        } else {
            self.guided_grammar.take().map(|g| Grammar::new(GrammarSpec::Lark(g), "guided_grammar"))
        })
    }
}

/// `response_format`, parsed.
enum Format {
    Text,
    JsonObject,
    Schema { schema: serde_json::Value, strict: bool },
}

/// An optional `strict` flag.
fn strict(v: Option<&serde_json::Value>, param: &'static str, what: &str) -> Result<bool, ApiError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(false),
        Some(serde_json::Value::Bool(b)) => Ok(*b),
        Some(_) => Err(invalid(param, format!("{what} must be a boolean"))),
    }
}

fn response_format(value: Option<&serde_json::Value>) -> Result<Format, ApiError> {
    let Some(v) = value else { return Ok(Format::Text) };
    let kind = v.get("type").and_then(serde_json::Value::as_str);
    match kind {
        Some("text") => Ok(Format::Text),
        Some("json_object") => Ok(Format::JsonObject),
        Some("json_schema") => {
            let spec = v
                .get("json_schema")
                .and_then(serde_json::Value::as_object)
                .ok_or_else(|| invalid("response_format", "json_schema needs a \"json_schema\" object"))?;
            let strict = strict(spec.get("strict"), "response_format", "json_schema.strict")?;
            match spec.get("schema") {
                None => Ok(Format::JsonObject),
                Some(s) if s.is_object() || s.is_boolean() => Ok(Format::Schema { schema: s.clone(), strict }),
                Some(_) => Err(invalid("response_format", "json_schema.schema must be a JSON schema object")),
            }
        }
        _ => Err(invalid("response_format", "type must be \"text\", \"json_object\" or \"json_schema\"")),
    }
}

fn parse_tools(value: Option<&Vec<serde_json::Value>>) -> Result<Vec<ToolSpec>, ApiError> {
    let Some(list) = value else { return Ok(Vec::new()) };
    if list.len() > MAX_TOOLS {
        return Err(invalid("tools", format!("at most {MAX_TOOLS} tools")));
    }
    let mut out: Vec<ToolSpec> = Vec::with_capacity(list.len());
    for t in list {
        if t.get("type").and_then(serde_json::Value::as_str) != Some("function") {
            return Err(invalid("tools", "each tool must be {\"type\": \"function\", \"function\": {...}}"));
        }
        let f = t
            .get("function")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| invalid("tools", "a tool has no \"function\" object"))?;
        let name = f.get("name").and_then(serde_json::Value::as_str).unwrap_or_default();
        if !tools::valid_name(name) {
            return Err(invalid("tools", "function names are 1 to 64 of [A-Za-z0-9_-]"));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(invalid("tools", format!("two tools are named {name:?}")));
        }
        let description = match f.get("description") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(d)) => Some(d.clone()),
            Some(_) => return Err(invalid("tools", "a function's description must be a string")),
        };
        let parameters = match f.get("parameters") {
            None | Some(serde_json::Value::Null) => serde_json::json!({ "type": "object", "properties": {} }),
            Some(p) if p.is_object() => p.clone(),
            Some(_) => return Err(invalid("tools", "a function's parameters must be a JSON schema object")),
        };
        let strict = strict(f.get("strict"), "tools", "a function's strict")?;
        out.push(ToolSpec { name: name.to_owned(), description, parameters, strict });
    }
    Ok(out)
}

fn tool_choice(value: Option<&serde_json::Value>, has_tools: bool) -> Result<Option<ToolChoice>, ApiError> {
    let bad = || {
        invalid(
            "tool_choice",
            "must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
        )
    };
    let choice = match value {
        None => return Ok(has_tools.then_some(ToolChoice::Auto)),
        Some(serde_json::Value::String(s)) => match s.as_str() {
            "none" if has_tools => ToolChoice::None,
            "none" => return Ok(None),
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            _ => return Err(bad()),
        },
        Some(v) => {
            let name = v.pointer("/function/name").and_then(serde_json::Value::as_str).ok_or_else(bad)?;
            ToolChoice::Named(name.to_owned())
        }
    };
    if !has_tools {
        return Err(invalid("tool_choice", "needs tools"));
    }
    Ok(Some(choice))
}

/// A history message's tool calls, checked.
pub(crate) fn history_calls(calls: Vec<WireToolCall>) -> Result<Vec<ToolCall>, ApiError> {
    calls
        .into_iter()
        .map(|c| {
            if c.kind.as_deref().is_some_and(|k| k != "function") {
                return Err(invalid("messages", "tool calls must have type \"function\""));
            }
            if !tools::valid_name(&c.function.name) {
                return Err(invalid("messages", "a tool call's function name is not a valid name"));
            }
            Ok(ToolCall { id: c.id, name: c.function.name, arguments: c.function.arguments })
        })
        .collect()
}

/// What a chat request asks of its output.
pub(crate) struct Plan {
    /// The prompt's messages, tool turns rendered.
    pub(crate) messages: Vec<engine::Message>,
    /// The constraint, if any.
    pub(crate) grammar: Option<Grammar>,
    /// The reply is in the generic tool format and must be read back.
    pub(crate) tool_reply: bool,
    /// Its answers are JSON values (a `response_format` beside tools).
    pub(crate) structured_answer: bool,
}

/// The fields of a chat request that shape its output.
pub(crate) struct Asked<'a> {
    pub(crate) tools: Option<&'a Vec<serde_json::Value>>,
    pub(crate) tool_choice: Option<&'a serde_json::Value>,
    pub(crate) parallel_tool_calls: Option<bool>,
    pub(crate) response_format: Option<&'a serde_json::Value>,
    pub(crate) guided: Option<Grammar>,
}

/// Decides the prompt rendering and the grammar of a chat request.
///
/// # Errors
/// A 400 naming the field that cannot be honoured.
pub(crate) fn plan(turns: Vec<Turn>, asked: Asked<'_>) -> Result<Plan, ApiError> {
    let specs = parse_tools(asked.tools)?;
    let choice = tool_choice(asked.tool_choice, !specs.is_empty())?;
    let format = response_format(asked.response_format)?;
    if asked.guided.is_some() && (!matches!(format, Format::Text) || choice.is_some()) {
        return Err(invalid("guided_json", "guided_* cannot be combined with response_format or tools"));
    }
    let tool_history = turns.iter().any(|t| t.role == "tool" || !t.tool_calls.is_empty());
    let Some(choice) = choice else {
        let messages = if tool_history {
            tools::render_generic(&turns, &[], false)
        } else {
            turns.into_iter().map(|t| engine::Message::new(t.role, t.content)).collect()
        };
        let grammar = match format {
            Format::Text => asked.guided,
            Format::JsonObject => Some(Grammar::new(GrammarSpec::JsonObject, "response_format")),
            Format::Schema { schema, strict } => {
                Some(Grammar::new(GrammarSpec::JsonSchema { schema, strict }, "response_format"))
            }
        };
        return Ok(Plan { messages, grammar, tool_reply: false, structured_answer: false });
    };
    let any_object = serde_json::json!({ "type": "object" });
    let answer = match &format {
        Format::Text => None,
        Format::JsonObject => Some(AnswerSchema { schema: &any_object, strict: false }),
        Format::Schema { schema, strict } => Some(AnswerSchema { schema, strict: *strict }),
    };
    let parallel = asked.parallel_tool_calls.unwrap_or(true);
    let lark = tools::grammar(&specs, &choice, parallel, answer, &engine::grammar_schema)
        .map_err(|e| invalid("tool_choice", e))?;
    Ok(Plan {
        messages: tools::render_generic(&turns, &specs, answer.is_some()),
        grammar: Some(Grammar::new(GrammarSpec::Lark(lark), "tools")),
        tool_reply: true,
        structured_answer: answer.is_some(),
    })
}

/// A finished tool-format reply, as OpenAI reports it.
pub(crate) enum ToolReply {
    /// Calls, with fresh ids.
    Calls(Vec<ToolCall>),
    /// A plain answer.
    Answer(String),
}

/// Reads back the reply text; `None` when it is incomplete (cut by
/// `max_tokens`): the caller reports the raw text with `length`.
pub(crate) fn read_reply(text: &str, structured: bool) -> Option<ToolReply> {
    Some(match tools::parse_reply(text, structured)? {
        Reply::Calls(calls) => ToolReply::Calls(
            calls
                .into_iter()
                .map(|c| ToolCall { id: format!("call_{}", crate::completions::random_id()), ..c })
                .collect(),
        ),
        Reply::Answer(a) => ToolReply::Answer(a),
    })
}

/// OpenAI's JSON for calls (`message.tool_calls`; with `index` for stream
/// deltas).
pub(crate) fn calls_json(calls: &[ToolCall], with_index: bool) -> Vec<serde_json::Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut v = serde_json::json!({
                "id": c.id,
                "type": "function",
                "function": { "name": c.name, "arguments": c.arguments },
            });
            if with_index {
                v["index"] = serde_json::json!(i);
            }
            v
        })
        .collect()
}

/// How a plain answer in the tool format starts: from here on its text is
/// a JSON string the server can stream as it comes.
pub(crate) const ANSWER_PREFIX: &str = "{\"response\": \"";

/// Decodes the JSON string body at the start of `s` as far as it is
/// complete: the text, the bytes of `s` it used, and whether the closing
/// quote was reached. An escape cut by the end of `s` waits for more.
pub(crate) fn decode_partial(s: &str) -> (String, usize, bool) {
    let mut out = String::new();
    let mut used = 0;
    let bytes = s.as_bytes();
    while used < s.len() {
        let rest = &s[used..];
        let Some(c) = rest.chars().next() else { break };
        match c {
            '"' => return (out, used + 1, true),
            '\\' => {
                let Some(&e) = bytes.get(used + 1) else { break };
                let simple = match e {
                    b'"' => Some('"'),
                    b'\\' => Some('\\'),
                    b'/' => Some('/'),
                    b'b' => Some('\u{8}'),
                    b'f' => Some('\u{c}'),
                    b'n' => Some('\n'),
                    b'r' => Some('\r'),
                    b't' => Some('\t'),
                    _ => None,
                };
                if let Some(ch) = simple {
                    out.push(ch);
                    used += 2;
                    continue;
                }
                if e != b'u' {
                    break; // not JSON: stop here
                }
                let hex = |at: usize| s.get(at..at + 4).and_then(|h| u32::from_str_radix(h, 16).ok());
                let Some(hi) = hex(used + 2) else { break };
                if (0xD800..0xDC00).contains(&hi) {
                    // A surrogate pair: `\\uD8xx\\uDCxx`.
                    if s.get(used + 6..used + 8) != Some("\\u") {
                        break;
                    }
                    let Some(lo) = hex(used + 8) else { break };
                    let code = 0x10000 + ((hi - 0xD800) << 10) + (lo.wrapping_sub(0xDC00) & 0x3FF);
                    out.push(char::from_u32(code).unwrap_or('\u{FFFD}'));
                    used += 12;
                } else {
                    out.push(char::from_u32(hi).unwrap_or('\u{FFFD}'));
                    used += 6;
                }
            }
            c => {
                out.push(c);
                used += c.len_utf8();
            }
        }
    }
    (out, used, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_string_decodes_piece_by_piece_as_it_arrives() {
        let whole = "caf\\u00e9 \\\"ok\\\"\\n\\ud83d\\ude00 end\"}";
        let expected = "café \"ok\"\n😀 end";
        // Fed in every split: the decoded text is the same, never ahead of
        // what is complete.
        for cut in 0..whole.len() {
            let Some(first) = whole.get(..cut) else { continue };
            let (a, used, closed) = decode_partial(first);
            if closed {
                assert_eq!(a, expected, "cut {cut}");
                continue;
            }
            let (b, _, closed) = decode_partial(&whole[used..]);
            assert!(closed, "cut {cut}");
            assert_eq!(format!("{a}{b}"), expected, "cut {cut}");
        }
    }
}
