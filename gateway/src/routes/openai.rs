//! `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`, `GET /v1/models/{model}`: the
//! OpenAI API over our queue.
//!
//! A request becomes one job per choice (`n`, and for completions each prompt), queued like any other: the
//! same validation, rate limit (one admission per job) and key ownership as `/v1/jobs`, its prompts taken as
//! written. Non-streamed, the answer waits for every job's final record, as `/run` does; streamed, each job's
//! event log is followed (so any replica serves it, whichever consumed the replies) and its token events
//! become OpenAI chunks, then `data: [DONE]`. A client that hangs up cancels its jobs
//! (`--cancel-on-disconnect`). Every error under these paths, the router's own (no such path, wrong method,
//! body too large) included, takes OpenAI's shape (see [`openai_errors`]). The protocol's types are in
//! [`crate::openai`].

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::Extension;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use shared::reply::now_ms;
use shared::{JobId, Lane, TokenLogprob};

use crate::app::AppState;
use crate::auth::Caller;
use crate::decision::Decision;
use crate::error::{ApiError, ApiJson, ErrorInfo};
use crate::follow::{CancelOnDrop, Followed, Waited, follow, wait_final};
use crate::openai::{
    self, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, CompletionChoice, CompletionChunk,
    CompletionRequest, Head, Model, ModelList, StreamUsage, Usage,
};
use crate::openai_jobs::{Kind, Meta, Plan, answer, check_model, finished, param_error, usage};
use crate::tools::{ToolCallDelta, ToolCalling};
use crate::waiters::{Follow, Interest, Slot};

#[utoipa::path(
    post, path = "/v1/completions", tag = "openai",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion, or (`stream: true`) its chunks, each the data of a Server-Sent Event, \
            then `data: [DONE]`",
            content((openai::Completion = "application/json"), (ChunkEvent = "text/event-stream"))),
        OpenAiErrors,
    ),
    params(RequestTimeout),
    security((), ("api_key" = []))
)]
pub async fn completions(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let jobs = Jobs {
        plan: Plan::completion(&app.settings.served_model_name, &req)?,
        lane: req.lane().map_err(param_error)?,
        timeout_s: crate::deadline::timeout(req.timeout_s(), &headers)?,
    };
    serve(app, caller, jobs, req.stream(), req.stream_usage()).await
}

#[utoipa::path(
    post, path = "/v1/chat/completions", tag = "openai",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The chat completion, or (`stream: true`) its chunks, each the data of a Server-Sent \
            Event, then `data: [DONE]`",
            content((openai::ChatCompletion = "application/json"), (ChunkEvent = "text/event-stream"))),
        OpenAiErrors,
    ),
    params(RequestTimeout),
    security((), ("api_key" = []))
)]
pub async fn chat_completions(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let jobs = Jobs {
        plan: Plan::chat(&app.settings.served_model_name, &req)?,
        lane: req.lane().map_err(param_error)?,
        timeout_s: crate::deadline::timeout(req.timeout_s(), &headers)?,
    };
    let forced = matches!(jobs.plan.kind, Kind::Chat { tools: Some(_) });
    serve(app, caller, jobs, req.stream(), req.stream_usage())
        .await
        .map_err(|e| if forced { blame_tools(e) } else { e })
}

/// A forced tool call's grammar is written from the tools' schemas: when it does not compile, `tools` is
/// the field to blame, not `response_format`.
fn blame_tools(e: ApiError) -> ApiError {
    match e {
        ApiError::InvalidJob(shared::job::InvalidJob::Parameter(p)) if p.field == "grammar" => {
            ApiError::InvalidField {
                field: "tools".to_owned(),
                message: p.message,
            }
        }
        e => e,
    }
}

/// The header both OpenAI routes read besides the body, for the document.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // documentation only; `crate::deadline::timeout` reads the header
struct RequestTimeout {
    /// Seconds the request is worth waiting for, as the body's `timeout_s` (the shorter wins).
    #[param(
        rename = "X-Request-Timeout",
        nullable = false,
        exclusive_minimum = 0,
        maximum = 604800
    )]
    x_request_timeout: Option<f64>,
}

