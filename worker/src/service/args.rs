//! `worker serve` settings: every flag has an environment variable, so containers configure the worker
//! without a command line. [`ServeArgs::service_config`] turns them into checked values.

use clap::Args;

use crate::engine::EngineArgs;
use shared::prompt::PromptArgs;
use shared::topology::{DEFAULT_DELIVERY_LIMIT, DEFAULT_NAMESPACE};
use shared::{PromptRules, Topology};

use super::ServeError;

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// RabbitMQ URL (the vhost is the path, `%2f` for `/`).
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
    /// Jobs the broker may hand this worker before it acknowledges one. They run one at a time; more than
    /// 1 only saves a round trip between jobs, and holds jobs other workers could have started.
    #[arg(long, env = "PREFETCH", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,
    /// Name in replies and logs [default: HOSTNAME-PID].
    #[arg(long, env = "WORKER_ID")]
    pub worker_id: Option<String>,
    /// Deliveries of one job before the broker dead-letters it; must match the gateway's.
    #[arg(long, env = "DELIVERY_LIMIT", default_value_t = DEFAULT_DELIVERY_LIMIT)]
    pub delivery_limit: u32,
    #[command(flatten)]
    pub prompt: PromptArgs,
}

/// What the queue loop needs, checked.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub amqp_url: String,
    pub topology: Topology,
    pub rules: PromptRules,
    pub prefetch: u16,
    pub worker_id: String,
}

impl ServeArgs {
    pub fn service_config(&self) -> Result<ServiceConfig, ServeError> {
        let topology = Topology::new(&self.namespace, self.delivery_limit).map_err(ServeError::Config)?;
        let rules = self.prompt.rules().map_err(ServeError::Config)?;
        let worker_id = match &self.worker_id {
            Some(id) if !id.trim().is_empty() => id.trim().to_owned(),
            _ => default_worker_id(),
        };
        Ok(ServiceConfig {
            amqp_url: self.amqp_url.clone(),
            topology,
            rules,
            prefetch: self.prefetch,
            worker_id,
        })
    }
}

/// `HOSTNAME-PID`: unique on a host, and tells an operator which machine and process answered.
fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_owned());
    format!("{host}-{}", std::process::id())
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
        assert_eq!(config.prefetch, 1);
        assert_eq!(config.rules, PromptRules::default());
        assert!(config.worker_id.ends_with(&format!("-{}", std::process::id())));
    }

    #[test]
    fn a_zero_prefetch_and_a_bad_namespace_are_refused() {
        assert!(Cli::try_parse_from(["worker", "--model", "/m", "--prefetch", "0"]).is_err());
        let cli = Cli::try_parse_from(["worker", "--model", "/m", "--namespace", "a.b"]).unwrap();
        assert!(matches!(cli.serve.service_config(), Err(ServeError::Config(_))));
    }

    #[test]
    fn prompt_rules_are_settings() {
        let cli = Cli::try_parse_from([
            "worker",
            "--model",
            "/m",
            "--prompt-max-chars",
            "5",
            "--prompt-disallowed",
            "reject",
        ])
        .unwrap();
        let rules = cli.serve.service_config().unwrap().rules;
        assert!(rules.clean("abcdef").is_err());
        assert!(rules.clean("a$").is_err());
    }
}
