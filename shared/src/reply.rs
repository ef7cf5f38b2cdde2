//! Replies a worker publishes on a job's `reply_to` queue, under the job's `correlation_id`.
//!
//! Each reply's AMQP `type` property is its event name (`job.started`, `job.token`, `job.succeeded`,
//! `job.failed`, `job.cancelled`), and the JSON body carries the same name in its `event` field, so a
//! consumer can dispatch on either. A job gets one `job.started` (again if redelivered), `job.token` replies
//! while it generates, and exactly one final reply.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::job::{InvalidJob, JobId};
use crate::prompt::PromptError;

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// The model produced its end-of-sequence token.
    Eos,
    /// A stop sequence was produced.
    Stop,
}

/// Stable machine-readable error codes, shared by HTTP errors and failed-job replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidJson,
    InvalidParameter,
    UnknownField,
    PromptEmpty,
    PromptTooShort,
    PromptTooLong,
    PromptDisallowedCharacters,
    UnsupportedVersion,
    MissingCorrelationId,
    ContextOverflow,
    GenerationFailed,
    PayloadTooLarge,
    NotFound,
    MethodNotAllowed,
    InvalidJobId,
    Unauthorized,
    RateLimited,
    TooManyWaits,
    /// The client (its address) holds as many connections as it may (429), or the gateway does (503);
    /// retry after `Retry-After`.
    TooManyConnections,
    Timeout,
    Unavailable,
    Internal,
    /// The job was cancelled (`DELETE /v1/jobs/{id}`, a client that hung up, or a `job.cancel` message).
    Cancelled,
    /// An OpenAI-compatible request named a model this deployment does not serve.
    ModelNotFound,
    /// The job waited in the queue past its expiration (`--job-expiration-ms`) and no worker took it.
    Expired,
    /// The job was delivered as often as `--delivery-limit` allows without an answer.
    DeliveryLimit,
    /// The broker dead-lettered the job for another reason (refused, or the queue was full).
    Rejected,
    /// The queue holds as many jobs as the gateway admits (`--max-queued-jobs`); retry after `Retry-After`.
    QueueFull,
    /// The client has as many jobs queued and running as it may (`--max-active-jobs-per-client`).
    TooManyActiveJobs,
    /// The client's budget of generated tokens (`max_new_tokens` × beams) is spent for now
    /// (`--token-rate-limit`), or one job alone costs more than the whole budget.
    TokenRateLimited,
    /// An `Idempotency-Key` that names an earlier submission with another body.
    IdempotencyKeyReused,
    /// The broker never confirmed the job, though the gateway retried: it may or may not have run.
    PublishFailed,
    /// The job's deadline (`deadline_ms`) passed before a worker could start it: it never ran. At
    /// submission: the queue's estimated wait is past the deadline asked for.
    DeadlineExceeded,
    /// The gateway cannot tell whether it took the job: Redis did not answer while the job was being
    /// recorded, so the record may or may not have been written. The answer's `job_id` names the job;
    /// reading it tells (404 while nothing was recorded). Not a refusal: the job may run.
    OutcomeUnknown,
}

/// `{code, message}`: the error shape everywhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<&PromptError> for ErrorCode {
    fn from(e: &PromptError) -> Self {
        match e {
            PromptError::Empty => Self::PromptEmpty,
            PromptError::TooShort { .. } => Self::PromptTooShort,
            PromptError::TooLong { .. } => Self::PromptTooLong,
            PromptError::Disallowed(_) => Self::PromptDisallowedCharacters,
        }
    }
}

impl From<&InvalidJob> for ErrorBody {
    fn from(e: &InvalidJob) -> Self {
        let code = match e {
            InvalidJob::Version(_) => ErrorCode::UnsupportedVersion,
            InvalidJob::Prompt(p) => p.into(),
            InvalidJob::Parameter(_) => ErrorCode::InvalidParameter,
            InvalidJob::Chat(crate::chat::ChatError::Prompt(p)) => p.into(),
            InvalidJob::Chat(_) | InvalidJob::PromptAndMessages => ErrorCode::InvalidParameter,
        };
        Self::new(code, e.to_string())
    }
}

/// Where the time went, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Timings {
    /// From submission to a worker taking the job (when the producer set `submitted_at_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_ms: Option<u64>,
    /// Joining the running batch (the prompt's forward pass) to the first token.
    pub prefill_ms: u64,
    /// The first token to the last.
    pub decode_ms: u64,
    /// Whole inference, reaching the worker's engine to decoded text (waiting for a place in the batch
    /// included).
    pub inference_ms: u64,
    /// Reaching the worker's engine to the first generated token (beam search: to its answer, which comes
    /// whole).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_to_first_token_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Started {
    pub job_id: JobId,
    pub worker_id: String,
    /// Milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// Whether the broker delivered this job before (to a worker that died or lost its connection).
    #[serde(default)]
    pub redelivered: bool,
    /// Tokens of the prompt the model runs (for a chat job, the rendered conversation), when the worker
    /// knows them as the job starts: streams report usage from the first chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u32>,
}

