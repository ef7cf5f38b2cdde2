//! `GET /v1/jobs/{id}/events`: a job's life as Server-Sent Events, from any replica.
//!
//! Events: `queued` (place in line and estimated wait, repeated as they change), `started`, `token` (the
//! text added, its token ids, and their `logprobs` when the job asked), then one final `succeeded`,
//! `failed` or `cancelled` (or `expired`) whose data is the job as `GET /v1/jobs/{id}` shows it; the stream
//! then ends. Every `started`, `token` and final
//! event has the id of its entry in the job's event log, so a client that reconnects with `Last-Event-ID`
//! gets exactly the events after it: nothing lost, nothing repeated. `queued` events have no id (they are
//! not in the log; the browser's `EventSource` keeps the last id it had).

use std::convert::Infallible;
use std::time::Duration;

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiQuery, ErrorResponse};
use crate::follow::{CancelOnDrop, Followed, follow};
use crate::routes::jobs::{owned, view};
use crate::waiters::Follow;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// The stream owns the job: when the client hangs up before the final event, the job is cancelled.
    #[serde(default)]
    pub cancel_on_disconnect: bool,
    /// Resume after this event id (what the `Last-Event-ID` header says, for clients that cannot set it).
    #[serde(default)]
    #[param(nullable = false, pattern = r"^[0-9]{1,20}-[0-9]{1,20}$")]
    pub last_event_id: Option<String>,
}

/// One Server-Sent Event of the stream, for the document: axum's `Event` writes the events and has no
/// schema, so this says what their fields carry.
#[derive(ToSchema)]
#[allow(dead_code)] // documentation only
pub struct StreamEvent {
    /// The event's entry in the job's log (`MILLIS-SEQ`); absent on `queued` and `gone` events.
    id: Option<String>,
    /// `queued`, `started`, `token`, `succeeded`, `failed`, `cancelled`, `expired` or `gone`.
    event: String,
    /// JSON: the place in line, the start, the token chunk, or (final events) the job as a poll shows it.
    data: String,
}

/// How often a comment line keeps an idle stream open through proxies.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[utoipa::path(
    get, path = "/v1/jobs/{id}/events", tag = "jobs",
    params(
        ("id" = String, Path, format = Uuid, description = "Job id (UUID)"),
        ("Last-Event-ID" = Option<String>, Header, nullable = false, pattern = r"^[0-9]{1,20}-[0-9]{1,20}$",
            description = "Resume after this event id (`MILLIS-SEQ`, as an event's `id` gave it)"),
        EventsQuery,
    ),
    responses(
        (status = 200, description = "text/event-stream: `queued`, `started`, `token` events, then the final one", content_type = "text/event-stream", body = StreamEvent),
        (status = 400, description = "Malformed id", body = ErrorResponse),
        (status = 401, description = "Keys are on and the request has none, or a wrong one", body = ErrorResponse),
        (status = 422, description = "Last-Event-ID (or last_event_id) is not an event id of this stream", body = ErrorResponse),
        (status = 404, description = "Unknown id, or another key's job", body = ErrorResponse),
        (status = 429, description = "Rate limited (Retry-After), or the client holds as many streams as it may", body = ErrorResponse),
    ),
    security((), ("api_key" = []))
)]
pub async fn events(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<EventsQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let (record, _) = owned(&app, &caller, &id).await?;
    let slot = app
        .waiters
        .slot(Follow::Stream, &caller.id, app.settings.max_streams_per_client)?;
    // Either resume point, when given, must be one; the header wins over the query when both are.
    let header = headers
        .get("last-event-id")
        .map(|v| resume_point("Last-Event-ID", v.to_str().unwrap_or("")))
        .transpose()?;
    let in_query = query
        .last_event_id
        .as_deref()
        .map(|v| resume_point("last_event_id", v))
        .transpose()?;
    let after = header.or(in_query).unwrap_or_else(|| "0-0".to_owned());
    let id = record.id;
    let mut guard = CancelOnDrop::new(
        &app,
        vec![id],
        query.cancel_on_disconnect && !record.status.is_final(),
    );
    let stream = follow(app, id, after).map(move |followed| {
        // Held as long as the stream is.
        let _slot = &slot;
        let event = match followed {
            Followed::Queued(p) => Event::default().event("queued").json_data(p),
            Followed::Entry(entry) => Ok(Event::default().id(entry.id).event(entry.event).data(entry.data)),
            Followed::Final { record, entry_id } => {
                guard.disarm();
                let status = record.status.as_str();
                let event = match entry_id {
                    Some(eid) => Event::default().id(eid),
                    None => Event::default(),
                };
                event.event(status).json_data(view(*record, None))
            }
            Followed::Gone => {
                guard.disarm();
                Ok(Event::default().event("gone").data("{}"))
            }
        };
        Ok(event.unwrap_or_else(|e| Event::default().event("error").data(e.to_string())))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// `value` as a place to resume the stream after, or the error naming `field`.
fn resume_point(field: &str, value: &str) -> Result<String, ApiError> {
    if is_entry_id(value) {
        Ok(value.to_owned())
    } else {
        Err(ApiError::InvalidField {
            field: field.into(),
            message: format!(
                "`{}` is not an event id of this stream",
                value.chars().take(64).collect::<String>()
            ),
        })
    }
}

/// A Redis stream entry id: `MILLIS-SEQ`.
fn is_entry_id(s: &str) -> bool {
    match s.split_once('-') {
        Some((ms, seq)) => {
            !ms.is_empty()
                && !seq.is_empty()
                && ms.len() <= 20
                && seq.len() <= 20
                && ms.bytes().all(|b| b.is_ascii_digit())
                && seq.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_log_entry_ids_are_accepted_as_resume_points() {
        assert!(super::is_entry_id("1733000000000-0"));
        assert!(super::is_entry_id("0-0"));
        assert!(!super::is_entry_id("abc"));
        assert!(!super::is_entry_id("1-"));
        assert!(!super::is_entry_id("1-2-3"));
    }
}
