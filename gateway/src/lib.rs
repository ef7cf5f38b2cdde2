//! The gateway: the HTTP front of the GPT-J service.
//!
//! It validates jobs (the shared contract's rules), rate-limits clients through Redis, records jobs in
//! Redis, publishes them to RabbitMQ with confirms, consumes the workers' replies into the records, and
//! answers polls, `/run` waits and queue questions. Replicas share nothing but Redis and the broker.
//!
//! [`run`] is the whole service; `main.rs` only parses [`Config`] and calls it, and tests call it on port 0.

pub mod admission;
pub mod app;
pub mod auth;
pub mod batch_driver;
pub mod batch_lines;
pub mod batches;
pub mod broker;
pub mod config;
pub mod context;
pub mod contract_schema;
pub mod dead_letters;
pub mod deadline;
pub mod decision;
pub mod drain;
pub mod error;
pub mod files;
pub mod follow;
pub mod grammar_check;
pub mod keys;
pub mod kv;
pub mod logprobs;
pub mod openai;
pub mod openai_error;
pub mod openai_jobs;
pub mod openai_schema;
pub mod openapi;
pub mod outbox;
pub mod places;
pub mod position;
pub mod ratelimit;
pub mod replies;
pub mod routes;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tools;
pub mod waiters;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// The shared state of a gateway built from `config`: nothing connects until [`run`] starts the broker
/// supervisor and the pub/sub listener, so tests can drive the router alone (`tower::ServiceExt::oneshot`).
pub fn app(config: &Config) -> Result<app::AppState, Error> {
    let settings = config.validate().map_err(Error::Config)?;
    let metrics = telemetry::install();
    let redis = kv::Redis::new(&config.redis_url, config.redis_pool_size, settings.redis_timeout)
        .map_err(Error::Config)?;
    let keys = keys::Keys::new(&settings.topology);
    let store = store::JobStore::new(
        redis,
        keys.clone(),
        settings.result_ttl,
        settings.expired_retention,
    );
    let broker = broker::Broker::new(broker::BrokerSettings {
        urls: settings.broker_urls.clone(),
        topology: settings.topology.clone(),
        publish_channels: settings.publish_channels,
        publish_timeout: settings.publish_timeout,
        job_expiration: settings.job_expiration,
        stats_cache: settings.queue_stats_cache,
        replies_prefetch: settings.replies_prefetch,
    });
    let admissions = admission::Admissions::new(
        store.redis().clone(),
        keys.clone(),
        admission::Bounds {
            requests: settings.submit_limit,
            tokens: settings.token_limit,
            max_active: settings.max_active_jobs_per_client,
            active_lifetime: settings.result_ttl,
            idempotency_ttl: settings.idempotency_ttl,
        },
    );
    let read_limiter = ratelimit::Limiter::new(
        store.redis().clone(),
        keys.clone(),
        ratelimit::RouteClass::Read,
        settings.read_limit,
        settings.read_on_error,
    );
    let openapi = openapi::document(&settings.served_model_name);
    let objects = settings.storage.open().map_err(Error::Config)?;
    let files = files::FileStore::new(objects, store.redis().clone(), keys.clone());
    let batches = batches::BatchStore::new(store.redis().clone(), keys.clone());
    let outbox = outbox::Outbox::new(
        store.clone(),
        keys,
        settings.publish_retry_window,
        settings.publish_timeout,
    );
    let context = context::ContextCheck::new(config.tokenizer.as_deref(), settings.context_length)
        .map_err(Error::Config)?;
    let grammars = grammar_check::GrammarCheck::new(context.tokenizer());
    let vocabulary = logprobs::Vocabulary::new(context.tokenizer());
    Ok(Arc::new(app::App {
        settings,
        store,
        broker,
        waiters: Arc::new(waiters::Waiters::default()),
        admissions,
        drain: Arc::new(drain::DrainRate::default()),
        outbox,
        read_limiter,
        metrics,
        openapi,
        context,
        grammars,
        vocabulary,
        files,
        batches,
        started_at_s: shared::reply::now_ms() / 1000,
    }))
}

/// Serves on `listener` until `shutdown` resolves, then drains open requests and stops consuming.
///
/// Redis and RabbitMQ need not be up: the gateway starts, `/readyz` says what is missing, requests that
/// need them get 503, and the broker connection is retried with backoff.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let app = app(&config)?;
    let cancel = CancellationToken::new();
    let replies = app
        .settings
        .consume_replies
        .then(|| replies::ReplyConsumer::new(app.store.clone(), app.settings.topology.clone()));
    let supervisor = tokio::spawn(app.broker.clone().supervise(replies, cancel.clone()));
    // The drain rate only advises a full queue's clients: without the bound, nothing reads it.
    let drain_task = (app.settings.max_queued_jobs > 0).then(|| {
        let (drain, store, drain_cancel) = (app.drain.clone(), app.store.clone(), cancel.clone());
        tokio::spawn(async move { drain.run(store, drain_cancel).await })
    });
    let outbox = app.outbox.clone();
    let (outbox_broker, outbox_cancel) = (app.broker.clone(), cancel.clone());
    let outbox_task = tokio::spawn(async move { outbox.run(outbox_broker, outbox_cancel).await });
    let batch_task = tokio::spawn(batch_driver::run(app.clone(), cancel.clone()));
    let keys = keys::Keys::new(&app.settings.topology);
    let listener_task = tokio::spawn(app.waiters.clone().listen(
        config.redis_url.clone(),
        waiters::Channels {
            done: keys.done_channel(),
            events: keys.events_channel(),
        },
        cancel.clone(),
    ));
    let limits = server::Limits {
        header_read_timeout: app.settings.header_read_timeout,
        max_connections: app.settings.max_connections,
        max_connections_per_client: app.settings.max_connections_per_client,
        trusted_proxies: app.settings.trusted_proxies.clone(),
        grace: app.settings.shutdown_grace,
    };
    tracing::info!(addr = ?listener.local_addr().ok(), namespace = app.settings.topology.namespace(), "gateway listening");
    let overflow = routes::overflow_router(app.clone());
    server::serve(listener, routes::router(app), overflow, limits, shutdown).await;

    cancel.cancel();
    let _ = supervisor.await;
    let _ = listener_task.await;
    if let Some(task) = drain_task {
        let _ = task.await;
    }
    let _ = outbox_task.await;
    let _ = batch_task.await;
    tracing::info!("gateway stopped");
    Ok(())
}
