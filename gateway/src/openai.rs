//! OpenAI's wire protocol for `/v1/completions`, `/v1/chat/completions` and `/v1/models`: request and
//! response bodies and the pure conversions between them and the job contract.
//!
//! Existing OpenAI clients, SDKs, frameworks and load testers then work against the gateway unchanged. Each
//! field OpenAI (or vLLM, whose extensions such tools send) defines is handled one of three ways:
//! - honoured: OpenAI's sampling fields, log-probabilities (streamed too), `stream_options` (vLLM's
//!   `continuous_usage_stats` included), vLLM's `ignore_eos` and `min_p`, and our own decoding parameters
//!   (`strategy`, `top_k`, `num_beams`, …) as extra fields, as vLLM takes its extras;
//! - honoured our way: `service_tier` picks the lane (`auto`/`default` interactive, `flex` batch, `priority`
//!   interactive where the key may use it; clamped to the key's highest lane, never refused), and the answer
//!   says which lane it got, as OpenAI's does; the extension `timeout_s` is the job's deadline;
//! - accepted and ignored, because it changes nothing here: bookkeeping (`user`, `metadata`, `store`,
//!   `safety_identifier`, `prompt_cache_key`), and hints for features a client only uses
//!   along with others we refuse (`parallel_tool_calls`) or that a model without them has no use for
//!   (`reasoning_effort`);
//! - refused by name, when its meaning cannot be delivered (tools, penalties, `best_of`), so a client
//!   never believes it got something it did not; each such field's neutral value is accepted.
//!
//! `docs/openai.md` lists them all. The route handlers do the I/O; nothing here does any.

use std::fmt;

use axum::http::StatusCode;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use shared::chat::ChatMessage;
use shared::params::MAX_STOP_SEQUENCES;
use shared::{
    ErrorCode, FinishReason, GenerationParameters, Grammar, InvalidParameter, JobId, Lane, Strategy,
};
use utoipa::ToSchema;

use crate::openai_error::{ParamError, param_error};
use crate::openai_schema::MAX_CHOICES;
use crate::tools::{ToolCall, ToolCallDelta, ToolCalling};

/// OpenAI's documented default `max_tokens` for completions.
pub const DEFAULT_COMPLETION_MAX_TOKENS: u32 = 16;

/// Our job parameters' names and OpenAI's (vLLM's), where they differ.
const OPENAI_NAMES: [(&str, &str); 2] = [("max_new_tokens", "max_tokens"), ("min_new_tokens", "min_tokens")];

/// The OpenAI name of a job parameter, for errors from [`GenerationParameters::validate`] on a parameter
/// set built here.
pub fn param_name(field: &str) -> &str {
    // A grammar comes from `response_format` (or vLLM's fields, which name themselves when malformed).
    if field == "grammar" {
        return "response_format";
    }
    OPENAI_NAMES
        .iter()
        .find(|(ours, _)| *ours == field)
        .map_or(field, |(_, theirs)| theirs)
}

/// `message` with our parameters' names replaced by OpenAI's, so that an error on the OpenAI routes (a
/// context overflow, a bound that is another field's value) names what the client sent.
pub fn in_openai_terms(message: &str) -> String {
    OPENAI_NAMES
        .iter()
        .fold(message.to_owned(), |m, (ours, theirs)| m.replace(ours, theirs))
}

impl From<&InvalidParameter> for ParamError {
    fn from(e: &InvalidParameter) -> Self {
        param_error(param_name(e.field), e.message.clone())
    }
}

/// A string or an array of strings: `prompt` and `stop` both take either.
enum Texts {
    One(String),
    Many(Vec<String>),
}

fn deserialize_texts<'de, D: Deserializer<'de>>(
    deserializer: D,
    expecting: &'static str,
) -> Result<Texts, D::Error> {
    struct TextsVisitor(&'static str);

    impl<'de> Visitor<'de> for TextsVisitor {
        type Value = Texts;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.0)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Texts, E> {
            Ok(Texts::One(v.to_owned()))
        }

        fn visit_string<E: de::Error>(self, v: String) -> Result<Texts, E> {
            Ok(Texts::One(v))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Texts, A::Error> {
            let mut texts = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(16));
            while let Some(text) = seq.next_element::<String>()? {
                texts.push(text);
            }
            Ok(Texts::Many(texts))
        }
    }

    deserializer.deserialize_any(TextsVisitor(expecting))
}

/// `prompt`: one text or a batch of texts. Token-id prompts are not supported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum PromptInput {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for PromptInput {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match deserialize_texts(
            deserializer,
            "a string or a non-empty array of strings (token ids are not supported)",
        )? {
            Texts::One(text) => Ok(Self::One(text)),
            Texts::Many(texts) if texts.is_empty() => {
                Err(de::Error::custom("`prompt` must not be an empty array"))
            }
            Texts::Many(texts) => Ok(Self::Many(texts)),
        }
    }
}

impl PromptInput {
    /// The prompts in order; choice `i * n + j` of a completion answers prompt `i`.
    pub fn prompts(&self) -> &[String] {
        match self {
            Self::One(text) => std::slice::from_ref(text),
            Self::Many(texts) => texts,
        }
    }
}

/// `stop`: one sequence or several.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for StopInput {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(
            match deserialize_texts(deserializer, "a string or an array of strings")? {
                Texts::One(text) => Self::One(text),
                Texts::Many(texts) => Self::Many(texts),
            },
        )
    }
}

impl StopInput {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Self::One(text) => vec![text.clone()],
            Self::Many(texts) => texts.clone(),
        }
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    /// Send a last chunk with the token usage (and `"usage": null` on every other chunk).
    pub include_usage: Option<bool>,
    /// vLLM's: with `include_usage`, every chunk carries the usage so far (its choice's prompt and tokens)
    /// instead of `null`.
    pub continuous_usage_stats: Option<bool>,
}

/// What usage a stream reports, from its `stream_options`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamUsage {
    /// Chunks have no `usage` field (the default).
    Off,
    /// `include_usage`: `"usage": null` on every chunk, the counts in a last chunk of their own.
    Last,
    /// `include_usage` and `continuous_usage_stats`: the counts so far on every chunk too.
    Continuous,
}

impl StreamUsage {
    /// A chunk's `usage`: absent, `null`, or (`Continuous`) the counts so far.
    pub fn on_chunk(self, so_far: Usage) -> Option<Option<Usage>> {
        match self {
            Self::Off => None,
            Self::Last => Some(None),
            Self::Continuous => Some(Some(so_far)),
        }
    }

    /// Whether the stream ends with a chunk of the request's whole usage.
    pub fn last_chunk(self) -> bool {
        self != Self::Off
    }
}

// The fields both endpoints share are written once, in `with_shared_fields!`, and pasted by callback
// macros into each request and into `Shared`. `#[serde(flatten)]` would avoid the macros but not do: it
// cannot be combined with `deny_unknown_fields`, and it buffers the flattened values, so a type error in
// one of them could no longer name its field.

