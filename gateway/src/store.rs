//! Job records in Redis: written at submission and from the replies, read by any replica's poll.
//!
//! A record is a hash `{ns}:job:{id}` (every name: [`crate::keys`]), created by the submission's admission
//! (see [`crate::admission`]) and numbered by `{ns}:seq` for queue positions. Replies are applied by one
//! Lua script, atomically, so that replicas consuming replies concurrently cannot interleave: a final
//! status is never overwritten (a late or redelivered `job.started` after `job.succeeded` is ignored), the
//! `{ns}:running` set (for `/v1/queue`'s `running`) and the `{ns}:taken` counter (for queue positions)
//! change with the status, and the final write publishes the job id on `{ns}:done`, which wakes `/run`
//! waits on every replica.
//!
//! Expiry is in two steps: a result is readable for the result TTL (`expires_at_ms`), after which the
//! record answers `expired` until Redis drops the key, `expired_retention` later; then the id is 404.
//!
//! Each job also has an event log, the Redis Stream `{ns}:events:{id}` (gone with the result): `started`, `token`
//! chunks and the final event, appended by the same scripts that change the record, and announced on
//! `{ns}:events`. Any replica can serve any job's event stream from it, and a stream entry's id is the
//! Server-Sent Event id a client resumes from. Token chunks carry two cursors (tokens, text bytes) that the
//! record keeps (`stream_tokens`, `stream_bytes`), so a redelivered chunk or a job rerun after its worker
//! died adds only what the log lacks; a chunk that arrives ahead of an earlier one (replies are consumed
//! concurrently, by several replicas) is refused until the earlier one lands. The final `succeeded` write
//! appends whatever text the chunks did not carry, so the log always ends with the whole text.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::Script;
use shared::reply::{Failed, Started, Succeeded, now_ms};
use shared::{ErrorBody, JobId, JobReply, Lane, TokenLogprob};

use crate::auth::ClientId;
use crate::keys::Keys;
use crate::kv::{Redis, RedisError};

/// A job's lifecycle as polls report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Expired,
}

impl Status {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
        }
    }
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::Expired
        )
    }
}

/// A job record as stored.
#[derive(Debug, Clone)]
pub struct JobRecord {
    pub id: JobId,
    pub status: Status,
    pub prompt: String,
    pub parameters: serde_json::Value,
    /// Hex digest of the submitting API key, when keys are on.
    pub owner: Option<String>,
    pub seq: u64,
    pub submitted_at_ms: Option<u64>,
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    pub worker_id: Option<String>,
    pub attempts: u32,
    pub result: Option<Succeeded>,
    pub error: Option<ErrorBody>,
    /// The lane the job was queued in (interactive for records older than lanes).
    pub lane: Lane,
}

/// Queue-wide figures kept in Redis.
#[derive(Debug, Clone, Copy, Default)]
pub struct Figures {
    /// Jobs started and not finished (from the replies).
    pub running: u64,
    /// Jobs that have left the queued state since the namespace began.
    pub taken: u64,
    /// Moving average of inference time of succeeded jobs.
    pub avg_inference_ms: Option<f64>,
}

/// What a new record holds.
pub struct NewJob<'a> {
    pub prompt: &'a str,
    pub parameters_json: &'a str,
    pub owner: Option<&'a str>,
    /// The submitting client, whose active set (see [`crate::admission`]) the job leaves when it ends.
    pub client: &'a ClientId,
    pub submitted_at_ms: u64,
    pub lane: Lane,
}

/// Takes an ended job out of its client's active set (see [`crate::admission`]), whose name the record
/// keeps: a key the script does not declare, which a single Redis (not a cluster) allows.
const LEAVE_ACTIVE: &str = r#"
local function leave_active(job, id)
  local active = redis.call('HGET', job, 'active')
  if active then redis.call('ZREM', active, id) end
end
"#;

