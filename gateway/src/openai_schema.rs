//! What the OpenAI request bodies accept, as JSON Schema, where utoipa's derive cannot say it: fields the
//! service takes at one neutral value only (it refuses what it cannot honour, see [`crate::openai`]), and
//! `prompt` and `stop`, which take a string or an array. The document then promises no request that the
//! gateway refuses for these reasons, and a client (or a fuzzer) reading it learns the limits up front.

use serde_json::json;
use shared::params::{MAX_STOP_CHARS, MAX_STOP_SEQUENCES};
use utoipa::openapi::{RefOr, Schema};

/// The most choices one request may ask for (`n`, times the prompts for completions): each is a job. Here,
/// where the schema states it; [`crate::openai`] enforces it.
pub const MAX_CHOICES: u32 = 8;

/// A schema written as JSON. utoipa's `Schema` reads only part of JSON Schema (no `const`, no schema
/// without a `type`) and drops what it does not know, so a literal must come back whole. These are
/// constants, and the document's tests build every one of them.
fn literal(schema: serde_json::Value) -> RefOr<Schema> {
    let read: RefOr<Schema> =
        serde_json::from_value(schema.clone()).expect("a schema literal of this module is a schema");
    assert_eq!(
        serde_json::to_value(&read).ok(),
        Some(schema),
        "utoipa's Schema keeps every keyword of a literal of this module"
    );
    read
}

/// `prompt`: a text, or 1 to [`MAX_CHOICES`] texts (each is at least one choice). Token ids are not
/// supported.
pub fn prompt() -> RefOr<Schema> {
    literal(json!({
        "description": "A text, or an array of texts (each gets `n` choices). Token ids are not supported.",
        "oneOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_CHOICES},
        ],
    }))
}

/// `stop`: one sequence or up to [`MAX_STOP_SEQUENCES`], each 1 to [`MAX_STOP_CHARS`] characters.
pub fn stop() -> RefOr<Schema> {
    let sequence = json!({"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS});
    literal(json!({
        "description": "Sequences that end the text (not included in it).",
        "oneOf": [
            {"type": "null"},
            sequence,
            {"type": "array", "items": sequence, "maxItems": MAX_STOP_SEQUENCES},
        ],
    }))
}

/// `seed`: any u64. utoipa would write the format int64, whose range stops at half of it.
pub fn seed() -> RefOr<Schema> {
    literal(json!({
        "description": "Makes sampling reproducible; choice `i` uses `seed + i`.",
        "type": ["integer", "null"],
        "minimum": 0,
        "maximum": u64::MAX,
    }))
}

/// Completions' `logprobs`: log-probabilities are not supported, so only `null`.
pub fn null_only() -> RefOr<Schema> {
    literal(json!({"description": "Not supported: only `null` (or absent).", "type": "null"}))
}

/// `logit_bias`: biasing tokens is not supported, so only `{}`.
pub fn empty_object_only() -> RefOr<Schema> {
    literal(json!({
        "description": "Not supported: only `{}` (or absent).",
        "type": ["object", "null"],
        "maxProperties": 0,
    }))
}

/// Chat's `logprobs`: only `false`.
pub fn false_only() -> RefOr<Schema> {
    literal(
        json!({"description": "Not supported: only `false` (or absent).", "type": ["boolean", "null"], "enum": [false, null]}),
    )
}

/// `tool_choice`: no call, a call of any tool, or of one named function (`auto` is refused: the model has
/// no tool-calling format to decide with).
pub fn tool_choice() -> RefOr<Schema> {
    literal(json!({
        "description": "`none`, `required`, or `{\"type\": \"function\", \"function\": {\"name\": …}}`. \
            `auto` (OpenAI's default with `tools`) is refused.",
        "oneOf": [
            {"type": ["string", "null"], "enum": ["none", "required", null]},
            {
                "type": "object",
                "properties": {
                    "type": {"type": "string", "enum": ["function"]},
                    "function": {
                        "type": "object",
                        "properties": {"name": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"}},
                        "required": ["name"],
                        "additionalProperties": false,
                    },
                },
                "required": ["type", "function"],
                "additionalProperties": false,
            },
        ],
    }))
}

/// `function_call`: OpenAI's deprecated function calling is not supported, so only `"none"`.
pub fn none_only() -> RefOr<Schema> {
    literal(json!({
        "description": "Not supported: only `\"none\"` (or absent).",
        "type": ["string", "null"],
        "enum": ["none", null],
    }))
}

/// `response_format`: text, any JSON object, or JSON of a schema (constrained decoding).
pub fn response_format() -> RefOr<Schema> {
    literal(json!({
        "description": "`{\"type\": \"text\"}` (the default), `{\"type\": \"json_object\"}`, or \
            `{\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\", \"strict\"}}`: the text is valid \
            JSON of that schema.",
        "oneOf": [
            {"type": "null"},
            {
                "type": "object",
                "properties": {"type": {"type": "string", "enum": ["text", "json_object"]}},
                "required": ["type"],
                "additionalProperties": false,
            },
            {
                "type": "object",
                "properties": {
                    "type": {"type": "string", "enum": ["json_schema"]},
                    "json_schema": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string"},
                            "description": {"type": "string"},
                            "schema": {"type": "object"},
                            "strict": {"type": ["boolean", "null"]},
                        },
                        "additionalProperties": false,
                    },
                },
                "required": ["type", "json_schema"],
                "additionalProperties": false,
            },
        ],
    }))
}

/// A choice constraint's strings: 1 to 1,024, none empty.
fn choices_schema(description: &str) -> serde_json::Value {
    json!({
        "description": description,
        "type": ["array", "null"],
        "items": {"type": "string", "minLength": 1},
        "minItems": 1,
        "maxItems": shared::grammar::MAX_GRAMMAR_CHOICES,
    })
}

/// vLLM's `guided_choice`.
pub fn guided_choice() -> RefOr<Schema> {
    literal(choices_schema(
        "Extension (vLLM's older name for `structured_outputs.choice`).",
    ))
}

/// vLLM's `structured_outputs`: one of its constraints.
pub fn structured_outputs() -> RefOr<Schema> {
    literal(json!({
        "description": "Extension (vLLM's): one of `json` (a JSON Schema, or its JSON text), `regex`, `choice`, \
            `grammar` (Lark) or `json_object: true` constrains the text.",
        "type": ["object", "null"],
        "properties": {
            "json": {"type": ["object", "string", "boolean"]},
            "regex": {"type": ["string", "null"], "minLength": 1},
            "choice": choices_schema("Exactly one of these strings."),
            "grammar": {"type": ["string", "null"], "minLength": 1},
            "json_object": {"type": ["boolean", "null"]},
        },
        "additionalProperties": false,
    }))
}
