//! Turning a delivery into a job the engine may run, or into the reason it may not.
//!
//! AMQP producers bypass the gateway, so nothing on `{ns}.jobs` is trusted: the correlation id must be a
//! job id, the body must be a job of a version this worker understands, and the prompt and parameters pass
//! the worker's [`PromptRules`] (by default the text as written, less unsafe control characters; the
//! gateway's cleaning of `/run` prompts passes them unchanged) and the checks the gateway applies. This
//! module is pure (properties and bytes in, a verdict out) so every refusal is unit-tested without a broker.

use lapin::BasicProperties;
use shared::{ErrorBody, ErrorCode, JobId, JobRequest, PromptRules, ValidJob};

/// A job that may run: who asked, where to answer, what to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    pub id: JobId,
    pub reply_to: String,
    /// Who submitted it, as the message's owner header says ([`shared::owner`]): every reply carries it.
    pub owner: Option<String>,
    pub job: ValidJob,
}

/// A message that will not run. It is answered with `job.failed` when it names a `reply_to`, then
/// dead-lettered.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// The job id, when the correlation id was one.
    pub id: Option<JobId>,
    /// The correlation id exactly as sent, echoed on the failure reply so a producer whose id is not a
    /// UUID can still match it.
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub error: ErrorBody,
}

/// Checks a delivery's properties and body.
pub fn inspect(properties: &BasicProperties, body: &[u8], rules: &PromptRules) -> Result<Accepted, Refused> {
    let correlation_id = properties
        .correlation_id()
        .as_ref()
        .map(|c| c.as_str().to_owned());
    let reply_to = properties
        .reply_to()
        .as_ref()
        .map(|r| r.as_str().to_owned())
        .filter(|r| !r.is_empty());
    let refuse = |id: Option<JobId>, error: ErrorBody| Refused {
        id,
        correlation_id: correlation_id.clone(),
        reply_to: reply_to.clone(),
        error,
    };

    let id = match correlation_id.as_deref().map(str::parse::<JobId>) {
        Some(Ok(id)) => id,
        Some(Err(_)) => {
            return Err(refuse(
                None,
                ErrorBody::new(
                    ErrorCode::MissingCorrelationId,
                    "the correlation_id property must be the job id, a UUID",
                ),
            ));
        }
        None => {
            return Err(refuse(
                None,
                ErrorBody::new(
                    ErrorCode::MissingCorrelationId,
                    "the correlation_id property (the job id, a UUID) is missing",
                ),
            ));
        }
    };

    let request: JobRequest = serde_json::from_slice(body).map_err(|e| refuse(Some(id), json_error(&e)))?;
    let job = request
        .into_valid(rules)
        .map_err(|e| refuse(Some(id), ErrorBody::from(&e)))?;

    // A job nobody can hear the answer to would only burn GPU time; it is dead-lettered for an operator.
    let Some(reply_to) = reply_to.clone() else {
        return Err(refuse(
            Some(id),
            ErrorBody::new(
                ErrorCode::InvalidParameter,
                "the reply_to property is missing: nobody would receive the result",
            ),
        ));
    };
    Ok(Accepted {
        id,
        reply_to,
        owner: shared::owner::read(properties),
        job,
    })
}

