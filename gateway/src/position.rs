//! A queued job's place in line and its expected wait, as polls (`GET /v1/jobs/{id}`) and event streams
//! (`queued` events) report it.
//!
//! Its own module, below both of them: the estimate is made of the job records' counters and the broker's
//! figures, and belongs to neither the handlers nor the follower that show it.

use serde::Serialize;
use utoipa::ToSchema;

use crate::broker::QueueStats;
use crate::store::{Figures, JobRecord};

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct QueuePosition {
    /// Estimated jobs ahead of this one, itself included.
    pub position: u64,
    /// Estimated seconds until a worker takes it; absent until a job has finished to time from.
    pub estimated_wait_s: Option<f64>,
}

impl QueuePosition {
    /// Place in line: submissions before this one minus jobs that have left the queue, clamped to the
    /// jobs the broker holds ahead of its lane (an interactive job waits behind the interactive queue only,
    /// a batch job behind both); the wait spreads that many average jobs over the consumers. Without the
    /// broker's figures, the records' alone, over one consumer.
    pub fn estimate(record: &JobRecord, figures: &Figures, broker: Option<&QueueStats>) -> Self {
        let mut position = record.seq.saturating_sub(figures.taken).max(1);
        if let Some(stats) = broker {
            let ahead = stats.ahead_of(record.lane);
            if ahead > 0 {
                position = position.min(ahead);
            }
        }
        let consumers = broker.map(|s| s.consumers).unwrap_or(1).max(1);
        let estimated_wait_s = figures
            .avg_inference_ms
            .map(|ms| position as f64 * ms / 1000.0 / f64::from(consumers));
        Self {
            position,
            estimated_wait_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use shared::JobId;

    use super::*;
    use crate::store::Status;

    fn record(seq: u64) -> JobRecord {
        JobRecord {
            id: JobId::new_random(),
            status: Status::Queued,
            prompt: "hi".into(),
            parameters: serde_json::json!({}),
            owner: None,
            seq,
            submitted_at_ms: Some(1),
            started_at_ms: None,
            finished_at_ms: None,
            worker_id: None,
            attempts: 0,
            result: None,
            error: None,
            lane: shared::Lane::Interactive,
        }
    }

    fn stats(depth: u32, consumers: u32) -> QueueStats {
        QueueStats {
            depth,
            consumers,
            interactive: depth,
            batch: 0,
        }
    }

    #[test]
    fn the_position_counts_jobs_not_yet_taken_and_never_exceeds_the_depth() {
        let figures = Figures {
            running: 0,
            taken: 10,
            avg_inference_ms: Some(2000.0),
        };
        let p = QueuePosition::estimate(&record(15), &figures, Some(&stats(100, 2)));
        assert_eq!(p.position, 5);
        assert_eq!(p.estimated_wait_s, Some(5.0));
        let clamped = QueuePosition::estimate(&record(15), &figures, Some(&stats(3, 1)));
        assert_eq!(clamped.position, 3);
        assert_eq!(QueuePosition::estimate(&record(4), &figures, None).position, 1);
    }

    #[test]
    fn an_interactive_job_waits_behind_its_lane_and_a_batch_job_behind_both() {
        let figures = Figures {
            running: 0,
            taken: 0,
            avg_inference_ms: None,
        };
        let stats = QueueStats {
            depth: 105,
            consumers: 1,
            interactive: 5,
            batch: 100,
        };
        let interactive = record(500);
        assert_eq!(
            QueuePosition::estimate(&interactive, &figures, Some(&stats)).position,
            5
        );
        let batch = JobRecord {
            lane: shared::Lane::Batch,
            ..record(500)
        };
        assert_eq!(
            QueuePosition::estimate(&batch, &figures, Some(&stats)).position,
            105
        );
    }
}
