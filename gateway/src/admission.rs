//! Whether a job may enter: every per-client bound on submissions, checked and charged in one atomic Redis
//! call that also writes the job's `queued` record.
//!
//! A submission passes, in this order:
//! 1. its `Idempotency-Key`, if it has one: a key already used by this client names the first job, which
//!    is answered again at no charge (with another body, the key is refused as reused);
//! 2. the submit rate limit, a sliding-window log of requests (see [`crate::ratelimit`]);
//! 3. the client's cap on jobs queued and running at once (Stripe's concurrency limiter): a sorted set
//!    `{ns}:active:{client}` of job ids, which every final-state script of [`crate::store`] leaves;
//! 4. the client's token budget, a GCRA (generic cell rate) bucket `{ns}:rl:tokens:{client}` charged with
//!    the job's cost, `max_new_tokens` × beams: the requests limit counts requests, this counts GPU work.
//!
//! Only when all pass does the script write the charges, the record, the job's body into the outbox
//! ([`crate::outbox`]: a gateway that dies before the broker confirms the job leaves it to another) and
//! the idempotency key, so a refusal charges nothing, and two replicas (or two requests of one client)
//! cannot both take the last place. [`Admissions::refund`] gives every charge back when the gateway then
//! fails to publish the job.
//!
//! The scripts take their arguments by name, as one JSON object each ([`AdmitArgs`], [`RefundArgs`]), and
//! their keys from [`crate::keys`], named on their first line.

use std::time::Duration;

use redis::Script;
use serde::Serialize;
use shared::JobId;

use crate::auth::Caller;
use crate::config::RateLimit;
use crate::decision::Decision;
use crate::keys::Keys;
use crate::kv::{Redis, RedisError};
use crate::outbox::Entry;
use crate::ratelimit::RouteClass;
use crate::store::NewRecord;

// KEYS, named on the script's first line: the submit class's request log, the record, the submission
// counter, the token bucket, the active set, the outbox, the job's body in it, and the idempotency key
// when the submission has one. ARGV[1]: the named arguments, [`AdmitArgs`] as JSON.
// Returns {verdict, remaining, µs until a retry can pass, submission number, replayed job id}; verdict:
// 1 admitted, 0 request limit, 2 active cap, 3 token budget, 4 replay, 5 key reused with another body.
const ADMIT: &str = r#"
local log, record, seq, bucket, active, outbox, outbox_body, idem = unpack(KEYS)
local a = cjson.decode(ARGV[1])
local now = redis_now()
local window = a.window_us
local limit = a.limit
if idem then
  local prior = redis.call('HMGET', idem, 'id', 'fingerprint')
  if prior[1] then
    if prior[2] == a.fingerprint then return {4, 0, 0, 0, prior[1]} end
    return {5, 0, 0, 0, prior[1]}
  end
end
local count = window_count(log, now, window)
if count >= limit then return {0, 0, window_reset(log, now, window), 0, ''} end
local cap = a.active_cap
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', active, '-inf', now - a.active_lifetime_us)
  if redis.call('ZCARD', active) >= cap then return {2, limit - count, 1000000, 0, ''} end
end
local tat = tonumber(redis.call('GET', bucket) or '0')
if tat < now then tat = now end
local new_tat = tat + a.cost * a.us_per_token
local allowed_at = new_tat - a.token_window_us
if allowed_at > now then return {3, limit - count, allowed_at - now, 0, ''} end
redis.call('SET', bucket, string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
window_add(log, now, window, a.member)
if cap > 0 then
  redis.call('ZADD', active, now, a.job_id)
  redis.call('PEXPIRE', active, math.ceil(a.active_lifetime_us / 1000))
end
local number = redis.call('INCR', seq)
redis.call('HSET', record, 'seq', number, unpack(a.record))
redis.call('PEXPIRE', record, a.record_ttl_ms)
redis.call('SET', outbox_body, a.body, 'PX', a.outbox_ttl_ms)
redis.call('ZADD', outbox, a.outbox_due_ms, a.job_id)
if idem then
  redis.call('HSET', idem, 'id', a.job_id, 'fingerprint', a.fingerprint)
  redis.call('PEXPIRE', idem, a.idempotency_ttl_ms)
end
return {1, limit - count - 1, window_reset(log, now, window), number, ''}
"#;

/// The admission script's arguments, by name (its one `ARGV`, as JSON).
#[derive(Serialize)]
struct AdmitArgs<'a> {
    /// The submit class's sliding window (µs) and the requests it admits.
    window_us: u64,
    limit: u32,
    /// This request's entry in the log: unique per admission (the score carries the time).
    member: &'a str,
    job_id: String,
    /// The token bucket: what one token costs of it (µs), its window (µs), and the job's cost in tokens.
    us_per_token: f64,
    token_window_us: u64,
    cost: u64,
    /// Jobs queued and running at once (0: no cap), and how long an id counts as active at most (µs).
    active_cap: u32,
    active_lifetime_us: u64,
    /// A digest of the body the `Idempotency-Key` came with, when there is one, and how long the key is
    /// kept (ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    fingerprint: Option<&'a str>,
    idempotency_ttl_ms: u64,
    /// The record's fields, names and values alternating, and its TTL (ms).
    record: Vec<&'a str>,
    record_ttl_ms: u64,
    /// The job's body as the outbox keeps it: until when (a TTL, ms), and when a sweep may first take it.
    body: &'a str,
    outbox_ttl_ms: u64,
    outbox_due_ms: u64,
}

