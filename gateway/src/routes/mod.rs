//! The HTTP surface: which routes exist, which budget each draws on, and the layers around them.
//!
//! Layer order, outermost first: request metrics; body size limit; OpenAI's error shape on OpenAI's paths
//! (around everything that can refuse a request there, the body's deadline and the router's fallbacks
//! included); the body's deadline; then, per route group, caller identification (API key check) and, for
//! reads, the rate limit. Submissions are rate-limited in the handler, after validation, by the same Redis
//! call that records the job.

pub mod batches;
pub mod events;
pub mod files;
pub mod jobs;
pub mod openai;
pub mod ops;
pub mod playground;
pub mod queue;
pub mod run;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::app::AppState;
use crate::auth::{AuthError, Caller};
use crate::config::Cors;
use crate::error::{ApiError, BodyLimit};
use crate::ratelimit;

pub fn router(app: AppState) -> Router {
    let s = &app.settings;
    let read = app.read_limiter.clone();

    let submit_routes = Router::new()
        .route("/v1/jobs", post(jobs::submit))
        .route("/run", post(run::run))
        // The submit limit is checked in App::enqueue, in the call that writes the job record.
        .route_layer(middleware::from_fn_with_state(app.clone(), require_key));
    let read_routes = Router::new()
        .route("/v1/jobs/{id}", get(jobs::get_job).delete(jobs::cancel))
        .route("/v1/jobs/{id}/events", get(events::events))
        .route("/v1/queue", get(queue::queue))
        .route_layer(middleware::from_fn_with_state(read.clone(), ratelimit::limit))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_key));
    // The OpenAI routes: submissions limited in App::enqueue (one admission per choice), reads like reads.
    // A model's id may hold a `/` (`EleutherAI/gpt-j-6b`), hence the wildcard.
    let openai_routes = Router::new()
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_key))
        .merge(
            Router::new()
                .route("/v1/models", get(openai::models))
                .route("/v1/models/{*model}", get(openai::model))
                .route_layer(middleware::from_fn_with_state(read.clone(), ratelimit::limit))
                .route_layer(middleware::from_fn_with_state(app.clone(), require_key)),
        );
    // The Batch API: files and batches are reads' budget (a batch's jobs are admitted one by one, as its
    // owner's, when the driver submits them). An upload is streamed, under its own limit.
    let upload_limit = usize::try_from(app.settings.max_file_bytes)
        .unwrap_or(usize::MAX)
        .saturating_add(UPLOAD_FORM_OVERHEAD);
    let batch_routes = Router::new()
        .route(
            "/v1/files",
            post(files::upload)
                .layer(DefaultBodyLimit::max(upload_limit))
                .get(files::list),
        )
        .route("/v1/files/{id}", get(files::get).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route("/v1/batches", post(batches::create).get(batches::list))
        .route("/v1/batches/{id}", get(batches::get))
        .route("/v1/batches/{id}/cancel", post(batches::cancel))
        .route_layer(middleware::from_fn_with_state(read.clone(), ratelimit::limit))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_key));
    let metrics_route = Router::new()
        .route("/metrics", get(ops::metrics))
        .route_layer(middleware::from_fn_with_state(read, ratelimit::limit))
        .route_layer(middleware::from_fn_with_state(app.clone(), identify));
    let open = Router::new()
        .route("/", get(playground::page))
        .merge(health_routes())
        .route("/openapi.json", get(ops::openapi))
        .merge(ops::docs());

    let limit = s.body_limit_bytes;
    Router::new()
        .merge(submit_routes)
        .merge(read_routes)
        .merge(openai_routes)
        .merge(batch_routes)
        .merge(metrics_route)
        .merge(open)
        .fallback(|| async { ApiError::NoRoute })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(app.clone())
        .layer(middleware::from_fn_with_state(
            app.settings.body_read_timeout,
            body_deadline,
        ))
        .layer(middleware::from_fn(openai::openai_errors))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::Extension(BodyLimit(limit)))
        .layer(middleware::from_fn(crate::telemetry::track))
        .layer(cors(&app.settings.cors))
}

/// The router of a connection past a bound ([`crate::server`]): the health routes answer as usual, so a
/// gateway full of one client's connections still tells its orchestrator it is alive; every other request
/// is refused with the bound that was hit.
pub fn overflow_router(app: AppState) -> Router {
    health_routes()
        .fallback(over_bound)
        .with_state(app)
        .layer(middleware::from_fn(crate::telemetry::track))
}