/// The errors both OpenAI routes answer, in OpenAI's shape (`{"error": {message, type, param, code}}`).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // documentation only; the bodies are built by `openai_errors`
enum OpenAiErrors {
    /// Invalid request: bad JSON, an unknown or unsupported field, a value out of range, a prompt that with
    /// `max_tokens` does not fit the model's context, or is empty.
    #[response(status = 400)]
    BadRequest(#[to_schema] openai::OpenAiError),
    /// Missing or invalid API key.
    #[response(status = 401)]
    Unauthorized(#[to_schema] openai::OpenAiError),
    /// Unknown model (`model_not_found`).
    #[response(status = 404)]
    NotFound(#[to_schema] openai::OpenAiError),
    /// A job of the request was cancelled.
    #[response(status = 409)]
    Conflict(#[to_schema] openai::OpenAiError),
    /// Body over the limit.
    #[response(status = 413)]
    TooLarge(#[to_schema] openai::OpenAiError),
    /// Rate limited (Retry-After), or the client holds as many streams and waiting requests as it may.
    #[response(status = 429)]
    RateLimited(#[to_schema] openai::OpenAiError),
    /// A job failed in the engine.
    #[response(status = 500)]
    Failed(#[to_schema] openai::OpenAiError),
    /// Broker or Redis unavailable (Retry-After).
    #[response(status = 503)]
    Unavailable(#[to_schema] openai::OpenAiError),
    /// Not finished in time; the jobs go on. Or Redis did not answer while a job was being recorded
    /// (`outcome_unknown`): it may have been taken.
    #[response(status = 504)]
    Timeout(#[to_schema] openai::OpenAiError),
}

/// One Server-Sent Event of a streamed completion, for the document: axum's `Event` writes the events and
/// has no schema, so this says what they carry.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // documentation only
struct ChunkEvent {
    /// JSON: a `CompletionChunk` (completions) or a `ChatCompletionChunk` (chat); the last event's is
    /// `[DONE]`.
    data: String,
}

#[utoipa::path(
    get, path = "/v1/models", tag = "openai",
    responses(
        (status = 200, description = "The one model this deployment serves", body = ModelList),
        (status = 401, description = "Missing or invalid API key", body = openai::OpenAiError),
        (status = 429, description = "Rate limited (Retry-After)", body = openai::OpenAiError),
    ),
    security((), ("api_key" = []))
)]
pub async fn models(State(app): State<AppState>) -> axum::Json<ModelList> {
    axum::Json(ModelList::new(vec![served(&app)]))
}

#[utoipa::path(
    get, path = "/v1/models/{model}", tag = "openai",
    params(("model" = String, Path, description = "The model's id as `/v1/models` lists it (it may hold a `/`)")),
    responses(
        (status = 200, description = "The model", body = Model),
        (status = 401, description = "Missing or invalid API key", body = openai::OpenAiError),
        (status = 404, description = "No such model (`model_not_found`)", body = openai::OpenAiError),
        (status = 429, description = "Rate limited (Retry-After)", body = openai::OpenAiError),
    ),
    security((), ("api_key" = []))
)]
pub async fn model(
    State(app): State<AppState>,
    Path(model): Path<String>,
) -> Result<axum::Json<Model>, ApiError> {
    check_model(&app.settings.served_model_name, &model)?;
    Ok(axum::Json(served(&app)))
}

/// The one model this deployment serves, as OpenAI describes a model.
fn served(app: &AppState) -> Model {
    Model::new(&app.settings.served_model_name, app.started_at_s, "gptj-service")
}

/// A request's jobs and where they go: the lane `service_tier` asks for and the request's timeout.
struct Jobs {
    plan: Plan,
    lane: Option<Lane>,
    timeout_s: Option<f64>,
}

/// Queues the jobs (all or none: a refusal cancels those already queued), then answers.
async fn serve(
    app: AppState,
    caller: Caller,
    jobs: Jobs,
    stream: bool,
    usage: StreamUsage,
) -> Result<Response, ApiError> {
    let Jobs {
        plan: Plan { jobs, n, kind },
        lane,
        timeout_s,
    } = jobs;
    // Before anything is queued: a request that could not be followed must not run.
    let slot = app
        .waiters
        .slot(Follow::Stream, &caller.id, app.settings.max_streams_per_client)?;
    let ids: Vec<JobId> = jobs.iter().map(|_| JobId::new_random()).collect();
    // Registered before the first publish, so no completion notice can slip by.
    let registrations: Vec<_> = ids
        .iter()
        .map(|id| app.waiters.register(*id, Interest::Done))
        .collect();
    let mut decision: Option<Decision> = None;
    let mut prompts = Vec::with_capacity(ids.len());
    let lane = caller.lane(lane);
    let deadline_ms = timeout_s.map(|t| crate::deadline::deadline_ms(now_ms(), t));
    let jobs = ids
        .iter()
        .zip(jobs)
        .map(|(id, mut job)| {
            job.deadline_ms = deadline_ms;
            (*id, job)
        })
        .collect();
    // All choices or none: a refusal of one takes back those admitted before it, before any runs.
    for (accepted, d) in app
        .enqueue_all(jobs, &app.settings.prompts.openai, &caller, lane)
        .await?
    {
        decision = d.or(decision);
        prompts.push(accepted.prompt);
    }
    let meta = Meta {
        head: Head {
            id: match kind {
                Kind::Chat { .. } => openai::chat_completion_id(&ids[0]),
                Kind::Completion { .. } => openai::completion_id(&ids[0]),
            },
            created: now_ms() / 1000,
            model: app.settings.served_model_name.clone(),
            service_tier: openai::service_tier(lane),
        },
        kind,
    };
    let mut owner = CancelOnDrop::new(&app, ids.clone(), app.settings.cancel_on_disconnect);
    let mut response = if stream {
        drop(registrations);
        Sse::new(chunks(app, ids, prompts, n, (owner, slot), meta, usage)).into_response()
    } else {
        let mut records = Vec::with_capacity(ids.len());
        for (id, registration) in ids.iter().zip(&registrations) {
            match wait_final(&app, *id, registration).await {
                Waited::Final(record) => records.push(*record),
                Waited::TimedOut => {
                    // As after /run's timeout, the jobs go on and can be polled.
                    owner.disarm();
                    return Err(ApiError::RunTimeout(*id));
                }
            }
        }
        owner.disarm();
        drop(slot);
        axum::Json(answer(&meta, &app.vocabulary, n, records)?).into_response()
    };
    if let Some(d) = decision {
        d.write_headers(response.headers_mut());
    }
    Ok(response)
}

/// The streamed answer's state across its jobs.
struct Streamed {
    meta: Meta,
    n: u32,
    usage: StreamUsage,
    owner: CancelOnDrop,
    /// The client's stream slot, held as long as the stream.
    _slot: Slot,
    /// Names the tokens of the log-probabilities chunks carry.
    app: AppState,
    /// Per choice: its prompt as the job took it, its result once final, and whether its first chunk (the
    /// chat role, or the echoed prompt) went out.
    prompts: Vec<String>,
    results: Vec<Option<shared::reply::Succeeded>>,
    opened: Vec<bool>,
    /// Per choice, for continuous usage: its prompt's tokens (from the worker's `started`, or its result),
    /// and the tokens generated so far (from its token events).
    prompt_tokens: Vec<u32>,
    generated: Vec<u32>,
    /// Per choice, for completions' log-probabilities: the characters of the tokens before its next chunk's
    /// (`text_offset` runs on across chunks, from the echoed prompt's).
    offsets: Vec<usize>,
    /// Per choice, for a forced tool call: its id, and whether its first piece (which names the function)
    /// went out.
    call_ids: Vec<String>,
    called: Vec<bool>,
    ended: usize,
}

impl Streamed {
    /// Chunks for a piece of one choice (its new text, and the log-probabilities of its new tokens when
    /// asked for), or for its end.
    fn delta(
        &mut self,
        choice: usize,
        text: Option<String>,
        scores: Option<&[TokenLogprob]>,
        finish: Option<shared::FinishReason>,
    ) -> Vec<Event> {
        let head = &self.meta.head;
        let vocabulary = &self.app.vocabulary;
        // As vLLM counts a chunk's usage: the prompt of the choice it carries, and that choice's tokens.
        let usage = self
            .usage
            .on_chunk(Usage::new(self.prompt_tokens[choice], self.generated[choice]));
        let index = choice as u32;
        let mut out = Vec::new();
        match &self.meta.kind {
            &Kind::Completion { echo } => {
                let offset = &mut self.offsets[choice];
                if echo && !self.opened[choice] {
                    // The prompt first, as a non-streamed echo has it, with its scores when they are known
                    // by now: they come with the job's result, so only a choice that streamed no tokens
                    // before it ended (`max_tokens` 0) has them here.
                    self.opened[choice] = true;
                    let prompt_text = &self.prompts[choice];
                    let mut prompt = CompletionChoice::new(index, prompt_text.clone(), None);
                    match self.results[choice]
                        .as_ref()
                        .and_then(|r| r.prompt_logprobs.as_deref())
                    {
                        Some(prompt_scores) => {
                            prompt.logprobs = Some(vocabulary.completion_from(offset, prompt_scores))
                        }
                        None => *offset = prompt_text.chars().count(),
                    }
                    out.push(chunk(CompletionChunk::new(head, vec![prompt], usage)));
                }
                let mut piece = CompletionChoice::new(index, text.unwrap_or_default(), finish);
                piece.logprobs = scores.map(|scores| vocabulary.completion_from(offset, scores));
                out.push(chunk(CompletionChunk::new(head, vec![piece], usage)));
            }
            Kind::Chat { tools } => {
                if !self.opened[choice] {
                    self.opened[choice] = true;
                    let role = ChatChunkChoice::role(index);
                    out.push(chunk(ChatCompletionChunk::new(head, vec![role], usage)));
                }
                let mut pieces = match (tools, text, finish) {
                    (None, _, Some(reason)) => {
                        vec![ChatChunkChoice::finish(index, openai::finish_reason(reason))]
                    }
                    (None, text, None) => vec![ChatChunkChoice::content(index, text.unwrap_or_default())],
                    (Some(calling), _, Some(reason)) => {
                        // What has not gone out yet: a `required` call (whole, now that its name is known),
                        // or a named call that wrote no text; then the end.
                        let mut pieces = Vec::new();
                        if !self.called[choice] {
                            let text = self.results[choice].as_ref().map_or("", |r| r.text.as_str());
                            let call = calling.call(self.call_ids[choice].clone(), text);
                            pieces.push(match call {
                                Some(call) => ChatChunkChoice::tool_call(index, ToolCallDelta::whole(call)),
                                None => ChatChunkChoice::content(index, text),
                            });
                        }
                        pieces.push(ChatChunkChoice::finish(index, calling.finish_reason(reason)));
                        pieces
                    }
                    (Some(ToolCalling::Named(name)), text, None) => {
                        let first = !std::mem::replace(&mut self.called[choice], true);
                        let piece = ToolCallDelta::arguments(
                            first.then(|| (self.call_ids[choice].clone(), name.as_str())),
                            text.unwrap_or_default(),
                        );
                        vec![ChatChunkChoice::tool_call(index, piece)]
                    }
                    // A `required` call is held until its text is whole; its tokens' scores still go.
                    (Some(_), _, None) => vec![ChatChunkChoice::empty(index)],
                };
                if let Some(first) = pieces.first_mut() {
                    first.logprobs = scores.map(|scores| vocabulary.chat(scores));
                }
                for piece in pieces {
                    if piece.is_empty() {
                        continue;
                    }
                    out.push(chunk(ChatCompletionChunk::new(head, vec![piece], usage)));
                }
            }
        }
        out
    }

    /// The events one step of one job's log becomes.
    fn on(&mut self, choice: usize, followed: Followed) -> Vec<Event> {
        match followed {
            Followed::Queued(_) => Vec::new(),
            Followed::Entry(entry) if entry.event == "started" => {
                let data = serde_json::from_str::<serde_json::Value>(&entry.data).unwrap_or_default();
                if let Some(n) = data["prompt_tokens"].as_u64() {
                    self.prompt_tokens[choice] = n as u32;
                }
                Vec::new()
            }
            Followed::Entry(entry) => {
                let Some(token) = entry.token() else {
                    return Vec::new();
                };
                // Tokens so far: the chunk's first index and its tokens (a redelivered chunk counts once).
                let through = token.index + token.token_ids.len() as u32;
                self.generated[choice] = self.generated[choice].max(through);
                // Log-probabilities go with their tokens, whether or not their text is held back (a
                // possible stop sequence), as vLLM streams them: a chunk without text may carry them.
                let scores = token.logprobs.filter(|s| !s.is_empty());
                if token.text.is_empty() && scores.is_none() {
                    return Vec::new();
                }
                self.delta(choice, Some(token.text), scores.as_deref(), None)
            }
            Followed::Final { record, .. } => {
                self.ended += 1;
                self.owner.release(record.id);
                if self.ended == self.results.len() {
                    self.owner.disarm();
                }
                match finished(&record) {
                    Ok(r) => {
                        let finish = r.finish_reason;
                        self.generated[choice] = r.new_tokens;
                        if let Some(n) = r.prompt_tokens {
                            self.prompt_tokens[choice] = n;
                        }
                        self.results[choice] = Some(r.clone());
                        // Every token's scores came with its token entry (the result's own tokens too, which
                        // the log took before this end): the last chunk repeats none.
                        self.delta(choice, None, None, Some(finish))
                    }
                    Err(e) => {
                        let (status, code) = e.status_and_code();
                        vec![chunk(openai::error_body(status, code, &e.to_string(), None))]
                    }
                }
            }
            Followed::Gone => {
                self.ended += 1;
                let message = "the job's record expired while it was streamed";
                vec![chunk(openai::error_body(
                    StatusCode::GONE,
                    shared::ErrorCode::NotFound,
                    message,
                    None,
                ))]
            }
        }
    }

    /// The usage chunk (when asked for) and `[DONE]`.
    fn close(&self) -> Vec<Event> {
        let mut out = Vec::new();
        if self.usage.last_chunk() {
            let usage = usage(self.n, self.results.iter().flatten());
            let head = &self.meta.head;
            out.push(match self.meta.kind {
                Kind::Completion { .. } => chunk(CompletionChunk::usage(head, usage)),
                Kind::Chat { .. } => chunk(ChatCompletionChunk::usage(head, usage)),
            });
        }
        out.push(Event::default().data("[DONE]"));
        out
    }
}

fn chunks(
    app: AppState,
    ids: Vec<JobId>,
    prompts: Vec<String>,
    n: u32,
    (owner, slot): (CancelOnDrop, Slot),
    meta: Meta,
    usage: StreamUsage,
) -> impl Stream<Item = Result<Event, Infallible>> + Send {
    let state = Arc::new(Mutex::new(Streamed {
        meta,
        n,
        usage,
        owner,
        _slot: slot,
        app: app.clone(),
        prompts,
        results: vec![None; ids.len()],
        opened: vec![false; ids.len()],
        prompt_tokens: vec![0; ids.len()],
        generated: vec![0; ids.len()],
        offsets: vec![0; ids.len()],
        call_ids: ids.iter().map(crate::tools::call_id).collect(),
        called: vec![false; ids.len()],
        ended: 0,
    }));
    let follows = ids.iter().enumerate().map(|(choice, id)| {
        follow(app.clone(), *id, "0-0".to_owned())
            .map(move |f| (choice, f))
            .boxed()
    });
    let on = state.clone();
    let events = futures::stream::select_all(follows)
        .map(move |(choice, f)| lock(&on).on(choice, f))
        .chain(futures::stream::once(async move { lock(&state).close() }));
    events.flat_map(|events| futures::stream::iter(events.into_iter().map(Ok)))
}

/// A chunk's Server-Sent Event.
fn chunk(value: impl serde::Serialize) -> Event {
    Event::default()
        .json_data(value)
        .unwrap_or_else(|e| Event::default().data(format!("{{\"error\":{{\"message\":\"{e}\"}}}}")))
}

fn lock(state: &Mutex<Streamed>) -> std::sync::MutexGuard<'_, Streamed> {
    // Nothing panics while holding it; a poisoned lock still holds valid data.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether `path` is one of OpenAI's that the gateway serves (the Batch API's included), or below one: its errors take OpenAI's shape.
pub fn is_openai_path(path: &str) -> bool {
    [
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/v1/files",
        "/v1/batches",
    ]
    .iter()
    .any(|root| match path.strip_prefix(root) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    })
}

/// The largest body of an error response read back to be rewritten (axum's plain-text rejections).
const MAX_REWRITTEN_BODY: usize = 16 * 1024;

/// Rewrites every error response under OpenAI's paths ([`is_openai_path`]) into OpenAI's shape
/// (`{"error": {message, type, param, code}}`, invalid parameters as 400, our parameters' names as
/// OpenAI's), whoever answered: a handler, the key check, the body limit, or the router itself (no such
/// path, wrong method). What [`ApiError`] recorded says it; a response without that record (a framework's
/// own rejection) is judged by its status, its text the message. Headers (`Retry-After`, rate limits,
/// `WWW-Authenticate`) stay.
pub async fn openai_errors(request: Request, next: Next) -> Response {
    let openai = is_openai_path(request.uri().path());
    let response = next.run(request).await;
    if !openai || !(response.status().is_client_error() || response.status().is_server_error()) {
        return response;
    }
    let info = response.extensions().get::<ErrorInfo>().cloned();
    let (mut parts, body) = response.into_parts();
    let info = match info {
        Some(info) => info,
        None => {
            let text = axum::body::to_bytes(body, MAX_REWRITTEN_BODY)
                .await
                .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
                .unwrap_or_default();
            ErrorInfo {
                code: code_for(parts.status),
                message: if text.is_empty() {
                    parts.status.canonical_reason().unwrap_or("error").to_owned()
                } else {
                    text
                },
                param: None,
            }
        }
    };
    let param = info.param.as_deref().map(openai_param);
    let message = openai::in_openai_terms(&info.message);
    let body = openai::error_body(parts.status, info.code, &message, param.as_deref());
    parts.status = openai::status(parts.status);
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    let mut out = (parts.status, axum::Json(body)).into_response();
    for (name, value) in parts.headers.iter() {
        if name != axum::http::header::CONTENT_TYPE {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// The stable code of an error response that did not say one.
fn code_for(status: StatusCode) -> shared::ErrorCode {
    use shared::ErrorCode;
    match status {
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
        StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
        StatusCode::TOO_MANY_REQUESTS => ErrorCode::RateLimited,
        StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => ErrorCode::Timeout,
        StatusCode::SERVICE_UNAVAILABLE => ErrorCode::Unavailable,
        s if s.is_server_error() => ErrorCode::Internal,
        // 400, 415, 422: a body the framework could not take.
        _ => ErrorCode::InvalidJson,
    }
}

/// Our parameter names as the OpenAI request spells them.
fn openai_param(ours: &str) -> String {
    openai::param_name(ours.strip_prefix("parameters.").unwrap_or(ours)).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openais_paths_are_its_three_roots_and_what_lies_below_them() {
        for path in [
            "/v1/completions",
            "/v1/completions/x",
            "/v1/chat/completions",
            "/v1/chat/completions/abc/def",
            "/v1/models",
            "/v1/models/EleutherAI/gpt-j-6b",
            "/v1/files",
            "/v1/files/file-1/content",
            "/v1/batches/batch_1/cancel",
        ] {
            assert!(is_openai_path(path), "{path}");
        }
        for path in [
            "/v1/jobs",
            "/v1/queue",
            "/v1/completionsx",
            "/v1/modelsfoo",
            "/run",
            "/v1/chat",
        ] {
            assert!(!is_openai_path(path), "{path}");
        }
    }

    /// A framework's own rejection (plain text, no [`ErrorInfo`]), such as axum's `Json` extractor's 415,
    /// takes OpenAI's shape too, its text the message and its status the code; elsewhere it stays as it is.
    #[tokio::test]
    async fn a_rejection_without_our_record_is_rewritten_by_its_status_on_openais_paths_only() {
        use tower::ServiceExt;
        const TEXT: &str = "Expected request with `Content-Type: application/json`";
        let rejection = || async { (StatusCode::UNSUPPORTED_MEDIA_TYPE, TEXT) };
        let app = axum::Router::new()
            .route("/v1/chat/completions", axum::routing::post(rejection))
            .route("/v1/jobs", axum::routing::post(rejection))
            .layer(axum::middleware::from_fn(openai_errors));
        let call = |path: &'static str| {
            let app = app.clone();
            async move {
                let request = Request::post(path).body(axum::body::Body::empty()).unwrap();
                let response = app.oneshot(request).await.unwrap();
                let status = response.status();
                let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                    .await
                    .unwrap();
                (status, String::from_utf8_lossy(&bytes).into_owned())
            }
        };
        let (status, body) = call("/v1/chat/completions").await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap(),
            serde_json::json!({"error": {"message": TEXT, "type": "invalid_request_error", "param": null,
                "code": "invalid_json"}})
        );
        assert_eq!(
            call("/v1/jobs").await,
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, TEXT.to_owned())
        );
    }
}
