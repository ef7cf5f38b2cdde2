//! What a job is to the engine thread: the input it continues and what comes back, its [`Completion`] and
//! its [`Outcome`].
//!
//! A leaf of the service: the engine thread, the real engine behind it, the metrics and the session all
//! speak these types, and none of them has to depend on another to do so.

use shared::ErrorBody;
use shared::chat::ChatMessage;

use crate::engine::Generation;

/// What a job asks the engine to continue.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A cleaned prompt.
    Text(String),
    /// A cleaned conversation, for the engine to render with its chat template.
    Chat(Vec<ChatMessage>),
}

/// A job's input as the engine thread takes it, prepared on the async side (`text`).
#[derive(Debug, Clone)]
pub struct Prompt {
    /// What the model continues: the job's prompt, or its conversation rendered with the chat template (a
    /// test's stand-in generator, which has no template: the messages' contents, one a line).
    pub text: String,
    /// `text`'s token ids as the model runs them; empty where the generator has no text side (a stand-in).
    pub ids: Vec<i64>,
    /// The job's grammar, compiled; `None` without one (or without a text side to compile it).
    pub grammar: Option<crate::decoding::Constraint>,
    /// The lane the job came from: in the engine's waiting line, interactive jobs go first.
    pub lane: shared::Lane,
}

/// What the running batch produced for one job, ready for its `job.succeeded` reply: the generation (its
/// `prefill_ms` runs from joining the batch to the first token), and what only a batch knows. The engine's
/// batch reports ids only: its text, and the rendered prompt, are written on the async side (`text`).
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The prompt the model saw, when the engine built it (a rendered conversation).
    pub prompt: Option<String>,
    pub generation: Generation,
    /// Reaching the engine to the first token (beam search: to its answer).
    pub time_to_first_token_ms: u64,
    /// The most sequences the running batch held while this job was in it.
    pub batch_size: usize,
    /// Reaching the engine to the answer: the job's wall time in the batch, waiting to join included.
    pub inference_ms: u64,
}

/// The result of one job: text, or the error its `job.failed` reply carries.
pub type Outcome = Result<Completion, ErrorBody>;
