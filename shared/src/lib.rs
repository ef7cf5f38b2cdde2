//! The job contract: everything the gateway, the workers and third-party AMQP producers must agree on.
//!
//! Keeping it in one crate means the two sides cannot drift: the gateway validates with exactly the rules
//! the worker re-applies (AMQP producers bypass the gateway), and the JSON Schema that outside producers
//! read is generated from these very types (`docs/schema/`, checked by a test).

pub mod backoff;
pub mod brokers;
pub mod chat;
pub mod control;
pub mod grammar;
pub mod job;
pub mod lane;
pub mod owner;
pub mod params;
pub mod prompt;
pub mod reply;
pub mod schema;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tokens;
pub mod topology;

pub use grammar::{Grammar, GrammarError};
pub use job::{JOB_SCHEMA_VERSION, JobId, JobRequest, ValidJob};
pub use lane::Lane;
pub use params::{Decoding, GenerationParameters, GenerationPlan, InvalidParameter, Strategy};
pub use prompt::{Cleaning, DisallowedPolicy, PromptError, PromptPolicy, PromptRules};
pub use reply::{ErrorBody, ErrorCode, FinishReason, JobReply, Timings, TokenLogprob, TopLogprob};
pub use topology::Topology;
