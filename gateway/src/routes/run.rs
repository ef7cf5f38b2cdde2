//! `POST /run`: the original deployment's synchronous endpoint, kept for its clients.
//!
//! It takes the original body `{"data", "num_tokens", "decoding_strategy"}` (defaults 50 tokens and
//! contrastive search, as the original ran them: contrastive with `penalty_alpha` 0.6 and `top_k` 4,
//! "multinomial sampling" as `do_sample` with transformers' defaults, "beam search" with 4 beams) or our
//! job body, cleans its prompt as the original did (the `--prompt-*` flags: `a-zA-Z0-9 ?',.-`, at most 200
//! characters by default, whatever `--prompt-policy` says), queues the job like any other, waits for its
//! result, and answers 200 with a JSON string: the prompt followed directly by the continuation, which is
//! what the original returned (it decoded the prompt's ids and the new ids together). After `run_timeout`
//! it answers 504 with the job id; the job goes on and can be polled. A client that hangs up before the
//! answer cancels its job (`--cancel-on-disconnect`).

use axum::Extension;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use shared::params::{DEFAULT_MAX_NEW_TOKENS, DEFAULT_NUM_BEAMS, MAX_NEW_TOKENS_LIMIT};
use shared::{GenerationParameters, JobId, JobRequest, Lane, Strategy};
use utoipa::ToSchema;

use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ErrorResponse, parse_value};
use crate::follow::{CancelOnDrop, Waited, wait_final};
use crate::routes::jobs::SubmitRequest;
use crate::store::{JobRecord, Status};
use crate::waiters::{Follow, Interest};

/// The original `/run` body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OriginalRun {
    /// The prompt.
    #[schema(min_length = 1)]
    pub data: String,
    /// New tokens to generate (default 50).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 2048)] // MAX_NEW_TOKENS_LIMIT; a test holds them equal
    pub num_tokens: Option<u32>,
    /// Default `contrastive`.
    #[serde(default)]
    pub decoding_strategy: Option<OriginalStrategy>,
}

/// The original's names for its three ways to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
pub enum OriginalStrategy {
    /// Contrastive search with `penalty_alpha` 0.6 and `top_k` 4.
    #[serde(rename = "contrastive")]
    Contrastive,
    /// Sampling with transformers' defaults.
    #[serde(rename = "multinomial sampling")]
    MultinomialSampling,
    /// Beam search with 4 beams.
    #[serde(rename = "beam search")]
    BeamSearch,
}

impl OriginalRun {
    /// The job the original deployment would have run for this body.
    pub fn into_job(self) -> Result<JobRequest, ApiError> {
        let max_new_tokens = self.num_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS);
        if max_new_tokens == 0 || max_new_tokens > MAX_NEW_TOKENS_LIMIT {
            return Err(ApiError::InvalidField {
                field: "num_tokens".into(),
                message: format!("must be in [1, {MAX_NEW_TOKENS_LIMIT}], got {max_new_tokens}"),
            });
        }
        let mut parameters = GenerationParameters {
            max_new_tokens: Some(max_new_tokens),
            ..Default::default()
        };
        match self.decoding_strategy.unwrap_or(OriginalStrategy::Contrastive) {
            OriginalStrategy::Contrastive => parameters.strategy = Some(Strategy::Contrastive),
            OriginalStrategy::MultinomialSampling => {
                parameters.strategy = Some(Strategy::Sample);
                parameters.do_sample = Some(true);
            }
            OriginalStrategy::BeamSearch => {
                parameters.strategy = Some(Strategy::Beam);
                parameters.num_beams = Some(DEFAULT_NUM_BEAMS);
            }
        }
        Ok(JobRequest::new(self.data, parameters))
    }
}

/// Either body shape; the original one is recognised by its `data` field.
pub fn job_from_body(body: serde_json::Value) -> Result<JobRequest, ApiError> {
    let original = body.as_object().is_some_and(|o| o.contains_key("data"));
    if original {
        parse_value::<OriginalRun>(body)?.into_job()
    } else {
        Ok(parse_value::<SubmitRequest>(body)?.into())
    }
}

