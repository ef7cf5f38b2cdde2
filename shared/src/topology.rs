//! Queue and exchange names, all derived from one namespace, and (with the `amqp` feature, in `declare`)
//! the idempotent declaration every process runs. The gateway's Redis keys live under the same namespace
//! (its `keys` module names them).
//!
//! Every process declares the same topology with the same arguments at start-up and after each reconnect,
//! so no process depends on another having started first. Tests use their own namespace and so can share
//! one broker and one Redis.

#[cfg(feature = "amqp")]
mod declare;

use crate::lane::Lane;

/// Default namespace, as the README documents.
pub const DEFAULT_NAMESPACE: &str = "gptj";
/// Deliveries of one job before the broker dead-letters it (a job that kills its worker every time).
pub const DEFAULT_DELIVERY_LIMIT: u32 = 3;
/// How long the cancellations stream keeps a cancel, and so how long a worker remembers one: a job queued
/// longer than this and cancelled at the start of that time may still run (its result is then ignored).
pub const CANCEL_RETENTION: &str = "24h";
pub const CANCEL_RETENTION_SECS: u64 = 24 * 3600;

/// Names of everything one deployment uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    namespace: String,
    pub delivery_limit: u32,
}

impl Topology {
    /// Namespaces are restricted to `[A-Za-z0-9_-]`, 1 to 64 characters, so names stay valid for AMQP and
    /// unambiguous as Redis key prefixes.
    pub fn new(namespace: &str, delivery_limit: u32) -> Result<Self, String> {
        let ok = !namespace.is_empty()
            && namespace.len() <= 64
            && namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !ok {
            return Err(format!(
                "namespace `{namespace}` must be 1 to 64 characters of A-Z a-z 0-9 _ -"
            ));
        }
        if delivery_limit == 0 {
            return Err("delivery limit must be at least 1".into());
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            delivery_limit,
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    /// Durable quorum queue of jobs, consumed by workers: the interactive lane's (see
    /// [`Topology::lane_queue`]), under the name it had before lanes, so producers that know no lanes keep
    /// publishing interactive jobs.
    pub fn jobs_queue(&self) -> String {
        self.lane_queue(Lane::Interactive)
    }
    /// The queue of a lane's jobs: `{ns}.jobs` for interactive jobs, `{ns}.jobs.batch` for batch ones.
    /// Both are declared alike (quorum, the same delivery limit and dead-letter queue).
    pub fn lane_queue(&self, lane: Lane) -> String {
        match lane {
            Lane::Interactive => format!("{}.jobs", self.namespace),
            Lane::Batch => format!("{}.jobs.batch", self.namespace),
        }
    }
    /// Where jobs go that could not be processed (malformed, or past the delivery limit).
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.jobs.dead", self.namespace)
    }
    /// Durable queue of replies for jobs submitted through the gateway, consumed by every gateway replica.
    pub fn replies_queue(&self) -> String {
        format!("{}.replies", self.namespace)
    }
    /// Fanout exchange of control messages (`job.cancel`), see [`crate::control`].
    pub fn control_exchange(&self) -> String {
        format!("{}.control", self.namespace)
    }
    /// Stream queue of recent cancels, bound to the control exchange; every worker reads all of it.
    pub fn cancellations_queue(&self) -> String {
        format!("{}.cancellations", self.namespace)
    }
    /// The routing key of the gateway's alarm probe: no queue has this name, so the broker drops the probe.
    pub fn alarm_probe_key(&self) -> String {
        format!("{}.alarm-probe", self.namespace)
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self {
            namespace: DEFAULT_NAMESPACE.to_owned(),
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_derives_from_the_namespace() {
        let t = Topology::new("blue", 3).unwrap();
        assert_eq!(t.jobs_queue(), "blue.jobs");
        assert_eq!(t.lane_queue(Lane::Interactive), "blue.jobs");
        assert_eq!(t.lane_queue(Lane::Batch), "blue.jobs.batch");
        assert_eq!(t.dead_letter_queue(), "blue.jobs.dead");
        assert_eq!(t.replies_queue(), "blue.replies");
        assert_eq!(t.control_exchange(), "blue.control");
        assert_eq!(t.cancellations_queue(), "blue.cancellations");
    }

    #[test]
    fn namespaces_with_separators_are_refused() {
        assert!(Topology::new("a.b", 3).is_err());
        assert!(Topology::new("a:b", 3).is_err());
        assert!(Topology::new("", 3).is_err());
    }
}
