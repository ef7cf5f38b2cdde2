//! The process that moves batches along: validation, expansion into jobs in bounded slices, and
//! finalization into output and error files.
//!
//! Every replica runs [`run`]; a batch is driven by the one replica holding its lease in Redis, renewed as it
//! works, so a replica that dies leaves the batch to another once the lease lapses. Everything a driver does
//! can be done again by the next one with the same result:
//! - expansion reads the input from a cursor (line and byte offset) kept in Redis, a slice at a time, so
//!   neither the file nor the queue ever holds more than `--batch-slice` of a batch's lines at once; each
//!   job's id and `Idempotency-Key` derive from the batch, line and choice ([`crate::batch_lines`]), so a
//!   line submitted again after a crash names the jobs it already has instead of adding new ones;
//! - a line ending is counted by a script that removes it from the in-flight set first, so it counts once;
//! - finalization writes the output and error files from the input and the jobs' records, each file in one
//!   piece under an id derived from the batch, then moves the batch to its final status: a finalization cut
//!   short is simply done again, and its files replace the half-done ones, one line per `custom_id`.

use std::collections::{HashMap, HashSet};

use sha2::{Digest, Sha256};
use shared::reply::now_ms;
use shared::{ErrorBody, ErrorCode, Lane};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::app::{App, AppState};
use crate::auth::Caller;
use crate::batch_lines::{
    self, LineError, LineReader, OutputLine, RawLine, ReadError, error_response, job_id, parse_line,
};
use crate::batches::{BatchState, BatchStatus, Ending, InFlight, Slice};
use crate::error::ApiError;
use crate::files::{FileError, FileObject, PURPOSE_BATCH, PURPOSE_BATCH_OUTPUT};
use crate::kv::RedisError;
use crate::openai::{Head, chat_completion_id, completion_id, service_tier};
use crate::openai_jobs::{Kind, Meta, answer};
use crate::store::{JobRecord, Status};
use crate::telemetry as m;

/// Why a driver's step failed (it is tried again at the next poll).
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error(transparent)]
    Files(#[from] FileError),
    #[error("input: {0}")]
    Read(#[from] ReadError),
    #[error("{0}")]
    Api(ApiError),
}

/// Most errors a failed batch lists.
const MAX_ERRORS: usize = 100;

/// Lines read together in finalization (their records fetched together).
const FINALIZE_CHUNK: usize = 64;

/// Drives the namespace's batches from this replica until `cancel`.
pub async fn run(app: AppState, cancel: CancellationToken) {
    let holder = uuid::Uuid::new_v4().to_string();
    let mut driving: HashMap<String, JoinHandle<()>> = HashMap::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(app.settings.batch.poll) => {}
        }
        driving.retain(|_, task| !task.is_finished());
        let ids = match app.batches.active().await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list the active batches");
                continue;
            }
        };
        for id in ids {
            if driving.contains_key(&id) {
                continue;
            }
            if let Ok(true) = app.batches.lease(&id, &holder, app.settings.batch.lease).await {
                tracing::info!(batch = %id, "driving batch");
                let task = tokio::spawn(drive(app.clone(), id.clone(), holder.clone(), cancel.clone()));
                driving.insert(id, task);
            }
        }
    }
    for (_, task) in driving {
        let _ = task.await;
    }
}

/// Drives one batch while this replica holds its lease.
async fn drive(app: AppState, id: String, holder: String, cancel: CancellationToken) {
    let settings = app.settings.batch.clone();
    loop {
        match app.batches.lease(&id, &holder, settings.lease).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(batch = %id, "lost the batch's lease; another replica drives it");
                return;
            }
            Err(e) => tracing::debug!(batch = %id, error = %e, "cannot renew the batch's lease"),
        }
        let outcome = tokio::select! {
            _ = cancel.cancelled() => break,
            _ = keep_lease(&app, &id, &holder) => {
                tracing::warn!(batch = %id, "lost the batch's lease mid-step; another replica drives it");
                return;
            }
            outcome = step(&app, &id) => outcome,
        };
        match outcome {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => tracing::warn!(batch = %id, error = %e, "batch step failed; trying again"),
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(settings.poll) => {}
        }
    }
    if let Err(e) = app.batches.release(&id, &holder).await {
        tracing::debug!(batch = %id, error = %e, "cannot release the batch's lease");
    }
}

