//! Priority lanes: which queue a job waits in.
//!
//! Interactive and bulk traffic wait in separate queues (`{ns}.jobs` and `{ns}.jobs.batch`, see
//! [`crate::Topology::lane_queue`]) rather than in one priority queue: a RabbitMQ quorum queue knows only
//! two priorities, and a priority queue expires messages only from its head. A worker fills its running
//! batch from the interactive lane first and gives the batch lane only the room interactive traffic leaves.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A lane, in order of precedence: a worker admits every waiting interactive job before a batch one, and an
/// API key's highest lane is the most precedence it may ask for.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    /// Bulk work that must not slow interactive traffic: it runs in the room interactive jobs leave.
    Batch,
    /// Requests a person or a program waits on: the default, and today's `{ns}.jobs`.
    #[default]
    Interactive,
}

impl Lane {
    /// Every lane, the highest precedence first: the order in which a worker admits waiting jobs.
    pub const ALL: [Lane; 2] = [Lane::Interactive, Lane::Batch];

    /// The lane's name, as JSON, metrics and the queue names spell it.
    pub fn name(self) -> &'static str {
        match self {
            Lane::Interactive => "interactive",
            Lane::Batch => "batch",
        }
    }

    /// The highest lane `self` and `ceiling` both allow: a request asks, its key's ceiling clamps (never
    /// an error).
    pub fn clamp_to(self, ceiling: Lane) -> Lane {
        self.min(ceiling)
    }
}

impl std::fmt::Display for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Lane {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "interactive" => Ok(Lane::Interactive),
            "batch" => Ok(Lane::Batch),
            other => Err(format!(
                "unknown lane `{other}`; the lanes are `interactive` and `batch`"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_are_spelled_in_lowercase() {
        assert_eq!(serde_json::to_string(&Lane::Batch).unwrap(), r#""batch""#);
        assert_eq!(
            serde_json::from_str::<Lane>(r#""interactive""#).unwrap(),
            Lane::Interactive
        );
        assert_eq!("batch".parse::<Lane>().unwrap(), Lane::Batch);
        assert!("priority".parse::<Lane>().is_err());
    }

    #[test]
    fn a_ceiling_clamps_a_lane_and_never_raises_it() {
        assert_eq!(Lane::Interactive.clamp_to(Lane::Batch), Lane::Batch);
        assert_eq!(Lane::Batch.clamp_to(Lane::Interactive), Lane::Batch);
        assert_eq!(Lane::Interactive.clamp_to(Lane::Interactive), Lane::Interactive);
        assert_eq!(Lane::ALL[0], Lane::Interactive);
    }
}
