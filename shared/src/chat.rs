//! Chat conversations as the contract carries them, and (with the `chat-template` feature, in `template`)
//! the templates that turn them into one prompt.
//!
//! A language model sees text, not messages. Hugging Face checkpoints say how a conversation becomes text
//! with a Jinja template in `tokenizer_config.json` (`chat_template`); checkpoints without one (GPT-J) get
//! a default one. Only the worker renders templates, so only it builds the template engine (MiniJinja):
//! the gateway and outside producers need the messages and their cleaning, not the rendering.
//!
//! Cleaning ([`clean_messages`]) applies the prompt rules to each message's content *before* rendering:
//! the template's own markup (`<|im_start|>`, `User:`, newlines) is the model's format, not client text, and
//! must survive an allowed set that would strip it. Under the as-written rules (the OpenAI routes') a
//! content stays as written, less unsafe control characters.

use std::fmt;

use schemars::JsonSchema;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::prompt::{PromptError, PromptRules};

#[cfg(feature = "chat-template")]
mod template;
#[cfg(feature = "chat-template")]
pub use template::{ChatTemplate, DEFAULT_CHAT_STOP, DEFAULT_CHAT_TEMPLATE};

/// The most messages one conversation may hold.
pub const MAX_MESSAGES: usize = 64;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions for the assistant. OpenAI's newer name `developer` is read as `system`.
    #[serde(alias = "developer")]
    System,
    /// The person asking.
    User,
    /// The model's earlier replies (their tool calls folded into the content, see [`ChatMessage`]).
    Assistant,
    /// A tool's result, answering one of the assistant's tool calls.
    Tool,
}

/// One message of a conversation.
///
/// On the wire `content` is a string or OpenAI's array of content parts, of which only `text` parts are
/// supported (they are joined without separator); an optional `name` is accepted and ignored. An assistant
/// message may carry OpenAI's `tool_calls` (its `content` then `null`): each call is folded into the content
/// as a line `{"name": …, "arguments": …}` after any text, so that every template, the default one
/// included, shows the model what it called; a `tool` message's `tool_call_id` is accepted and ignored. It
/// always serializes as `{"role", "content"}` with `content` a string, which is what templates read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

// What a client may send for one message. Its schema ([`ChatMessage`]'s) is written by hand: `content` may
// be null only beside `tool_calls`, a relation the derive cannot state.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireMessage {
    role: Role,
    #[serde(default, deserialize_with = "content_text")]
    content: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    name: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCall>>,
    #[serde(default)]
    #[allow(dead_code)]
    tool_call_id: Option<String>,
}

/// One call of a tool, as an assistant message of the conversation carries it.
#[derive(Deserialize, JsonSchema)]
#[schemars(rename = "ChatToolCall")]
struct ToolCall {
    /// The call's id. Accepted; templates do not see it.
    #[serde(default)]
    #[allow(dead_code)]
    id: Option<String>,
    /// `function`, the only kind.
    #[serde(rename = "type", default)]
    #[allow(dead_code)]
    kind: Option<String>,
    function: FunctionCall,
}

/// The function a tool call called, and its arguments as JSON text.
#[derive(Deserialize, JsonSchema)]
#[schemars(rename = "ChatFunctionCall")]
struct FunctionCall {
    name: String,
    arguments: String,
}

impl ToolCall {
    /// The line a template shows for the call: its arguments as they were written when they are JSON
    /// (the model wrote them under a grammar), else as a JSON string.
    fn line(&self) -> String {
        let name = serde_json::Value::String(self.function.name.clone());
        // Checked, not kept: the text as written goes into the line.
        let arguments = match serde_json::from_str::<serde::de::IgnoredAny>(&self.function.arguments) {
            Ok(_) => self.function.arguments.trim().to_owned(),
            Err(_) => serde_json::Value::String(self.function.arguments.clone()).to_string(),
        };
        format!("{{\"name\": {name}, \"arguments\": {arguments}}}")
    }
}

