//! OpenAI's tool calling, for the calls a request forces: `tool_choice` naming a function, or `required`.
//!
//! A base GPT-J has no tool-calling format, so it cannot decide *whether* to call a tool (`auto`); but when
//! the request says it must call one, what it writes can be held to the call's form with constrained
//! decoding. The named function's `parameters` schema (or, for `required`, a call of any of the tools)
//! becomes the job's grammar, and the text the grammar produced becomes the answer's `tool_calls`. This is
//! how vLLM serves a named or required tool choice; like vLLM without a tool parser, `auto` is refused by
//! name. Structured-output libraries (instructor's default mode, LangChain's `function_calling`) force the
//! call this way, so they work unmodified.
//!
//! The tools' names and descriptions are not shown to the model: the default chat template has no place
//! for them, and the grammar alone decides the call's form.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::{FinishReason, Grammar};
use utoipa::ToSchema;

use crate::openai_error::{ParamError, param_error};

/// Tools one request may declare at most (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

/// A tool the model may call: a function.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Tool {
    Function { function: Function },
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Function {
    /// 1 to 64 letters, digits, `_` or `-`.
    #[schema(pattern = "^[a-zA-Z0-9_-]{1,64}$")]
    pub name: String,
    /// Accepted; the model does not see it.
    #[serde(default)]
    pub description: Option<String>,
    /// The arguments' JSON Schema; absent means no arguments (`{}`).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub parameters: Option<Value>,
    /// OpenAI's strict mode: the arguments follow the schema exactly, which constrained decoding always does.
    #[serde(default)]
    pub strict: Option<bool>,
}

/// How a forced call's text becomes the answer's tool call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolCalling {
    /// `tool_choice` named this function: the text is its arguments.
    Named(String),
    /// `tool_choice: "required"`: the text is `{"name": …, "arguments": …}`, a call of any of the tools.
    Required,
}

/// A tool call in an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ToolCall {
    /// `call_` and the choice's job id.
    pub id: String,
    /// `function`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: &'static str,
    pub function: FunctionCall,
}

/// The function a tool call calls, and its arguments as JSON text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// A streamed piece of a tool call: the first carries its id, type and name, every one a piece of the
/// arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ToolCallDelta {
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

/// A streamed piece of a function call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

/// The tools a request declares (`null` and `[]` declare none), their names checked.
fn declared(tools: Option<&Value>) -> Result<Vec<Function>, ParamError> {
    let Some(value) = tools.filter(|v| !v.is_null()) else {
        return Ok(Vec::new());
    };
    let tools: Vec<Tool> =
        serde_json::from_value(value.clone()).map_err(|e| param_error("tools", e.to_string()))?;
    if tools.len() > MAX_TOOLS {
        return Err(param_error(
            "tools",
            format!("at most {MAX_TOOLS} tools, got {}", tools.len()),
        ));
    }
    let functions: Vec<Function> = tools
        .into_iter()
        .map(|Tool::Function { function }| function)
        .collect();
    for (i, f) in functions.iter().enumerate() {
        let valid = (1..=64).contains(&f.name.len())
            && f.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(param_error(
                "tools",
                format!(
                    "function name `{}` must be 1 to 64 letters, digits, `_` or `-`",
                    f.name.chars().take(80).collect::<String>()
                ),
            ));
        }
        if functions[..i].iter().any(|g| g.name == f.name) {
            return Err(param_error("tools", format!("declares `{}` twice", f.name)));
        }
        if let Some(p) = &f.parameters
            && !p.is_object()
        {
            return Err(param_error(
                "tools",
                format!("`{}`'s parameters must be a JSON Schema object", f.name),
            ));
        }
    }
    Ok(functions)
}

/// A function's arguments schema: its `parameters`, or no arguments.
fn arguments_schema(f: &Function) -> Value {
    f.parameters.clone().unwrap_or_else(
        || serde_json::json!({"type": "object", "properties": {}, "additionalProperties": false}),
    )
}

