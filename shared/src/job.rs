//! The job message: what a producer publishes on `{ns}.jobs`.
//!
//! The body is versioned JSON; the job id travels as the AMQP `correlation_id` (and `message_id`), the
//! reply destination as `reply_to`. [`JobRequest::into_valid`] is the only way to a [`ValidJob`], which is
//! what the gateway publishes and what the worker runs.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::chat::{ChatError, ChatMessage, Role, clean_messages};
use crate::params::{GenerationParameters, GenerationPlan, InvalidParameter};
use crate::prompt::{PromptError, PromptRules};

/// The newest body version this build reads: 2 added `parameters.grammar`, 3 `deadline_ms`, 4 the `tool`
/// role and assistant messages' `tool_calls` in `messages`. It reads every version from
/// [`OLDEST_JOB_SCHEMA_VERSION`] on, and writes the oldest that holds the body (1 without a grammar, a
/// deadline or a tool turn), so the workers of the last release keep taking the jobs they can run during a
/// rolling upgrade.
pub const JOB_SCHEMA_VERSION: u32 = 4;
/// The oldest body version this build reads.
pub const OLDEST_JOB_SCHEMA_VERSION: u32 = 1;

/// Job ids are random UUIDv4 (122 random bits): unguessable, so a job id alone is a capability to poll
/// when API keys are off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct JobId(pub uuid::Uuid);

impl JobId {
    pub fn new_random() -> Self {
        Self(uuid::Uuid::new_v4())
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl std::str::FromStr for JobId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(Self)
    }
}

/// A job body as published on the jobs queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// Body version: 1; 2 for a body with `parameters.grammar`; 3 for a body with `deadline_ms`; 4 for
    /// `messages` with a `tool` message or `tool_calls`. This build understands 1 to 4.
    pub version: u32,
    /// The prompt text. Workers apply their prompt rules to it again: by default the text as written, less
    /// control characters other than tab, newline and carriage return, and bounded in tokens by the
    /// model's context (a worker configured with `--prompt-policy clean` cleans it as `/run` does). Empty
    /// (or absent) for a chat job.
    #[serde(default)]
    pub prompt: String,
    /// A conversation instead of a prompt: the worker renders it with its checkpoint's chat template (or
    /// the documented default), after applying the prompt rules to each message's content; the rules'
    /// length limits, if any, apply to the contents together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    /// Generation parameters; all optional.
    #[serde(default)]
    pub parameters: GenerationParameters,
    /// When the job was submitted, in milliseconds since the Unix epoch (for queue-time figures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_at_ms: Option<u64>,
    /// When the job stops being worth running, in milliseconds since the Unix epoch (version 3): a worker
    /// that takes it later does not run it and answers `job.failed` with `deadline_exceeded`. A job that
    /// has started runs to its end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
}

/// Why a job body cannot run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidJob {
    #[error(
        "unsupported job version {0}; this worker understands versions {OLDEST_JOB_SCHEMA_VERSION} to \
         {JOB_SCHEMA_VERSION}"
    )]
    Version(u32),
    #[error(transparent)]
    Prompt(#[from] PromptError),
    #[error(transparent)]
    Parameter(#[from] InvalidParameter),
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error("a job has a `prompt` or `messages`, not both")]
    PromptAndMessages,
}

/// A job that passed every check: its prompt through the rules, its plan validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidJob {
    /// The prompt through the rules; empty for a chat job.
    pub prompt: String,
    /// The conversation of a chat job, its contents through the rules.
    pub messages: Option<Vec<ChatMessage>>,
    pub parameters: GenerationParameters,
    pub plan: GenerationPlan,
    pub submitted_at_ms: Option<u64>,
    /// Not worth starting after this (ms since the Unix epoch).
    pub deadline_ms: Option<u64>,
}

impl JobRequest {
    pub fn new(prompt: impl Into<String>, parameters: GenerationParameters) -> Self {
        Self {
            version: version_for(&parameters, None, None),
            prompt: prompt.into(),
            messages: None,
            parameters,
            submitted_at_ms: None,
            deadline_ms: None,
        }
    }

    /// The same job with a deadline (ms since the Unix epoch), in the version that holds it.
    pub fn with_deadline(self, deadline_ms: u64) -> Self {
        Self {
            version: version_for(&self.parameters, Some(deadline_ms), self.messages.as_deref()),
            deadline_ms: Some(deadline_ms),
            ..self
        }
    }

    /// A chat job: the worker renders `messages` with its chat template.
    pub fn chat(messages: Vec<ChatMessage>, parameters: GenerationParameters) -> Self {
        Self {
            version: version_for(&parameters, None, Some(&messages)),
            messages: Some(messages),
            ..Self::new("", parameters)
        }
    }