impl<'de> Deserialize<'de> for ChatMessage {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = WireMessage::deserialize(deserializer)?;
        let calls = wire.tool_calls.unwrap_or_default();
        if !calls.is_empty() && wire.role != Role::Assistant {
            return Err(de::Error::custom(
                "only an assistant message may carry `tool_calls`",
            ));
        }
        let content = match (wire.content, calls.is_empty()) {
            (Some(text), true) => text,
            (None, true) => {
                return Err(de::Error::custom(
                    "a message needs `content` (it may be null only with `tool_calls`)",
                ));
            }
            (text, false) => text
                .into_iter()
                .filter(|t| !t.is_empty())
                .chain(calls.iter().map(ToolCall::line))
                .collect::<Vec<_>>()
                .join("\n"),
        };
        Ok(Self::new(wire.role, content))
    }
}

impl JsonSchema for ChatMessage {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ChatMessage".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let role = generator.subschema_for::<Role>();
        let content = generator.subschema_for::<ContentSchema>();
        let call = generator.subschema_for::<ToolCall>();
        let name = serde_json::json!({
            "description": "The author's name. Accepted for OpenAI compatibility; templates do not see it.",
            "type": ["string", "null"],
        });
        let call_id = serde_json::json!({
            "description": "The call a `tool` message answers. Accepted for OpenAI compatibility; templates do not \
                see it.",
            "type": ["string", "null"],
        });
        schemars::json_schema!({
            "description": "One message of a conversation; unknown fields are refused. `content` is a string, or an \
                array of `{\"type\": \"text\", \"text\": …}` parts joined without separator; it may be null \
                (or absent) only on an assistant message with `tool_calls` (OpenAI's tool calls, as its answer gave \
                them), which are folded into the content one line `{\"name\": …, \"arguments\": …}` a call.",
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "role": role,
                        "content": content,
                        "name": name,
                        "tool_call_id": call_id,
                        "tool_calls": {"type": ["array", "null"], "maxItems": 0},
                    },
                    "required": ["role", "content"],
                    "additionalProperties": false,
                },
                {
                    "type": "object",
                    "properties": {
                        "role": {"const": "assistant"},
                        "content": {"anyOf": [content, {"type": "null"}]},
                        "name": name,
                        "tool_call_id": call_id,
                        "tool_calls": {"type": "array", "items": call, "minItems": 1},
                    },
                    "required": ["role", "tool_calls"],
                    "additionalProperties": false,
                },
            ],
        })
    }
}

// The schema of `content`, for documentation only: `content_text` does the parsing.
/// A string, or an array of text parts.
#[derive(JsonSchema)]
#[schemars(untagged, rename = "ChatContent")]
#[allow(dead_code)]
enum ContentSchema {
    Text(String),
    Parts(Vec<TextPart>),
}

/// A text content part; other part types (images, audio) are refused.
#[derive(JsonSchema)]
#[schemars(rename = "ChatContentPart")]
#[allow(dead_code)]
struct TextPart {
    #[schemars(rename = "type", extend("const" = "text"))]
    kind: String,
    text: String,
}

/// One content part as sent; only the fields we read. Other part types carry other fields, which are left
/// unread so that the error can name the part's type instead of an unknown field.
#[derive(Deserialize)]
struct WirePart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

/// Reads `content` as a string or as text parts, naming the first unsupported part type.
fn content_text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    struct ContentVisitor;

    impl<'de> Visitor<'de> for ContentVisitor {
        type Value = Option<String>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string or an array of text content parts")
        }

        fn visit_unit<E: de::Error>(self) -> Result<Option<String>, E> {
            Ok(None)
        }

        fn visit_none<E: de::Error>(self) -> Result<Option<String>, E> {
            Ok(None)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<String>, E> {
            Ok(Some(v.to_owned()))
        }

        fn visit_string<E: de::Error>(self, v: String) -> Result<Option<String>, E> {
            Ok(Some(v))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<String>, A::Error> {
            let mut text = String::new();
            while let Some(part) = seq.next_element::<WirePart>()? {
                if part.kind != "text" {
                    return Err(de::Error::custom(format!(
                        "content part type `{}` is not supported; only text",
                        part.kind
                    )));
                }
                let part_text = part
                    .text
                    .ok_or_else(|| de::Error::custom("a text content part needs `text`"))?;
                text.push_str(&part_text);
            }
            Ok(Some(text))
        }
    }

    deserializer.deserialize_any(ContentVisitor)
}