/// The call a request forces, if any, and the grammar that writes it: from `tools` and `tool_choice`.
///
/// `tool_choice` absent means `auto` when tools are declared (OpenAI's default), `none` otherwise; `none`
/// (or `auto` with no tools) is no call. A tool choice that names nothing declared, or forces a call with no
/// tools, is refused by name, as is `auto` with tools.
pub fn forced_call(
    tools: Option<&Value>,
    tool_choice: Option<&Value>,
) -> Result<Option<(Grammar, ToolCalling)>, ParamError> {
    let functions = declared(tools)?;
    let choice = tool_choice.filter(|v| !v.is_null());
    let auto = || {
        param_error(
            "tool_choice",
            "`auto` (the default when `tools` are given) is not supported: this model has no tool-calling \
             format to decide with; name a function ({\"type\": \"function\", \"function\": {\"name\": …}}), or \
             use `required` or `none`",
        )
    };
    let (grammar, calling) = match choice {
        None if functions.is_empty() => return Ok(None),
        None => return Err(auto()),
        Some(Value::String(s)) => match s.as_str() {
            "none" => return Ok(None),
            "auto" if functions.is_empty() => return Ok(None),
            "auto" => return Err(auto()),
            "required" if functions.is_empty() => {
                return Err(param_error(
                    "tool_choice",
                    "forces a tool call but `tools` declares none",
                ));
            }
            "required" => {
                let lark = any_call_grammar(&functions).map_err(|e| param_error("tools", e.to_string()))?;
                (Grammar::Lark(lark), ToolCalling::Required)
            }
            other => {
                return Err(param_error(
                    "tool_choice",
                    format!("must be `none`, `auto`, `required` or a named function, got `{other}`"),
                ));
            }
        },
        Some(named) => {
            let name = named_function(named)?;
            let Some(f) = functions.iter().find(|f| f.name == name) else {
                return Err(param_error(
                    "tool_choice",
                    format!("names `{name}`, which `tools` does not declare"),
                ));
            };
            (Grammar::Json(arguments_schema(f)), ToolCalling::Named(name))
        }
    };
    grammar.check().map_err(|e| param_error("tools", e.to_string()))?;
    Ok(Some((grammar, calling)))
}

/// `{"type": "function", "function": {"name": …}}`'s name.
fn named_function(value: &Value) -> Result<String, ParamError> {
    let shape = || {
        param_error(
            "tool_choice",
            "must be `none`, `auto`, `required` or {\"type\": \"function\", \"function\": {\"name\": …}}",
        )
    };
    let object = value.as_object().ok_or_else(shape)?;
    if object.get("type").and_then(Value::as_str) != Some("function")
        || object.keys().any(|k| k != "type" && k != "function")
    {
        return Err(shape());
    }
    let function = object
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(shape)?;
    match (function.get("name").and_then(Value::as_str), function.len()) {
        (Some(name), 1) => Ok(name.to_owned()),
        _ => Err(shape()),
    }
}

/// A Lark grammar (llguidance's dialect) for one call of any of `functions`: `{"name": "<name>",
/// "arguments": <JSON of its schema>}`. Each schema is embedded whole (`%json`), so its own `$ref`s resolve
/// against its own root.
fn any_call_grammar(functions: &[Function]) -> Result<String, shared::GrammarError> {
    let mut lark = String::from("start: ");
    lark.push_str(
        &(0..functions.len())
            .map(|i| format!("call_{i}"))
            .collect::<Vec<_>>()
            .join(" | "),
    );
    lark.push('\n');
    for (i, f) in functions.iter().enumerate() {
        // Names are letters, digits, `_` and `-` (checked), so they need no escaping inside a Lark string.
        lark.push_str(&format!(
            "call_{i}: \"{{\\\"name\\\": \\\"{}\\\", \\\"arguments\\\": \" arguments_{i} \"}}\"\n",
            f.name
        ));
        // Read as a JSON grammar reads a schema (compact, objects closed), since `%json` has its own defaults.
        let schema = shared::grammar::grammar_schema(&arguments_schema(f))?;
        lark.push_str(&format!("arguments_{i}: %json {schema}\n"));
    }
    Ok(lark)
}

