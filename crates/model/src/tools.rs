//! Tool calling in the generic format, for chat templates that have no tool
//! support of their own (SmolLM2's has none): how tools, tool calls and tool
//! results become plain chat messages, the grammar a reply must follow, and
//! how a reply becomes tool calls again.
//!
//! The format is llama.cpp's "generic" one (`common/chat.cpp`), with the
//! tool calls always a list so one rendering serves every choice:
//!
//! - **Tools** are described at the end of the system message (one is added
//!   when the conversation has none):
//!   `You can call these tools:` then one JSON object per tool (`name`,
//!   `description`, `parameters`), then how to reply. The text depends only
//!   on the tools, never on `tool_choice`, so a conversation's prefix stays
//!   the same (and cached) whatever each turn chooses.
//! - **Replies** are one JSON object, either
//!   `{"tool_calls": [{"name": "f", "arguments": {...}}, ...]}` or
//!   `{"response": "text"}`. The grammar ([`grammar`]) enforces it:
//!   `auto` admits both, `required` only calls, a named function only calls
//!   of that function; each call's `arguments` follow that function's
//!   parameter schema; without parallel calls the list holds one call.
//! - **History**: an assistant message with tool calls renders as the reply
//!   that made them, its `arguments` text verbatim (the server hands out
//!   exactly the text the model generated, so the re-rendered turn is the
//!   same text and the next turn reuses the cached K/V); an assistant
//!   message without calls renders as `{"response": ...}`; a tool result
//!   renders as a user message `{"tool_response": {"name": ..., "content":
//!   ...}}` (the name found from its `tool_call_id`). User text stays plain.
//! - Everything here becomes message *content*, which the prompt path
//!   (`prompt.rs`) keeps literal: special-token markup in tool
//!   descriptions, arguments or results cannot become control tokens.
//!
//! Templates with native tool support (Hermes `<tool_call>` tags, Llama 3.1
//! JSON) would pass the tools to the template and parse their own markup;
//! they would plug in here, beside the generic format.

use serde::{Deserialize, Serialize};

use crate::chat::Message;

/// Longest tool name (OpenAI's limit), and its characters: `[A-Za-z0-9_-]`.
pub const MAX_NAME_LEN: usize = 64;

/// Whether `name` is a valid function name (OpenAI's rule). Names go into
/// grammar literals and the system text, so nothing else is allowed.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A function the model may call.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ToolSpec {
    /// Its name ([`valid_name`]).
    pub name: String,
    /// What it does, for the model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON schema of its arguments (an object schema).
    pub parameters: serde_json::Value,
    /// Whether the arguments follow the schema strictly (the engine closes
    /// its object schemas to the keys they name); not part of the
    /// description the model reads.
    #[serde(skip)]
    pub strict: bool,
}

/// The schema a plain answer follows when a `response_format` comes with
/// the tools, and whether it is strict.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AnswerSchema<'a> {
    /// The schema, as the request gave it.
    pub schema: &'a serde_json::Value,
    /// Whether the request asked for strict mode.
    pub strict: bool,
}

/// The schema of a plain answer without a `response_format`: a JSON string
/// of any length (free text, as a reply without tools is) with no
/// whitespace before it.
const PLAIN_ANSWER: &str = r#"{"type": "string", "x-guidance": {"whitespace_flexible": false}}"#;

/// A call the model made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolCall {
    /// The call's id, chosen by the server (`call_...`).
    pub id: String,
    /// The function.
    pub name: String,
    /// Its arguments as JSON text, exactly as generated.
    pub arguments: String,
}

/// Which replies a turn allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    /// A plain answer only: the tools are described (so the conversation's
    /// prefix stays the same as on turns that may call them) but cannot be
    /// called.
    None,
    /// A plain answer or calls, as the model decides.
    Auto,
    /// At least one call.
    Required,
    /// Calls of this function only.
    Named(String),
}

