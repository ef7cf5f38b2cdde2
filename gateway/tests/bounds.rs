//! Every accepted job ends in a true state, and what the gateway accepts is bounded: safe retries
//! (`Idempotency-Key`, unconfirmed publishes kept and republished), the backlog and cost bounds, separate
//! publishing and consuming connections, several broker URLs, and the HTTP edges (one body deadline, a
//! connection caps, per client and in all; open streams per client, and what idle ones cost Redis). Real Redis and RabbitMQ; the broker's confirms are withheld by a real TCP proxy
//! ([`shared::testing::StallProxy`]); no worker runs, the test answers for one at the AMQP contract level where needed.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions panic on purpose

mod common;

use std::time::{Duration, Instant};

use common::{
    TestEnv, amqp, depth, json, poll, poll_until, read_job, reply, started, submit, succeeded, take,
};
use serde_json::{Value, json};
use shared::JobId;
use shared::testing::StallProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GENEROUS: &[&str] = &["--submit-rate-limit", "10000/1s", "--read-rate-limit", "10000/1s"];

fn flags<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut f = GENEROUS.to_vec();
    f.extend_from_slice(extra);
    f
}

/// A gateway whose broker connections go through a [`StallProxy`] (the first one it opens publishes).
async fn through_proxy(env: &mut TestEnv, extra: &[&str]) -> (StallProxy, common::Gateway) {
    let proxy = StallProxy::start("127.0.0.1:5672").await.unwrap();
    let url = proxy.amqp_url();
    let mut f = flags(&["--amqp-url", &url]);
    f.extend_from_slice(extra);
    let gw = env.gateway(&f).await;
    (proxy, gw)
}

