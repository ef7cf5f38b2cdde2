//! Every setting of the gateway, as command-line flags with environment-variable equivalents.
//!
//! [`Config`] is what clap parses (tests build one with `Config::parse_from`); [`Config::validate`] turns it
//! into [`Settings`], the checked form the rest of the crate uses, so a bad value stops the process at
//! start-up with a readable message instead of failing on the first request.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use ipnet::IpNet;
use shared::prompt::PromptArgs;
use shared::topology::{DEFAULT_DELIVERY_LIMIT, DEFAULT_NAMESPACE};
use shared::{PromptRules, Topology};

use crate::auth::ApiKeys;

/// The gateway's flags. Every flag can also be given as the environment variable named in `--help`.
#[derive(Debug, Clone, Parser)]
#[command(name = "gateway", version, about = "HTTP gateway of the GPT-J service")]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "LISTEN", default_value = "0.0.0.0:8000")]
    pub listen: SocketAddr,
    /// RabbitMQ URL; for a cluster, one per node, comma separated: the gateway connects to one and moves
    /// to the next when it fails.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// Redis URL.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    pub redis_url: String,
    /// Prefix of every queue and Redis key, so deployments (and tests) can share one broker and one Redis.
    #[arg(long, env = "NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Deliveries of one job before the broker dead-letters it; must match the workers' setting.
    #[arg(long, env = "DELIVERY_LIMIT", default_value_t = DEFAULT_DELIVERY_LIMIT)]
    pub delivery_limit: u32,

    /// Per-client limit on job submission (`POST /v1/jobs` and `POST /run`), as COUNT/WINDOW, e.g. `10/60s`.
    #[arg(long, env = "SUBMIT_RATE_LIMIT", default_value = "10/60s")]
    pub submit_rate_limit: RateLimit,
    /// Per-client budget of generated tokens, as TOKENS/WINDOW: a job costs `max_new_tokens` × its beams
    /// (1 without beam search), charged at submission. Counts cost where the submit limit counts requests.
    #[arg(long, env = "TOKEN_RATE_LIMIT", default_value = "40000/60s")]
    pub token_rate_limit: RateLimit,
    /// Jobs one client may have queued and running at once (0: no cap); past it, 429 `too_many_active_jobs`.
    #[arg(long, env = "MAX_ACTIVE_JOBS_PER_CLIENT", default_value_t = 64)]
    pub max_active_jobs_per_client: u32,
    /// Jobs the queue may hold (0: no bound); past it, 503 `queue_full` with a `Retry-After` from the
    /// measured drain rate.
    #[arg(long, env = "MAX_QUEUED_JOBS", default_value_t = 10_000)]
    pub max_queued_jobs: u32,
    /// How long an `Idempotency-Key` names its job: a resubmission with the same key (and the same body)
    /// within this time gets the first job back instead of a second one.
    #[arg(long, env = "IDEMPOTENCY_TTL_S", default_value_t = 86_400)]
    pub idempotency_ttl_s: u64,
    /// Per-client limit on reads (`/v1/queue`, `/metrics`, job polls), as COUNT/WINDOW.
    #[arg(long, env = "READ_RATE_LIMIT", default_value = "500/10s")]
    pub read_rate_limit: RateLimit,
    /// What submissions do when Redis cannot answer the rate check: `closed` refuses with 503 (each job
    /// costs GPU time), `open` admits.
    #[arg(long, env = "SUBMIT_RATE_LIMIT_ON_ERROR", default_value = "closed")]
    pub submit_rate_limit_on_error: FailMode,
    /// What reads do when Redis cannot answer the rate check.
    #[arg(long, env = "READ_RATE_LIMIT_ON_ERROR", default_value = "open")]
    pub read_rate_limit_on_error: FailMode,

    /// Upper bound on any single Redis call, so a hung Redis cannot hang requests.
    #[arg(long, env = "REDIS_TIMEOUT_MS", default_value_t = 500)]
    pub redis_timeout_ms: u64,
    /// Redis connections; each carries many concurrent calls (multiplexed), so a few suffice.
    #[arg(long, env = "REDIS_POOL_SIZE", default_value_t = 4)]
    pub redis_pool_size: usize,
    /// How long a finished job's result stays readable.
    #[arg(long, env = "RESULT_TTL_S", default_value_t = 86_400)]
    pub result_ttl_s: u64,
    /// How long after its result TTL a job still answers `expired` instead of 404.
    #[arg(long, env = "EXPIRED_RETENTION_S", default_value_t = 86_400)]
    pub expired_retention_s: u64,

    /// How long `POST /run` waits for the result before answering 504 with the job id.
    #[arg(long, env = "RUN_TIMEOUT_S", default_value_t = 120)]
    pub run_timeout_s: u64,
    /// Open `POST /run` waits allowed per client on this replica.
    #[arg(long, env = "MAX_RUN_WAITS_PER_CLIENT", default_value_t = 4)]
    pub max_run_waits_per_client: usize,
    /// Open event streams and OpenAI requests (streamed, or waiting for their answer) allowed per client on
    /// this replica; past it, 429 `too_many_waits`.
    #[arg(long, env = "MAX_STREAMS_PER_CLIENT", default_value_t = 32)]
    pub max_streams_per_client: usize,
    /// How often a wait (`/run`, an event stream, an OpenAI request) re-reads its job while this replica's
    /// Redis pub/sub subscription is down and a notice may be lost. While it is up no notice is lost, and a
    /// wait reads its job only when notified (or once a minute, a backstop).
    #[arg(long, env = "RUN_POLL_INTERVAL_MS", default_value_t = 1_000)]
    pub run_poll_interval_ms: u64,
    /// Cancel the job of a client that hangs up before its answer: `/run`, the OpenAI routes (streamed or
    /// not), and event streams opened with `?cancel_on_disconnect=true`. A GPU then stops spending steps on
    /// an answer nobody will read.
    #[arg(long, env = "CANCEL_ON_DISCONNECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub cancel_on_disconnect: bool,
    /// The served model's `tokenizer.json`, to count prompt tokens [default: GPT-J's, bundled].
    #[arg(long, env = "TOKENIZER")]
    pub tokenizer: Option<std::path::PathBuf>,
    /// The served model's context in tokens: a job whose prompt tokens plus `max_new_tokens` exceed it is
    /// refused (422 `context_overflow`) before it is queued or charged.
    #[arg(long, env = "CONTEXT_LENGTH", default_value_t = 2048)]
    pub context_length: usize,
    /// The model name the OpenAI-compatible routes serve (`GET /v1/models`, the `model` field).
    #[arg(long, env = "SERVED_MODEL_NAME", default_value = "EleutherAI/gpt-j-6b")]
    pub served_model_name: String,
    /// Consume the workers' replies (the default). `false` makes a replica that only serves HTTP and leaves
    /// the replies to the other replicas; every replica still serves every job's results and streams.
    #[arg(long, env = "CONSUME_REPLIES", default_value_t = true, action = clap::ArgAction::Set)]
    pub consume_replies: bool,

    /// Largest request body accepted; larger ones get 413.
    #[arg(long, env = "BODY_LIMIT_BYTES", default_value_t = 64 * 1024)]
    pub body_limit_bytes: usize,
    /// A client must send its request headers within this time or the connection is closed.
    #[arg(long, env = "HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,
    /// Open client connections at most. Past it (or past a client's own bound), a connection gets one
    /// answer from a small reserve: the health routes as usual, anything else 503 `too_many_connections`.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 4_096)]
    pub max_connections: usize,
    /// Open connections from one client address at most (an IPv6 client's /64 is one address; 0: no bound);
    /// past it, 429 `too_many_connections`. A trusted proxy's connections are not bounded (its clients'
    /// streams are, by `--max-streams-per-client`).
    #[arg(long, env = "MAX_CONNECTIONS_PER_CLIENT", default_value_t = 256)]
    pub max_connections_per_client: usize,
    /// A client must send its whole request body within this time (one deadline, not per chunk) or gets
    /// 408.
    #[arg(long, env = "BODY_READ_TIMEOUT_MS", default_value_t = 30_000)]
    pub body_read_timeout_ms: u64,

    #[command(flatten)]
    pub prompt: PromptArgs,

    /// API keys, comma separated. When any is set, `/v1/*` and `/run` require `Authorization: Bearer KEY`
    /// and a job can only be read with the key that submitted it.
    #[arg(long, env = "API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// API keys whose highest lane is the batch lane, comma separated: valid keys as `--api-keys`'s, whose
    /// jobs go to the batch lane whatever they ask for (`service_tier`, `lane`), clamped, never refused.
    #[arg(long, env = "BATCH_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub batch_api_keys: Vec<String>,
    /// Proxies (addresses or CIDR blocks, comma separated) whose `X-Forwarded-For` is believed.
    #[arg(long, env = "TRUSTED_PROXIES", value_delimiter = ',', value_parser = crate::auth::parse_net)]
    pub trusted_proxies: Vec<IpNet>,
    /// Web origins whose pages may call the API from a browser (CORS), comma separated
    /// (`https://app.example.com`), or `*` for any. Off by default: the playground at `/` is same-origin and
    /// needs none, and an API key typed into another site's page is that site's to read.
    #[arg(long, env = "CORS_ALLOW_ORIGINS", value_delimiter = ',')]
    pub cors_allow_origins: Vec<String>,

    /// Optional per-message AMQP expiration: a job still queued after this long is dropped by the broker.
    #[arg(long, env = "JOB_EXPIRATION_MS")]
    pub job_expiration_ms: Option<u64>,
    /// Confirm-mode channels publishing jobs concurrently.
    #[arg(long, env = "PUBLISH_CHANNELS", default_value_t = 4)]
    pub publish_channels: usize,
    /// Longest wait for the broker to confirm a publish. A refused publish is answered 503; one left
    /// unconfirmed (a timeout, a connection lost after sending) is kept and republished, see
    /// `--publish-retry-window-s`.
    #[arg(long, env = "PUBLISH_TIMEOUT_MS", default_value_t = 5_000)]
    pub publish_timeout_ms: u64,
    /// How long the gateway keeps republishing a job whose publish was left unconfirmed before it marks
    /// the job failed (`publish_failed`).
    #[arg(long, env = "PUBLISH_RETRY_WINDOW_S", default_value_t = 300)]
    pub publish_retry_window_s: u64,
    /// Unacknowledged replies this replica holds at once.
    #[arg(long, env = "REPLIES_PREFETCH", default_value_t = 64)]
    pub replies_prefetch: u16,
    /// Queue depth and consumer count are reused for at most this long (0: ask the broker every time).
    /// Concurrent `/v1/queue` requests share one broker round trip either way.
    #[arg(long, env = "QUEUE_STATS_CACHE_MS", default_value_t = 5)]
    pub queue_stats_cache_ms: u64,
    /// On shutdown, how long open requests may take to finish.
    #[arg(long, env = "SHUTDOWN_GRACE_S", default_value_t = 30)]
    pub shutdown_grace_s: u64,

    /// Where the Batch API's files (`/v1/files`) are kept when no S3 bucket is given: a directory, created
    /// if missing. Local to this machine, so only for a single gateway (or replicas sharing the directory).
    #[arg(long, env = "FILES_DIR", default_value = "data/files")]
    pub files_dir: std::path::PathBuf,
    /// An S3 bucket for the Batch API's files instead of `--files-dir` (every replica sees the same files).
    /// Credentials and region: the flags below, or the standard `AWS_*` variables (a session token, an
    /// instance's role and the other `AWS_*` settings are read from the environment too).
    #[arg(long, env = "FILES_S3_BUCKET")]
    pub files_s3_bucket: Option<String>,
    /// The URL of an S3-compatible service (MinIO, Ceph, moto…) holding `--files-s3-bucket`; AWS when unset.
    #[arg(long, env = "FILES_S3_ENDPOINT", requires = "files_s3_bucket")]
    pub files_s3_endpoint: Option<String>,
    /// The bucket's region.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub files_s3_region: String,
    /// The S3 access key id (best given by its variable).
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    pub files_s3_access_key_id: Option<String>,
    /// The S3 secret access key (best given by its variable).
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub files_s3_secret_access_key: Option<String>,
    /// Largest file `POST /v1/files` takes (OpenAI's is 200 MB); the upload is streamed to the store,
    /// never held whole.
    #[arg(long, env = "MAX_FILE_BYTES", default_value_t = 200 * 1024 * 1024)]
    pub max_file_bytes: u64,
    /// Most requests (lines) in one batch.
    #[arg(long, env = "BATCH_MAX_REQUESTS", default_value_t = 50_000)]
    pub batch_max_requests: u64,
    /// A batch's requests queued or running at once, at most: the batch is submitted a slice at a time, the
    /// next lines as earlier ones end, so a large batch never floods the queue.
    #[arg(long, env = "BATCH_SLICE", default_value_t = 128)]
    pub batch_slice: usize,
    /// How often a gateway drives the batches it holds (counts ended requests, submits more).
    #[arg(long, env = "BATCH_POLL_MS", default_value_t = 250)]
    pub batch_poll_ms: u64,
    /// How long a gateway's hold on a batch lasts without renewal: a gateway that dies leaves its batches to
    /// another replica after this long.
    #[arg(long, env = "BATCH_LEASE_MS", default_value_t = 10_000)]
    pub batch_lease_ms: u64,
    /// How long the `24h` completion window lasts, in seconds (for tests of expiry; leave it in production).
    #[arg(long, env = "BATCH_WINDOW_S", default_value_t = 86_400)]
    pub batch_window_s: u64,
    /// Fault-test hook: finalization waits this long after writing a batch's files, before recording them.
    #[arg(long, env = "BATCH_FINALIZE_HOLD_MS", default_value_t = 0, hide = true)]
    pub batch_finalize_hold_ms: u64,
}

