//! Generation runs on one dedicated OS thread that owns the engine and its running batch.
//!
//! A forward pass holds a CPU core (or waits on a GPU) for a while. Run on the async runtime, it would
//! starve lapin's I/O loop: the worker would stop answering broker heartbeats, the broker would close the
//! connection and hand the job to a second worker while the first one is still computing it. So the engine
//! lives on its own thread, jobs reach it over a channel, and each job's news (joined the batch, finished)
//! comes back over oneshots; the runtime only ever awaits.
//!
//! The thread loop is continuous batching's outer loop: take every job that arrived (and every cancel),
//! advance the batch one step, hand out what the step reported, repeat; sleep only when nothing is running
//! or waiting. Tokens leave as the step makes them, over each job's own channel, so the thread never waits
//! on a client: turning them into text and coalescing them into `job.token` replies happens on the async
//! side (`stream`), and so do a job's tokenization before it is handed over and its final text after its
//! outcome comes back (`text`), with the generator's text side ([`Generator::codec`]). The engine is behind
//! the small [`Generator`] / [`Batcher`] seam so the queue logic can be tested with a stand-in, and the
//! engine is built *on* its thread, so it never has to be `Send`.
//!
//! The thread reports to an [`EngineHealth`] (`health`): each call into the batch is timed by a watchdog
//! that lives on the runtime, and each job's outcome is judged before it is handed out, so a hung engine or
//! a broken device stops the worker instead of hanging it or failing the whole queue.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures::FutureExt;
use futures::future::BoxFuture;
use shared::{ErrorBody, ErrorCode, GenerationPlan, Lane, TokenLogprob};
use tokio::sync::{mpsc, oneshot};

use super::health::{self, EngineHealth, Verdict, WatchSettings};
use super::job::{Completion, Input, Outcome, Prompt};
use super::{metrics, text};
use crate::decoding::{JoinPolicy, Limits, Stats, StepProfile, TextDecoder};
use crate::engine::PromptCodec;
use crate::sizing::BatchLimits;

/// Turns token ids into text off the engine thread (the tokenizer is `Send + Sync`).
pub type Detokenizer = Arc<dyn TextDecoder + Send + Sync>;

/// Tokens a step generated for one job, as they leave the engine thread for the job's stream: their ids,
/// and their log-probabilities (one per id, in order) when the job asked for them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewTokens {
    pub ids: Vec<u32>,
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// What a batch step reports about a job (keys are the engine thread's).
#[derive(Debug)]
pub enum JobEvent {
    Joined {
        key: u64,
        batch_size: usize,
    },
    /// Tokens the step generated (greedy, sampling and contrastive search: each step's; beam search: none).
    Tokens {
        key: u64,
        tokens: NewTokens,
    },
    Done {
        key: u64,
        result: Result<Completion, ErrorBody>,
    },
}

/// The scheduler's settings, from the command line; a bound left `None` is what the generator's devices
/// afford ([`Generator::bounds`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchSettings {
    pub max_batch_size: Option<usize>,
    pub max_batch_tokens: Option<usize>,
    pub join: JoinPolicy,
    /// `--pause-batch-lane`: `None` pauses batch-lane sequences while interactive ones run unless layers
    /// run on a GPU ([`JoinPolicy::pause_batch`]).
    pub pause_batch: Option<bool>,
}

impl BatchSettings {
    /// The scheduler's limits: these settings within the generator's `bounds`.
    pub fn limits(&self, bounds: BatchLimits) -> Limits {
        Limits {
            max_batch_size: bounds.max_batch_size.max(1),
            max_batch_tokens: bounds.max_batch_tokens,
            join: JoinPolicy {
                max_prefill_tokens: self.join.max_prefill_tokens.max(1),
                pause_batch: self.pause_batch.unwrap_or(!bounds.on_gpu),
                ..self.join
            },
        }
    }
}

/// A running batch: jobs are submitted, and each step advances all of them. Errors are already in the
/// shape a `job.failed` reply carries.
pub trait Batcher {
    /// Takes a job (its prompt prepared, its plan validated), or refuses it at once.
    fn submit(&mut self, key: u64, prompt: Prompt, plan: &GenerationPlan) -> Result<(), ErrorBody>;
    /// Admits what may join and advances every running job by one step.
    fn step(&mut self) -> Vec<JobEvent>;
    /// Whether any job is running or waiting.
    fn has_work(&self) -> bool;
    /// Removes a job, waiting or running, so it takes no further step; `false` when it is not here.
    fn cancel(&mut self, key: u64) -> bool;
    /// Gauges for metrics.
    fn stats(&self) -> Stats {
        Stats::default()
    }
    /// Where the last step's time went, for metrics; `None` where the batch does not say (a stand-in).
    fn profile(&self) -> Option<StepProfile> {
        None
    }
}

