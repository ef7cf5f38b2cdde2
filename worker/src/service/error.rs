//! Why `worker serve` stops with an error, whichever part of the service it comes from.
//!
//! Its own module, below every part of the service: the parts that report it (the flags, the loader, the
//! session's end) depend on it, and it on none of them but the engine thread and the watchdog, whose
//! reasons it carries.

use super::generator::EngineThreadError;
use super::health::Unhealthy;

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