    pub fn into_valid(self, rules: &PromptRules) -> Result<ValidJob, InvalidJob> {
        if !(OLDEST_JOB_SCHEMA_VERSION..=JOB_SCHEMA_VERSION).contains(&self.version) {
            return Err(InvalidJob::Version(self.version));
        }
        let (prompt, messages) = match &self.messages {
            Some(_) if !self.prompt.is_empty() => return Err(InvalidJob::PromptAndMessages),
            Some(messages) => (String::new(), Some(clean_messages(messages, rules)?)),
            None => (rules.clean(&self.prompt)?, None),
        };
        let plan = self.parameters.validate()?;
        Ok(ValidJob {
            prompt,
            messages,
            parameters: self.parameters,
            plan,
            submitted_at_ms: self.submitted_at_ms,
            deadline_ms: self.deadline_ms,
        })
    }
}

/// The oldest body version that holds these parameters and this deadline.
fn version_for(
    parameters: &GenerationParameters,
    deadline_ms: Option<u64>,
    messages: Option<&[ChatMessage]>,
) -> u32 {
    if messages.is_some_and(|m| m.iter().any(|m| m.role == Role::Tool)) {
        4
    } else if deadline_ms.is_some() {
        3
    } else if parameters.grammar.is_some() {
        2
    } else {
        OLDEST_JOB_SCHEMA_VERSION
    }
}

impl ValidJob {
    /// The body to publish: the prompt through the rules, so workers see what the gateway accepted.
    pub fn to_request(&self) -> JobRequest {
        JobRequest {
            version: version_for(&self.parameters, self.deadline_ms, self.messages.as_deref()),
            prompt: self.prompt.clone(),
            messages: self.messages.clone(),
            parameters: self.parameters.clone(),
            submitted_at_ms: self.submitted_at_ms,
            deadline_ms: self.deadline_ms,
        }
    }

    /// True when the job has a deadline and `now_ms` is past it: it must not start.
    pub fn expired_at(&self, now_ms: u64) -> bool {
        self.deadline_ms.is_some_and(|deadline| now_ms >= deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_body_is_a_prompt_and_a_version() {
        let req: JobRequest = serde_json::from_str(r#"{"version":1,"prompt":"Hello $world"}"#).unwrap();
        let job = req.clone().into_valid(&PromptRules::AsWritten).unwrap();
        assert_eq!(job.prompt, "Hello $world");
        assert_eq!(job.plan.max_new_tokens, 50);
        let cleaned = req.into_valid(&PromptRules::original()).unwrap();
        assert_eq!(cleaned.prompt, "Hello world");
    }

    #[test]
    fn a_future_version_is_refused() {
        let req = JobRequest {
            version: JOB_SCHEMA_VERSION + 1,
            ..JobRequest::new("hi", Default::default())
        };
        assert_eq!(
            req.into_valid(&PromptRules::AsWritten).unwrap_err(),
            InvalidJob::Version(JOB_SCHEMA_VERSION + 1)
        );
    }

    #[test]
    fn a_deadline_is_carried_in_version_3_and_expires_at_its_millisecond() {
        let req = JobRequest::new("hi", Default::default()).with_deadline(1_000);
        assert_eq!(req.version, 3);
        let text = serde_json::to_string(&req).unwrap();
        assert!(text.contains(r#""deadline_ms":1000"#), "{text}");
        let valid = req.into_valid(&PromptRules::AsWritten).unwrap();
        assert_eq!(valid.deadline_ms, Some(1_000));
        assert_eq!(valid.to_request().version, 3);
        assert!(!valid.expired_at(999));
        assert!(valid.expired_at(1_000));
        let plain = JobRequest::new("hi", Default::default());
        assert!(!serde_json::to_string(&plain).unwrap().contains("deadline"));
        assert!(
            !plain
                .into_valid(&PromptRules::AsWritten)
                .unwrap()
                .expired_at(u64::MAX)
        );
    }

    #[test]
    fn a_body_is_written_in_the_oldest_version_that_holds_it() {
        let plain = JobRequest::new("hi", Default::default());
        assert_eq!(plain.version, 1);
        let constrained = JobRequest::new(
            "hi",
            GenerationParameters {
                grammar: Some(crate::Grammar::Regex("a+".into())),
                ..Default::default()
            },
        );
        assert_eq!(constrained.version, 2);
        let valid = constrained.into_valid(&PromptRules::default()).unwrap();
        assert_eq!(valid.to_request().version, 2);
        let user = ChatMessage::new(Role::User, "hi");
        assert_eq!(
            JobRequest::chat(vec![user.clone()], Default::default()).version,
            1
        );
        let tool_turn = JobRequest::chat(vec![user, ChatMessage::new(Role::Tool, "42")], Default::default());
        assert_eq!(tool_turn.version, 4);
        let valid = tool_turn.into_valid(&PromptRules::AsWritten).unwrap();
        assert_eq!(valid.to_request().version, 4);
    }

    #[test]
    fn job_ids_round_trip_through_text() {
        let id = JobId::new_random();
        assert_eq!(id.to_string().parse::<JobId>().unwrap(), id);
        assert!("not-a-uuid".parse::<JobId>().is_err());
    }
}
