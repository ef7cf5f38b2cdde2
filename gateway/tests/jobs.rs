//! Job submission, polling, `/run`, the queue figures, API keys, the documents, and a stream's token chunks,
//! against the real Redis and RabbitMQ.
//!
//! No worker runs here: where a job must progress, the test itself stands in for a worker at the AMQP
//! contract level — it takes the message from `{ns}.jobs` and publishes `job.started` / `job.token` /
//! `job.succeeded` replies on the message's `reply_to` with its `correlation_id`, exactly as
//! `docs/amqp.md` tells any worker to. The end-to-end tests with real workers live elsewhere.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions panic on purpose

mod common;

use std::time::Duration;

use common::{TestEnv, amqp, json, poll, poll_until, reply, started, submit, succeeded, take};
use serde_json::{Value, json};
use shared::{JobId, JobReply, JobRequest};

const GENEROUS: &[&str] = &["--submit-rate-limit", "10000/1s", "--read-rate-limit", "10000/1s"];

#[tokio::test]
async fn a_submitted_job_is_on_the_jobs_queue_with_the_contracts_properties() {
    let mut env = TestEnv::new();
    let gw = env.gateway(GENEROUS).await;
    let r = env
        .http
        .post(gw.url("/v1/jobs"))
        .json(&json!({"prompt": "  Hello,\t$world!\u{0}  ", "parameters": {"max_new_tokens": 7}}))
        .send()
        .await
        .unwrap();
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let (status, body) = json(r).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(body["status"], "queued");
    assert_eq!(body["prompt"], "  Hello,\t$world!  ", "as written, less the NUL");
    assert_eq!(location, format!("/v1/jobs/{id}"));

    let (_conn, channel) = amqp().await;
    let msg = take(&channel, &env.jobs_queue()).await;
    let p = &msg.delivery.properties;
    assert_eq!(p.correlation_id().as_ref().map(|s| s.as_str()), Some(id.as_str()));
    assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some(id.as_str()));
    assert_eq!(
        p.reply_to().as_ref().map(|s| s.to_string()),
        Some(env.replies_queue())
    );
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(*p.delivery_mode(), Some(2), "persistent");
    let job: JobRequest = serde_json::from_slice(&msg.delivery.data).unwrap();
    assert_eq!(job.version, 1);
    assert_eq!(
        job.prompt, "  Hello,\t$world!  ",
        "the prompt as accepted is published"
    );
    assert_eq!(job.parameters.max_new_tokens, Some(7));
    assert!(job.submitted_at_ms.is_some());

    env.finish().await;
}

#[tokio::test]
async fn with_no_worker_the_queue_depth_equals_the_jobs_submitted() {
    let mut env = TestEnv::new();
    let mut flags = GENEROUS.to_vec();
    flags.extend(["--queue-stats-cache-ms", "0"]);
    let gw = env.gateway(&flags).await;
    for i in 0..7 {
        let (status, body) = submit(&env.http, &gw, json!({"prompt": format!("job {i}")})).await;
        assert_eq!(status, 202, "{body}");
    }
    // Every 202 came after the broker's confirm, so all seven are counted at once.
    let (status, q) = json(env.http.get(gw.url("/v1/queue")).send().await.unwrap()).await;
    assert_eq!(status, 200, "{q}");
    assert_eq!(q["depth"], 7, "{q}");
    assert_eq!(q["running"], 0, "{q}");
    assert_eq!(q["consumers"], 0, "{q}");
    env.finish().await;
}