/// Calls `$callback!` with `[$input]` followed by the shared fields.
macro_rules! with_shared_fields {
    ($callback:ident ! { $($input:tt)* }) => {
        $callback! { [$($input)*]
            /// Tokens to generate at most. Default 16 for completions (as OpenAI), 50 for chat. Also 0, to
            /// score a prompt only (completions with `echo` and `logprobs`; outside this schema's bound).
            #[schema(minimum = 1, maximum = 2048)]
            max_tokens: Option<u32>,
            /// Sampling temperature (default 1.0); 0 means greedy decoding.
            #[schema(minimum = 0, maximum = 100)]
            temperature: Option<f64>,
            /// Nucleus sampling mass in (0, 1].
            #[schema(exclusive_minimum = 0, maximum = 1)]
            top_p: Option<f64>,
            /// Choices to generate (1 to 8), each its own job.
            #[schema(minimum = 1, maximum = 8)]
            n: Option<u32>,
            /// Stream the text as server-sent events.
            stream: Option<bool>,
            stream_options: Option<StreamOptions>,
            /// Up to 4 sequences that end the text (not included in it).
            #[schema(schema_with = crate::openai_schema::stop)]
            stop: Option<StopInput>,
            /// Makes sampling reproducible; choice `i` uses `seed + i`.
            #[schema(schema_with = crate::openai_schema::seed)]
            seed: Option<u64>,
            /// Extension (vLLM's): generate past the end-of-sequence token, to exactly `max_tokens` unless
            /// `stop` ends the text first (for benchmarks).
            ignore_eos: Option<bool>,
            /// Extension (vLLM's): min-p sampling; tokens less likely than `min_p` times the likeliest are
            /// removed (0, the default, is off).
            #[schema(minimum = 0, maximum = 1)]
            min_p: Option<f64>,
            /// Accepted and ignored.
            user: Option<String>,
            /// Accepted and ignored: nothing is stored or tagged.
            #[schema(value_type = Option<Object>)]
            metadata: Option<serde_json::Map<String, serde_json::Value>>,
            /// Accepted and ignored: nothing is stored.
            store: Option<bool>,
            /// The lane: `auto` or `default` (the default) interactive, `flex` the batch lane (bulk work, run
            /// in the room interactive jobs leave), `priority` interactive where the key may use it; a key
            /// limited to the batch lane gets `flex` whatever it asks. The answer says which it got.
            #[schema(value_type = Option<String>, pattern = "^(auto|default|flex|priority|scale)$")]
            service_tier: Option<String>,
            /// Extension: seconds the request is worth waiting for (the header `X-Request-Timeout` says
            /// the same; the shorter wins). Refused at once (503 `deadline_exceeded`) when the queue's
            /// estimated wait is longer; a job no worker started in time fails with `deadline_exceeded`.
            #[schema(exclusive_minimum = 0, maximum = 604800)]
            timeout_s: Option<f64>,
            /// Accepted and ignored.
            safety_identifier: Option<String>,
            /// Accepted and ignored: prompts are not cached across requests.
            prompt_cache_key: Option<String>,
            /// Accepted and ignored: a forced tool call is one call.
            parallel_tool_calls: Option<bool>,
            /// Accepted and ignored: the model does not reason before it answers.
            reasoning_effort: Option<String>,
            /// Not supported: only 0 (or absent) is accepted.
            #[schema(minimum = 0, maximum = 0)]
            presence_penalty: Option<f64>,
            /// Not supported: only 0 (or absent) is accepted.
            #[schema(minimum = 0, maximum = 0)]
            frequency_penalty: Option<f64>,
            /// Not supported: only `null` or `{}` is accepted.
            #[schema(schema_with = crate::openai_schema::empty_object_only)]
            logit_bias: Option<serde_json::Value>,
            /// Extension: the decoding strategy (`contrastive`, `greedy`, `sample`, `beam`); when given,
            /// the parameters below and OpenAI's map 1:1 to the job's.
            #[schema(schema_with = crate::contract_schema::optional_strategy)]
            strategy: Option<Strategy>,
            /// Extension: contrastive search's degeneration penalty.
            #[schema(minimum = 0, maximum = 1)]
            penalty_alpha: Option<f64>,
            /// Extension: top-k filter for sampling (default 0, none, as OpenAI has no top-k); candidate
            /// count for contrastive search (1 to 64).
            #[schema(maximum = 100000)]
            top_k: Option<u32>,
            /// Extension: typical sampling mass.
            #[schema(exclusive_minimum = 0, maximum = 1)]
            typical_p: Option<f64>,
            /// Extension: beam count for beam search.
            #[schema(minimum = 1, maximum = 16)]
            num_beams: Option<u32>,
            /// Extension: CTRL's repetition penalty.
            #[schema(exclusive_minimum = 0, maximum = 10)]
            repetition_penalty: Option<f64>,
            /// Extension: forbid repeating n-grams of this size.
            #[schema(maximum = 32)]
            no_repeat_ngram_size: Option<u32>,
            /// Extension: beam search length penalty.
            #[schema(minimum = -10, maximum = 10)]
            length_penalty: Option<f64>,
            /// Extension: beam search stops when `num_beams` hypotheses are done.
            early_stopping: Option<bool>,
            /// Extension (vLLM's name): tokens to generate before the text may end (at most `max_tokens`).
            #[schema(maximum = 2048)]
            min_tokens: Option<u32>,
            /// Extension: `false` without `strategy` means greedy decoding.
            do_sample: Option<bool>,
            /// `{"type": "text"}` (the default), `{"type": "json_object"}` (any JSON object) or
            /// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`: the text is valid JSON
            /// of that schema (constrained decoding). Accepted on completions too, as vLLM does.
            #[schema(schema_with = crate::openai_schema::response_format)]
            response_format: Option<ResponseFormat>,
            /// Extension (vLLM's): one of `json` (a JSON Schema), `regex`, `choice` (a list of strings),
            /// `grammar` (Lark) or `json_object: true` constrains the text.
            #[schema(schema_with = crate::openai_schema::structured_outputs)]
            structured_outputs: Option<StructuredOutputs>,
            /// Extension (vLLM's older name for `structured_outputs.json`).
            #[schema(value_type = Option<Object>)]
            guided_json: Option<serde_json::Value>,
            /// Extension (vLLM's older name for `structured_outputs.regex`).
            #[schema(min_length = 1)]
            guided_regex: Option<String>,
            /// Extension (vLLM's older name for `structured_outputs.choice`).
            #[schema(schema_with = crate::openai_schema::guided_choice)]
            guided_choice: Option<Vec<String>>,
            /// Extension (vLLM's older name for `structured_outputs.grammar`).
            #[schema(min_length = 1)]
            guided_grammar: Option<String>,
            /// Extension (vLLM's): accepted and ignored; the grammar engine is llguidance.
            guided_decoding_backend: Option<String>,
        }
    };
}

/// OpenAI's `response_format`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

/// `response_format.json_schema`: the schema and OpenAI's labels for it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JsonSchemaFormat {
    /// The schema's name (OpenAI requires one; it changes nothing here).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// The JSON Schema; absent means any JSON value.
    #[serde(default)]
    pub schema: Option<serde_json::Value>,
    /// OpenAI's strict mode: the text follows the schema exactly, which constrained decoding always does.
    #[serde(default)]
    pub strict: Option<bool>,
}

/// vLLM's `structured_outputs`: one constraint at most.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StructuredOutputs {
    /// A JSON Schema, as an object or as its JSON text.
    #[serde(default)]
    pub json: Option<serde_json::Value>,
    #[serde(default)]
    pub regex: Option<String>,
    #[serde(default)]
    pub choice: Option<Vec<String>>,
    /// A grammar in llguidance's Lark dialect.
    #[serde(default)]
    pub grammar: Option<String>,
    #[serde(default)]
    pub json_object: Option<bool>,
}

/// A JSON Schema given as an object or as its JSON text (vLLM takes both).
fn schema_value(param: &str, value: &serde_json::Value) -> Result<serde_json::Value, ParamError> {
    match value {
        serde_json::Value::String(text) => {
            serde_json::from_str(text).map_err(|e| param_error(param, format!("is not a JSON Schema: {e}")))
        }
        other => Ok(other.clone()),
    }
}

