//! Token streaming and cancellation end to end: real worker processes on the tiny GPT-J, real gateways
//! in-process, the machine's RabbitMQ and Redis.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Env, SseReader, free_port, metric};
use serde_json::{Value, json};
use tokio::time::Instant;

/// Starts one worker serving Prometheus metrics and waits for it; returns its metrics URL.
async fn worker_with_metrics(env: &mut Env, extra: &[&str]) -> String {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = extra.to_vec();
    args.extend(["--metrics-listen", &listen]);
    env.spawn_worker(&args);
    env.wait_for_consumers(1).await;
    format!("http://{listen}/metrics")
}

/// A job that takes the tiny model a few seconds: it cannot end before its last token.
fn long_job(tokens: u32) -> Value {
    json!({"strategy": "greedy", "max_new_tokens": tokens, "min_new_tokens": tokens})
}

async fn events(env: &Env, base: &str, id: &str, last_event_id: Option<&str>) -> SseReader {
    let mut request = env.http.get(format!("{base}/v1/jobs/{id}/events"));
    if let Some(last) = last_event_id {
        request = request.header("Last-Event-ID", last);
    }
    SseReader::new(request.send().await.unwrap())
}

/// Token events' texts, ids and log-probabilities (when the job asked), checking each starts where the
/// previous ended.
#[derive(Default)]
struct Tokens {
    text: String,
    ids: Vec<u64>,
    logprobs: Vec<Value>,
}

