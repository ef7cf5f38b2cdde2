//! The job contract's types as the OpenAPI document shows them.
//!
//! The shared crate describes its types (generation parameters, chat messages, error codes, finish
//! reasons) with schemars; those schemas are the contract's own (`docs/schema/`). The gateway's types
//! derive utoipa's `ToSchema`, and where they hold a contract type they point at its schemars definition
//! by name, through the functions here, instead of mirroring it with a utoipa type that could drift from
//! it. [`definitions`] is what `openapi::document` adds to the document for those names to resolve.
//!
//! The route types and the document both import this module; it imports neither, so the document can
//! import the routes without the routes importing it back.

use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use shared::chat::{ChatMessage, MAX_MESSAGES};
use shared::{ErrorBody, ErrorCode, FinishReason, GenerationParameters, Lane, Strategy};
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
use utoipa::openapi::{Ref, RefOr, Schema};

/// The definitions of every contract type the gateway's types refer to, and of what those refer to,
/// keyed by their names under `#/components/schemas/`.
pub fn definitions() -> serde_json::Map<String, serde_json::Value> {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "/components/schemas/".into())
        .into_generator();
    let roots = [
        root::<GenerationParameters>(&mut generator),
        root::<Strategy>(&mut generator),
        root::<ChatMessage>(&mut generator),
        root::<ErrorBody>(&mut generator),
        root::<ErrorCode>(&mut generator),
        root::<FinishReason>(&mut generator),
        root::<Lane>(&mut generator),
    ];
    let mut defs = generator.take_definitions(true);
    for (name, schema) in roots.into_iter().flatten() {
        defs.entry(name).or_insert(schema);
    }
    defs
}

/// `T`'s schema, kept under its own name when schemars inlined it instead of defining it (a type with a
/// definition comes back as a reference, and its definition is among the generator's).
fn root<T: JsonSchema>(generator: &mut schemars::SchemaGenerator) -> Option<(String, serde_json::Value)> {
    let schema = generator.subschema_for::<T>();
    schema
        .as_value()
        .get("$ref")
        .is_none()
        .then(|| (T::schema_name().into_owned(), schema.to_value()))
}

fn named<T: JsonSchema>() -> Ref {
    Ref::from_schema_name(T::schema_name())
}

/// `T`, or `null` (which serde reads as absent).
fn nullable(schema: impl Into<RefOr<Schema>>) -> RefOr<Schema> {
    OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .item(schema)
        .into()
}

/// `parameters` of a job.
pub fn generation_parameters() -> RefOr<Schema> {
    named::<GenerationParameters>().into()
}

/// An optional decoding strategy.
pub fn optional_strategy() -> RefOr<Schema> {
    nullable(named::<Strategy>())
}

/// A lane (`interactive`, `batch`).
pub fn lane() -> RefOr<Schema> {
    named::<Lane>().into()
}

/// An optional lane.
pub fn optional_lane() -> RefOr<Schema> {
    nullable(named::<Lane>())
}

/// A conversation: 1 to [`MAX_MESSAGES`] messages (`clean_messages` refuses an empty one and a longer one).
pub fn chat_messages() -> RefOr<Schema> {
    ArrayBuilder::new()
        .items(named::<ChatMessage>())
        .min_items(Some(1))
        .max_items(Some(MAX_MESSAGES))
        .into()
}

/// A conversation given instead of a prompt, or `null`.
pub fn optional_chat_messages() -> RefOr<Schema> {
    nullable(chat_messages())
}

/// A failed job's `{code, message}`.
pub fn error_body() -> RefOr<Schema> {
    named::<ErrorBody>().into()
}

/// A stable error code.
pub fn error_code() -> RefOr<Schema> {
    named::<ErrorCode>().into()
}

/// Why generation ended.
pub fn finish_reason() -> RefOr<Schema> {
    named::<FinishReason>().into()
}