#[tokio::test]
async fn a_poll_sees_queued_then_running_then_succeeded() {
    let mut env = TestEnv::new();
    let gw = env.gateway(GENEROUS).await;
    let (status, body) = submit(&env.http, &gw, json!({"prompt": "Once upon a time"})).await;
    assert_eq!(status, 202);
    let id = body["id"].as_str().unwrap().to_owned();

    let queued = poll(&env, &gw, &id).await;
    assert_eq!(queued["status"], "queued");
    assert_eq!(queued["prompt"], "Once upon a time");
    assert_eq!(queued["queue"]["position"], 1, "{queued}");

    // Stand in for a worker: take the job, answer on its reply_to.
    let (_conn, channel) = amqp().await;
    let msg = take(&channel, &env.jobs_queue()).await;
    let reply_to = msg.delivery.properties.reply_to().as_ref().unwrap().to_string();
    let job_id: JobId = id.parse().unwrap();
    let start = started(job_id);
    reply(&channel, &reply_to, &start).await;
    let running = poll_until(&env, &gw, &id, "running").await;
    assert_eq!(running["worker_id"], "test-worker");
    // The same reply again (redelivered: a gateway died before acknowledging it) is not a second start.
    reply(&channel, &reply_to, &start).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(poll(&env, &gw, &id).await["attempts"], 1);
    let (_, q) = json(env.http.get(gw.url("/v1/queue")).send().await.unwrap()).await;
    assert_eq!(q["running"], 1, "{q}");

    reply(
        &channel,
        &reply_to,
        &succeeded(job_id, "Once upon a time", " there was a cat"),
    )
    .await;
    let done = poll_until(&env, &gw, &id, "succeeded").await;
    assert_eq!(done["result"]["text"], " there was a cat");
    assert_eq!(done["result"]["full_text"], "Once upon a time there was a cat");
    assert_eq!(done["result"]["finish_reason"], "length");
    assert_eq!(done["timings"]["inference_ms"], 30);
    assert_eq!(done["timings"]["queued_ms"], 5);
    assert_eq!(done["timings"]["time_to_first_token_ms"], 12);
    assert_eq!(done["result"]["batch_size"], 4);
    assert_eq!(done["worker_id"], "test-worker");

    // A late duplicate `job.started` (a redelivery) cannot take the result back.
    reply(&channel, &reply_to, &started(job_id)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(poll(&env, &gw, &id).await["status"], "succeeded");
    let (_, q) = json(env.http.get(gw.url("/v1/queue")).send().await.unwrap()).await;
    assert_eq!(q["running"], 0, "{q}");

    env.finish().await;
}

#[tokio::test]
async fn a_result_past_its_ttl_reads_as_expired() {
    let mut env = TestEnv::new();
    let mut flags = GENEROUS.to_vec();
    flags.extend(["--result-ttl-s", "1"]);
    let gw = env.gateway(&flags).await;
    let (_, body) = submit(&env.http, &gw, json!({"prompt": "short lived"})).await;
    let id = body["id"].as_str().unwrap().to_owned();
    let (_conn, channel) = amqp().await;
    let msg = take(&channel, &env.jobs_queue()).await;
    let reply_to = msg.delivery.properties.reply_to().as_ref().unwrap().to_string();
    reply(
        &channel,
        &reply_to,
        &succeeded(id.parse().unwrap(), "short lived", " text"),
    )
    .await;
    let done = poll_until(&env, &gw, &id, "succeeded").await;
    assert!(done["result"].is_object());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let expired = poll(&env, &gw, &id).await;
    assert_eq!(expired["status"], "expired");
    assert!(expired.get("result").is_none(), "{expired}");
    env.finish().await;
}

#[tokio::test]
async fn run_answers_with_the_prompt_and_continuation_whichever_replica_consumed_the_reply() {
    let mut env = TestEnv::new();
    // Waits must be woken by the completion notice: the fallback poll is far beyond the test's patience.
    let mut flags = GENEROUS.to_vec();
    flags.extend([
        "--run-poll-interval-ms",
        "600000",
        "--run-timeout-s",
        "20",
        "--max-run-waits-per-client",
        "10",
    ]);
    let a = env.gateway(&flags).await;
    let _b = env.gateway(&flags).await;

    // Both replicas consume the replies queue, and the broker hands deliveries round-robin to its
    // consumers, so of six replies B consumes some: those /run waits on A finish only through the notice.
    let (_conn, channel) = amqp().await;
    let replies = channel
        .queue_declare(
            env.replies_queue().as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(replies.consumer_count(), 2);

    // Six /run calls on replica A.
    let mut calls = Vec::new();
    for i in 0..6 {
        let http = env.http.clone();
        let url = a.url("/run");
        calls.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .json(&json!({"data": format!("Prompt number {i}"), "num_tokens": 3}))
                .send()
                .await
                .unwrap();
            json(r).await
        }));
    }
    for _ in 0..6 {
        let msg = take(&channel, &env.jobs_queue()).await;
        let job: JobRequest = serde_json::from_slice(&msg.delivery.data).unwrap();
        assert_eq!(job.parameters.max_new_tokens, Some(3));
        let id: JobId = msg
            .delivery
            .properties
            .correlation_id()
            .as_ref()
            .unwrap()
            .as_str()
            .parse()
            .unwrap();
        let reply_to = msg.delivery.properties.reply_to().as_ref().unwrap().to_string();
        reply(&channel, &reply_to, &succeeded(id, &job.prompt, " and so on")).await;
    }
    let mut answers = Vec::new();
    for call in calls {
        let (status, body) = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status, 200, "{body}");
        answers.push(body.as_str().expect("a JSON string").to_owned());
    }
    answers.sort();
    let expected: Vec<String> = (0..6).map(|i| format!("Prompt number {i} and so on")).collect();
    assert_eq!(answers, expected);
    env.finish().await;
}

