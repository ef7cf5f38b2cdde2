//! `worker serve` settings: every flag has an environment variable, so containers configure the worker
//! without a command line. [`ServeArgs::service_config`] turns them into checked values.

use clap::Args;

use crate::decoding::JoinPolicy;
use crate::engine::EngineArgs;
use shared::prompt::PromptArgs;
use shared::topology::{DEFAULT_DELIVERY_LIMIT, DEFAULT_NAMESPACE};
use shared::{PromptRules, Topology};

use super::error::ServeError;
use super::fault::EngineFault;
use super::generator::BatchSettings;
use super::health::{DEFAULT_MAX_ENGINE_FAILURES, DEFAULT_STEP_TIMEOUT_S, WatchSettings};
use super::stream::StreamSettings;

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// RabbitMQ URL (the vhost is the path, `%2f` for `/`); for a cluster, one per node, comma separated:
    /// the worker connects to one and moves to the next when it fails.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// Prefix of every queue name; must match the gateway's.
    #[arg(long, env = "NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Sequences the running batch holds at most: jobs decode together, joining and leaving between steps.
    /// 1 runs one job at a time [default: 32 on the CPU; with the model on a GPU, the KV-cache budget over
    /// 256 positions a sequence, from 32 to 1024].
    #[arg(long, env = "MAX_BATCH_SIZE", value_parser = clap::value_parser!(u16).range(1..))]
    pub max_batch_size: Option<u16>,
    /// KV-cache positions the running batch may allocate (rows × positions per row) [default: what fits
    /// in the memory the weights leave (90 % of each GPU's free memory, half the host's available memory),
    /// at most a full context for every sequence of the batch].
    #[arg(long, env = "MAX_BATCH_TOKENS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_batch_tokens: Option<u64>,
    /// While a batch decodes, waiting jobs join once they have waited this many steps (TGI's
    /// max_waiting_tokens)... The default, 0, admits them at the next step: a step prefills at most
    /// --max-prefill-tokens, so a join never holds the running jobs longer than one bounded prefill.
    #[arg(long, env = "MAX_WAITING_STEPS", default_value_t = 0)]
    pub max_waiting_steps: usize,
    /// ... or once they number this share of the running jobs (TGI's waiting_served_ratio), when
    /// --max-waiting-steps batches joins.
    #[arg(long, env = "WAITING_SERVED_RATIO", default_value_t = 0.3)]
    pub waiting_served_ratio: f64,
    /// Prompt tokens a step prefills at most (TGI's max_batch_prefill_tokens): jobs joining together are
    /// prefilled in one left-padded pass up to this many; a longer prompt is prefilled in chunks of this
    /// many tokens, one a step, while the batch decodes.
    #[arg(long, env = "MAX_PREFILL_TOKENS", default_value_t = crate::decoding::scheduler::DEFAULT_MAX_PREFILL_TOKENS)]
    pub max_prefill_tokens: usize,
    /// Whether batch-lane jobs pause while interactive ones run: `on`, `off`, or `auto` (on unless layers
    /// run on a GPU). Paused, a job's keys leave the batch (one copy) and come back when no interactive
    /// job runs, and batch-lane jobs wait to join. On a CPU a step costs more the more rows it has, so an
    /// interactive job then decodes as fast as on an idle worker; on a GPU a few more rows cost almost
    /// nothing, and sharing the steps keeps the batch lane going.
    #[arg(long, env = "PAUSE_BATCH_LANE", value_enum, default_value_t = Toggle::Auto)]
    pub pause_batch_lane: Toggle,
    /// Jobs the broker may hand this worker before it acknowledges one [default: --max-batch-size]. More
    /// than the batch holds only saves a round trip, and holds jobs other workers could have started.
    #[arg(long, env = "PREFETCH", value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: Option<u16>,
    /// Places of the running batch that batch-lane jobs (`{ns}.jobs.batch`) leave free for interactive ones
    /// (`{ns}.jobs`): an interactive job that arrives while the batch lane fills the rest joins at the
    /// engine's next step. The batch lane always has at least one place; interactive jobs may take all.
    #[arg(long, env = "INTERACTIVE_RESERVE", default_value_t = 1)]
    pub interactive_reserve: usize,
    /// Stream tokens as `job.token` replies, coalesced: a reply once this many tokens have gathered (or
    /// `--stream-interval-ms` has passed; the first token goes at once). 0 turns streaming off.
    #[arg(long, env = "STREAM_TOKENS", default_value_t = 16)]
    pub stream_tokens: usize,
    /// The longest a generated token waits to be streamed, in milliseconds.
    #[arg(long, env = "STREAM_INTERVAL_MS", default_value_t = 50)]
    pub stream_interval_ms: u64,
    /// Serve Prometheus metrics on this address, e.g. `0.0.0.0:9100` (`/metrics`).
    #[arg(long, env = "METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Name in replies and logs [default: HOSTNAME-PID; as a container's PID 1, HOSTNAME-sSTARTED].
    #[arg(long, env = "WORKER_ID")]
    pub worker_id: Option<String>,
    /// Deliveries of one job before the broker dead-letters it; must match the gateway's.
    #[arg(long, env = "DELIVERY_LIMIT", default_value_t = DEFAULT_DELIVERY_LIMIT)]
    pub delivery_limit: u32,
    /// Heartbeat interval asked of the broker, in seconds, unless the URL sets one (`?heartbeat=`). A worker
    /// that stops running (SIGSTOP, `docker pause`, a hung host) stops answering heartbeats, and the broker
    /// closes its connections, giving its jobs to other workers, after about two to three intervals. The
    /// broker's own default, 60 s, would leave them for minutes. 0 asks for none (the broker's then
    /// applies).
    #[arg(long, env = "AMQP_HEARTBEAT_S", default_value_t = DEFAULT_HEARTBEAT_S)]
    pub amqp_heartbeat_s: u16,
    /// Longest wait for the broker to confirm a reply, in milliseconds (a memory or disk alarm blocks
    /// publishing). A final reply not confirmed in time counts as not sent: the job is not acknowledged and
    /// goes back to the queue.
    #[arg(long, env = "PUBLISH_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub publish_timeout_ms: u64,
    /// An engine step (admission, prefills, one decode pass) running longer than this many seconds means
    /// the engine is hung: the worker stops taking jobs, leaves its unfinished ones to the queue and exits
    /// non-zero. 0 turns the watchdog off.
    #[arg(long, env = "ENGINE_STEP_TIMEOUT_S", default_value_t = DEFAULT_STEP_TIMEOUT_S)]
    pub engine_step_timeout_s: u64,
    /// This many jobs in a row failed by the engine (not by their input) mean the device is broken: the
    /// last of them and every unfinished job go back to the queue unanswered, and the worker exits non-zero.
    /// 0 never gives up.
    #[arg(long, env = "MAX_ENGINE_FAILURES", default_value_t = DEFAULT_MAX_ENGINE_FAILURES)]
    pub max_engine_failures: u32,
    /// Fault injection for tests of the watchdog: `hang` or `fail` the engine on purpose. Never in
    /// production.
    #[arg(long, env = "WORKER_INJECT_ENGINE_FAULT", hide = true)]
    pub inject_engine_fault: Option<EngineFault>,
    #[command(flatten)]
    pub prompt: PromptArgs,
}