/// Appends a token entry for the tokens and text past the record's cursors (Lua, shared by the scripts).
/// `scores`, when the job asked for log-probabilities, holds each of `ids`' as JSON, one a line
/// ([`scores_arg`]; empty when there are none): the entry's `logprobs` are cut by the token cursor as its
/// ids are, and copied as written (Lua's JSON would round-trip the floats through its own formatting).
const APPEND_TOKENS: &str = r#"
local function append_tokens(job, events, index, ids, offset, text, scores)
  local have_t = tonumber(redis.call('HGET', job, 'stream_tokens') or '0')
  local have_b = tonumber(redis.call('HGET', job, 'stream_bytes') or '0')
  if index > have_t or offset > have_b then return -1 end
  local lines = nil
  if scores ~= '' then
    lines = {}
    for line in string.gmatch(scores, '[^\n]+') do lines[#lines + 1] = line end
    -- Not one per token: the producer is broken, and the entry goes without rather than misaligned.
    if #lines ~= #ids then lines = nil end
  end
  local new, new_scores = {}, {}
  for i = have_t - index + 1, #ids do
    new[#new + 1] = ids[i]
    if lines then new_scores[#new_scores + 1] = lines[i] end
  end
  local tail = string.sub(text, have_b - offset + 1)
  if #new == 0 and #tail == 0 then return 0 end
  local data = '{"index":' .. have_t .. ',"token_ids":[' .. table.concat(new, ',') .. '],"text":'
    .. (cjson.encode(tail):gsub('\\/', '/'))
  if lines then data = data .. ',"logprobs":[' .. table.concat(new_scores, ',') .. ']' end
  redis.call('XADD', events, '*', 'event', 'token', 'data', data .. '}')
  redis.call('HSET', job, 'stream_tokens', have_t + #new, 'stream_bytes', have_b + #tail)
  return 1
end
"#;

// KEYS: job, running, taken, stats, events
// ARGV: event, job id, now ms, key ttl ms, expires-at ms, worker id, payload json, inference ms,
//       started-at ms, done channel, events channel, event data json, the result's token log-probabilities
//       ([`scores_arg`]; empty when it has none), the owner the reply names (empty when none), '1' when a
//       start must leave a record that is gone as it is ([`JobStore::apply_unless_gone`])
const APPLY: &str = r#"
local status = redis.call('HGET', KEYS[1], 'status')
local event = ARGV[1]
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
  -- A start that lost a race with the end (another replica applied the final reply first) still counts.
  if event == 'started' and redis.call('HEXISTS', KEYS[1], 'started_at_ms') == 0 then
    redis.call('HSET', KEYS[1], 'started_at_ms', ARGV[9])
    redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  end
  return 0
end
-- The same start again (a reply redelivered after its acknowledgement was lost): nothing new happened.
if event == 'started' and status == 'running' then
  local seen = redis.call('HMGET', KEYS[1], 'worker_id', 'started_at_ms')
  if seen[1] == ARGV[6] and seen[2] == ARGV[9] then return 0 end
end
if status == false and event == 'started' and ARGV[15] == '1' then return -1 end
if status == false or status == 'queued' then redis.call('INCR', KEYS[3]) end
-- A record the replies recreate (Redis lost it) belongs to the owner the reply names (`shared::owner`).
if status == false and ARGV[14] ~= '' then redis.call('HSET', KEYS[1], 'owner', ARGV[14]) end
local now = tonumber(ARGV[3])
if event == 'started' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'worker_id', ARGV[6], 'started_at_ms', ARGV[9])
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('ZADD', KEYS[2], now, ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[4]))
  redis.call('XADD', KEYS[5], '*', 'event', 'started', 'data', ARGV[12])
else
  local field = 'result'
  if event ~= 'succeeded' then field = 'error' end
  redis.call('HSET', KEYS[1], 'status', event, 'worker_id', ARGV[6], field, ARGV[7],
    'finished_at_ms', ARGV[3], 'expires_at_ms', ARGV[5])
  redis.call('ZREM', KEYS[2], ARGV[2])
  leave_active(KEYS[1], ARGV[2])
  if event == 'succeeded' then
    local ms = tonumber(ARGV[8])
    local avg = tonumber(redis.call('HGET', KEYS[4], 'avg_inference_ms'))
    if avg then avg = 0.8 * avg + 0.2 * ms else avg = ms end
    redis.call('HSET', KEYS[4], 'avg_inference_ms', tostring(avg))
    if status ~= false then
      local r = cjson.decode(ARGV[7])
      append_tokens(KEYS[1], KEYS[5], 0, r.token_ids, 0, r.text, ARGV[13])
    end
  end
  redis.call('XADD', KEYS[5], '*', 'event', event, 'data', ARGV[12])
  redis.call('PUBLISH', ARGV[10], ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if event == 'started' then
  redis.call('PEXPIRE', KEYS[5], ARGV[4])
else
  -- The log holds the text: it goes when the result does, not with the record's `expired` tombstone.
  redis.call('PEXPIREAT', KEYS[5], ARGV[5])
end
redis.call('PUBLISH', ARGV[11], ARGV[2])
return 1
"#;

// KEYS: job, events
// ARGV: index, token ids (comma-separated), text offset, text, key ttl ms, events channel, job id,
//       the tokens' log-probabilities ([`scores_arg`]; empty when the chunk has none)
const TOKENS: &str = r#"
local status = redis.call('HGET', KEYS[1], 'status')
if status == false or status == 'succeeded' or status == 'failed' or status == 'cancelled' then return 0 end
local ids = {}
for id in string.gmatch(ARGV[2], '[^,]+') do ids[#ids + 1] = id end
local added = append_tokens(KEYS[1], KEYS[2], tonumber(ARGV[1]), ids, tonumber(ARGV[3]), ARGV[4], ARGV[8])
if added == 1 then
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  redis.call('PUBLISH', ARGV[6], ARGV[7])
end
return added
"#;

// KEYS: job, running, taken, events
// ARGV: now ms, expires-at ms, key ttl ms, error json, done channel, events channel, job id
const CANCEL: &str = r#"
local status = redis.call('HGET', KEYS[1], 'status')
if status == false then return 'missing' end
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return status end
if status == 'queued' then redis.call('INCR', KEYS[3]) end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'error', ARGV[4], 'finished_at_ms', ARGV[1],
  'expires_at_ms', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[7])
leave_active(KEYS[1], ARGV[7])
redis.call('XADD', KEYS[4], '*', 'event', 'cancelled', 'data', '{}')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIREAT', KEYS[4], ARGV[2])
redis.call('PUBLISH', ARGV[5], ARGV[7])
redis.call('PUBLISH', ARGV[6], ARGV[7])
return status
"#;

/// What applying a token chunk did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// New tokens or text went into the job's event log.
    Added,
    /// Nothing new (already there, or the job is final or unknown).
    Nothing,
    /// An earlier chunk has not landed yet; try again shortly.
    Gap,
}

/// What a cancel found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job was queued or running and is now `cancelled`.
    Cancelled {
        was: Status,
    },
    /// The job had already ended; nothing changed.
    AlreadyFinal(Status),
    Missing,
}

/// One entry of a job's event log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    /// The stream entry id, e.g. `1733000000000-0`: the SSE event id.
    pub id: String,
    /// `started`, `token`, `succeeded`, `failed` or `cancelled`.
    pub event: String,
    /// JSON: the started or token data (`{}` for final events, whose data is the record).
    pub data: String,
}

