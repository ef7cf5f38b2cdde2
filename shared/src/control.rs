//! Control messages: what a producer publishes on `{ns}.control` to reach every worker, wherever the job is.
//!
//! A job can be anywhere when it is cancelled: in the queue, in a worker's prefetch waiting for a place
//! in the batch, or decoding. So a cancel is not sent to a job but broadcast, as Celery broadcasts a revoke:
//! the fanout exchange `{ns}.control` routes it into `{ns}.cancellations`, a stream queue every worker reads
//! (a stream is read by every consumer, not shared out among them). Each worker keeps the ids it has read,
//! for the stream's retention: a job still queued is skipped by whichever worker receives it, a running one
//! leaves the batch at the next step, and a worker started later reads the recent cancels first.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::job::JobId;

/// The AMQP `type` property of a cancel.
pub const CANCEL_TYPE: &str = "job.cancel";
/// The AMQP `type` of the marker a worker publishes when it connects and reads back before it takes jobs:
/// the stream is ordered, so once its own marker arrives it has read every cancel published before it.
/// Other readers skip it.
pub const SYNC_TYPE: &str = "worker.sync";
/// The control body version this build writes and reads.
pub const CONTROL_VERSION: u32 = 1;

/// `{"version": 1, "job_id": "..."}`: stop this job. Cancelling a job that has finished changes nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelJob {
    pub version: u32,
    pub job_id: JobId,
}

impl CancelJob {
    pub fn new(job_id: JobId) -> Self {
        Self {
            version: CONTROL_VERSION,
            job_id,
        }
    }
}
