//! `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`: the OpenAI API over our queue.
//!
//! A request becomes one job per choice (`n`, and for completions each prompt), queued like any other: the
//! same validation, rate limit (one admission per job) and key ownership as `/v1/jobs`. Non-streamed, the
//! answer waits for every job's final record, as `/run` does; streamed, each job's event log is followed
//! (so any replica serves it, whichever consumed the replies) and its token events become OpenAI chunks,
//! then `data: [DONE]`. A client that hangs up cancels its jobs (`--cancel-on-disconnect`). Errors on these
//! routes take OpenAI's shape (see [`openai_errors`]). The protocol's types are in [`crate::openai`].

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::Extension;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use shared::reply::now_ms;
use shared::{GenerationParameters, JobId, JobRequest};

use crate::app::AppState;
use crate::auth::Caller;
use crate::decision::Decision;
use crate::error::{ApiError, ApiJson, ErrorInfo};
use crate::follow::{CancelOnDrop, Followed, Waited, follow, wait_final};
use crate::openai::{
    self, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, CompletionChoice, CompletionChunk,
    CompletionRequest, Head, Model, ModelList, ParamError, Usage, choice_seed,
};
use crate::store::{JobRecord, Status};
use crate::waiters::Interest;

/// Chat takes the job contract's default `max_tokens`; completions OpenAI's documented 16.
const CHAT_MAX_TOKENS: u32 = shared::params::DEFAULT_MAX_NEW_TOKENS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion { echo: bool },
    Chat,
}

/// What every response and chunk of one request shares.
#[derive(Debug, Clone)]
struct Meta {
    head: Head,
    kind: Kind,
}

#[utoipa::path(
    post, path = "/v1/completions", tag = "openai",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion, or (`stream: true`) its chunks, each the data of a Server-Sent Event, \
            then `data: [DONE]`",
            content((openai::Completion = "application/json"), (ChunkEvent = "text/event-stream"))),
        OpenAiErrors,
    ),
    security((), ("api_key" = []))
)]
pub async fn completions(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    check_model(&app, &req.model)?;
    let parameters = req
        .parameters(openai::DEFAULT_COMPLETION_MAX_TOKENS)
        .map_err(param_error)?;
    let n = req.n().map_err(param_error)?;
    let mut jobs = Vec::new();
    for prompt in req.prompt.prompts() {
        for choice in 0..n {
            let parameters = seeded(&parameters, choice);
            jobs.push(JobRequest::new(prompt.clone(), parameters));
        }
    }
    let kind = Kind::Completion { echo: req.echo() };
    serve(app, caller, jobs, n, kind, req.stream(), req.include_usage()).await
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
    security((), ("api_key" = []))
)]
pub async fn chat_completions(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    check_model(&app, &req.model)?;
    let parameters = req.parameters(CHAT_MAX_TOKENS).map_err(param_error)?;
    let n = req.n().map_err(param_error)?;
    let jobs = (0..n)
        .map(|choice| JobRequest::chat(req.messages.clone(), seeded(&parameters, choice)))
        .collect();
    serve(
        app,
        caller,
        jobs,
        n,
        Kind::Chat,
        req.stream(),
        req.include_usage(),
    )
    .await
}

