//! Why `worker serve` stops with an error, whichever part of the service it comes from.
//!
//! Its own module so that the parts that report it (the flags, the loader) do not depend on the service's
//! entry point, which depends on them.

use super::generator::EngineThreadError;
use super::health::Unhealthy;
use super::session::SessionError;

/// Why `worker serve` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid setting: {0}")]
    Config(String),
    #[error(transparent)]
    Engine(#[from] EngineThreadError),
    /// The watchdog gave up on the engine; the unfinished jobs went back to the queue. (Not a `source`:
    /// the reason is the message, and an error chain would print it twice.)
    #[error("the engine is unhealthy: {0}")]
    Unhealthy(Unhealthy),
    #[error("{0}")]
    Broker(String),
}

impl From<SessionError> for ServeError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Engine(e) => Self::Engine(e),
            SessionError::Unhealthy(e) => Self::Unhealthy(e),
            other => Self::Broker(other.to_string()),
        }
    }
}