/// Renews the lease through a long step; returns only when it is lost.
async fn keep_lease(app: &App, id: &str, holder: &str) {
    let lease = app.settings.batch.lease;
    loop {
        tokio::time::sleep(lease / 3).await;
        if let Ok(false) = app.batches.lease(id, holder, lease).await {
            return;
        }
    }
}

/// One step of batch `id`; true when the batch has ended.
async fn step(app: &App, id: &str) -> Result<bool, DriveError> {
    let Some(state) = app.batches.get(id).await? else {
        // Gone (deleted by hand): nothing to drive.
        app.batches.forget_active(id).await?;
        return Ok(true);
    };
    match state.batch.status {
        BatchStatus::Validating => validate(app, &state).await,
        BatchStatus::InProgress => progress(app, &state).await,
        BatchStatus::Finalizing | BatchStatus::Cancelling => finish(app, &state).await,
        _ => Ok(true),
    }
}

/// Moves a batch to `failed`, listing `errors`.
async fn fail(app: &App, state: &BatchState, errors: Vec<LineError>) -> Result<bool, DriveError> {
    let errors =
        serde_json::to_string(&errors).map_err(|e| DriveError::Api(ApiError::Internal(e.to_string())))?;
    let moved = app
        .batches
        .transition(
            &state.batch.id,
            &[
                BatchStatus::Validating,
                BatchStatus::Finalizing,
                BatchStatus::Cancelling,
            ],
            BatchStatus::Failed,
            &[("errors", errors)],
        )
        .await?;
    if moved {
        tracing::info!(batch = %state.batch.id, "batch failed");
        metrics::counter!(m::BATCHES, "status" => BatchStatus::Failed.as_str()).increment(1);
    }
    app.batches.forget_progress(&state.batch.id).await?;
    Ok(true)
}

/// The batch's input file, or why it cannot be used.
async fn input(app: &App, state: &BatchState) -> Result<Result<FileObject, LineError>, DriveError> {
    let id = &state.batch.input_file_id;
    match app.files.get(&state.owner, id).await {
        Ok(file) if file.purpose == PURPOSE_BATCH => Ok(Ok(file)),
        Ok(file) => Ok(Err(LineError::new(
            "invalid_file",
            format!(
                "file {id} has purpose {:?}; a batch's input must have purpose `batch`",
                file.purpose
            ),
            Some("input_file_id".into()),
            None,
        ))),
        Err(FileError::NotFound) => Ok(Err(LineError::new(
            "invalid_file",
            format!("no file {id}"),
            Some("input_file_id".into()),
            None,
        ))),
        Err(e) => Err(e.into()),
    }
}

async fn lines_from(
    app: &App,
    state: &BatchState,
    line: u64,
    byte: u64,
) -> Result<LineReader<impl tokio::io::AsyncBufRead + Unpin + Send>, DriveError> {
    let reader = app.files.reader_from(&state.batch.input_file_id, byte).await?;
    Ok(LineReader::new(
        reader,
        line,
        byte,
        app.settings.batch.max_line_bytes,
    ))
}

