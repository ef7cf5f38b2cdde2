//! Generation runs on one dedicated OS thread that owns the engine.
//!
//! A forward pass holds a CPU core (or waits on a GPU) for seconds. Run on the async runtime, it would
//! starve lapin's I/O loop: the worker would stop answering broker heartbeats, the broker would close the
//! connection and hand the job to a second worker while the first one is still computing it. So the engine
//! lives on its own thread, jobs reach it over a bounded channel, and each result comes back over a
//! oneshot; the runtime only ever awaits.
//!
//! The engine is behind the small [`Generator`] trait so the queue logic can be tested with a stand-in,
//! and the engine is built *on* its thread, so it never has to be `Send`.

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use shared::{ErrorBody, ErrorCode, FinishReason, GenerationPlan};
use tokio::sync::{mpsc, oneshot};

/// What one generation produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The continuation only (stop sequence excluded).
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_ms: u64,
    pub decode_ms: u64,
}

/// Anything that turns a cleaned prompt and a validated plan into text. Errors are already in the shape a
/// `job.failed` reply carries.
pub trait Generator {
    fn generate(&self, prompt: &str, plan: &GenerationPlan) -> Result<Completion, ErrorBody>;
}

/// A finished generation and its wall time on the engine thread.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub completion: Completion,
    pub inference_ms: u64,
}

/// The result of one job: text, or the error its `job.failed` reply carries.
pub type Outcome = Result<Finished, ErrorBody>;

struct Request {
    prompt: String,
    plan: GenerationPlan,
    reply: oneshot::Sender<Outcome>,
}

/// The engine thread stopped (its loader failed, or it is gone): the worker cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the model failed to load: {0}")]
    Load(String),
    #[error("the engine thread is gone")]
    Gone,
}

/// Handle to the engine thread. Cloning it shares the thread; the thread ends when every handle is dropped.
#[derive(Clone)]
pub struct EngineThread {
    tx: mpsc::Sender<Request>,
}

impl EngineThread {
    /// Starts the thread, builds the generator there with `load`, and returns once it is ready to take
    /// jobs. `capacity` bounds the jobs waiting for the engine.
    pub async fn start<G, E, F>(load: F, capacity: usize) -> Result<Self, EngineError>
    where
        G: Generator,
        E: std::fmt::Display,
        F: FnOnce() -> Result<G, E> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Request>(capacity.max(1));
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), String>>();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                let generator = match load() {
                    Ok(g) => {
                        let _ = ready_tx.send(Ok(()));
                        g
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                while let Some(req) = rx.blocking_recv() {
                    let started = Instant::now();
                    // A panic inside the engine (libtorch raises through `tch` as panics) must fail one
                    // job, not end the thread and with it every later job.
                    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        generator.generate(&req.prompt, &req.plan)
                    }))
                    .unwrap_or_else(|panic| {
                        let what = panic
                            .downcast_ref::<String>()
                            .map(String::as_str)
                            .or_else(|| panic.downcast_ref::<&str>().copied())
                            .unwrap_or("unknown panic");
                        tracing::error!(panic = what, "generation panicked");
                        Err(ErrorBody::new(
                            ErrorCode::GenerationFailed,
                            "generation failed inside the engine",
                        ))
                    });
                    let outcome = result.map(|completion| Finished {
                        completion,
                        inference_ms: started.elapsed().as_millis() as u64,
                    });
                    // The receiver is gone when the connection dropped and nobody waits for this job any
                    // more; the result is simply discarded then.
                    let _ = req.reply.send(outcome);
                }
            })
            .map_err(|e| EngineError::Load(format!("cannot spawn the engine thread: {e}")))?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(Self { tx }),
            Ok(Err(e)) => Err(EngineError::Load(e)),
            Err(_) => Err(EngineError::Load("the loader panicked".into())),
        }
    }

    /// Queues a job for the engine (waiting while the queue is full) and returns where its outcome will
    /// arrive. The job runs even if the receiver is dropped.
    pub async fn submit(
        &self,
        prompt: String,
        plan: GenerationPlan,
    ) -> Result<oneshot::Receiver<Outcome>, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { prompt, plan, reply })
            .await
            .map_err(|_| EngineError::Gone)?;
        Ok(rx)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Echoes the prompt, counting calls; panics on the prompt "boom".
    pub(crate) struct Echo {
        pub calls: Arc<AtomicUsize>,
        pub thread: Arc<std::sync::Mutex<Option<std::thread::ThreadId>>>,
    }

    impl Generator for Echo {
        fn generate(&self, prompt: &str, plan: &GenerationPlan) -> Result<Completion, ErrorBody> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            *self.thread.lock().unwrap() = Some(std::thread::current().id());
            if prompt == "boom" {
                panic!("kaboom");
            }
            if prompt == "fail" {
                return Err(ErrorBody::new(ErrorCode::ContextOverflow, "too long"));
            }
            Ok(Completion {
                text: format!(" {prompt}"),
                token_ids: vec![1; plan.max_new_tokens],
                finish_reason: FinishReason::Length,
                prompt_tokens: 1,
                prefill_ms: 0,
                decode_ms: 0,
            })
        }
    }

    pub(crate) fn echo() -> (Echo, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        (
            Echo {
                calls: calls.clone(),
                thread: Default::default(),
            },
            calls,
        )
    }

    fn plan() -> GenerationPlan {
        shared::GenerationParameters {
            max_new_tokens: Some(3),
            ..Default::default()
        }
        .validate()
        .unwrap()
    }

    #[tokio::test]
    async fn generation_runs_off_the_async_runtime_on_one_engine_thread() {
        let (generator, _) = echo();
        let seen = generator.thread.clone();
        let engine = EngineThread::start(move || Ok::<_, String>(generator), 2)
            .await
            .unwrap();
        let out = engine
            .submit("hi".into(), plan())
            .await
            .unwrap()
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out.completion.text, " hi");
        assert_eq!(out.completion.token_ids.len(), 3);
        let engine_thread = seen.lock().unwrap().unwrap();
        assert_ne!(engine_thread, std::thread::current().id());
    }

    #[tokio::test]
    async fn a_panicking_job_fails_alone_and_the_engine_keeps_serving() {
        let (generator, calls) = echo();
        let engine = EngineThread::start(move || Ok::<_, String>(generator), 2)
            .await
            .unwrap();
        let err = engine
            .submit("boom".into(), plan())
            .await
            .unwrap()
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::GenerationFailed);
        let ok = engine.submit("next".into(), plan()).await.unwrap().await.unwrap();
        assert!(ok.is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn engine_errors_come_back_as_reply_bodies() {
        let (generator, _) = echo();
        let engine = EngineThread::start(move || Ok::<_, String>(generator), 1)
            .await
            .unwrap();
        let err = engine
            .submit("fail".into(), plan())
            .await
            .unwrap()
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::ContextOverflow);
    }

    #[tokio::test]
    async fn a_loader_error_is_reported_before_any_job() {
        let err = EngineThread::start(|| Err::<Echo, _>("no such model"), 1)
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("no such model"), "{err}");
    }
}