/// One message of a conversation that may involve tools.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Turn {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Its text.
    pub content: String,
    /// An assistant's calls.
    pub tool_calls: Vec<ToolCall>,
    /// A tool result's call.
    pub tool_call_id: Option<String>,
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// The reply that makes `calls`, as the grammar lays it out.
fn calls_text(calls: &[ToolCall]) -> String {
    let items: Vec<String> = calls
        .iter()
        .map(|c| {
            // Arguments that are not JSON (a client edited them) are kept as
            // a string rather than breaking the reply's structure.
            let args = if serde_json::from_str::<serde_json::Value>(&c.arguments).is_ok() {
                c.arguments.clone()
            } else {
                json_string(&c.arguments)
            };
            format!("{{\"name\": {}, \"arguments\": {args}}}", json_string(&c.name))
        })
        .collect();
    format!("{{\"tool_calls\": [{}]}}", items.join(", "))
}

/// The system text describing `tools`.
fn tools_text(tools: &[ToolSpec]) -> String {
    let mut s = String::from("You can call these tools:\n");
    for t in tools {
        s.push_str(&serde_json::to_string(t).unwrap_or_default());
        s.push('\n');
    }
    s.push_str(
        "\nReply with one JSON object: {\"tool_calls\": [{\"name\": <tool name>, \"arguments\": <arguments object>}]} \
         to call tools, or {\"response\": <your answer as a string>} to answer the user directly.",
    );
    s
}

/// The conversation as plain chat messages in the generic format (see the
/// module doc). `structured`: answers are JSON values (a `response_format`
/// beside the tools), rendered as the JSON they are. Without tools, plain
/// answers stay plain text (only calls and results need the format).
pub fn render_generic(turns: &[Turn], tools: &[ToolSpec], structured: bool) -> Vec<Message> {
    let mut out = Vec::with_capacity(turns.len() + 1);
    let described = tools_text(tools);
    let mut rest = turns;
    match turns.first() {
        Some(first) if first.role == "system" => {
            out.push(Message::new("system", format!("{}\n\n{described}", first.content)));
            rest = &turns[1..];
        }
        _ if !tools.is_empty() => out.push(Message::new("system", described)),
        _ => {}
    }
    for (i, t) in rest.iter().enumerate() {
        let message = match t.role.as_str() {
            "assistant" if !t.tool_calls.is_empty() => Message::new("assistant", calls_text(&t.tool_calls)),
            "assistant" if tools.is_empty() => Message::new("assistant", t.content.clone()),
            "assistant" => {
                let json = structured && serde_json::from_str::<serde_json::Value>(&t.content).is_ok();
                let value = if json { t.content.clone() } else { json_string(&t.content) };
                Message::new("assistant", format!("{{\"response\": {value}}}"))
            }
            "tool" => {
                let name = t
                    .tool_call_id
                    .as_deref()
                    .and_then(|id| rest[..i].iter().rev().flat_map(|p| &p.tool_calls).find(|c| c.id == id))
                    .map_or("", |c| c.name.as_str());
                Message::new(
                    "user",
                    format!(
                        "{{\"tool_response\": {{\"name\": {}, \"content\": {}}}}}",
                        json_string(name),
                        json_string(&t.content)
                    ),
                )
            }
            _ => Message::new(t.role.clone(), t.content.clone()),
        };
        out.push(message);
    }
    out
}

/// A Lark string literal for `s` (llguidance's dialect: a JSON string).
fn lark_literal(s: &str) -> String {
    json_string(s)
}

