//! How a request follows a job it did not run: waiting for its end (`/run`, non-streamed OpenAI calls), or
//! reading its event log as it grows (`/v1/jobs/{id}/events`, streamed OpenAI calls); and how a client that
//! hangs up takes its job with it.
//!
//! Both read Redis, never the replies, so they work on any replica whichever consumed the replies: a
//! pub/sub notice (see [`crate::waiters`]) wakes them, and they read the job again only when woken (or,
//! while notices may be lost, every `run_poll_interval`). A queued job's place in line is made of figures
//! every follower on the replica shares ([`crate::store::JobStore::figures_within`], the broker's
//! counts), so following a queued job costs Redis nothing of its own either.

use std::collections::VecDeque;
use std::time::Duration;

use futures::Stream;
use shared::JobId;
use tokio::time::Instant;

use crate::app::AppState;
use crate::position::QueuePosition;
use crate::store::{JobRecord, LogEntry, Status};
use crate::waiters::{Interest, Registration};

/// How a wait for a job's end ended.
pub enum Waited {
    Final(Box<JobRecord>),
    /// `run_timeout` passed; the job goes on.
    TimedOut,
}

/// Waits for the job's final record: the completion notice wakes it, the poll interval backs it up.
pub async fn wait_final(app: &AppState, id: JobId, registration: &Registration) -> Waited {
    let s = &app.settings;
    let deadline = Instant::now() + s.run_timeout;
    loop {
        match app.store.get(id).await {
            Ok(Some((record, _))) if record.status.is_final() => return Waited::Final(Box::new(record)),
            Ok(_) => {}
            // A Redis blip must not fail a job that is running fine: keep waiting, read again.
            Err(e) => tracing::warn!(error = %e, %id, "reading a job record failed; retrying"),
        }
        tokio::select! {
            _ = registration.notify.notified() => {}
            _ = tokio::time::sleep(app.waiters.poll_interval(s.run_poll_interval)) => {}
            _ = tokio::time::sleep_until(deadline) => return Waited::TimedOut,
        }
    }
}

/// What following a job yields, in order.
#[derive(Debug)]
pub enum Followed {
    /// Still queued: the estimated place in line (sent when it changes, and every few seconds).
    Queued(QueuePosition),
    /// A `started` or `token` entry of the job's event log.
    Entry(LogEntry),
    /// The job ended; the entry id when the log had it.
    Final {
        record: Box<JobRecord>,
        entry_id: Option<String>,
    },
    /// The record is gone (expired and dropped) while it was followed.
    Gone,
}

/// Entries read per Redis call.
const PAGE: usize = 256;
/// A queued event is repeated this often even when the place in line has not moved.
const QUEUED_EVERY: Duration = Duration::from_secs(5);
/// And sent at most this often; the shared figures it is made of are at most this old.
const QUEUED_MIN_GAP: Duration = Duration::from_secs(1);

struct Follower {
    app: AppState,
    id: JobId,
    cursor: String,
    registration: Registration,
    ready: VecDeque<Followed>,
    done: bool,
    last_queued: Option<(Instant, u64)>,
    /// The record as last read, while the log has nothing new; `None` when the log must be read (at
    /// first, and after every notice or poll).
    quiet: Option<Box<JobRecord>>,
    /// When the log is read again without a notice: the poll (or the backstop) counts from the last read,
    /// not from each wake-up a queued job's place in line makes.
    read_due: Instant,
}

/// The job's events after `after` (a log entry id; `0-0` for all), ending with its final state.
pub fn follow(app: AppState, id: JobId, after: String) -> impl Stream<Item = Followed> + Send {
    let registration = app.waiters.register(id, Interest::Events);
    let follower = Follower {
        app,
        id,
        cursor: after,
        registration,
        ready: VecDeque::new(),
        done: false,
        last_queued: None,
        quiet: None,
        read_due: Instant::now(),
    };
    futures::stream::unfold(follower, |mut f| async move {
        loop {
            if let Some(item) = f.ready.pop_front() {
                return Some((item, f));
            }
            if f.done {
                return None;
            }
            f.read().await;
        }
    })
}

