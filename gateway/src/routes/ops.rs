//! Operational routes: health, readiness, metrics, the OpenAPI document and its browsable page.

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_swagger_ui::{Config, SwaggerUi};

use crate::app::AppState;
use crate::error::ErrorResponse;

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    pub redis: bool,
    pub rabbitmq: bool,
    /// The broker blocks this replica's publishing connection (a memory or disk alarm): submissions
    /// would wait for their confirm and time out.
    pub rabbitmq_blocked: bool,
}

/// Liveness, with start-up: 503 `starting` until the first broker connection (a replica that never got
/// one has not started; one that lost it later is alive, and `/readyz` says it cannot serve).
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses(
        (status = 200, description = "The process is up and has started", body = Health),
        (status = 503, description = "Still starting: no broker connection yet", body = Health)))]
pub async fn healthz(State(app): State<AppState>) -> Response {
    if app.broker.started() {
        axum::Json(Health { status: "ok" }).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(Health { status: "starting" }),
        )
            .into_response()
    }
}

#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Redis and RabbitMQ reachable, publishing not blocked", body = Readiness),
        (status = 503, description = "One of them is not, or the broker blocks publishing", body = Readiness)))]
pub async fn readyz(State(app): State<AppState>) -> Response {
    let redis = app.store.redis().ping().await.is_ok();
    let rabbitmq = app.broker.connected();
    let rabbitmq_blocked = app.broker.blocked();
    let ready = redis && rabbitmq && !rabbitmq_blocked;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(Readiness {
            ready,
            redis,
            rabbitmq,
            rabbitmq_blocked,
        }),
    )
        .into_response()
}

/// Readiness under the name vLLM and TGI use, which load testers and OpenAI-compatible tooling probe before
/// they start: the same answer as `/readyz`.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses(
        (status = 200, description = "Ready: as `/readyz`", body = Readiness),
        (status = 503, description = "Not ready: as `/readyz`", body = Readiness)))]
pub async fn health(state: State<AppState>) -> Response {
    readyz(state).await
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
        (status = 429, description = "Rate limited (Retry-After)", body = ErrorResponse)))]
pub async fn metrics(State(app): State<AppState>) -> Response {
    // The queue gauges are otherwise set only when someone reads /v1/queue; a scrape refreshes them.
    let (stats, figures) = tokio::join!(app.broker.queue_stats(), app.store.figures());
    if stats.is_err() {
        tracing::debug!("queue figures unavailable for /metrics");
    }
    if let Ok(f) = figures {
        metrics::gauge!(crate::telemetry::JOBS_RUNNING).set(f.running as f64);
    }
    let text = match &app.metrics {
        Some(handle) => handle.render(),
        None => "# the metrics recorder of this process is not this gateway's\n".to_owned(),
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

pub async fn openapi(State(app): State<AppState>) -> axum::Json<serde_json::Value> {
    axum::Json(app.openapi.clone())
}

/// The browsable API page at `/docs`: Swagger UI, its assets built into the binary (the `vendored`
/// build), so the page works without internet; it reads the document from `/openapi.json`.
pub fn docs() -> Router<AppState> {
    // Swagger UI would fetch a validity badge from validator.swagger.io; nothing may come from another host.
    let config = Config::from("/openapi.json").validator_url("none");
    Router::from(SwaggerUi::new("/docs").config(config))
}
