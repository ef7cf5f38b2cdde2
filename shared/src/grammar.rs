//! Constrained decoding's contract: the form a job's text must take (a JSON Schema, a regular expression, one
//! of a list of strings, a Lark grammar) and, with the `grammar` feature, its compilation with llguidance
//! against the model's vocabulary.
//!
//! Clients name a constraint three ways (OpenAI's `response_format`, vLLM's `structured_outputs`, TGI's
//! `grammar`) and each becomes one [`Grammar`] in the job's parameters, so the worker and AMQP producers
//! deal with one form. The gateway compiles it at submission, so a grammar that cannot compile is refused
//! with a 400 before it is queued; the worker compiles it again (producers bypass the gateway), caching
//! compiled grammars by their text, and masks each constrained row's logits every step.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A grammar's JSON text at most (a schema, a pattern, a Lark grammar, or the choices together).
pub const MAX_GRAMMAR_BYTES: usize = 64 * 1024;
/// Strings a `choice` grammar may list at most.
pub const MAX_GRAMMAR_CHOICES: usize = 1024;

/// The form the generated text must take. The text ends when the grammar is complete (as at EOS, finish
/// reason `eos`); a text cut short by `max_new_tokens` ends with `length` and may not parse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Grammar {
    /// A JSON value valid against this JSON Schema (`{"type": "object"}`: any object). Written compactly
    /// (no whitespace between tokens) unless the schema's `x-guidance` options say otherwise.
    Json(serde_json::Value),
    /// Text matched whole by this regular expression (Rust `regex` syntax).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
}

/// Why a grammar cannot constrain a job; the text names the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct GrammarError(pub String);

impl Grammar {
    /// The checks that need no compiler: sizes and empty parts.
    pub fn check(&self) -> Result<(), GrammarError> {
        let bytes = self.key().len();
        if bytes > MAX_GRAMMAR_BYTES {
            return Err(GrammarError(format!(
                "is {bytes} bytes of JSON; the limit is {MAX_GRAMMAR_BYTES}"
            )));
        }
        match self {
            Self::Choice(choices) if choices.is_empty() => Err(GrammarError("lists no choice".into())),
            Self::Choice(choices) if choices.len() > MAX_GRAMMAR_CHOICES => Err(GrammarError(format!(
                "lists {} choices; the limit is {MAX_GRAMMAR_CHOICES}",
                choices.len()
            ))),
            Self::Choice(choices) if choices.iter().any(String::is_empty) => {
                Err(GrammarError("holds an empty choice".into()))
            }
            Self::Regex(s) | Self::Lark(s) if s.trim().is_empty() => Err(GrammarError("is empty".into())),
            Self::Json(schema) if !(schema.is_object() || schema.is_boolean()) => {
                Err(GrammarError("a JSON Schema is an object (or true/false)".into()))
            }
            _ => Ok(()),
        }
    }

