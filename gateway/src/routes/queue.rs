//! `GET /v1/queue`: how busy the service is.
//!
//! Depth and consumers come from the broker (a passive declare of each lane's queue: constant time however
//! many jobs have passed), `running` from the job records; `lanes` splits the depth and the wait by lane. The broker's figures are the one cache (see
//! [`crate::broker::Broker::queue_stats`]: reused for `--queue-stats-cache-ms`, one round trip for a burst
//! of readers); the job records' are one pipelined Redis read.

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use shared::Lane;

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
    /// The same figures for each lane.
    pub lanes: LaneViews,
}

/// Each lane's figures.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct LaneViews {
    pub interactive: LaneView,
    pub batch: LaneView,
}

/// One lane's queue.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct LaneView {
    /// Jobs of this lane waiting for a worker.
    pub depth: u32,
    /// Seconds until a new job of this lane would start, at the recent average inference time: a batch
    /// job waits behind both lanes, an interactive one behind its own. Absent before any job has finished.
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
    let wait = |ahead: u64| {
        if ahead == 0 {
            Some(0.0)
        } else {
            figures
                .avg_inference_ms
                .map(|ms| ahead as f64 * ms / 1000.0 / f64::from(stats.consumers.max(1)))
        }
    };
    let lane = |lane: Lane| LaneView {
        depth: stats.lane_depth(lane),
        estimated_wait_s: wait(stats.ahead_of(lane)),
    };
    let view = QueueView {
        depth: stats.depth,
        running: figures.running,
        consumers: stats.consumers,
        estimated_wait_s: wait(u64::from(stats.depth)),
        lanes: LaneViews {
            interactive: lane(Lane::Interactive),
            batch: lane(Lane::Batch),
        },
    };
    Ok(axum::Json(view))
}