/// A rate limit: at most `limit` requests in any rolling window of `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub limit: u32,
    pub window: Duration,
}

impl FromStr for RateLimit {
    type Err = String;
    /// `COUNT/WINDOW`, the window a number with unit `ms`, `s`, `m` or `h` (`10/60s`, `500/10s`, `10/1m`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("rate limit `{s}` must look like COUNT/WINDOW, e.g. 10/60s or 500/10s");
        let (count, window) = s.trim().split_once('/').ok_or_else(bad)?;
        let limit: u32 = count.trim().parse().map_err(|_| bad())?;
        let window = window.trim();
        let split = window.find(|c: char| !c.is_ascii_digit()).unwrap_or(window.len());
        let (n, unit) = window.split_at(split);
        let n: u64 = if n.is_empty() {
            1
        } else {
            n.parse().map_err(|_| bad())?
        };
        let window = match unit {
            "ms" => Duration::from_millis(n),
            "s" | "" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            _ => return Err(bad()),
        };
        if limit == 0 || window.is_zero() {
            return Err(format!(
                "rate limit `{s}` must allow at least 1 request in a non-empty window"
            ));
        }
        Ok(Self { limit, window })
    }
}

/// What a rate-limited route does when Redis cannot be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    Open,
    Closed,
}

impl FromStr for FailMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(Self::Open),
            "closed" => Ok(Self::Closed),
            other => Err(format!("`{other}`: expected open or closed")),
        }
    }
}

