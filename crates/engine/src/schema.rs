//! A request's JSON schema, rewritten into the schema the grammar compiles:
//! bounded so that every value can end, closed where the request is
//! `strict`, and laid out one canonical way.
//!
//! # Design
//!
//! llguidance compiles a schema as written, and as written a schema admits
//! values that never end. `{"type": "number"}` is
//! `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`: a small model that
//! starts repeating a digit finds a digit allowed at every step and writes
//! `1111…` until `max_tokens`. Strings do the same (SmolLM2-135M at
//! temperature 0 writes `"…-20-20-20-…` for a thousand tokens), and so do
//! the values a schema leaves open (`true`, `{}`, a missing
//! `additionalProperties` or `items`), which llguidance compiles to its own
//! unbounded "any JSON value".
//!
//! llguidance has no option for the length of a number or a string, so the
//! rewrite uses the keywords whose compiled forms it bounds itself:
//!
//! | value | keywords added | compiled form |
//! |---|---|---|
//! | `number`, `integer` | `exclusiveMinimum: -2^53`, `exclusiveMaximum: 2^53` | at most 16 integral digits |
//! | `number` | `multipleOf: 1e-8` | at most 8 fraction digits, no exponent |
//! | `string` | `maxLength: 1024` ([`MAX_STRING_CHARS`]) | a closing quote within 1024 characters |
//! | any value | `{"$ref": "#/$defs/kvserve_any"}`: the three rows above, with no `type` | bounded the same way, at any depth |
//!
//! - **A schema's own bounds stay** where they are tighter: a `minimum` of
//!   0 keeps 0; a string with its own `maxLength` keeps it (a client that
//!   wants longer strings says so); a number with its own `multipleOf` keeps
//!   it (its fraction is bounded by it). Nodes with `const` or `enum` are
//!   finite already and are left alone; so are `$ref` nodes (their target
//!   is rewritten) and the nodes that only combine others (`anyOf`,
//!   `oneOf`, `allOf` without a `type`: their members are rewritten).
//! - **Why these numbers**: 2^53 is the range where every integer is exact
//!   in an `f64` (JavaScript's safe integers), 16 digits, close to llama.cpp's
//!   GBNF bound of 16 integral digits. The fraction is bounded through
//!   `multipleOf` because it is the only number keyword whose compiled form
//!   limits fraction digits, and llguidance computes it in `u32`
//!   (`digit * 10^scale`), so `1e-8` is the finest step that cannot
//!   overflow; it matches plain decimals only, so there is no exponent. A
//!   document that carries its own `multipleOf` whose intersection with
//!   `1e-8` would overflow the same arithmetic gets no fraction bound at all
//!   (checked by `fraction_bound_is_safe`); its integral bounds stay.
//! - **Strict** (`strict: true` on a `json_schema` response format or on a
//!   function tool): every object schema that does not say otherwise gets
//!   `additionalProperties: false`, at every depth (`properties`, `items`,
//!   `anyOf`/`oneOf`/`allOf`, `$defs`/`definitions`...). An object schema is
//!   one whose `type` names `object`, or that has no `type` and has
//!   `properties` or `patternProperties`. Only unnamed keys are refused;
//!   OpenAI's other strict rule (every property required) is not enforced.
//! - **Layout**: the root gets fixed separators (`", "`, `": "`) and no free
//!   whitespace unless it sets its own `x-guidance` options (see
//!   `grammar.rs`).
//! - Not rewritten: subschemas with their own `$id` get number and string
//!   bounds but no `kvserve_any` references (a `#/$defs/...` inside them
//!   would resolve against them), and `not` is never entered (a bound
//!   there would widen, not narrow). Object keys outside `properties` are
//!   llguidance's unbounded strings, and how many items an array or extra
//!   keys an object has is the schema's to bound (`maxItems`, a closed
//!   object). Lark grammars that embed `%json` (`guided_grammar`) are
//!   compiled as the client wrote them.
//!
//! # Costs
//!
//! One walk over the schema per request before the cache lookup (the cache
//! key is the rewritten text), a few hundred bytes more schema, and lexer
//! states that now count characters: generating a bounded string or number
//! visits a new lexer state per character where the unbounded form stayed
//! in one (on SmolLM2, compiling and decoding were as fast as before within
//! the noise: masks are computed beside the forward pass).
//!
//! The string bound promises an end, not an early one: a loop of one
//! character a token still runs about a thousand tokens before the quote is
//! forced. Sampling penalties (`frequency_penalty`) break such a loop within
//! a few tokens; a shorter default would cut legitimate prose.
//!
//! # Invariants
//!
//! The rewrite only narrows: every value the rewritten schema admits, the
//! client's admits. It is idempotent, so a schema rewritten twice is the
//! schema rewritten once.