/// What the queue loop needs, checked.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub brokers: std::sync::Arc<shared::brokers::BrokerUrls>,
    pub topology: Topology,
    /// How every job's prompt is taken (`--prompt-policy`): as written by default.
    pub rules: PromptRules,
    /// `None`: the engine's batch size.
    pub prefetch: Option<u16>,
    /// Places the batch lane leaves to interactive jobs.
    pub interactive_reserve: usize,
    pub worker_id: String,
    pub stream: StreamSettings,
    /// Longest wait for a reply's confirm.
    pub publish_timeout: std::time::Duration,
    /// The heartbeat interval asked for, in seconds, where the URL asks for none.
    pub heartbeat_s: u16,
}

/// `--amqp-heartbeat-s`'s default.
pub const DEFAULT_HEARTBEAT_S: u16 = 10;

impl ServeArgs {
    pub fn service_config(&self) -> Result<ServiceConfig, ServeError> {
        let topology = Topology::new(&self.namespace, self.delivery_limit).map_err(ServeError::Config)?;
        let rules = self.prompt.job_rules().map_err(ServeError::Config)?;
        let worker_id = match &self.worker_id {
            Some(id) if !id.trim().is_empty() => id.trim().to_owned(),
            _ => default_worker_id(),
        };
        if !(self.waiting_served_ratio.is_finite() && self.waiting_served_ratio >= 0.0) {
            return Err(ServeError::Config(format!(
                "--waiting-served-ratio must be a number >= 0, got {}",
                self.waiting_served_ratio
            )));
        }
        Ok(ServiceConfig {
            brokers: std::sync::Arc::new(
                shared::brokers::BrokerUrls::new(&[&self.amqp_url]).map_err(ServeError::Config)?,
            ),
            topology,
            rules,
            prefetch: self.prefetch,
            interactive_reserve: self.interactive_reserve,
            worker_id,
            stream: StreamSettings {
                tokens: self.stream_tokens,
                interval: std::time::Duration::from_millis(self.stream_interval_ms),
            },
            publish_timeout: std::time::Duration::from_millis(self.publish_timeout_ms),
            heartbeat_s: self.amqp_heartbeat_s,
        })
    }

    /// The engine watchdog's bounds; 0 turns either off.
    pub fn watch_settings(&self) -> WatchSettings {
        WatchSettings {
            step_timeout: Some(std::time::Duration::from_secs(self.engine_step_timeout_s))
                .filter(|t| !t.is_zero()),
            max_failures: std::num::NonZeroU32::new(self.max_engine_failures),
        }
    }