/// The checked settings the gateway runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub topology: Topology,
    pub broker_urls: std::sync::Arc<shared::brokers::BrokerUrls>,
    pub prompts: RoutePrompts,
    pub api_keys: ApiKeys,
    pub trusted_proxies: Vec<IpNet>,
    pub cors: Cors,
    pub submit_limit: RateLimit,
    pub read_limit: RateLimit,
    pub token_limit: RateLimit,
    pub max_active_jobs_per_client: u32,
    pub max_queued_jobs: u32,
    pub idempotency_ttl: Duration,
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    pub publish_retry_window: Duration,
    pub submit_on_error: FailMode,
    pub read_on_error: FailMode,
    pub redis_timeout: Duration,
    pub result_ttl: Duration,
    pub expired_retention: Duration,
    pub run_timeout: Duration,
    pub run_poll_interval: Duration,
    pub max_run_waits_per_client: usize,
    pub max_streams_per_client: usize,
    pub cancel_on_disconnect: bool,
    pub served_model_name: String,
    pub consume_replies: bool,
    pub context_length: usize,
    pub body_limit_bytes: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub job_expiration: Option<Duration>,
    pub publish_channels: usize,
    pub publish_timeout: Duration,
    pub replies_prefetch: u16,
    pub queue_stats_cache: Duration,
    pub shutdown_grace: Duration,
    /// Where the Batch API's files are kept.
    pub storage: crate::files::Storage,
    pub max_file_bytes: u64,
    pub batch: BatchSettings,
}

