//! Batches (`/v1/batches`): OpenAI's batch object, its lifecycle, and its state in Redis.
//!
//! A batch is a state machine, `validating` → `in_progress` → `finalizing` → `completed` (or `failed` when
//! its file is invalid, `expired` when its window ends first, `cancelling` → `cancelled` when cancelled);
//! [`crate::batch_driver`] moves it, this module keeps it. Every change of status is one Redis script that
//! checks the status it leaves, so a cancel and the driver cannot both win. The state is small and bounded
//! whatever the file's size: a cursor into the input (line and byte), the lines in flight (at most the
//! slice), the lines refused at submission with their errors, and the counts. File bodies are never here
//! (see [`crate::files`]); answers are in the jobs' records until finalization writes them out.

use std::collections::HashMap;

use redis::Script;
use serde::{Deserialize, Serialize};
use shared::reply::now_ms;

use crate::batch_lines::{Endpoint, LineError};
use crate::files::{List, page_ids};
use crate::keys::Keys;
use crate::kv::{Redis, RedisError};

/// The one completion window OpenAI offers.
pub const COMPLETION_WINDOW: &str = "24h";

/// `POST /v1/batches`' body.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBatch {
    /// A file of purpose `batch`, uploaded with `POST /v1/files`.
    pub input_file_id: String,
    /// The endpoint every line targets.
    pub endpoint: Endpoint,
    /// `24h`, the only window offered.
    #[schema(schema_with = completion_window)]
    pub completion_window: String,
    /// Up to 16 pairs of strings, kept with the batch.
    #[schema(value_type = Option<HashMap<String, String>>)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// `completion_window`'s schema: the one value it takes.
fn completion_window() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some([COMPLETION_WINDOW]))
        .build()
}

/// A batch's status, as OpenAI names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl BatchStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validating => "validating",
            Self::Failed => "failed",
            Self::InProgress => "in_progress",
            Self::Finalizing => "finalizing",
            Self::Completed => "completed",
            Self::Expired => "expired",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            Self::Validating,
            Self::Failed,
            Self::InProgress,
            Self::Finalizing,
            Self::Completed,
            Self::Expired,
            Self::Cancelling,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|status| status.as_str() == s)
    }

    /// Whether the batch has ended (nothing drives it any more).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Failed | Self::Completed | Self::Expired | Self::Cancelled
        )
    }
}

/// How many of the batch's requests there are, and have ended each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct RequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

/// The lines that made a batch `failed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BatchErrors {
    /// Always `list`.
    #[schema(value_type = String, example = "list")]
    pub object: String,
    pub data: Vec<LineError>,
}

/// A batch, as OpenAI describes one. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Batch {
    /// `batch_…`.
    pub id: String,
    /// Always `batch`.
    #[schema(value_type = String, example = "batch")]
    pub object: &'static str,
    pub endpoint: Endpoint,
    pub errors: Option<BatchErrors>,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: BatchStatus,
    /// The answered requests, once the batch has ended (not `failed`).
    pub output_file_id: Option<String>,
    /// The requests that failed or never ran, when there are any.
    pub error_file_id: Option<String>,
    pub created_at: u64,
    pub in_progress_at: Option<u64>,
    pub expires_at: Option<u64>,
    pub finalizing_at: Option<u64>,
    pub completed_at: Option<u64>,
    pub failed_at: Option<u64>,
    pub expired_at: Option<u64>,
    pub cancelling_at: Option<u64>,
    pub cancelled_at: Option<u64>,
    pub request_counts: RequestCounts,
    #[schema(value_type = Option<HashMap<String, String>>)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// How a batch that is finalizing ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Completed,
    Expired,
    Cancelled,
}

impl Ending {
    pub fn status(self) -> BatchStatus {
        match self {
            Ending::Completed => BatchStatus::Completed,
            Ending::Expired => BatchStatus::Expired,
            Ending::Cancelled => BatchStatus::Cancelled,
        }
    }

    fn as_str(self) -> &'static str {
        self.status().as_str()
    }
}

/// A batch with what only the gateway sees: its owner, the caller its jobs are admitted as, and its
/// progress.
#[derive(Debug, Clone)]
pub struct BatchState {
    pub batch: Batch,
    pub owner: String,
    /// [`crate::auth::Caller::token`] of the creator.
    pub caller: String,
    /// The next line to submit (its index, from 0) and its byte offset.
    pub cursor_line: u64,
    pub cursor_byte: u64,
    /// Every line has been submitted (or refused).
    pub expanded: bool,
    /// How a `finalizing` batch ends (`cancelling` always ends `cancelled`).
    pub ending: Option<Ending>,
}