impl LogEntry {
    /// A `token` entry's data; `None` for other events (or an entry that does not parse).
    pub fn token(&self) -> Option<TokenEntry> {
        if self.event != "token" {
            return None;
        }
        serde_json::from_str(&self.data).ok()
    }
}

/// A `token` entry's data, as [`APPEND_TOKENS`] writes it: what the log lacked of a chunk.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct TokenEntry {
    /// Index of the first of `token_ids` in the generation.
    pub index: u32,
    pub token_ids: Vec<u32>,
    pub text: String,
    /// One per id of `token_ids`, when the job asked for log-probabilities.
    #[serde(default)]
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// A record to create: its TTL and its fields (its key and the counter that numbers it: [`Keys`]).
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub ttl_ms: u64,
    pub fields: Vec<(&'static str, String)>,
}

/// Reads and writes job records.
#[derive(Clone)]
pub struct JobStore {
    redis: Redis,
    keys: Keys,
    result_ttl: Duration,
    retention: Duration,
    apply: Script,
    tokens: Script,
    cancel: Script,
    /// The last figures read and when, shared by the clones of this store (every follower of a queued
    /// job on this replica reads them).
    figures: Arc<tokio::sync::Mutex<Option<(std::time::Instant, Figures)>>>,
}

impl JobStore {
    pub fn new(redis: Redis, keys: Keys, result_ttl: Duration, retention: Duration) -> Self {
        Self {
            redis,
            keys,
            result_ttl,
            retention,
            apply: Script::new(&format!("{LEAVE_ACTIVE}{APPEND_TOKENS}{APPLY}")),
            tokens: Script::new(&format!("{APPEND_TOKENS}{TOKENS}")),
            cancel: Script::new(&format!("{LEAVE_ACTIVE}{CANCEL}")),
            figures: Arc::default(),
        }
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    fn key_ttl_ms(&self) -> u64 {
        (self.result_ttl + self.retention).as_millis() as u64
    }

    /// What the `queued` record of a new job is made of. The admission script writes it in the same call
    /// that checks and charges the client (one round trip), before the publish, so a reply can never
    /// arrive for a job without a record.
    pub fn record(&self, job: &NewJob<'_>) -> NewRecord {
        let mut fields = vec![
            ("status", "queued".to_owned()),
            ("prompt", job.prompt.to_owned()),
            ("parameters", job.parameters_json.to_owned()),
            ("submitted_at_ms", job.submitted_at_ms.to_string()),
            (
                "expires_at_ms",
                (job.submitted_at_ms + self.result_ttl.as_millis() as u64).to_string(),
            ),
        ];
        if let Some(owner) = job.owner {
            fields.push(("owner", owner.to_owned()));
        }
        fields.push(("lane", job.lane.name().to_owned()));
        fields.push(("active", self.keys.active(job.client)));
        NewRecord {
            ttl_ms: self.key_ttl_ms(),
            fields,
        }
    }

    /// Applies one reply. Returns false when it changed nothing (the job was already final). `owner` is the
    /// one the reply's message names ([`shared::owner`]): it owns a record the reply recreates.
    pub async fn apply(&self, reply: &JobReply, owner: Option<&str>) -> Result<bool, RedisError> {
        Ok(self.apply_with(reply, owner, false).await? == 1)
    }

    /// [`apply`](Self::apply), except that a `job.started` whose job has no record (Redis lost it) leaves
    /// it so: `None`. For a start that waited, when the job's later replies may have been recorded
    /// meanwhile and lost with the data since ([`crate::replies`]).
    pub async fn apply_unless_gone(
        &self,
        reply: &JobReply,
        owner: Option<&str>,
    ) -> Result<Option<bool>, RedisError> {
        Ok(match self.apply_with(reply, owner, true).await? {
            -1 => None,
            changed => Some(changed == 1),
        })
    }

    async fn apply_with(
        &self,
        reply: &JobReply,
        owner: Option<&str>,
        leave_gone: bool,
    ) -> Result<i64, RedisError> {
        let Some(id) = reply.job_id() else {
            return Ok(0);
        };
        let now = now_ms();
        let expires_at = now + self.result_ttl.as_millis() as u64;
        let corrupt = |e: serde_json::Error| RedisError::Corrupt(e.to_string());
        let mut data = "{}".to_owned();
        // The tokens the chunks did not carry go into the log with the result, their scores with them.
        let scores = match reply {
            JobReply::Succeeded(s) => scores_arg(s.logprobs.as_deref())?,
            _ => String::new(),
        };
        let (event, worker, payload, inference_ms, started_at) = match reply {
            JobReply::Started(
                started @ Started {
                    worker_id,
                    started_at_ms,
                    ..
                },
            ) => {
                let mut fields = serde_json::json!({
                    "worker_id": worker_id,
                    "started_at_ms": started_at_ms,
                    "redelivered": started.redelivered,
                });
                if let Some(n) = started.prompt_tokens {
                    fields["prompt_tokens"] = n.into();
                }
                data = serde_json::to_string(&fields).map_err(corrupt)?;
                ("started", worker_id.as_str(), String::new(), 0, *started_at_ms)
            }
            JobReply::Succeeded(s) => (
                "succeeded",
                s.worker_id.as_str(),
                serde_json::to_string(s).map_err(|e| RedisError::Corrupt(e.to_string()))?,
                s.timings.inference_ms,
                0,
            ),
            JobReply::Failed(Failed { worker_id, error, .. }) => (
                "failed",
                worker_id.as_str(),
                serde_json::to_string(error).map_err(|e| RedisError::Corrupt(e.to_string()))?,
                0,
                0,
            ),
            JobReply::Cancelled(c) => (
                "cancelled",
                c.worker_id.as_str(),
                serde_json::to_string(&ErrorBody::new(
                    shared::ErrorCode::Cancelled,
                    format!("the job was cancelled after {} tokens", c.new_tokens),
                ))
                .map_err(corrupt)?,
                0,
                0,
            ),
            JobReply::Token(t) => return self.append(t).await.map(|a| i64::from(a == Appended::Added)),
        };
        let mut invocation = self.apply.prepare_invoke();
        invocation
            .key(self.keys.job(id))
            .key(self.keys.running())
            .key(self.keys.taken())
            .key(self.keys.stats())
            .arg(event)
            .arg(id.to_string())
            .arg(now)
            .arg(self.key_ttl_ms())
            .arg(expires_at)
            .arg(worker)
            .arg(payload)
            .arg(inference_ms)
            .arg(started_at)
            .arg(self.keys.done_channel())
            .arg(self.keys.events_channel())
            .arg(data)
            .arg(scores)
            .arg(owner.unwrap_or(""))
            .arg(if leave_gone { "1" } else { "" });
        invocation.key(self.keys.events(id));
        self.redis
            .call(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await
    }

    /// Appends a token chunk to the job's event log (what of it is new).
    pub async fn append(&self, chunk: &shared::reply::Token) -> Result<Appended, RedisError> {
        let ids = chunk
            .token_ids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut invocation = self.tokens.prepare_invoke();
        invocation
            .key(self.keys.job(chunk.job_id))
            .key(self.keys.events(chunk.job_id))
            .arg(chunk.index)
            .arg(ids)
            .arg(chunk.text_offset)
            .arg(chunk.text.as_str())
            .arg(self.key_ttl_ms())
            .arg(self.keys.events_channel())
            .arg(chunk.job_id.to_string())
            .arg(scores_arg(chunk.logprobs.as_deref())?);
        let added: i64 = self
            .redis
            .call(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        Ok(match added {
            1 => Appended::Added,
            -1 => Appended::Gap,
            _ => Appended::Nothing,
        })
    }

    /// Marks a queued or running job `cancelled` (a final state); a job already final is left as it is.
    pub async fn cancel(&self, id: JobId) -> Result<CancelOutcome, RedisError> {
        let now = now_ms();
        let error = serde_json::to_string(&ErrorBody::new(
            shared::ErrorCode::Cancelled,
            "the job was cancelled",
        ))
        .map_err(|e| RedisError::Corrupt(e.to_string()))?;
        let mut invocation = self.cancel.prepare_invoke();
        invocation
            .key(self.keys.job(id))
            .key(self.keys.running())
            .key(self.keys.taken())
            .key(self.keys.events(id))
            .arg(now)
            .arg(now + self.result_ttl.as_millis() as u64)
            .arg(self.key_ttl_ms())
            .arg(error)
            .arg(self.keys.done_channel())
            .arg(self.keys.events_channel())
            .arg(id.to_string());
        let before: String = self
            .redis
            .call(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        Ok(match before.as_str() {
            "missing" => CancelOutcome::Missing,
            other => match Status::parse(other) {
                Some(s) if s.is_final() => CancelOutcome::AlreadyFinal(s),
                Some(was) => CancelOutcome::Cancelled { was },
                None => return Err(RedisError::Corrupt(format!("job {id} has status {other:?}"))),
            },
        })
    }

    /// Up to `count` entries of the job's event log after `after` (a stream id; `0-0` from the start),
    /// with the record, in one round trip.
    pub async fn read_log(
        &self,
        id: JobId,
        after: &str,
        count: usize,
    ) -> Result<(Vec<LogEntry>, Option<JobRecord>), RedisError> {
        let mut pipe = redis::pipe();
        pipe.cmd("XRANGE")
            .arg(self.keys.events(id))
            .arg(format!("({after}"))
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .hgetall(self.keys.job(id));
        type Raw = Vec<(String, Vec<(String, Vec<u8>)>)>;
        let (raw, fields): (Raw, HashMap<String, String>) = self
            .redis
            .call(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        let entries = raw
            .into_iter()
            .map(|(id, pairs)| {
                let mut event = String::new();
                let mut data = String::new();
                for (k, v) in pairs {
                    // Lossy: a rerun whose text differs could leave a cut character; never fail a stream on it.
                    let v = String::from_utf8_lossy(&v).into_owned();
                    match k.as_str() {
                        "event" => event = v,
                        "data" => data = v,
                        _ => {}
                    }
                }
                LogEntry { id, event, data }
            })
            .collect();
        let record = if fields.is_empty() {
            None
        } else {
            Some(parse_record(id, fields, now_ms())?)
        };
        Ok((entries, record))
    }

    /// Reads a record (`None` when unknown or long gone) together with the queue-wide figures, in one
    /// round trip.
    pub async fn get(&self, id: JobId) -> Result<Option<(JobRecord, Figures)>, RedisError> {
        let mut pipe = redis::pipe();
        pipe.hgetall(self.keys.job(id));
        self.add_figures(&mut pipe);
        let (fields, running, taken, avg): (HashMap<String, String>, u64, Option<u64>, Option<f64>) = self
            .redis
            .call(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        let figures = Figures {
            running,
            taken: taken.unwrap_or(0),
            avg_inference_ms: avg,
        };
        if fields.is_empty() {
            return Ok(None);
        }
        Ok(Some((parse_record(id, fields, now_ms())?, figures)))
    }

    /// The queue-wide figures alone.
    pub async fn figures(&self) -> Result<Figures, RedisError> {
        let mut pipe = redis::pipe();
        self.add_figures(&mut pipe);
        let (running, taken, avg): (u64, Option<u64>, Option<f64>) = self
            .redis
            .call(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        Ok(Figures {
            running,
            taken: taken.unwrap_or(0),
            avg_inference_ms: avg,
        })
    }

    /// The figures, reusing a read at most `max_age` old; concurrent callers share one read.
    pub async fn figures_within(&self, max_age: Duration) -> Result<Figures, RedisError> {
        let mut cached = self.figures.lock().await;
        if let Some((at, figures)) = *cached
            && at.elapsed() <= max_age
        {
            return Ok(figures);
        }
        let figures = self.figures().await?;
        *cached = Some((std::time::Instant::now(), figures));
        Ok(figures)
    }

    fn add_figures(&self, pipe: &mut redis::Pipeline) {
        pipe.zcard(self.keys.running())
            .get(self.keys.taken())
            .hget(self.keys.stats(), "avg_inference_ms");
    }
}

/// Token log-probabilities as the scripts take them ([`APPEND_TOKENS`]): each as JSON, one a line (compact
/// JSON never holds a raw newline); empty when there are none.
fn scores_arg(logprobs: Option<&[TokenLogprob]>) -> Result<String, RedisError> {
    let mut lines = Vec::new();
    for scored in logprobs.unwrap_or_default() {
        lines.push(serde_json::to_string(scored).map_err(|e| RedisError::Corrupt(e.to_string()))?);
    }
    Ok(lines.join("\n"))
}

fn parse_record(id: JobId, mut f: HashMap<String, String>, now: u64) -> Result<JobRecord, RedisError> {
    let num = |f: &HashMap<String, String>, k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok());
    let corrupt = |what: &str, e: serde_json::Error| RedisError::Corrupt(format!("job {id} {what}: {e}"));
    let mut status = f
        .get("status")
        .and_then(|s| Status::parse(s))
        .ok_or_else(|| RedisError::Corrupt(format!("job {id} has no valid status")))?;
    let expires_at = num(&f, "expires_at_ms");
    let mut result = match f.remove("result") {
        Some(json) => Some(serde_json::from_str::<Succeeded>(&json).map_err(|e| corrupt("result", e))?),
        None => None,
    };
    let mut error = match f.remove("error") {
        Some(json) => Some(serde_json::from_str::<ErrorBody>(&json).map_err(|e| corrupt("error", e))?),
        None => None,
    };
    if expires_at.is_some_and(|at| now >= at) {
        status = Status::Expired;
        result = None;
        error = None;
    }
    let parameters = match f.get("parameters") {
        Some(json) => serde_json::from_str(json).map_err(|e| corrupt("parameters", e))?,
        None => serde_json::Value::Object(Default::default()),
    };
    Ok(JobRecord {
        id,
        status,
        prompt: f.remove("prompt").unwrap_or_default(),
        parameters,
        owner: f.remove("owner"),
        seq: num(&f, "seq").unwrap_or(0),
        submitted_at_ms: num(&f, "submitted_at_ms"),
        started_at_ms: num(&f, "started_at_ms"),
        finished_at_ms: num(&f, "finished_at_ms"),
        attempts: num(&f, "attempts").unwrap_or(0) as u32,
        worker_id: f.remove("worker_id"),
        result,
        error,
        lane: f.get("lane").and_then(|l| l.parse().ok()).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_record_past_its_result_ttl_reads_as_expired_without_its_result() {
        let id = JobId::new_random();
        let err = r#"{"code":"generation_failed","message":"boom"}"#;
        let f = fields(&[("status", "failed"), ("error", err), ("expires_at_ms", "1000")]);
        let before = parse_record(id, f.clone(), 999).unwrap();
        assert_eq!(before.status, Status::Failed);
        assert!(before.error.is_some());
        let after = parse_record(id, f, 1000).unwrap();
        assert_eq!(after.status, Status::Expired);
        assert!(after.error.is_none());
    }
}