/// How the Batch API's batches are driven (`crate::batch_driver`).
#[derive(Debug, Clone)]
pub struct BatchSettings {
    /// A batch's lines in flight (submitted, not ended) at most.
    pub slice: usize,
    /// Most requests in one batch.
    pub max_requests: u64,
    /// How often a driver looks at its batches.
    pub poll: Duration,
    /// How long a driver's lease lasts unrenewed.
    pub lease: Duration,
    /// What the `24h` window lasts (shortened by tests).
    pub window: Duration,
    /// Longest line of an input file (a synchronous request's body limit).
    pub max_line_bytes: usize,
    /// A fault-test hook: how long finalization waits after writing its files and before recording them.
    pub finalize_hold: Duration,
}

/// How each route that takes a prompt takes its text (see `shared::prompt`): the policy is per route, because
/// `/run`'s clients were written against the original's cleaning and an OpenAI client expects its text to
/// reach the model as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePrompts {
    /// `/run`: the original's cleaning, as the `--prompt-*` flags configure it.
    pub run: PromptRules,
    /// `/v1/jobs`: as `--prompt-policy` says, as written by default.
    pub jobs: PromptRules,
    /// The OpenAI routes: always as written, bounded in tokens by `--context-length`.
    pub openai: PromptRules,
}

