//! Places in the running batch, handed out lane by lane: the worker's half of priority lanes.
//!
//! A worker consumes both lanes' queues (`shared::lane`). Every delivery waits here for a place before its
//! job is handed to the engine, and places go to waiting interactive jobs first, then to batch jobs, and
//! to batch jobs only up to the batch lane's share (`--interactive-reserve` places fewer than the batch
//! holds): a long batch backlog, however much of it the broker has handed over, never gets ahead of an
//! interactive job waiting here, and an interactive job that arrives while batch jobs fill their share
//! finds a place at once, so it joins the running batch at the engine's next step.
//!
//! The policy is [`Ledger`], pure and unit-tested; [`Places`] wraps it for the async side.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use shared::Lane;
use tokio::sync::oneshot;

/// Who holds and who waits for places; decides who gets the next one.
#[derive(Debug)]
pub struct Ledger {
    capacity: usize,
    /// Places the batch lane may hold at once.
    batch_share: usize,
    interactive_held: usize,
    batch_held: usize,
    interactive_waiting: VecDeque<u64>,
    batch_waiting: VecDeque<u64>,
}

impl Ledger {
    /// `capacity` places, of which the batch lane may hold all but `reserve` (and always at least one, so
    /// that a worker of one place still serves the batch lane).
    pub fn new(capacity: usize, reserve: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            batch_share: capacity.saturating_sub(reserve).max(1),
            interactive_held: 0,
            batch_held: 0,
            interactive_waiting: VecDeque::new(),
            batch_waiting: VecDeque::new(),
        }
    }

    /// Places the batch lane may hold at once.
    pub fn batch_share(&self) -> usize {
        self.batch_share
    }

    /// `ticket` waits for a place in `lane`.
    pub fn wait(&mut self, lane: Lane, ticket: u64) {
        match lane {
            Lane::Interactive => self.interactive_waiting.push_back(ticket),
            Lane::Batch => self.batch_waiting.push_back(ticket),
        }
    }

    /// Takes `ticket` out of line; `false` when it is not waiting (it was granted a place already).
    pub fn forget(&mut self, ticket: u64) -> bool {
        for line in [&mut self.interactive_waiting, &mut self.batch_waiting] {
            if let Some(i) = line.iter().position(|&t| t == ticket) {
                line.remove(i);
                return true;
            }
        }
        false
    }

    /// A place of `lane` is free again.
    pub fn release(&mut self, lane: Lane) {
        match lane {
            Lane::Interactive => self.interactive_held = self.interactive_held.saturating_sub(1),
            Lane::Batch => self.batch_held = self.batch_held.saturating_sub(1),
        }
    }

    /// The tickets that get a place now, in the order they get it: every interactive one that fits, then
    /// batch ones within the batch lane's share.
    pub fn grant(&mut self) -> Vec<u64> {
        let mut granted = Vec::new();
        while self.interactive_held + self.batch_held < self.capacity {
            if let Some(ticket) = self.interactive_waiting.pop_front() {
                self.interactive_held += 1;
                granted.push(ticket);
            } else if self.batch_held < self.batch_share
                && let Some(ticket) = self.batch_waiting.pop_front()
            {
                self.batch_held += 1;
                granted.push(ticket);
            } else {
                break;
            }
        }
        granted
    }
}

struct Inner {
    ledger: Ledger,
    wakers: HashMap<u64, oneshot::Sender<()>>,
    next_ticket: u64,
}

impl Inner {
    fn wake(&mut self) {
        for ticket in self.ledger.grant() {
            if let Some(waker) = self.wakers.remove(&ticket) {
                // A waiter that went away forgets its ticket first (under this lock), so it is still there.
                let _ = waker.send(());
            }
        }
    }
}

/// The running batch's places, shared by every delivery of the worker.
pub struct Places {
    inner: Mutex<Inner>,
}