use serde_json::{Map, Value};

/// Numbers lie strictly between `-2^53` and `2^53` (16 integral digits).
pub const NUMBER_LIMIT: i64 = 1 << 53;
/// Fraction digits a number may have (`multipleOf: 1e-8`).
pub const FRACTION_DIGITS: u32 = 8;
/// Longest string, in characters, unless a schema sets its own
/// `maxLength`.
pub const MAX_STRING_CHARS: u64 = 1024;

/// The bounded "any JSON value", under the root's `$defs`.
const ANY: &str = "kvserve_any";
const ANY_REF: &str = "#/$defs/kvserve_any";
/// Past this depth the walk leaves the schema as it is (JSON parsed by the
/// server is at most 128 levels deep; this guards other callers' stacks).
const MAX_DEPTH: usize = 256;

/// `schema` as the grammar compiles it: bounded, closed if `strict`, with
/// the canonical layout (see the module doc). A schema that is not an
/// object or a boolean comes back as it is (the compiler refuses it).
pub fn grammar_schema(schema: &Value, strict: bool) -> Value {
    let mut schema = match schema {
        Value::Bool(true) => Value::Object(Map::new()),
        other => other.clone(),
    };
    if !schema.is_object() {
        return schema;
    }
    if strict {
        close_objects(&mut schema, 0);
    }
    let mut walk = Bounds { fraction: fraction_bound_is_safe(&schema), used_any: false };
    walk.schema(&mut schema, true, 0);
    if let Some(root) = schema.as_object_mut() {
        if walk.used_any {
            let mut any = Value::Object(Map::new());
            walk.schema(&mut any, true, 0);
            if let Some(defs) = root.entry("$defs").or_insert_with(|| Value::Object(Map::new())).as_object_mut() {
                defs.entry(ANY).or_insert(any);
            }
        }
        root.entry("x-guidance").or_insert_with(json_layout);
    }
    schema
}

/// The JSON layout every schema compiles with unless it sets its own
/// `x-guidance` options: fixed separators, no free whitespace.
fn json_layout() -> Value {
    serde_json::json!({ "whitespace_flexible": false, "item_separator": ", ", "key_separator": ": " })
}

/// The `type`s a schema node admits; `None` when `type` is not a string
/// or a list of strings (the compiler refuses it).
fn types(o: &Map<String, Value>) -> Option<Vec<&str>> {
    match o.get("type") {
        None => Some(vec!["null", "boolean", "number", "integer", "string", "array", "object"]),
        Some(Value::String(t)) => Some(vec![t.as_str()]),
        Some(Value::Array(ts)) => ts.iter().map(Value::as_str).collect(),
        Some(_) => None,
    }
}

/// Keywords whose value is one subschema.
const ONE: [&str; 3] = ["additionalProperties", "additionalItems", "items"];
/// Keywords whose value is a list of subschemas.
const LIST: [&str; 5] = ["items", "prefixItems", "anyOf", "oneOf", "allOf"];
/// Keywords whose value maps names to subschemas.
const MAP: [&str; 4] = ["properties", "patternProperties", "$defs", "definitions"];