/// The shared fields without their documentation attributes, which only the request schemas need.
macro_rules! declare_shared {
    ([] $( $(#[$meta:meta])* $field:ident : $ty:ty, )*) => {
        /// The fields both endpoints share, as the client sent them.
        #[derive(Debug, Clone, Default, PartialEq)]
        // `n`, `stream` and `stream_options` are read through the requests' accessors; the fields accepted
        // and ignored (`user`, `metadata`, …) not at all.
        #[allow(dead_code)]
        struct Shared {
            $( $field: $ty, )*
        }
    };
}

/// A request body: the endpoint's own fields, then the shared ones, with accessors over the latter.
macro_rules! declare_request {
    (
        [ $(#[$attr:meta])* pub struct $name:ident { $($own:tt)* } ]
        $( $(#[$meta:meta])* $field:ident : $ty:ty, )*
    ) => {
        $(#[$attr])*
        #[derive(Debug, Clone, Deserialize, ToSchema)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($own)*
            $( $(#[$meta])* pub $field: $ty, )*
        }

        impl $name {
            fn shared(&self) -> Shared {
                Shared { $( $field: self.$field.clone(), )* }
            }

            /// Whether to answer with server-sent events.
            pub fn stream(&self) -> bool {
                self.stream.unwrap_or(false)
            }

            /// What usage a stream reports (`Off` when not streamed).
            pub fn stream_usage(&self) -> StreamUsage {
                let options = self.stream_options.clone().unwrap_or_default();
                match (self.stream(), options.include_usage, options.continuous_usage_stats) {
                    (true, Some(true), Some(true)) => StreamUsage::Continuous,
                    (true, Some(true), _) => StreamUsage::Last,
                    _ => StreamUsage::Off,
                }
            }

            /// The lane `service_tier` asks for; `None` leaves it to the default.
            pub fn lane(&self) -> Result<Option<Lane>, ParamError> {
                requested_lane(self.service_tier.as_deref())
            }

            /// The extension `timeout_s`, as given.
            pub fn timeout_s(&self) -> Option<f64> {
                self.timeout_s
            }

            /// `n`, checked: 1 to [`MAX_CHOICES`], default 1.
            pub fn n(&self) -> Result<u32, ParamError> {
                let n = self.n.unwrap_or(1);
                if (1..=MAX_CHOICES).contains(&n) {
                    Ok(n)
                } else {
                    Err(param_error("n", format!("must be in [1, {MAX_CHOICES}], got {n}")))
                }
            }
        }
    };
}

with_shared_fields!(declare_shared! {});

with_shared_fields!(declare_request! {
    /// `POST /v1/completions`.
    pub struct CompletionRequest {
        /// The model's name as `/v1/models` lists it.
        pub model: String,
        #[schema(schema_with = crate::openai_schema::prompt)]
        pub prompt: PromptInput,
        /// Put the prompt before the generated text; with `logprobs`, the prompt's tokens are scored too
        /// (the first's is `null`) and `max_tokens` may be 0.
        pub echo: Option<bool>,
        /// Return each token's log-probability and this many likeliest alternatives (0 to 20); greedy
        /// decoding and sampling. Streamed, each chunk carries its tokens'.
        #[schema(minimum = 0, maximum = 20)]
        pub logprobs: Option<u32>,
        /// Not supported: only 1 (or absent) is accepted.
        #[schema(minimum = 1, maximum = 1)]
        pub best_of: Option<u32>,
        /// Not supported: only absent or empty is accepted.
        #[schema(max_length = 0)]
        pub suffix: Option<String>,
    }
});

with_shared_fields!(declare_request! {
    /// `POST /v1/chat/completions`.
    pub struct ChatCompletionRequest {
        /// The model's name as `/v1/models` lists it.
        pub model: String,
        /// The conversation; `content` is a string or an array of text parts.
        #[schema(schema_with = crate::contract_schema::chat_messages)]
        pub messages: Vec<ChatMessage>,
        /// OpenAI's newer name for `max_tokens`; if both are given they must agree.
        #[schema(minimum = 1, maximum = 2048)]
        pub max_completion_tokens: Option<u32>,
        /// Return each generated token's log-probability (greedy decoding and sampling). Streamed, each
        /// chunk carries its tokens'.
        pub logprobs: Option<bool>,
        /// With `logprobs`, the likeliest alternatives to report at each position (0 to 20).
        #[schema(minimum = 0, maximum = 20)]
        pub top_logprobs: Option<u32>,
        /// Functions the model may be made to call (at most 128). Their calls are forced with
        /// `tool_choice`: the model has no tool-calling format to decide with, so `auto` is refused.
        #[schema(value_type = Option<Vec<crate::tools::Tool>>, max_items = 128)]
        pub tools: Option<serde_json::Value>,
        /// `none` (the default without `tools`), `required` (a call of any of `tools`), or
        /// `{"type": "function", "function": {"name": …}}` (that function): the answer's `tool_calls` hold
        /// the call, its arguments written under the function's `parameters` schema (constrained decoding).
        /// `auto`, the default with `tools`, is refused.
        #[schema(schema_with = crate::openai_schema::tool_choice)]
        pub tool_choice: Option<serde_json::Value>,
        /// Not supported: only absent, `null` or `[]` is accepted.
        #[schema(value_type = Option<Vec<Object>>, max_items = 0)]
        pub functions: Option<serde_json::Value>,
        /// Not supported: only absent, `null` or `"none"` is accepted.
        #[schema(schema_with = crate::openai_schema::none_only)]
        pub function_call: Option<serde_json::Value>,
    }
});

/// The lane a `service_tier` asks for: OpenAI's tiers onto our lanes (`scale` is OpenAI's older name for
/// `priority`). The caller's key clamps it afterwards.
fn requested_lane(tier: Option<&str>) -> Result<Option<Lane>, ParamError> {
    match tier {
        None | Some("auto") | Some("default") => Ok(None),
        Some("flex") => Ok(Some(Lane::Batch)),
        Some("priority") | Some("scale") => Ok(Some(Lane::Interactive)),
        Some(other) => Err(param_error(
            "service_tier",
            format!("must be `auto`, `default`, `flex` or `priority`, got `{other}`"),
        )),
    }
}

/// The `service_tier` an answer reports for the lane its jobs went to.
pub fn service_tier(lane: Lane) -> &'static str {
    match lane {
        Lane::Interactive => "default",
        Lane::Batch => "flex",
    }
}

/// Refuses `param` unless `neutral`: it asks for something the service does not do.
fn require_neutral(param: &str, neutral: bool, message: &str) -> Result<(), ParamError> {
    if neutral {
        Ok(())
    } else {
        Err(param_error(param, message))
    }
}

/// Whether an optional JSON value is absent, `null`, or one of the `neutral` values.
fn absent_or(value: &Option<serde_json::Value>, neutral: &[serde_json::Value]) -> bool {
    value.as_ref().is_none_or(|v| v.is_null() || neutral.contains(v))
}

impl Shared {
    /// The constraint the request names, by whichever of OpenAI's or vLLM's fields; one at most.
    fn grammar(&self) -> Result<Option<Grammar>, ParamError> {
        let mut named: Vec<(&str, Grammar)> = Vec::new();
        match &self.response_format {
            None | Some(ResponseFormat::Text) => {}
            Some(ResponseFormat::JsonObject) => {
                named.push((
                    "response_format",
                    Grammar::Json(serde_json::json!({"type": "object"})),
                ));
            }
            Some(ResponseFormat::JsonSchema { json_schema }) => {
                let schema = json_schema.schema.clone().unwrap_or(serde_json::json!({}));
                named.push(("response_format", Grammar::Json(schema)));
            }
        }
        if let Some(so) = &self.structured_outputs {
            let param = "structured_outputs";
            if let Some(json) = &so.json {
                named.push((param, Grammar::Json(schema_value(param, json)?)));
            }
            if let Some(regex) = &so.regex {
                named.push((param, Grammar::Regex(regex.clone())));
            }
            if let Some(choice) = &so.choice {
                named.push((param, Grammar::Choice(choice.clone())));
            }
            if let Some(grammar) = &so.grammar {
                named.push((param, Grammar::Lark(grammar.clone())));
            }
            if so.json_object == Some(true) {
                named.push((param, Grammar::Json(serde_json::json!({"type": "object"}))));
            }
        }
        if let Some(json) = &self.guided_json {
            named.push(("guided_json", Grammar::Json(schema_value("guided_json", json)?)));
        }
        if let Some(regex) = &self.guided_regex {
            named.push(("guided_regex", Grammar::Regex(regex.clone())));
        }
        if let Some(choice) = &self.guided_choice {
            named.push(("guided_choice", Grammar::Choice(choice.clone())));
        }
        if let Some(grammar) = &self.guided_grammar {
            named.push(("guided_grammar", Grammar::Lark(grammar.clone())));
        }
        match named.len() {
            0 => Ok(None),
            1 => {
                let (param, grammar) = named.remove(0);
                grammar.check().map_err(|e| param_error(param, e.to_string()))?;
                Ok(Some(grammar))
            }
            _ => Err(param_error(
                named[1].0,
                format!(
                    "constrains the text a second time (with `{}`); give one constraint",
                    named[0].0
                ),
            )),
        }
    }

    /// The job parameters for these fields, generating at most `max_new_tokens`.
    fn parameters(&self, max_new_tokens: u32) -> Result<GenerationParameters, ParamError> {
        for (param, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            require_neutral(
                param,
                value.is_none_or(|v| v == 0.0),
                "is not supported; only 0 is accepted (try `repetition_penalty`)",
            )?;
        }
        require_neutral(
            "logit_bias",
            absent_or(&self.logit_bias, &[serde_json::json!({})]),
            "is not supported",
        )?;
        let stop = self.stop.as_ref().map(StopInput::to_vec).unwrap_or_default();
        if stop.len() > MAX_STOP_SEQUENCES {
            return Err(param_error(
                "stop",
                format!("at most {MAX_STOP_SEQUENCES} sequences, got {}", stop.len()),
            ));
        }

        // Everything maps 1:1; only the strategy and, for OpenAI's semantics, its defaults differ.
        let mut p = GenerationParameters {
            // OpenAI's own fields.
            max_new_tokens: Some(max_new_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            stop,
            // vLLM's.
            min_p: self.min_p,
            ignore_eos: self.ignore_eos,
            // Ours, as extra fields.
            strategy: self.strategy,
            do_sample: self.do_sample,
            min_new_tokens: self.min_tokens,
            top_k: self.top_k,
            typical_p: self.typical_p,
            repetition_penalty: self.repetition_penalty,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
            penalty_alpha: self.penalty_alpha,
            num_beams: self.num_beams,
            length_penalty: self.length_penalty,
            early_stopping: self.early_stopping,
            grammar: self.grammar()?,
            logprobs: None,
            prompt_logprobs: None,
        };
        if self.strategy.is_none() {
            if self.temperature == Some(0.0) || self.do_sample == Some(false) {
                // OpenAI's greedy decoding. Clients routinely send `top_p`, `min_p` and `seed` along,
                // which cannot change a greedy text; they are dropped rather than refused, once known to
                // be in range: a value the schema refuses is refused at any temperature.
                let sampling = GenerationParameters {
                    strategy: Some(Strategy::Sample),
                    top_p: self.top_p,
                    min_p: self.min_p,
                    ..Default::default()
                };
                sampling.validate().map_err(|e| ParamError::from(&e))?;
                p.strategy = Some(Strategy::Greedy);
                p.temperature = None;
                p.top_p = None;
                p.min_p = None;
                p.seed = None;
                if p.do_sample == Some(false) {
                    p.do_sample = None;
                }
            } else {
                // OpenAI samples by default, at temperature 1 and without a top-k filter (it has none),
                // where transformers would keep the 50 likeliest tokens.
                p.strategy = Some(Strategy::Sample);
                p.do_sample = Some(true);
                p.temperature = Some(self.temperature.unwrap_or(1.0));
                p.top_k = Some(self.top_k.unwrap_or(0));
            }
        }
        Ok(p)
    }
}

impl CompletionRequest {
    /// The job parameters every choice of this request runs with (before [`choice_seed`]); the caller
    /// still validates them. `default_max_tokens` applies when `max_tokens` is absent (OpenAI: 16).
    pub fn parameters(&self, default_max_tokens: u32) -> Result<GenerationParameters, ParamError> {
        require_neutral(
            "best_of",
            self.best_of.is_none_or(|b| b == 1),
            "is not supported; only 1 is accepted (use `n`)",
        )?;
        require_neutral(
            "suffix",
            self.suffix.as_deref().is_none_or(str::is_empty),
            "is not supported (no insertion mode)",
        )?;
        let n = self.n()?;
        let prompts = self.prompt.prompts().len() as u64;
        if prompts * u64::from(n) > u64::from(MAX_CHOICES) {
            return Err(param_error(
                "n",
                format!(
                    "{prompts} prompts times n = {n} asks for {} choices; the limit is {MAX_CHOICES}",
                    prompts * u64::from(n)
                ),
            ));
        }
        let mut p = self
            .shared()
            .parameters(self.max_tokens.unwrap_or(default_max_tokens))?;
        if let Some(n) = self.logprobs {
            p.logprobs = Some(n);
            // OpenAI's `echo` with `logprobs` scores the prompt too (how evaluation harnesses score text).
            p.prompt_logprobs = self.echo().then_some(n);
        }
        Ok(p)
    }

    /// Whether the prompt goes before the generated text.
    pub fn echo(&self) -> bool {
        self.echo.unwrap_or(false)
    }
}

impl ChatCompletionRequest {
    /// The job parameters every choice of this conversation runs with (before [`choice_seed`]); the caller
    /// still validates them. `default_max_tokens` applies when neither `max_tokens` nor
    /// `max_completion_tokens` is given.
    pub fn parameters(&self, default_max_tokens: u32) -> Result<GenerationParameters, ParamError> {
        self.parameters_and_tools(default_max_tokens).map(|(p, _)| p)
    }

    /// [`Self::parameters`], and how the answer makes the tool call the request forces, if any: `tools`
    /// are read once, for both.
    pub fn parameters_and_tools(
        &self,
        default_max_tokens: u32,
    ) -> Result<(GenerationParameters, Option<ToolCalling>), ParamError> {
        if self.top_logprobs.is_some_and(|n| n > 0) && self.logprobs != Some(true) {
            return Err(param_error("top_logprobs", "needs `logprobs: true`"));
        }
        let none = serde_json::json!("none");
        let empty = serde_json::json!([]);
        for (param, value, neutral) in [
            ("functions", &self.functions, &empty),
            ("function_call", &self.function_call, &none),
        ] {
            require_neutral(
                param,
                absent_or(value, std::slice::from_ref(neutral)),
                "is not supported (OpenAI's deprecated function calling; use `tools` and `tool_choice`)",
            )?;
        }
        let forced = crate::tools::forced_call(self.tools.as_ref(), self.tool_choice.as_ref())?;
        let max_tokens = match (self.max_tokens, self.max_completion_tokens) {
            (Some(a), Some(b)) if a != b => {
                return Err(param_error(
                    "max_completion_tokens",
                    format!("is {b} but max_tokens is {a}; give one, or the same value"),
                ));
            }
            (a, b) => a.or(b).unwrap_or(default_max_tokens),
        };
        self.n()?;
        let mut p = self.shared().parameters(max_tokens)?;
        let mut tools = None;
        if let Some((grammar, calling)) = forced {
            if p.grammar.is_some() {
                return Err(param_error(
                    "tool_choice",
                    "forces a tool call, whose arguments are already constrained; drop the other constraint \
                     (`response_format` or vLLM's fields)",
                ));
            }
            p.grammar = Some(grammar);
            tools = Some(calling);
        }
        if self.logprobs == Some(true) {
            p.logprobs = Some(self.top_logprobs.unwrap_or(0));
        }
        Ok((p, tools))
    }
}

/// The seed of choice `choice`: the request's seed plus the choice index, so that `n` sampled choices
/// differ yet the whole answer is reproducible.
pub fn choice_seed(base: Option<u64>, choice: u32) -> Option<u64> {
    base.map(|seed| seed.wrapping_add(u64::from(choice)))
}

/// OpenAI's name for why a choice ended: the end-of-sequence token counts as a natural stop.
pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::Stop => "stop",
    }
}

/// A completion's id, from its first job's id, so that a client's id leads to the job's logs.
pub fn completion_id(job: &JobId) -> String {
    format!("cmpl-{}", job.0.simple())
}

/// A chat completion's id, from its first job's id.
pub fn chat_completion_id(job: &JobId) -> String {
    format!("chatcmpl-{}", job.0.simple())
}

/// `{id, object, created, model, choices, usage}`: what every answer and chunk of the completion routes
/// wraps its choices in, written once for its four uses (whole answers carry the usage; chunks carry it
/// only when asked, `null` until the last).
macro_rules! envelope {
    ($(#[$doc:meta])* $name:ident, $object:literal, $choice:ty, [$(#[$usage_attr:meta])*] $usage:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
        pub struct $name {
            pub id: String,
            #[doc = concat!("`", $object, "`.")]
            #[schema(value_type = String)]
            object: &'static str,
            /// Unix seconds.
            pub created: u64,
            pub model: String,
            pub choices: Vec<$choice>,
            $(#[$usage_attr])*
            pub usage: $usage,
            /// The tier the request ran in: `default` (the interactive lane) or `flex` (the batch lane).
            #[schema(value_type = String)]
            pub service_tier: &'static str,
        }

        impl $name {
            fn envelope(head: &Head, choices: Vec<$choice>, usage: $usage) -> Self {
                Self {
                    id: head.id.clone(),
                    object: $object,
                    created: head.created,
                    model: head.model.clone(),
                    choices,
                    usage,
                    service_tier: head.service_tier,
                }
            }
        }
    };
}

/// What every response and chunk of one request repeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    /// [`service_tier`] of the lane the request's jobs went to.
    pub service_tier: &'static str,
}

/// Token counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }
}

envelope! {
    /// The answer to a completion request.
    Completion, "text_completion", CompletionChoice, [] Usage
}

impl Completion {
    pub fn new(head: &Head, choices: Vec<CompletionChoice>, usage: Usage) -> Self {
        Self::envelope(head, choices, usage)
    }
}

/// One completion choice, whole or (in a chunk) a piece of it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    /// The tokens' log-probabilities when the request asked for them (`logprobs`), else `null`. In a
    /// chunk, those of the tokens the chunk adds (its text may be held back while they go), `text_offset`
    /// running on across the chunks; a choice's last chunk carries none.
    pub logprobs: Option<crate::logprobs::CompletionLogprobs>,
    /// `stop` or `length`; `null` on every chunk but a choice's last.
    #[schema(value_type = Option<String>)]
    pub finish_reason: Option<&'static str>,
}

impl CompletionChoice {
    pub fn new(index: u32, text: impl Into<String>, finish: Option<FinishReason>) -> Self {
        Self {
            index,
            text: text.into(),
            logprobs: None,
            finish_reason: finish.map(finish_reason),
        }
    }
}

envelope! {
    /// One server-sent event of a streamed completion.
    CompletionChunk, "text_completion", CompletionChoice,
    [#[serde(skip_serializing_if = "Option::is_none")] #[schema(value_type = Option<Usage>)]] Option<Option<Usage>>
}

impl CompletionChunk {
    /// A chunk carrying text, with the `usage` [`StreamUsage::on_chunk`] gives it.
    pub fn new(head: &Head, choices: Vec<CompletionChoice>, usage: Option<Option<Usage>>) -> Self {
        Self::envelope(head, choices, usage)
    }

    /// The last chunk when the client asked for usage: no choices, only the counts.
    pub fn usage(head: &Head, usage: Usage) -> Self {
        Self::envelope(head, Vec::new(), Some(Some(usage)))
    }
}

/// The assistant's reply in a chat completion: its text, or (when the request forced a tool call) `null`
/// and the call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct AssistantMessage {
    /// `assistant`.
    #[schema(value_type = String)]
    role: &'static str,
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

impl AssistantMessage {
    pub fn new(content: impl Into<String>) -> Self {
        Self {
            role: "assistant",
            content: Some(content.into()),
            tool_calls: None,
        }
    }

    /// A reply that is a tool call.
    pub fn tool_call(call: ToolCall) -> Self {
        Self {
            role: "assistant",
            content: None,
            tool_calls: Some(vec![call]),
        }
    }
}

envelope! {
    /// The answer to a chat completion request.
    ChatCompletion, "chat.completion", ChatChoice, [] Usage
}

impl ChatCompletion {
    pub fn new(head: &Head, choices: Vec<ChatChoice>, usage: Usage) -> Self {
        Self::envelope(head, choices, usage)
    }
}

/// One chat completion choice.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    /// The generated tokens' log-probabilities when the request asked for them (`logprobs`), else `null`.
    pub logprobs: Option<crate::logprobs::ChatLogprobs>,
    /// `stop` or `length`.
    #[schema(value_type = Option<String>)]
    pub finish_reason: Option<&'static str>,
}

impl ChatChoice {
    pub fn new(index: u32, content: impl Into<String>, finish: FinishReason) -> Self {
        Self {
            index,
            message: AssistantMessage::new(content),
            logprobs: None,
            finish_reason: Some(finish_reason(finish)),
        }
    }

    /// A choice whose text was written as the tool call the request forced: the call, or (a `required`
    /// call cut short, which does not parse) the text.
    pub fn forced(
        index: u32,
        calling: &ToolCalling,
        call_id: String,
        text: &str,
        finish: FinishReason,
    ) -> Self {
        let message = match calling.call(call_id, text) {
            Some(call) => AssistantMessage::tool_call(call),
            None => AssistantMessage::new(text),
        };
        Self {
            index,
            message,
            logprobs: None,
            finish_reason: Some(calling.finish_reason(finish)),
        }
    }
}

/// What a chat chunk adds to a choice: first the role, then pieces of content (or of a forced tool call).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// One choice's part of a chat chunk.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: Delta,
    /// The log-probabilities of the tokens this chunk adds, when the request asked for them (`logprobs`),
    /// else `null`. A chunk whose text is held back (it may begin a stop sequence) may still carry its
    /// tokens' entries; the role chunk and the last chunk carry none.
    pub logprobs: Option<crate::logprobs::ChatLogprobs>,
    /// `stop` or `length` on a choice's last chunk, else `null`.
    #[schema(value_type = Option<String>)]
    pub finish_reason: Option<&'static str>,
}

impl ChatChunkChoice {
    fn with(index: u32, delta: Delta, finish_reason: Option<&'static str>) -> Self {
        Self {
            index,
            delta,
            logprobs: None,
            finish_reason,
        }
    }

    /// A choice's first chunk, as OpenAI sends it: the role and empty content.
    pub fn role(index: u32) -> Self {
        let delta = Delta {
            role: Some("assistant"),
            content: Some(String::new()),
            tool_calls: None,
        };
        Self::with(index, delta, None)
    }

    /// A piece of a choice's content.
    pub fn content(index: u32, text: impl Into<String>) -> Self {
        let delta = Delta {
            content: Some(text.into()),
            ..Delta::default()
        };
        Self::with(index, delta, None)
    }

    /// A chunk that adds nothing but what the caller sets (its tokens' log-probabilities).
    pub fn empty(index: u32) -> Self {
        Self::with(index, Delta::default(), None)
    }

    /// Whether the chunk adds nothing at all, so need not go out.
    pub fn is_empty(&self) -> bool {
        self.delta == Delta::default() && self.logprobs.is_none() && self.finish_reason.is_none()
    }

    /// A piece of a choice's tool call.
    pub fn tool_call(index: u32, piece: ToolCallDelta) -> Self {
        let delta = Delta {
            tool_calls: Some(vec![piece]),
            ..Delta::default()
        };
        Self::with(index, delta, None)
    }

    /// A choice's last chunk: an empty delta and why it ended (OpenAI's name for it, [`finish_reason`] or
    /// a forced tool call's).
    pub fn finish(index: u32, reason: &'static str) -> Self {
        Self::with(index, Delta::default(), Some(reason))
    }
}

envelope! {
    /// One server-sent event of a streamed chat completion.
    ChatCompletionChunk, "chat.completion.chunk", ChatChunkChoice,
    [#[serde(skip_serializing_if = "Option::is_none")] #[schema(value_type = Option<Usage>)]] Option<Option<Usage>>
}

impl ChatCompletionChunk {
    /// A chunk carrying deltas, with the `usage` [`StreamUsage::on_chunk`] gives it.
    pub fn new(head: &Head, choices: Vec<ChatChunkChoice>, usage: Option<Option<Usage>>) -> Self {
        Self::envelope(head, choices, usage)
    }

    /// The last chunk when the client asked for usage: no choices, only the counts.
    pub fn usage(head: &Head, usage: Usage) -> Self {
        Self::envelope(head, Vec::new(), Some(Some(usage)))
    }
}

/// `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ModelList {
    /// `list`.
    #[schema(value_type = String)]
    object: &'static str,
    pub data: Vec<Model>,
}

impl ModelList {
    pub fn new(data: Vec<Model>) -> Self {
        Self { object: "list", data }
    }
}

/// A model clients may name in `model`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Model {
    pub id: String,
    /// `model`.
    #[schema(value_type = String)]
    object: &'static str,
    /// Unix seconds.
    pub created: u64,
    pub owned_by: String,
}

impl Model {
    pub fn new(id: impl Into<String>, created: u64, owned_by: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            object: "model",
            created,
            owned_by: owned_by.into(),
        }
    }
}

/// The status an OpenAI client expects: OpenAI answers invalid parameters with 400, where the gateway's
/// own API says 422.
pub fn status(status: StatusCode) -> StatusCode {
    if status == StatusCode::UNPROCESSABLE_ENTITY {
        StatusCode::BAD_REQUEST
    } else {
        status
    }
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct OpenAiError {
    pub error: OpenAiErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct OpenAiErrorDetail {
    pub message: String,
    pub r#type: OpenAiErrorType,
    /// The request field to blame, when one is.
    pub param: Option<String>,
    /// The gateway's stable error code.
    #[schema(schema_with = crate::contract_schema::error_code)]
    pub code: ErrorCode,
}

/// OpenAI's class of an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OpenAiErrorType {
    InvalidRequestError,
    AuthenticationError,
    RateLimitError,
    ServerError,
}

/// An error for `status` in OpenAI's shape, where `code` is the gateway's stable code and `type` OpenAI's
/// class of error for `status`.
pub fn error_body(status: StatusCode, code: ErrorCode, message: &str, param: Option<&str>) -> OpenAiError {
    let r#type = match status.as_u16() {
        401 => OpenAiErrorType::AuthenticationError,
        429 => OpenAiErrorType::RateLimitError,
        500..=599 => OpenAiErrorType::ServerError,
        _ => OpenAiErrorType::InvalidRequestError,
    };
    OpenAiError {
        error: OpenAiErrorDetail {
            message: message.to_owned(),
            r#type,
            param: param.map(str::to_owned),
            code,
        },
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn completion(body: serde_json::Value) -> CompletionRequest {
        serde_json::from_value(body).unwrap()
    }

    fn chat(body: serde_json::Value) -> ChatCompletionRequest {
        serde_json::from_value(body).unwrap()
    }

    fn head() -> Head {
        Head {
            id: "cmpl-1".into(),
            created: 1_700_000_000,
            model: "gpt-j-6b".into(),
            service_tier: "default",
        }
    }

    #[test]
    fn temperature_zero_means_greedy_and_drops_what_greedy_ignores() {
        let p = completion(json!({"model": "m", "prompt": "hi", "temperature": 0, "top_p": 1, "seed": 3}))
            .parameters(DEFAULT_COMPLETION_MAX_TOKENS)
            .unwrap();
        assert_eq!(
            p,
            GenerationParameters {
                strategy: Some(Strategy::Greedy),
                max_new_tokens: Some(16),
                ..Default::default()
            }
        );
        p.validate().unwrap();
    }

    #[test]
    fn what_greedy_drops_must_still_be_in_range() {
        for (field, value) in [("top_p", json!(1.5)), ("min_p", json!(2)), ("top_p", json!(0))] {
            let mut body = json!({"model": "m", "prompt": "hi", "temperature": 0});
            body[field] = value;
            assert_eq!(completion(body).parameters(16).unwrap_err().param, field);
        }
    }

    #[test]
    fn do_sample_false_without_a_strategy_means_greedy() {
        let p = completion(json!({"model": "m", "prompt": "hi", "do_sample": false}))
            .parameters(16)
            .unwrap();
        assert_eq!(p.strategy, Some(Strategy::Greedy));
        assert_eq!(p.do_sample, None);
    }

    #[test]
    fn by_default_openai_samples_at_temperature_one_without_a_top_k_filter() {
        let p = completion(json!({"model": "m", "prompt": "hi"}))
            .parameters(16)
            .unwrap();
        assert_eq!(
            p,
            GenerationParameters {
                strategy: Some(Strategy::Sample),
                do_sample: Some(true),
                max_new_tokens: Some(16),
                temperature: Some(1.0),
                top_k: Some(0),
                ..Default::default()
            }
        );
        p.validate().unwrap();
    }

    #[test]
    fn sampling_passes_temperature_top_p_top_k_seed_and_min_tokens_through() {
        let p = chat(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 7, "min_tokens": 2, "max_tokens": 30,
        }))
        .parameters(50)
        .unwrap();
        assert_eq!(p.strategy, Some(Strategy::Sample));
        assert_eq!(p.temperature, Some(0.7));
        assert_eq!(p.top_p, Some(0.9));
        assert_eq!(p.top_k, Some(40));
        assert_eq!(p.seed, Some(7));
        assert_eq!(p.min_new_tokens, Some(2));
        assert_eq!(p.max_new_tokens, Some(30));
    }

    #[test]
    fn an_explicit_strategy_wins_and_the_extensions_map_one_to_one() {
        let p = completion(json!({
            "model": "m", "prompt": "hi", "strategy": "contrastive", "penalty_alpha": 0.6, "top_k": 4,
            "repetition_penalty": 1.2, "no_repeat_ngram_size": 3, "max_tokens": 20,
        }))
        .parameters(16)
        .unwrap();
        assert_eq!(
            p,
            GenerationParameters {
                strategy: Some(Strategy::Contrastive),
                max_new_tokens: Some(20),
                penalty_alpha: Some(0.6),
                top_k: Some(4),
                repetition_penalty: Some(1.2),
                no_repeat_ngram_size: Some(3),
                ..Default::default()
            }
        );
        let beam = completion(json!({
            "model": "m", "prompt": "hi", "strategy": "beam", "num_beams": 3, "length_penalty": 0.5,
            "early_stopping": true,
        }))
        .parameters(16)
        .unwrap();
        assert_eq!(
            (beam.num_beams, beam.length_penalty, beam.early_stopping),
            (Some(3), Some(0.5), Some(true))
        );
    }

    /// Whether `body` is a request the gateway takes: it parses, and its parameters pass validation.
    fn accepted<R: serde::de::DeserializeOwned>(
        body: serde_json::Value,
        parameters: impl Fn(&R) -> Result<GenerationParameters, ParamError>,
    ) -> bool {
        serde_json::from_value::<R>(body)
            .ok()
            .and_then(|r| parameters(&r).ok())
            .is_some_and(|p| p.validate().is_ok())
    }

    /// The numeric bounds `schema` states, each as `(field, value at the bound, whether the bound itself is
    /// allowed, direction outwards)`.
    fn bounds(schema: &serde_json::Value) -> Vec<(String, f64, bool, f64)> {
        let mut out = Vec::new();
        for (field, s) in schema["properties"].as_object().unwrap() {
            for (keyword, inclusive, outwards) in [
                ("minimum", true, -1.0),
                ("exclusiveMinimum", false, -1.0),
                ("maximum", true, 1.0),
                ("exclusiveMaximum", false, 1.0),
            ] {
                // A bound past 2^53 is an integer type's own (seed's u64::MAX), which serde enforces and
                // a test in f64 cannot step across.
                if let Some(bound) = s.get(keyword).and_then(serde_json::Value::as_f64)
                    && bound.abs() < 2f64.powi(53)
                {
                    out.push((field.clone(), bound, inclusive, outwards));
                }
            }
        }
        out
    }

    #[test]
    fn every_bound_the_request_schemas_state_is_the_one_validation_enforces() {
        use utoipa::PartialSchema;
        // Each parameter with the strategy that reads it (none: OpenAI's default sampling, where
        // temperature 0 means greedy), and `max_tokens` high enough for `min_tokens` to reach its bound.
        let body = |base: serde_json::Value, field: &str, value: f64| {
            let mut body = base;
            let strategy = match field {
                "penalty_alpha" => Some("contrastive"),
                "num_beams" | "length_penalty" => Some("beam"),
                "top_k" => Some("sample"),
                _ => None,
            };
            if let Some(s) = strategy {
                body["strategy"] = json!(s);
            }
            if field == "min_tokens" {
                body["max_tokens"] = json!(shared::params::MAX_NEW_TOKENS_LIMIT);
            }
            // Alternatives are asked for with log-probabilities, at the temperature that reports them.
            if field == "top_logprobs" {
                body["logprobs"] = json!(true);
            }
            body[field] = if value.fract() == 0.0 {
                json!(value as i64)
            } else {
                json!(value)
            };
            body
        };
        let cases = [
            (
                serde_json::to_value(CompletionRequest::schema()).unwrap(),
                json!({"model": "m", "prompt": "hi"}),
                true,
            ),
            (
                serde_json::to_value(ChatCompletionRequest::schema()).unwrap(),
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
                false,
            ),
        ];
        for (schema, base, completion) in cases {
            // The route refuses a timeout out of range before it reads the parameters.
            let timeout_ok = |t: Option<f64>| crate::deadline::timeout(t, &Default::default()).is_ok();
            let takes = |body: serde_json::Value| {
                if completion {
                    accepted::<CompletionRequest>(body, |r| {
                        r.parameters(16).and_then(|p| {
                            timeout_ok(r.timeout_s())
                                .then_some(p)
                                .ok_or_else(|| param_error("timeout_s", "out of range"))
                        })
                    })
                } else {
                    accepted::<ChatCompletionRequest>(body, |r| {
                        r.parameters(50).and_then(|p| {
                            timeout_ok(r.timeout_s())
                                .then_some(p)
                                .ok_or_else(|| param_error("timeout_s", "out of range"))
                        })
                    })
                }
            };
            let bounds = bounds(&schema);
            assert!(bounds.len() > 15, "{schema}");
            for (field, bound, inclusive, outwards) in bounds {
                let step = if schema["properties"][&field]["type"]
                    .to_string()
                    .contains("integer")
                {
                    1.0
                } else {
                    0.25
                };
                let inside = if inclusive { bound } else { bound - outwards * step };
                let outside = if inclusive { bound + outwards * step } else { bound };
                assert!(
                    takes(body(base.clone(), &field, inside)),
                    "{field} = {inside} is within the schema's bound and must be accepted"
                );
                assert!(
                    !takes(body(base.clone(), &field, outside)),
                    "{field} = {outside} is beyond the schema's bound and must be refused"
                );
            }
        }
    }

    #[test]
    fn the_default_max_tokens_is_the_callers() {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(chat(body).parameters(50).unwrap().max_new_tokens, Some(50));
    }

    #[test]
    fn stop_takes_a_string_or_an_array_of_at_most_four() {
        let one = completion(json!({"model": "m", "prompt": "hi", "stop": "\n"}));
        assert_eq!(one.parameters(16).unwrap().stop, vec!["\n".to_owned()]);
        let two = completion(json!({"model": "m", "prompt": "hi", "stop": ["a", "b"]}));
        assert_eq!(
            two.parameters(16).unwrap().stop,
            vec!["a".to_owned(), "b".to_owned()]
        );
        let five = completion(json!({"model": "m", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}));
        assert_eq!(five.parameters(16).unwrap_err().param, "stop");
    }

    #[test]
    fn n_is_one_to_eight_and_counts_every_prompt() {
        assert_eq!(completion(json!({"model": "m", "prompt": "hi"})).n().unwrap(), 1);
        assert!(
            completion(json!({"model": "m", "prompt": "hi", "n": 8}))
                .parameters(16)
                .is_ok()
        );
        for n in [0, 9] {
            let err = completion(json!({"model": "m", "prompt": "hi", "n": n}))
                .parameters(16)
                .unwrap_err();
            assert_eq!(err.param, "n");
        }
        let batch = completion(json!({"model": "m", "prompt": ["a", "b", "c"], "n": 3}));
        assert_eq!(batch.parameters(16).unwrap_err().param, "n");
        let fits = completion(json!({"model": "m", "prompt": ["a", "b", "c", "d"], "n": 2}));
        assert!(fits.parameters(16).is_ok());
        let chat_n = chat(json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 9}));
        assert_eq!(chat_n.parameters(50).unwrap_err().param, "n");
    }

    #[test]
    fn choice_seeds_differ_per_choice_and_stay_reproducible() {
        assert_eq!(choice_seed(Some(10), 0), Some(10));
        assert_eq!(choice_seed(Some(10), 3), Some(13));
        assert_eq!(choice_seed(Some(u64::MAX), 1), Some(0));
        assert_eq!(choice_seed(None, 3), None);
    }

    #[test]
    fn unsupported_completion_fields_are_refused_by_name_unless_neutral() {
        let refused = [
            ("best_of", json!(2)),
            ("suffix", json!("end")),
            ("logit_bias", json!({"50256": -100})),
            ("presence_penalty", json!(0.5)),
            ("frequency_penalty", json!(-1)),
        ];
        for (param, value) in refused {
            let mut body = json!({"model": "m", "prompt": "hi"});
            body[param] = value;
            let err = completion(body).parameters(16).unwrap_err();
            assert_eq!(err.param, param, "{err}");
        }
        let neutral = json!({
            "model": "m", "prompt": "hi", "logprobs": null, "best_of": 1, "suffix": "", "logit_bias": {},
            "presence_penalty": 0, "frequency_penalty": 0.0,
        });
        assert!(completion(neutral).parameters(16).is_ok());
    }

    #[test]
    fn unsupported_chat_fields_are_refused_by_name_unless_neutral() {
        let refused = [
            ("top_logprobs", json!(2)),
            ("tools", json!([{"type": "retrieval"}])),
            ("tool_choice", json!("required")),
            ("functions", json!([{"name": "f"}])),
            ("function_call", json!({"name": "f"})),
            ("presence_penalty", json!(1)),
        ];
        for (param, value) in refused {
            let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
            body[param] = value;
            let err = chat(body).parameters(50).unwrap_err();
            assert_eq!(err.param, param, "{err}");
        }
        let neutral = json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": false,
            "tools": [], "tool_choice": "none", "functions": null, "function_call": "none",
            "response_format": {"type": "text"},
        });
        assert!(chat(neutral).parameters(50).is_ok());
    }

    #[test]
    fn a_forced_tool_call_is_the_jobs_grammar_and_no_second_constraint_may_join_it() {
        let tools =
            json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": tools,
            "tool_choice": {"type": "function", "function": {"name": "f"}}});
        let p = chat(body.clone()).parameters(50).unwrap();
        assert_eq!(p.grammar, Some(Grammar::Json(json!({"type": "object"}))));
        let mut both = body;
        both["response_format"] = json!({"type": "json_object"});
        let err = chat(both).parameters(50).unwrap_err();
        assert_eq!(err.param, "tool_choice", "{err}");
        // `tool_choice: none` leaves the text free, whatever the tools.
        let free = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": tools,
            "tool_choice": "none"});
        assert_eq!(chat(free).parameters(50).unwrap().grammar, None);
    }

    #[test]
    fn a_forced_call_answers_with_tool_calls_and_null_content() {
        let calling = ToolCalling::Named("f".into());
        let choice = ChatChoice::forced(0, &calling, "call_1".into(), r#"{"a":1}"#, FinishReason::Eos);
        assert_eq!(
            serde_json::to_value(&choice).unwrap(),
            json!({"index": 0, "logprobs": null, "finish_reason": "stop", "message": {"role": "assistant",
                "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "f", "arguments": "{\"a\":1}"}}]}})
        );
        // A `required` call cut short does not parse: its text is the answer, and `length` says why.
        let cut = ChatChoice::forced(
            0,
            &ToolCalling::Required,
            "call_2".into(),
            r#"{"name": "#,
            FinishReason::Length,
        );
        assert_eq!(cut.message, AssistantMessage::new(r#"{"name": "#));
        assert_eq!(cut.finish_reason, Some("length"));
    }

    #[test]
    fn openai_and_vllm_constraints_become_the_jobs_grammar() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let messages = json!([{"role": "user", "content": "hi"}]);
        let cases = [
            (
                json!({"response_format": {"type": "json_object"}}),
                Grammar::Json(json!({"type": "object"})),
            ),
            (
                json!({"response_format": {"type": "json_schema",
                    "json_schema": {"name": "x", "schema": schema, "strict": true}}}),
                Grammar::Json(schema.clone()),
            ),
            (
                json!({"structured_outputs": {"json": schema}}),
                Grammar::Json(schema.clone()),
            ),
            (
                json!({"structured_outputs": {"json": schema.to_string()}}),
                Grammar::Json(schema.clone()),
            ),
            (
                json!({"structured_outputs": {"regex": "a+"}}),
                Grammar::Regex("a+".into()),
            ),
            (
                json!({"structured_outputs": {"choice": ["x", "y"]}}),
                Grammar::Choice(vec!["x".into(), "y".into()]),
            ),
            (
                json!({"structured_outputs": {"grammar": "start: \"a\""}}),
                Grammar::Lark("start: \"a\"".into()),
            ),
            (json!({"guided_json": schema}), Grammar::Json(schema.clone())),
            (
                json!({"guided_regex": "b+", "guided_decoding_backend": "xgrammar"}),
                Grammar::Regex("b+".into()),
            ),
            (json!({"guided_choice": ["z"]}), Grammar::Choice(vec!["z".into()])),
        ];
        for (extra, grammar) in cases {
            let mut body = json!({"model": "m", "messages": messages});
            let mut prompt = json!({"model": "m", "prompt": "hi"});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
                prompt[k] = v.clone();
            }
            assert_eq!(
                chat(body).parameters(50).unwrap().grammar,
                Some(grammar.clone()),
                "{extra}"
            );
            assert_eq!(
                completion(prompt).parameters(16).unwrap().grammar,
                Some(grammar),
                "{extra}"
            );
        }
        let plain = chat(json!({"model": "m", "messages": messages, "response_format": {"type": "text"}}));
        assert_eq!(plain.parameters(50).unwrap().grammar, None);
    }

    #[test]
    fn logprobs_map_to_the_jobs_and_echo_scores_the_prompt() {
        let p = completion(json!({"model": "m", "prompt": "hi", "logprobs": 3, "temperature": 0}))
            .parameters(16)
            .unwrap();
        assert_eq!((p.logprobs, p.prompt_logprobs), (Some(3), None));
        let p =
            completion(json!({"model": "m", "prompt": "hi", "logprobs": 1, "echo": true, "max_tokens": 0}))
                .parameters(16)
                .unwrap();
        assert_eq!(
            (p.logprobs, p.prompt_logprobs, p.max_new_tokens),
            (Some(1), Some(1), Some(0))
        );
        assert!(p.validate().is_ok(), "scoring a prompt generates nothing");
        let messages = json!([{"role": "user", "content": "hi"}]);
        let p = chat(json!({"model": "m", "messages": messages, "logprobs": true, "top_logprobs": 4}))
            .parameters(50)
            .unwrap();
        assert_eq!(p.logprobs, Some(4));
        let p = chat(json!({"model": "m", "messages": messages, "logprobs": true}))
            .parameters(50)
            .unwrap();
        assert_eq!(p.logprobs, Some(0));
        let alone = chat(json!({"model": "m", "messages": messages, "top_logprobs": 2}));
        assert_eq!(alone.parameters(50).unwrap_err().param, "top_logprobs");
        let streamed = chat(json!({"model": "m", "messages": messages, "logprobs": true, "stream": true}));
        assert_eq!(streamed.parameters(50).unwrap().logprobs, Some(0), "streamed too");
        let streamed =
            completion(json!({"model": "m", "prompt": "hi", "logprobs": 2, "echo": true, "stream": true}));
        let p = streamed.parameters(16).unwrap();
        assert_eq!((p.logprobs, p.prompt_logprobs), (Some(2), Some(2)));
        let no_echo = completion(json!({"model": "m", "prompt": "hi", "max_tokens": 0}));
        assert!(
            no_echo.parameters(16).unwrap().validate().is_err(),
            "max_tokens 0 scores only with echo"
        );
    }

    #[test]
    fn two_constraints_or_a_broken_one_are_refused_by_name() {
        let two = chat(
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"}, "guided_regex": "a"}),
        );
        assert_eq!(two.parameters(50).unwrap_err().param, "guided_regex");
        let empty = completion(json!({"model": "m", "prompt": "hi", "structured_outputs": {"choice": []}}));
        assert_eq!(empty.parameters(16).unwrap_err().param, "structured_outputs");
        let text = completion(json!({"model": "m", "prompt": "hi", "guided_json": "{not json"}));
        assert_eq!(text.parameters(16).unwrap_err().param, "guided_json");
        let unknown = serde_json::from_value::<CompletionRequest>(
            json!({"model": "m", "prompt": "hi", "structured_outputs": {"structural_tag": "x"}}),
        );
        assert!(unknown.is_err());
    }

    #[test]
    fn max_tokens_and_max_completion_tokens_must_agree() {
        let messages = json!([{"role": "user", "content": "hi"}]);
        let newer = chat(json!({"model": "m", "messages": messages, "max_completion_tokens": 9}));
        assert_eq!(newer.parameters(50).unwrap().max_new_tokens, Some(9));
        let same =
            chat(json!({"model": "m", "messages": messages, "max_tokens": 9, "max_completion_tokens": 9}));
        assert_eq!(same.parameters(50).unwrap().max_new_tokens, Some(9));
        let differ =
            chat(json!({"model": "m", "messages": messages, "max_tokens": 9, "max_completion_tokens": 8}));
        assert_eq!(differ.parameters(50).unwrap_err().param, "max_completion_tokens");
    }

    #[test]
    fn unknown_fields_are_refused_by_serde_naming_them() {
        let err =
            serde_json::from_value::<CompletionRequest>(json!({"model": "m", "prompt": "hi", "foo": 1}))
                .unwrap_err();
        assert!(err.to_string().starts_with("unknown field `foo`"), "{err}");
        let err = serde_json::from_value::<ChatCompletionRequest>(json!({
            "model": "m", "messages": [], "echo": true,
        }))
        .unwrap_err();
        assert!(err.to_string().starts_with("unknown field `echo`"), "{err}");
    }

    #[test]
    fn a_type_error_in_a_shared_field_names_the_field() {
        let body = br#"{"model": "m", "prompt": "hi", "temperature": "hot"}"#;
        let de = &mut serde_json::Deserializer::from_slice(body);
        let err = serde_path_to_error::deserialize::<_, CompletionRequest>(de).unwrap_err();
        assert_eq!(err.path().to_string(), "temperature");
    }

    #[test]
    fn prompts_are_a_string_or_a_non_empty_array_of_strings() {
        let one = completion(json!({"model": "m", "prompt": "hi"}));
        assert_eq!(one.prompt.prompts(), ["hi".to_owned()]);
        let many = completion(json!({"model": "m", "prompt": ["a", "b"]}));
        assert_eq!(many.prompt.prompts(), ["a".to_owned(), "b".to_owned()]);
        let empty = serde_json::from_value::<CompletionRequest>(json!({"model": "m", "prompt": []}));
        assert!(
            empty
                .unwrap_err()
                .to_string()
                .contains("must not be an empty array")
        );
        let tokens = serde_json::from_value::<CompletionRequest>(json!({"model": "m", "prompt": 50256}));
        assert!(
            tokens
                .unwrap_err()
                .to_string()
                .contains("token ids are not supported")
        );
    }

    #[test]
    fn usage_is_requested_only_for_streams_and_in_every_chunk_only_with_include_usage() {
        let body = json!({"model": "m", "prompt": "hi", "stream_options": {"include_usage": true}});
        assert_eq!(completion(body.clone()).stream_usage(), StreamUsage::Off);
        let mut streamed = body;
        streamed["stream"] = json!(true);
        let r = completion(streamed.clone());
        assert!(r.stream());
        assert_eq!(r.stream_usage(), StreamUsage::Last);
        streamed["stream_options"]["continuous_usage_stats"] = json!(true);
        assert_eq!(
            completion(streamed.clone()).stream_usage(),
            StreamUsage::Continuous
        );
        // As vLLM: continuous usage is a refinement of include_usage, nothing without it.
        streamed["stream_options"]["include_usage"] = json!(false);
        assert_eq!(completion(streamed).stream_usage(), StreamUsage::Off);
        let usage = Usage::new(3, 2);
        assert_eq!(StreamUsage::Off.on_chunk(usage), None);
        assert_eq!(StreamUsage::Last.on_chunk(usage), Some(None));
        assert_eq!(StreamUsage::Continuous.on_chunk(usage), Some(Some(usage)));
    }

    /// Fields that change nothing here, each with a value a client sends: accepted, and the job is the one
    /// the request makes without them.
    const IGNORED: &[(&str, &str)] = &[
        ("user", r#""user-1234""#),
        ("metadata", r#"{"run": "nightly", "team": "eval"}"#),
        ("store", "false"),
        ("store", "true"),
        ("service_tier", r#""auto""#),
        ("safety_identifier", r#""hash-of-user""#),
        ("prompt_cache_key", r#""session-7""#),
        ("parallel_tool_calls", "false"),
        ("reasoning_effort", r#""low""#),
        ("logit_bias", "{}"),
        ("presence_penalty", "0"),
        ("frequency_penalty", "0.0"),
        ("stream_options", r#"{"include_usage": false}"#),
    ];

    #[test]
    fn harmless_fields_are_accepted_and_ignored_on_both_routes() {
        let completion_base = json!({"model": "m", "prompt": "hi"});
        let chat_base = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let plain_completion = completion(completion_base.clone()).parameters(16).unwrap();
        let plain_chat = chat(chat_base.clone()).parameters(50).unwrap();
        for (field, value) in IGNORED {
            let value: serde_json::Value = serde_json::from_str(value).unwrap();
            let mut body = completion_base.clone();
            body[field] = value.clone();
            let parsed = serde_json::from_value::<CompletionRequest>(body)
                .unwrap_or_else(|e| panic!("completions refused `{field}`: {e}"));
            assert_eq!(parsed.parameters(16).unwrap(), plain_completion, "{field}");
            let mut body = chat_base.clone();
            body[field] = value;
            let parsed = serde_json::from_value::<ChatCompletionRequest>(body)
                .unwrap_or_else(|e| panic!("chat refused `{field}`: {e}"));
            assert_eq!(parsed.parameters(50).unwrap(), plain_chat, "{field}");
        }
    }

    #[test]
    fn an_ignored_field_of_the_wrong_type_is_still_refused_naming_it() {
        for (field, value) in [
            ("store", json!("yes")),
            ("metadata", json!([1])),
            ("user", json!(7)),
        ] {
            let mut body = json!({"model": "m", "prompt": "hi"});
            body[field] = value;
            let bytes = serde_json::to_vec(&body).unwrap();
            let de = &mut serde_json::Deserializer::from_slice(&bytes);
            let err = serde_path_to_error::deserialize::<_, CompletionRequest>(de).unwrap_err();
            assert_eq!(err.path().to_string(), field);
        }
    }

    #[test]
    fn ignore_eos_and_min_p_are_honoured_as_vllm_defines_them() {
        let p = completion(json!({"model": "m", "prompt": "hi", "ignore_eos": true, "min_p": 0.05}))
            .parameters(16)
            .unwrap();
        assert_eq!((p.ignore_eos, p.min_p), (Some(true), Some(0.05)));
        let plan = p.validate().unwrap();
        assert!(plan.ignore_eos);
        assert!(matches!(plan.decoding, shared::Decoding::Sample { min_p: Some(m), .. } if m == 0.05));
        // Greedy (temperature 0): min_p cannot change the text and is dropped; ignore_eos still holds.
        let greedy = chat(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
            "min_p": 0.1, "ignore_eos": true,
        }))
        .parameters(50)
        .unwrap();
        assert_eq!(greedy.min_p, None);
        assert!(greedy.validate().unwrap().ignore_eos);
        let err = completion(json!({"model": "m", "prompt": "hi", "min_p": 2}))
            .parameters(16)
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(ParamError::from(&err).param, "min_p");
    }

    #[test]
    fn our_parameter_names_in_messages_become_openais() {
        assert_eq!(param_name("max_new_tokens"), "max_tokens");
        assert_eq!(param_name("min_new_tokens"), "min_tokens");
        assert_eq!(param_name("top_p"), "top_p");
        assert_eq!(
            in_openai_terms("the prompt has 4 tokens; with max_new_tokens 2045 that exceeds the context"),
            "the prompt has 4 tokens; with max_tokens 2045 that exceeds the context"
        );
        assert_eq!(
            in_openai_terms("invalid `min_new_tokens`: must not exceed max_new_tokens (5), got 6"),
            "invalid `min_tokens`: must not exceed max_tokens (5), got 6"
        );
    }

    #[test]
    fn validation_errors_name_openai_parameters() {
        let p = completion(json!({"model": "m", "prompt": "hi", "max_tokens": 0}))
            .parameters(16)
            .unwrap();
        let err = ParamError::from(&p.validate().unwrap_err());
        assert_eq!(err.param, "max_tokens");
    }

    #[test]
    fn service_tiers_pick_a_lane_and_an_unknown_one_is_refused_by_name() {
        let lane = |tier: serde_json::Value| {
            completion(json!({"model": "m", "prompt": "hi", "service_tier": tier})).lane()
        };
        assert_eq!(lane(json!("auto")).unwrap(), None);
        assert_eq!(lane(json!("default")).unwrap(), None);
        assert_eq!(lane(json!(null)).unwrap(), None);
        assert_eq!(lane(json!("flex")).unwrap(), Some(Lane::Batch));
        assert_eq!(lane(json!("priority")).unwrap(), Some(Lane::Interactive));
        assert_eq!(lane(json!("gold")).unwrap_err().param, "service_tier");
        assert_eq!(service_tier(Lane::Batch), "flex");
        assert_eq!(service_tier(Lane::Interactive), "default");
    }

    #[test]
    fn a_completion_serializes_with_null_logprobs_and_usage() {
        let body = Completion::new(
            &head(),
            vec![CompletionChoice::new(0, " there", Some(FinishReason::Eos))],
            Usage::new(2, 1),
        );
        assert_eq!(
            serde_json::to_value(body).unwrap(),
            json!({
                "id": "cmpl-1", "object": "text_completion", "created": 1_700_000_000, "model": "gpt-j-6b", "service_tier": "default",
                "choices": [{"index": 0, "text": " there", "logprobs": null, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
            })
        );
    }

    #[test]
    fn a_chat_completion_serializes_the_assistant_message() {
        let body = ChatCompletion::new(
            &head(),
            vec![ChatChoice::new(0, "Hi.", FinishReason::Length)],
            Usage::new(5, 2),
        );
        assert_eq!(
            serde_json::to_value(body).unwrap(),
            json!({
                "id": "cmpl-1", "object": "chat.completion", "created": 1_700_000_000, "model": "gpt-j-6b", "service_tier": "default",
                "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": "Hi."},
                    "logprobs": null, "finish_reason": "length",
                }],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
            })
        );
    }

    #[test]
    fn completion_chunks_omit_usage_unless_asked_and_then_say_null_until_the_usage_chunk() {
        let piece = || vec![CompletionChoice::new(0, "Hi", None)];
        let envelope = json!({"id": "cmpl-1", "object": "text_completion", "created": 1_700_000_000,
            "model": "gpt-j-6b", "service_tier": "default"});
        let with = |extra: serde_json::Value| {
            let mut v = envelope.clone();
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v
        };
        let choices = json!([{"index": 0, "text": "Hi", "logprobs": null, "finish_reason": null}]);
        let so_far = Usage::new(3, 1);
        let chunk = |usage: StreamUsage| {
            serde_json::to_value(CompletionChunk::new(&head(), piece(), usage.on_chunk(so_far))).unwrap()
        };
        assert_eq!(chunk(StreamUsage::Off), with(json!({"choices": choices})));
        assert_eq!(
            chunk(StreamUsage::Last),
            with(json!({"choices": choices, "usage": null}))
        );
        assert_eq!(
            chunk(StreamUsage::Continuous),
            with(json!({"choices": choices,
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}))
        );
        assert_eq!(
            serde_json::to_value(CompletionChunk::usage(&head(), Usage::new(3, 4))).unwrap(),
            with(json!({"choices": [],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}))
        );
    }

    #[test]
    fn chat_chunks_send_the_role_then_content_then_an_empty_delta_with_the_finish_reason() {
        let chunk = |choice: ChatChunkChoice| {
            serde_json::to_value(ChatCompletionChunk::new(&head(), vec![choice], Some(None))).unwrap()
        };
        let envelope = |choice: serde_json::Value| {
            json!({"id": "cmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000,
                "model": "gpt-j-6b", "service_tier": "default", "choices": [choice], "usage": null})
        };
        assert_eq!(
            chunk(ChatChunkChoice::role(0)),
            envelope(json!({"index": 0, "delta": {"role": "assistant", "content": ""},
                "logprobs": null, "finish_reason": null}))
        );
        assert_eq!(
            chunk(ChatChunkChoice::content(0, "Hi")),
            envelope(
                json!({"index": 0, "delta": {"content": "Hi"}, "logprobs": null, "finish_reason": null})
            )
        );
        assert_eq!(
            chunk(ChatChunkChoice::finish(0, finish_reason(FinishReason::Stop))),
            envelope(json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}))
        );
        let without_usage = serde_json::to_value(ChatCompletionChunk::new(
            &head(),
            vec![ChatChunkChoice::role(0)],
            None,
        ))
        .unwrap();
        assert!(without_usage.get("usage").is_none());
        assert_eq!(
            serde_json::to_value(ChatCompletionChunk::usage(&head(), Usage::new(1, 2))).unwrap(),
            json!({"id": "cmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000,
                "model": "gpt-j-6b", "service_tier": "default", "choices": [],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})
        );
    }

    #[test]
    fn the_end_of_sequence_token_and_stop_sequences_both_finish_as_stop() {
        assert_eq!(finish_reason(FinishReason::Eos), "stop");
        assert_eq!(finish_reason(FinishReason::Stop), "stop");
        assert_eq!(finish_reason(FinishReason::Length), "length");
    }

    #[test]
    fn ids_derive_from_the_first_jobs_id() {
        let job: JobId = "67e55044-10b1-426f-9247-bb680e5fe0c8".parse().unwrap();
        assert_eq!(completion_id(&job), "cmpl-67e5504410b1426f9247bb680e5fe0c8");
        assert_eq!(
            chat_completion_id(&job),
            "chatcmpl-67e5504410b1426f9247bb680e5fe0c8"
        );
    }

    #[test]
    fn the_model_list_has_openais_shape() {
        let list = ModelList::new(vec![Model::new("gpt-j-6b", 1_700_000_000, "eleutherai")]);
        assert_eq!(
            serde_json::to_value(list).unwrap(),
            json!({"object": "list", "data": [
                {"id": "gpt-j-6b", "object": "model", "created": 1_700_000_000, "owned_by": "eleutherai"}]})
        );
    }

    #[test]
    fn errors_have_openais_shape_with_the_stable_code() {
        let json = |body: OpenAiError| serde_json::to_value(body).unwrap();
        assert_eq!(
            json(error_body(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::InvalidParameter,
                "invalid `n`: must be in [1, 8], got 9",
                Some("n"),
            )),
            json!({"error": {"message": "invalid `n`: must be in [1, 8], got 9",
                "type": "invalid_request_error", "param": "n", "code": "invalid_parameter"}})
        );
        let unavailable = json(error_body(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "down",
            None,
        ));
        assert_eq!(
            unavailable,
            json!({"error": {"message": "down", "type": "server_error", "param": null, "code": "unavailable"}})
        );
        let kind =
            |s: StatusCode| json(error_body(s, ErrorCode::Internal, "", None))["error"]["type"].clone();
        assert_eq!(kind(StatusCode::UNAUTHORIZED), "authentication_error");
        assert_eq!(kind(StatusCode::TOO_MANY_REQUESTS), "rate_limit_error");
        assert_eq!(kind(StatusCode::NOT_FOUND), "invalid_request_error");
        assert_eq!(kind(StatusCode::PAYLOAD_TOO_LARGE), "invalid_request_error");
    }

    #[test]
    fn invalid_parameters_are_400_as_openai_answers_them() {
        assert_eq!(status(StatusCode::UNPROCESSABLE_ENTITY), StatusCode::BAD_REQUEST);
        assert_eq!(
            status(StatusCode::TOO_MANY_REQUESTS),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(status(StatusCode::NOT_FOUND), StatusCode::NOT_FOUND);
    }
}