// KEYS, named on the script's first line: the request log, the token bucket, the active set, and the
// idempotency key when the admission wrote one. ARGV[1]: [`RefundArgs`] as JSON.
const REFUND: &str = r#"
local log, bucket, active, idem = unpack(KEYS)
local a = cjson.decode(ARGV[1])
redis.call('ZREM', log, a.member)
redis.call('ZREM', active, a.job_id)
local tat = tonumber(redis.call('GET', bucket) or '0')
if tat > 0 then
  local ttl = redis.call('PTTL', bucket)
  if ttl > 0 then redis.call('SET', bucket, string.format('%.0f', tat - a.token_charge_us), 'PX', ttl) end
end
if idem then redis.call('DEL', idem) end
return 1
"#;

/// The refund script's arguments, by name (its one `ARGV`, as JSON).
#[derive(Serialize)]
struct RefundArgs<'a> {
    /// The admission's entry in the request log.
    member: &'a str,
    job_id: String,
    /// What the job's cost added to the token bucket (µs).
    token_charge_us: f64,
}

/// One JSON argument, as the scripts decode it (`cjson`).
fn json_arg(args: &impl Serialize) -> Result<String, RedisError> {
    serde_json::to_string(args).map_err(|e| RedisError::Corrupt(format!("script arguments: {e}")))
}

/// The bounds on one client's submissions.
#[derive(Debug, Clone)]
pub struct Bounds {
    pub requests: RateLimit,
    pub tokens: RateLimit,
    /// Jobs queued and running at once; 0 for no cap.
    pub max_active: u32,
    /// How long an id counts as active at most, so a job whose end was never recorded (its record
    /// deleted by hand, say) cannot hold a place for ever.
    pub active_lifetime: Duration,
    pub idempotency_ttl: Duration,
}

/// A submission to admit.
pub struct Submission<'a> {
    pub id: JobId,
    pub record: &'a NewRecord,
    /// `max_new_tokens` × beams.
    pub cost: u64,
    /// The client's `Idempotency-Key` and a digest of the body it came with.
    pub idempotency: Option<IdempotencyKey>,
    /// The message to publish, kept in the outbox as `outbox` says.
    pub body: &'a str,
    pub outbox: Entry,
}

/// An `Idempotency-Key` as kept: a digest of the key (keys are the client's text, not ours to store) and of
/// the body it was first used with.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    pub key_digest: String,
    pub fingerprint: String,
}

