//! The worker's memory of recent jobs, so a redelivered job is answered without generating it twice.
//!
//! When the broker connection drops while a job is generating, the engine thread carries on (it cannot be
//! interrupted, and the work is worth keeping) and the broker puts the unacknowledged job back in the
//! queue. If the job comes back to this worker, after the reconnect, it is answered from here: it waits
//! for the same generation still running, or takes its finished result, instead of computing it again. The
//! same holds when the final reply went out but the ack did not. If the job goes to another worker instead,
//! that worker generates it; the job is never lost, at worst computed twice. Why not publish the kept reply
//! as soon as the connection is back? Because the job may by then be running elsewhere, and the producer
//! would get two final replies; answering only the redelivery keeps "one final reply per acknowledged
//! delivery".
//!
//! The memory is bounded (oldest first out): it only needs to span a reconnect.
//!
//! It also keeps when the job started, so that the `job.started` a redelivery sends again (the first may
//! have been lost with the connection) is the same reply, which the gateway's store reads as nothing new:
//! a job answered from memory ran once, and its record's `attempts` says so.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use shared::JobId;

use super::job::Outcome;

/// A job's outcome as many can await it; `None` when the engine thread died before answering.
pub type PendingOutcome = Shared<BoxFuture<'static, Option<Outcome>>>;

/// One job as remembered.
#[derive(Clone)]
pub struct Remembered {
    pub outcome: PendingOutcome,
    /// When its `job.started` was first sent (ms since the epoch).
    pub started_at_ms: Arc<OnceLock<u64>>,
}

pub struct Outcomes {
    capacity: usize,
    entries: HashMap<JobId, Remembered>,
    order: VecDeque<JobId>,
}

impl Outcomes {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// A job this worker already started, finished or not.
    pub fn get(&self, id: &JobId) -> Option<Remembered> {
        self.entries.get(id).cloned()
    }

    /// Remembers a job just handed to the engine, with the future of its outcome (`None` when the engine
    /// thread ends it without one).
    pub fn insert(&mut self, id: JobId, outcome: BoxFuture<'static, Option<Outcome>>) -> Remembered {
        let pending = Remembered {
            outcome: outcome.shared(),
            started_at_ms: Arc::default(),
        };
        if self.entries.insert(id, pending.clone()).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.entries.remove(&old);
            }
        }
        pending
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::{ErrorBody, ErrorCode};
    use tokio::sync::oneshot;

    /// A job's outcome as the engine thread hands it out.
    fn engine_job() -> (oneshot::Sender<Outcome>, BoxFuture<'static, Option<Outcome>>) {
        let (tx, rx) = oneshot::channel();
        (tx, rx.map(Result::ok).boxed())
    }

    #[tokio::test]
    async fn a_remembered_job_is_answered_with_the_same_outcome_twice() {
        let mut outcomes = Outcomes::new(4);
        let id = JobId::new_random();
        let (tx, rx) = engine_job();
        let first = outcomes.insert(id, rx);
        let again = outcomes.get(&id).unwrap();
        tx.send(Err(ErrorBody::new(ErrorCode::ContextOverflow, "x")))
            .unwrap();
        assert_eq!(first.outcome.await, again.outcome.await);
        // Awaited once already, it is still there for a third delivery.
        assert!(outcomes.get(&id).unwrap().outcome.await.unwrap().is_err());
    }

    #[test]
    fn a_redelivery_sends_the_same_start_as_the_first_delivery() {
        let mut outcomes = Outcomes::new(4);
        let id = JobId::new_random();
        let first = outcomes.insert(id, engine_job().1);
        let started = *first.started_at_ms.get_or_init(|| 1_000);
        let again = outcomes.get(&id).unwrap();
        assert_eq!(*again.started_at_ms.get_or_init(|| 2_000), started);
    }

    #[tokio::test]
    async fn a_dead_engine_reads_as_no_outcome() {
        let mut outcomes = Outcomes::new(4);
        let (tx, rx) = engine_job();
        let pending = outcomes.insert(JobId::new_random(), rx);
        drop(tx);
        assert_eq!(pending.outcome.await, None);
    }

    #[test]
    fn the_oldest_jobs_are_forgotten_first() {
        let mut outcomes = Outcomes::new(2);
        let ids: Vec<JobId> = (0..3).map(|_| JobId::new_random()).collect();
        for id in &ids {
            drop(outcomes.insert(*id, engine_job().1));
        }
        assert_eq!(outcomes.len(), 2);
        assert!(outcomes.get(&ids[0]).is_none());
        assert!(outcomes.get(&ids[1]).is_some() && outcomes.get(&ids[2]).is_some());
    }
}