    /// The grammar's canonical text: compiled grammars are cached under it.
    pub fn key(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Values kept by grammar text, the least recently used dropped past a bound: the gateway remembers which
/// grammars compiled, the worker keeps them compiled. Clients send the same few grammars over and over.
pub struct RecentGrammars<T> {
    bound: usize,
    inner: std::sync::Mutex<Uses<T>>,
}

/// Grammar text → (value, last use), and the use clock.
type Uses<T> = (std::collections::HashMap<String, (T, u64)>, u64);

impl<T> RecentGrammars<T> {
    pub fn new(bound: usize) -> Self {
        Self {
            bound: bound.max(1),
            inner: std::sync::Mutex::new((std::collections::HashMap::new(), 0)),
        }
    }

    /// `f` of the value kept for `key`, which counts as a use.
    pub fn get_with<R>(&self, key: &str, f: impl FnOnce(&T) -> R) -> Option<R> {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (map, clock) = &mut *guard;
        *clock += 1;
        let now = *clock;
        map.get_mut(key).map(|(value, used)| {
            *used = now;
            f(value)
        })
    }

    /// Keeps `value` for `key`, dropping the least recently used past the bound.
    pub fn insert(&self, key: String, value: T) {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (map, clock) = &mut *guard;
        *clock += 1;
        if map.len() >= self.bound
            && !map.contains_key(&key)
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(key, (value, *clock));
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|g| g.0.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(feature = "grammar")]
pub use compile::{GrammarCompiler, Matcher, grammar_schema, token_bytes};

#[cfg(feature = "grammar")]
mod compile {
    use std::sync::Arc;

    use llguidance::api::TopLevelGrammar;
    use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
    use llguidance::{JsonCompileOptions, ParserFactory};

    use super::{Grammar, GrammarError};

    /// A job's grammar state: llguidance's matcher, advanced by each token the job generates.
    pub use llguidance::Matcher;

    /// The model's vocabulary as llguidance sees it: each token's bytes, and the tokenizer for the
    /// grammar's literal text.
    struct Vocabulary {
        trie: TokTrie,
        tokenizer: tokenizers::Tokenizer,
    }

    impl TokenizerEnv for Vocabulary {
        fn tok_trie(&self) -> &TokTrie {
            &self.trie
        }

        fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
            // llguidance also asks for bytes that are not UTF-8: the rest of a character the grammar forces
            // after its first bytes (a character outside the basic plane, written a byte token at a time).
            // Text goes through the tokenizer; other bytes through the vocabulary's own tokens, greedily.
            // (Read lossily, they became U+FFFD tokens that the grammar then refused.)
            self.trie.tokenize_with_greedy_fallback(s, |text| {
                self.tokenizer
                    .encode(text, false)
                    .map(|e| e.get_ids().to_vec())
                    .unwrap_or_default()
            })
        }
    }

    /// Every token id's bytes, as a byte-level (or byte-fallback) tokenizer decodes it: what grammars are
    /// compiled against, and what log-probabilities name tokens by. A special token is its text after
    /// llguidance's marker byte 0xFF (never a byte of UTF-8 text).
    pub fn token_bytes(tokenizer: &tokenizers::Tokenizer) -> Result<Vec<Vec<u8>>, GrammarError> {
        let broken = |e: &dyn std::fmt::Display| GrammarError(format!("the tokenizer's vocabulary: {e}"));
        let json = tokenizer.to_string(false).map_err(|e| broken(&e))?;
        let json: serde_json::Value = serde_json::from_str(&json).map_err(|e| broken(&e))?;
        llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| broken(&e))
    }

    /// Compiles grammars against one model's vocabulary. Built once (the vocabulary's trie takes tens of
    /// milliseconds), shared by every job.
    pub struct GrammarCompiler {
        factory: ParserFactory,
    }

    impl std::fmt::Debug for GrammarCompiler {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("GrammarCompiler").finish_non_exhaustive()
        }
    }

    /// A JSON Schema as the grammar reads it. Two readings where the schema leaves a choice, so that a
    /// model cannot write forever where the schema does not ask it to:
    /// - compact JSON (no whitespace between tokens) unless the schema's `x-guidance` says otherwise: with
    ///   free whitespace a model may pad forever;
    /// - an object that lists its `properties` takes only those unless it says otherwise
    ///   (`additionalProperties`, `patternProperties`, `unevaluatedProperties`), as vLLM's default grammar
    ///   engine (xgrammar, in its strict mode) reads it: schemas written for tool calls and structured output
    ///   seldom say so, and a model free to add keys may write one key forever. The text is still valid
    ///   against the schema as written. Objects inside an `allOf` are left open: each lists only its share of
    ///   the properties.
    pub fn grammar_schema(schema: &serde_json::Value) -> Result<serde_json::Value, GrammarError> {
        let mut schema = schema.clone();
        close_objects(&mut schema, true);
        if let Some(obj) = schema.as_object_mut()
            && !obj.contains_key("x-guidance")
        {
            let options = JsonCompileOptions {
                whitespace_flexible: false,
                ..Default::default()
            };
            obj.insert(
                "x-guidance".into(),
                serde_json::to_value(&options).map_err(|e| GrammarError(e.to_string()))?,
            );
        }
        Ok(schema)
    }

