//! `GET /v1/queue`: how busy the service is.
//!
//! Depth and consumers come from the broker (a passive declare: constant time however many jobs have
//! passed), `running` from the job records. The broker's figures are the one cache (see
//! [`crate::broker::Broker::queue_stats`]: reused for `--queue-stats-cache-ms`, one round trip for a burst
//! of readers); the job records' are one pipelined Redis read.

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use crate::app::AppState;
use crate::error::{ApiError, ErrorResponse};
use crate::telemetry as m;

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct QueueView {
    /// Jobs waiting for a worker (the broker's ready count; jobs a worker holds are not in it).
    pub depth: u32,
    /// Jobs a worker has started and not finished (from the job records).
    pub running: u64,
    /// Workers consuming the jobs queue.
    pub consumers: u32,
    /// Seconds until the queue drains at the recent average inference time; absent before any job has
    /// finished.
    pub estimated_wait_s: Option<f64>,
}

#[utoipa::path(
    get, path = "/v1/queue", tag = "jobs",
    responses(
        (status = 200, description = "Queue figures", body = QueueView),
        (status = 401, description = "Keys are on and the request has none, or a wrong one", body = ErrorResponse),
        (status = 429, description = "Rate limited (Retry-After)", body = ErrorResponse),
        (status = 503, description = "Broker or Redis unavailable", body = ErrorResponse),
    ),
    security((), ("api_key" = []))
)]
pub async fn queue(State(app): State<AppState>) -> Result<axum::Json<QueueView>, ApiError> {
    let (stats, figures) = tokio::join!(app.broker.queue_stats(), app.store.figures());
    let stats = stats.map_err(|e| ApiError::unavailable("broker", e))?;
    let figures = figures.map_err(|e| ApiError::unavailable("redis", e))?;
    metrics::gauge!(m::JOBS_RUNNING).set(figures.running as f64);
    let estimated_wait_s = if stats.depth == 0 {
        Some(0.0)
    } else {
        figures
            .avg_inference_ms
            .map(|ms| f64::from(stats.depth) * ms / 1000.0 / f64::from(stats.consumers.max(1)))
    };
    let view = QueueView {
        depth: stats.depth,
        running: figures.running,
        consumers: stats.consumers,
        estimated_wait_s,
    };
    Ok(axum::Json(view))
}