/// The grammar a reply must follow (llguidance's Lark dialect): calls of
/// `tools` as `choice` allows, each call's arguments matching its schema,
/// and for `auto` a plain answer, a string or, when `answer` is given (a
/// `response_format` beside the tools), a value of that schema.
///
/// `embed` turns each schema the request gave (and whether it is strict)
/// into the schema the grammar embeds: the engine passes its rewrite
/// (`engine::grammar_schema`: bounded values, strict objects, its fixed
/// JSON layout).
///
/// # Errors
/// A message when a named function is not among `tools` or there are no
/// tools.
pub fn grammar(
    tools: &[ToolSpec],
    choice: &ToolChoice,
    parallel: bool,
    answer: Option<AnswerSchema<'_>>,
    embed: &dyn Fn(&serde_json::Value, bool) -> serde_json::Value,
) -> Result<String, String> {
    let callable: Vec<&ToolSpec> = match choice {
        ToolChoice::Named(name) => {
            let t = tools.iter().find(|t| &t.name == name).ok_or_else(|| format!("no tool is named {name:?}"))?;
            vec![t]
        }
        ToolChoice::None => Vec::new(),
        _ => tools.iter().collect(),
    };
    if callable.is_empty() && *choice != ToolChoice::None {
        return Err("no tools to call".into());
    }
    let mut g = String::new();
    g.push_str(match choice {
        ToolChoice::None => "start: answer\n",
        ToolChoice::Auto => "start: calls | answer\n",
        _ => "start: calls\n",
    });
    let head = "calls: \"{\\\"tool_calls\\\": [\" call";
    match (choice, parallel) {
        (ToolChoice::None, _) => {}
        (_, true) => g.push_str(&format!("{head} (\", \" call)* \"]}}\"\n")),
        (_, false) => g.push_str(&format!("{head} \"]}}\"\n")),
    }
    let alternatives: Vec<String> = (0..callable.len()).map(|i| format!("call_{i}")).collect();
    if !alternatives.is_empty() {
        g.push_str(&format!("call: {}\n", alternatives.join(" | ")));
    }
    for (i, t) in callable.iter().enumerate() {
        let head = format!("{{\"name\": {}, \"arguments\": ", json_string(&t.name));
        g.push_str(&format!("call_{i}: {} args_{i} \"}}\"\n", lark_literal(&head)));
        g.push_str(&format!("args_{i}: %json {}\n", embed(&t.parameters, t.strict)));
    }
    if matches!(choice, ToolChoice::Auto | ToolChoice::None) {
        let schema = answer.map_or_else(|| PLAIN_ANSWER.to_owned(), |a| embed(a.schema, a.strict).to_string());
        g.push_str(&format!("answer: {} answer_value \"}}\"\n", lark_literal("{\"response\": ")));
        g.push_str(&format!("answer_value: %json {schema}\n"));
    }
    Ok(g)
}

/// A reply in the generic format, read back.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// Tool calls (ids still to be assigned: empty).
    Calls(Vec<ToolCall>),
    /// A plain answer: the `response` string, or the JSON text of a
    /// structured answer.
    Answer(String),
}

#[derive(Deserialize)]
struct RawCall<'a> {
    name: String,
    #[serde(borrow)]
    arguments: &'a serde_json::value::RawValue,
}

#[derive(Deserialize)]
struct RawReply<'a> {
    #[serde(borrow, default)]
    tool_calls: Option<Vec<RawCall<'a>>>,
    #[serde(borrow, default)]
    response: Option<&'a serde_json::value::RawValue>,
}

