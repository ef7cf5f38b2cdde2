//! Job records in Redis: written at submission and from the replies, read by any replica's poll.
//!
//! A record is a hash `{ns}:job:{id}`, created together with the submission's rate-limit admission (see
//! [`crate::ratelimit`]) and numbered by `{ns}:seq` for queue positions. Replies are applied by one Lua script, atomically, so that replicas
//! consuming replies concurrently cannot interleave: a final status is never overwritten (a late or
//! redelivered `job.started` after `job.succeeded` is ignored), the `{ns}:running` set (for `/v1/queue`'s
//! `running`) and the `{ns}:taken` counter (for queue positions) change with the status, and the final
//! write publishes the job id on `{ns}:done`, which wakes `/run` waits on every replica.
//!
//! Expiry is in two steps: a result is readable for the result TTL (`expires_at_ms`), after which the
//! record answers `expired` until Redis drops the key, `expired_retention` later; then the id is 404.

use std::collections::HashMap;
use std::time::Duration;

use redis::Script;
use shared::reply::{Failed, Started, Succeeded, now_ms};
use shared::{ErrorBody, JobId, JobReply, Topology};

use crate::redis::{Redis, RedisError};

/// A job's lifecycle as polls report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    Expired,
}

impl Status {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            _ => return None,
        })
    }
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Expired)
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
    pub id: JobId,
    pub prompt: &'a str,
    pub parameters_json: &'a str,
    pub owner: Option<&'a str>,
    pub submitted_at_ms: u64,
}

// KEYS: job, running, taken, stats
// ARGV: event, job id, now ms, key ttl ms, expires-at ms, worker id, payload json, inference ms,
//       started-at ms, done channel
const APPLY: &str = r#"
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'succeeded' or status == 'failed' then return 0 end
local event = ARGV[1]
if status == false or status == 'queued' then redis.call('INCR', KEYS[3]) end
local now = tonumber(ARGV[3])
if event == 'started' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'worker_id', ARGV[6], 'started_at_ms', ARGV[9])
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('ZADD', KEYS[2], now, ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[4]))
else
  local field = 'result'
  if event == 'failed' then field = 'error' end
  redis.call('HSET', KEYS[1], 'status', event, 'worker_id', ARGV[6], field, ARGV[7],
    'finished_at_ms', ARGV[3], 'expires_at_ms', ARGV[5])
  redis.call('ZREM', KEYS[2], ARGV[2])
  if event == 'succeeded' then
    local ms = tonumber(ARGV[8])
    local avg = tonumber(redis.call('HGET', KEYS[4], 'avg_inference_ms'))
    if avg then avg = 0.8 * avg + 0.2 * ms else avg = ms end
    redis.call('HSET', KEYS[4], 'avg_inference_ms', tostring(avg))
  end
  redis.call('PUBLISH', ARGV[10], ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"#;

/// A record to create: its key, the counter that numbers submissions, its TTL and its fields.
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub key: String,
    pub seq_key: String,
    pub ttl_ms: u64,
    pub fields: Vec<(&'static str, String)>,
}

/// Reads and writes job records.
#[derive(Clone)]
pub struct JobStore {
    redis: Redis,
    topology: Topology,
    result_ttl: Duration,
    retention: Duration,
    apply: Script,
}

impl JobStore {
    pub fn new(redis: Redis, topology: Topology, result_ttl: Duration, retention: Duration) -> Self {
        Self {
            redis,
            topology,
            result_ttl,
            retention,
            apply: Script::new(APPLY),
        }
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    fn job_key(&self, id: JobId) -> String {
        self.topology.redis_key(&format!("job:{id}"))
    }
    fn running_key(&self) -> String {
        self.topology.redis_key("running")
    }
    fn taken_key(&self) -> String {
        self.topology.redis_key("taken")
    }
    fn stats_key(&self) -> String {
        self.topology.redis_key("stats")
    }
    /// The pub/sub channel on which finished job ids are announced.
    pub fn done_channel(&self) -> String {
        self.topology.redis_key("done")
    }
    fn key_ttl_ms(&self) -> u64 {
        (self.result_ttl + self.retention).as_millis() as u64
    }

    /// What the `queued` record of a new job is made of. The rate limiter writes it in the same script
    /// call as the admission (one round trip), before the publish, so a reply can never arrive for a
    /// job without a record.
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
        NewRecord {
            key: self.job_key(job.id),
            seq_key: self.topology.redis_key("seq"),
            ttl_ms: self.key_ttl_ms(),
            fields,
        }
    }

    /// Removes the record of a job whose publish failed (the client got a 503, so nobody polls it).
    pub async fn delete(&self, id: JobId) -> Result<(), RedisError> {
        let key = self.job_key(id);
        self.redis
            .call(|mut c| async move { redis::cmd("DEL").arg(key).query_async::<i64>(&mut c).await })
            .await
            .map(|_| ())
    }

    /// Applies one reply. Returns false when it changed nothing (the job was already final).
    pub async fn apply(&self, reply: &JobReply) -> Result<bool, RedisError> {
        let Some(id) = reply.job_id() else {
            return Ok(false);
        };
        let now = now_ms();
        let expires_at = now + self.result_ttl.as_millis() as u64;
        let (event, worker, payload, inference_ms, started_at) = match reply {
            JobReply::Started(Started {
                worker_id,
                started_at_ms,
                ..
            }) => ("started", worker_id.as_str(), String::new(), 0, *started_at_ms),
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
            // Streaming is not served yet; token events change nothing in the record.
            JobReply::Token(_) => return Ok(false),
        };
        let mut invocation = self.apply.prepare_invoke();
        invocation
            .key(self.job_key(id))
            .key(self.running_key())
            .key(self.taken_key())
            .key(self.stats_key())
            .arg(event)
            .arg(id.to_string())
            .arg(now)
            .arg(self.key_ttl_ms())
            .arg(expires_at)
            .arg(worker)
            .arg(payload)
            .arg(inference_ms)
            .arg(started_at)
            .arg(self.done_channel());
        let changed: i64 = self
            .redis
            .call(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        Ok(changed == 1)
    }

    /// Reads a record (`None` when unknown or long gone) together with the queue-wide figures, in one
    /// round trip.
    pub async fn get(&self, id: JobId) -> Result<Option<(JobRecord, Figures)>, RedisError> {
        let mut pipe = redis::pipe();
        pipe.hgetall(self.job_key(id));
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

    fn add_figures(&self, pipe: &mut redis::Pipeline) {
        pipe.zcard(self.running_key())
            .get(self.taken_key())
            .hget(self.stats_key(), "avg_inference_ms");
    }
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