/// Anything that can run a batch: the engine, or a test's stand-in.
pub trait Generator {
    /// The batch's bounds: those given, and for those not given what the generator's devices afford (the
    /// engine's policy is `crate::sizing`). Asked once, when the generator is ready: the batch size is
    /// then also the service's number of places. A stand-in holds the CPU's batch and no token budget.
    fn bounds(&self, max_batch_size: Option<usize>, max_batch_tokens: Option<usize>) -> BatchLimits {
        BatchLimits {
            max_batch_size: max_batch_size.unwrap_or(crate::sizing::CPU_BATCH_SIZE).max(1),
            max_batch_tokens: max_batch_tokens.unwrap_or(usize::MAX),
            on_gpu: false,
        }
    }
    fn batcher(&self, limits: &Limits) -> Box<dyn Batcher + '_>;
    /// The text side the async side uses: prompts to ids before a job is handed over, ids to text as it
    /// streams and when it ends, and the stop sequence chat jobs get (see [`EngineThread::plan`]). `None`
    /// (a test's stand-in): prompts go as text, tokens stream without text, and the batch's text stands.
    fn codec(&self) -> Option<Arc<PromptCodec>> {
        None
    }
}

/// A generator chosen at start-up: the engine, or the engine with an injected fault (`fault`).
impl<G: Generator + ?Sized> Generator for Box<G> {
    fn bounds(&self, max_batch_size: Option<usize>, max_batch_tokens: Option<usize>) -> BatchLimits {
        (**self).bounds(max_batch_size, max_batch_tokens)
    }

    fn batcher(&self, limits: &Limits) -> Box<dyn Batcher + '_> {
        (**self).batcher(limits)
    }

    fn codec(&self) -> Option<Arc<PromptCodec>> {
        (**self).codec()
    }
}

struct Request {
    key: u64,
    prompt: Prompt,
    plan: GenerationPlan,
    joined: oneshot::Sender<usize>,
    tokens: mpsc::UnboundedSender<NewTokens>,
    reply: oneshot::Sender<Outcome>,
}

/// What the engine thread is told (a job boxed: it carries its prompt, a cancel only a key).
enum Command {
    Submit(Box<Request>),
    Cancel(u64),
}

/// Where a submitted job's news arrives.
pub struct Submitted {
    /// The engine's name for the job, for [`EngineThread::cancel`].
    pub key: u64,
    /// The batch size when the job joined; dropped unsent when the job never joins (refused, failed).
    pub joined: oneshot::Receiver<usize>,
    /// The job's tokens as the steps make them; closed when the job leaves the batch.
    pub tokens: mpsc::UnboundedReceiver<NewTokens>,
    /// Tokens of the prompt the engine runs, when it was tokenized (a stand-in without a text side does not).
    pub prompt_tokens: Option<usize>,
    /// The job's outcome, its final text written; `None` when the engine thread ended it without one (it
    /// was given up on, or is gone).
    pub outcome: BoxFuture<'static, Option<Outcome>>,
}

/// The engine thread stopped (its loader failed, or it is gone): the worker cannot serve. Not the engine's
/// own [`EngineError`](crate::engine::EngineError), which fails one generation.
#[derive(Debug, thiserror::Error)]
pub enum EngineThreadError {
    #[error("the model failed to load: {0}")]
    Load(String),
    #[error("the engine thread is gone")]
    Gone,
}

/// Handle to the engine thread. Cloning it shares the thread; the thread ends when every handle is dropped
/// and the batch is empty.
#[derive(Clone)]
pub struct EngineThread {
    tx: mpsc::UnboundedSender<Command>,
    next_key: Arc<AtomicU64>,
    codec: Option<Arc<PromptCodec>>,
    max_batch_size: usize,
    health: Arc<EngineHealth>,
}

/// What the engine thread reports once its generator is ready.
struct Ready {
    codec: Option<Arc<PromptCodec>>,
    max_batch_size: usize,
}