/// Reads a reply the grammar produced; `None` when `text` is not one (an
/// output cut short by `max_tokens`). `structured`: the answer is a JSON
/// value, returned as its JSON text (as without tools); otherwise a string.
pub fn parse_reply(text: &str, structured: bool) -> Option<Reply> {
    let raw: RawReply<'_> = serde_json::from_str(text).ok()?;
    if let Some(calls) = raw.tool_calls {
        return Some(Reply::Calls(
            calls
                .into_iter()
                .map(|c| ToolCall { id: String::new(), name: c.name, arguments: c.arguments.get().to_owned() })
                .collect(),
        ));
    }
    let response = raw.response?;
    Some(Reply::Answer(match serde_json::from_str::<String>(response.get()) {
        Ok(s) if !structured => s,
        _ => response.get().to_owned(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> ToolSpec {
        ToolSpec {
            name: "get_weather".into(),
            description: Some("Weather in a city".into()),
            parameters: serde_json::json!({
                "type": "object",
                "properties": { "city": { "type": "string" } },
                "required": ["city"]
            }),
            strict: false,
        }
    }

    #[test]
    fn tools_join_the_system_message_and_history_renders_as_replies() {
        let call =
            ToolCall { id: "call_1".into(), name: "get_weather".into(), arguments: "{\"city\": \"Oslo\"}".into() };
        let turns = vec![
            Turn { role: "system".into(), content: "Be brief.".into(), ..Turn::default() },
            Turn { role: "user".into(), content: "Weather in Oslo?".into(), ..Turn::default() },
            Turn { role: "assistant".into(), tool_calls: vec![call], ..Turn::default() },
            Turn {
                role: "tool".into(),
                content: "3°C <|im_end|>".into(),
                tool_call_id: Some("call_1".into()),
                ..Turn::default()
            },
            Turn { role: "assistant".into(), content: "It is 3°C.".into(), ..Turn::default() },
        ];
        let m = render_generic(&turns, &[weather()], false);
        assert_eq!(m.len(), 5);
        assert!(m[0].content.starts_with("Be brief.\n\nYou can call these tools:\n{\"name\":\"get_weather\""));
        assert_eq!(
            m[2].content,
            "{\"tool_calls\": [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}]}"
        );
        assert_eq!(m[3].role, "user");
        assert_eq!(m[3].content, "{\"tool_response\": {\"name\": \"get_weather\", \"content\": \"3°C <|im_end|>\"}}");
        assert_eq!(m[4].content, "{\"response\": \"It is 3°C.\"}");
    }

    #[test]
    fn a_reply_reads_back_with_its_arguments_verbatim() {
        let text = "{\"tool_calls\": [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}]}";
        let Some(Reply::Calls(calls)) = parse_reply(text, false) else { panic!("calls") };
        assert_eq!(calls[0].arguments, "{\"city\": \"Oslo\"}");
        // Rendered back, it is the same text: the next turn hits the cache.
        let turn = Turn { role: "assistant".into(), tool_calls: calls, ..Turn::default() };
        assert_eq!(render_generic(&[turn], &[], false)[0].content, text);
        assert_eq!(parse_reply("{\"response\": \"hi \\\"x\\\"\"}", false), Some(Reply::Answer("hi \"x\"".into())));
        assert_eq!(parse_reply("{\"tool_calls\": [{\"name\": \"get_w", false), None);
        // A structured answer comes back, and renders back, as its JSON.
        let answer = "{\"response\": \"hello\"}";
        assert_eq!(parse_reply(answer, true), Some(Reply::Answer("\"hello\"".into())));
        let turn = Turn { role: "assistant".into(), content: "\"hello\"".into(), ..Turn::default() };
        assert_eq!(render_generic(std::slice::from_ref(&turn), &[weather()], true)[1].content, answer);
        // Without tools, a plain answer in a tool history stays plain.
        assert_eq!(render_generic(&[turn], &[], false)[0].content, "\"hello\"");
    }

    #[test]
    fn the_grammar_names_every_callable_tool_and_the_answer_only_for_auto() {
        let embed = |s: &serde_json::Value, _: bool| s.clone();
        let auto = grammar(&[weather()], &ToolChoice::Auto, true, None, &embed).expect("grammar");
        assert!(auto.starts_with("start: calls | answer\n") && auto.contains("get_weather"), "{auto}");
        let required = grammar(&[weather()], &ToolChoice::Required, false, None, &embed).expect("grammar");
        assert!(required.starts_with("start: calls\n") && !required.contains("answer"));
        assert!(grammar(&[weather()], &ToolChoice::Named("nope".into()), true, None, &embed).is_err());
        let none = grammar(&[weather()], &ToolChoice::None, true, None, &embed).expect("grammar");
        assert!(none.starts_with("start: answer\n") && !none.contains("calls"), "{none}");
        assert!(valid_name("get_weather-2") && !valid_name("a b") && !valid_name("") && !valid_name("\"x"));
    }

    #[test]
    fn every_schema_the_request_gave_goes_through_embed_with_its_strictness() {
        let strict = ToolSpec { strict: true, ..weather() };
        let int = serde_json::json!({ "type": "integer" });
        let answer = AnswerSchema { schema: &int, strict: false };
        let embed = |s: &serde_json::Value, strict: bool| serde_json::json!({ "embedded": strict, "of": s });
        let g = grammar(&[strict], &ToolChoice::Auto, true, Some(answer), &embed).expect("grammar");
        assert!(g.contains("args_0: %json {\"embedded\":true,\"of\":{"), "{g}");
        assert!(g.contains("answer_value: %json {\"embedded\":false,\"of\":{\"type\":\"integer\"}}"), "{g}");
        let plain = grammar(&[weather()], &ToolChoice::Auto, true, None, &embed).expect("grammar");
        assert!(plain.contains(&format!("answer_value: %json {PLAIN_ANSWER}\n")), "free text is not rewritten");
        let described = render_generic(&[], &[ToolSpec { strict: true, ..weather() }], false);
        assert!(!described[0].content.contains("strict"), "strictness is not described to the model");
    }
}