    /// [`grammar_schema`]'s closing of objects, through every subschema (not through data: `const`, `enum`,
    /// `default`, `examples`). `close` is false for the direct members of an `allOf`.
    fn close_objects(schema: &mut serde_json::Value, close: bool) {
        use serde_json::Value;
        let Value::Object(map) = schema else {
            return;
        };
        let says = [
            "additionalProperties",
            "patternProperties",
            "unevaluatedProperties",
        ];
        if close && map.contains_key("properties") && !says.iter().any(|k| map.contains_key(*k)) {
            map.insert("additionalProperties".into(), Value::Bool(false));
        }
        // A keyword's subschemas: one, or an array of them (`anyOf`, `prefixItems`, older drafts' `items`).
        let each = |value: &mut Value, close: bool| match value {
            Value::Array(list) => list.iter_mut().for_each(|v| close_objects(v, close)),
            v => close_objects(v, close),
        };
        for (key, value) in map.iter_mut() {
            match key.as_str() {
                // Maps from names to subschemas.
                "properties" | "patternProperties" | "$defs" | "definitions" | "dependentSchemas" => {
                    if let Value::Object(named) = value {
                        named.values_mut().for_each(|v| close_objects(v, true));
                    }
                }
                "allOf" => each(value, false),
                "anyOf"
                | "oneOf"
                | "prefixItems"
                | "items"
                | "additionalProperties"
                | "unevaluatedProperties"
                | "additionalItems"
                | "unevaluatedItems"
                | "not"
                | "if"
                | "then"
                | "else"
                | "contains"
                | "propertyNames" => each(value, true),
                _ => {}
            }
        }
    }

    impl GrammarCompiler {
        /// For a model whose logits have `vocab_size` entries (at least the tokenizer's; ids past it never
        /// match a grammar) and whose end of text is `eos`.
        pub fn new(
            tokenizer: &tokenizers::Tokenizer,
            vocab_size: usize,
            eos: u32,
        ) -> Result<Self, GrammarError> {
            let broken = |e: &dyn std::fmt::Display| GrammarError(format!("the tokenizer's vocabulary: {e}"));
            let mut words = token_bytes(tokenizer)?;
            words.resize(vocab_size.max(words.len()), Vec::new());
            let info = TokRxInfo::new(words.len() as u32, eos);
            let vocabulary = Vocabulary {
                trie: TokTrie::from(&info, &words),
                tokenizer: tokenizer.clone(),
            };
            let env: TokEnv = Arc::new(vocabulary);
            let mut factory = ParserFactory::new_simple(&env).map_err(|e| broken(&e))?;
            // Errors come back as values; nothing goes to stderr.
            factory.quiet();
            Ok(Self { factory })
        }

        /// Logits entries the masks cover.
        pub fn vocab_size(&self) -> usize {
            self.factory.tok_env().tok_trie().vocab_size()
        }