/// Calls `f` on every direct subschema of `o` (never under `not`).
fn for_each_subschema(o: &mut Map<String, Value>, mut f: impl FnMut(&mut Value)) {
    for (key, value) in o.iter_mut() {
        let key = key.as_str();
        match value {
            Value::Array(list) if LIST.contains(&key) => list.iter_mut().for_each(&mut f),
            Value::Object(map) if MAP.contains(&key) => map.values_mut().for_each(&mut f),
            v if ONE.contains(&key) => f(v),
            _ => {}
        }
    }
}

/// Strict mode: `additionalProperties: false` on every object schema that
/// does not set it.
fn close_objects(schema: &mut Value, depth: usize) {
    let Some(o) = schema.as_object_mut() else { return };
    if depth > MAX_DEPTH {
        return;
    }
    let object = match o.get("type") {
        None => o.contains_key("properties") || o.contains_key("patternProperties"),
        Some(_) => types(o).is_some_and(|t| t.contains(&"object")),
    };
    if object && !o.contains_key("$ref") {
        o.entry("additionalProperties").or_insert(Value::Bool(false));
    }
    for_each_subschema(o, |s| close_objects(s, depth + 1));
}

/// The bounding walk: `fraction` whether `multipleOf` may be added,
/// `used_any` whether a node now refers to [`ANY`].
struct Bounds {
    fraction: bool,
    used_any: bool,
}

impl Bounds {
    /// Bounds `schema` and its subschemas; `refs` whether a reference to the
    /// root's `$defs` resolves here (not inside a nested `$id`).
    fn schema(&mut self, schema: &mut Value, refs: bool, depth: usize) {
        if depth > MAX_DEPTH {
            return;
        }
        if *schema == Value::Bool(true) && refs {
            *schema = serde_json::json!({ "$ref": ANY_REF });
            self.used_any = true;
            return;
        }
        let Some(o) = schema.as_object_mut() else { return };
        let refs = refs && !(depth > 0 && (o.contains_key("$id") || o.get("id").is_some_and(Value::is_string)));
        self.node(o, refs);
        for_each_subschema(o, |s| self.schema(s, refs, depth + 1));
    }

    /// Adds the bounds `o`'s own keywords need (not its subschemas').
    fn node(&mut self, o: &mut Map<String, Value>, refs: bool) {
        let combines = ["anyOf", "oneOf", "allOf"].iter().any(|k| o.contains_key(*k));
        let finite = o.contains_key("const") || o.contains_key("enum");
        if o.contains_key("$ref") || finite || (combines && !o.contains_key("type")) {
            return;
        }
        let Some(types) = types(o) else { return };
        let has = |t: &str| types.contains(&t);
        let (number, integer, string) = (has("number"), has("integer"), has("string"));
        let (array, object) = (has("array"), has("object"));
        if number || integer {
            tighten(o, "minimum", "exclusiveMinimum", -NUMBER_LIMIT);
            tighten(o, "maximum", "exclusiveMaximum", NUMBER_LIMIT);
        }
        if number && self.fraction && !o.contains_key("multipleOf") {
            o.insert("multipleOf".into(), fraction_step());
        }
        if string && !o.contains_key("maxLength") {
            o.insert("maxLength".into(), MAX_STRING_CHARS.into());
        }
        if !refs {
            return;
        }
        if object && !o.contains_key("additionalProperties") {
            o.insert("additionalProperties".into(), serde_json::json!({ "$ref": ANY_REF }));
            self.used_any = true;
        }
        if array {
            let rest = if o.get("items").is_some_and(Value::is_array) { "additionalItems" } else { "items" };
            if !o.contains_key(rest) {
                o.insert(rest.into(), serde_json::json!({ "$ref": ANY_REF }));
                self.used_any = true;
            }
        }
    }
}

