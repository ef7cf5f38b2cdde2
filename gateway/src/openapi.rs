//! The OpenAPI 3.1 document: paths and gateway types from utoipa, and the job contract's types
//! (`GenerationParameters` and what it refers to) from the shared crate's JSON Schemas, so the document
//! cannot drift from what the gateway actually parses.

use schemars::generate::SchemaSettings;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Ref, RefOr, Schema};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::routes;

/// `{code, message}` (plus `job_id` on a `/run` timeout); `code` is one of the stable codes in
/// `docs/schema/job-reply.schema.json`'s `ErrorCode`.
#[derive(ToSchema)]
#[allow(dead_code)] // documentation only; the body is built from shared::ErrorBody
pub struct ErrorDoc {
    /// Stable machine-readable code, e.g. `invalid_json`, `prompt_too_long`, `rate_limited`.
    code: String,
    /// Readable explanation.
    message: String,
    /// Only on a `/run` timeout: the job to poll.
    job_id: Option<String>,
}

/// One Server-Sent Event of a job's stream (`GET /v1/jobs/{id}/events`).
#[derive(ToSchema)]
#[allow(dead_code)] // documentation only; events are written by axum's Sse
pub struct EventDoc {
    /// The event's entry in the job's log; absent on `queued` events.
    id: Option<String>,
    /// `queued`, `started`, `token`, `succeeded`, `failed`, `cancelled`, `expired` or `gone`.
    event: String,
    /// JSON: the place in line, the start, the token chunk, or (final events) the job as a poll shows it.
    data: String,
}

/// Schema reference used for the `parameters` field.
pub fn generation_parameters() -> RefOr<Schema> {
    RefOr::Ref(Ref::from_schema_name("GenerationParameters"))
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "GPT-J gateway", description = "Queue text-generation jobs, poll them, stream their tokens, cancel them, or wait with /run; OpenAI-compatible completions and chat."),
    paths(
        routes::jobs::submit, routes::jobs::get_job, routes::jobs::cancel, routes::events::events,
        routes::run::run, routes::queue::queue,
        routes::openai::completions, routes::openai::chat_completions, routes::openai::models,
        routes::ops::healthz, routes::ops::readyz, routes::ops::metrics,
    ),
    components(schemas(
        routes::jobs::SubmitRequest, routes::jobs::JobAccepted, routes::jobs::JobView,
        routes::jobs::CancelResult, crate::position::QueuePosition,
        routes::run::OriginalRun, routes::queue::QueueView, ErrorDoc, EventDoc
    )),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

/// The whole document as JSON; the OpenAI requests' `model` is the one name this gateway serves.
pub fn document(served_model_name: &str) -> serde_json::Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "/components/schemas/".into())
        .into_generator();
    let params = generator.subschema_for::<shared::GenerationParameters>();
    let mut defs = generator.take_definitions(true);
    // A type with its own definition comes back as a reference; keep the definition itself.
    if params.as_value().get("$ref").is_none() {
        defs.insert("GenerationParameters".into(), params.to_value());
    }
    if let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(serde_json::Value::as_object_mut)
    {
        for (name, schema) in defs {
            schemas.entry(name).or_insert(schema);
        }
        for request in ["CompletionRequest", "ChatCompletionRequest"] {
            if let Some(model) = schemas
                .get_mut(request)
                .and_then(|s| s.pointer_mut("/properties/model"))
                .and_then(serde_json::Value::as_object_mut)
            {
                model.insert("enum".into(), serde_json::json!([served_model_name]));
            }
        }
    }
    doc
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_reference_in_the_document_resolves() {
        let doc = super::document("gpt-j");
        assert_eq!(
            doc.pointer("/components/schemas/CompletionRequest/properties/model/enum"),
            Some(&serde_json::json!(["gpt-j"])),
            "the served model is the one value `model` takes"
        );
        let text = doc.to_string();
        assert!(
            doc.pointer("/components/schemas/GenerationParameters").is_some(),
            "{text}"
        );
        for part in text.split("\"$ref\":\"#/").skip(1) {
            let path = part.split('"').next().unwrap();
            assert!(
                doc.pointer(&format!("/{path}")).is_some(),
                "dangling $ref #/{path}"
            );
        }
    }
}