/// The errors both OpenAI routes answer, in OpenAI's shape (`{"error": {message, type, param, code}}`).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // documentation only; the bodies are built by `openai_errors`
enum OpenAiErrors {
    /// Invalid request: bad JSON, an unknown or unsupported field, a value out of range.
    #[response(status = 400)]
    BadRequest(#[to_schema] openai::OpenAiError),
    /// Missing or invalid API key.
    #[response(status = 401)]
    Unauthorized(#[to_schema] openai::OpenAiError),
    /// Unknown model.
    #[response(status = 404)]
    NotFound(#[to_schema] openai::OpenAiError),
    /// A job of the request was cancelled.
    #[response(status = 409)]
    Conflict(#[to_schema] openai::OpenAiError),
    /// Body over the limit.
    #[response(status = 413)]
    TooLarge(#[to_schema] openai::OpenAiError),
    /// Rate limited (Retry-After).
    #[response(status = 429)]
    RateLimited(#[to_schema] openai::OpenAiError),
    /// A job failed in the engine.
    #[response(status = 500)]
    Failed(#[to_schema] openai::OpenAiError),
    /// Broker or Redis unavailable (Retry-After).
    #[response(status = 503)]
    Unavailable(#[to_schema] openai::OpenAiError),
    /// Not finished in time; the jobs go on.
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
    let model = Model::new(&app.settings.served_model_name, app.started_at_s, "gptj-service");
    axum::Json(ModelList::new(vec![model]))
}

fn check_model(app: &AppState, model: &str) -> Result<(), ApiError> {
    if model == app.settings.served_model_name {
        Ok(())
    } else {
        Err(ApiError::ModelNotFound(model.chars().take(128).collect()))
    }
}

fn param_error(e: ParamError) -> ApiError {
    ApiError::InvalidField {
        field: e.param,
        message: e.message,
    }
}

/// Choice `i`'s parameters: its own seed, so sampled choices differ yet reproduce.
fn seeded(parameters: &GenerationParameters, choice: u32) -> GenerationParameters {
    GenerationParameters {
        seed: choice_seed(parameters.seed, choice),
        ..parameters.clone()
    }
}

/// Queues the jobs (all or none: a refusal cancels those already queued), then answers.
async fn serve(
    app: AppState,
    caller: Caller,
    jobs: Vec<JobRequest>,
    n: u32,
    kind: Kind,
    stream: bool,
    include_usage: bool,
) -> Result<Response, ApiError> {
    let ids: Vec<JobId> = jobs.iter().map(|_| JobId::new_random()).collect();
    // Registered before the first publish, so no completion notice can slip by.
    let registrations: Vec<_> = ids
        .iter()
        .map(|id| app.waiters.register(*id, Interest::Done))
        .collect();
    let mut decision: Option<Decision> = None;
    let mut prompts = Vec::with_capacity(ids.len());
    for (i, (id, job)) in ids.iter().zip(jobs).enumerate() {
        match app.enqueue(*id, job, &caller, None).await {
            Ok((accepted, d)) => {
                decision = d.or(decision);
                prompts.push(accepted.prompt);
            }
            Err(e) => {
                for queued in &ids[..i] {
                    if let Err(e) = app.cancel(*queued).await {
                        tracing::warn!(error = %e, id = %queued, "could not cancel a job of a refused request");
                    }
                }
                return Err(e);
            }
        }
    }
    let meta = Meta {
        head: Head {
            id: match kind {
                Kind::Chat => openai::chat_completion_id(&ids[0]),
                Kind::Completion { .. } => openai::completion_id(&ids[0]),
            },
            created: now_ms() / 1000,
            model: app.settings.served_model_name.clone(),
        },
        kind,
    };
    let mut owner = CancelOnDrop::new(&app, ids.clone(), app.settings.cancel_on_disconnect);
    let mut response = if stream {
        drop(registrations);
        Sse::new(chunks(app, ids, prompts, n, owner, meta, include_usage)).into_response()
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
        answer(&meta, n, records)?.into_response()
    };
    if let Some(d) = decision {
        d.write_headers(response.headers_mut());
    }
    Ok(response)
}

/// A finished job's text, or the error it ended with.
fn finished(record: &JobRecord) -> Result<&shared::reply::Succeeded, ApiError> {
    match (record.status, &record.result, &record.error) {
        (Status::Succeeded, Some(r), _) => Ok(r),
        (_, _, Some(error)) => Err(ApiError::JobFailed(error.clone())),
        _ => Err(ApiError::JobFailed(shared::ErrorBody::new(
            shared::ErrorCode::Internal,
            format!(
                "job {} ended {} without a result",
                record.id,
                record.status.as_str()
            ),
        ))),
    }
}

/// Usage over the choices: each prompt counted once (choices of one prompt share it), every completion.
fn usage<'a>(n: u32, results: impl Iterator<Item = &'a shared::reply::Succeeded>) -> Usage {
    let (mut prompt, mut completion) = (0, 0);
    for (i, r) in results.enumerate() {
        if (i as u32).is_multiple_of(n.max(1)) {
            prompt += r.prompt_tokens.unwrap_or(0);
        }
        completion += r.new_tokens;
    }
    Usage::new(prompt, completion)
}

fn answer(meta: &Meta, n: u32, records: Vec<JobRecord>) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let results = records.iter().map(finished).collect::<Result<Vec<_>, _>>()?;
    let usage = usage(n, results.iter().copied());
    let body = match meta.kind {
        Kind::Completion { echo } => {
            let choices = results
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let text = if echo {
                        format!("{}{}", r.prompt, r.text)
                    } else {
                        r.text.clone()
                    };
                    CompletionChoice::new(i as u32, text, Some(r.finish_reason))
                })
                .collect();
            serde_json::to_value(openai::Completion::new(&meta.head, choices, usage))
        }
        Kind::Chat => {
            let choices = results
                .iter()
                .enumerate()
                .map(|(i, r)| openai::ChatChoice::new(i as u32, r.text.clone(), r.finish_reason))
                .collect();
            serde_json::to_value(openai::ChatCompletion::new(&meta.head, choices, usage))
        }
    };
    body.map(axum::Json)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// The streamed answer's state across its jobs.
struct Streamed {
    meta: Meta,
    n: u32,
    include_usage: bool,
    owner: CancelOnDrop,
    /// Per choice: its cleaned prompt, its result once final, and whether its first chunk (the chat role,
    /// or the echoed prompt) went out.
    prompts: Vec<String>,
    results: Vec<Option<shared::reply::Succeeded>>,
    opened: Vec<bool>,
    ended: usize,
}

impl Streamed {
    fn chunk(&self, value: impl serde::Serialize) -> Event {
        Event::default()
            .json_data(value)
            .unwrap_or_else(|e| Event::default().data(format!("{{\"error\":{{\"message\":\"{e}\"}}}}")))
    }

    /// Chunks for new text of one choice, or for its end.
    fn delta(
        &mut self,
        choice: usize,
        text: Option<String>,
        finish: Option<shared::FinishReason>,
    ) -> Vec<Event> {
        let head = &self.meta.head;
        let usage = self.include_usage;
        let index = choice as u32;
        let mut out = Vec::new();
        match self.meta.kind {
            Kind::Completion { echo } => {
                if echo && !self.opened[choice] {
                    // The cleaned prompt first, as a non-streamed echo has it.
                    self.opened[choice] = true;
                    let prompt = CompletionChoice::new(index, self.prompts[choice].clone(), None);
                    out.push(self.chunk(CompletionChunk::new(head, vec![prompt], usage)));
                }
                let choice = CompletionChoice::new(index, text.unwrap_or_default(), finish);
                out.push(self.chunk(CompletionChunk::new(head, vec![choice], usage)));
            }
            Kind::Chat => {
                if !self.opened[choice] {
                    self.opened[choice] = true;
                    let role = ChatChunkChoice::role(index);
                    out.push(self.chunk(ChatCompletionChunk::new(head, vec![role], usage)));
                }
                let delta = match (text, finish) {
                    (_, Some(reason)) => ChatChunkChoice::finish(index, reason),
                    (text, None) => ChatChunkChoice::content(index, text.unwrap_or_default()),
                };
                out.push(self.chunk(ChatCompletionChunk::new(head, vec![delta], usage)));
            }
        }
        out
    }

    /// The events one step of one job's log becomes.
    fn on(&mut self, choice: usize, followed: Followed) -> Vec<Event> {
        match followed {
            Followed::Queued(_) => Vec::new(),
            Followed::Entry(entry) if entry.event == "token" => {
                let text = serde_json::from_str::<serde_json::Value>(&entry.data)
                    .ok()
                    .and_then(|v| v["text"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                if text.is_empty() {
                    return Vec::new();
                }
                self.delta(choice, Some(text), None)
            }
            Followed::Entry(_) => Vec::new(),
            Followed::Final { record, .. } => {
                self.ended += 1;
                self.owner.release(record.id);
                if self.ended == self.results.len() {
                    self.owner.disarm();
                }
                match finished(&record) {
                    Ok(r) => {
                        let finish = r.finish_reason;
                        self.results[choice] = Some(r.clone());
                        self.delta(choice, None, Some(finish))
                    }
                    Err(e) => {
                        let (status, code) = e.status_and_code();
                        vec![self.chunk(openai::error_body(status, code, &e.to_string(), None))]
                    }
                }
            }
            Followed::Gone => {
                self.ended += 1;
                let message = "the job's record expired while it was streamed";
                vec![self.chunk(openai::error_body(
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
        if self.include_usage {
            let usage = usage(self.n, self.results.iter().flatten());
            let head = &self.meta.head;
            out.push(match self.meta.kind {
                Kind::Completion { .. } => self.chunk(CompletionChunk::usage(head, usage)),
                Kind::Chat => self.chunk(ChatCompletionChunk::usage(head, usage)),
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
    owner: CancelOnDrop,
    meta: Meta,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, Infallible>> + Send {
    let state = Arc::new(Mutex::new(Streamed {
        meta,
        n,
        include_usage,
        owner,
        prompts,
        results: vec![None; ids.len()],
        opened: vec![false; ids.len()],
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

fn lock(state: &Mutex<Streamed>) -> std::sync::MutexGuard<'_, Streamed> {
    // Nothing panics while holding it; a poisoned lock still holds valid data.
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Rewrites this group's error responses into OpenAI's shape (`{"error": {message, type, param, code}}`,
/// invalid parameters as 400), from what [`ApiError`] recorded; headers (`Retry-After`, rate limits) stay.
pub async fn openai_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let Some(info) = response.extensions().get::<ErrorInfo>().cloned() else {
        return response;
    };
    let (mut parts, _) = response.into_parts();
    let param = info.param.as_deref().map(openai_param);
    let body = openai::error_body(parts.status, info.code, &info.message, param.as_deref());
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

/// Our parameter names as the OpenAI request spells them.
fn openai_param(ours: &str) -> String {
    openai::param_name(ours.strip_prefix("parameters.").unwrap_or(ours)).to_owned()
}