impl IdempotencyKey {
    pub fn new(key: &str, body: &[u8]) -> Self {
        use sha2::{Digest, Sha256};
        Self {
            key_digest: hex(&Sha256::digest(key.as_bytes())),
            fingerprint: hex(&Sha256::digest(body)),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the script said.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Charged and recorded; `Decision` is for the `RateLimit-*` headers.
    Admitted(Decision, Charge),
    RateLimited(Decision),
    TooManyActive {
        limit: u32,
    },
    TokensSpent {
        retry_after: Duration,
    },
    /// The key names an earlier job with the same body: answer that one.
    Replay(JobId),
    /// The key names an earlier job with another body.
    KeyReused(JobId),
}

/// What an admission charged, to give back with [`Admissions::refund`].
#[derive(Debug, Clone)]
pub struct Charge {
    pub seq: u64,
    member: String,
    id: JobId,
    token_charge_us: f64,
    idempotency_key: Option<String>,
}

/// The submission checks of one gateway.
#[derive(Clone)]
pub struct Admissions {
    redis: Redis,
    keys: Keys,
    bounds: Bounds,
    admit: Script,
    refund: Script,
}

impl Admissions {
    pub fn new(redis: Redis, keys: Keys, bounds: Bounds) -> Self {
        Self {
            redis,
            keys,
            bounds,
            admit: Script::new(&format!("{}{ADMIT}", crate::ratelimit::WINDOW_LUA)),
            refund: Script::new(REFUND),
        }
    }

    /// The submit class's request log of the caller.
    fn log_key(&self, caller: &Caller) -> String {
        self.keys.request_log(RouteClass::Submit.name(), &caller.id)
    }

    fn us_per_token(&self) -> f64 {
        self.bounds.tokens.window.as_micros() as f64 / f64::from(self.bounds.tokens.limit)
    }

    /// The most one job may cost: the whole token budget.
    pub fn max_cost(&self) -> u64 {
        u64::from(self.bounds.tokens.limit)
    }

    pub async fn admit(&self, caller: &Caller, job: &Submission<'_>) -> Result<Verdict, RedisError> {
        let member = format!("{:016x}", rand::random::<u64>());
        let requests = self.bounds.requests;
        let idempotency_key = job
            .idempotency
            .as_ref()
            .map(|k| self.keys.idempotency(&caller.id, &k.key_digest));
        let args = AdmitArgs {
            window_us: requests.window.as_micros() as u64,
            limit: requests.limit,
            member: &member,
            job_id: job.id.to_string(),
            us_per_token: self.us_per_token(),
            token_window_us: self.bounds.tokens.window.as_micros() as u64,
            cost: job.cost,
            active_cap: self.bounds.max_active,
            active_lifetime_us: self.bounds.active_lifetime.as_micros() as u64,
            fingerprint: job.idempotency.as_ref().map(|k| k.fingerprint.as_str()),
            idempotency_ttl_ms: self.bounds.idempotency_ttl.as_millis() as u64,
            record: job
                .record
                .fields
                .iter()
                .flat_map(|(field, value)| [*field, value.as_str()])
                .collect(),
            record_ttl_ms: job.record.ttl_ms,
            body: job.body,
            outbox_ttl_ms: job.outbox.body_ttl_ms,
            outbox_due_ms: job.outbox.due_ms,
        };
        let mut invocation = self.admit.prepare_invoke();
        let keys = [
            self.log_key(caller),
            self.keys.job(job.id),
            self.keys.seq(),
            self.keys.token_bucket(&caller.id),
            self.keys.active(&caller.id),
            self.keys.outbox(job.outbox.lane),
            self.keys.outbox_body(job.id),
        ];
        for key in keys.into_iter().chain(idempotency_key.clone()) {
            invocation.key(key);
        }
        invocation.arg(json_arg(&args)?);
        let (verdict, remaining, retry_us, seq, prior): (i64, i64, i64, u64, String) = self
            .redis
            .call(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        let decision = |admitted| Decision {
            admitted,
            window: requests.window,
            limit: requests.limit,
            remaining: remaining.max(0) as u32,
            reset: Duration::from_micros(retry_us.max(0) as u64),
        };
        let prior_id = || {
            prior
                .parse::<JobId>()
                .map_err(|_| RedisError::Corrupt(format!("idempotency key names `{prior}`, not a job id")))
        };
        Ok(match verdict {
            1 => Verdict::Admitted(
                decision(true),
                Charge {
                    seq,
                    member,
                    id: job.id,
                    token_charge_us: job.cost as f64 * self.us_per_token(),
                    idempotency_key,
                },
            ),
            0 => Verdict::RateLimited(decision(false)),
            2 => Verdict::TooManyActive {
                limit: self.bounds.max_active,
            },
            3 => Verdict::TokensSpent {
                retry_after: Duration::from_micros(retry_us.max(0) as u64),
            },
            4 => Verdict::Replay(prior_id()?),
            _ => Verdict::KeyReused(prior_id()?),
        })
    }

    /// Gives every charge of an admission back (the job was not published after all, which must not cost
    /// the client): its request slot, its place among the active jobs, its tokens and its idempotency key,
    /// so a retry with the same key makes the job anew.
    pub async fn refund(&self, caller: &Caller, charge: &Charge) -> Result<(), RedisError> {
        let args = RefundArgs {
            member: &charge.member,
            job_id: charge.id.to_string(),
            token_charge_us: charge.token_charge_us,
        };
        let mut invocation = self.refund.prepare_invoke();
        let keys = [
            self.log_key(caller),
            self.keys.token_bucket(&caller.id),
            self.keys.active(&caller.id),
        ];
        for key in keys.into_iter().chain(charge.idempotency_key.clone()) {
            invocation.key(key);
        }
        invocation.arg(json_arg(&args)?);
        self.redis
            .call(|mut c| async move { invocation.invoke_async::<i64>(&mut c).await })
            .await
            .map(|_| ())
    }
}