#[tokio::test]
async fn run_times_out_with_504_and_the_job_id_and_the_job_goes_on() {
    let mut env = TestEnv::new();
    let mut flags = GENEROUS.to_vec();
    flags.extend(["--run-timeout-s", "1"]);
    let gw = env.gateway(&flags).await;
    let r = env
        .http
        .post(gw.url("/run"))
        .json(&json!({"data": "Slow one"}))
        .send()
        .await
        .unwrap();
    let (status, body) = json(r).await;
    assert_eq!((status, body["code"].as_str()), (504, Some("timeout")), "{body}");
    let id = body["job_id"].as_str().unwrap().to_owned();
    assert_eq!(poll(&env, &gw, &id).await["status"], "queued");
    // The job is still on the queue for a worker.
    let (_conn, channel) = amqp().await;
    let msg = take(&channel, &env.jobs_queue()).await;
    assert_eq!(
        msg.delivery
            .properties
            .correlation_id()
            .as_ref()
            .unwrap()
            .as_str(),
        id
    );
    env.finish().await;
}

#[tokio::test]
async fn run_waits_per_client_are_bounded() {
    let mut env = TestEnv::new();
    let mut flags = GENEROUS.to_vec();
    flags.extend(["--run-timeout-s", "2", "--max-run-waits-per-client", "2"]);
    let gw = env.gateway(&flags).await;
    let mut calls = Vec::new();
    for _ in 0..3 {
        let http = env.http.clone();
        let url = gw.url("/run");
        calls.push(tokio::spawn(async move {
            json(
                http.post(url)
                    .json(&json!({"data": "wait"}))
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut codes = Vec::new();
    for c in calls {
        codes.push(c.await.unwrap().1["code"].as_str().unwrap().to_owned());
    }
    codes.sort();
    assert_eq!(codes, ["timeout", "timeout", "too_many_waits"]);
    env.finish().await;
}

#[tokio::test]
async fn with_the_broker_down_submission_is_refused_with_503() {
    let mut env = TestEnv::new();
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", common::closed_port());
    let mut flags = GENEROUS.to_vec();
    flags.extend(["--amqp-url", url.as_str()]);
    let gw = env.gateway_with(&flags, false).await;
    let r = env
        .http
        .post(gw.url("/v1/jobs"))
        .json(&json!({"prompt": "hello"}))
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("retry-after"));
    let (status, body) = json(r).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("unavailable")),
        "{body}"
    );
    assert!(
        !body["message"].as_str().unwrap().contains("127.0.0.1"),
        "internals stay in the log: {body}"
    );
    let (status, ready) = json(env.http.get(gw.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(status, 503);
    assert_eq!(ready["rabbitmq"], false);
    assert_eq!(ready["rabbitmq_blocked"], false);
    assert_eq!(ready["redis"], true);
    // Never connected: the gateway has not finished starting, and says so.
    let (status, health) = json(env.http.get(gw.url("/healthz")).send().await.unwrap()).await;
    assert_eq!(
        (status, health["status"].as_str()),
        (503, Some("starting")),
        "{health}"
    );
    env.finish().await;
}

#[tokio::test]
async fn with_api_keys_a_job_is_readable_only_with_its_own_key() {
    let mut env = TestEnv::new();
    let mut flags = GENEROUS.to_vec();
    flags.extend(["--api-keys", "alpha,beta"]);
    let gw = env.gateway(&flags).await;
    let http = &env.http;
    let body = json!({"prompt": "secret plans"});

    let (status, b) = json(http.post(gw.url("/v1/jobs")).json(&body).send().await.unwrap()).await;
    assert_eq!((status, b["code"].as_str()), (401, Some("unauthorized")), "{b}");
    let (status, b) = json(
        http.post(gw.url("/v1/jobs"))
            .bearer_auth("gamma")
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401, "{b}");

    let (status, b) = json(
        http.post(gw.url("/v1/jobs"))
            .bearer_auth("alpha")
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 202, "{b}");
    let url = gw.url(&format!("/v1/jobs/{}", b["id"].as_str().unwrap()));

    let (status, _) = json(http.get(&url).bearer_auth("alpha").send().await.unwrap()).await;
    assert_eq!(status, 200);
    let (status, b) = json(http.get(&url).bearer_auth("beta").send().await.unwrap()).await;
    assert_eq!(
        (status, b["code"].as_str()),
        (404, Some("not_found")),
        "another key's job does not exist"
    );
    let (status, _) = json(http.get(&url).send().await.unwrap()).await;
    assert_eq!(status, 401);
    env.finish().await;
}

#[tokio::test]
async fn the_api_is_documented_and_observable() {
    let mut env = TestEnv::new();
    let gw = env.gateway(GENEROUS).await;
    let (status, doc) = json(env.http.get(gw.url("/openapi.json")).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/run",
        "/v1/queue",
        "/metrics",
        "/healthz",
        "/readyz",
        "/v1/jobs/{id}/events",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} undocumented");
    }
    assert!(
        doc["paths"]["/v1/jobs/{id}"]["delete"].is_object(),
        "cancel undocumented"
    );
    assert!(doc["components"]["schemas"]["GenerationParameters"].is_object());
    // The reference page, its assets served by the gateway, reads the document from /openapi.json.
    let page = env.http.get(gw.url("/docs")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("swagger-ui"));
    let init = env
        .http
        .get(gw.url("/docs/swagger-initializer.js"))
        .send()
        .await
        .unwrap();
    assert!(init.text().await.unwrap().contains("/openapi.json"));

    let (status, _) = json(env.http.get(gw.url("/healthz")).send().await.unwrap()).await;
    assert_eq!(status, 200);
    let (status, _) = submit(&env.http, &gw, json!({"prompt": "count me"})).await;
    assert_eq!(status, 202);
    let text = common::metrics_text(&env, &gw).await;
    for metric in [
        "gateway_http_requests_total",
        "gateway_http_request_duration_seconds_bucket",
        "gateway_jobs_total",
        "gateway_queue_depth",
        "gateway_jobs_running",
    ] {
        assert!(text.contains(metric), "{metric} missing from /metrics");
    }
    env.finish().await;
}

/// Closes this test's gateway publishing connection at the broker (only that: other tests share the broker).
fn close_gateway_connections(ns: &str) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut closed = 0;
    for line in text
        .lines()
        .filter(|l| l.contains(&format!("gateway {ns} publish")))
    {
        let pid = line.split_whitespace().next().unwrap();
        let status = std::process::Command::new("rabbitmqctl")
            .args(["-q", "close_connection", pid, "test: connection dropped"])
            .status()
            .unwrap();
        assert!(status.success());
        closed += 1;
    }
    closed
}

#[tokio::test]
async fn the_gateway_reconnects_when_the_broker_drops_its_connection() {
    let mut env = TestEnv::new();
    let gw = env.gateway(GENEROUS).await;
    let (status, before) = submit(&env.http, &gw, json!({"prompt": "before the drop"})).await;
    assert_eq!(status, 202);

    assert_eq!(close_gateway_connections(&env.ns), 1);

    // Publishing comes back (a 503 in between is allowed: never a 202 for a job the broker lacks).
    let mut after = Value::Null;
    for _ in 0..100 {
        let (status, body) = submit(&env.http, &gw, json!({"prompt": "after the drop"})).await;
        assert!(status == 202 || status == 503, "{status} {body}");
        if status == 202 {
            after = body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(after.is_object(), "never published again");

    // Both jobs are on the queue, and replies are consumed again.
    let (_conn, channel) = amqp().await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let msg = take(&channel, &env.jobs_queue()).await;
        ids.push(
            msg.delivery
                .properties
                .correlation_id()
                .as_ref()
                .unwrap()
                .to_string(),
        );
    }
    ids.sort();
    let mut expected = vec![
        before["id"].as_str().unwrap().to_owned(),
        after["id"].as_str().unwrap().to_owned(),
    ];
    expected.sort();
    assert_eq!(ids, expected);
    let id = after["id"].as_str().unwrap().to_owned();
    reply(
        &channel,
        &env.replies_queue(),
        &succeeded(id.parse().unwrap(), "after the drop", " ok"),
    )
    .await;
    poll_until(&env, &gw, &id, "succeeded").await;
    env.finish().await;
}

#[tokio::test]
async fn a_job_that_expires_in_the_queue_ends_failed_as_expired_and_run_answers_at_once() {
    let mut env = TestEnv::new();
    let mut flags = GENEROUS.to_vec();
    flags.extend(["--job-expiration-ms", "300", "--queue-stats-cache-ms", "0"]);
    let gw = env.gateway(&flags).await;
    // No worker: the broker dead-letters the job after 300 ms, and the gateway reads why.
    let (status, body) = submit(&env.http, &gw, json!({"prompt": "nobody will take this"})).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    let mut view = poll(&env, &gw, &id).await;
    for _ in 0..100 {
        if view["status"] != "queued" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        view = poll(&env, &gw, &id).await;
    }
    assert_eq!(view["status"], "failed", "{view}");
    assert_eq!(view["error"]["code"], "expired", "{view}");
    assert_eq!(view["worker_id"], "broker", "{view}");
    let (_, q) = json(env.http.get(gw.url("/v1/queue")).send().await.unwrap()).await;
    assert_eq!(
        (q["depth"].clone(), q["running"].clone()),
        (json!(0), json!(0)),
        "{q}"
    );

    // `/run` on such a job answers when it expires, not at its timeout.
    let started = std::time::Instant::now();
    let r = env
        .http
        .post(gw.url("/run"))
        .json(&json!({"data": "nobody will take this either"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "expired", "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    env.finish().await;
}

#[tokio::test]
async fn an_amqp_producers_job_that_expires_gets_its_job_failed_from_the_gateway() {
    let mut env = TestEnv::new();
    let _gw = env.gateway(GENEROUS).await;
    let (conn, ch) = amqp().await;
    let own = ch
        .queue_declare(
            "".into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let id = JobId::new_random().to_string();
    let body = serde_json::to_vec(&JobRequest::new("expire me", Default::default())).unwrap();
    ch.basic_publish(
        "".into(),
        env.jobs_queue().as_str().into(),
        lapin::options::BasicPublishOptions::default(),
        &body,
        lapin::BasicProperties::default()
            .with_correlation_id(id.as_str().into())
            .with_reply_to(own.name().clone())
            .with_expiration("300".into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // No worker takes it; once it expires the gateway answers on the producer's own queue.
    let msg = take(&ch, own.name().as_str()).await;
    assert_eq!(
        msg.delivery.properties.kind().as_ref().map(|k| k.as_str()),
        Some("job.failed")
    );
    let reply: Value = serde_json::from_slice(&msg.delivery.data).unwrap();
    assert_eq!(
        (reply["job_id"].as_str(), reply["error"]["code"].as_str()),
        (Some(id.as_str()), Some("expired")),
        "{reply}"
    );
    let _ = conn.close(200, "".into()).await;
    env.finish().await;
}

#[tokio::test]
async fn submissions_refused_for_the_gateways_own_trouble_spend_no_rate_quota() {
    let mut env = TestEnv::new();
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", common::closed_port());
    let gw = env
        .gateway_with(
            &["--amqp-url", url.as_str(), "--submit-rate-limit", "2/60s"],
            false,
        )
        .await;
    // With the broker unreachable every submission is 503; none uses up the budget of two.
    for _ in 0..4 {
        let (status, body) = submit(&env.http, &gw, json!({"prompt": "hello"})).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (503, Some("unavailable")),
            "{body}"
        );
    }
    env.finish().await;
}

/// The log-probability the stand-in worker gives token `id` (told apart by its value).
fn scored(id: u32) -> shared::TokenLogprob {
    shared::TokenLogprob {
        id,
        logprob: Some(-(id as f32) / 1000.0),
        top: vec![shared::TopLogprob {
            id,
            logprob: -(id as f32) / 1000.0,
        }],
    }
}

/// A `job.token` chunk for `ids`, with their log-probabilities.
fn chunk(job: JobId, index: u32, ids: &[u32], text_offset: u32, text: &str) -> JobReply {
    JobReply::Token(shared::reply::Token {
        job_id: job,
        index,
        token_ids: ids.to_vec(),
        text_offset,
        text: text.into(),
        logprobs: Some(ids.iter().copied().map(scored).collect()),
    })
}

#[tokio::test]
async fn a_streamed_completions_chunks_carry_each_tokens_logprobs_once_in_order() {
    let mut env = TestEnv::new();
    let flags = [GENEROUS, &["--served-model-name", "gpt-j"]].concat();
    let gw = env.gateway(&flags).await;
    let request = json!({"model": "gpt-j", "prompt": "Hello", "max_tokens": 5, "temperature": 0,
        "logprobs": 1, "stream": true});
    let response = env
        .http
        .post(gw.url("/v1/completions"))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // Stand in for a worker: " world" (995) "," (11) " and" (290) " world" (995) "." (13).
    let (_conn, channel) = amqp().await;
    let msg = take(&channel, &env.jobs_queue()).await;
    let reply_to = msg.delivery.properties.reply_to().as_ref().unwrap().to_string();
    let job: JobId = msg
        .delivery
        .properties
        .correlation_id()
        .as_ref()
        .unwrap()
        .as_str()
        .parse()
        .unwrap();
    let job_request: JobRequest = serde_json::from_slice(&msg.delivery.data).unwrap();
    assert_eq!(job_request.parameters.logprobs, Some(1), "the job asks for them");
    for r in [
        started(job),
        chunk(job, 0, &[995, 11], 0, " world,"),
        // Redelivered, then a rerun's chunk that overlaps what the log has: only the new token and text.
        chunk(job, 0, &[995, 11], 0, " world,"),
        chunk(job, 1, &[11, 290], 6, ", and"),
        // Its text held back (it may begin a stop sequence): the token's score goes anyway.
        chunk(job, 3, &[995], 11, ""),
    ] {
        reply(&channel, &reply_to, &r).await;
    }
    // The result's last token never came in a chunk: the log takes it, with its score, from the result.
    let JobReply::Succeeded(mut result) = succeeded(job, "Hello", " world, and world.") else {
        unreachable!()
    };
    result.token_ids = vec![995, 11, 290, 995, 13];
    result.new_tokens = 5;
    result.logprobs = Some(result.token_ids.iter().copied().map(scored).collect());
    reply(&channel, &reply_to, &JobReply::Succeeded(result)).await;

    let body = response.text().await.unwrap();
    let chunks: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .take_while(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let pieces: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]).collect();
    let text: String = pieces.iter().map(|p| p["text"].as_str().unwrap()).collect();
    assert_eq!(text, " world, and world.");
    let carrying: Vec<&Value> = pieces
        .iter()
        .filter(|p| !p["logprobs"].is_null())
        .copied()
        .collect();
    let joined = |field: &str| -> Vec<Value> {
        carrying
            .iter()
            .flat_map(|p| p["logprobs"][field].as_array().unwrap().clone())
            .collect()
    };
    assert_eq!(
        joined("tokens"),
        [" world", ",", " and", " world", "."],
        "each token once, in order: {body}"
    );
    let floats =
        |values: Vec<Value>| -> Vec<f32> { values.iter().map(|v| v.as_f64().unwrap() as f32).collect() };
    assert_eq!(
        floats(joined("token_logprobs")),
        [995, 11, 290, 995, 13].map(|id| scored(id).logprob.unwrap()),
        "the worker's scores, exactly"
    );
    assert_eq!(
        joined("text_offset"),
        [0, 6, 7, 11, 17].map(|o| json!(o)),
        "offsets run on across chunks"
    );
    let top = joined("top_logprobs")[2].clone();
    assert_eq!(
        (
            top.as_object().unwrap().len(),
            top[" and"].as_f64().unwrap() as f32
        ),
        (1, scored(290).logprob.unwrap())
    );
    assert!(
        carrying
            .iter()
            .any(|p| p["text"] == "" && p["logprobs"]["tokens"] == json!([" world"])),
        "a chunk whose text is held still carries its token's score: {body}"
    );
    let last = pieces.last().unwrap();
    assert_eq!(
        (last["finish_reason"].as_str(), &last["logprobs"]),
        (Some("length"), &Value::Null),
        "the last chunk repeats none"
    );
    env.finish().await;
}