impl Tokens {
    fn add(&mut self, data: &str) {
        let chunk: Value = serde_json::from_str(data).unwrap();
        assert_eq!(
            chunk["index"].as_u64().unwrap(),
            self.ids.len() as u64,
            "a token event starts where the last ended: no gap, no repeat"
        );
        if let Some(scores) = chunk["logprobs"].as_array() {
            assert_eq!(
                scores.len(),
                chunk["token_ids"].as_array().unwrap().len(),
                "one log-probability per token id: {chunk}"
            );
            self.logprobs.extend(scores.iter().cloned());
        }
        self.ids.extend(
            chunk["token_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap()),
        );
        self.text.push_str(chunk["text"].as_str().unwrap());
    }
}

#[tokio::test]
async fn a_stream_from_a_replica_that_consumes_no_replies_gets_every_token_and_resumes_after_a_drop() {
    let mut env = Env::new();
    // Replica A serves HTTP only; every reply is consumed by replica B.
    let a = env.gateway_with(&["--consume-replies", "false"]).await;
    let b = env.gateway().await;
    env.spawn_worker(&["--stream-tokens", "4", "--stream-interval-ms", "5"]);
    env.wait_for_consumers(1).await;

    // With log-probabilities: they come with the token events, cut where the ids are.
    let mut job = long_job(300);
    job["logprobs"] = json!(1);
    let id = env.submit(&b, "The history of the world", job).await;
    let mut stream = events(&env, &a, &id, None).await;
    let mut tokens = Tokens::default();
    let mut seen = Vec::new();
    let mut last_id = None;
    // Read a few token events, then hang up mid-stream.
    while tokens.ids.len() < 20 {
        let e = stream.next().await.expect("the stream ended early");
        seen.push(e.event.clone());
        match e.event.as_str() {
            "queued" => assert!(e.id.is_none(), "queued events are not in the log"),
            "started" => {}
            "token" => tokens.add(&e.data),
            other => panic!("unexpected {other} before 20 tokens: {}", e.data),
        }
        if e.id.is_some() {
            last_id = e.id;
        }
    }
    assert!(seen.contains(&"started".to_owned()), "{seen:?}");
    drop(stream);

    // Reconnect where we left off: the rest, with nothing repeated.
    let mut stream = events(&env, &a, &id, last_id.as_deref()).await;
    let final_view = loop {
        let e = stream
            .next()
            .await
            .expect("the stream ended before the final event");
        match e.event.as_str() {
            "token" => tokens.add(&e.data),
            "succeeded" => break serde_json::from_str::<Value>(&e.data).unwrap(),
            "started" => panic!("started was before the resume point"),
            other => panic!("unexpected {other}: {}", e.data),
        }
    };
    assert!(
        stream.next().await.is_none(),
        "the stream ends after the final event"
    );
    assert_eq!(final_view["status"], "succeeded");
    assert_eq!(tokens.text, final_view["result"]["text"].as_str().unwrap());
    assert_eq!(
        tokens.ids.len() as u64,
        final_view["result"]["new_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        Some(&tokens.logprobs),
        final_view["result"]["logprobs"].as_array(),
        "the token events' log-probabilities are the result's, each once"
    );

    // A finished job's stream replays its whole log, from any replica.
    let mut replay = events(&env, &a, &id, None).await;
    let mut again = Tokens::default();
    while let Some(e) = replay.next().await {
        if e.event == "token" {
            again.add(&e.data);
        }
    }
    assert_eq!(again.text, tokens.text);
    assert_eq!(again.logprobs, tokens.logprobs);
    env.finish().await;
}

#[tokio::test]
async fn a_running_job_cancelled_by_delete_stops_at_once_and_its_place_serves_the_next_job() {
    let mut env = Env::new();
    let gw = env.gateway().await;
    let metrics = worker_with_metrics(&mut env, &["--max-batch-size", "1"]).await;
    let generated = || metric(&env.http, &metrics, "worker_generation_tokens_total");

    let id = env.submit(&gw, "Once upon a time", long_job(1800)).await;
    // Running and generating: tokens arrive on its stream.
    let mut stream = events(&env, &gw, &id, None).await;
    let mut tokens = 0;
    while tokens < 10 {
        let e = stream.next().await.unwrap();
        if e.event == "token" {
            tokens += serde_json::from_str::<Value>(&e.data).unwrap()["token_ids"]
                .as_array()
                .unwrap()
                .len();
        }
    }
    let body = env.cancel(&gw, &id).await;
    assert_eq!(
        (body["status"].clone(), body["cancelled"].clone()),
        (json!("cancelled"), json!(true)),
        "{body}"
    );

    // The stream ends with `cancelled`.
    let last = loop {
        let e = stream.next().await.unwrap();
        if e.event != "token" {
            break e;
        }
    };
    assert_eq!(last.event, "cancelled", "{last:?}");

    // The worker stops computing it: its token counter goes flat well before 1800 tokens.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = generated().await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let after = generated().await;
    assert_eq!(before, after, "the worker kept generating after the cancel");
    assert!(after < 1800.0, "{after} tokens: the job ran to its end");

    // Its one place in the batch is free: the next job runs and succeeds.
    let next = env
        .submit(&gw, "Hello", json!({"strategy": "greedy", "max_new_tokens": 3}))
        .await;
    let view = env
        .poll_until(&gw, &next, Duration::from_secs(30), |v| {
            v["status"] == "succeeded"
        })
        .await;
    assert_eq!(view["result"]["new_tokens"], 3);
    let cancelled = env.view(&gw, &id).await;
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["error"]["code"], "cancelled");

    // Cancelling a finished job changes nothing, and says so.
    let again = env.cancel(&gw, &next).await;
    assert_eq!(
        (again["status"].clone(), again["cancelled"].clone()),
        (json!("succeeded"), json!(false))
    );
    env.finish().await;
}

#[tokio::test]
async fn a_job_cancelled_while_queued_never_runs_even_on_a_worker_started_later() {
    let mut env = Env::new();
    let gw = env.gateway().await;
    let id = env.submit(&gw, "Never to be", json!({"max_new_tokens": 5})).await;
    let body = env.cancel(&gw, &id).await;
    assert_eq!(body["cancelled"], true, "{body}");

    // The worker reads the cancel from the stream when it starts, then receives the job and skips it.
    let w = env.spawn_worker(&[]);
    env.wait_for_consumers(1).await;
    env.wait_for_jobs_queue(0, 1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !env.workers[w].log().contains("job cancelled before it ran") {
        assert!(Instant::now() < deadline, "{}", env.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = env.workers[w].log();
    assert!(!log.contains("job started"), "the cancelled job ran:\n{log}");
    let view = env.view(&gw, &id).await;
    assert_eq!(view["status"], "cancelled");
    assert_eq!(view["attempts"], 0, "{view}");
    env.finish().await;
}

#[tokio::test]
async fn a_run_client_that_hangs_up_cancels_its_job() {
    let mut env = Env::new();
    let gw = env.gateway().await;
    let metrics = worker_with_metrics(&mut env, &[]).await;

    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(1500))
        .build()
        .unwrap();
    let body = json!({"prompt": "A long story", "parameters": long_job(1800)});
    let hung_up = client.post(format!("{gw}/run")).json(&body).send().await;
    assert!(hung_up.is_err(), "the client gives up before the answer");

    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(
        &env.http,
        &metrics,
        "worker_jobs_finished_total{finish_reason=\"cancelled\"}",
    )
    .await
        < 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the job was not cancelled\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tokens = metric(&env.http, &metrics, "worker_generation_tokens_total").await;
    assert!(tokens < 1800.0, "{tokens} tokens: the job ran to its end");
    env.finish().await;
}

/// Waits until the worker has cancelled `n` jobs.
async fn wait_cancelled(env: &Env, metrics: &str, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(
        &env.http,
        metrics,
        "worker_jobs_finished_total{finish_reason=\"cancelled\"}",
    )
    .await
        < n
    {
        assert!(
            Instant::now() < deadline,
            "no cancel reached the worker\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn hanging_up_an_openai_stream_or_an_event_stream_that_owns_its_job_cancels_the_job() {
    let mut env = Env::new();
    let gw = env.gateway().await;
    let metrics = worker_with_metrics(&mut env, &[]).await;
    // An OpenAI stream, dropped after a few chunks.
    let body = json!({"model": "EleutherAI/gpt-j-6b", "prompt": "Tell me a long story", "max_tokens": 1800,
                      "min_tokens": 1800, "temperature": 0, "stream": true});
    let r = env
        .http
        .post(format!("{gw}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut chunks = SseReader::new(r);
    for _ in 0..3 {
        let chunk = chunks.next().await.unwrap();
        assert!(chunk.data.contains("text_completion"), "{chunk:?}");
    }
    drop(chunks);
    wait_cancelled(&env, &metrics, 1.0).await;

    // An event stream that asked to own its job.
    let id = env.submit(&gw, "Another long story", long_job(1800)).await;
    let r = env
        .http
        .get(format!("{gw}/v1/jobs/{id}/events?cancel_on_disconnect=true"))
        .send()
        .await
        .unwrap();
    let mut stream = SseReader::new(r);
    while stream.next().await.unwrap().event != "token" {}
    drop(stream);
    wait_cancelled(&env, &metrics, 2.0).await;
    let view = env
        .poll_until(&gw, &id, Duration::from_secs(10), |v| v["status"] != "running")
        .await;
    assert_eq!(view["status"], "cancelled");
    env.finish().await;
}