struct InFlight {
    joined: Option<oneshot::Sender<usize>>,
    tokens: mpsc::UnboundedSender<NewTokens>,
    /// Tokens reported so far (for the tokens counter, which counts them as they come).
    reported: usize,
    reply: oneshot::Sender<Outcome>,
}

/// The failure a cancelled job ends with; the service answers it with `job.cancelled`.
pub fn cancelled() -> ErrorBody {
    ErrorBody::new(ErrorCode::Cancelled, "the job was cancelled")
}

impl EngineThread {
    /// Starts the thread, builds the generator there with `load`, and returns once it is ready to take
    /// jobs; watched with the default bounds. Jobs in flight are bounded by the caller (the service holds
    /// one permit per batch place).
    pub async fn start<G, E, F>(load: F, settings: BatchSettings) -> Result<Self, EngineThreadError>
    where
        G: Generator,
        E: std::fmt::Display,
        F: FnOnce() -> Result<G, E> + Send + 'static,
    {
        Self::start_watched(load, settings, WatchSettings::default()).await
    }

    /// [`EngineThread::start`], watched with these bounds (the watchdog starts once the model is loaded:
    /// loading has no step to time).
    pub async fn start_watched<G, E, F>(
        load: F,
        settings: BatchSettings,
        watch: WatchSettings,
    ) -> Result<Self, EngineThreadError>
    where
        G: Generator,
        E: std::fmt::Display,
        F: FnOnce() -> Result<G, E> + Send + 'static,
    {
        let health = Arc::new(EngineHealth::new(watch));
        let thread_health = health.clone();
        let (tx, rx) = mpsc::unbounded_channel::<Command>();
        let (ready_tx, ready_rx) = oneshot::channel::<Result<Ready, String>>();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                let generator = match load() {
                    Ok(g) => g,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                // Resolved once: a batch made again after a panic keeps the bounds the service was sized
                // for, whatever the memory says by then.
                let bounds = generator.bounds(settings.max_batch_size, settings.max_batch_tokens);
                let limits = settings.limits(bounds);
                tracing::info!(
                    max_batch_size = limits.max_batch_size,
                    max_batch_tokens = limits.max_batch_tokens,
                    max_waiting_steps = limits.join.max_waiting_steps,
                    waiting_served_ratio = limits.join.waiting_served_ratio,
                    "continuous batching"
                );
                let _ = ready_tx.send(Ok(Ready {
                    codec: generator.codec(),
                    max_batch_size: limits.max_batch_size,
                }));
                run_loop(&generator, &limits, &thread_health, rx);
            })
            .map_err(|e| EngineThreadError::Load(format!("cannot spawn the engine thread: {e}")))?;
        match ready_rx.await {
            Ok(Ok(ready)) => {
                health::spawn_watchdog(&health);
                Ok(Self {
                    tx,
                    next_key: Arc::new(AtomicU64::new(0)),
                    codec: ready.codec,
                    max_batch_size: ready.max_batch_size,
                    health,
                })
            }
            Ok(Err(e)) => Err(EngineThreadError::Load(e)),
            Err(_) => Err(EngineThreadError::Load("the loader panicked".into())),
        }
    }

    /// The plan a job runs under: a chat job gets the engine's chat stop too, so the stream holds back
    /// what the engine will stop on; unless it ignores EOS, since that stop stands in for the end-of-turn
    /// token a template without one lacks, and a job that ignores EOS (a benchmark's) wants every token
    /// it asked for.
    pub fn plan(&self, input: &Input, plan: &GenerationPlan) -> GenerationPlan {
        let mut plan = plan.clone();
        let chat_stop = self.codec.as_ref().and_then(|c| c.chat_stop());
        if let (Input::Chat(_), Some(stop)) = (input, chat_stop)
            && !plan.ignore_eos
            && !plan.stop.iter().any(|s| s == stop)
        {
            plan.stop.push(stop.to_owned());
        }
        plan
    }

    /// Prepares a job's prompt (off the engine thread, see `text`), hands the job to the engine and returns
    /// where its news will arrive. A prompt that cannot run (too long, a conversation the template refuses)
    /// is answered at once through the outcome, as the engine would answer it. The job runs even if the
    /// receivers are dropped (its outcome is remembered for a redelivery; see `outcomes`).
    pub async fn submit(
        &self,
        input: Input,
        plan: GenerationPlan,
        lane: Lane,
    ) -> Result<Submitted, EngineThreadError> {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let (joined, joined_rx) = oneshot::channel();
        let (tokens, tokens_rx) = mpsc::unbounded_channel();
        let (reply, outcome) = oneshot::channel();
        let mut prompt_tokens = None;
        let rendered = match text::prepare(self.codec.clone(), input, &plan).await {
            Ok(prepared) => {
                let stops = plan.stop.clone();
                prompt_tokens = Some(prepared.prompt.ids.len()).filter(|&n| n > 0);
                self.tx
                    .send(Command::Submit(Box::new(Request {
                        key,
                        prompt: Prompt {
                            lane,
                            ..prepared.prompt
                        },
                        plan,
                        joined,
                        tokens,
                        reply,
                    })))
                    .map_err(|_| EngineThreadError::Gone)?;
                Some((prepared.rendered, stops))
            }
            Err(refused) => {
                // Judged as what the engine refuses is: the input's errors are answered and leave the count
                // of engine failures alone.
                deliver(&self.health, reply, Err(refused));
                None
            }
        };
        let codec = self.codec.clone();
        let outcome = async move {
            let outcome = outcome.await.ok()?;
            Some(match rendered {
                Some((rendered, stops)) => text::finish(codec, outcome, stops, rendered).await,
                None => outcome,
            })
        };
        Ok(Submitted {
            key,
            joined: joined_rx,
            tokens: tokens_rx,
            prompt_tokens,
            outcome: outcome.boxed(),
        })
    }

    /// Takes the job out of the batch before its next step; it ends with [`cancelled`]. A job that has
    /// already finished is not affected.
    pub fn cancel(&self, key: u64) {
        let _ = self.tx.send(Command::Cancel(key));
    }

    /// Sequences the running batch holds at most: given, or what the devices afford.
    pub fn max_batch_size(&self) -> usize {
        self.max_batch_size
    }

    /// The generator's detokenizer, for streaming text.
    pub fn detokenizer(&self) -> Option<Detokenizer> {
        self.codec.clone().map(|c| c as Detokenizer)
    }

    /// The engine's health, as its thread and its watchdog report it.
    pub fn health(&self) -> &Arc<EngineHealth> {
        &self.health
    }
}