/// Tokens generated since the previous `job.token` reply, coalesced (a few tokens or a few milliseconds).
///
/// Two cursors make a chunk idempotent, so a consumer can drop what it has already seen (a redelivered
/// reply, or a job rerun from the start after its worker died): `index` counts tokens, `text_offset` counts
/// bytes of streamed text. The text never splits a UTF-8 character and holds back what may still turn out
/// to be a stop sequence, so the streamed texts concatenated are always a prefix of the final `text`; the
/// rest comes with `job.succeeded`. Beam search sends no tokens: its answer is known only at the end.
///
/// When the job asked for log-probabilities (`parameters.logprobs`), each chunk carries those of its
/// `token_ids`, one per id: they go with the ids, not with the text (held-back text does not hold them
/// back), so the chunks' `logprobs` concatenated are a prefix of the final `logprobs`, cut by `index` as the
/// ids are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Token {
    pub job_id: JobId,
    /// Index of the first token of `token_ids` in the generation.
    pub index: u32,
    pub token_ids: Vec<u32>,
    /// Bytes of streamed text before `text`.
    pub text_offset: u32,
    /// The text added since the previous chunk (may be empty while text is held back).
    pub text: String,
    /// The log-probability of each of `token_ids`, when `parameters.logprobs` asked for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// A token's log-probability under the model (natural log, of the raw distribution: before the repetition
/// penalty, temperature or any other processor, as vLLM reports them by default), and the likeliest tokens
/// at its position when asked for (`top`, most likely first; the token itself may or may not be among them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TokenLogprob {
    pub id: u32,
    /// `null` only for a prompt's first token, which nothing precedes.
    pub logprob: Option<f32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<TopLogprob>,
}

/// One of the likeliest tokens at a position.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TopLogprob {
    pub id: u32,
    pub logprob: f32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Succeeded {
    pub job_id: JobId,
    pub worker_id: String,
    /// The cleaned prompt the model saw.
    pub prompt: String,
    /// The generated continuation only (stop sequence excluded).
    pub text: String,
    pub token_ids: Vec<u32>,
    pub new_tokens: u32,
    /// Tokens of the prompt the model saw (for a chat job, the rendered conversation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u32>,
    pub finish_reason: FinishReason,
    pub timings: Timings,
    /// The most jobs the worker's running batch held while this one was in it (continuous batching).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    /// Each generated token's log-probability, when `parameters.logprobs` asked for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// Each prompt token's log-probability given the tokens before it (the first's is `null`), when
    /// `parameters.prompt_logprobs` asked for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<TokenLogprob>>,
    pub finished_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Failed {
    /// Absent only when the message carried no usable correlation id.
    pub job_id: Option<JobId>,
    pub worker_id: String,
    pub error: ErrorBody,
    pub finished_at_ms: u64,
}

/// The job was cancelled before it finished; `new_tokens` were generated before it stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Cancelled {
    pub job_id: JobId,
    pub worker_id: String,
    pub new_tokens: u32,
    pub finished_at_ms: u64,
}

/// A reply body; `event` matches the AMQP `type` property.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "event")]
pub enum JobReply {
    #[serde(rename = "job.started")]
    Started(Started),
    #[serde(rename = "job.token")]
    Token(Token),
    #[serde(rename = "job.succeeded")]
    Succeeded(Succeeded),
    #[serde(rename = "job.failed")]
    Failed(Failed),
    #[serde(rename = "job.cancelled")]
    Cancelled(Cancelled),
}

impl JobReply {
    /// The AMQP `type` property for this reply.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Started(_) => "job.started",
            Self::Token(_) => "job.token",
            Self::Succeeded(_) => "job.succeeded",
            Self::Failed(_) => "job.failed",
            Self::Cancelled(_) => "job.cancelled",
        }
    }

    pub fn is_final(&self) -> bool {
        matches!(self, Self::Succeeded(_) | Self::Failed(_) | Self::Cancelled(_))
    }

    pub fn job_id(&self) -> Option<JobId> {
        match self {
            Self::Started(s) => Some(s.job_id),
            Self::Token(t) => Some(t.job_id),
            Self::Succeeded(s) => Some(s.job_id),
            Self::Failed(f) => f.job_id,
            Self::Cancelled(c) => Some(c.job_id),
        }
    }

    /// The worker (or `gateway`) that sent it; token chunks do not say.
    pub fn worker_id(&self) -> Option<&str> {
        match self {
            Self::Started(s) => Some(&s.worker_id),
            Self::Token(_) => None,
            Self::Succeeded(s) => Some(&s.worker_id),
            Self::Failed(f) => Some(&f.worker_id),
            Self::Cancelled(c) => Some(&c.worker_id),
        }
    }
}

/// Milliseconds since the Unix epoch, by this machine's clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_field_matches_the_amqp_type() {
        let reply = JobReply::Failed(Failed {
            job_id: None,
            worker_id: "w1".into(),
            error: ErrorBody::new(ErrorCode::InvalidJson, "bad"),
            finished_at_ms: 1,
        });
        let v = serde_json::to_value(&reply).unwrap();
        assert_eq!(v["event"], reply.kind());
        assert_eq!(v["error"]["code"], "invalid_json");
        assert_eq!(serde_json::from_value::<JobReply>(v).unwrap(), reply);
    }
}