/// Liveness and readiness, served on every connection, over a bound or not.
fn health_routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/health", get(ops::health))
}

async fn over_bound(request: Request) -> ApiError {
    let reason = request
        .extensions()
        .get::<crate::server::Overflow>()
        .copied()
        .unwrap_or(crate::server::Overflow::Gateway { limit: 0 });
    ApiError::TooManyConnections(reason)
}

/// CORS, outermost so a preflight is answered before keys and limits apply (it carries no key). The headers
/// a browser client needs: the key and the stream's resume point in, the poll location, rate limits and
/// retry advice out.
fn cors(cors: &Cors) -> tower::util::Either<CorsLayer, tower::layer::util::Identity> {
    use axum::http::{HeaderName, Method, header};
    let origins = match cors {
        Cors::Off => return tower::util::Either::Right(tower::layer::util::Identity::new()),
        Cors::AnyOrigin => AllowOrigin::any(),
        Cors::Origins(list) => AllowOrigin::list(list.iter().cloned()),
    };
    let layer = CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("last-event-id"),
        ])
        .expose_headers([
            header::LOCATION,
            header::RETRY_AFTER,
            HeaderName::from_static("ratelimit-limit"),
            HeaderName::from_static("ratelimit-remaining"),
            HeaderName::from_static("ratelimit-reset"),
            HeaderName::from_static("ratelimit-policy"),
        ])
        .max_age(std::time::Duration::from_secs(3600));
    tower::util::Either::Left(layer)
}

fn peer(request: &Request) -> IpAddr {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
}

/// Reads the whole request body under one deadline, counted from when its headers arrived. A timeout
/// per read (tower-http's) restarts with every chunk, so a client dripping a byte a second holds a request
/// open for as long as it likes; this one does not. The body is small (it is under the body limit) and
/// every route reads it whole anyway.
async fn body_deadline(
    State(deadline): State<std::time::Duration>,
    request: Request,
    next: Next,
) -> Response {
    if is_upload(&request) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let limit = parts.extensions.get::<BodyLimit>().map_or(usize::MAX, |l| l.0);
    let read = axum::body::to_bytes(body, limit);
    match tokio::time::timeout(deadline, read).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Ok(Err(e)) => {
            // `to_bytes` fails on a body over the limit, or on a connection that broke mid-body.
            let over = std::error::Error::source(&e)
                .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
            if over {
                ApiError::PayloadTooLarge { limit }.into_response()
            } else {
                ApiError::InvalidJson(format!("the request body could not be read: {e}")).into_response()
            }
        }
        Err(_) => ApiError::BodyTimeout.into_response(),
    }
}

/// Room for a form's headers and boundaries around an upload's file.
const UPLOAD_FORM_OVERHEAD: usize = 64 * 1024;

/// A file upload (`POST /v1/files`): its body is streamed into the file store under `--max-file-bytes`
/// rather than read whole under the body limit and deadline (a file of hundreds of megabytes takes longer
/// than a request body's deadline, and is not held in memory).
fn is_upload(request: &Request) -> bool {
    request.method() == axum::http::Method::POST && request.uri().path() == "/v1/files"
}

/// Identifies the caller, requiring a valid API key when keys are configured.
async fn require_key(State(app): State<AppState>, mut request: Request, next: Next) -> Response {
    let key = match app.settings.api_keys.check(request.headers()) {
        Ok(key) => key,
        Err(AuthError::Missing | AuthError::Invalid) => {
            // Failed attempts count against the address's read budget, so keys cannot be guessed at speed.
            let who = Caller::identify(
                None,
                peer(&request),
                request.headers(),
                &app.settings.trusted_proxies,
            );
            return match app.read_limiter.check(&who).await {
                Ok(decision) if !decision.admitted => ApiError::RateLimited(decision).into_response(),
                _ => ApiError::Unauthorized.into_response(),
            };
        }
    };
    let caller = Caller::identify(
        key,
        peer(&request),
        request.headers(),
        &app.settings.trusted_proxies,
    )
    .with_ceiling(app.settings.api_keys.ceiling(key));
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// Identifies the caller without requiring a key (for `/metrics`, which scrapers read).
async fn identify(State(app): State<AppState>, mut request: Request, next: Next) -> Response {
    let key = app.settings.api_keys.check(request.headers()).ok().flatten();
    let caller = Caller::identify(
        key,
        peer(&request),
        request.headers(),
        &app.settings.trusted_proxies,
    );
    request.extensions_mut().insert(caller);
    next.run(request).await
}