impl ToolCalling {
    /// The tool call a finished text makes, or `None` when the text is no call: a `required` call cut
    /// short by `max_tokens` does not parse, and is answered as text.
    pub fn call(&self, id: String, text: &str) -> Option<ToolCall> {
        let function = match self {
            Self::Named(name) => FunctionCall {
                name: name.clone(),
                arguments: text.to_owned(),
            },
            Self::Required => {
                let value: Value = serde_json::from_str(text).ok()?;
                FunctionCall {
                    name: value.get("name")?.as_str()?.to_owned(),
                    arguments: value.get("arguments")?.to_string(),
                }
            }
        };
        Some(ToolCall {
            id,
            kind: "function",
            function,
        })
    }

    /// OpenAI's finish reason for a forced call: `stop` for a named function (as OpenAI answers a forced
    /// call), `tool_calls` for `required`, `length` when `max_tokens` cut it short.
    pub fn finish_reason(&self, reason: FinishReason) -> &'static str {
        match (self, reason) {
            (_, FinishReason::Length) => "length",
            (Self::Named(_), _) => "stop",
            (Self::Required, _) => "tool_calls",
        }
    }
}

impl ToolCallDelta {
    /// A whole call in one piece.
    pub fn whole(call: ToolCall) -> Self {
        Self {
            index: 0,
            id: Some(call.id),
            kind: Some(call.kind),
            function: FunctionDelta {
                name: Some(call.function.name),
                arguments: call.function.arguments,
            },
        }
    }

    /// A piece of a named call's arguments, as they are written; the first (given the call's id and the
    /// function's name) also says which call it is. A `required` call's name is known only once its text is
    /// whole, so it goes in one piece ([`ToolCallDelta::whole`]).
    pub fn arguments(first: Option<(String, &str)>, arguments: String) -> Self {
        let (id, name) = first.map(|(id, name)| (id, name.to_owned())).unzip();
        Self {
            index: 0,
            kind: id.as_ref().map(|_| "function"),
            id,
            function: FunctionDelta { name, arguments },
        }
    }
}