/// Maps a body that is not a job to the codes the gateway uses for the same mistakes.
fn json_error(e: &serde_json::Error) -> ErrorBody {
    use serde_json::error::Category;
    let code = match e.classify() {
        Category::Io | Category::Syntax | Category::Eof => ErrorCode::InvalidJson,
        // serde's message for `deny_unknown_fields` is the only signal it gives for this case.
        Category::Data if e.to_string().starts_with("unknown field") => ErrorCode::UnknownField,
        Category::Data => ErrorCode::InvalidParameter,
    };
    ErrorBody::new(code, format!("the body is not a valid job: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(correlation_id: Option<&str>, reply_to: Option<&str>) -> BasicProperties {
        let mut p = BasicProperties::default();
        if let Some(c) = correlation_id {
            p = p.with_correlation_id(c.into());
        }
        if let Some(r) = reply_to {
            p = p.with_reply_to(r.into());
        }
        p
    }

    const ID: &str = "4f9c2d1e-8b7a-4c3d-9e2f-1a2b3c4d5e6f";

    fn refused(p: BasicProperties, body: &str) -> Refused {
        refused_under(p, body, &PromptRules::AsWritten)
    }

    fn refused_under(p: BasicProperties, body: &str, rules: &PromptRules) -> Refused {
        inspect(&p, body.as_bytes(), rules).unwrap_err()
    }

    #[test]
    fn a_well_formed_job_is_accepted_with_its_prompt_as_written_less_unsafe_controls() {
        let body = r#"{"version":1,"prompt":"Hello\n  $world\u0000:","parameters":{"max_new_tokens":5}}"#;
        let ok = inspect(
            &props(Some(ID), Some("q")),
            body.as_bytes(),
            &PromptRules::AsWritten,
        )
        .unwrap();
        assert_eq!(ok.id.to_string(), ID);
        assert_eq!(ok.reply_to, "q");
        assert_eq!(ok.job.prompt, "Hello\n  $world:");
        assert_eq!(ok.job.plan.max_new_tokens, 5);
    }

    #[test]
    fn a_worker_configured_to_clean_cleans_as_the_gateway_cleans_run() {
        let body = r#"{"version":1,"prompt":"Hello   $world"}"#;
        let ok = inspect(
            &props(Some(ID), Some("q")),
            body.as_bytes(),
            &PromptRules::original(),
        )
        .unwrap();
        assert_eq!(ok.job.prompt, "Hello world");
    }

    #[test]
    fn invalid_json_is_refused_as_invalid_json_and_keeps_the_reply_address() {
        let r = refused(props(Some(ID), Some("q")), "{not json");
        assert_eq!(r.error.code, ErrorCode::InvalidJson);
        assert_eq!(r.reply_to.as_deref(), Some("q"));
        assert_eq!(r.id.map(|i| i.to_string()).as_deref(), Some(ID));
    }

    #[test]
    fn binary_garbage_is_invalid_json() {
        let r = inspect(
            &props(Some(ID), Some("q")),
            &[0xff, 0x00, 0x13],
            &PromptRules::AsWritten,
        )
        .unwrap_err();
        assert_eq!(r.error.code, ErrorCode::InvalidJson);
    }

    #[test]
    fn unknown_fields_are_named() {
        let r = refused(
            props(Some(ID), Some("q")),
            r#"{"version":1,"prompt":"hi","max_tokens":3}"#,
        );
        assert_eq!(r.error.code, ErrorCode::UnknownField);
        assert!(r.error.message.contains("max_tokens"), "{}", r.error.message);
    }

    #[test]
    fn a_missing_or_non_uuid_correlation_id_is_refused_and_echoed() {
        let body = r#"{"version":1,"prompt":"hi"}"#;
        let r = refused(props(None, Some("q")), body);
        assert_eq!(r.error.code, ErrorCode::MissingCorrelationId);
        let r = refused(props(Some("job-7"), Some("q")), body);
        assert_eq!(r.error.code, ErrorCode::MissingCorrelationId);
        assert_eq!(r.correlation_id.as_deref(), Some("job-7"));
        assert_eq!(r.id, None);
    }

    #[test]
    fn the_gateway_rules_apply_again() {
        let r = refused(props(Some(ID), Some("q")), r#"{"version":1,"prompt":"\u0001"}"#);
        assert_eq!(r.error.code, ErrorCode::PromptEmpty);
        let r = refused_under(
            props(Some(ID), Some("q")),
            r#"{"version":1,"prompt":"$$$"}"#,
            &PromptRules::original(),
        );
        assert_eq!(r.error.code, ErrorCode::PromptEmpty);
        let long = format!(r#"{{"version":1,"prompt":"{}"}}"#, "a".repeat(201));
        assert_eq!(
            refused_under(props(Some(ID), Some("q")), &long, &PromptRules::original())
                .error
                .code,
            ErrorCode::PromptTooLong
        );
        let r = refused(
            props(Some(ID), Some("q")),
            r#"{"version":1,"prompt":"hi","parameters":{"max_new_tokens":0}}"#,
        );
        assert_eq!(r.error.code, ErrorCode::InvalidParameter);
        assert!(r.error.message.contains("max_new_tokens"));
        let future = format!(
            r#"{{"version":{},"prompt":"hi"}}"#,
            shared::JOB_SCHEMA_VERSION + 1
        );
        let r = refused(props(Some(ID), Some("q")), &future);
        assert_eq!(r.error.code, ErrorCode::UnsupportedVersion);
    }

    #[test]
    fn a_valid_job_without_reply_to_is_refused() {
        let r = refused(props(Some(ID), None), r#"{"version":1,"prompt":"hi"}"#);
        assert_eq!(r.reply_to, None);
        assert!(r.error.message.contains("reply_to"));
    }
}