        /// A fresh matcher for `grammar`, or why it cannot be compiled.
        pub fn compile(&self, grammar: &Grammar) -> Result<Matcher, GrammarError> {
            grammar.check()?;
            let top = match grammar {
                Grammar::Json(schema) => TopLevelGrammar::from_json_schema(grammar_schema(schema)?),
                Grammar::Regex(pattern) => {
                    // llguidance would accept an invalid pattern lazily; the regex parser names the problem.
                    regex_syntax::Parser::new()
                        .parse(pattern)
                        .map_err(|e| GrammarError(format!("invalid regular expression: {e}")))?;
                    TopLevelGrammar::from_regex(pattern)
                }
                Grammar::Choice(choices) => {
                    let alternatives: Vec<String> = choices.iter().map(|c| regex_syntax::escape(c)).collect();
                    TopLevelGrammar::from_regex(&format!("(?:{})", alternatives.join("|")))
                }
                Grammar::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
            };
            let parser = self
                .factory
                .create_parser(top)
                .map_err(|e| GrammarError(e.to_string()))?;
            let matcher = Matcher::new(Ok(parser));
            match matcher.get_error() {
                Some(e) => Err(GrammarError(e)),
                None => Ok(matcher),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn compiler() -> GrammarCompiler {
            let tokenizer = tokenizers::Tokenizer::from_bytes(crate::tokens::GPTJ_TOKENIZER_JSON).unwrap();
            GrammarCompiler::new(&tokenizer, 50400, 50256).unwrap()
        }

        #[test]
        fn objects_that_list_their_properties_take_only_those_unless_they_say_otherwise() {
            let schema = serde_json::json!({
                "type": "object",
                "properties": {
                    "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                    "open": {"type": "object", "properties": {}, "additionalProperties": true},
                    "any": {"type": "object"},
                    "properties": {"const": {"properties": {}}},
                    "list": {"type": "array", "items": {"$ref": "#/$defs/Item"}},
                    "both": {"allOf": [{"properties": {"x": {}}}, {"properties": {"y": {}}}]},
                },
                "$defs": {"Item": {"anyOf": [{"properties": {"c": {}}}, {"type": "null"}]}},
            });
            let read = grammar_schema(&schema).unwrap();
            assert_eq!(read["additionalProperties"], false);
            assert_eq!(read["properties"]["a"]["additionalProperties"], false);
            assert_eq!(read["properties"]["open"]["additionalProperties"], true);
            assert!(
                read["properties"]["any"].get("additionalProperties").is_none(),
                "no list, left open"
            );
            assert!(
                read["properties"]["properties"]["const"]
                    .get("additionalProperties")
                    .is_none(),
                "data"
            );
            assert_eq!(read["$defs"]["Item"]["anyOf"][0]["additionalProperties"], false);
            assert!(
                read["properties"]["both"]["allOf"][0]
                    .get("additionalProperties")
                    .is_none()
            );
            assert_eq!(read["x-guidance"]["whitespace_flexible"], false);
            // Still valid against the schema as written: a subset of its values.
            let m = compiler().compile(&Grammar::Json(schema)).unwrap();
            assert!(m.get_error().is_none());
        }

        /// Walks the matcher greedily through `text`'s tokens, checking each is allowed by the mask.
        fn accepts(m: &mut Matcher, ids: &[u32]) -> bool {
            ids.iter().all(|&t| {
                let mask = m.compute_mask().unwrap();
                mask.is_allowed(t) && m.consume_token(t).is_ok()
            })
        }

        fn ids(text: &str) -> Vec<u32> {
            let tokenizer = tokenizers::Tokenizer::from_bytes(crate::tokens::GPTJ_TOKENIZER_JSON).unwrap();
            tokenizer.encode(text, false).unwrap().get_ids().to_vec()
        }

        #[test]
        fn a_character_written_byte_by_byte_is_finished_with_the_bytes_it_still_needs() {
            // U+76BDD is F1 B6 AF 9D: after its first two bytes the grammar forces the other two, which are
            // not UTF-8 on their own. The mask must allow them, and only them.
            let c = compiler();
            let tokenizer = tokenizers::Tokenizer::from_bytes(crate::tokens::GPTJ_TOKENIZER_JSON).unwrap();
            let words = token_bytes(&tokenizer).unwrap();
            let byte = |b: u8| words.iter().position(|w| w.as_slice() == [b]).unwrap() as u32;
            let mut m = c.compile(&Grammar::Regex("o\u{76BDD}".into())).unwrap();
            assert!(accepts(&mut m, &[ids("o")[0], byte(0xF1), byte(0xB6)]));
            let mask = m.compute_mask().unwrap();
            let allowed: Vec<u32> = (0..50400).filter(|&t| mask.is_allowed(t)).collect();
            assert!(!allowed.is_empty());
            for t in allowed {
                assert!(
                    words[t as usize].starts_with(&[0xAF]),
                    "token {t} ({:x?}) allowed",
                    words[t as usize]
                );
            }
            assert!(accepts(&mut m, &[byte(0xAF), byte(0x9D)]));
            assert!(
                m.compute_mask_or_eos().unwrap().is_allowed(50256),
                "the pattern is complete"
            );
        }

        #[test]
        fn a_schema_admits_its_instances_and_then_only_the_end_of_text() {
            let c = compiler();
            let schema = serde_json::json!({
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
                "required": ["name", "age"],
                "additionalProperties": false
            });
            let mut m = c.compile(&Grammar::Json(schema)).unwrap();
            assert!(accepts(&mut m, &ids(r#"{"name":"Ann","age":42}"#)));
            let mask = m.compute_mask_or_eos().unwrap();
            assert!(mask.is_allowed(50256));
            assert_eq!(mask.num_set(), 1, "a complete object admits only EOS");
        }

        #[test]
        fn a_schema_refuses_what_does_not_fit() {
            let c = compiler();
            let schema = serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}},
                "required": ["a"], "additionalProperties": false});
            let mut m = c.compile(&Grammar::Json(schema)).unwrap();
            assert!(!accepts(&mut m, &ids(r#"{"a":"x"}"#)));
        }

        #[test]
        fn choices_admit_exactly_their_strings() {
            let c = compiler();
            let g = Grammar::Choice(vec!["yes".into(), "no (maybe)".into()]);
            let mut m = c.compile(&g).unwrap();
            assert!(accepts(&mut m, &ids("no (maybe)")));
            assert!(m.compute_mask_or_eos().unwrap().is_allowed(50256));
            let mut m = c.compile(&g).unwrap();
            assert!(!accepts(&mut m, &ids("nope")));
        }

        /// JSON values shaped like schemas, built from JSON Schema's own keywords, mostly malformed.
        fn schema_like() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
            use proptest::prelude::*;
            use serde_json::Value;
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                (-5i64..5).prop_map(Value::from),
                prop::sample::select(vec![
                    "string",
                    "integer",
                    "number",
                    "object",
                    "array",
                    "boolean",
                    "null",
                    "#/$defs/a",
                    "#",
                    "[a-",
                    "(x",
                    ".*",
                    "^$",
                    "",
                ])
                .prop_map(Value::from),
            ];
            leaf.prop_recursive(4, 48, 6, |inner| {
                let keys = prop::sample::select(vec![
                    "type",
                    "properties",
                    "items",
                    "$ref",
                    "$defs",
                    "enum",
                    "const",
                    "anyOf",
                    "oneOf",
                    "allOf",
                    "minimum",
                    "maximum",
                    "maxLength",
                    "minLength",
                    "pattern",
                    "required",
                    "additionalProperties",
                    "minItems",
                    "maxItems",
                    "format",
                    "multipleOf",
                    "a",
                    "prefixItems",
                ]);
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::btree_map(keys, inner, 0..5)
                        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
                ]
            })
        }

        proptest::proptest! {
            #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

            /// Whatever a client sends as a schema or a pattern, compiling it answers (a matcher or an
            /// error) and never panics: a grammar cannot take a gateway or a worker down.
            #[test]
            fn malformed_grammars_are_answered_never_a_panic(schema in schema_like(), pattern in ".{0,12}") {
                let c = compiler_once();
                for g in [Grammar::Json(schema), Grammar::Regex(pattern.clone()), Grammar::Lark(pattern)] {
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.compile(&g).is_ok()));
                    proptest::prop_assert!(outcome.is_ok(), "compiling {:?} panicked", g);
                }
            }
        }