/// Which browser origins may call the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cors {
    Off,
    AnyOrigin,
    Origins(Vec<axum::http::HeaderValue>),
}

impl Cors {
    fn parse(origins: &[String]) -> Result<Self, String> {
        let origins: Vec<&str> = origins
            .iter()
            .map(|o| o.trim())
            .filter(|o| !o.is_empty())
            .collect();
        if origins.is_empty() {
            return Ok(Self::Off);
        }
        if origins.contains(&"*") {
            return if origins.len() == 1 {
                Ok(Self::AnyOrigin)
            } else {
                Err("--cors-allow-origins: `*` allows every origin; list origins or give `*` alone".into())
            };
        }
        origins
            .iter()
            .map(|o| {
                let host = o.strip_prefix("http://").or_else(|| o.strip_prefix("https://"));
                let ok = host.is_some_and(|h| !h.is_empty() && !h.contains('/'));
                match axum::http::HeaderValue::from_str(o) {
                    Ok(v) if ok => Ok(v),
                    _ => Err(format!(
                        "--cors-allow-origins: `{o}` is not an origin (scheme://host[:port], no path)"
                    )),
                }
            })
            .collect::<Result<_, _>>()
            .map(Self::Origins)
    }
}

impl Config {
    /// Parses flags (the first item is the program name) without exiting on error, for tests and for
    /// embedding; environment variables apply as for the binary.
    pub fn from_args<I, T>(args: I) -> Result<Self, String>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Self::try_parse_from(args).map_err(|e| e.to_string())
    }

    /// Checks every value and derives the settings; the message says which flag is wrong.
    pub fn validate(&self) -> Result<Settings, String> {
        let topology = Topology::new(&self.namespace, self.delivery_limit)?;
        let prompt_error = |e: String| format!("prompt rules: {e}");
        let prompts = RoutePrompts {
            run: self.prompt.cleaning().map_err(prompt_error)?,
            jobs: self.prompt.job_rules().map_err(prompt_error)?,
            openai: PromptRules::AsWritten,
        };
        let positive = |name: &str, v: u64| -> Result<u64, String> {
            if v == 0 {
                Err(format!("--{name} must be positive"))
            } else {
                Ok(v)
            }
        };
        let keys: Vec<(&str, shared::Lane)> = self
            .api_keys
            .iter()
            .map(|k| (k, shared::Lane::Interactive))
            .chain(self.batch_api_keys.iter().map(|k| (k, shared::Lane::Batch)))
            .map(|(k, lane)| (k.trim(), lane))
            .filter(|(k, _)| !k.is_empty())
            .collect();
        Ok(Settings {
            topology,
            broker_urls: std::sync::Arc::new(shared::brokers::BrokerUrls::new(&[&self.amqp_url])?),
            prompts,
            api_keys: ApiKeys::with_ceilings(keys),
            trusted_proxies: self.trusted_proxies.clone(),
            cors: Cors::parse(&self.cors_allow_origins)?,
            submit_limit: self.submit_rate_limit,
            read_limit: self.read_rate_limit,
            token_limit: self.token_rate_limit,
            max_active_jobs_per_client: self.max_active_jobs_per_client,
            max_queued_jobs: self.max_queued_jobs,
            idempotency_ttl: Duration::from_secs(positive("idempotency-ttl-s", self.idempotency_ttl_s)?),
            max_connections: positive("max-connections", self.max_connections as u64)? as usize,
            max_connections_per_client: self.max_connections_per_client,
            publish_retry_window: Duration::from_secs(self.publish_retry_window_s),
            submit_on_error: self.submit_rate_limit_on_error,
            read_on_error: self.read_rate_limit_on_error,
            redis_timeout: Duration::from_millis(positive("redis-timeout-ms", self.redis_timeout_ms)?),
            result_ttl: Duration::from_secs(positive("result-ttl-s", self.result_ttl_s)?),
            expired_retention: Duration::from_secs(self.expired_retention_s),
            run_timeout: Duration::from_secs(positive("run-timeout-s", self.run_timeout_s)?),
            run_poll_interval: Duration::from_millis(positive(
                "run-poll-interval-ms",
                self.run_poll_interval_ms,
            )?),
            max_run_waits_per_client: positive(
                "max-run-waits-per-client",
                self.max_run_waits_per_client as u64,
            )? as usize,
            max_streams_per_client: positive("max-streams-per-client", self.max_streams_per_client as u64)?
                as usize,
            cancel_on_disconnect: self.cancel_on_disconnect,
            served_model_name: match self.served_model_name.trim() {
                "" => return Err("--served-model-name must not be empty".into()),
                name => name.to_owned(),
            },
            consume_replies: self.consume_replies,
            context_length: positive("context-length", self.context_length as u64)? as usize,
            body_limit_bytes: positive("body-limit-bytes", self.body_limit_bytes as u64)? as usize,
            header_read_timeout: Duration::from_millis(positive(
                "header-read-timeout-ms",
                self.header_read_timeout_ms,
            )?),
            body_read_timeout: Duration::from_millis(positive(
                "body-read-timeout-ms",
                self.body_read_timeout_ms,
            )?),
            job_expiration: self.job_expiration_ms.map(Duration::from_millis),
            publish_channels: positive("publish-channels", self.publish_channels as u64)? as usize,
            publish_timeout: Duration::from_millis(positive("publish-timeout-ms", self.publish_timeout_ms)?),
            replies_prefetch: positive("replies-prefetch", u64::from(self.replies_prefetch))? as u16,
            queue_stats_cache: Duration::from_millis(self.queue_stats_cache_ms),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_s),
            storage: match &self.files_s3_bucket {
                Some(bucket) => crate::files::Storage::S3 {
                    bucket: bucket.clone(),
                    endpoint: self.files_s3_endpoint.clone(),
                    region: self.files_s3_region.clone(),
                    credentials: match (&self.files_s3_access_key_id, &self.files_s3_secret_access_key) {
                        (Some(id), Some(secret)) => Some((id.clone(), secret.clone())),
                        (None, None) => None,
                        _ => {
                            return Err(
                                "--files-s3-access-key-id and --files-s3-secret-access-key go together"
                                    .into(),
                            );
                        }
                    },
                },
                None => crate::files::Storage::Local(self.files_dir.clone()),
            },
            max_file_bytes: positive("max-file-bytes", self.max_file_bytes)?,
            batch: BatchSettings {
                slice: positive("batch-slice", self.batch_slice as u64)? as usize,
                max_requests: positive("batch-max-requests", self.batch_max_requests)?,
                poll: Duration::from_millis(positive("batch-poll-ms", self.batch_poll_ms)?),
                lease: Duration::from_millis(positive("batch-lease-ms", self.batch_lease_ms)?),
                window: Duration::from_secs(positive("batch-window-s", self.batch_window_s)?),
                max_line_bytes: self.body_limit_bytes,
                finalize_hold: Duration::from_millis(self.batch_finalize_hold_ms),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_original_deployments() {
        let config = Config::parse_from(["gateway"]);
        let s = config.validate().unwrap();
        assert_eq!(
            s.submit_limit,
            RateLimit {
                limit: 10,
                window: Duration::from_secs(60)
            }
        );
        assert_eq!(
            s.read_limit,
            RateLimit {
                limit: 500,
                window: Duration::from_secs(10)
            }
        );
        assert_eq!(s.submit_on_error, FailMode::Closed);
        assert_eq!(s.topology.namespace(), "gptj");
        assert_eq!(
            s.prompts,
            RoutePrompts {
                run: PromptRules::original(),
                jobs: PromptRules::AsWritten,
                openai: PromptRules::AsWritten,
            }
        );
    }

    #[test]
    fn rate_limits_read_as_count_per_window() {
        assert_eq!(
            "10/2s".parse::<RateLimit>().unwrap(),
            RateLimit {
                limit: 10,
                window: Duration::from_secs(2)
            }
        );
        assert_eq!(
            "5/1m".parse::<RateLimit>().unwrap().window,
            Duration::from_secs(60)
        );
        assert_eq!(
            "5/250ms".parse::<RateLimit>().unwrap().window,
            Duration::from_millis(250)
        );
        for bad in ["10", "0/1s", "10/0s", "x/1s", "10/1d"] {
            assert!(bad.parse::<RateLimit>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cors_origins_are_a_list_or_any_and_paths_are_refused() {
        let cors = |v: &[&str]| Cors::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(cors(&[]), Ok(Cors::Off));
        assert_eq!(cors(&["*"]), Ok(Cors::AnyOrigin));
        assert!(
            matches!(cors(&["https://a.example", "http://localhost:3000"]), Ok(Cors::Origins(o)) if o.len() == 2)
        );
        assert!(cors(&["https://a.example/app"]).is_err());
        assert!(cors(&["a.example"]).is_err());
        assert!(cors(&["*", "https://a.example"]).is_err());
    }

    #[test]
    fn the_prompt_policy_flag_moves_v1_jobs_alone_to_the_cleaning() {
        let s = Config::parse_from(["gateway", "--prompt-policy", "clean", "--prompt-max-chars", "80"])
            .validate()
            .unwrap();
        assert_eq!(s.prompts.jobs, s.prompts.run);
        assert!(s.prompts.run.clean(&"a".repeat(81)).is_err());
        assert_eq!(s.prompts.openai, PromptRules::AsWritten);
    }

    #[test]
    fn a_bad_namespace_stops_start_up() {
        let config = Config::parse_from(["gateway", "--namespace", "a.b"]);
        assert!(config.validate().is_err());
    }
}