impl Follower {
    /// One read of the log; queues what it found, or waits for news when there is none.
    async fn read(&mut self) {
        let poll = self.app.settings.run_poll_interval;
        if let Some(record) = self.quiet.take() {
            return self.wait(record).await;
        }
        self.read_due = Instant::now() + self.app.waiters.poll_interval(poll);
        let (entries, record) = match self.app.store.read_log(self.id, &self.cursor, PAGE).await {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(error = %e, id = %self.id, "reading a job's events failed; retrying");
                tokio::time::sleep(poll).await;
                return;
            }
        };
        let Some(record) = record else {
            self.ready.push_back(Followed::Gone);
            self.done = true;
            return;
        };
        let full_page = entries.len() == PAGE;
        let found = !entries.is_empty();
        for entry in entries {
            self.cursor = entry.id.clone();
            if matches!(entry.event.as_str(), "started" | "token") {
                self.ready.push_back(Followed::Entry(entry));
            } else {
                self.ready.push_back(Followed::Final {
                    record: Box::new(record),
                    entry_id: Some(entry.id),
                });
                self.done = true;
                return;
            }
        }
        if full_page || found {
            return;
        }
        // The record was read before the log, and a final write appends to the log in the same script: a
        // final record with no final entry after the cursor has none at all (it ended before logs existed,
        // or its log expired first).
        if record.status.is_final() {
            self.ready.push_back(Followed::Final {
                record: Box::new(record),
                entry_id: None,
            });
            self.done = true;
            return;
        }
        self.wait(Box::new(record)).await;
    }

    /// Nothing new in the log: says the place in line when it is due (a queued job), else waits for a
    /// notice, the poll, or the next place in line, and reads the log again only after a notice or a poll.
    async fn wait(&mut self, record: Box<JobRecord>) {
        let mut next_place = None;
        if record.status == Status::Queued {
            if let Some(queued) = self.queued(&record).await {
                self.ready.push_back(Followed::Queued(queued));
                self.quiet = Some(record);
                return;
            }
            next_place = Some(QUEUED_MIN_GAP);
        }
        let place_due = Instant::now() + next_place.unwrap_or_default();
        tokio::select! {
            biased;
            _ = self.registration.notify.notified() => {}
            _ = tokio::time::sleep_until(self.read_due) => {}
            // Not a read of the log: only the shared figures move a queued job's place.
            _ = tokio::time::sleep_until(place_due), if next_place.is_some() => {
                self.quiet = Some(record);
            }
        }
    }

    /// The place in line, when it is time to say it again.
    async fn queued(&mut self, record: &JobRecord) -> Option<QueuePosition> {
        let now = Instant::now();
        if let Some((at, _)) = self.last_queued
            && now < at + QUEUED_MIN_GAP
        {
            return None;
        }
        // The record came with the log; only the queue-wide figures are still needed, shared by every
        // follower on this replica.
        let figures = self.app.store.figures_within(QUEUED_MIN_GAP).await.ok()?;
        let stats = self.app.broker.queue_stats_within(QUEUED_MIN_GAP).await.ok();
        let p = QueuePosition::estimate(record, &figures, stats.as_ref());
        let due = match self.last_queued {
            None => true,
            Some((at, last)) => last != p.position || now >= at + QUEUED_EVERY,
        };
        if !due {
            return None;
        }
        self.last_queued = Some((now, p.position));
        Some(p)
    }
}

/// Cancels a job when dropped while armed: held by a request whose client owns the job, and disarmed
/// once the client has its answer (or the contract says the job goes on, as after `/run`'s timeout).
pub struct CancelOnDrop {
    app: AppState,
    ids: Vec<JobId>,
    armed: bool,
}

impl CancelOnDrop {
    /// Armed only when the gateway is configured to cancel on disconnect.
    pub fn new(app: &AppState, ids: Vec<JobId>, wanted: bool) -> Self {
        Self {
            app: app.clone(),
            ids,
            armed: wanted,
        }
    }

    pub fn disarm(&mut self) {
        self.armed = false;
    }

    /// Stops watching one job (it ended) while the others stay owned.
    pub fn release(&mut self, id: JobId) {
        self.ids.retain(|i| *i != id);
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed || self.ids.is_empty() {
            return;
        }
        let app = self.app.clone();
        let ids = std::mem::take(&mut self.ids);
        // Drop runs where the request's future was dropped, inside the runtime.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for id in ids {
                    tracing::info!(%id, "the client hung up; cancelling its job");
                    if let Err(e) = app.cancel(id).await {
                        tracing::warn!(error = %e, %id, "cancelling the job of a client that hung up failed");
                    }
                }
            });
        }
    }
}
