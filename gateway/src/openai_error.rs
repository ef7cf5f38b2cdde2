//! A field of an OpenAI request that the service refuses, named as the client sent it: what the pure
//! conversions of [`crate::openai`] and [`crate::tools`] return, and what the routes answer as a 400 naming
//! `param` (`crate::openai_jobs::param_error`). Its own module, below both, so neither imports the other
//! back.

/// A request OpenAI would accept but this service cannot honour; `param` names the field as the client
/// sent it, which is what OpenAI's error body reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{param}`: {message}")]
pub struct ParamError {
    pub param: String,
    pub message: String,
}

pub(crate) fn param_error(param: &str, message: impl Into<String>) -> ParamError {
    ParamError {
        param: param.to_owned(),
        message: message.into(),
    }
}