impl Places {
    pub fn new(capacity: usize, reserve: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                ledger: Ledger::new(capacity, reserve),
                wakers: HashMap::new(),
                next_ticket: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Never held across an await, and nothing panics while holding it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Places the batch lane may hold at once.
    pub fn batch_share(&self) -> usize {
        self.lock().ledger.batch_share()
    }

    /// Waits for a place in `lane`. Dropping the future gives up the wait (or the place, if it was just
    /// granted).
    pub async fn acquire(self: &Arc<Self>, lane: Lane) -> Place {
        let (waker, woken) = oneshot::channel();
        let mut waiting = {
            let mut inner = self.lock();
            let ticket = inner.next_ticket;
            inner.next_ticket += 1;
            inner.wakers.insert(ticket, waker);
            inner.ledger.wait(lane, ticket);
            inner.wake();
            Waiting {
                places: self.clone(),
                ticket,
                lane,
                granted: false,
            }
        };
        // The sender is only dropped after sending, so this never fails.
        let _ = woken.await;
        waiting.granted = true;
        Place {
            places: self.clone(),
            lane,
        }
    }

    fn release(&self, lane: Lane) {
        let mut inner = self.lock();
        inner.ledger.release(lane);
        inner.wake();
    }
}

/// A wait for a place, given up when dropped before its place came.
struct Waiting {
    places: Arc<Places>,
    ticket: u64,
    lane: Lane,
    granted: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.granted {
            return;
        }
        let mut inner = self.places.lock();
        inner.wakers.remove(&self.ticket);
        if !inner.ledger.forget(self.ticket) {
            // Granted while this wait was being dropped: the place goes to the next in line.
            inner.ledger.release(self.lane);
            inner.wake();
        }
    }
}

/// A place in the running batch, freed when dropped.
pub struct Place {
    places: Arc<Places>,
    lane: Lane,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.places.release(self.lane);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_interactive_jobs_get_places_before_batch_jobs_that_came_first() {
        let mut ledger = Ledger::new(2, 0);
        for ticket in 0..4 {
            ledger.wait(Lane::Batch, ticket);
        }
        assert_eq!(ledger.grant(), [0, 1], "the batch lane fills an idle worker");
        ledger.wait(Lane::Interactive, 10);
        ledger.wait(Lane::Batch, 4);
        ledger.wait(Lane::Interactive, 11);
        assert!(ledger.grant().is_empty(), "nothing is free");
        ledger.release(Lane::Batch);
        assert_eq!(ledger.grant(), [10], "the next place goes to the interactive job");
        ledger.release(Lane::Batch);
        assert_eq!(ledger.grant(), [11]);
        ledger.release(Lane::Interactive);
        assert_eq!(
            ledger.grant(),
            [2],
            "batch jobs in their order once no interactive one waits"
        );
    }

    #[test]
    fn the_batch_lane_leaves_the_reserve_to_interactive_jobs() {
        let mut ledger = Ledger::new(4, 1);
        assert_eq!(ledger.batch_share(), 3);
        for ticket in 0..10 {
            ledger.wait(Lane::Batch, ticket);
        }
        assert_eq!(ledger.grant(), [0, 1, 2]);
        assert!(ledger.grant().is_empty(), "the last place stays free");
        ledger.wait(Lane::Interactive, 20);
        assert_eq!(ledger.grant(), [20], "an interactive job finds it at once");
        ledger.wait(Lane::Interactive, 21);
        ledger.release(Lane::Batch);
        assert_eq!(ledger.grant(), [21], "interactive jobs may hold every place");
    }

    #[test]
    fn a_worker_of_one_place_still_serves_the_batch_lane() {
        let mut ledger = Ledger::new(1, 1);
        assert_eq!(ledger.batch_share(), 1);
        ledger.wait(Lane::Batch, 0);
        assert_eq!(ledger.grant(), [0]);
    }

    #[test]
    fn a_wait_given_up_leaves_the_line() {
        let mut ledger = Ledger::new(1, 0);
        ledger.wait(Lane::Interactive, 0);
        ledger.wait(Lane::Interactive, 1);
        assert_eq!(ledger.grant(), [0]);
        assert!(ledger.forget(1));
        assert!(!ledger.forget(0), "granted, no longer waiting");
        ledger.release(Lane::Interactive);
        assert!(ledger.grant().is_empty());
    }

    #[tokio::test]
    async fn a_place_freed_goes_to_the_interactive_waiter_and_a_dropped_wait_passes_its_turn_on() {
        let places = Places::new(1, 0);
        let held = places.acquire(Lane::Batch).await;
        let batch = tokio::spawn({
            let places = places.clone();
            async move { places.acquire(Lane::Batch).await }
        });
        tokio::task::yield_now().await;
        let gone = tokio::spawn({
            let places = places.clone();
            async move { places.acquire(Lane::Interactive).await }
        });
        let interactive = tokio::spawn({
            let places = places.clone();
            async move { places.acquire(Lane::Interactive).await }
        });
        tokio::task::yield_now().await;
        gone.abort();
        let _ = gone.await;
        drop(held);
        let place = interactive.await.unwrap();
        assert!(!batch.is_finished(), "the batch job still waits");
        drop(place);
        batch.await.unwrap();
    }
}