/// The creation-time fields, kept as one JSON value.
#[derive(Serialize, Deserialize)]
struct Created {
    id: String,
    endpoint: Endpoint,
    input_file_id: String,
    completion_window: String,
    created_at: u64,
    expires_at: u64,
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

// KEYS: the batch, the active set. ARGV[1]: {id, from: [statuses], set: [field, value, ...], ended}.
// Moves the batch only from one of `from`; returns 1 when it moved.
const TRANSITION: &str = r#"
local batch, active = KEYS[1], KEYS[2]
local a = cjson.decode(ARGV[1])
local status = redis.call('HGET', batch, 'status')
for _, from in ipairs(a.from) do
  if from == status then
    redis.call('HSET', batch, unpack(a.set))
    if a.ended then redis.call('SREM', active, a.id) end
    return 1
  end
end
return 0
"#;

// KEYS: the batch, its in-flight set. ARGV: the line, the count to add to (`completed` or `failed`).
// Counts a line once, however many drivers see it end.
const FINISH_LINE: &str = r#"
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], ARGV[2], 1)
  return 1
end
return 0
"#;

// KEYS: the lease. ARGV: the holder's token, the lease's length (ms). Takes a free lease or renews one's own.
const LEASE: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#;

// KEYS: the lease. ARGV: the holder's token. Lets go of one's own lease.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// A line submitted and not yet ended: its index and how many jobs it made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    pub line: u64,
    pub jobs: usize,
}

/// What one slice of expansion did, recorded at once.
#[derive(Debug, Default)]
pub struct Slice {
    pub submitted: Vec<InFlight>,
    /// Lines refused at submission, with their output lines (JSON).
    pub refused: Vec<(u64, String)>,
    pub cursor_line: u64,
    pub cursor_byte: u64,
    pub expanded: bool,
}

/// The batches of one namespace.
#[derive(Clone)]
pub struct BatchStore {
    redis: Redis,
    keys: Keys,
}

impl BatchStore {
    pub fn new(redis: Redis, keys: Keys) -> Self {
        Self { redis, keys }
    }

    /// Records a new batch of `owner`'s, `validating`, for the driver to take.
    pub async fn create(
        &self,
        owner: &str,
        caller: &str,
        request: CreateBatch,
        window: std::time::Duration,
    ) -> Result<Batch, RedisError> {
        let now = now_ms() / 1000;
        let created = Created {
            id: format!("batch_{}", uuid::Uuid::new_v4().simple()),
            endpoint: request.endpoint,
            input_file_id: request.input_file_id,
            completion_window: request.completion_window,
            created_at: now,
            expires_at: now + window.as_secs(),
            metadata: request.metadata,
        };
        let json = serde_json::to_string(&created).map_err(|e| RedisError::Corrupt(e.to_string()))?;
        let id = created.id.clone();
        let (batch_key, owned, active) = (
            self.keys.batch(&id),
            self.keys.batches(owner),
            self.keys.batches_active(),
        );
        let fields = [
            ("created", json.as_str()),
            ("owner", owner),
            ("caller", caller),
            ("status", BatchStatus::Validating.as_str()),
        ];
        let member = id.clone();
        self.redis
            .call(|mut c| async move {
                redis::pipe()
                    .atomic()
                    .hset_multiple(&batch_key, &fields)
                    .ignore()
                    .zadd(&owned, &member, now_ms())
                    .ignore()
                    .sadd(&active, &member)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
            })
            .await?;
        Ok(self
            .get(&id)
            .await?
            .ok_or_else(|| RedisError::Corrupt(format!("batch {id} vanished")))?
            .batch)
    }

    /// Batch `id` with its progress, `None` when there is no such batch.
    pub async fn get(&self, id: &str) -> Result<Option<BatchState>, RedisError> {
        let key = self.keys.batch(id);
        let fields: HashMap<String, String> = self
            .redis
            .call(|mut c| async move { redis::cmd("HGETALL").arg(key).query_async(&mut c).await })
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        parse_state(fields).map(Some)
    }

