//! A job that cannot fit the model's context, refused before it is queued and charged: the prompt's tokens
//! (counted with the model's tokenizer, as TGI's router validates) plus `max_new_tokens` must fit
//! `--context-length`. Without it such a job would be queued, spend a rate-limit slot, and fail on a worker.
//!
//! Chat jobs are left to the worker: their prompt is the conversation rendered with the checkpoint's template,
//! which only the worker has.

use shared::ValidJob;
use tokenizers::Tokenizer;

use crate::error::ApiError;

pub struct ContextCheck {
    tokenizer: Tokenizer,
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
            tokenizer,
            context_length,
        })
    }

    /// The served model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn check(&self, job: &ValidJob) -> Result<(), ApiError> {
        if job.messages.is_some() {
            return Ok(());
        }
        let prompt_tokens = self
            .tokenizer
            .encode(job.prompt.as_str(), false)
            .map(|e| e.len())
            .map_err(|e| ApiError::Internal(format!("tokenizing a prompt: {e}")))?;
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
            .into_valid(&PromptRules::default())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn prompt_tokens_plus_new_tokens_must_fit_the_context() {
        let check = ContextCheck::new(None, 2048).unwrap_or_else(|e| panic!("{e}"));
        // "Once upon a time" is four GPT-J tokens.
        assert!(check.check(&job("Once upon a time", 2044)).is_ok());
        let err = check.check(&job("Once upon a time", 2045)).unwrap_err();
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
            check.check(&job("x", 2048)).is_err(),
            "2048 new tokens can never fit"
        );
    }
}
