//! A rate limiter's verdict and the `RateLimit-*` headers it is told with: a leaf module, because both the
//! limiter (`ratelimit`) and the error type (`error`, whose 429 carries the verdict) need it.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub admitted: bool,
    pub window: Duration,
    pub limit: u32,
    pub remaining: u32,
    /// Until the oldest admission in the window leaves it (a slot frees up).
    pub reset: Duration,
}

/// Whole seconds, rounded up, at least 1: what a `Retry-After` can say of a wait.
pub fn retry_after_secs(wait: &Duration) -> u64 {
    (wait.as_micros().div_ceil(1_000_000) as u64).max(1)
}

impl Decision {
    /// `RateLimit-*` headers (IETF draft), plus `Retry-After` on refusal.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        let window = self.window;
        let reset_s = self.reset.as_micros().div_ceil(1_000_000) as u64;
        headers.insert("ratelimit-limit", HeaderValue::from(self.limit));
        headers.insert("ratelimit-remaining", HeaderValue::from(self.remaining));
        headers.insert("ratelimit-reset", HeaderValue::from(reset_s));
        if let Ok(policy) = HeaderValue::from_str(&format!("{};w={}", self.limit, window.as_secs().max(1))) {
            headers.insert("ratelimit-policy", policy);
        }
        if !self.admitted {
            headers.insert("retry-after", HeaderValue::from(retry_after_secs(&self.reset)));
        }
    }
}