/// Why a conversation could not become a prompt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    #[error("a conversation needs at least one message")]
    NoMessages,
    #[error("a conversation may hold at most {max} messages, got {len}")]
    TooManyMessages { len: usize, max: usize },
    /// The prompt rules refused a message's content or the conversation's combined length.
    #[error("messages: {0}")]
    Prompt(#[from] PromptError),
    /// The template did not compile, failed to render, or called `raise_exception` (whose message this is).
    #[error("chat template: {0}")]
    Template(String),
    /// `tokenizer_config.json` could not be read.
    #[error("tokenizer config: {0}")]
    Config(String),
}

/// Cleans every message's content with `rules` and checks the conversation against the limits.
///
/// Each content gets the plain prompt's rules ([`PromptRules::clean_text`]); the length limits apply to the
/// contents' combined length, since the model sees them together. A content that cleans to nothing is
/// kept, because an empty system prompt is legitimate, but an all-empty conversation is
/// [`PromptError::Empty`], as an empty plain prompt is.
pub fn clean_messages(messages: &[ChatMessage], rules: &PromptRules) -> Result<Vec<ChatMessage>, ChatError> {
    if messages.is_empty() {
        return Err(ChatError::NoMessages);
    }
    if messages.len() > MAX_MESSAGES {
        return Err(ChatError::TooManyMessages {
            len: messages.len(),
            max: MAX_MESSAGES,
        });
    }
    let cleaned = messages
        .iter()
        .map(|m| Ok(ChatMessage::new(m.role, rules.clean_text(&m.content)?)))
        .collect::<Result<Vec<_>, PromptError>>()?;
    rules.check_length(cleaned.iter().map(|m| m.content.chars().count()).sum())?;
    Ok(cleaned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::{Cleaning, DEFAULT_ALLOWED, DisallowedPolicy};

    fn rules(min: usize, max: usize, policy: DisallowedPolicy) -> PromptRules {
        PromptRules::Cleaned(Cleaning::new(DEFAULT_ALLOWED, min, max, policy).unwrap())
    }

    #[test]
    fn content_may_be_a_string_or_text_parts_joined_without_separator() {
        let plain: ChatMessage = serde_json::from_str(r#"{"role": "user", "content": "hi"}"#).unwrap();
        assert_eq!(plain, ChatMessage::new(Role::User, "hi"));
        let parts: ChatMessage = serde_json::from_str(
            r#"{"role": "user", "name": "ann", "content": [
                {"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]}"#,
        )
        .unwrap();
        assert_eq!(parts, ChatMessage::new(Role::User, "Hello world"));
    }

    #[test]
    fn an_image_part_is_refused_by_its_type() {
        let err = serde_json::from_str::<ChatMessage>(
            r#"{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("content part type `image_url` is not supported; only text"),
            "{err}"
        );
    }

    #[test]
    fn unknown_message_fields_and_roles_are_refused() {
        let err = serde_json::from_str::<ChatMessage>(r#"{"role": "user", "content": "x", "audio": {}}"#)
            .unwrap_err();
        assert!(err.to_string().contains("audio"), "{err}");
        assert!(serde_json::from_str::<ChatMessage>(r#"{"role": "function", "content": "x"}"#).is_err());
    }

    #[test]
    fn an_assistants_tool_calls_are_folded_into_its_content_one_line_a_call() {
        let m: ChatMessage = serde_json::from_str(
            r#"{"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": "{\"a\": 1}"}},
                {"id": "call_2", "type": "function", "function": {"name": "put", "arguments": "not json"}}]}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            ChatMessage::new(
                Role::Assistant,
                "{\"name\": \"get\", \"arguments\": {\"a\": 1}}\n{\"name\": \"put\", \"arguments\": \"not json\"}"
            )
        );
        let with_text: ChatMessage = serde_json::from_str(
            r#"{"role": "assistant", "content": "Let me look.", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "get", "arguments": "{}"}}]}"#,
        )
        .unwrap();
        assert_eq!(
            with_text.content,
            "Let me look.\n{\"name\": \"get\", \"arguments\": {}}"
        );
    }

    #[test]
    fn a_tool_message_answers_a_call_and_its_id_is_accepted() {
        let m: ChatMessage =
            serde_json::from_str(r#"{"role": "tool", "tool_call_id": "call_1", "content": "42"}"#).unwrap();
        assert_eq!(m, ChatMessage::new(Role::Tool, "42"));
    }

    #[test]
    fn content_may_be_null_only_beside_tool_calls_and_only_assistants_call_tools() {
        for body in [
            r#"{"role": "assistant", "content": null}"#,
            r#"{"role": "user"}"#,
            r#"{"role": "assistant", "content": null, "tool_calls": []}"#,
        ] {
            let err = serde_json::from_str::<ChatMessage>(body).unwrap_err();
            assert!(err.to_string().contains("needs `content`"), "{body}: {err}");
        }
        let err = serde_json::from_str::<ChatMessage>(
            r#"{"role": "user", "content": "x", "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("only an assistant"), "{err}");
    }

    #[test]
    fn developer_is_read_as_system() {
        let m: ChatMessage = serde_json::from_str(r#"{"role": "developer", "content": "x"}"#).unwrap();
        assert_eq!(m.role, Role::System);
    }

    #[test]
    fn a_message_serializes_as_role_and_string_content() {
        assert_eq!(
            serde_json::to_value(ChatMessage::new(Role::Assistant, "ok")).unwrap(),
            serde_json::json!({"role": "assistant", "content": "ok"})
        );
    }

    #[test]
    fn cleaning_strips_disallowed_characters_per_message_and_keeps_empty_ones() {
        let messages = vec![
            ChatMessage::new(Role::System, "$$$"),
            ChatMessage::new(Role::User, "  Hello,\n*world*!  "),
        ];
        let cleaned = clean_messages(&messages, &PromptRules::original()).unwrap();
        assert_eq!(
            cleaned,
            vec![
                ChatMessage::new(Role::System, ""),
                ChatMessage::new(Role::User, "Hello, world"),
            ]
        );
    }

    #[test]
    fn as_written_contents_keep_every_character_but_unsafe_controls_and_have_no_length_limit() {
        let system = "You are terse.\nAnswer in JSON: {\"a\": 1}. ".repeat(20);
        let messages = vec![
            ChatMessage::new(Role::System, system.clone()),
            ChatMessage::new(Role::User, "Was ist 2+2?\u{0}"),
        ];
        assert_eq!(
            clean_messages(&messages, &PromptRules::AsWritten).unwrap(),
            vec![
                ChatMessage::new(Role::System, system),
                ChatMessage::new(Role::User, "Was ist 2+2?"),
            ]
        );
        let empty = vec![ChatMessage::new(Role::User, "\u{7}")];
        assert_eq!(
            clean_messages(&empty, &PromptRules::AsWritten).unwrap_err(),
            ChatError::Prompt(PromptError::Empty)
        );
    }

    #[test]
    fn the_length_limits_apply_to_the_combined_content() {
        let rules = rules(5, 10, DisallowedPolicy::Clean);
        let messages = vec![
            ChatMessage::new(Role::System, "abcdef"),
            ChatMessage::new(Role::User, "ghijk"),
        ];
        assert_eq!(
            clean_messages(&messages, &rules).unwrap_err(),
            ChatError::Prompt(PromptError::TooLong { len: 11, max: 10 })
        );
        let short = vec![
            ChatMessage::new(Role::System, "ab"),
            ChatMessage::new(Role::User, "c"),
        ];
        assert_eq!(
            clean_messages(&short, &rules).unwrap_err(),
            ChatError::Prompt(PromptError::TooShort { len: 3, min: 5 })
        );
        let all_empty = vec![ChatMessage::new(Role::User, "$$")];
        assert_eq!(
            clean_messages(&all_empty, &rules).unwrap_err(),
            ChatError::Prompt(PromptError::Empty)
        );
    }

    #[test]
    fn the_reject_policy_names_the_disallowed_character() {
        let messages = vec![ChatMessage::new(Role::User, "hi $there")];
        assert_eq!(
            clean_messages(&messages, &rules(1, 200, DisallowedPolicy::Reject)).unwrap_err(),
            ChatError::Prompt(PromptError::Disallowed('$'))
        );
    }

    #[test]
    fn a_conversation_needs_one_to_sixty_four_messages() {
        assert_eq!(
            clean_messages(&[], &PromptRules::AsWritten).unwrap_err(),
            ChatError::NoMessages
        );
        let many = vec![ChatMessage::new(Role::User, "a"); MAX_MESSAGES + 1];
        assert_eq!(
            clean_messages(&many, &rules(1, 1000, DisallowedPolicy::Clean)).unwrap_err(),
            ChatError::TooManyMessages { len: 65, max: 64 }
        );
    }
}
