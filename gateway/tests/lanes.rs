//! Priority lanes and deadlines at the gateway, against the real Redis and RabbitMQ: which queue a job goes
//! to, how a key's highest lane clamps what it asks, the figures per lane, and a deadline the queue cannot
//! meet refused at submission. No worker runs: the queues are read as a worker would find them.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions panic on purpose

mod common;

use std::time::{Duration, Instant};

use common::{TestEnv, amqp, depth, json, submit, take};
use serde_json::json;
use shared::{JobRequest, Lane, Topology};

const GENEROUS: &[&str] = &["--submit-rate-limit", "10000/1s", "--read-rate-limit", "10000/1s"];

fn queue(env: &TestEnv, lane: Lane) -> String {
    Topology::new(&env.ns, 3).unwrap().lane_queue(lane)
}

#[tokio::test]
async fn a_job_asking_for_the_batch_lane_waits_in_the_batch_queue_and_says_so() {
    let mut env = TestEnv::new();
    let gw = env.gateway(GENEROUS).await;
    let (status, body) = submit(&env.http, &gw, json!({"prompt": "bulk work", "lane": "batch"})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["lane"], "batch");
    let id = body["id"].as_str().unwrap().to_owned();
    let (status, plain) = submit(&env.http, &gw, json!({"prompt": "a question"})).await;
    assert_eq!((status, &plain["lane"]), (202, &json!("interactive")), "{plain}");

    let view = common::poll(&env, &gw, &id).await;
    assert_eq!(view["lane"], "batch");
    let (_, figures) = json(env.http.get(gw.url("/v1/queue")).send().await.unwrap()).await;
    assert_eq!(figures["depth"], 2, "{figures}");
    assert_eq!(figures["lanes"]["interactive"]["depth"], 1, "{figures}");
    assert_eq!(figures["lanes"]["batch"]["depth"], 1, "{figures}");

    let (_conn, channel) = amqp().await;
    let msg = take(&channel, &queue(&env, Lane::Batch)).await;
    assert_eq!(
        msg.delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some(id.as_str())
    );
    take(&channel, &queue(&env, Lane::Interactive)).await;
    env.finish().await;
}

#[tokio::test]
async fn a_key_whose_highest_lane_is_batch_is_clamped_there_never_refused() {
    let mut env = TestEnv::new();
    let flags = [GENEROUS, &["--api-keys", "alpha", "--batch-api-keys", "bulk"]].concat();
    let gw = env.gateway(&flags).await;
    let ask = |key: &'static str, body: serde_json::Value| {
        let request = env.http.post(gw.url("/v1/jobs")).bearer_auth(key).json(&body);
        async move { json(request.send().await.unwrap()).await }
    };
    let (status, body) = ask("bulk", json!({"prompt": "urgent!", "lane": "interactive"})).await;
    assert_eq!((status, &body["lane"]), (202, &json!("batch")), "{body}");
    let (status, body) = ask("bulk", json!({"prompt": "no preference"})).await;
    assert_eq!((status, &body["lane"]), (202, &json!("batch")), "{body}");
    let (status, body) = ask("alpha", json!({"prompt": "urgent!", "lane": "interactive"})).await;
    assert_eq!((status, &body["lane"]), (202, &json!("interactive")), "{body}");
    let (_conn, channel) = amqp().await;
    assert_eq!(depth(&channel, &queue(&env, Lane::Batch)).await, 2);
    assert_eq!(depth(&channel, &queue(&env, Lane::Interactive)).await, 1);
    env.finish().await;
}

#[tokio::test]
async fn a_timeout_becomes_the_jobs_deadline_in_a_version_3_body() {
    let mut env = TestEnv::new();
    let gw = env.gateway(GENEROUS).await;
    let before = shared::reply::now_ms();
    let r = env
        .http
        .post(gw.url("/v1/jobs"))
        .header("x-request-timeout", "30")
        .json(&json!({"prompt": "in time", "timeout_s": 60}))
        .send()
        .await
        .unwrap();
    let (status, body) = json(r).await;
    assert_eq!(status, 202, "{body}");
    let (_conn, channel) = amqp().await;
    let msg = take(&channel, &env.jobs_queue()).await;
    let job: JobRequest = serde_json::from_slice(&msg.delivery.data).unwrap();
    assert_eq!(job.version, 3);
    let deadline = job.deadline_ms.unwrap();
    assert_eq!(body["deadline_ms"], deadline);
    // The shorter of the body's and the header's.
    assert!(
        (before + 30_000..=shared::reply::now_ms() + 30_000).contains(&deadline),
        "{deadline}"
    );
    let (status, body) = submit(&env.http, &gw, json!({"prompt": "never", "timeout_s": 0})).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["message"].as_str().unwrap().contains("timeout_s"), "{body}");
    env.finish().await;
}

#[tokio::test]
async fn a_job_that_cannot_start_before_its_deadline_is_refused_at_once_naming_the_estimate() {
    let mut env = TestEnv::new();
    let gw = env.gateway(GENEROUS).await;
    // A job waits and no worker takes it: once the gateway has measured that nothing drains, no start is
    // in sight for a job behind it.
    let (status, body) = submit(&env.http, &gw, json!({"prompt": "first in line"})).await;
    assert_eq!(status, 202, "{body}");
    let give_up = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let r = env
            .http
            .post(gw.url("/v1/jobs"))
            .json(&json!({"prompt": "in a hurry", "timeout_s": 5}))
            .send()
            .await
            .unwrap();
        if r.status() == 503 {
            break r;
        }
        assert_eq!(r.status(), 202, "refused for another reason");
        assert!(Instant::now() < give_up, "never refused");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(refused.headers().contains_key("retry-after"));
    let (_, body) = json(refused).await;
    assert_eq!(body["code"], "deadline_exceeded", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("estimated start") && message.contains("5.0 s"),
        "{message}"
    );
    // A job without a deadline still queues, and one on the batch lane waits behind the interactive lane
    // too.
    let (status, _) = submit(&env.http, &gw, json!({"prompt": "no hurry"})).await;
    assert_eq!(status, 202);
    let (status, body) = submit(
        &env.http,
        &gw,
        json!({"prompt": "bulk", "lane": "batch", "timeout_s": 5}),
    )
    .await;
    assert_eq!(
        (status, &body["code"]),
        (503, &json!("deadline_exceeded")),
        "{body}"
    );
    env.finish().await;
}
