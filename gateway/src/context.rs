//! A job that cannot fit the model's context, refused before it is queued and charged: the prompt's tokens
//! (counted with the model's tokenizer, as TGI's router validates) plus `max_new_tokens` must fit
//! `--context-length`. Without it such a job would be queued, spend a rate-limit slot, and fail on a worker.
//!
//! This is the bound on a prompt taken as written (`shared::prompt`): tokens against the context, not
//! characters. A prompt may be as long as the body limit allows, so it is tokenized on Tokio's blocking pool,
//! not on the threads that serve requests.
//!
//! Chat jobs are left to the worker: their prompt is the conversation rendered with the checkpoint's template,
//! which only the worker has; it refuses one that overflows (`context_overflow`) before it runs.

use std::sync::Arc;

use shared::ValidJob;
use tokenizers::Tokenizer;

use crate::error::ApiError;

pub struct ContextCheck {
    tokenizer: Arc<Tokenizer>,
    context_length: usize,
}

impl ContextCheck {
    /// The served model's `tokenizer.json`, or GPT-J's when none is given.
    pub fn new(tokenizer_json: Option<&std::path::Path>, context_length: usize) -> Result<Self, String> {
        let tokenizer = match tokenizer_json {
            Some(path) => {
                Tokenizer::from_file(path).map_err(|e| format!("--tokenizer {}: {e}", path.display()))?
            }
            None => Tokenizer::from_bytes(shared::tokens::GPTJ_TOKENIZER_JSON)
                .map_err(|e| format!("the bundled tokenizer: {e}"))?,
        };
        Ok(Self {
            tokenizer: Arc::new(tokenizer),
            context_length,
        })
    }

    /// The served model's tokenizer.
    pub fn tokenizer(&self) -> Arc<Tokenizer> {
        self.tokenizer.clone()
    }

    /// Refuses a text job whose prompt tokens and `max_new_tokens` overflow the context.
    pub async fn check(&self, job: &ValidJob) -> Result<(), ApiError> {
        if job.messages.is_some() {
            return Ok(());
        }
        let tokenizer = self.tokenizer.clone();
        let prompt = job.prompt.clone();
        let prompt_tokens = tokio::task::spawn_blocking(move || {
            tokenizer
                .encode(prompt.as_str(), false)
                .map(|e| e.len())
                .map_err(|e| ApiError::Internal(format!("tokenizing a prompt: {e}")))
        })
        .await
        .map_err(|e| ApiError::Internal(format!("the tokenizer panicked: {e}")))??;
        let max_new_tokens = job.plan.max_new_tokens;
        if prompt_tokens + max_new_tokens > self.context_length {
            return Err(ApiError::ContextOverflow {
                prompt_tokens,
                max_new_tokens,
                context_length: self.context_length,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::{GenerationParameters, JobRequest, PromptRules};

    fn job(prompt: &str, max_new_tokens: u32) -> ValidJob {
        let parameters = GenerationParameters {
            max_new_tokens: Some(max_new_tokens),
            ..Default::default()
        };
        JobRequest::new(prompt, parameters)
            .into_valid(&PromptRules::AsWritten)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test]
    async fn prompt_tokens_plus_new_tokens_must_fit_the_context() {
        let check = ContextCheck::new(None, 2048).unwrap_or_else(|e| panic!("{e}"));
        // "Once upon a time" is four GPT-J tokens.
        assert!(check.check(&job("Once upon a time", 2044)).await.is_ok());
        let err = check.check(&job("Once upon a time", 2045)).await.unwrap_err();
        assert!(
            matches!(
                err,
                ApiError::ContextOverflow {
                    prompt_tokens: 4,
                    max_new_tokens: 2045,
                    context_length: 2048
                }
            ),
            "{err:?}"
        );
        assert!(
            check.check(&job("x", 2048)).await.is_err(),
            "2048 new tokens can never fit"
        );
    }

    #[tokio::test]
    async fn a_prompt_as_written_is_bounded_in_tokens_not_characters() {
        let check = ContextCheck::new(None, 2048).unwrap_or_else(|e| panic!("{e}"));
        // 2,000 characters of a repeated word: hundreds of tokens, far more characters than the old limit.
        let long = "hello ".repeat(333);
        assert!(check.check(&job(&long, 16)).await.is_ok());
        // Past the context in tokens, whatever the characters.
        let err = check.check(&job(&"hello ".repeat(2100), 16)).await.unwrap_err();
        assert!(matches!(err, ApiError::ContextOverflow { .. }), "{err:?}");
    }
}
