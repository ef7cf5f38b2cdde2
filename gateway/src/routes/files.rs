//! `/v1/files`: OpenAI's file routes, for the Batch API's input and output files (see [`crate::files`]).
//!
//! An upload is `multipart/form-data` (`purpose`, `file`) streamed into the object store as it arrives,
//! never held whole, bounded by `--max-file-bytes`; a file is seen only by the key that made it.

use axum::Extension;
use axum::body::Body;
use axum::extract::multipart::{Multipart, MultipartError};
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};

use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiQuery};
use crate::files::{FileError, FileObject, List, PURPOSE_BATCH, owner};
use crate::openai::OpenAiError;

/// The upload form, for the document (`deny_unknown_fields` states that no other field is taken).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // documentation only: the form is read field by field
pub struct UploadForm {
    /// `batch`: a JSONL file, one request a line.
    purpose: UploadPurpose,
    /// The file.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
}

/// The one purpose an upload may have here.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)] // documentation only
pub enum UploadPurpose {
    Batch,
}

#[utoipa::path(
    post, path = "/v1/files", tag = "batch",
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The file, stored", body = FileObject),
        (status = 400, description = "No `file` or `purpose`, a purpose other than `batch`, or a form that cannot be read", body = OpenAiError),
        (status = 401, description = "Missing or invalid API key", body = OpenAiError),
        (status = 413, description = "Larger than `--max-file-bytes`", body = OpenAiError),
        (status = 429, description = "Rate limited (Retry-After)", body = OpenAiError),
        (status = 503, description = "The file store or Redis unavailable", body = OpenAiError),
    ),
    security((), ("api_key" = []))
)]
pub async fn upload(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<axum::Json<FileObject>, ApiError> {
    let mut multipart = multipart.map_err(|e| ApiError::InvalidField {
        field: "file".into(),
        message: e.body_text(),
    })?;
    let limit = app.settings.max_file_bytes;
    let form_error = |e: MultipartError| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::FileTooLarge { limit }
        } else {
            ApiError::InvalidField {
                field: "file".into(),
                message: e.body_text(),
            }
        }
    };
    let mut purpose = None;
    // The body is written as it arrives; its description only once the whole form has been read.
    let mut written: Option<(String, String, u64)> = None;
    let outcome = async {
        while let Some(field) = multipart.next_field().await.map_err(form_error)? {
            match field.name().unwrap_or_default() {
                "purpose" => purpose = Some(field.text().await.map_err(form_error)?.trim().to_owned()),
                "file" if written.is_none() => {
                    let filename = field.file_name().unwrap_or("file").chars().take(256).collect();
                    let id = crate::files::FileStore::new_id();
                    // The form's own bound (a little over the file's) can trip while the file's chunks are
                    // read ahead: it is the same refusal.
                    let chunks = field.map_err(move |e| match e.status() {
                        axum::http::StatusCode::PAYLOAD_TOO_LARGE => FileError::TooLarge { limit },
                        _ => FileError::Upload(e.body_text()),
                    });
                    let bytes = app
                        .files
                        .write(&id, Box::pin(chunks), limit)
                        .await
                        .map_err(|e| ApiError::file(e, &id))?;
                    written = Some((id, filename, bytes));
                }
                "file" => {
                    return Err(ApiError::InvalidField {
                        field: "file".into(),
                        message: "one file per upload".into(),
                    });
                }
                other => {
                    return Err(ApiError::UnknownField {
                        field: other.chars().take(64).collect(),
                    });
                }
            }
        }
        match purpose.as_deref() {
            Some(PURPOSE_BATCH) => {}
            Some(other) => {
                return Err(ApiError::InvalidField {
                    field: "purpose".into(),
                    message: format!("must be `batch` (the only purpose served here), got {other:?}"),
                });
            }
            None => {
                return Err(ApiError::InvalidField {
                    field: "purpose".into(),
                    message: "missing: the form must have a `purpose` field".into(),
                });
            }
        }
        let Some((id, filename, bytes)) = written.clone() else {
            return Err(ApiError::InvalidField {
                field: "file".into(),
                message: "missing: the form must have a `file` field".into(),
            });
        };
        let file = FileObject {
            id,
            object: "file".into(),
            bytes,
            created_at: shared::reply::now_ms() / 1000,
            filename,
            purpose: PURPOSE_BATCH.into(),
            status: "processed".into(),
            status_details: None,
        };
        app.files
            .describe(&owner(&caller), &file)
            .await
            .map_err(|e| ApiError::file(e, &file.id))?;
        Ok(file)
    }
    .await;
    if outcome.is_err()
        && let Some((id, ..)) = &written
    {
        app.files.discard(id).await;
    }
    outcome.map(axum::Json)
}

/// `GET /v1/files`' query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FilesQuery {
    /// Only files of this purpose (`batch`, `batch_output`).
    purpose: Option<String>,
    /// Files in the page, 1 to 10,000 (default 10,000).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<usize>,
    /// The page starts after this file.
    after: Option<String>,
    /// `desc` (newest first, the default) or `asc`.
    #[param(inline)]
    order: Option<Order>,
}