/// Hands a job's outcome out, unless the health withholds it (then the sender is dropped, and the session
/// sees the job end without an outcome). Nobody waiting any more (answered from memory, or the connection is
/// gone) is fine: the result is discarded.
fn deliver(health: &EngineHealth, reply: oneshot::Sender<Outcome>, outcome: Outcome) {
    if health.judge(&outcome) == Verdict::Answer {
        let _ = reply.send(outcome);
    }
}

/// The engine thread: take new jobs, step, report; block only when idle.
fn run_loop(
    generator: &dyn Generator,
    limits: &Limits,
    health: &EngineHealth,
    mut rx: mpsc::UnboundedReceiver<Command>,
) {
    let mut batcher = generator.batcher(limits);
    let mut in_flight: HashMap<u64, InFlight> = HashMap::new();
    let obey = |batcher: &mut Box<dyn Batcher + '_>, in_flight: &mut HashMap<u64, InFlight>, command| {
        match command {
            Command::Submit(req) => {
                let Request {
                    key,
                    prompt,
                    plan,
                    joined,
                    tokens,
                    reply,
                } = *req;
                let submitted = health.busy(|| {
                    std::panic::catch_unwind(AssertUnwindSafe(|| batcher.submit(key, prompt, &plan)))
                        .unwrap_or_else(|panic| Err(panicked(&*panic)))
                });
                match submitted {
                    Ok(()) => {
                        in_flight.insert(
                            key,
                            InFlight {
                                joined: Some(joined),
                                tokens,
                                reported: 0,
                                reply,
                            },
                        );
                    }
                    Err(e) => deliver(health, reply, Err(e)),
                }
            }
            Command::Cancel(key) => {
                if in_flight.contains_key(&key)
                    && batcher.cancel(key)
                    && let Some(job) = in_flight.remove(&key)
                {
                    metrics::job_cancelled();
                    deliver(health, job.reply, Err(cancelled()));
                }
            }
        }
    };
    loop {
        if health.unhealthy().is_some() {
            // Nothing more leaves this thread: dropping the jobs' senders ends them without an outcome, and
            // the session leaves them to the broker, which gives them to another worker.
            in_flight.clear();
            match rx.blocking_recv() {
                Some(command) => drop(command),
                None => break,
            }
            continue;
        }
        if !batcher.has_work() {
            match rx.blocking_recv() {
                Some(command) => obey(&mut batcher, &mut in_flight, command),
                None => break,
            }
        }
        while let Ok(command) = rx.try_recv() {
            obey(&mut batcher, &mut in_flight, command);
        }
        if !batcher.has_work() {
            continue;
        }
        let started = Instant::now();
        let stepped = health.busy(|| std::panic::catch_unwind(AssertUnwindSafe(|| batcher.step())));
        let events = match stepped {
            Ok(events) => events,
            Err(panic) => {
                // The batch's state is unknown after a panic outside any one sequence: every job in it
                // fails, and a fresh batch takes the next ones.
                let error = panicked(&*panic);
                for (_, job) in in_flight.drain() {
                    deliver(health, job.reply, Err(error.clone()));
                }
                batcher = generator.batcher(limits);
                continue;
            }
        };
        let step = started.elapsed();
        for event in events {
            match event {
                JobEvent::Joined { key, batch_size } => {
                    if let Some(sender) = in_flight.get_mut(&key).and_then(|j| j.joined.take()) {
                        let _ = sender.send(batch_size);
                    }
                }
                JobEvent::Tokens { key, tokens } => {
                    if let Some(job) = in_flight.get_mut(&key) {
                        metrics::tokens(tokens.ids.len());
                        job.reported += tokens.ids.len();
                        // Nobody listening (answered from memory, or the connection is gone) is fine.
                        let _ = job.tokens.send(tokens);
                    }
                }
                JobEvent::Done { key, result } => {
                    let Some(job) = in_flight.remove(&key) else {
                        continue;
                    };
                    if let Ok(c) = &result {
                        // Beam search reports its tokens only here.
                        metrics::tokens(c.generation.token_ids.len().saturating_sub(job.reported));
                        metrics::job_finished(c);
                    }
                    deliver(health, job.reply, result);
                }
            }
        }
        metrics::step(&batcher.stats(), step, batcher.profile());
    }
}

