//! The Batch API without a worker: how a batch's file is validated, how much of a large batch is queued at
//! once, and what a cancelled batch's files hold. (With a worker and the official SDK, and under faults:
//! `worker/tests/batch_api.rs`.)
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Gateway, TestEnv};
use serde_json::{Value, json};

/// A gateway whose files are in `dir`, with `flags` besides.
async fn gateway(env: &mut TestEnv, dir: &tempfile::TempDir, flags: &[&str]) -> Gateway {
    let files = dir.path().to_str().unwrap().to_owned();
    let mut all = vec![
        "--files-dir",
        &files,
        "--served-model-name",
        "m",
        "--batch-poll-ms",
        "50",
        "--submit-rate-limit",
        "1000000/1s",
        "--read-rate-limit",
        "1000000/1s",
    ];
    all.extend_from_slice(flags);
    env.gateway(&all).await
}

/// A chat request line.
fn line(custom_id: &str) -> String {
    json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}})
    .to_string()
}

/// Uploads `text` and creates a chat batch of it; returns the batch's id.
async fn create(env: &TestEnv, gw: &Gateway, text: &str) -> String {
    const BOUNDARY: &str = "gateway-test-boundary";
    let form = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\r\n{text}\r\n\
         --{BOUNDARY}--\r\n"
    );
    let r = env
        .http
        .post(gw.url("/v1/files"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let file: Value = r.json().await.unwrap();
    let r = env
        .http
        .post(gw.url("/v1/batches"))
        .json(&json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn batch(env: &TestEnv, gw: &Gateway, id: &str) -> Value {
    env.http
        .get(gw.url(&format!("/v1/batches/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Polls batch `id` until `done` says so.
async fn until(
    env: &TestEnv,
    gw: &Gateway,
    id: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let b = batch(env, gw, id).await;
        if done(&b) {
            return b;
        }
        assert!(Instant::now() < deadline, "batch never got there: {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn content(env: &TestEnv, gw: &Gateway, file: &Value) -> Vec<Value> {
    let text = env
        .http
        .get(gw.url(&format!("/v1/files/{}/content", file.as_str().unwrap())))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn failed(b: &Value) -> bool {
    b["status"] == "failed"
}

#[tokio::test]
async fn a_file_the_batch_cannot_run_fails_it_naming_the_line() {
    let mut env = TestEnv::new();
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(
        &mut env,
        &dir,
        &["--batch-max-requests", "2", "--body-limit-bytes", "400"],
    )
    .await;
    let cases = [
        ("\n\n".to_owned(), "empty_file", Value::Null),
        (
            format!("{}\n{}\n{}\n", line("a"), line("b"), line("c")),
            "too_many_requests",
            json!(3),
        ),
        (
            format!("{}\n{}\n", line("a"), "x".repeat(401)),
            "invalid_file",
            json!(2),
        ),
        (
            format!("{}\n{}\n", line("a"), line("a")),
            "duplicate_custom_id",
            json!(2),
        ),
    ];
    for (text, code, at) in cases {
        let id = create(&env, &gw, &text).await;
        let b = until(&env, &gw, &id, Duration::from_secs(30), failed).await;
        let error = &b["errors"]["data"][0];
        assert_eq!((&error["code"], &error["line"]), (&json!(code), &at), "{b}");
        assert_eq!(b["output_file_id"], Value::Null);
    }
    env.finish().await;
}

#[tokio::test]
async fn a_50000_line_batch_queues_no_more_than_its_slice_and_a_cancel_accounts_for_every_line() {
    let mut env = TestEnv::new();
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&mut env, &dir, &["--batch-slice", "8"]).await;
    const LINES: usize = 50_000;
    let text: String = (0..LINES).map(|i| line(&format!("r{i}")) + "\n").collect();
    let id = create(&env, &gw, &text).await;
    // No worker: the batch's first slice stays queued, and nothing more is submitted.
    let b = until(&env, &gw, &id, Duration::from_secs(120), |b| {
        b["status"] == "in_progress"
    })
    .await;
    assert_eq!(b["request_counts"]["total"], LINES);
    let (_conn, channel) = common::amqp().await;
    let queue = format!("{}.jobs.batch", env.ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::depth(&channel, &queue).await < 8 {
        assert!(
            Instant::now() < deadline,
            "the first slice never reached the batch lane"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Several driver rounds later, still one slice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        common::depth(&channel, &queue).await,
        8,
        "the batch lane holds one slice"
    );
    assert_eq!(
        common::depth(&channel, &env.jobs_queue()).await,
        0,
        "nothing on the interactive lane"
    );

    // The input file of a batch that has not ended cannot be deleted: the batch still reads it.
    let input = gw.url(&format!("/v1/files/{}", b["input_file_id"].as_str().unwrap()));
    let r = env.http.delete(&input).send().await.unwrap();
    assert_eq!(r.status(), 409);
    let (_, body) = common::json(r).await;
    assert!(
        body["error"]["message"].as_str().unwrap().contains(&id),
        "the refusal names the batch: {body}"
    );

    let r = env
        .http
        .post(gw.url(&format!("/v1/batches/{id}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b = until(&env, &gw, &id, Duration::from_secs(120), |b| {
        b["status"] == "cancelled"
    })
    .await;
    // Once the batch has ended, its input file can go.
    assert_eq!(env.http.delete(&input).send().await.unwrap().status(), 200);
    assert!(b["output_file_id"].is_string(), "{b}");
    assert!(content(&env, &gw, &b["output_file_id"]).await.is_empty());
    let errors = content(&env, &gw, &b["error_file_id"]).await;
    assert_eq!(errors.len(), LINES, "every line is in the error file");
    assert!(errors.iter().all(|e| e["error"]["code"] == "batch_cancelled"));
    assert_eq!(
        errors[LINES - 1]["custom_id"],
        format!("r{}", LINES - 1),
        "in the input's order"
    );
    assert_eq!(
        b["request_counts"],
        json!({"total": LINES, "completed": 0, "failed": LINES})
    );
    let metrics = env
        .http
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        r#"gateway_batches_total{status="cancelled"}"#,
        r#"gateway_batch_requests_total{outcome="failed"}"#,
    ] {
        assert!(metrics.contains(series), "{series} in /metrics");
    }
    env.finish().await;
}