    /// The scheduler's settings.
    pub fn batch_settings(&self) -> BatchSettings {
        BatchSettings {
            max_batch_size: self.max_batch_size.map(usize::from),
            max_batch_tokens: self.max_batch_tokens.map(|t| t as usize),
            join: JoinPolicy {
                max_waiting_steps: self.max_waiting_steps,
                waiting_served_ratio: self.waiting_served_ratio,
                max_prefill_tokens: self.max_prefill_tokens,
                pause_batch: false,
            },
            pause_batch: match self.pause_batch_lane {
                Toggle::Auto => None,
                Toggle::On => Some(true),
                Toggle::Off => Some(false),
            },
        }
    }
}

/// A setting that is on, off, or chosen from the devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Toggle {
    Auto,
    On,
    Off,
}

/// `HOSTNAME-PID`: unique on a host, and tells an operator which machine and process answered. A process
/// that is PID 1 is a container's, and every start of that container is PID 1 under the same hostname:
/// there the start time (Unix seconds) stands in for the PID, so that each start of a restarted container
/// has a name of its own in replies, logs and metrics.
fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_owned());
    match std::process::id() {
        1 => {
            let started = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            format!("{host}-s{started}")
        }
        pid => format!("{host}-{pid}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn defaults_match_the_gateway_and_the_original_deployment() {
        let cli = Cli::try_parse_from(["worker", "--model", "/m"]).unwrap();
        let config = cli.serve.service_config().unwrap();
        assert_eq!(config.topology.jobs_queue(), "gptj.jobs");
        assert_eq!(config.topology.delivery_limit, 3);
        assert_eq!(config.prefetch, None, "prefetch follows the batch size");
        assert_eq!(config.interactive_reserve, 1);
        assert_eq!(
            cli.serve.max_batch_size, None,
            "the batch size follows the device"
        );
        assert_eq!(cli.serve.batch_settings(), BatchSettings::default());
        assert_eq!(
            config.rules,
            PromptRules::AsWritten,
            "the gateway cleans /run's prompts; a worker takes the text it is given"
        );
        assert!(config.worker_id.ends_with(&format!("-{}", std::process::id())));
        assert_eq!(config.publish_timeout, std::time::Duration::from_secs(10));
        assert_eq!(cli.serve.watch_settings(), WatchSettings::default());
        assert_eq!(cli.serve.inject_engine_fault, None);
    }

    #[test]
    fn zero_turns_either_watchdog_bound_off_and_a_zero_publish_timeout_is_refused() {
        let cli = Cli::try_parse_from([
            "worker",
            "--model",
            "/m",
            "--engine-step-timeout-s",
            "0",
            "--max-engine-failures",
            "0",
        ])
        .unwrap();
        let watch = cli.serve.watch_settings();
        assert_eq!((watch.step_timeout, watch.max_failures), (None, None));
        assert!(Cli::try_parse_from(["worker", "--model", "/m", "--publish-timeout-ms", "0"]).is_err());
        let cli = Cli::try_parse_from(["worker", "--model", "/m", "--inject-engine-fault", "hang"]).unwrap();
        assert_eq!(cli.serve.inject_engine_fault, Some(EngineFault::Hang));
    }

    #[test]
    fn a_zero_prefetch_or_batch_and_a_bad_namespace_are_refused() {
        assert!(Cli::try_parse_from(["worker", "--model", "/m", "--prefetch", "0"]).is_err());
        assert!(Cli::try_parse_from(["worker", "--model", "/m", "--max-batch-size", "0"]).is_err());
        assert!(Cli::try_parse_from(["worker", "--model", "/m", "--max-batch-tokens", "0"]).is_err());
        let cli = Cli::try_parse_from(["worker", "--model", "/m", "--max-batch-size", "4"]).unwrap();
        assert_eq!(cli.serve.batch_settings().max_batch_size, Some(4));
        assert_eq!(cli.serve.service_config().unwrap().prefetch, None);
        let cli = Cli::try_parse_from(["worker", "--model", "/m", "--namespace", "a.b"]).unwrap();
        assert!(matches!(cli.serve.service_config(), Err(ServeError::Config(_))));
    }

    #[test]
    fn prompt_rules_are_settings() {
        let cli = Cli::try_parse_from([
            "worker",
            "--model",
            "/m",
            "--prompt-policy",
            "clean",
            "--prompt-max-chars",
            "5",
            "--prompt-disallowed",
            "reject",
        ])
        .unwrap();
        let rules = cli.serve.service_config().unwrap().rules;
        assert!(rules.clean("abcdef").is_err());
        assert!(rules.clean("a$").is_err());
        let as_written = Cli::try_parse_from(["worker", "--model", "/m", "--prompt-max-chars", "5"]).unwrap();
        let rules = as_written.serve.service_config().unwrap().rules;
        assert_eq!(rules.clean("abcdef $"), Ok("abcdef $".to_owned()));
    }
}
