//! A job's grammar compiled at submission, so one that cannot compile (a malformed JSON Schema, a bad
//! regular expression, a Lark grammar naming an undefined rule) is refused with a 400 naming the problem
//! before it is queued and charged, instead of failing on a worker.
//!
//! Compiling takes milliseconds and runs on Tokio's blocking pool; a grammar that compiled is remembered by
//! its text (up to [`REMEMBERED`]), so a client sending the same schema again pays nothing. The compiler
//! itself (the vocabulary's token trie) is built with the first grammar, not at startup: a gateway that
//! never sees one never pays for it, and starts as fast as it did. The worker compiles it again for its own
//! model (AMQP producers bypass the gateway).

use std::sync::{Arc, OnceLock};

use shared::grammar::{Grammar, GrammarCompiler, RecentGrammars};
use shared::{InvalidParameter, ValidJob};

use crate::error::ApiError;

/// Grammars remembered as compiling.
pub const REMEMBERED: usize = 1024;

pub struct GrammarCheck {
    tokenizer: Arc<tokenizers::Tokenizer>,
    compiler: Arc<OnceLock<Result<GrammarCompiler, String>>>,
    /// Grammars that compiled, by their text.
    known: RecentGrammars<()>,
}

impl GrammarCheck {
    /// Against `tokenizer`'s vocabulary (ids past it never match a grammar, so its size is enough here).
    pub fn new(tokenizer: Arc<tokenizers::Tokenizer>) -> Self {
        Self {
            tokenizer,
            compiler: Arc::new(OnceLock::new()),
            known: RecentGrammars::new(REMEMBERED),
        }
    }

    /// Refuses the job when its grammar does not compile.
    pub async fn check(&self, job: &ValidJob) -> Result<(), ApiError> {
        let Some(grammar) = job.plan.grammar.clone() else {
            return Ok(());
        };
        let key = grammar.key();
        if self.known.get_with(&key, |_| ()).is_some() {
            return Ok(());
        }
        let (compiler, tokenizer) = (self.compiler.clone(), self.tokenizer.clone());
        let compiled = tokio::task::spawn_blocking(move || {
            let compiler = compiler
                .get_or_init(|| {
                    let eos = tokenizer.token_to_id("<|endoftext|>").unwrap_or(0);
                    GrammarCompiler::new(&tokenizer, tokenizer.get_vocab_size(true), eos)
                        .map_err(|e| e.to_string())
                })
                .as_ref()
                .map_err(|e| ApiError::Internal(format!("the grammar compiler: {e}")))?;
            compile(compiler, &grammar)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("compiling a grammar: {e}")))?;
        compiled?;
        self.known.insert(key, ());
        Ok(())
    }
}

fn compile(compiler: &GrammarCompiler, grammar: &Grammar) -> Result<(), ApiError> {
    compiler.compile(grammar).map(drop).map_err(|e| {
        ApiError::InvalidJob(shared::job::InvalidJob::Parameter(InvalidParameter {
            field: "grammar",
            message: e.to_string(),
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::{GenerationParameters, JobRequest, PromptRules};

    fn job(grammar: Option<Grammar>) -> ValidJob {
        JobRequest::new(
            "hi",
            GenerationParameters {
                grammar,
                ..Default::default()
            },
        )
        .into_valid(&PromptRules::default())
        .unwrap()
    }

    fn check() -> GrammarCheck {
        let tokenizer = tokenizers::Tokenizer::from_bytes(shared::tokens::GPTJ_TOKENIZER_JSON).unwrap();
        GrammarCheck::new(Arc::new(tokenizer))
    }

    #[tokio::test]
    async fn a_grammar_that_does_not_compile_is_refused_naming_the_problem() {
        let c = check();
        let bad = job(Some(Grammar::Json(
            serde_json::json!({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}),
        )));
        let e = c.check(&bad).await.unwrap_err();
        let text = e.to_string();
        assert!(text.contains("grammar") && text.contains("nowhere"), "{text}");
    }

    #[tokio::test]
    async fn a_required_tool_calls_grammar_compiles_with_each_schemas_own_refs() {
        let tools = serde_json::json!([
            {"type": "function", "function": {"name": "pick", "parameters": {
                "$defs": {"Color": {"enum": ["red", "blue"]}},
                "type": "object", "properties": {"color": {"$ref": "#/$defs/Color"}}, "required": ["color"]}}},
            {"type": "function", "function": {"name": "now"}},
        ]);
        let (grammar, _) = crate::tools::forced_call(Some(&tools), Some(&serde_json::json!("required")))
            .unwrap()
            .unwrap();
        check().check(&job(Some(grammar))).await.unwrap();
    }

    #[tokio::test]
    async fn a_good_grammar_passes_and_is_remembered() {
        let c = check();
        c.check(&job(None)).await.unwrap();
        let good = job(Some(Grammar::Regex("[0-9]+".into())));
        c.check(&good).await.unwrap();
        assert_eq!(c.known.len(), 1);
    }
}
