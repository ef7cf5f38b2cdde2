//! The OpenAPI 3.1 document: paths and the gateway's own types from utoipa, and the job contract's types
//! (`GenerationParameters` and what it refers to) from the shared crate's JSON Schemas (see
//! [`crate::contract_schema`]), so the document cannot drift from what the gateway actually parses.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes;

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
    info(title = "GPT-J gateway", description = "Queue text-generation jobs, poll them, stream their tokens, cancel them, or wait with /run; OpenAI-compatible completions and chat, and OpenAI's Batch API."),
    paths(
        routes::jobs::submit, routes::jobs::get_job, routes::jobs::cancel, routes::events::events,
        routes::run::run, routes::queue::queue,
        routes::openai::completions, routes::openai::chat_completions, routes::openai::models,
        routes::openai::model,
        routes::files::upload, routes::files::list, routes::files::get, routes::files::content,
        routes::files::delete,
        routes::batches::create, routes::batches::list, routes::batches::get, routes::batches::cancel,
        routes::ops::healthz, routes::ops::readyz, routes::ops::health, routes::ops::metrics,
    ),
    components(schemas(
        routes::jobs::SubmitRequest, routes::jobs::JobAccepted, routes::jobs::JobView,
        routes::jobs::CancelResult, crate::position::QueuePosition,
        routes::run::OriginalRun, routes::queue::QueueView, crate::error::ErrorResponse,
        routes::events::StreamEvent
    )),
    tags((name = "batch", description = "OpenAI's Batch API: upload a JSONL file of requests, run it as a batch on the batch lane, read its output file")),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

/// The whole document as JSON; the OpenAI requests' `model` is the one name this gateway serves.
pub fn document(served_model_name: &str) -> serde_json::Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    if let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(serde_json::Value::as_object_mut)
    {
        for (name, schema) in crate::contract_schema::definitions() {
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
    fn every_route_that_reads_x_request_timeout_documents_it() {
        let doc = super::document("gpt-j");
        for path in ["/v1/jobs", "/v1/completions", "/v1/chat/completions"] {
            let params = doc["paths"][path]["post"]["parameters"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let header = params
                .iter()
                .find(|p| p["name"] == "X-Request-Timeout")
                .unwrap_or_else(|| panic!("{path}: {params:?}"));
            assert_eq!(header["in"], "header", "{path}");
            // A header is text: it has no null, so the schema must not offer one.
            assert_eq!(header["schema"]["type"], "number", "{path}: {header}");
            assert_eq!(header["schema"]["exclusiveMinimum"], 0.0, "{path}: {header}");
        }
    }

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

    #[test]
    fn the_contracts_types_are_described_by_the_contracts_own_schemas() {
        let doc = super::document("gpt-j");
        for (path, name) in [
            ("SubmitRequest/properties/parameters", "GenerationParameters"),
            ("SubmitRequest/properties/messages", "ChatMessage"),
            ("ChatCompletionRequest/properties/messages", "ChatMessage"),
            ("CompletionRequest/properties/strategy", "Strategy"),
            ("JobView/properties/error", "ErrorBody"),
            ("JobResult/properties/finish_reason", "FinishReason"),
            ("ErrorResponse/properties/code", "ErrorCode"),
            ("OpenAiErrorDetail/properties/code", "ErrorCode"),
        ] {
            let schema = doc
                .pointer(&format!("/components/schemas/{path}"))
                .map(serde_json::Value::to_string)
                .unwrap_or_default();
            assert!(
                schema.contains(&format!("\"#/components/schemas/{name}\"")),
                "{path} should refer to {name}: {schema}"
            );
        }
    }
}
