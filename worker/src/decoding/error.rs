//! How decoding fails, one error type for every strategy and the scheduler.
//!
//! A leaf of `decoding`: the strategies, the scheduler and the tensor helpers all return it.

/// Why decoding failed: the model or a tensor operation reported an error.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] tch::TchError),
    #[error("{0}")]
    Invalid(String),
    /// The sequence can never fit the batch's KV budget.
    #[error("{0}")]
    TooLarge(String),
}

pub type Result<T> = std::result::Result<T, DecodeError>;

/// A caught panic's message (libtorch raises through `tch` as panics).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic")
}
