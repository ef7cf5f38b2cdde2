//! Per-client, per-route-class rate limiting shared by every replica through Redis.
//!
//! The limit holds in *every* rolling window, not per fixed window (a fixed window lets a client through
//! twice the limit across a boundary): each client and class has a sorted set of admission times, a
//! sliding-window log. One Lua script per check drops entries older than the window, counts the rest and
//! admits when the count is below the limit — atomically, timed by Redis's own clock (`TIME`), so replicas
//! with skewed clocks still share one exact budget. Memory per client is bounded by the limit.
//!
//! Submissions are checked by [`crate::admission`], which runs the same sliding window inside its own
//! script (with the client's other bounds, and the job's record), after the body is validated: a request
//! refused for bad input costs no Redis call and no budget. This module's middleware serves the reads.
//!
//! When Redis cannot answer within its timeout, the class's [`FailMode`] decides: closed refuses with 503
//! and `Retry-After`, open admits without headers. Both are logged and counted.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};

use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use redis::Script;

use crate::auth::Caller;
use crate::config::{FailMode, RateLimit};
use crate::error::ApiError;
use crate::keys::Keys;
use crate::kv::{Redis, RedisError};
use crate::telemetry as m;

/// Routes sharing one budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteClass {
    /// `POST /v1/jobs`, `POST /run`: each admission costs GPU time.
    Submit,
    /// `/v1/queue`, `/metrics`, job polls.
    Read,
}

impl RouteClass {
    pub fn name(self) -> &'static str {
        match self {
            Self::Submit => "submit",
            Self::Read => "read",
        }
    }
}

/// The sliding-window log as Lua functions, for this module's script and the submission's
/// ([`crate::admission`]): one log, one way to count it. Times are µs of Redis's clock.
pub(crate) const WINDOW_LUA: &str = r#"
local function redis_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
-- Drops the entries older than the window and counts the rest.
local function window_count(key, now, window)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  return redis.call('ZCARD', key)
end
local function window_add(key, now, window, member)
  redis.call('ZADD', key, now, member)
  redis.call('PEXPIRE', key, math.ceil(window / 1000) + 1000)
end
-- µs until the oldest entry leaves the window (a place frees up); 0 for an empty log.
local function window_reset(key, now, window)
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if oldest[2] then return tonumber(oldest[2]) + window - now end
  return 0
end
"#;

// KEYS[1]: the client's log. ARGV: window (µs), limit, unique member.
// Returns {admitted (0|1), remaining, µs until the oldest entry leaves the window}.
const SLIDING_WINDOW: &str = r#"
local now = redis_now()
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local count = window_count(KEYS[1], now, window)
local admitted = 0
if count < limit then
  window_add(KEYS[1], now, window, ARGV[3])
  count = count + 1
  admitted = 1
end
return {admitted, limit - count, window_reset(KEYS[1], now, window)}
"#;

pub use crate::decision::Decision;

/// One route class's limiter.
#[derive(Clone)]
pub struct Limiter {
    redis: Redis,
    keys: Keys,
    class: RouteClass,
    limit: RateLimit,
    on_error: FailMode,
    script: Arc<Script>,
}

impl Limiter {
    pub fn new(redis: Redis, keys: Keys, class: RouteClass, limit: RateLimit, on_error: FailMode) -> Self {
        Self {
            redis,
            keys,
            class,
            limit,
            on_error,
            script: Arc::new(Script::new(&format!("{WINDOW_LUA}{SLIDING_WINDOW}"))),
        }
    }

    /// Asks Redis whether `caller` may go ahead.
    pub async fn check(&self, caller: &Caller) -> Result<Decision, RedisError> {
        let result = self.invoke(caller).await;
        match &result {
            Ok(d) if !d.admitted => refused(self.class),
            Ok(_) => {}
            Err(e) => failed_check(self.class, self.on_error, e),
        }
        result
    }

    async fn invoke(&self, caller: &Caller) -> Result<Decision, RedisError> {
        // The member must be unique per admission; the score carries the time.
        let member = format!("{:016x}", rand::random::<u64>());
        let window_us = self.limit.window.as_micros() as u64;
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(self.keys.request_log(self.class.name(), &caller.id))
            .arg(window_us)
            .arg(self.limit.limit)
            .arg(member.as_str());
        let (admitted, remaining, reset_us): (i64, i64, i64) = self
            .redis
            .call(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        Ok(Decision {
            admitted: admitted == 1,
            window: self.limit.window,
            limit: self.limit.limit,
            remaining: remaining.max(0) as u32,
            reset: Duration::from_micros(reset_us.max(0) as u64),
        })
    }
}

/// Counts a request the class's limit refused.
pub fn refused(class: RouteClass) {
    metrics::counter!(m::RATE_LIMITED, "class" => class.name()).increment(1);
}

/// Logs and counts a check Redis could not answer (the fail mode then decides).
pub fn failed_check(class: RouteClass, on_error: FailMode, e: &RedisError) {
    let class = class.name();
    let mode = match on_error {
        FailMode::Open => "open",
        FailMode::Closed => "closed",
    };
    metrics::counter!(m::RATE_LIMIT_ERRORS, "class" => class, "mode" => mode).increment(1);
    tracing::warn!(error = %e, class, fail = mode, "rate limit check failed");
}

/// Middleware: checks the caller (put in extensions by the auth layer) against the class's limit.
pub async fn limit(State(limiter): State<Limiter>, request: Request, next: Next) -> Response {
    let Some(caller) = request.extensions().get::<Caller>().cloned() else {
        return ApiError::Internal("rate limiter ran before the caller was identified".into())
            .into_response();
    };
    match limiter.check(&caller).await {
        Ok(decision) if decision.admitted => {
            let mut response = next.run(request).await;
            decision.write_headers(response.headers_mut());
            response
        }
        Ok(decision) => ApiError::RateLimited(decision).into_response(),
        Err(e) => match limiter.on_error {
            FailMode::Open => next.run(request).await,
            FailMode::Closed => ApiError::unavailable("rate limiter", e).into_response(),
        },
    }
}
