//! Prometheus metrics: the names in one place, the process-wide recorder, and the request middleware.
//!
//! The `metrics` facade has one global recorder per process, while tests run several gateways in one
//! process; so the recorder is installed once and every gateway in the process renders the same registry.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const HTTP_REQUESTS: &str = "gateway_http_requests_total";
pub const HTTP_DURATION: &str = "gateway_http_request_duration_seconds";
pub const RATE_LIMITED: &str = "gateway_rate_limited_total";
pub const RATE_LIMIT_ERRORS: &str = "gateway_rate_limit_errors_total";
pub const QUEUE_DEPTH: &str = "gateway_queue_depth";
/// Ready jobs of one lane, labelled `lane` (`interactive`, `batch`); `gateway_queue_depth` is their sum.
pub const LANE_DEPTH: &str = "gateway_lane_queue_depth";
pub const QUEUE_CONSUMERS: &str = "gateway_queue_consumers";
pub const JOBS_RUNNING: &str = "gateway_jobs_running";
/// Labelled `outcome`: `submitted`, `publish_failed`, `unconfirmed` (kept and republished),
/// `republished`, `started`, `succeeded`, `failed`, `cancelled`.
pub const JOBS: &str = "gateway_jobs_total";
pub const PUBLISH_DURATION: &str = "gateway_publish_confirm_seconds";
pub const REPLIES_DROPPED: &str = "gateway_replies_dropped_total";
/// Attempts to record a reply that Redis refused or never answered (each is retried).
pub const REPLY_RETRIES: &str = "gateway_reply_record_retries_total";
/// `job.started` replies that waited (Redis out of reach, or a replica that gave them back) and found their
/// job's record gone, and left it so ([`crate::replies`]): the job's end may have gone with Redis' data.
pub const REPLIES_STALE: &str = "gateway_replies_stale_total";
pub const BROKER_RECONNECTS: &str = "gateway_broker_connects_total";
/// 1 while the broker blocks this replica's publishing connection (a memory or disk alarm).
pub const BROKER_BLOCKED: &str = "gateway_broker_blocked";
/// 1 while this replica's Redis pub/sub subscription for job notices is up (and answers its pings): waits
/// then read their jobs only when notified; 0 while it is down and they poll.
pub const JOB_NOTICES_LIVE: &str = "gateway_job_notices_live";
/// Submissions refused by a bound on the backlog or on cost, labelled `bound`: `queue_full`,
/// `active_jobs`, `tokens`, `deadline`, `broker_blocked` (a resource alarm).
pub const BOUNDED: &str = "gateway_submissions_bounded_total";
/// Connections past a bound (`server`), labelled `bound`: `client` and `gateway` (served by the overflow
/// router), `closed` (past the overflow's share too).
pub const CONNECTIONS_OVER_BOUND: &str = "gateway_connections_over_bound_total";
/// Requests refused because their client holds its share of open streams and waits, labelled `kind`.
pub const FOLLOWS_REFUSED: &str = "gateway_follows_refused_total";

/// Batches that ended, labelled `status`: `completed`, `expired`, `cancelled`, `failed`.
pub const BATCHES: &str = "gateway_batches_total";
/// Requests of the batches that ended, labelled `outcome`: `answered` (the output file), `failed` (the
/// error file: failed, refused, or never run).
pub const BATCH_REQUESTS: &str = "gateway_batch_requests_total";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the recorder (once per process) and returns the handle that renders it, or `None` when some
/// other recorder was installed first (then `/metrics` says so).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0, 60.0, 120.0,
            ];
            let builder =
                PrometheusBuilder::new().set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets);
            match builder.and_then(|b| b.install_recorder()) {
                Ok(handle) => {
                    let upkeep = handle.clone();
                    // Histograms are drained into their buckets by upkeep; without it memory grows.
                    std::thread::Builder::new()
                        .name("metrics-upkeep".into())
                        .spawn(move || {
                            loop {
                                std::thread::sleep(std::time::Duration::from_secs(5));
                                upkeep.run_upkeep();
                            }
                        })
                        .ok();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed; /metrics will be empty");
                    None
                }
            }
        })
        .clone()
}

/// A request method as a metric label: the standard ones by name, any other as `other`, so made-up methods
/// cannot add series without bound.
fn method_label(method: &axum::http::Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "PATCH" => "PATCH",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "other",
    }
}

/// Middleware counting requests by route template and status, and timing them.
pub async fn track(request: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = method_label(request.method());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(HTTP_REQUESTS, "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!(HTTP_DURATION, "route" => route).record(start.elapsed().as_secs_f64());
    response
}

#[cfg(test)]
mod tests {
    #[test]
    fn made_up_methods_share_one_label() {
        let m = |s: &str| super::method_label(&axum::http::Method::from_bytes(s.as_bytes()).unwrap());
        assert_eq!((m("GET"), m("DELETE")), ("GET", "DELETE"));
        assert_eq!((m("BREW"), m("XYZZY")), ("other", "other"));
    }
}
