//! `GET /v1/jobs/{id}/events`: a job's life as Server-Sent Events, from any replica.
//!
//! Events: `queued` (place in line and estimated wait, repeated as they change), `started`, `token` (the
//! text added and its token ids), then one final `succeeded`, `failed` or `cancelled` (or `expired`) whose
//! data is the job as `GET /v1/jobs/{id}` shows it; the stream then ends. Every `started`, `token` and final
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
use utoipa::IntoParams;

use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiQuery};
use crate::follow::{CancelOnDrop, Followed, follow};
use crate::routes::jobs::{owned, view};

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// The stream owns the job: when the client hangs up before the final event, the job is cancelled.
    #[serde(default)]
    pub cancel_on_disconnect: bool,
    /// Resume after this event id (what the `Last-Event-ID` header says, for clients that cannot set it).
    #[serde(default)]
    pub last_event_id: Option<String>,
}

/// How often a comment line keeps an idle stream open through proxies.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[utoipa::path(
    get, path = "/v1/jobs/{id}/events", tag = "jobs",
    params(
        ("id" = String, Path, format = Uuid, description = "Job id (UUID)"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id"),
        EventsQuery,
    ),
    responses(
        (status = 200, description = "text/event-stream: `queued`, `started`, `token` events, then the final one", content_type = "text/event-stream", body = crate::openapi::EventDoc),
        (status = 400, description = "Malformed id", body = crate::openapi::ErrorDoc),
        (status = 401, description = "Keys are on and the request has none, or a wrong one", body = crate::openapi::ErrorDoc),
        (status = 422, description = "Last-Event-ID is not an event id of this stream", body = crate::openapi::ErrorDoc),
        (status = 404, description = "Unknown id, or another key's job", body = crate::openapi::ErrorDoc),
        (status = 429, description = "Rate limited (Retry-After)", body = crate::openapi::ErrorDoc),
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
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(query.last_event_id)
        .unwrap_or_else(|| "0-0".to_owned());
    if !is_entry_id(&after) {
        return Err(ApiError::InvalidField {
            field: "Last-Event-ID".into(),
            message: format!(
                "`{}` is not an event id of this stream",
                after.chars().take(64).collect::<String>()
            ),
        });
    }
    let id = record.id;
    let mut guard = CancelOnDrop::new(
        &app,
        vec![id],
        query.cancel_on_disconnect && !record.status.is_final(),
    );
    let stream = follow(app, id, after).map(move |followed| {
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
