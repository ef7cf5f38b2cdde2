//! `worker serve`: the queue service. Consumes both lanes' queues (`{ns}.jobs`, `{ns}.jobs.batch`), runs
//! each job on the engine thread, and replies on the job's `reply_to` queue (docs/amqp.md is the contract).
//!
//! The guarantees, and where each is kept:
//! - a job is acknowledged only after its final reply is confirmed by the broker (`session`), so a worker
//!   that dies mid-job leaves the job to be redelivered;
//! - invalid or malformed messages are answered with `job.failed` and dead-lettered, and never end the
//!   loop (`intake`);
//! - generation runs on its own OS thread, which owns the continuous-batching scheduler: up to
//!   `--max-batch-size` jobs decode together, each joining and leaving between steps (`generator`,
//!   `crate::decoding::scheduler`), and the runtime keeps answering heartbeats; a job's tokenization and its
//!   final text run on the async side's blocking pool, not on that thread (`text`);
//! - places in the batch go to waiting interactive jobs before batch-lane ones, and the batch lane leaves
//!   `--interactive-reserve` places to interactive jobs (`places`);
//! - a job whose `deadline_ms` passed before it got a place is answered `job.failed`
//!   (`deadline_exceeded`) and acknowledged, never run (`session`);
//! - each job is handled on its own: `job.started` when it joins the batch, `job.token` replies as it
//!   generates (`stream`), its final reply and its acknowledgement when it finishes, whatever the others do
//!   (`session`);
//! - a cancel (read from the cancellations stream every worker reads) skips a job not yet run and takes a
//!   running one out of the batch at the next step; either way the job is answered `job.cancelled`
//!   (`cancels`);
//! - a lost connection is retried with backoff, and a job finished meanwhile is answered from memory when
//!   redelivered (`outcomes`);
//! - jobs and their acknowledgements travel on one connection, replies on another, and every reply's
//!   confirm is awaited for `--publish-timeout-ms` at most: a broker alarm blocks publishing connections,
//!   and it must not also hold the acknowledgements, nor hang the worker (`session`, `replies`);
//! - an engine step past `--engine-step-timeout-s`, or `--max-engine-failures` jobs in a row failed by the
//!   engine, stop the worker: it takes no more jobs, answers none of the unfinished ones (the broker gives
//!   them to another worker) and exits non-zero for its supervisor (`health`);
//! - SIGTERM/SIGINT stop the consumer, finish every job in the batch, reply, acknowledge, return the jobs
//!   not yet handed to the engine to the queue, exit 0;
//! - queues that exist with other arguments (another delivery limit) stop the worker with an error naming
//!   the setting, since reconnecting cannot fix them.

mod args;
mod cancels;
mod connections;
mod error;
mod fault;
mod generator;
mod health;
mod intake;
mod job;
mod load;
mod metrics;
mod outcomes;
mod places;
mod replies;
mod session;
mod settlement;
mod stream;
#[cfg(test)]
mod tests;
mod text;

use std::future::Future;

use futures::FutureExt;

pub use args::{ServeArgs, ServiceConfig};
pub use error::ServeError;
pub use fault::EngineFault;
pub use generator::{
    BatchSettings, Batcher, Detokenizer, EngineThread, EngineThreadError, Generator, JobEvent, NewTokens,
};
pub use health::{EngineHealth, Unhealthy, WatchSettings};
pub use job::{Completion, Input, Outcome, Prompt};
pub use stream::StreamSettings;

/// Loads the model on the engine thread and serves until `shutdown` resolves.
pub async fn run(
    args: ServeArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let config = args.service_config()?;
    let shutdown = shutdown.boxed().shared();
    if let Some(listen) = args.metrics_listen {
        metrics::install(listen).map_err(ServeError::Config)?;
        tracing::info!(%listen, "serving metrics");
    }
    let settings = args.batch_settings();
    let watch = args.watch_settings();
    let fault = args.inject_engine_fault;
    let options = load::engine_options(&args)?;
    tracing::info!(model = %args.engine.model_dir.display(), "loading the model");
    let load = move || {
        let engine = crate::engine::Engine::load(&options)?;
        // The first generation pays one-time costs (CUDA kernel loading, allocator growth: over a second
        // for float16 on a GPU); pay them before taking jobs, not in the first client's latency.
        let warm_up = shared::GenerationParameters {
            strategy: Some(shared::Strategy::Greedy),
            max_new_tokens: Some(2),
            ..Default::default()
        };
        if let Ok(plan) = warm_up.validate() {
            let started = std::time::Instant::now();
            match engine.generate("Hello", &plan) {
                Ok(_) => tracing::info!(ms = started.elapsed().as_millis() as u64, "engine warmed up"),
                Err(e) => tracing::warn!(error = %e, "warm-up generation failed"),
            }
        }
        // The fault wrapper exists only when a test asks for it; the normal path serves the engine itself.
        let generator: Box<dyn Generator> = match fault {
            Some(fault) => Box::new(fault::Faulty::new(engine, fault)),
            None => Box::new(engine),
        };
        Ok::<_, crate::engine::EngineError>(generator)
    };
    let engine = tokio::select! {
        engine = EngineThread::start_watched(load, settings, watch) => engine?,
        () = shutdown.clone() => return Ok(()),
    };
    serve(config, engine, shutdown).await
}

/// Serves jobs with an engine already running. Tests and embedders start the engine themselves.
pub async fn serve(
    config: ServiceConfig,
    engine: EngineThread,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let service = session::Service::new(config, engine);
    service.run(shutdown.boxed().shared()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// The `worker serve` command: a Tokio runtime, SIGTERM/SIGINT as the shutdown signal, and [`run`].
pub fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("serve-io")
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let shutdown = shutdown_signal()?;
        run(args, shutdown).await.map_err(anyhow::Error::from)
    })
}

/// Resolves on the first SIGTERM or SIGINT.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(
            signal = name,
            "shutdown requested: finishing the jobs in the batch"
        );
    })
}
