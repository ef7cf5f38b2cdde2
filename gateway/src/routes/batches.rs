//! `/v1/batches`: OpenAI's Batch API. Creating a batch records it `validating`; a driver
//! ([`crate::batch_driver`]) validates its file, submits its requests on the batch lane in slices, and
//! writes its output and error files. A batch is seen only by the key that made it.

use axum::Extension;
use axum::extract::{Path, State};
use serde::Deserialize;

use crate::app::AppState;
use crate::auth::Caller;
use crate::batches::{Batch, BatchState, BatchStatus, COMPLETION_WINDOW, CreateBatch};
use crate::error::{ApiError, ApiJson, ApiQuery};
use crate::files::{List, PURPOSE_BATCH, owner};
use crate::openai::OpenAiError;
use crate::routes::files::page_limit;

/// Most metadata pairs a batch keeps (OpenAI's bound).
const MAX_METADATA: usize = 16;

#[utoipa::path(
    post, path = "/v1/batches", tag = "batch",
    request_body = CreateBatch,
    responses(
        (status = 200, description = "The batch, `validating`", body = Batch),
        (status = 400, description = "A bad body: a window other than `24h`, an input file not of purpose `batch`, too much metadata", body = OpenAiError),
        (status = 401, description = "Missing or invalid API key", body = OpenAiError),
        (status = 404, description = "No such input file (or another key's)", body = OpenAiError),
        (status = 413, description = "Body over the limit", body = OpenAiError),
        (status = 429, description = "Rate limited (Retry-After)", body = OpenAiError),
        (status = 503, description = "Redis or the file store unavailable", body = OpenAiError),
    ),
    security((), ("api_key" = []))
)]
pub async fn create(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(request): ApiJson<CreateBatch>,
) -> Result<axum::Json<Batch>, ApiError> {
    if request.completion_window != COMPLETION_WINDOW {
        return Err(ApiError::InvalidField {
            field: "completion_window".into(),
            message: format!("must be `{COMPLETION_WINDOW}`, the only window offered"),
        });
    }
    if let Some(metadata) = &request.metadata
        && (metadata.len() > MAX_METADATA || metadata.values().any(|v| !v.is_string()))
    {
        return Err(ApiError::InvalidField {
            field: "metadata".into(),
            message: format!("at most {MAX_METADATA} pairs, each value a string"),
        });
    }
    let owner = owner(&caller);
    let file = app
        .files
        .get(&owner, &request.input_file_id)
        .await
        .map_err(|e| ApiError::file(e, &request.input_file_id))?;
    if file.purpose != PURPOSE_BATCH {
        return Err(ApiError::InvalidField {
            field: "input_file_id".into(),
            message: format!(
                "file {} has purpose {:?}; a batch's input must have purpose `batch`",
                file.id, file.purpose
            ),
        });
    }
    let batch = app
        .batches
        .create(&owner, &caller.token(), request, app.settings.batch.window)
        .await
        .map_err(|e| ApiError::unavailable("redis", e))?;
    tracing::info!(batch = %batch.id, input = %batch.input_file_id, "batch created");
    Ok(axum::Json(batch))
}

/// Batch `id` when `caller` owns it.
async fn owned(app: &AppState, caller: &Caller, id: &str) -> Result<BatchState, ApiError> {
    match app.batches.get(id).await {
        Ok(Some(state)) if state.owner == owner(caller) => Ok(state),
        Ok(_) => Err(ApiError::NoSuchBatch(id.chars().take(128).collect())),
        Err(e) => Err(ApiError::unavailable("redis", e)),
    }
}

#[utoipa::path(
    get, path = "/v1/batches/{batch_id}", tag = "batch",
    params(("batch_id" = String, Path, description = "The batch's id")),
    responses(
        (status = 200, description = "The batch", body = Batch),
        (status = 401, description = "Missing or invalid API key", body = OpenAiError),
        (status = 404, description = "No such batch (or another key's)", body = OpenAiError),
        (status = 429, description = "Rate limited (Retry-After)", body = OpenAiError),
        (status = 503, description = "Redis unavailable", body = OpenAiError),
    ),
    security((), ("api_key" = []))
)]
pub async fn get(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(batch_id): Path<String>,
) -> Result<axum::Json<Batch>, ApiError> {
    Ok(axum::Json(owned(&app, &caller, &batch_id).await?.batch))
}

/// `GET /v1/batches`' query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BatchesQuery {
    /// Batches in the page, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<usize>,
    /// The page starts after this batch.
    after: Option<String>,
}

#[utoipa::path(
    get, path = "/v1/batches", tag = "batch",
    params(BatchesQuery),
    responses(
        (status = 200, description = "A page of this key's batches, newest first", body = List<Batch>),
        (status = 400, description = "A bad query", body = OpenAiError),
        (status = 401, description = "Missing or invalid API key", body = OpenAiError),
        (status = 429, description = "Rate limited (Retry-After)", body = OpenAiError),
        (status = 503, description = "Redis unavailable", body = OpenAiError),
    ),
    security((), ("api_key" = []))
)]
pub async fn list(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiQuery(query): ApiQuery<BatchesQuery>,
) -> Result<axum::Json<List<Batch>>, ApiError> {
    let limit = page_limit(query.limit, 20, 100)?;
    app.batches
        .list(&owner(&caller), query.after.as_deref(), limit)
        .await
        .map(axum::Json)
        .map_err(|e| ApiError::unavailable("redis", e))
}

#[utoipa::path(
    post, path = "/v1/batches/{batch_id}/cancel", tag = "batch",
    params(("batch_id" = String, Path, description = "The batch's id")),
    responses(
        (status = 200, description = "The batch, `cancelling` (its queued requests are cancelled, its finished ones kept, then it ends `cancelled`)", body = Batch),
        (status = 401, description = "Missing or invalid API key", body = OpenAiError),
        (status = 404, description = "No such batch (or another key's)", body = OpenAiError),
        (status = 409, description = "The batch is finalizing or has ended", body = OpenAiError),
        (status = 429, description = "Rate limited (Retry-After)", body = OpenAiError),
        (status = 503, description = "Redis unavailable", body = OpenAiError),
    ),
    security((), ("api_key" = []))
)]
pub async fn cancel(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(batch_id): Path<String>,
) -> Result<axum::Json<Batch>, ApiError> {
    let state = owned(&app, &caller, &batch_id).await?;
    app.batches
        .transition(
            &batch_id,
            &[BatchStatus::Validating, BatchStatus::InProgress],
            BatchStatus::Cancelling,
            &[],
        )
        .await
        .map_err(|e| ApiError::unavailable("redis", e))?;
    let state = owned(&app, &caller, &batch_id).await.unwrap_or(state);
    match state.batch.status {
        BatchStatus::Cancelling | BatchStatus::Cancelled => Ok(axum::Json(state.batch)),
        status => Err(ApiError::BatchNotCancellable {
            id: batch_id,
            status: status.as_str(),
        }),
    }
}
