//! Priority lanes and deadlines from the worker's side: real worker processes on the tiny GPT-J, the real
//! RabbitMQ. Each test reads as the guarantee it checks (docs/amqp.md, "Lanes" and `deadline_ms`).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Env, RawProducer, Reply};
use serde_json::json;
use shared::{ErrorCode, JobReply, Lane, Topology};

/// Declares the namespace's topology, so jobs can be queued before any worker runs.
async fn declare(env: &Env, producer: &RawProducer) {
    Topology::new(&env.ns, shared::topology::DEFAULT_DELIVERY_LIMIT)
        .unwrap()
        .declare(&producer.channel)
        .await
        .unwrap();
}

fn finals(replies: &[Reply]) -> usize {
    replies.iter().filter(|r| r.kind != "job.started").count()
}

/// The job ids in the order their `job.started` came.
fn started_order(replies: &[Reply]) -> Vec<String> {
    replies
        .iter()
        .filter(|r| r.kind == "job.started")
        .map(|r| r.correlation_id.clone().unwrap())
        .collect()
}

#[tokio::test]
async fn an_interactive_job_starts_before_the_batch_backlog_queued_ahead_of_it() {
    let mut env = Env::new();
    let mut producer = RawProducer::new(&env).await;
    declare(&env, &producer).await;
    // A backlog on the batch lane, then one interactive job, all queued before the worker starts.
    let mut batch = Vec::new();
    for i in 0..4 {
        let job = json!({"strategy": "greedy", "max_new_tokens": 60});
        batch.push(
            producer
                .publish_job_to(Lane::Batch, &format!("Batch job {i}"), job)
                .await,
        );
    }
    let interactive = producer
        .publish_job("An interactive question", json!({"max_new_tokens": 4}))
        .await;
    // One place in the batch: jobs run one at a time, so the order they start in is the admission order.
    env.spawn_worker(&["--max-batch-size", "1"]);
    let replies = producer
        .replies_until(Duration::from_secs(120), |r| finals(r) == 5)
        .await;
    assert!(
        replies
            .iter()
            .filter(|r| r.kind != "job.started")
            .all(|r| r.kind == "job.succeeded"),
        "{replies:#?}"
    );
    let order = started_order(&replies);
    let at = order.iter().position(|id| *id == interactive).unwrap();
    // The worker's first place may go to a batch job that reached it first; every other batch job waits
    // for the interactive one.
    assert!(
        at <= 1,
        "the interactive job started {at}th: {order:?}\n{}",
        env.logs()
    );
    assert_eq!(order.len(), 5, "{order:?}");
    assert!(batch.iter().all(|id| order.contains(id)));
    producer.close().await;
    env.finish().await;
}

#[tokio::test]
async fn batch_jobs_leave_the_reserved_place_to_interactive_ones() {
    let mut env = Env::new();
    let mut producer = RawProducer::new(&env).await;
    declare(&env, &producer).await;
    for i in 0..3 {
        let job = json!({"strategy": "greedy", "max_new_tokens": 8});
        producer
            .publish_job_to(Lane::Batch, &format!("Batch job {i}"), job)
            .await;
    }
    // Two places, one of them reserved for interactive jobs (the default `--interactive-reserve 1`).
    env.spawn_worker(&["--max-batch-size", "2"]);
    let replies = producer
        .replies_until(Duration::from_secs(120), |r| finals(r) == 3)
        .await;
    for reply in replies.iter().filter(|r| r.kind != "job.started") {
        let JobReply::Succeeded(s) = &reply.body else {
            panic!("{reply:?}");
        };
        assert_eq!(
            s.batch_size,
            Some(1),
            "a batch job never ran beside another: {s:?}"
        );
    }
    producer.close().await;
    env.finish().await;
}

#[tokio::test]
async fn a_job_whose_deadline_passed_in_the_queue_fails_with_deadline_exceeded_and_never_starts() {
    let mut env = Env::new();
    env.spawn_worker(&[]);
    env.wait_for_consumers(1).await;
    let mut producer = RawProducer::new(&env).await;
    let late = shared::JobId::new_random().to_string();
    let body = json!({
        "version": 3,
        "prompt": "Too late for this",
        "parameters": {"max_new_tokens": 4},
        "deadline_ms": shared::reply::now_ms() - 1_000,
    });
    producer
        .publish_raw(Some(&late), &serde_json::to_vec(&body).unwrap())
        .await;
    // A job with a deadline far ahead runs as any other.
    let in_time = shared::JobId::new_random().to_string();
    let body = json!({
        "version": 3,
        "prompt": "Plenty of time",
        "parameters": {"max_new_tokens": 4},
        "deadline_ms": shared::reply::now_ms() + 600_000,
    });
    producer
        .publish_raw(Some(&in_time), &serde_json::to_vec(&body).unwrap())
        .await;

    let mut events = Vec::new();
    while events
        .iter()
        .filter(|r: &&Reply| r.kind != "job.started" && r.kind != "job.token")
        .count()
        < 2
    {
        let event = producer.next_event(Duration::from_secs(60)).await;
        events.push(event.unwrap_or_else(|| panic!("replies stopped short: {events:#?}")));
    }
    let of = |id: &str| -> Vec<&Reply> {
        events
            .iter()
            .filter(|r| r.correlation_id.as_deref() == Some(id))
            .collect()
    };
    let late_replies = of(&late);
    assert_eq!(
        late_replies.len(),
        1,
        "no job.started, no token: {late_replies:#?}"
    );
    let JobReply::Failed(failed) = &late_replies[0].body else {
        panic!("{late_replies:#?}");
    };
    assert_eq!(failed.error.code, ErrorCode::DeadlineExceeded, "{failed:?}");
    assert!(
        of(&in_time).iter().any(|r| r.kind == "job.succeeded"),
        "{events:#?}"
    );
    // Answered and acknowledged: neither queued again nor dead-lettered.
    env.wait_for_jobs_queue(0, 1).await;
    let dead = producer.drain(&env.dead_letter_queue()).await;
    assert!(dead.is_empty(), "{} dead-lettered", dead.len());
    producer.close().await;
    env.finish().await;
}

#[tokio::test]
async fn an_openai_request_on_the_flex_tier_runs_on_the_batch_lane_and_its_answer_says_so() {
    let mut env = Env::new();
    let gw = env.gateway().await;
    env.spawn_worker(&[]);
    env.wait_for_consumers(1).await;
    let ask = |tier: &'static str| {
        let body = json!({"model": "EleutherAI/gpt-j-6b", "prompt": "Hello", "max_tokens": 3, "ignore_eos": true,
            "service_tier": tier, "timeout_s": 600});
        env.http.post(format!("{gw}/v1/completions")).json(&body).send()
    };
    let r = ask("flex").await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["service_tier"], "flex", "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 3, "{body}");
    let r = ask("auto").await.unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["service_tier"], "default", "{body}");
    env.finish().await;
}
