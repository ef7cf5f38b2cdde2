//! The cancelled job ids this worker has read from the cancellations stream, and the jobs watching for
//! theirs.
//!
//! A cancel can arrive before the job (it is still queued, or waits in another worker's prefetch), while
//! it waits here for a place in the batch, or while it decodes. So the ids are kept, for the stream's
//! retention (`shared::topology::CANCEL_RETENTION`) and up to a bound, and a job checks them when it
//! arrives; a job in hand registers a token that a cancel read later trips. Celery's revoke works the same
//! way: a broadcast, and a set of revoked ids each worker keeps.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use shared::JobId;
use tokio_util::sync::CancellationToken;

/// Ids kept at most, whatever their age: a bound on memory if cancels come faster than they expire.
const MAX_REMEMBERED: usize = 100_000;

#[derive(Default)]
struct Inner {
    cancelled: HashMap<JobId, SystemTime>,
    order: VecDeque<(SystemTime, JobId)>,
    watching: HashMap<JobId, CancellationToken>,
}

/// Shared by the control consumer (which records cancels) and the jobs (which watch for theirs).
#[derive(Clone)]
pub struct Cancels {
    inner: Arc<Mutex<Inner>>,
    retention: Duration,
}

/// A job's interest in its own cancellation; removed when dropped.
pub struct Watch {
    cancels: Cancels,
    id: JobId,
    pub token: CancellationToken,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.cancels.lock().watching.remove(&self.id);
    }
}

impl Cancels {
    pub fn new(retention: Duration) -> Self {
        Self {
            inner: Arc::default(),
            retention,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing panics while holding it; a poisoned lock still holds valid data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a cancel published at `at` (older than the retention: ignored) and trips the job's watch.
    pub fn cancel(&self, id: JobId, at: SystemTime) {
        let now = SystemTime::now();
        if now.duration_since(at).unwrap_or_default() > self.retention {
            return;
        }
        let mut inner = self.lock();
        if inner.cancelled.insert(id, at).is_none() {
            inner.order.push_back((at, id));
        }
        if let Some(token) = inner.watching.get(&id) {
            token.cancel();
        }
        while let Some(&(oldest, old)) = inner.order.front() {
            let expired = now.duration_since(oldest).unwrap_or_default() > self.retention;
            if !expired && inner.order.len() <= MAX_REMEMBERED {
                break;
            }
            inner.order.pop_front();
            inner.cancelled.remove(&old);
        }
    }

    /// Watches for `id`'s cancel; the token is already tripped when the cancel came first.
    pub fn watch(&self, id: JobId) -> Watch {
        let token = CancellationToken::new();
        let mut inner = self.lock();
        if inner.cancelled.contains_key(&id) {
            token.cancel();
        }
        inner.watching.insert(id, token.clone());
        drop(inner);
        Watch {
            cancels: self.clone(),
            id,
            token,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_read_before_the_job_arrives_is_remembered() {
        let cancels = Cancels::new(Duration::from_secs(60));
        let id = JobId::new_random();
        cancels.cancel(id, SystemTime::now());
        assert!(cancels.watch(id).token.is_cancelled());
        assert!(!cancels.watch(JobId::new_random()).token.is_cancelled());
    }

    #[test]
    fn a_cancel_read_while_the_job_runs_trips_its_watch() {
        let cancels = Cancels::new(Duration::from_secs(60));
        let id = JobId::new_random();
        let watch = cancels.watch(id);
        assert!(!watch.token.is_cancelled());
        cancels.cancel(id, SystemTime::now());
        assert!(watch.token.is_cancelled());
    }

    #[test]
    fn cancels_older_than_the_retention_are_forgotten() {
        let cancels = Cancels::new(Duration::from_secs(60));
        let old = JobId::new_random();
        cancels.cancel(old, SystemTime::now() - Duration::from_secs(120));
        assert!(!cancels.watch(old).token.is_cancelled());
    }
}