/// `10^-FRACTION_DIGITS`.
fn fraction_step() -> Value {
    let step = 10f64.powi(-(FRACTION_DIGITS as i32));
    serde_json::Number::from_f64(step).map_or(Value::Null, Value::Number)
}

/// Makes the lower (`limit < 0`) or upper bound of `o` at least as tight
/// as `limit`, exclusive, keeping a tighter bound of its own (either
/// draft's form: a numeric `exclusiveMinimum`, or draft 4's boolean beside
/// `minimum`).
fn tighten(o: &mut Map<String, Value>, inclusive: &str, exclusive: &str, limit: i64) {
    let bound = limit as f64;
    // Whether a bound of `v` is inside the limit.
    let inside = |v: f64| if limit < 0 { v >= bound } else { v <= bound };
    let own = o.get(inclusive).and_then(Value::as_f64);
    match o.get(exclusive) {
        Some(Value::Number(n)) => {
            if !n.as_f64().is_some_and(inside) {
                o.insert(exclusive.into(), limit.into());
            }
        }
        // Draft 4: `minimum` is exclusive; keep it exclusive.
        Some(Value::Bool(true)) if own.is_some() => {
            if !own.is_some_and(inside) {
                o.insert(inclusive.into(), limit.into());
            }
        }
        None | Some(Value::Bool(_)) => {
            // An inclusive bound of its own is enough only strictly inside.
            if !own.is_some_and(|v| inside(v) && v != bound) {
                o.insert(exclusive.into(), limit.into());
            }
        }
        // Not a bound: the compiler refuses the schema.
        Some(_) => {}
    }
}

/// Whether adding `multipleOf: 1e-8` is safe for this document: llguidance
/// intersects two `multipleOf`s through their least common multiple, and
/// matches a multiple of `d * 10^-8` by keeping a remainder below `d` that
/// it multiplies by 10, both in `u32`; a step such as `0.5` (`d = 5 * 10^7`)
/// survives that and one such as `1000` does not.
fn fraction_bound_is_safe(schema: &Value) -> bool {
    match schema {
        Value::Object(o) => o.iter().all(|(k, v)| {
            let own = k != "multipleOf" || v.as_f64().is_some_and(|m| multiple_fits(m.abs()));
            own && fraction_bound_is_safe(v)
        }),
        Value::Array(list) => list.iter().all(fraction_bound_is_safe),
        _ => true,
    }
}

