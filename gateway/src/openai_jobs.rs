//! What an OpenAI request becomes as jobs, and what those jobs' records become as OpenAI's answer.
//!
//! Both directions live here, apart from the routes, because two callers need them: the synchronous routes
//! (`routes::openai`) and the Batch API ([`crate::batches`]), whose every output line's `response.body` must
//! be exactly what the synchronous route would have answered. One place builds the jobs (one per choice and
//! prompt, each choice with its own seed) and one builds the body, so the two cannot drift.

use shared::reply::Succeeded;
use shared::{GenerationParameters, JobRequest};

use crate::error::ApiError;
use crate::openai::{
    self, ChatCompletionRequest, CompletionChoice, CompletionRequest, Head, Usage, choice_seed,
};
use crate::openai_error::ParamError;
use crate::store::{JobRecord, Status};
use crate::tools::{ToolCalling, call_id};

/// Chat takes the job contract's default `max_tokens`; completions OpenAI's documented 16.
const CHAT_MAX_TOKENS: u32 = shared::params::DEFAULT_MAX_NEW_TOKENS;

/// Which endpoint's answer the jobs make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Completion {
        echo: bool,
    },
    /// A chat completion; `tools`, when the request forced a tool call, says how its text becomes the call.
    Chat {
        tools: Option<ToolCalling>,
    },
}

/// What every response and chunk of one request shares.
#[derive(Debug, Clone)]
pub struct Meta {
    pub head: Head,
    pub kind: Kind,
}

/// A request as jobs: the jobs in choice order (for completions, each prompt's `n` choices in turn), `n`, and
/// the kind of answer they make.
#[derive(Debug, Clone)]
pub struct Plan {
    pub jobs: Vec<JobRequest>,
    pub n: u32,
    pub kind: Kind,
}

impl Plan {
    /// `POST /v1/completions`' jobs.
    pub fn completion(served_model: &str, req: &CompletionRequest) -> Result<Self, ApiError> {
        check_model(served_model, &req.model)?;
        let parameters = req
            .parameters(openai::DEFAULT_COMPLETION_MAX_TOKENS)
            .map_err(param_error)?;
        let n = req.n().map_err(param_error)?;
        let mut jobs = Vec::new();
        for prompt in req.prompt.prompts() {
            for choice in 0..n {
                jobs.push(JobRequest::new(prompt.clone(), seeded(&parameters, choice)));
            }
        }
        Ok(Self {
            jobs,
            n,
            kind: Kind::Completion { echo: req.echo() },
        })
    }

    /// `POST /v1/chat/completions`' jobs.
    pub fn chat(served_model: &str, req: &ChatCompletionRequest) -> Result<Self, ApiError> {
        check_model(served_model, &req.model)?;
        let (parameters, tools) = req.parameters_and_tools(CHAT_MAX_TOKENS).map_err(param_error)?;
        let n = req.n().map_err(param_error)?;
        let jobs = (0..n)
            .map(|choice| JobRequest::chat(req.messages.clone(), seeded(&parameters, choice)))
            .collect();
        Ok(Self {
            jobs,
            n,
            kind: Kind::Chat { tools },
        })
    }
}

/// Refuses any model but the one served.
pub fn check_model(served_model: &str, model: &str) -> Result<(), ApiError> {
    if model == served_model {
        Ok(())
    } else {
        Err(ApiError::ModelNotFound(model.chars().take(128).collect()))
    }
}

pub fn param_error(e: ParamError) -> ApiError {
    ApiError::InvalidField {
        field: e.param,
        message: e.message,
    }
}

/// Choice `i`'s parameters: its own seed, so sampled choices differ yet reproduce.
fn seeded(parameters: &GenerationParameters, choice: u32) -> GenerationParameters {
    GenerationParameters {
        seed: choice_seed(parameters.seed, choice),
        ..parameters.clone()
    }
}

/// A finished job's text, or the error it ended with.
pub fn finished(record: &JobRecord) -> Result<&Succeeded, ApiError> {
    match (record.status, &record.result, &record.error) {
        (Status::Succeeded, Some(r), _) => Ok(r),
        (_, _, Some(error)) => Err(ApiError::JobFailed(error.clone())),
        _ => Err(ApiError::JobFailed(shared::ErrorBody::new(
            shared::ErrorCode::Internal,
            format!(
                "job {} ended {} without a result",
                record.id,
                record.status.as_str()
            ),
        ))),
    }
}

/// Usage over the choices: each prompt counted once (choices of one prompt share it), every completion.
pub fn usage<'a>(n: u32, results: impl Iterator<Item = &'a Succeeded>) -> Usage {
    let (mut prompt, mut completion) = (0, 0);
    for (i, r) in results.enumerate() {
        if (i as u32).is_multiple_of(n.max(1)) {
            prompt += r.prompt_tokens.unwrap_or(0);
        }
        completion += r.new_tokens;
    }
    Usage::new(prompt, completion)
}

/// The non-streamed answer to the request whose jobs ended as `records` (in the plan's order).
pub fn answer(
    meta: &Meta,
    vocabulary: &crate::logprobs::Vocabulary,
    n: u32,
    records: Vec<JobRecord>,
) -> Result<serde_json::Value, ApiError> {
    let results = records.iter().map(finished).collect::<Result<Vec<_>, _>>()?;
    let usage = usage(n, results.iter().copied());
    let body = match &meta.kind {
        &Kind::Completion { echo } => {
            let choices = results
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let text = if echo {
                        format!("{}{}", r.prompt, r.text)
                    } else {
                        r.text.clone()
                    };
                    let mut choice = CompletionChoice::new(i as u32, text, Some(r.finish_reason));
                    choice.logprobs = r.logprobs.as_ref().map(|generated| {
                        let prompt = r.prompt_logprobs.as_deref().filter(|_| echo).unwrap_or_default();
                        vocabulary.completion(prompt.iter().chain(generated))
                    });
                    choice
                })
                .collect();
            serde_json::to_value(openai::Completion::new(&meta.head, choices, usage))
        }
        Kind::Chat { tools } => {
            let choices = results
                .iter()
                .zip(&records)
                .enumerate()
                .map(|(i, (r, record))| {
                    let mut choice = match tools {
                        None => openai::ChatChoice::new(i as u32, r.text.clone(), r.finish_reason),
                        Some(calling) => openai::ChatChoice::forced(
                            i as u32,
                            calling,
                            call_id(&record.id),
                            &r.text,
                            r.finish_reason,
                        ),
                    };
                    choice.logprobs = r.logprobs.as_deref().map(|generated| vocabulary.chat(generated));
                    choice
                })
                .collect();
            serde_json::to_value(openai::ChatCompletion::new(&meta.head, choices, usage))
        }
    };
    body.map_err(|e| ApiError::Internal(e.to_string()))
}
