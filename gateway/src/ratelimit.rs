//! Per-client, per-route-class rate limiting shared by every replica through Redis.
//!
//! The limit holds in *every* rolling window, not per fixed window (a fixed window lets a client through
//! twice the limit across a boundary): each client and class has a sorted set of admission times, a
//! sliding-window log. One Lua script per check drops entries older than the window, counts the rest and
//! admits when the count is below the limit — atomically, timed by Redis's own clock (`TIME`), so replicas
//! with skewed clocks still share one exact budget. Memory per client is bounded by the limit.
//!
//! For job submission the same script call also writes the job's `queued` record when it admits the
//! request: one Redis round trip per submission instead of two. Submissions are therefore checked after
//! their body is validated (in [`crate::app::App::enqueue`], not in a middleware): a request refused for
//! bad input costs no Redis call and no budget.
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
use crate::kv::{Redis, RedisError};
use crate::store::NewRecord;
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

// KEYS[1]: the client's log. ARGV: window (µs), limit, unique member.
// For a submission also KEYS[2]: the job record, KEYS[3]: the submission counter, ARGV[4]: the record's
// TTL (ms), ARGV[5..]: its fields and values; the record is written only when the request is admitted.
// Returns {admitted (0|1), remaining, µs until the oldest entry leaves the window, submission number}.
const SLIDING_WINDOW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
local admitted = 0
local seq = 0
if count < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000) + 1000)
  count = count + 1
  admitted = 1
  if KEYS[2] then
    seq = redis.call('INCR', KEYS[3])
    redis.call('HSET', KEYS[2], 'seq', seq, unpack(ARGV, 5))
    redis.call('PEXPIRE', KEYS[2], ARGV[4])
  end
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local reset = 0
if oldest[2] then reset = tonumber(oldest[2]) + window - now end
return {admitted, limit - count, reset, seq}
"#;

pub use crate::decision::Decision;

/// One route class's limiter.
#[derive(Clone)]
pub struct Limiter {
    redis: Redis,
    prefix: String,
    class: RouteClass,
    limit: RateLimit,
    on_error: FailMode,
    script: Arc<Script>,
}

impl Limiter {
    pub fn new(
        redis: Redis,
        namespace_prefix: String,
        class: RouteClass,
        limit: RateLimit,
        on_error: FailMode,
    ) -> Self {
        Self {
            redis,
            prefix: namespace_prefix,
            class,
            limit,
            on_error,
            script: Arc::new(Script::new(SLIDING_WINDOW)),
        }
    }

    /// The Redis key of a client's log: `{ns}:rl:{class}:{client}`.
    pub fn key(&self, caller: &Caller) -> String {
        format!("{}rl:{}:{}", self.prefix, self.class.name(), caller.id.key_part())
    }

    pub fn on_error(&self) -> FailMode {
        self.on_error
    }

    /// Asks Redis whether `caller` may go ahead.
    pub async fn check(&self, caller: &Caller) -> Result<Decision, RedisError> {
        self.run(caller, None).await.map(|(d, _)| d)
    }

    /// Asks whether `caller` may submit and, if so, writes the job's record in the same atomic call.
    /// Returns the decision and the admission (to [`Limiter::refund`] if the job is not taken after all).
    pub async fn admit_and_record(
        &self,
        caller: &Caller,
        record: &NewRecord,
    ) -> Result<(Decision, Admission), RedisError> {
        self.run(caller, Some(record)).await
    }

    /// Gives an admission back: the request it let through was refused for the gateway's own trouble (the
    /// broker would not take the job), which must not cost the client its budget.
    pub async fn refund(&self, caller: &Caller, admission: &Admission) -> Result<(), RedisError> {
        let key = self.key(caller);
        let member = admission.member.clone();
        self.redis
            .call(|mut c| async move {
                redis::cmd("ZREM")
                    .arg(key)
                    .arg(member)
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await
            .map(|_| ())
    }

    async fn run(
        &self,
        caller: &Caller,
        record: Option<&NewRecord>,
    ) -> Result<(Decision, Admission), RedisError> {
        let class = self.class.name();
        let result = self.invoke(caller, record).await;
        match &result {
            Ok((d, _)) if !d.admitted => metrics::counter!(m::RATE_LIMITED, "class" => class).increment(1),
            Ok(_) => {}
            Err(e) => {
                let mode = match self.on_error {
                    FailMode::Open => "open",
                    FailMode::Closed => "closed",
                };
                metrics::counter!(m::RATE_LIMIT_ERRORS, "class" => class, "mode" => mode).increment(1);
                tracing::warn!(error = %e, class, fail = mode, "rate limit check failed");
            }
        }
        result
    }

    async fn invoke(
        &self,
        caller: &Caller,
        record: Option<&NewRecord>,
    ) -> Result<(Decision, Admission), RedisError> {
        // The member must be unique per admission; the score carries the time.
        let member = format!("{:016x}", rand::random::<u64>());
        let window_us = self.limit.window.as_micros() as u64;
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(self.key(caller))
            .arg(window_us)
            .arg(self.limit.limit)
            .arg(member.as_str());
        if let Some(r) = record {
            invocation.key(&r.key).key(&r.seq_key).arg(r.ttl_ms);
            for (field, value) in &r.fields {
                invocation.arg(*field).arg(value);
            }
        }
        let (admitted, remaining, reset_us, seq): (i64, i64, i64, u64) = self
            .redis
            .call(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        let decision = Decision {
            admitted: admitted == 1,
            window: self.limit.window,
            limit: self.limit.limit,
            remaining: remaining.max(0) as u32,
            reset: Duration::from_micros(reset_us.max(0) as u64),
        };
        Ok((decision, Admission { seq, member }))
    }
}

/// One admission in a client's window.
#[derive(Debug, Clone)]
pub struct Admission {
    /// The job's submission number (0 when refused).
    pub seq: u64,
    member: String,
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