        /// One compiler for the property test's cases (building one takes a while).
        fn compiler_once() -> &'static GrammarCompiler {
            static COMPILER: std::sync::OnceLock<GrammarCompiler> = std::sync::OnceLock::new();
            COMPILER.get_or_init(compiler)
        }

        #[test]
        fn ids_past_the_tokenizer_never_match() {
            let c = compiler();
            let mut m = c.compile(&Grammar::Regex("[a-z]+".into())).unwrap();
            let mask = m.compute_mask().unwrap();
            assert!((50257..50400).all(|t| !mask.is_allowed(t)));
            assert_eq!(c.vocab_size(), 50400);
        }

        #[test]
        fn broken_grammars_are_refused_with_their_problem() {
            let c = compiler();
            for (g, needle) in [
                (Grammar::Regex("(unclosed".into()), "regular expression"),
                (Grammar::Lark("start: undefined_rule".into()), "undefined_rule"),
                (
                    Grammar::Json(serde_json::json!({"type": "no-such-type"})),
                    "no-such-type",
                ),
                (Grammar::Json(serde_json::json!([1, 2])), "object"),
                (Grammar::Choice(vec![]), "no choice"),
            ] {
                let Err(e) = c.compile(&g) else {
                    panic!("{g:?} compiled");
                };
                assert!(e.0.contains(needle), "{g:?}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_form_is_tgis() {
        let g: Grammar = serde_json::from_str(r#"{"type": "regex", "value": "a+"}"#).unwrap();
        assert_eq!(g, Grammar::Regex("a+".into()));
        let g: Grammar = serde_json::from_str(r#"{"type": "json", "value": {"type": "object"}}"#).unwrap();
        assert_eq!(g, Grammar::Json(serde_json::json!({"type": "object"})));
    }

    #[test]
    fn the_least_recently_used_grammar_goes_first() {
        let recent = RecentGrammars::new(2);
        recent.insert("a".into(), 1);
        recent.insert("b".into(), 2);
        assert_eq!(recent.get_with("a", |v| *v), Some(1));
        recent.insert("c".into(), 3);
        assert_eq!(recent.len(), 2);
        assert_eq!(recent.get_with("b", |v| *v), None, "b was used least recently");
        assert_eq!(recent.get_with("a", |v| *v), Some(1));
    }

    #[test]
    fn oversized_grammars_are_refused_before_compiling() {
        let g = Grammar::Regex("a".repeat(MAX_GRAMMAR_BYTES + 1));
        assert!(g.check().unwrap_err().0.contains("limit"));
    }
}