/// `validating`: every line read and checked, without the file ever held whole; the batch goes
/// `in_progress`, or `failed` naming the lines at fault.
async fn validate(app: &App, state: &BatchState) -> Result<bool, DriveError> {
    let file = match input(app, state).await? {
        Ok(file) => file,
        Err(error) => return fail(app, state, vec![error]).await,
    };
    let settings = &app.settings;
    let mut errors = Vec::new();
    let mut custom_ids = HashSet::new();
    let mut total = 0u64;
    let mut lines = if file.bytes == 0 {
        None
    } else {
        Some(lines_from(app, state, 0, 0).await?)
    };
    while let Some(reader) = lines.as_mut() {
        let raw = match reader.next().await {
            Ok(Some(raw)) => raw,
            Ok(None) => break,
            Err(ReadError::Io(e)) => return Err(DriveError::Read(ReadError::Io(e))),
            Err(e @ (ReadError::TooLong { number, .. } | ReadError::NotUtf8 { number })) => {
                errors.push(LineError::new("invalid_file", e.to_string(), None, Some(number)));
                break;
            }
        };
        total += 1;
        if total > settings.batch.max_requests {
            errors.push(LineError::new(
                "too_many_requests",
                format!("a batch holds at most {} requests", settings.batch.max_requests),
                None,
                Some(raw.number()),
            ));
            break;
        }
        match parse_line(
            &raw.text,
            raw.number(),
            state.batch.endpoint,
            &settings.served_model_name,
            &settings.prompts.openai,
        ) {
            Ok((line, _)) => {
                if !custom_ids.insert(line.custom_id.clone()) {
                    errors.push(LineError::new(
                        "duplicate_custom_id",
                        format!(
                            "line {}: custom_id {:?} is used by an earlier line",
                            raw.number(),
                            line.custom_id
                        ),
                        Some("custom_id".into()),
                        Some(raw.number()),
                    ));
                }
            }
            Err(e) => errors.push(e),
        }
        if errors.len() >= MAX_ERRORS {
            break;
        }
    }
    if total == 0 && errors.is_empty() {
        errors.push(LineError::new(
            "empty_file",
            "the input file holds no requests",
            None,
            None,
        ));
    }
    if !errors.is_empty() {
        return fail(app, state, errors).await;
    }
    app.batches
        .transition(
            &state.batch.id,
            &[BatchStatus::Validating],
            BatchStatus::InProgress,
            &[
                ("total", total.to_string()),
                ("input_bytes", file.bytes.to_string()),
            ],
        )
        .await?;
    Ok(false)
}

/// `in_progress`: counts the lines whose jobs ended, submits the next slice, and moves the batch on when
/// every line has ended or its window has.
async fn progress(app: &App, state: &BatchState) -> Result<bool, DriveError> {
    let id = &state.batch.id;
    if state.batch.expires_at.is_some_and(|at| now_ms() / 1000 >= at) {
        app.batches.finalize(id, Ending::Expired).await?;
        return Ok(false);
    }
    let mut still = 0;
    for line in app.batches.in_flight(id).await? {
        match line_outcome(app, id, line).await? {
            Some(succeeded) => app.batches.finish_line(id, line, succeeded).await?,
            None => still += 1,
        }
    }
    let mut expanded = state.expanded;
    if !expanded && still < app.settings.batch.slice {
        let slice = expand(app, state, app.settings.batch.slice - still).await?;
        still += slice.submitted.len();
        expanded = slice.expanded;
    }
    if expanded && still == 0 && app.batches.in_flight(id).await?.is_empty() {
        app.batches.finalize(id, Ending::Completed).await?;
    }
    Ok(false)
}

/// Whether a line's jobs all ended (`Some`), and all succeeded (`Some(true)`).
async fn line_outcome(app: &App, batch: &str, line: InFlight) -> Result<Option<bool>, DriveError> {
    let mut succeeded = true;
    for record in records(app, batch, line).await? {
        match record.map(|r| r.status) {
            Some(Status::Succeeded) => {}
            Some(status) if !status.is_final() => return Ok(None),
            _ => succeeded = false,
        }
    }
    Ok(Some(succeeded))
}

async fn records(app: &App, batch: &str, line: InFlight) -> Result<Vec<Option<JobRecord>>, DriveError> {
    let gets = (0..line.jobs).map(|choice| app.store.get(job_id(batch, line.line, choice)));
    let records = futures::future::try_join_all(gets).await?;
    Ok(records.into_iter().map(|r| r.map(|(record, _)| record)).collect())
}

/// Submits up to `room` lines from the cursor on and records what it did.
async fn expand(app: &App, state: &BatchState, room: usize) -> Result<Slice, DriveError> {
    let id = &state.batch.id;
    let mut slice = Slice {
        cursor_line: state.cursor_line,
        cursor_byte: state.cursor_byte,
        ..Slice::default()
    };
    let input_bytes = app.batches.input_bytes(id).await?.unwrap_or(u64::MAX);
    if state.cursor_byte >= input_bytes {
        slice.expanded = true;
        app.batches.commit(id, &slice).await?;
        return Ok(slice);
    }
    let caller = Caller::from_token(&state.caller)
        .ok_or_else(|| RedisError::Corrupt(format!("batch {id}'s caller {:?}", state.caller)))?;
    let mut lines = lines_from(app, state, state.cursor_line, state.cursor_byte).await?;
    while slice.submitted.len() + slice.refused.len() < room {
        let Some(raw) = lines.next().await? else {
            slice.expanded = true;
            break;
        };
        match submit(app, state, &caller, &raw).await? {
            Submitted::Jobs(jobs) => slice.submitted.push(InFlight {
                line: raw.index,
                jobs,
            }),
            Submitted::Refused(output) => slice.refused.push((raw.index, output)),
            Submitted::Later => break,
        }
        slice.cursor_line = raw.index + 1;
        slice.cursor_byte = raw.end;
    }
    if slice.cursor_byte >= input_bytes {
        slice.expanded = true;
    }
    app.batches.commit(id, &slice).await?;
    Ok(slice)
}

