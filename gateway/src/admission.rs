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
//! the idempotency key, so a refusal charges nothing, and two replicas (or two requests of one client) cannot both take the last place.
//! [`Admissions::refund`] gives every charge back when the gateway then fails to publish the job.

use std::time::Duration;

use redis::Script;
use shared::JobId;

use crate::auth::Caller;
use crate::config::RateLimit;
use crate::decision::Decision;
use crate::kv::{Redis, RedisError};
use crate::outbox::Entry;
use crate::ratelimit::RouteClass;
use crate::store::NewRecord;

// KEYS: 1 request log, 2 record, 3 submission counter, 4 token bucket, 5 active set, 6 idempotency key,
//       7 outbox set, 8 outbox body
// ARGV: 1 window µs, 2 request limit, 3 log member, 4 record ttl ms, 5 µs per token, 6 token window µs,
//       7 cost (tokens), 8 active cap (0: none), 9 active entry lifetime µs, 10 job id,
//       11 idempotency fingerprint ('' without a key), 12 idempotency ttl ms, 13 job body,
//       14 outbox due ms, 15 outbox body ttl ms, 16.. record fields
// Returns {verdict, remaining, µs until a retry can pass, submission number, replayed job id}; verdict:
// 1 admitted, 0 request limit, 2 active cap, 3 token budget, 4 replay, 5 key reused with another body.
const ADMIT: &str = r#"
local now = redis_now()
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
if ARGV[11] ~= '' then
  local prior = redis.call('HMGET', KEYS[6], 'id', 'fingerprint')
  if prior[1] then
    if prior[2] == ARGV[11] then return {4, 0, 0, 0, prior[1]} end
    return {5, 0, 0, 0, prior[1]}
  end
end
local count = window_count(KEYS[1], now, window)
if count >= limit then return {0, 0, window_reset(KEYS[1], now, window), 0, ''} end
local cap = tonumber(ARGV[8])
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now - tonumber(ARGV[9]))
  if redis.call('ZCARD', KEYS[5]) >= cap then return {2, limit - count, 1000000, 0, ''} end
end
local tat = tonumber(redis.call('GET', KEYS[4]) or '0')
if tat < now then tat = now end
local new_tat = tat + tonumber(ARGV[7]) * tonumber(ARGV[5])
local allowed_at = new_tat - tonumber(ARGV[6])
if allowed_at > now then return {3, limit - count, allowed_at - now, 0, ''} end
redis.call('SET', KEYS[4], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
window_add(KEYS[1], now, window, ARGV[3])
if cap > 0 then
  redis.call('ZADD', KEYS[5], now, ARGV[10])
  redis.call('PEXPIRE', KEYS[5], math.ceil(tonumber(ARGV[9]) / 1000))
end
local seq = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[2], 'seq', seq, unpack(ARGV, 16))
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('SET', KEYS[8], ARGV[13], 'PX', ARGV[15])
redis.call('ZADD', KEYS[7], ARGV[14], ARGV[10])
if ARGV[11] ~= '' then
  redis.call('HSET', KEYS[6], 'id', ARGV[10], 'fingerprint', ARGV[11])
  redis.call('PEXPIRE', KEYS[6], ARGV[12])
end
return {1, limit - count - 1, window_reset(KEYS[1], now, window), seq, ''}
"#;

// KEYS: request log, token bucket, active set, idempotency key (or the log again when none)
// ARGV: log member, job id, token charge µs, whether to drop the idempotency key (0|1)
const REFUND: &str = r#"
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
if tat > 0 then
  local ttl = redis.call('PTTL', KEYS[2])
  if ttl > 0 then redis.call('SET', KEYS[2], string.format('%.0f', tat - tonumber(ARGV[3])), 'PX', ttl) end
end
if ARGV[4] == '1' then redis.call('DEL', KEYS[4]) end
return 1
"#;

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
    /// The message to publish, kept in the outbox under `outbox`.
    pub body: &'a [u8],
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
    prefix: String,
    bounds: Bounds,
    admit: Script,
    refund: Script,
}

impl Admissions {
    pub fn new(redis: Redis, namespace_prefix: String, bounds: Bounds) -> Self {
        Self {
            redis,
            prefix: namespace_prefix,
            bounds,
            admit: Script::new(&format!("{}{ADMIT}", crate::ratelimit::WINDOW_LUA)),
            refund: Script::new(REFUND),
        }
    }

    /// `{ns}:active:{client}`: the ids of the client's jobs that have not ended. Its name goes into each
    /// record (field `active`), so the scripts that end a job know which set to leave.
    pub fn active_key(&self, caller: &Caller) -> String {
        format!("{}active:{}", self.prefix, caller.id.key_part())
    }

    fn log_key(&self, caller: &Caller) -> String {
        crate::ratelimit::log_key(&self.prefix, RouteClass::Submit, caller)
    }

    fn tokens_key(&self, caller: &Caller) -> String {
        format!("{}rl:tokens:{}", self.prefix, caller.id.key_part())
    }

    fn idempotency_key(&self, caller: &Caller, key: &IdempotencyKey) -> String {
        format!("{}idem:{}:{}", self.prefix, caller.id.key_part(), key.key_digest)
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
        let idempotency_key = job.idempotency.as_ref().map(|k| self.idempotency_key(caller, k));
        let mut invocation = self.admit.prepare_invoke();
        invocation
            .key(self.log_key(caller))
            .key(&job.record.key)
            .key(&job.record.seq_key)
            .key(self.tokens_key(caller))
            .key(self.active_key(caller))
            .key(idempotency_key.clone().unwrap_or_else(|| self.log_key(caller)))
            .key(&job.outbox.set_key)
            .key(&job.outbox.body_key)
            .arg(requests.window.as_micros() as u64)
            .arg(requests.limit)
            .arg(member.as_str())
            .arg(job.record.ttl_ms)
            .arg(self.us_per_token())
            .arg(self.bounds.tokens.window.as_micros() as u64)
            .arg(job.cost)
            .arg(self.bounds.max_active)
            .arg(self.bounds.active_lifetime.as_micros() as u64)
            .arg(job.id.to_string())
            .arg(job.idempotency.as_ref().map_or("", |k| k.fingerprint.as_str()))
            .arg(self.bounds.idempotency_ttl.as_millis() as u64)
            .arg(job.body)
            .arg(job.outbox.due_ms)
            .arg(job.outbox.body_ttl_ms);
        for (field, value) in &job.record.fields {
            invocation.arg(*field).arg(value);
        }
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
        let mut invocation = self.refund.prepare_invoke();
        invocation
            .key(self.log_key(caller))
            .key(self.tokens_key(caller))
            .key(self.active_key(caller))
            .key(
                charge
                    .idempotency_key
                    .clone()
                    .unwrap_or_else(|| self.log_key(caller)),
            )
            .arg(charge.member.as_str())
            .arg(charge.id.to_string())
            .arg(charge.token_charge_us)
            .arg(if charge.idempotency_key.is_some() {
                "1"
            } else {
                "0"
            });
        self.redis
            .call(|mut c| async move { invocation.invoke_async::<i64>(&mut c).await })
            .await
            .map(|_| ())
    }
}