/// Whether the least common multiple of `m` and `10^-FRACTION_DIGITS`,
/// as a count of `10^-FRACTION_DIGITS` steps, times 10 fits a `u32`
/// (`m` read as llguidance reads it: multiplied by 10 until whole).
fn multiple_fits(m: f64) -> bool {
    if !(m.is_finite() && m > 0.0) {
        return false;
    }
    let mut coef = m;
    let mut exp = 0;
    while coef.fract() != 0.0 {
        if exp == FRACTION_DIGITS {
            return false;
        }
        coef *= 10.0;
        exp += 1;
    }
    let steps = coef * 10f64.powi((FRACTION_DIGITS - exp) as i32);
    steps * 10.0 <= f64::from(u32::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::grammar::{Constraint, Grammar, GrammarSpec, Grammars};
    use crate::testing::{FakeCodec, FAKE_EOS, FAKE_VOCAB};
    use serde_json::json;

    /// How many bytes of `text` the compiled grammar takes before its mask
    /// refuses one, and whether it may end there (the byte-per-token fake
    /// codec: a byte is a token).
    fn accepted(schema: Value, strict: bool, text: &str) -> (usize, bool) {
        let grammars = Grammars::new(Arc::new(FakeCodec::new()), FAKE_VOCAB);
        let spec = Grammar::new(GrammarSpec::JsonSchema { schema, strict }, "response_format");
        let mut c = Constraint::new(grammars.compile(&spec).expect("compiles"));
        let allowed = |c: &mut Constraint, token: u32| {
            let mut logits = vec![0.0; FAKE_VOCAB];
            c.apply(&mut logits, &[FAKE_EOS]).expect("a mask");
            logits[token as usize].is_finite()
        };
        let mut taken = 0;
        for b in text.bytes() {
            if !allowed(&mut c, u32::from(b)) {
                break;
            }
            c.accept(u32::from(b)).expect("the mask allowed it");
            taken += 1;
        }
        (taken, allowed(&mut c, FAKE_EOS))
    }

    fn field(kind: &str) -> Value {
        json!({ "type": "object", "properties": { "n": { "type": kind } }, "required": ["n"] })
    }

    #[test]
    fn a_number_past_sixteen_digits_or_eight_decimals_is_refused_and_numbers_within_pass() {
        let head = "{\"n\": ";
        for kind in ["number", "integer"] {
            let (taken, _) = accepted(field(kind), true, &format!("{head}{}", "1".repeat(20)));
            assert_eq!(taken, head.len() + 16, "{kind}: the 17th digit is refused");
            let whole = format!("{head}-9007199254740991}}");
            assert_eq!(accepted(field(kind), true, &whole), (whole.len(), true), "{kind}");
        }
        let (taken, _) = accepted(field("number"), true, "{\"n\": 0.1234567890}");
        assert_eq!(taken, head.len() + 2 + 8, "the 9th decimal is refused");
        let (taken, _) = accepted(field("number"), true, "{\"n\": 2e5}");
        assert_eq!(taken, head.len() + 1, "no exponent");
        for ok in ["{\"n\": 2.1}", "{\"n\": -0.5}", "{\"n\": 9007199254740991.99999999}", "{\"n\": 0}"] {
            assert_eq!(accepted(field("number"), true, ok), (ok.len(), true), "{ok}");
        }
        // The same bound reaches values the schema leaves open.
        let open = "{\"a\": [1, {\"b\": 11111111111111111";
        assert_eq!(accepted(json!({ "type": "object" }), false, open).0, open.len() - 1);
    }

    #[test]
    fn strict_refuses_a_key_the_schema_does_not_name() {
        let city = json!({
            "type": "object",
            "properties": {
                "name": { "type": "string" },
                "country": { "type": "string" },
                "population_millions": { "type": "number" }
            },
            "required": ["name", "country", "population_millions"]
        });
        let named = "{\"name\": \"Paris\", \"country\": \"France\", \"population_millions\": 2.1";
        let more = format!("{named}, \"population_milli\": 1}}");
        assert_eq!(accepted(city.clone(), true, &more).0, named.len(), "the comma before an unnamed key");
        assert_eq!(accepted(city.clone(), false, &more), (more.len(), true), "without strict, extra keys pass");
        let done = format!("{named}}}");
        assert_eq!(accepted(city, true, &done), (done.len(), true));
    }

    #[test]
    fn a_string_past_its_bound_must_close() {
        let long = format!("\"{}", "a".repeat(MAX_STRING_CHARS as usize + 10));
        let (taken, _) = accepted(json!({ "type": "string" }), false, &long);
        assert_eq!(taken, 1 + MAX_STRING_CHARS as usize);
        let own = format!("\"{}\"", "a".repeat(MAX_STRING_CHARS as usize + 10));
        assert_eq!(accepted(json!({ "type": "string", "maxLength": 2000 }), false, &own), (own.len(), true));
    }

    #[test]
    fn a_number_gets_integral_and_fraction_bounds_and_keeps_its_own_tighter_ones() {
        let s = grammar_schema(&json!({ "type": "number", "minimum": 0 }), false);
        assert_eq!(s["minimum"], 0);
        assert_eq!(s["exclusiveMinimum"], json!(null), "0 is inside the limit: nothing added");
        assert_eq!(s["exclusiveMaximum"], NUMBER_LIMIT);
        assert_eq!(s["multipleOf"], json!(1e-8));
        let s = grammar_schema(&json!({ "type": "integer", "exclusiveMaximum": 1e300, "maximum": 5 }), false);
        assert_eq!((s["exclusiveMaximum"].clone(), s["maximum"].clone()), (json!(NUMBER_LIMIT), json!(5)));
        assert_eq!(s["exclusiveMinimum"], -NUMBER_LIMIT);
        assert_eq!(s["multipleOf"], json!(null), "integers have no fraction");
        // Draft 4: a boolean `exclusiveMinimum` beside a `minimum` stays so.
        let s = grammar_schema(&json!({ "type": "number", "minimum": -1e20, "exclusiveMinimum": true }), false);
        assert_eq!((s["minimum"].clone(), s["exclusiveMinimum"].clone()), (json!(-NUMBER_LIMIT), json!(true)));
    }

    #[test]
    fn open_values_become_the_bounded_any_and_strings_get_a_length() {
        let s = grammar_schema(
            &json!({ "type": "object", "properties": { "tags": { "type": "array" }, "x": true } }),
            false,
        );
        let any = json!({ "$ref": ANY_REF });
        assert_eq!(s["additionalProperties"], any);
        assert_eq!(s["properties"]["tags"]["items"], any);
        assert_eq!(s["properties"]["x"], any);
        let def = &s["$defs"][ANY];
        assert_eq!((def["items"].clone(), def["additionalProperties"].clone()), (any.clone(), any));
        assert_eq!(def["maxLength"], MAX_STRING_CHARS);
        assert_eq!(def["exclusiveMaximum"], NUMBER_LIMIT);
        let s = grammar_schema(&json!({ "type": "string", "maxLength": 5000 }), false);
        assert_eq!(s["maxLength"], 5000, "the schema's own length stays");
        assert_eq!(s["$defs"], json!(null), "nothing refers to the any: it is not added");
    }

    #[test]
    fn strict_closes_every_object_schema_that_does_not_say_otherwise() {
        let s = json!({
            "type": "object",
            "properties": {
                "a": { "type": "object", "properties": { "b": { "type": "integer" } } },
                "m": { "type": "object", "additionalProperties": { "type": "integer" } },
                "l": { "type": "array", "items": { "properties": { "c": {} } } },
                "u": { "anyOf": [{ "type": "object" }, { "type": "null" }] },
                "r": { "$ref": "#/$defs/D" }
            },
            "$defs": { "D": { "type": ["object", "null"] } }
        });
        let strict = grammar_schema(&s, true);
        let closed = |p: &str| strict.pointer(p).cloned();
        for p in ["", "/properties/a", "/properties/l/items", "/properties/u/anyOf/0", "/$defs/D"] {
            assert_eq!(closed(&format!("{p}/additionalProperties")), Some(json!(false)), "{p}");
        }
        assert_eq!(closed("/properties/m/additionalProperties/type"), Some(json!("integer")), "said otherwise");
        assert_eq!(closed("/properties/r/additionalProperties"), None, "the target is closed, not the $ref");
        let open = grammar_schema(&s, false);
        assert_eq!(open["additionalProperties"], json!({ "$ref": ANY_REF }));
    }

    #[test]
    fn the_rewrite_is_idempotent_and_leaves_finite_and_combining_nodes_alone() {
        let s = json!({
            "type": "object",
            "properties": {
                "k": { "enum": [1.123456789, "x"] },
                "c": { "const": 12345678901234567890_u64 },
                "o": { "oneOf": [{ "type": "number" }, { "type": "string" }] }
            },
            "required": ["k"]
        });
        let once = grammar_schema(&s, true);
        assert_eq!(grammar_schema(&once, true), once);
        assert_eq!(once["properties"]["k"], s["properties"]["k"]);
        assert_eq!(once["properties"]["c"], s["properties"]["c"]);
        assert_eq!(once["properties"]["o"]["multipleOf"], json!(null));
        assert_eq!(once["properties"]["o"]["oneOf"][0]["multipleOf"], json!(1e-8));
    }

    #[test]
    fn a_multiple_of_whose_intersection_would_overflow_turns_the_fraction_bound_off() {
        for (m, safe) in [(0.5, true), (0.25, true), (4.0, true), (7.0, false), (1e-8, true), (1e-9, false)] {
            assert_eq!(multiple_fits(m), safe, "{m}");
        }
        let s =
            grammar_schema(&json!({ "anyOf": [{ "type": "number", "multipleOf": 7 }, { "type": "number" }] }), false);
        assert_eq!(s["anyOf"][1]["multipleOf"], json!(null));
        assert_eq!(s["anyOf"][1]["exclusiveMaximum"], NUMBER_LIMIT, "the integral bound stays");
    }

    /// Shapes clients send (pydantic's `$defs` and `anyOf` with null, enums,
    /// lists, maps, a recursive tree, a `multipleOf` whose intersection
    /// with the fraction bound would overflow) still compile, strict or
    /// not, and admit an instance.
    #[test]
    fn schemas_clients_send_still_compile_and_admit_their_instances() {
        let cases = [
            (
                json!({
                    "$defs": { "Address": { "type": "object", "properties": { "city": { "type": "string" } },
                                            "required": ["city"], "title": "Address" } },
                    "type": "object", "title": "Person",
                    "properties": {
                        "name": { "type": "string" },
                        "age": { "anyOf": [{ "type": "integer", "minimum": 0 }, { "type": "null" }] },
                        "home": { "$ref": "#/$defs/Address" },
                        "tags": { "type": "array", "items": { "type": "string" } },
                        "kind": { "enum": ["a", "b"] },
                        "scores": { "type": "object", "additionalProperties": { "type": "number" } }
                    },
                    "required": ["name", "age", "home", "tags", "kind", "scores"]
                }),
                "{\"name\": \"Ada\", \"age\": null, \"home\": {\"city\": \"Oslo\"}, \"tags\": [\"x\"], \
                 \"kind\": \"b\", \"scores\": {\"m\": 1.5}}",
            ),
            (
                json!({
                    "$defs": { "Node": { "type": "object", "properties": {
                        "v": { "type": "integer" },
                        "kids": { "type": "array", "items": { "$ref": "#/$defs/Node" } } },
                        "required": ["v", "kids"] } },
                    "$ref": "#/$defs/Node"
                }),
                "{\"v\": 1, \"kids\": [{\"v\": 2, \"kids\": []}]}",
            ),
            (json!({ "allOf": [{ "type": "number", "multipleOf": 7 }, { "type": "number" }] }), "14"),
            (json!({ "type": "number", "minimum": 0, "exclusiveMinimum": true, "maximum": 10 }), "9.5"),
            (
                json!({ "$schema": "http://json-schema.org/draft-04/schema#", "type": "object",
                        "properties": { "a": { "type": "number" } }, "required": ["a"] }),
                "{\"a\": 1.25}",
            ),
        ];
        for (schema, instance) in cases {
            for strict in [false, true] {
                assert_eq!(accepted(schema.clone(), strict, instance), (instance.len(), true), "{strict} {schema}");
            }
        }
    }

    #[test]
    fn nested_resources_get_no_references_to_the_roots_definitions() {
        let s = grammar_schema(
            &json!({ "type": "object", "properties": { "n": { "$id": "urn:n", "type": "array" } } }),
            false,
        );
        assert_eq!(s["properties"]["n"]["items"], json!(null));
        let s = grammar_schema(&json!({ "type": "object", "properties": { "id": { "type": "string" } } }), false);
        assert_eq!(s["properties"]["id"]["maxLength"], MAX_STRING_CHARS, "a property named id is no $id");
    }
}