/// What became of one line's submission.
enum Submitted {
    /// Its jobs are queued (or were already).
    Jobs(usize),
    /// Refused for good: its error-file line, as JSON.
    Refused(String),
    /// The owner's limits (or the queue's) refuse it for now: it is tried again next time.
    Later,
}

/// Submits one line's jobs on the batch lane as the batch's owner, under ids and `Idempotency-Key`s
/// derived from the line, so that submitting it again changes nothing.
async fn submit(
    app: &App,
    state: &BatchState,
    caller: &Caller,
    raw: &RawLine,
) -> Result<Submitted, DriveError> {
    let batch = &state.batch.id;
    let settings = &app.settings;
    let refused = |custom_id: String, e: &ApiError| {
        let (status, body) = error_response(e);
        let line = OutputLine::answered(batch, raw.index, custom_id, status, body);
        Submitted::Refused(serde_json::to_string(&line).unwrap_or_default())
    };
    let (line, plan) = match parse_line(
        &raw.text,
        raw.number(),
        state.batch.endpoint,
        &settings.served_model_name,
        &settings.prompts.openai,
    ) {
        Ok(parsed) => parsed,
        Err(e) => {
            let custom_id = serde_json::from_str::<serde_json::Value>(&raw.text)
                .ok()
                .and_then(|v| v.get("custom_id").and_then(|c| c.as_str()).map(str::to_owned))
                .unwrap_or_default();
            let e = ApiError::InvalidField {
                field: e.param.unwrap_or_else(|| "body".into()),
                message: e.message,
            };
            return Ok(refused(custom_id, &e));
        }
    };
    let jobs = plan.jobs.len();
    // Each job runs on the batch lane, and not after the batch's window: one still queued then fails
    // `deadline_exceeded` without running.
    let deadline_ms = state.batch.expires_at.unwrap_or(u64::MAX / 1000) * 1000;
    for (choice, job) in plan.jobs.into_iter().enumerate() {
        let id = job_id(batch, raw.index, choice);
        let key = batch_lines::idempotency_key(batch, raw.index, choice);
        let job = job.with_deadline(deadline_ms);
        let submitted = app
            .enqueue(id, job, &settings.prompts.openai, caller, Some(&key), Lane::Batch)
            .await;
        match submitted {
            Ok(_) => {}
            Err(e) if for_now(&e) => {
                tracing::debug!(batch = %batch, line = raw.number(), error = %e, "line refused for now");
                return Ok(Submitted::Later);
            }
            Err(e) => {
                for earlier in 0..choice {
                    if let Err(e) = app.cancel(job_id(batch, raw.index, earlier)).await {
                        return Err(DriveError::Api(e));
                    }
                }
                return Ok(refused(line.custom_id, &e));
            }
        }
    }
    Ok(Submitted::Jobs(jobs))
}

/// Whether a refusal passes with time: the owner's limits, a full queue, a dependency down.
fn for_now(e: &ApiError) -> bool {
    matches!(
        e,
        ApiError::RateLimited(_)
            | ApiError::TooManyActiveJobs(_)
            | ApiError::TokensSpent { .. }
            | ApiError::QueueFull { .. }
            | ApiError::Unavailable { .. }
    )
}

