//! Fault injection, for the engine watchdog's end-to-end tests: the hidden `--inject-engine-fault` makes
//! the real engine's batch hang or fail the way a wedged or broken device would, without one.
//!
//! Like the fault-injection hooks of other serving stacks it is a test tool: hidden from `--help`, off
//! unless set, and it only ever *wraps* the engine when set (`run` picks the wrapper once, at start-up), so
//! the normal path has no branch for it. The faults sit behind the [`Generator`] seam, so everything from
//! the engine thread up (the watchdog, the session, acknowledgements) runs as it does for real.

use shared::{ErrorBody, ErrorCode, GenerationPlan};

use std::sync::Arc;

use super::generator::{Batcher, Generator, JobEvent};
use super::job::Prompt;
use crate::decoding::{Limits, Stats, StepProfile};
use crate::engine::PromptCodec;
use crate::sizing::BatchLimits;

/// What goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineFault {
    /// The first step runs (jobs join the batch and are answered `job.started`); every step after it never
    /// returns, as a kernel that never completes.
    Hang,
    /// Every job fails in the engine (`generation_failed`) at the first step after it arrives, as on a
    /// device that errors on every launch.
    Fail,
}

/// A generator with a fault.
pub struct Faulty<G> {
    inner: G,
    fault: EngineFault,
}

impl<G> Faulty<G> {
    pub fn new(inner: G, fault: EngineFault) -> Self {
        tracing::warn!(
            ?fault,
            "fault injection is on: this worker's engine is broken on purpose"
        );
        Self { inner, fault }
    }
}

impl<G: Generator> Generator for Faulty<G> {
    fn bounds(&self, max_batch_size: Option<usize>, max_batch_tokens: Option<usize>) -> BatchLimits {
        self.inner.bounds(max_batch_size, max_batch_tokens)
    }

    fn batcher(&self, limits: &Limits) -> Box<dyn Batcher + '_> {
        Box::new(FaultyBatch {
            inner: self.inner.batcher(limits),
            fault: self.fault,
            steps: 0,
            failing: Vec::new(),
        })
    }

    fn codec(&self) -> Option<Arc<PromptCodec>> {
        self.inner.codec()
    }
}

struct FaultyBatch<'a> {
    inner: Box<dyn Batcher + 'a>,
    fault: EngineFault,
    steps: usize,
    /// `Fail`: the jobs to fail at the next step.
    failing: Vec<u64>,
}

/// The message a failed job carries.
pub const INJECTED_FAILURE: &str = "injected engine fault: the device failed";

impl Batcher for FaultyBatch<'_> {
    fn submit(&mut self, key: u64, prompt: Prompt, plan: &GenerationPlan) -> Result<(), ErrorBody> {
        match self.fault {
            EngineFault::Hang => self.inner.submit(key, prompt, plan),
            EngineFault::Fail => {
                self.failing.push(key);
                Ok(())
            }
        }
    }

    fn step(&mut self) -> Vec<JobEvent> {
        self.steps += 1;
        match self.fault {
            EngineFault::Hang if self.steps > 1 => loop {
                std::thread::park();
            },
            EngineFault::Hang => self.inner.step(),
            EngineFault::Fail => self
                .failing
                .drain(..)
                .map(|key| JobEvent::Done {
                    key,
                    result: Err(ErrorBody::new(ErrorCode::GenerationFailed, INJECTED_FAILURE)),
                })
                .collect(),
        }
    }

    fn has_work(&self) -> bool {
        match self.fault {
            EngineFault::Hang => self.inner.has_work(),
            EngineFault::Fail => !self.failing.is_empty(),
        }
    }

    fn cancel(&mut self, key: u64) -> bool {
        match self.fault {
            EngineFault::Hang => self.inner.cancel(key),
            EngineFault::Fail => {
                let before = self.failing.len();
                self.failing.retain(|&k| k != key);
                self.failing.len() < before
            }
        }
    }

    fn stats(&self) -> Stats {
        self.inner.stats()
    }

    fn profile(&self) -> Option<StepProfile> {
        self.inner.profile()
    }
}