async fn submit_keyed(env: &TestEnv, gw: &common::Gateway, key: &str, body: Value) -> reqwest::Response {
    env.http
        .post(gw.url("/v1/jobs"))
        .header("idempotency-key", key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_idempotency_key_returns_the_same_job_instead_of_a_second_one() {
    let mut env = TestEnv::new();
    let gw = env.gateway(&flags(&["--queue-stats-cache-ms", "0"])).await;
    let body = json!({"prompt": "only once", "parameters": {"max_new_tokens": 5}});
    let first = submit_keyed(&env, &gw, "order-42", body.clone()).await;
    assert_eq!(first.status(), 202);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let (_, first) = json(first).await;
    // The retry of a client that never saw the first answer: same job, no second message, no charge.
    let again = submit_keyed(&env, &gw, "order-42", body.clone()).await;
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let (_, again) = json(again).await;
    assert_eq!(again["id"], first["id"], "{again}");
    assert_eq!(again["status"], "queued");
    let (_conn, channel) = amqp().await;
    assert_eq!(depth(&channel, &env.jobs_queue()).await, 1);

    // The same key with another body is a client bug, named as such, with the job the key belongs to.
    let (status, other) =
        json(submit_keyed(&env, &gw, "order-42", json!({"prompt": "something else"})).await).await;
    assert_eq!(
        (status, other["code"].as_str()),
        (422, Some("idempotency_key_reused")),
        "{other}"
    );
    assert_eq!(other["job_id"], first["id"]);
    // Another key is another job.
    let (status, third) = json(submit_keyed(&env, &gw, "order-43", body).await).await;
    assert_eq!(status, 202);
    assert_ne!(third["id"], first["id"]);
    assert_eq!(depth(&channel, &env.jobs_queue()).await, 2);
    // A key that is not printable ASCII is refused before anything is queued.
    let (status, bad) = json(submit_keyed(&env, &gw, "", json!({"prompt": "x"})).await).await;
    assert_eq!(
        (status, bad["code"].as_str()),
        (422, Some("invalid_parameter")),
        "{bad}"
    );
    assert!(
        bad["message"].as_str().unwrap().contains("Idempotency-Key"),
        "{bad}"
    );
    env.finish().await;
}

#[tokio::test]
async fn a_client_at_its_cap_of_active_jobs_gets_429_until_one_ends() {
    let mut env = TestEnv::new();
    let gw = env.gateway(&flags(&["--max-active-jobs-per-client", "2"])).await;
    let mut ids = Vec::new();
    for i in 0..2 {
        let (status, body) = submit(&env.http, &gw, json!({"prompt": format!("job {i}")})).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    let refused = env
        .http
        .post(gw.url("/v1/jobs"))
        .json(&json!({"prompt": "third"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let (_, body) = json(refused).await;
    assert_eq!(body["code"], "too_many_active_jobs", "{body}");

    // One ends (cancelled): its place is free again.
    let cancel = env
        .http
        .delete(gw.url(&format!("/v1/jobs/{}", ids[0])))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 200);
    let (status, body) = submit(&env.http, &gw, json!({"prompt": "third, later"})).await;
    assert_eq!(status, 202, "{body}");
    // And one that succeeds frees its place too.
    let (_conn, channel) = amqp().await;
    let id: JobId = ids[1].parse().unwrap();
    reply(&channel, &env.replies_queue(), &succeeded(id, "p", " done")).await;
    poll_until(&env, &gw, &ids[1], "succeeded").await;
    let (status, body) = submit(&env.http, &gw, json!({"prompt": "fourth"})).await;
    assert_eq!(status, 202, "{body}");
    let (status, _) = submit(&env.http, &gw, json!({"prompt": "fifth"})).await;
    assert_eq!(status, 429);
    env.finish().await;
}

#[tokio::test]
async fn the_token_budget_counts_generated_tokens_times_beams() {
    let mut env = TestEnv::new();
    let gw = env.gateway(&flags(&["--token-rate-limit", "100/60s"])).await;
    let job = |tokens: u32, beams: u32| {
        let mut parameters = json!({"max_new_tokens": tokens});
        if beams > 1 {
            parameters = json!({"max_new_tokens": tokens, "strategy": "beam", "num_beams": beams});
        }
        json!({"prompt": "cost me", "parameters": parameters})
    };
    // 4 beams × 30 tokens cost 120, more than the whole budget: never admissible, so 422, not 429.
    let (status, body) = submit(&env.http, &gw, job(30, 4)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("token_rate_limited")),
        "{body}"
    );
    let (status, body) = submit(&env.http, &gw, job(60, 1)).await;
    assert_eq!(status, 202, "{body}");
    // 60 + 2 × 25 = 110 > 100: refused, with the time until the bucket has room.
    let refused = env
        .http
        .post(gw.url("/v1/jobs"))
        .json(&job(25, 2))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    let (_, body) = json(refused).await;
    assert_eq!(body["code"], "token_rate_limited", "{body}");
    // What is left (40) still admits a job that fits.
    let (status, body) = submit(&env.http, &gw, job(40, 1)).await;
    assert_eq!(status, 202, "{body}");
    env.finish().await;
}

#[tokio::test]
async fn a_full_queue_answers_503_queue_full_with_retry_after() {
    let mut env = TestEnv::new();
    let gw = env
        .gateway(&flags(&["--max-queued-jobs", "2", "--queue-stats-cache-ms", "0"]))
        .await;
    for i in 0..2 {
        let (status, body) = submit(&env.http, &gw, json!({"prompt": format!("job {i}")})).await;
        assert_eq!(status, 202, "{body}");
    }
    // The bound reads a depth up to 250 ms old (a broker round trip per submission would cost more).
    let stale = Duration::from_millis(300);
    tokio::time::sleep(stale).await;
    let refused = env
        .http
        .post(gw.url("/v1/jobs"))
        .json(&json!({"prompt": "one too many"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "retry-after {retry}");
    let (_, body) = json(refused).await;
    assert_eq!(body["code"], "queue_full", "{body}");
    // A worker takes one: there is room again.
    let (_conn, channel) = amqp().await;
    take(&channel, &env.jobs_queue()).await;
    tokio::time::sleep(stale).await;
    let (status, body) = submit(&env.http, &gw, json!({"prompt": "now it fits"})).await;
    assert_eq!(status, 202, "{body}");
    env.finish().await;
}

#[tokio::test]
async fn an_unconfirmed_publish_keeps_the_job_and_republishes_it_until_confirmed() {
    let mut env = TestEnv::new();
    let (proxy, gw) = through_proxy(
        &mut env,
        &["--publish-timeout-ms", "300", "--queue-stats-cache-ms", "0"],
    )
    .await;
    // The confirms of the publishing connection stop coming back; the publish itself reaches the broker.
    proxy.stall(0, true);
    let (status, body) = submit(&env.http, &gw, json!({"prompt": "was it sent?"})).await;
    // Not 503: the broker may have the job, so the gateway keeps it and says where to poll.
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(poll(&env, &gw, &id).await["status"], "queued");
    let (_conn, channel) = amqp().await;
    assert!(
        depth(&channel, &env.jobs_queue()).await >= 1,
        "the first copy is on the queue"
    );
    // The link recovers; the gateway republishes until a copy is confirmed.
    proxy.stall(0, false);
    let start = Instant::now();
    loop {
        let text = common::metrics_text(&env, &gw).await;
        if common::metric_at_least(&text, "gateway_jobs_total{outcome=\"republished\"}", 1.0) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "never republished:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // At least once: every copy is the same job, and the first end a worker reports is the one kept. The
    // republished copy is confirmed, but the count a passive declare reports may trail the confirm by a
    // moment on a busy broker: wait for it rather than read it once.
    let start = Instant::now();
    let copies = loop {
        let copies = depth(&channel, &env.jobs_queue()).await;
        if copies >= 2 {
            break copies;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{copies} copies on the queue after the republish was confirmed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for _ in 0..copies {
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
    }
    let job: JobId = id.parse().unwrap();
    reply(&channel, &env.replies_queue(), &succeeded(job, "p", " first")).await;
    poll_until(&env, &gw, &id, "succeeded").await;
    reply(&channel, &env.replies_queue(), &succeeded(job, "p", " second")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(poll(&env, &gw, &id).await["result"]["text"], " first");
    drop(proxy);
    env.finish().await;
}

#[tokio::test]
async fn a_job_the_broker_never_confirms_ends_failed_publish_failed() {
    let mut env = TestEnv::new();
    let (proxy, gw) = through_proxy(
        &mut env,
        &["--publish-timeout-ms", "200", "--publish-retry-window-s", "1"],
    )
    .await;
    proxy.stall(0, true);
    let (status, body) = submit(&env.http, &gw, json!({"prompt": "lost in the mail"})).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    // Never a job `queued` for ever: past the retry window it ends, and says why.
    let job = poll_until(&env, &gw, &id, "failed").await;
    assert_eq!(job["error"]["code"], "publish_failed", "{job}");
    drop(proxy);
    env.finish().await;
}

/// Jobs waiting in the Redis outbox of unconfirmed publishes.
async fn outbox_len(ns: &str) -> u64 {
    let mut conn = common::redis().await;
    redis::cmd("ZCARD")
        .arg(common::keys(ns).outbox(shared::Lane::Interactive))
        .query_async(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_republish_outlives_the_gateway_that_started_it() {
    let mut env = TestEnv::new();
    let (proxy, first) = through_proxy(&mut env, &["--publish-timeout-ms", "300"]).await;
    proxy.stall(0, true);
    let (status, body) = submit(&env.http, &first, json!({"prompt": "who will finish me?"})).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    // The gateway that took the job goes away before any copy is confirmed: the job waits in Redis.
    env.stop_gateway(0).await;
    assert_eq!(outbox_len(&env.ns).await, 1);
    // Another replica, with a healthy link, finishes the publish.
    let second = env.gateway(GENEROUS).await;
    let start = Instant::now();
    while outbox_len(&env.ns).await > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the outbox was never emptied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(poll(&env, &second, &id).await["status"], "queued");
    let (_conn, channel) = amqp().await;
    assert!(depth(&channel, &env.jobs_queue()).await >= 1);
    drop(proxy);
    env.finish().await;
}

/// The ids of the job records in the namespace.
async fn record_ids(ns: &str) -> Vec<String> {
    let mut conn = common::redis().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{ns}:job:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    keys.into_iter()
        .map(|k| k.rsplit(':').next().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_job_whose_gateway_is_killed_before_the_confirm_is_published_by_another() {
    let mut env = TestEnv::new();
    let proxy = StallProxy::start("127.0.0.1:5672").await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // A real process, so that it can die the hard way (SIGKILL) with its publish in flight.
    let mut doomed = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--namespace", &env.ns, "--redis-url", common::REDIS_URL])
        .args(["--amqp-url", &proxy.amqp_url(), "--publish-timeout-ms", "3000"])
        .args([
            "--token-rate-limit",
            "1000000000/1s",
            "--max-active-jobs-per-client",
            "0",
        ])
        .args(GENEROUS)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let doomed_gw = common::Gateway {
        base: format!("http://127.0.0.1:{port}"),
    };
    let start = Instant::now();
    while !matches!(env.http.get(doomed_gw.url("/readyz")).send().await, Ok(r) if r.status() == 200) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the gateway never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The publishing link goes dead: the job will not reach the broker from this gateway.
    proxy.freeze(0, true);
    let http = env.http.clone();
    let submission = tokio::spawn(async move {
        http.post(doomed_gw.url("/v1/jobs"))
            .json(&json!({"prompt": "my gateway dies before the broker answers"}))
            .send()
            .await
    });
    // The job is admitted (its record written) and its publish waits on the dead link.
    let start = Instant::now();
    let id = loop {
        if let Some(id) = record_ids(&env.ns).await.pop() {
            break id;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the job was never admitted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    assert!(
        submission.await.unwrap().is_err(),
        "the client got no answer: it may hold the id (from a retry's Idempotency-Key or a lost response)"
    );
    let (_conn, channel) = amqp().await;
    assert_eq!(
        depth(&channel, &env.jobs_queue()).await,
        0,
        "no copy reached the queue"
    );
    // Another replica finds the job in the outbox, due once the dead one's publish had its chance.
    let second = env.gateway(GENEROUS).await;
    let start = Instant::now();
    while outbox_len(&env.ns).await > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the outbox was never emptied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(depth(&channel, &env.jobs_queue()).await, 1);
    let message = take(&channel, &env.jobs_queue()).await;
    let job: Value = serde_json::from_slice(&message.data).unwrap();
    assert_eq!(job["prompt"], "my gateway dies before the broker answers");
    assert_eq!(
        message.properties.message_id().as_ref().map(|m| m.as_str()),
        Some(id.as_str()),
        "republished under its own id"
    );
    assert_eq!(poll(&env, &second, &id).await["status"], "queued");
    drop(proxy);
    env.finish().await;
}

/// Binds (or unbinds) the namespace's cancellations stream to its control exchange.
async fn cancellations_bound(channel: &lapin::Channel, ns: &str, bound: bool) {
    let (queue, exchange) = (format!("{ns}.cancellations"), format!("{ns}.control"));
    let args = lapin::types::FieldTable::default();
    if bound {
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "".into(),
                Default::default(),
                args,
            )
            .await
            .unwrap();
    } else {
        channel
            .queue_unbind(queue.as_str().into(), exchange.as_str().into(), "".into(), args)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_cancel_the_broker_cannot_route_yet_is_tried_again_before_a_503() {
    let mut env = TestEnv::new();
    let gw = env.gateway(GENEROUS).await;
    let (_conn, channel) = amqp().await;
    let cancel = |id: String| {
        let (http, url) = (env.http.clone(), gw.url(&format!("/v1/jobs/{id}")));
        tokio::spawn(async move { http.delete(url).send().await.unwrap() })
    };

    // As for a moment after a broker restart: nothing takes the control exchange's messages (returned).
    let (_, body) = submit(&env.http, &gw, json!({"prompt": "cancel me soon"})).await;
    cancellations_bound(&channel, &env.ns, false).await;
    let pending = cancel(body["id"].as_str().unwrap().to_owned());
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !pending.is_finished(),
        "answered while the broker could not take the cancel"
    );
    cancellations_bound(&channel, &env.ns, true).await;
    let (status, body) = json(pending.await.unwrap()).await;
    assert_eq!((status, &body["status"]), (200, &json!("cancelled")), "{body}");

    // A broker that never takes it: 503 once the retries are spent, and the job goes on.
    let (_, body) = submit(&env.http, &gw, json!({"prompt": "cancel me never"})).await;
    let id = body["id"].as_str().unwrap().to_owned();
    cancellations_bound(&channel, &env.ns, false).await;
    let start = Instant::now();
    let (status, body) = json(cancel(id.clone()).await.unwrap()).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        start.elapsed() >= Duration::from_secs(3),
        "gave up after {:?}",
        start.elapsed()
    );
    assert_eq!(poll(&env, &gw, &id).await["status"], "queued");
    env.finish().await;
}

#[tokio::test]
async fn replies_are_consumed_while_the_publishing_connection_is_stalled() {
    let mut env = TestEnv::new();
    let (proxy, gw) = through_proxy(&mut env, &["--publish-timeout-ms", "300"]).await;
    assert_eq!(
        proxy.connections(),
        2,
        "one connection publishes, another consumes"
    );
    let (status, body) = submit(&env.http, &gw, json!({"prompt": "answer me"})).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    let (_conn, channel) = amqp().await;
    take(&channel, &env.jobs_queue()).await;
    // As under a broker alarm, the publishing connection is stuck; the replies still land.
    proxy.stall(0, true);
    reply(
        &channel,
        &env.replies_queue(),
        &succeeded(id.parse().unwrap(), "p", " done"),
    )
    .await;
    let job = poll_until(&env, &gw, &id, "succeeded").await;
    assert_eq!(job["result"]["text"], " done");
    proxy.stall(0, false);
    drop(proxy);
    env.finish().await;
}

#[tokio::test]
async fn a_body_dripped_slowly_meets_one_deadline_not_one_per_chunk() {
    let mut env = TestEnv::new();
    let gw = env.gateway(&flags(&["--body-read-timeout-ms", "1000"])).await;
    let addr = gw.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let body = br#"{"prompt": "drip, drip, drip, drip, drip"}"#;
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let start = Instant::now();
    let (mut read, mut write) = stream.into_split();
    // One byte every 200 ms: each chunk well inside the timeout, the whole body (8 s) far past it.
    let dripper = tokio::spawn(async move {
        for b in body {
            if write.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), read.read(&mut answer))
        .await
        .expect("no answer within 5 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "answered after {:?}",
        start.elapsed()
    );
    dripper.abort();
    env.finish().await;
}

/// A connection to `addr` from the local address `from` (any 127.x.y.z reaches the loopback), so a test
/// can be several clients.
async fn connect_from(addr: &str, from: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(addr.parse().unwrap()).await.unwrap()
}

/// One `GET path` on `stream`, and the head and body of its answer (read until the server closes or 5 s).
async fn get_on(stream: &mut tokio::net::TcpStream, path: &str) -> String {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = vec![0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => {
                answer.extend_from_slice(&buf[..n]);
                // A whole answer with a body: enough, whether or not the server closes.
                let text = String::from_utf8_lossy(&answer);
                if text.contains("\r\n\r\n") && text.trim_end().ends_with('}') {
                    break;
                }
            }
            Ok(Err(_)) => break,
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn past_the_connection_cap_health_still_answers_and_other_requests_get_503() {
    let mut env = TestEnv::new();
    let gw = env.gateway(&flags(&["--max-connections", "2"])).await;
    let addr = gw.base.trim_start_matches("http://").to_owned();
    // The harness's client may hold pooled connections from the readiness wait: take them out of play.
    env.http = reqwest::Client::new();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle_a = connect_from(&addr, "127.0.0.11").await;
    let _idle_b = connect_from(&addr, "127.0.0.12").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A liveness probe behind a full gateway is answered, not left in the backlog.
    let probe = get_on(&mut connect_from(&addr, "127.0.0.13").await, "/healthz").await;
    assert!(probe.starts_with("HTTP/1.1 200"), "{probe}");
    let ready = get_on(&mut connect_from(&addr, "127.0.0.13").await, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let refused = get_on(&mut connect_from(&addr, "127.0.0.14").await, "/v1/queue").await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    let lower = refused.to_ascii_lowercase();
    assert!(lower.contains("retry-after: 1"), "{refused}");
    assert!(lower.contains("connection: close"), "{refused}");
    assert!(refused.contains(r#""code":"too_many_connections""#), "{refused}");
    // A place given back is served in full again.
    drop(idle_a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let served = get_on(&mut connect_from(&addr, "127.0.0.14").await, "/v1/queue").await;
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    env.finish().await;
}

#[tokio::test]
async fn one_client_past_its_connection_bound_gets_429_and_locks_nobody_else_out() {
    let mut env = TestEnv::new();
    let gw = env.gateway(&flags(&["--max-connections-per-client", "2"])).await;
    let addr = gw.base.trim_start_matches("http://").to_owned();
    env.http = reqwest::Client::new();
    // One client's idle connections (as slow headers or idle streams hold them).
    let _held: Vec<_> = futures::future::join_all((0..2).map(|_| connect_from(&addr, "127.0.0.21"))).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = get_on(&mut connect_from(&addr, "127.0.0.21").await, "/v1/queue").await;
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    assert!(refused.contains(r#""code":"too_many_connections""#), "{refused}");
    assert!(
        refused.to_ascii_lowercase().contains("retry-after: 1"),
        "{refused}"
    );
    // Its probes are still answered, and another client is served as usual.
    let probe = get_on(&mut connect_from(&addr, "127.0.0.21").await, "/healthz").await;
    assert!(probe.starts_with("HTTP/1.1 200"), "{probe}");
    for _ in 0..5 {
        let other = get_on(&mut connect_from(&addr, "127.0.0.22").await, "/v1/queue").await;
        assert!(other.starts_with("HTTP/1.1 200"), "{other}");
    }
    env.finish().await;
}

/// Opens an event stream of job `id` and reads it until its text holds `until`.
async fn stream_until(env: &TestEnv, gw: &common::Gateway, id: &str, until: &str) -> reqwest::Response {
    let mut response = env
        .http
        .get(gw.url(&format!("/v1/jobs/{id}/events")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    read_until(&mut response, until).await;
    response
}

/// Reads the rest of a stream until its text holds `until` (10 s at most).
async fn read_until(response: &mut reqwest::Response, until: &str) {
    let mut seen = String::new();
    while !seen.contains(until) {
        let chunk = tokio::time::timeout(Duration::from_secs(10), response.chunk())
            .await
            .unwrap_or_else(|_| panic!("no `{until}` within 10 s: {seen}"))
            .unwrap()
            .unwrap_or_else(|| panic!("the stream ended before `{until}`: {seen}"));
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn a_client_holds_at_most_its_streams_and_a_refused_openai_request_queues_nothing() {
    let mut env = TestEnv::new();
    let gw = env.gateway(&flags(&["--max-streams-per-client", "2"])).await;
    let (_, job) = submit(&env.http, &gw, json!({"prompt": "followed"})).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let _a = stream_until(&env, &gw, &id, "event: queued").await;
    let b = stream_until(&env, &gw, &id, "event: queued").await;
    let (status, body) = json(
        env.http
            .get(gw.url(&format!("/v1/jobs/{id}/events")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "too_many_waits");
    let (_conn, channel) = amqp().await;
    let queued = depth(&channel, &env.jobs_queue()).await;
    let (status, body) = json(
        env.http
            .post(gw.url("/v1/completions"))
            .json(&json!({"model": "EleutherAI/gpt-j-6b", "prompt": "more", "stream": true}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(
        depth(&channel, &env.jobs_queue()).await,
        queued,
        "a refused request ran nothing"
    );
    // A stream closed gives its place back, once the gateway has noticed (at its next write: the queued
    // events come every few seconds).
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = env
            .http
            .get(gw.url(&format!("/v1/jobs/{id}/events")))
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 429);
        assert!(
            Instant::now() < deadline,
            "the closed stream's place never came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.finish().await;
}

/// A job submitted, taken off the queue and started, as a worker would: its id, and the broker connection
/// and channel that reply for it.
async fn started_job(
    env: &TestEnv,
    gw: &common::Gateway,
    prompt: &str,
) -> (String, (lapin::Connection, lapin::Channel)) {
    let (_, job) = submit(&env.http, gw, json!({ "prompt": prompt })).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let (conn, channel) = amqp().await;
    take(&channel, &env.jobs_queue()).await;
    reply(
        &channel,
        &env.replies_queue(),
        &common::started(id.parse().unwrap()),
    )
    .await;
    (id, (conn, channel))
}

#[tokio::test]
async fn idle_streams_cost_redis_nothing_until_their_job_changes() {
    let redis = shared::testing::PrivateRedis::start().await;
    let mut env = TestEnv::new();
    let gw = env.gateway(&flags(&["--redis-url", &redis.url])).await;
    let (id, (_conn, channel)) = started_job(&env, &gw, "watched by many").await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        streams.push(stream_until(&env, &gw, &id, "event: started").await);
    }
    // And a job left queued, whose place in line its streams keep saying: that takes the figures the
    // replica's followers share, not a read of each job's log.
    let (_, waiting) = submit(&env.http, &gw, json!({"prompt": "still in line"})).await;
    let waiting = waiting["id"].as_str().unwrap().to_owned();
    let mut queued = Vec::new();
    for _ in 0..10 {
        queued.push(stream_until(&env, &gw, &waiting, "event: queued").await);
    }
    // Every stream has read its log and sleeps on its job's notices: three seconds of nothing happening
    // must not read any job's log or record (a poll a second each would be 90 reads of each).
    let before = redis.command_counts().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = redis.command_counts().await.unwrap();
    for command in ["xrange", "hgetall"] {
        let calls = after.get(command).unwrap_or(&0) - before.get(command).unwrap_or(&0);
        assert_eq!(calls, 0, "{command} called {calls} times by idle streams");
    }
    // And news still reaches every one of them at once, by its notice.
    reply(
        &channel,
        &env.replies_queue(),
        &succeeded(id.parse().unwrap(), "p", " the end"),
    )
    .await;
    for stream in &mut streams {
        read_until(stream, "event: succeeded").await;
    }
    drop((streams, queued));
    env.finish().await;
    drop(redis);
}

#[tokio::test]
async fn the_gateway_moves_on_to_the_next_broker_url_when_a_node_is_down() {
    let mut env = TestEnv::new();
    // A cluster of two "nodes", the first of which is down: the gateway must get to the second.
    let urls = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f,{}",
        common::closed_port(),
        common::AMQP_URL
    );
    let gw = env.gateway(&flags(&["--amqp-url", &urls])).await;
    let (status, body) = submit(&env.http, &gw, json!({"prompt": "any node will do"})).await;
    assert_eq!(status, 202, "{body}");
    env.finish().await;
}

#[tokio::test]
async fn a_notice_subscription_cut_off_silently_is_found_out_by_its_pings_and_its_waits_hear_the_news() {
    // Redis through a proxy that can freeze one connection both ways: a partition, where nothing arrives
    // and nothing fails. A subscription only receives, so without a question of its own it would look up
    // and silent, and its streams would hear their jobs' news at the backstop, a minute on.
    let redis = shared::testing::PrivateRedis::start().await;
    let proxy = StallProxy::start(&redis.url["redis://".len()..redis.url.len() - 1])
        .await
        .unwrap();
    let url = format!("redis://127.0.0.1:{}/", proxy.port);
    let mut env = TestEnv::new();
    let gw = env.gateway(&flags(&["--redis-url", &url])).await;
    let (id, (_conn, channel)) = started_job(&env, &gw, "news over a dead line").await;
    let mut stream = stream_until(&env, &gw, &id, "event: started").await;

    let subscribed = redis.subscribers().await.unwrap();
    assert_eq!(subscribed.len(), 1, "one subscription: {subscribed:?}");
    let (first, port) = subscribed[0];
    let n = proxy
        .connection_from(port)
        .expect("the subscription goes through the proxy");
    assert!(proxy.freeze(n, true));
    // The job ends while its notice can only go down the dead line.
    reply(
        &channel,
        &env.replies_queue(),
        &succeeded(id.parse().unwrap(), "p", " the end"),
    )
    .await;
    let started = Instant::now();
    let bound = gateway::waiters::PING_EVERY + gateway::waiters::PING_TIMEOUT + Duration::from_secs(7);
    tokio::time::timeout(bound, read_until(&mut stream, "event: succeeded"))
        .await
        .unwrap_or_else(|_| panic!("the stream did not hear the job's end within {bound:?}"));
    // It heard it because the replica found the subscription dead (its waits then read their jobs), and
    // the replica subscribes anew on a live connection.
    let mut now = Vec::new();
    for _ in 0..50 {
        now = redis.subscribers().await.unwrap();
        if now.iter().any(|(id, _)| *id != first) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        now.iter().any(|(id, _)| *id != first),
        "no new subscription after {:?}: {now:?}",
        started.elapsed()
    );
    drop(stream);
    env.finish().await;
    drop(redis);
}

/// A gateway whose Redis connections go through a [`StallProxy`], which can hold back Redis' answers.
async fn behind_stalling_redis(env: &mut TestEnv) -> (StallProxy, common::Gateway) {
    let proxy = StallProxy::start("127.0.0.1:6379").await.unwrap();
    let url = format!("redis://127.0.0.1:{}/", proxy.port);
    let gw = env.gateway(&flags(&["--redis-url", &url])).await;
    (proxy, gw)
}

#[tokio::test]
async fn a_submission_whose_recording_redis_never_answers_is_told_its_job_may_run_not_refused() {
    // Redis through a proxy that can hold back its answers: the admission script runs (the record and the
    // outbox entry are written) and its answer never comes. A refusal would send the client to submit again
    // while the outbox publishes the first one.
    let mut env = TestEnv::new();
    let (proxy, gw) = behind_stalling_redis(&mut env).await;
    // One job through first, so that Redis has the admission script and the next call runs it at once.
    let (status, body) = submit(&env.http, &gw, json!({"prompt": "before the silence"})).await;
    assert_eq!(status, 202, "{body}");

    proxy.stall_all(true);
    let (status, body) = submit(&env.http, &gw, json!({"prompt": "recorded, unanswered"})).await;
    proxy.stall_all(false);
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["code"], "outcome_unknown", "{body}");
    let id = body["job_id"].as_str().expect("the job that may run").to_owned();

    // It was taken: its record reads back, and the outbox publishes it.
    let record = poll_until(&env, &gw, &id, "queued").await;
    assert_eq!(record["prompt"], "recorded, unanswered");
    let (_conn, channel) = amqp().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while depth(&channel, &env.jobs_queue()).await < 2 {
        assert!(Instant::now() < deadline, "the job was never published");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.finish().await;
}

/// Deletes job `id`'s record and event log, as Redis losing its data does.
async fn lose_record(ns: &str, id: JobId) {
    let keys = common::keys(ns);
    let deleted: i64 = redis::cmd("DEL")
        .arg(keys.job(id))
        .arg(keys.events(id))
        .query_async(&mut common::redis().await)
        .await
        .unwrap();
    assert!(deleted >= 1, "the record was there to lose");
}

/// After a start that found its record gone: the job answers 404, as a lost record does, and its end (sent
/// now, applied after the start: one job's replies are applied in order) makes the record again, with no
/// start in it: the start did not remake the record first.
async fn the_start_left_the_record_gone(
    env: &TestEnv,
    gw: &common::Gateway,
    channel: &lapin::Channel,
    id: JobId,
) {
    reply(channel, &env.replies_queue(), &succeeded(id, "p", " done")).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = read_job(env, gw, &id.to_string()).await;
        if status == 200 && body["status"] != "running" {
            assert_eq!(body["status"], "succeeded", "{body}");
            assert!(
                body["timings"]["started_at_ms"].is_null(),
                "the start remade the record: {body}"
            );
            assert_eq!(body["attempts"], 0, "the start remade the record: {body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the job's end never made its record again: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_start_held_while_redis_was_out_of_reach_does_not_remake_a_record_redis_lost_since() {
    // Replicas compete for the replies. One cut from Redis holds a job's start and retries it; meanwhile
    // another records the job's end, and then Redis loses its data. Remade from the start, the record
    // would say `running` for good: the end went with the data. Here the gateway holds the start behind a
    // Redis whose answers are held back (its commands still run), and the record is deleted directly.
    let mut env = TestEnv::new();
    let (proxy, gw) = behind_stalling_redis(&mut env).await;
    let (status, body) = submit(&env.http, &gw, json!({"prompt": "it ends while its start waits"})).await;
    assert_eq!(status, 202, "{body}");
    let id: JobId = body["id"].as_str().unwrap().parse().unwrap();
    let mut redis = common::redis().await;
    let record = common::keys(&env.ns).job(id);

    proxy.stall_all(true);
    let (_conn, channel) = amqp().await;
    reply(&channel, &env.replies_queue(), &started(id)).await;
    // Its first attempt ran in Redis (the record says `running`), and its answer, held back, never came:
    // the attempt failed (counted; no other test of this file makes a reply's record fail), and every
    // later one is a retry.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status: Option<String> = redis::cmd("HGET")
            .arg(&record)
            .arg("status")
            .query_async(&mut redis)
            .await
            .unwrap();
        let failed = common::metric_at_least(
            &common::metrics_text(&env, &gw).await,
            "gateway_reply_record_retries_total",
            1.0,
        );
        if status.as_deref() == Some("running") && failed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway's first attempt at the start never failed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lose_record(&env.ns, id).await;
    proxy.stall_all(false);
    the_start_left_the_record_gone(&env, &gw, &channel, id).await;
    env.finish().await;
}

#[tokio::test]
async fn a_start_another_replica_held_and_gave_back_does_not_remake_a_record_redis_lost_since() {
    // The replica holding the start goes away before it is applied: the broker redelivers it, and the
    // record may have been lost meanwhile, as above. Here the test holds it (a get without an ack) while no
    // gateway runs, and gives it back by closing its channel.
    let mut env = TestEnv::new();
    let gw = env.gateway(GENEROUS).await;
    let (status, body) = submit(&env.http, &gw, json!({"prompt": "its start comes back"})).await;
    assert_eq!(status, 202, "{body}");
    let id: JobId = body["id"].as_str().unwrap().parse().unwrap();
    env.stop_gateway(0).await;

    let (conn, channel) = amqp().await;
    reply(&channel, &env.replies_queue(), &started(id)).await;
    let holder = conn.create_channel().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while holder
        .basic_get(
            env.replies_queue().as_str().into(),
            lapin::options::BasicGetOptions::default(),
        )
        .await
        .unwrap()
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "the start never reached the replies queue"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lose_record(&env.ns, id).await;
    holder.close(200, "gone".into()).await.unwrap();

    let gw = env.gateway(GENEROUS).await;
    the_start_left_the_record_gone(&env, &gw, &channel, id).await;
    env.finish().await;
}