/// A panic's message as a job failure (libtorch raises through `tch` as panics).
fn panicked(panic: &(dyn std::any::Any + Send)) -> ErrorBody {
    let what = crate::decoding::panic_message(panic);
    tracing::error!(panic = what, "generation panicked");
    ErrorBody::new(ErrorCode::GenerationFailed, "generation failed inside the engine")
}

/// Stand-ins for tests: a generator of one job at a time behind the [`Batcher`] seam.
#[cfg(test)]
pub(crate) mod solo {
    use super::*;
    use shared::FinishReason;

    /// Generates one job at a time.
    pub(crate) trait Solo {
        fn generate(&self, prompt: &str, plan: &GenerationPlan) -> Result<Completion, ErrorBody>;
    }

    /// One job at a time: a step lets the next job join, the step after generates it.
    pub(crate) struct SoloBatch<'a, S: Solo> {
        solo: &'a S,
        queue: std::collections::VecDeque<(u64, String, GenerationPlan)>,
        current: Option<(u64, String, GenerationPlan)>,
    }

    impl<S: Solo> Batcher for SoloBatch<'_, S> {
        fn submit(&mut self, key: u64, prompt: Prompt, plan: &GenerationPlan) -> Result<(), ErrorBody> {
            self.queue.push_back((key, prompt.text, plan.clone()));
            Ok(())
        }

        fn step(&mut self) -> Vec<JobEvent> {
            if let Some((key, prompt, plan)) = self.current.take() {
                let result = self.solo.generate(&prompt, &plan);
                return vec![JobEvent::Done { key, result }];
            }
            match self.queue.pop_front() {
                Some(job) => {
                    let key = job.0;
                    self.current = Some(job);
                    vec![JobEvent::Joined { key, batch_size: 1 }]
                }
                None => vec![],
            }
        }

        fn has_work(&self) -> bool {
            self.current.is_some() || !self.queue.is_empty()
        }

        fn cancel(&mut self, key: u64) -> bool {
            if self.current.as_ref().is_some_and(|c| c.0 == key) {
                self.current = None;
                return true;
            }
            let before = self.queue.len();
            self.queue.retain(|j| j.0 != key);
            self.queue.len() < before
        }
    }

    /// Wraps a [`Solo`] as a [`Generator`].
    pub(crate) struct One<S>(pub S);

    impl<S: Solo> Generator for One<S> {
        fn batcher(&self, _: &Limits) -> Box<dyn Batcher + '_> {
            Box::new(SoloBatch {
                solo: &self.0,
                queue: Default::default(),
                current: None,
            })
        }
    }

    pub(crate) fn completion(text: String, tokens: usize) -> Completion {
        Completion {
            prompt: None,
            generation: crate::engine::Generation {
                text,
                token_ids: vec![7; tokens],
                finish_reason: FinishReason::Length,
                prompt_tokens: 1,
                prefill_ms: 0,
                decode_ms: 0,
                logprobs: None,
                prompt_logprobs: None,
            },
            time_to_first_token_ms: 0,
            batch_size: 1,
            inference_ms: 0,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::solo::{One, Solo, completion};
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Echoes the prompt, counting calls; panics on the prompt "boom".
    pub(crate) struct Echo {
        pub calls: Arc<AtomicUsize>,
        pub thread: Arc<std::sync::Mutex<Option<std::thread::ThreadId>>>,
    }

    impl Solo for Echo {
        fn generate(&self, prompt: &str, plan: &GenerationPlan) -> Result<Completion, ErrorBody> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            *self.thread.lock().unwrap() = Some(std::thread::current().id());
            if prompt == "boom" {
                panic!("kaboom");
            }
            if prompt == "fail" {
                return Err(ErrorBody::new(ErrorCode::ContextOverflow, "too long"));
            }
            Ok(completion(format!(" {prompt}"), plan.max_new_tokens))
        }
    }

    pub(crate) fn echo() -> (One<Echo>, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        (
            One(Echo {
                calls: calls.clone(),
                thread: Default::default(),
            }),
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

    async fn run(engine: &EngineThread, prompt: &str) -> Outcome {
        engine
            .submit(Input::Text(prompt.into()), plan(), Lane::Interactive)
            .await
            .unwrap()
            .outcome
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn generation_runs_off_the_async_runtime_on_one_engine_thread() {
        let (generator, _) = echo();
        let seen = generator.0.thread.clone();
        let engine = EngineThread::start(move || Ok::<_, String>(generator), BatchSettings::default())
            .await
            .unwrap();
        let out = run(&engine, "hi").await.unwrap();
        assert_eq!(out.generation.text, " hi");
        assert_eq!(out.generation.token_ids.len(), 3);
        let engine_thread = seen.lock().unwrap().unwrap();
        assert_ne!(engine_thread, std::thread::current().id());
    }

    #[tokio::test]
    async fn a_panicking_job_fails_alone_and_the_engine_keeps_serving() {
        let (generator, calls) = echo();
        let engine = EngineThread::start(move || Ok::<_, String>(generator), BatchSettings::default())
            .await
            .unwrap();
        let err = run(&engine, "boom").await.unwrap_err();
        assert_eq!(err.code, ErrorCode::GenerationFailed);
        assert!(run(&engine, "next").await.is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn engine_errors_come_back_as_reply_bodies() {
        let (generator, _) = echo();
        let engine = EngineThread::start(move || Ok::<_, String>(generator), BatchSettings::default())
            .await
            .unwrap();
        let err = run(&engine, "fail").await.unwrap_err();
        assert_eq!(err.code, ErrorCode::ContextOverflow);
    }

    /// An echo engine whose watchdog gives up after two engine failures in a row (no step bound).
    async fn giving_up_after_two_failures() -> (EngineThread, Arc<AtomicUsize>) {
        let (generator, calls) = echo();
        let watch = WatchSettings {
            step_timeout: None,
            max_failures: std::num::NonZeroU32::new(2),
        };
        let engine = EngineThread::start_watched(
            move || Ok::<_, String>(generator),
            BatchSettings::default(),
            watch,
        )
        .await
        .unwrap();
        (engine, calls)
    }

    #[tokio::test]
    async fn the_nth_engine_failure_in_a_row_and_every_later_job_end_without_an_outcome() {
        let (engine, calls) = giving_up_after_two_failures().await;
        let submit = async |prompt: &str| {
            let submitted = engine
                .submit(Input::Text(prompt.into()), plan(), Lane::Interactive)
                .await
                .unwrap();
            submitted.outcome.await
        };
        // The first engine failure is answered; a prompt too long neither counts nor resets the count.
        let first = submit("boom").await.unwrap().unwrap_err();
        assert_eq!(first.code, ErrorCode::GenerationFailed);
        assert_eq!(
            submit("fail").await.unwrap().unwrap_err().code,
            ErrorCode::ContextOverflow
        );
        assert!(engine.health().unhealthy().is_none());
        // The second in a row is withheld: its sender is dropped, the session sees no outcome.
        assert!(submit("boom").await.is_none(), "withheld");
        assert!(matches!(
            engine.health().unhealthy(),
            Some(crate::service::Unhealthy::Failures { count: 2, .. })
        ));
        // From then on nothing leaves the engine thread, and nothing more is generated.
        assert!(submit("fine").await.is_none(), "withheld");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_success_between_engine_failures_resets_their_count() {
        let (engine, _) = giving_up_after_two_failures().await;
        for prompt in ["boom", "fine", "boom", "fine", "boom"] {
            assert!(
                run(&engine, prompt).await.is_ok() == (prompt == "fine"),
                "{prompt}"
            );
        }
        assert!(engine.health().unhealthy().is_none());
    }

    /// The echo stand-in with the engine's text side (a context of 8 positions).
    struct Tokenizing(One<Echo>, Arc<PromptCodec>);

    impl Generator for Tokenizing {
        fn batcher(&self, limits: &Limits) -> Box<dyn Batcher + '_> {
            self.0.batcher(limits)
        }

        fn codec(&self) -> Option<Arc<PromptCodec>> {
            Some(self.1.clone())
        }
    }

    #[tokio::test]
    async fn prompts_are_tokenized_and_texts_decoded_off_the_engine_thread_and_a_prompt_too_long_never_reaches_it()
     {
        let (generator, calls) = echo();
        let info = crate::lm::ModelInfo {
            vocab_size: 50400,
            n_positions: 8,
            n_embd: 8,
            n_layer: 1,
            bos_token_id: Some(50256),
            eos_token_id: Some(50256),
        };
        let tokenizer = crate::tokenizer::bundled().unwrap();
        let chat = shared::chat::ChatTemplate::default_template(None);
        let codec = Arc::new(PromptCodec::new(tokenizer, chat, &info));
        let engine = EngineThread::start(
            move || Ok::<_, String>(Tokenizing(generator, codec)),
            BatchSettings::default(),
        )
        .await
        .unwrap();
        // The batch reports ids (the echo's: three 7s); the text the job gets is theirs, decoded here.
        let out = run(&engine, "Hello world").await.unwrap();
        assert_eq!(out.generation.text, "(((");
        // Six tokens and three new ones do not fit eight positions: refused before the engine thread.
        let err = run(&engine, "one two three four five six").await.unwrap_err();
        assert_eq!(err.code, ErrorCode::ContextOverflow);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_chat_job_stops_at_the_default_templates_turn_unless_it_ignores_eos() {
        let (generator, _) = echo();
        let codec = Arc::new(PromptCodec::for_tests(64));
        let engine = EngineThread::start(
            move || Ok::<_, String>(Tokenizing(generator, codec)),
            BatchSettings::default(),
        )
        .await
        .unwrap();
        let chat = Input::Chat(vec![shared::chat::ChatMessage::new(
            shared::chat::Role::User,
            "hi",
        )]);
        let stops = |ignore_eos| {
            let plan = shared::GenerationParameters {
                ignore_eos: Some(ignore_eos),
                stop: vec!["END".into()],
                ..Default::default()
            }
            .validate()
            .unwrap();
            engine.plan(&chat, &plan).stop
        };
        assert_eq!(stops(false), ["END", shared::chat::DEFAULT_CHAT_STOP]);
        assert_eq!(
            stops(true),
            ["END"],
            "the template's stand-in for an end-of-turn token goes with EOS; the client's stops stay"
        );
        assert_eq!(
            engine.plan(&Input::Text("hi".into()), &plan()).stop,
            Vec::<String>::new()
        );
    }

    #[tokio::test]
    async fn a_loader_error_is_reported_before_any_job() {
        let err = EngineThread::start(|| Err::<One<Echo>, _>("no such model"), BatchSettings::default())
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("no such model"), "{err}");
    }
}
