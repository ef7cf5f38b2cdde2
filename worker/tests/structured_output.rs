//! Structured output as its users meet it: the official `openai` SDK's `chat.completions.parse` with Pydantic
//! models (as `response_format` and as forced tool calls), vLLM's extra fields, LangChain's
//! `with_structured_output` and instructor, against a gateway and a real worker on the tiny random GPT-J,
//! whose unconstrained text is noise. The checks are in `tests/py/structured_output.py` and
//! `tests/py/instructor_client.py`: every answer of 20 schemas of different shapes parses and validates,
//! greedy and sampled.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Env, RawProducer};
use serde_json::json;
use shared::{ErrorCode, JobReply};

#[tokio::test]
async fn unmodified_clients_get_answers_that_validate_against_their_schemas() {
    common::python_client_checks(
        "structured_output.py",
        &[],
        &[],
        "all structured output checks passed",
    )
    .await;
}

/// instructor, unmodified, in its default mode (a forced tool call) and its strict one: 20 schemas, greedy
/// and sampled, each answer validated on the first try (`tests/py/instructor_client.py`).
#[tokio::test]
async fn instructor_gets_answers_that_validate_against_its_response_models() {
    let mut env = Env::new();
    common::python_client_checks_by(
        &mut env,
        "GPTJ_INSTRUCTOR_PYTHON",
        "instructor_client.py",
        &[],
        &[],
        &[],
        "all instructor checks passed",
    )
    .await;
    env.finish().await;
}

/// AMQP producers bypass the gateway: the worker compiles their grammar itself, fails the job whose grammar
/// does not compile (the producer's to fix) and goes on with the next.
#[tokio::test]
async fn a_producers_grammar_that_does_not_compile_fails_its_job_and_the_worker_goes_on() {
    let mut env = Env::new();
    env.spawn_worker(&[]);
    env.wait_for_consumers(1).await;
    let mut producer = RawProducer::new(&env).await;
    let broken =
        json!({"type": "json", "value": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}});
    let bad = producer
        .publish_job(
            "x",
            json!({"strategy": "greedy", "max_new_tokens": 5, "grammar": broken}),
        )
        .await;
    let choice = json!({"type": "choice", "value": ["up", "down"]});
    let good = producer
        .publish_job(
            "y",
            json!({"strategy": "greedy", "max_new_tokens": 20, "grammar": choice}),
        )
        .await;
    let replies = producer
        .replies_until(Duration::from_secs(60), |got| {
            got.iter().filter(|r| r.body.is_final()).count() == 2
        })
        .await;
    let last = |id: &str| {
        replies
            .iter()
            .rfind(|r| r.correlation_id.as_deref() == Some(id))
            .map(|r| &r.body)
    };
    let Some(JobReply::Failed(failed)) = last(&bad) else {
        panic!("the broken grammar's job fails: {replies:#?}");
    };
    assert_eq!(failed.error.code, ErrorCode::InvalidParameter);
    assert!(
        failed.error.message.contains("grammar"),
        "{}",
        failed.error.message
    );
    let Some(JobReply::Succeeded(done)) = last(&good) else {
        panic!("the next job succeeds: {replies:#?}");
    };
    assert!(["up", "down"].contains(&done.text.as_str()), "{}", done.text);
    producer.close().await;
    env.finish().await;
}