#[utoipa::path(
    post, path = "/run", tag = "compatibility",
    request_body(content = OriginalRun, description = "The original body, or a job body as for POST /v1/jobs"),
    responses(
        (status = 200, description = "Prompt followed by the generated text, as a JSON string", body = String, content_type = "application/json"),
        (status = 400, description = "Invalid JSON", body = ErrorResponse),
        (status = 401, description = "Keys are on and the request has none, or a wrong one", body = ErrorResponse),
        (status = 409, description = "The job was cancelled", body = ErrorResponse),
        (status = 413, description = "Body over the limit", body = ErrorResponse),
        (status = 422, description = "Invalid body, or the job failed on a bad input", body = ErrorResponse),
        (status = 500, description = "The job failed in the engine", body = ErrorResponse),
        (status = 429, description = "Rate limited, or too many open /run requests", body = ErrorResponse),
        (status = 503, description = "Broker or Redis unavailable", body = ErrorResponse),
        (status = 504, description = "Not finished in time (`timeout`), or Redis did not answer while the job was being \
            recorded (`outcome_unknown`: it may have been taken); the body's job_id can be polled", body = ErrorResponse),
    ),
    security((), ("api_key" = []))
)]
pub async fn run(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(body): ApiJson<serde_json::Value>,
) -> Result<Response, ApiError> {
    let request = job_from_body(body)?;
    let s = &app.settings;
    let _slot = app
        .waiters
        .slot(Follow::Run, &caller.id, s.max_run_waits_per_client)?;
    let id = JobId::new_random();
    let registration = app.waiters.register(id, Interest::Done);
    let (_, decision) = app
        .enqueue(
            id,
            request,
            &app.settings.prompts.run,
            &caller,
            None,
            Lane::Interactive,
        )
        .await?;
    let mut owner = CancelOnDrop::new(&app, vec![id], s.cancel_on_disconnect);
    let waited = wait_final(&app, id, &registration).await;
    // Answered, or past the timeout after which the contract says the job goes on: either way not a hang-up.
    owner.disarm();
    let mut response = match waited {
        Waited::Final(record) => answer(*record).into_response(),
        Waited::TimedOut => ApiError::RunTimeout(id).into_response(),
    };
    if let Some(d) = decision {
        d.write_headers(response.headers_mut());
    }
    Ok(response)
}

/// The original's answer: the prompt followed by the continuation, or the job's error.
fn answer(record: JobRecord) -> Result<Response, ApiError> {
    match (record.status, record.result, record.error) {
        (Status::Succeeded, Some(r), _) => Ok(axum::Json(format!("{}{}", r.prompt, r.text)).into_response()),
        (Status::Failed | Status::Cancelled, _, Some(error)) => Err(ApiError::JobFailed(error)),
        _ => Err(ApiError::RunTimeout(record.id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use shared::{Decoding, PromptRules};

    fn plan(body: serde_json::Value) -> shared::GenerationPlan {
        job_from_body(body)
            .unwrap()
            .into_valid(&PromptRules::original())
            .unwrap()
            .plan
    }

    #[test]
    fn the_original_body_defaults_to_50_tokens_of_contrastive_search() {
        let p = plan(json!({"data": "Hello"}));
        assert_eq!(p.max_new_tokens, 50);
        assert_eq!(
            p.decoding,
            Decoding::Contrastive {
                penalty_alpha: 0.6,
                top_k: 4
            }
        );
    }

    #[test]
    fn beam_search_runs_four_beams_and_sampling_uses_transformers_defaults() {
        let p = plan(json!({"data": "Hello", "num_tokens": 7, "decoding_strategy": "beam search"}));
        assert_eq!(p.max_new_tokens, 7);
        assert!(
            matches!(p.decoding, Decoding::Beam { num_beams: 4, .. }),
            "{:?}",
            p.decoding
        );
        let p = plan(json!({"data": "Hello", "decoding_strategy": "multinomial sampling"}));
        assert_eq!(
            p.decoding,
            Decoding::Sample {
                temperature: 1.0,
                top_k: Some(50),
                top_p: None,
                min_p: None,
                typical_p: None,
                seed: None
            }
        );
    }

    #[test]
    fn the_documented_range_of_num_tokens_is_the_one_enforced() {
        use utoipa::PartialSchema;
        let schema = serde_json::to_value(OriginalRun::schema()).unwrap();
        let range = &schema["properties"]["num_tokens"];
        assert_eq!(range["minimum"], json!(1));
        assert_eq!(range["maximum"], json!(MAX_NEW_TOKENS_LIMIT));
        let strategies = serde_json::to_value(OriginalStrategy::schema())
            .unwrap()
            .to_string();
        for name in ["contrastive", "multinomial sampling", "beam search"] {
            assert!(strategies.contains(name), "{strategies}");
            assert!(job_from_body(json!({"data": "x", "decoding_strategy": name})).is_ok());
        }
    }

    #[test]
    fn our_job_body_is_accepted_too() {
        let p = plan(json!({"prompt": "Hello", "parameters": {"strategy": "greedy", "max_new_tokens": 3}}));
        assert_eq!((p.decoding, p.max_new_tokens), (Decoding::Greedy, 3));
    }

    #[test]
    fn bad_original_bodies_name_the_field() {
        let field = |body| match job_from_body(body).unwrap_err() {
            ApiError::InvalidField { field, .. } | ApiError::UnknownField { field } => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(json!({"data": "x", "decoding_strategy": "telepathy"})),
            "decoding_strategy"
        );
        assert_eq!(field(json!({"data": "x", "num_tokens": 0})), "num_tokens");
        assert_eq!(field(json!({"data": "x", "num_tokens": -3})), "num_tokens");
        assert_eq!(field(json!({"data": "x", "temperature": 0.5})), "temperature");
        assert_eq!(field(json!({"data": 5})), "data");
    }
}