#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    Asc,
    Desc,
}

#[utoipa::path(
    get, path = "/v1/files", tag = "batch",
    params(FilesQuery),
    responses(
        (status = 200, description = "A page of this key's files", body = List<FileObject>),
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
    ApiQuery(query): ApiQuery<FilesQuery>,
) -> Result<axum::Json<List<FileObject>>, ApiError> {
    let limit = page_limit(query.limit, 10_000, 10_000)?;
    let ascending = matches!(query.order, Some(Order::Asc));
    app.files
        .list(
            &owner(&caller),
            query.purpose.as_deref(),
            query.after.as_deref(),
            limit,
            ascending,
        )
        .await
        .map(axum::Json)
        .map_err(|e| ApiError::file(e, ""))
}

/// A page's `limit`, checked: 1 to `max`, `default` when absent.
pub fn page_limit(limit: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    match limit.unwrap_or(default) {
        n if (1..=max).contains(&n) => Ok(n),
        n => Err(ApiError::InvalidField {
            field: "limit".into(),
            message: format!("must be in [1, {max}], got {n}"),
        }),
    }
}

#[utoipa::path(
    get, path = "/v1/files/{file_id}", tag = "batch",
    params(("file_id" = String, Path, description = "The file's id")),
    responses(
        (status = 200, description = "The file", body = FileObject),
        (status = 401, description = "Missing or invalid API key", body = OpenAiError),
        (status = 404, description = "No such file (or another key's)", body = OpenAiError),
        (status = 429, description = "Rate limited (Retry-After)", body = OpenAiError),
        (status = 503, description = "Redis unavailable", body = OpenAiError),
    ),
    security((), ("api_key" = []))
)]
pub async fn get(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(file_id): Path<String>,
) -> Result<axum::Json<FileObject>, ApiError> {
    app.files
        .get(&owner(&caller), &file_id)
        .await
        .map(axum::Json)
        .map_err(|e| ApiError::file(e, &file_id))
}

#[utoipa::path(
    get, path = "/v1/files/{file_id}/content", tag = "batch",
    params(("file_id" = String, Path, description = "The file's id")),
    responses(
        (status = 200, description = "The file's bytes", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 401, description = "Missing or invalid API key", body = OpenAiError),
        (status = 404, description = "No such file (or another key's)", body = OpenAiError),
        (status = 429, description = "Rate limited (Retry-After)", body = OpenAiError),
        (status = 503, description = "The file store or Redis unavailable", body = OpenAiError),
    ),
    security((), ("api_key" = []))
)]
pub async fn content(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(file_id): Path<String>,
) -> Result<Response, ApiError> {
    let file = app
        .files
        .get(&owner(&caller), &file_id)
        .await
        .map_err(|e| ApiError::file(e, &file_id))?;
    let body = if file.bytes == 0 {
        Body::empty()
    } else {
        let stream = app
            .files
            .stream_from(&file.id, 0)
            .await
            .map_err(|e| ApiError::file(e, &file_id))?;
        Body::from_stream(stream)
    };
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, file.bytes.to_string()),
        ],
        body,
    )
        .into_response())
}

/// What `DELETE /v1/files/{id}` answers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FileDeleted {
    id: String,
    /// Always `file`.
    #[schema(value_type = String, example = "file")]
    object: &'static str,
    deleted: bool,
}

#[utoipa::path(
    delete, path = "/v1/files/{file_id}", tag = "batch",
    params(("file_id" = String, Path, description = "The file's id")),
    responses(
        (status = 200, description = "The file is gone", body = FileDeleted),
        (status = 401, description = "Missing or invalid API key", body = OpenAiError),
        (status = 404, description = "No such file (or another key's)", body = OpenAiError),
        (status = 409, description = "The input of a batch that has not ended", body = OpenAiError),
        (status = 429, description = "Rate limited (Retry-After)", body = OpenAiError),
        (status = 503, description = "The file store or Redis unavailable", body = OpenAiError),
    ),
    security((), ("api_key" = []))
)]
pub async fn delete(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(file_id): Path<String>,
) -> Result<axum::Json<FileDeleted>, ApiError> {
    // Checked first, so another key learns nothing of a file it cannot see: `get` answers 404 for it.
    app.files
        .get(&owner(&caller), &file_id)
        .await
        .map_err(|e| ApiError::file(e, &file_id))?;
    // A batch reads its input file until it ends; without it the batch fails and its finished lines are
    // lost. (A batch created between this check and the delete can still lose its file so: the check is
    // not atomic with the delete.)
    let in_use = app
        .batches
        .reading(&file_id)
        .await
        .map_err(|e| ApiError::unavailable("redis", e))?;
    if let Some(batch) = in_use {
        return Err(ApiError::FileInUse { file: file_id, batch });
    }
    app.files
        .delete(&owner(&caller), &file_id)
        .await
        .map_err(|e| ApiError::file(e, &file_id))?;
    Ok(axum::Json(FileDeleted {
        id: file_id,
        object: "file",
        deleted: true,
    }))
}