/// The id of a batch's output (`output`) or error (`error`) file: the same every time it is written.
pub fn output_file_id(batch: &str, which: &str) -> String {
    let digest = Sha256::digest(format!("{batch}/{which}").as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("file-{hex}")
}

/// `finalizing` or `cancelling`: cancels what is still in flight when the batch ends early, writes the
/// output and error files, and ends the batch.
async fn finish(app: &App, state: &BatchState) -> Result<bool, DriveError> {
    let batch = &state.batch;
    let ending = match batch.status {
        BatchStatus::Cancelling => Ending::Cancelled,
        _ => state.ending.unwrap_or(Ending::Completed),
    };
    if ending != Ending::Completed {
        for line in app.batches.in_flight(&batch.id).await? {
            for choice in 0..line.jobs {
                app.cancel(job_id(&batch.id, line.line, choice))
                    .await
                    .map_err(DriveError::Api)?;
            }
        }
    }
    if let Err(error) = input(app, state).await? {
        return fail(app, state, vec![error]).await;
    }
    let (output_id, error_id) = (
        output_file_id(&batch.id, "output"),
        output_file_id(&batch.id, "error"),
    );
    let mut output = app.files.writer(&output_id);
    let mut errors = app.files.writer(&error_id);
    let written = write_outputs(app, state, ending, &mut output, &mut errors).await;
    let (counts, bytes) = match written {
        Ok(written) => written,
        Err(e) => {
            let _ = output.abort().await;
            let _ = errors.abort().await;
            return Err(e);
        }
    };
    output.shutdown().await.map_err(FileError::from)?;
    if counts.1 > 0 {
        errors.shutdown().await.map_err(FileError::from)?;
    } else {
        let _ = errors.abort().await;
    }
    if !app.settings.batch.finalize_hold.is_zero() {
        tracing::warn!(batch = %batch.id, hold = ?app.settings.batch.finalize_hold, "holding finalization (fault-test hook)");
        tokio::time::sleep(app.settings.batch.finalize_hold).await;
    }
    let describe = |id: &str, which: &str, size: u64| FileObject {
        id: id.to_owned(),
        object: "file".into(),
        bytes: size,
        created_at: now_ms() / 1000,
        filename: format!("{}_{which}.jsonl", batch.id),
        purpose: PURPOSE_BATCH_OUTPUT.into(),
        status: "processed".into(),
        status_details: None,
    };
    app.files
        .describe(&state.owner, &describe(&output_id, "output", bytes.0))
        .await?;
    let mut fields = vec![
        ("output_file_id", output_id.clone()),
        ("completed", counts.0.to_string()),
        ("failed", counts.1.to_string()),
        ("total", (counts.0 + counts.1).to_string()),
    ];
    if counts.1 > 0 {
        app.files
            .describe(&state.owner, &describe(&error_id, "error", bytes.1))
            .await?;
        fields.push(("error_file_id", error_id));
    }
    let moved = app
        .batches
        .transition(
            &batch.id,
            &[BatchStatus::Finalizing, BatchStatus::Cancelling],
            ending.status(),
            &fields,
        )
        .await?;
    if moved {
        tracing::info!(batch = %batch.id, status = ending.status().as_str(), "batch ended");
        metrics::counter!(m::BATCHES, "status" => ending.status().as_str()).increment(1);
        metrics::counter!(m::BATCH_REQUESTS, "outcome" => "answered").increment(counts.0);
        metrics::counter!(m::BATCH_REQUESTS, "outcome" => "failed").increment(counts.1);
    }
    app.batches.forget_progress(&batch.id).await?;
    Ok(true)
}

/// Writes one line per request, in the input's order, into the output file (answered) or the error file
/// (refused, failed, never run); returns the counts and sizes of each.
async fn write_outputs(
    app: &App,
    state: &BatchState,
    ending: Ending,
    output: &mut object_store::buffered::BufWriter,
    errors: &mut object_store::buffered::BufWriter,
) -> Result<((u64, u64), (u64, u64)), DriveError> {
    let mut counts = (0u64, 0u64);
    let mut bytes = (0u64, 0u64);
    let mut lines = lines_from(app, state, 0, 0).await?;
    let mut done = false;
    while !done {
        let mut chunk = Vec::with_capacity(FINALIZE_CHUNK);
        while chunk.len() < FINALIZE_CHUNK {
            match lines.next().await? {
                Some(raw) => chunk.push(raw),
                None => {
                    done = true;
                    break;
                }
            }
        }
        let indices: Vec<u64> = chunk.iter().map(|raw| raw.index).collect();
        let refused = app.batches.refused(&state.batch.id, &indices).await?;
        let outputs = futures::future::try_join_all(
            chunk
                .iter()
                .zip(refused)
                .map(|(raw, refused)| output_line(app, state, ending, raw, refused)),
        )
        .await?;
        for (answered, line) in outputs.into_iter().flatten() {
            let mut text = line.into_bytes();
            text.push(b'\n');
            if answered {
                counts.0 += 1;
                bytes.0 += text.len() as u64;
                output.write_all(&text).await.map_err(FileError::from)?;
            } else {
                counts.1 += 1;
                bytes.1 += text.len() as u64;
                errors.write_all(&text).await.map_err(FileError::from)?;
            }
        }
    }
    Ok((counts, bytes))
}

/// One request's line: `(true, line)` for the output file, `(false, line)` for the error file; `None` for a
/// line without even a `custom_id` (only a batch cancelled while validating has those).
async fn output_line(
    app: &App,
    state: &BatchState,
    ending: Ending,
    raw: &RawLine,
    refused: Option<String>,
) -> Result<Option<(bool, String)>, DriveError> {
    if let Some(refused) = refused {
        return Ok(Some((false, refused)));
    }
    let batch = &state.batch;
    let settings = &app.settings;
    let parsed = parse_line(
        &raw.text,
        raw.number(),
        batch.endpoint,
        &settings.served_model_name,
        &settings.prompts.openai,
    );
    let Ok((line, plan)) = parsed else {
        return Ok(None);
    };
    let never_ran = || {
        let (code, message) = match ending {
            Ending::Cancelled => (
                "batch_cancelled",
                "This request was not run: its batch was cancelled.",
            ),
            _ => (
                "batch_expired",
                "This request could not be executed before the completion window expired.",
            ),
        };
        OutputLine::never_ran(&batch.id, raw.index, line.custom_id.clone(), code, message)
    };
    let to_json = |line: OutputLine| serde_json::to_string(&line).unwrap_or_default();
    if raw.index >= state.cursor_line {
        return Ok(Some((false, to_json(never_ran()))));
    }
    let in_flight = InFlight {
        line: raw.index,
        jobs: plan.jobs.len(),
    };
    let records = records(app, &batch.id, in_flight).await?;
    let mut finished = Vec::with_capacity(records.len());
    for record in records {
        let failure = match record {
            Some(record) if record.status == Status::Succeeded => {
                finished.push(record);
                continue;
            }
            Some(record)
                if ending != Ending::Completed
                    && matches!(
                        record.status,
                        Status::Cancelled | Status::Queued | Status::Running
                    ) =>
            {
                return Ok(Some((false, to_json(never_ran()))));
            }
            Some(record) => record.error.unwrap_or_else(|| {
                ErrorBody::new(
                    ErrorCode::Internal,
                    format!("the request ended {}", record.status.as_str()),
                )
            }),
            None => ErrorBody::new(ErrorCode::Expired, "the request's result is no longer kept"),
        };
        let (status, body) = error_response(&ApiError::JobFailed(failure));
        let line = OutputLine::answered(&batch.id, raw.index, line.custom_id, status, body);
        return Ok(Some((false, to_json(line))));
    }
    let first = job_id(&batch.id, raw.index, 0);
    let created = finished
        .iter()
        .filter_map(|r| r.finished_at_ms)
        .max()
        .unwrap_or_else(now_ms)
        / 1000;
    let meta = Meta {
        head: Head {
            id: match plan.kind {
                Kind::Chat { .. } => chat_completion_id(&first),
                Kind::Completion { .. } => completion_id(&first),
            },
            created,
            model: settings.served_model_name.clone(),
            service_tier: service_tier(Lane::Batch),
        },
        kind: plan.kind,
    };
    let body = answer(&meta, &app.vocabulary, plan.n, finished).map_err(DriveError::Api)?;
    let line = OutputLine::answered(&batch.id, raw.index, line.custom_id, 200, body);
    Ok(Some((true, to_json(line))))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_batchs_output_files_have_the_same_ids_every_time() {
        assert_eq!(
            super::output_file_id("batch_a", "output"),
            super::output_file_id("batch_a", "output")
        );
        assert_ne!(
            super::output_file_id("batch_a", "output"),
            super::output_file_id("batch_a", "error")
        );
        assert!(super::output_file_id("batch_a", "output").starts_with("file-"));
    }

    #[test]
    fn the_endpoints_are_openais_paths() {
        assert_eq!(
            serde_json::to_value(crate::batch_lines::Endpoint::ChatCompletions).unwrap(),
            "/v1/chat/completions"
        );
    }
}