    /// A page of `owner`'s batches, newest first, after batch `after`.
    pub async fn list(
        &self,
        owner: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<List<Batch>, RedisError> {
        let ids = page_ids(&self.redis, self.keys.batches(owner), false, after).await?;
        let mut data = Vec::new();
        for id in ids.iter().take(limit + 1) {
            if let Some(state) = self.get(id).await? {
                data.push(state.batch);
            }
        }
        Ok(List::page(data, limit, |b| &b.id))
    }

    /// The batches some replica must drive.
    pub async fn active(&self) -> Result<Vec<String>, RedisError> {
        let key = self.keys.batches_active();
        self.redis
            .call(|mut c| async move { redis::cmd("SMEMBERS").arg(key).query_async(&mut c).await })
            .await
    }

    /// A batch that has not ended and reads `file`, if there is one: its input must stay until it ends
    /// (finalization reads it again). Looks through the active batches only, which every live batch is.
    pub async fn reading(&self, file: &str) -> Result<Option<String>, RedisError> {
        for id in self.active().await? {
            if let Some(state) = self.get(&id).await?
                && !state.batch.status.is_final()
                && state.batch.input_file_id == file
            {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }

    /// Takes batch `id` off the batches to drive.
    pub async fn forget_active(&self, id: &str) -> Result<(), RedisError> {
        let (key, member) = (self.keys.batches_active(), id.to_owned());
        self.redis
            .call(|mut c| async move {
                redis::cmd("SREM")
                    .arg(key)
                    .arg(member)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
    }

    /// Moves batch `id` to `to` (stamping `{to}_at`, and setting `fields`) if its status is one of `from`;
    /// returns whether it moved.
    pub async fn transition(
        &self,
        id: &str,
        from: &[BatchStatus],
        to: BatchStatus,
        fields: &[(&str, String)],
    ) -> Result<bool, RedisError> {
        let mut set = vec![
            "status".to_owned(),
            to.as_str().to_owned(),
            format!("{}_at", to.as_str()),
            (now_ms() / 1000).to_string(),
        ];
        for (field, value) in fields {
            set.push((*field).to_owned());
            set.push(value.clone());
        }
        let args = serde_json::json!({
            "id": id,
            "from": from.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            "set": set,
            "ended": to.is_final(),
        })
        .to_string();
        let (batch, active) = (self.keys.batch(id), self.keys.batches_active());
        let moved: i64 = self
            .redis
            .call(|mut c| async move {
                Script::new(TRANSITION)
                    .key(batch)
                    .key(active)
                    .arg(args)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(moved == 1)
    }

    /// Moves an `in_progress` batch to `finalizing`, to end as `ending`.
    pub async fn finalize(&self, id: &str, ending: Ending) -> Result<bool, RedisError> {
        self.transition(
            id,
            &[BatchStatus::InProgress],
            BatchStatus::Finalizing,
            &[("ending", ending.as_str().to_owned())],
        )
        .await
    }

    /// The input file's size, recorded when the batch went `in_progress`.
    pub async fn input_bytes(&self, id: &str) -> Result<Option<u64>, RedisError> {
        let key = self.keys.batch(id);
        self.redis
            .call(|mut c| async move {
                redis::cmd("HGET")
                    .arg(key)
                    .arg("input_bytes")
                    .query_async(&mut c)
                    .await
            })
            .await
    }

    /// The lines in flight.
    pub async fn in_flight(&self, id: &str) -> Result<Vec<InFlight>, RedisError> {
        let members = page_ids(&self.redis, self.keys.batch_inflight(id), true, None).await?;
        members
            .iter()
            .map(|m| {
                let (line, jobs) = m.split_once(':').unwrap_or((m, "1"));
                match (line.parse(), jobs.parse()) {
                    (Ok(line), Ok(jobs)) => Ok(InFlight { line, jobs }),
                    _ => Err(RedisError::Corrupt(format!("in-flight line {m:?}"))),
                }
            })
            .collect()
    }

    /// Counts an in-flight line as ended, once.
    pub async fn finish_line(&self, id: &str, line: InFlight, succeeded: bool) -> Result<(), RedisError> {
        let (batch, inflight) = (self.keys.batch(id), self.keys.batch_inflight(id));
        let member = format!("{}:{}", line.line, line.jobs);
        let count = if succeeded { "completed" } else { "failed" };
        self.redis
            .call(|mut c| async move {
                Script::new(FINISH_LINE)
                    .key(batch)
                    .key(inflight)
                    .arg(member)
                    .arg(count)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await
            .map(|_| ())
    }

    /// Records a slice of expansion in one step: the lines now in flight, the lines refused, and the cursor.
    pub async fn commit(&self, id: &str, slice: &Slice) -> Result<(), RedisError> {
        let (batch, inflight, refused) = (
            self.keys.batch(id),
            self.keys.batch_inflight(id),
            self.keys.batch_refused(id),
        );
        let mut pipe = redis::pipe();
        pipe.atomic();
        for line in &slice.submitted {
            pipe.zadd(&inflight, format!("{}:{}", line.line, line.jobs), line.line)
                .ignore();
        }
        for (line, output) in &slice.refused {
            pipe.hset(&refused, line, output).ignore();
        }
        if !slice.refused.is_empty() {
            pipe.hincr(&batch, "failed", slice.refused.len()).ignore();
        }
        pipe.hset_multiple(
            &batch,
            &[
                ("cursor_line", slice.cursor_line.to_string()),
                ("cursor_byte", slice.cursor_byte.to_string()),
                ("expanded", u8::from(slice.expanded).to_string()),
            ],
        )
        .ignore();
        self.redis
            .call(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    /// The output lines of the refused lines among `lines`.
    pub async fn refused(&self, id: &str, lines: &[u64]) -> Result<Vec<Option<String>>, RedisError> {
        if lines.is_empty() {
            return Ok(Vec::new());
        }
        let key = self.keys.batch_refused(id);
        let lines = lines.to_vec();
        self.redis
            .call(|mut c| async move { redis::cmd("HMGET").arg(key).arg(lines).query_async(&mut c).await })
            .await
    }

    /// Drops what only driving the batch needed, once it has ended.
    pub async fn forget_progress(&self, id: &str) -> Result<(), RedisError> {
        let keys = [self.keys.batch_inflight(id), self.keys.batch_refused(id)];
        self.redis
            .call(|mut c| async move { redis::cmd("DEL").arg(&keys).query_async::<()>(&mut c).await })
            .await
    }

    /// Takes batch `id`'s lease for `holder`, or renews it; false when another replica holds it.
    pub async fn lease(
        &self,
        id: &str,
        holder: &str,
        length: std::time::Duration,
    ) -> Result<bool, RedisError> {
        let (key, holder, ms) = (
            self.keys.batch_lease(id),
            holder.to_owned(),
            length.as_millis() as u64,
        );
        let held: i64 = self
            .redis
            .call(|mut c| async move {
                Script::new(LEASE)
                    .key(key)
                    .arg(holder)
                    .arg(ms)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(held == 1)
    }

    /// Lets go of batch `id`'s lease if `holder` holds it.
    pub async fn release(&self, id: &str, holder: &str) -> Result<(), RedisError> {
        let (key, holder) = (self.keys.batch_lease(id), holder.to_owned());
        self.redis
            .call(|mut c| async move {
                Script::new(RELEASE)
                    .key(key)
                    .arg(holder)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await
            .map(|_| ())
    }
}

fn parse_state(mut fields: HashMap<String, String>) -> Result<BatchState, RedisError> {
    let corrupt = |what: &str| RedisError::Corrupt(format!("batch {what}"));
    let created: Created = fields
        .get("created")
        .and_then(|c| serde_json::from_str(c).ok())
        .ok_or_else(|| corrupt("without its creation"))?;
    let status = fields
        .get("status")
        .and_then(|s| BatchStatus::parse(s))
        .ok_or_else(|| corrupt("status"))?;
    let number =
        |fields: &HashMap<String, String>, name: &str| fields.get(name).and_then(|v| v.parse::<u64>().ok());
    let at = |name: &str| number(&fields, &format!("{name}_at"));
    let errors = fields
        .get("errors")
        .and_then(|e| serde_json::from_str::<Vec<LineError>>(e).ok())
        .map(|data| BatchErrors {
            object: "list".into(),
            data,
        });
    let batch = Batch {
        id: created.id,
        object: "batch",
        endpoint: created.endpoint,
        errors,
        input_file_id: created.input_file_id,
        completion_window: created.completion_window,
        status,
        output_file_id: fields.get("output_file_id").cloned(),
        error_file_id: fields.get("error_file_id").cloned(),
        created_at: created.created_at,
        in_progress_at: at("in_progress"),
        expires_at: Some(created.expires_at),
        finalizing_at: at("finalizing"),
        completed_at: at("completed"),
        failed_at: at("failed"),
        expired_at: at("expired"),
        cancelling_at: at("cancelling"),
        cancelled_at: at("cancelled"),
        request_counts: RequestCounts {
            total: number(&fields, "total").unwrap_or(0),
            completed: number(&fields, "completed").unwrap_or(0),
            failed: number(&fields, "failed").unwrap_or(0),
        },
        metadata: created.metadata,
    };
    let ending = match fields.get("ending").map(String::as_str) {
        Some("completed") => Some(Ending::Completed),
        Some("expired") => Some(Ending::Expired),
        Some("cancelled") => Some(Ending::Cancelled),
        _ => None,
    };
    Ok(BatchState {
        cursor_line: number(&fields, "cursor_line").unwrap_or(0),
        cursor_byte: number(&fields, "cursor_byte").unwrap_or(0),
        expanded: fields.get("expanded").is_some_and(|e| e == "1"),
        ending,
        owner: fields.remove("owner").unwrap_or_default(),
        caller: fields.remove("caller").unwrap_or_default(),
        batch,
    })
}