/// A tool call's id: `call_` and its job's id, so a client's id leads to the job's logs.
pub fn call_id(job: &shared::JobId) -> String {
    format!("call_{}", job.0.simple())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            "strict": true}},
            {"type": "function", "function": {"name": "now"}}])
    }

    fn named(name: &str) -> Value {
        json!({"type": "function", "function": {"name": name}})
    }

    #[test]
    fn a_named_function_constrains_the_text_to_its_arguments_schema() {
        let (grammar, calling) = forced_call(Some(&weather()), Some(&named("get_weather")))
            .unwrap()
            .unwrap();
        assert_eq!(
            grammar,
            Grammar::Json(
                json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
            )
        );
        assert_eq!(calling, ToolCalling::Named("get_weather".into()));
        let (grammar, _) = forced_call(Some(&weather()), Some(&named("now")))
            .unwrap()
            .unwrap();
        assert_eq!(
            grammar,
            Grammar::Json(json!({"type": "object", "properties": {}, "additionalProperties": false}))
        );
    }

    #[test]
    fn required_constrains_the_text_to_a_call_of_any_tool() {
        let (grammar, calling) = forced_call(Some(&weather()), Some(&json!("required")))
            .unwrap()
            .unwrap();
        assert_eq!(calling, ToolCalling::Required);
        let Grammar::Lark(lark) = grammar else {
            panic!("a Lark grammar: {grammar:?}")
        };
        assert!(lark.starts_with("start: call_0 | call_1\n"), "{lark}");
        assert!(
            lark.contains(r#"call_0: "{\"name\": \"get_weather\", \"arguments\": " arguments_0 "}""#),
            "{lark}"
        );
        assert!(lark.contains("arguments_1: %json {"), "{lark}");
    }

    #[test]
    fn no_tools_or_none_or_auto_without_tools_is_no_call() {
        assert_eq!(forced_call(None, None).unwrap(), None);
        assert_eq!(forced_call(Some(&json!([])), Some(&json!("auto"))).unwrap(), None);
        assert_eq!(
            forced_call(Some(&json!(null)), Some(&json!("none"))).unwrap(),
            None
        );
        assert_eq!(forced_call(Some(&weather()), Some(&json!("none"))).unwrap(), None);
    }

    #[test]
    fn auto_with_tools_is_refused_by_name_and_says_what_works() {
        for choice in [None, Some(json!("auto"))] {
            let err = forced_call(Some(&weather()), choice.as_ref()).unwrap_err();
            assert_eq!(err.param, "tool_choice");
            assert!(
                err.message.contains("`auto`") && err.message.contains("required"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_choice_must_name_a_declared_function_and_a_forced_call_needs_tools() {
        let err = forced_call(Some(&weather()), Some(&named("send_mail"))).unwrap_err();
        assert_eq!(err.param, "tool_choice");
        assert!(err.message.contains("send_mail"), "{err}");
        for choice in [json!("required"), named("now")] {
            let err = forced_call(None, Some(&choice)).unwrap_err();
            assert_eq!(err.param, "tool_choice", "{choice}");
        }
        for choice in [
            json!("always"),
            json!({"type": "function"}),
            json!({"name": "now"}),
            json!(3),
        ] {
            let err = forced_call(Some(&weather()), Some(&choice)).unwrap_err();
            assert_eq!(err.param, "tool_choice", "{choice}");
        }
    }

    #[test]
    fn malformed_tools_are_refused_naming_the_problem() {
        let cases = [
            (json!({"type": "function"}), "invalid type"),
            (json!([{"type": "retrieval"}]), "retrieval"),
            (
                json!([{"type": "function", "function": {"name": "a b"}}]),
                "`a b`",
            ),
            (json!([{"type": "function", "function": {"name": ""}}]), "1 to 64"),
            (
                json!([{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]),
                "twice",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": [1]}}]),
                "JSON Schema object",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "colour": 1}}]),
                "colour",
            ),
        ];
        for (tools, says) in cases {
            let err = forced_call(Some(&tools), Some(&json!("required"))).unwrap_err();
            assert_eq!(err.param, "tools", "{tools}");
            assert!(err.message.contains(says), "{tools}: {err}");
        }
        let many = Value::Array(
            (0..=MAX_TOOLS)
                .map(|i| json!({"type": "function", "function": {"name": format!("f{i}")}}))
                .collect(),
        );
        assert!(
            forced_call(Some(&many), Some(&json!("required")))
                .unwrap_err()
                .message
                .contains("at most")
        );
    }

    #[test]
    fn a_named_calls_text_is_its_arguments_and_a_required_calls_text_names_the_function() {
        let named = ToolCalling::Named("get_weather".into());
        let call = named.call("call_1".into(), r#"{"city":"Oslo"}"#).unwrap();
        assert_eq!(call.function.name, "get_weather");
        assert_eq!(call.function.arguments, r#"{"city":"Oslo"}"#);
        assert_eq!(serde_json::to_value(&call).unwrap()["type"], "function");
        let required = ToolCalling::Required;
        let call = required
            .call("call_2".into(), r#"{"name": "now", "arguments": {}}"#)
            .unwrap();
        assert_eq!(
            (call.function.name.as_str(), call.function.arguments.as_str()),
            ("now", "{}")
        );
        assert_eq!(required.call("call_3".into(), r#"{"name": "now", "argu"#), None);
    }

    #[test]
    fn a_forced_call_finishes_as_openai_says_and_length_wins() {
        let named = ToolCalling::Named("f".into());
        assert_eq!(named.finish_reason(FinishReason::Eos), "stop");
        assert_eq!(
            ToolCalling::Required.finish_reason(FinishReason::Eos),
            "tool_calls"
        );
        assert_eq!(
            ToolCalling::Required.finish_reason(FinishReason::Length),
            "length"
        );
        assert_eq!(named.finish_reason(FinishReason::Length), "length");
    }
}
