//! `worker serve` end to end: real worker processes on a tiny random GPT-J, the real gateway, the real
//! RabbitMQ and Redis. Each test reads as the guarantee it checks.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::{Env, RawProducer, Reply, rabbitmqctl};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use serde_json::{Value, json};
use shared::{ErrorCode, JobReply};

/// A job of `tokens` greedy tokens: about 3 ms each for the tiny model on an idle core here, so a few
/// hundred give the test time to act while the job runs.
fn long_job(tokens: u32) -> Value {
    json!({"strategy": "greedy", "max_new_tokens": tokens})
}

fn short_job() -> Value {
    json!({"max_new_tokens": 4})
}

fn count<'a>(replies: &'a [Reply], kind: &str) -> HashMap<&'a str, usize> {
    let mut counts = HashMap::new();
    for r in replies.iter().filter(|r| r.kind == kind) {
        *counts.entry(r.correlation_id.as_deref().unwrap()).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn a_job_submitted_to_the_gateway_is_polled_to_completion_and_run_answers_synchronously() {
    let mut env = Env::new();
    let gw = env.gateway().await;
    env.spawn_worker(&[]);
    env.wait_for_consumers(1).await;

    let id = env
        .submit(&gw, "Hello,   world $$", json!({"max_new_tokens": 8}))
        .await;
    let view = env
        .poll_until(&gw, &id, Duration::from_secs(60), |v| {
            v["status"] == "succeeded" || v["status"] == "failed"
        })
        .await;
    assert_eq!(view["status"], "succeeded", "{view}");
    assert_eq!(
        view["prompt"], "Hello,   world $$",
        "/v1/jobs takes the prompt as written"
    );
    assert_eq!(view["worker_id"], env.workers[0].id.as_str());
    let new_tokens = view["result"]["new_tokens"].as_u64().unwrap();
    assert!((1..=8).contains(&new_tokens), "{view}");
    assert!(view["timings"]["inference_ms"].is_u64(), "{view}");

    // The original synchronous endpoint: the prompt, cleaned as the original did, followed by its
    // continuation, as a JSON string.
    let r = env
        .http
        .post(format!("{gw}/run"))
        .json(&json!({"data": "Hello   there$", "num_tokens": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text: Value = r.json().await.unwrap();
    let text = text.as_str().unwrap();
    assert!(
        text.starts_with("Hello there") && text.len() > "Hello there".len(),
        "{text:?}"
    );
    assert!(!text.starts_with("Hello there$"), "{text:?}");
    env.finish().await;
}

#[tokio::test]
async fn three_workers_share_one_queue_and_each_job_is_done_exactly_once() {
    let mut env = Env::new();
    for _ in 0..3 {
        env.spawn_worker(&[]);
    }
    env.wait_for_consumers(3).await;
    let mut producer = RawProducer::new(&env).await;
    let mut ids = HashSet::new();
    for i in 0..12 {
        ids.insert(
            producer
                .publish_job(&format!("job number {i}"), short_job())
                .await,
        );
    }
    let replies = producer
        .replies_until(Duration::from_secs(120), |got| {
            got.iter().filter(|r| r.kind == "job.succeeded").count() == 12
        })
        .await;
    // Nothing more arrives: no job was done twice.
    assert!(producer.next_reply(Duration::from_millis(500)).await.is_none());

    let started = count(&replies, "job.started");
    let succeeded = count(&replies, "job.succeeded");
    for id in &ids {
        assert_eq!(started.get(id.as_str()), Some(&1), "{id} started once");
        assert_eq!(succeeded.get(id.as_str()), Some(&1), "{id} succeeded once");
    }
    let workers: HashSet<String> = replies.iter().map(|r| r.worker_id().to_owned()).collect();
    assert_eq!(workers.len(), 3, "every worker took jobs: {workers:?}");
    producer.close().await;
    env.finish().await;
}

#[tokio::test]
async fn a_worker_killed_mid_job_leaves_the_job_to_another_worker_and_it_completes_once() {
    let mut env = Env::new();
    env.spawn_worker(&[]);
    env.spawn_worker(&[]);
    env.wait_for_consumers(2).await;
    let mut producer = RawProducer::new(&env).await;
    let id = producer.publish_job("A long story begins", long_job(600)).await;

    let first = producer.next_reply(Duration::from_secs(30)).await.unwrap();
    assert_eq!(first.kind, "job.started");
    let doomed = first.worker_id().to_owned();
    env.worker_by_id(&doomed).kill();

    let rest = producer
        .replies_until(Duration::from_secs(120), |got| {
            got.iter().any(|r| r.kind == "job.succeeded")
        })
        .await;
    assert!(producer.next_reply(Duration::from_millis(500)).await.is_none());
    let kinds: Vec<&str> = rest.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(kinds, ["job.started", "job.succeeded"], "{rest:#?}");
    let JobReply::Started(again) = &rest[0].body else {
        panic!()
    };
    assert!(again.redelivered, "the broker marks the second delivery");
    assert_ne!(again.worker_id, doomed);
    let JobReply::Succeeded(done) = &rest[1].body else {
        panic!()
    };
    assert_eq!(done.job_id.to_string(), id);
    assert_eq!(done.new_tokens as usize, done.token_ids.len());
    env.wait_for_jobs_queue(0, 1).await;
    producer.close().await;
    env.finish().await;
}

/// A frozen worker (SIGSTOP, as `docker pause` or a stuck host leaves it) answers no heartbeat, so the broker
/// closes its connections after about two to three heartbeat intervals and gives its job to another
/// worker, which answers it once. Thawed, the frozen worker answers nothing for the job it lost, is not
/// blamed for a hung engine (its engine stood still with it), and consumes again.
#[tokio::test]
async fn a_frozen_worker_s_job_goes_to_another_worker_and_is_answered_once() {
    let mut env = Env::new();
    // A 2 s heartbeat; a step bound of 4 s, which the freeze outlasts.
    let flags = ["--amqp-heartbeat-s", "2", "--engine-step-timeout-s", "4"];
    env.spawn_worker(&flags);
    env.spawn_worker(&flags);
    env.wait_for_consumers(2).await;
    let mut producer = RawProducer::new(&env).await;
    let id = producer.publish_job("A long story begins", long_job(600)).await;
    let first = producer.next_reply(Duration::from_secs(30)).await.unwrap();
    assert_eq!(first.kind, "job.started");
    let frozen = first.worker_id().to_owned();
    env.worker_by_id(&frozen).signal("STOP");
    let frozen_at = Instant::now();

    // The bound the README states for the default 10 s heartbeat is 30 s; with 2 s it is 6 s, and the
    // test allows five times that.
    let again = producer
        .next_reply(Duration::from_secs(30))
        .await
        .expect("the frozen worker's job was not given to the other worker within 30 s");
    let JobReply::Started(started) = &again.body else {
        panic!("{again:#?}")
    };
    assert!(started.redelivered);
    assert_ne!(started.worker_id, frozen);
    let done = producer.next_reply(Duration::from_secs(120)).await.unwrap();
    assert_eq!(done.kind, "job.succeeded", "{done:#?}");
    assert_eq!(done.correlation_id.as_deref(), Some(id.as_str()));
    // Frozen past the step bound, then thawed.
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(frozen_at.elapsed())).await;
    env.worker_by_id(&frozen).signal("CONT");

    env.wait_for_consumers(2).await;
    assert!(
        producer.next_reply(Duration::from_secs(3)).await.is_none(),
        "the thawed worker answered the job it had lost"
    );
    let thawed = env.worker_by_id(&frozen);
    assert!(thawed.running(), "the thawed worker exited:\n{}", thawed.log());
    assert!(!thawed.log().contains("engine is unhealthy"), "{}", thawed.log());
    producer.close().await;
    env.finish().await;
}

/// Redis restarted without its data (no persistence, a failover to an empty replica) loses every job
/// record, API keys on: the worker's replies recreate the records, and the owner header the gateway put on
/// the job, which the worker copies onto its replies, gives each back to the key that submitted it. Before
/// it, the record came back nobody's: the job answered 404 to its owner for good, though it ran.
#[tokio::test]
async fn after_redis_restarts_empty_a_job_answers_its_owner_and_nobody_else() {
    let mut redis = shared::testing::PrivateRedis::start().await;
    let mut env = Env::new();
    let base = env
        .gateway_with(&["--redis-url", &redis.url, "--api-keys", "key-of-a,key-of-b"])
        .await;
    let http = reqwest::Client::new();
    let submitted = http
        .post(format!("{base}/v1/jobs"))
        .bearer_auth("key-of-a")
        .json(&json!({"prompt": "Once upon a time", "parameters": short_job()}))
        .send()
        .await
        .unwrap();
    assert_eq!(submitted.status(), 202);
    let id = submitted.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let view = |key: &'static str| http.get(format!("{base}/v1/jobs/{id}")).bearer_auth(key).send();
    // The job is queued when Redis comes back empty; only then does a worker take it.
    redis.restart_empty().await;
    env.spawn_worker(&[]);
    env.wait_for_consumers(1).await;
    // Its replies recreate the record, its owner's.
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let r = view("key-of-a").await.unwrap();
        let status = r.status();
        if status == 200 {
            let job: Value = r.json().await.unwrap();
            if job["status"] == "succeeded" {
                break job;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the job never answered its owner after Redis restarted (last: {status})\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!done["result"]["text"].as_str().unwrap().is_empty(), "{done}");
    assert_eq!(
        view("key-of-b").await.unwrap().status(),
        404,
        "another key's job stays invisible"
    );
    env.finish().await;
    drop(redis);
}

/// Generation runs off the async runtime: with a 1 s heartbeat (the broker drops a connection after two
/// missed ones) a worker busy for seconds keeps its connection and its jobs.
#[tokio::test]
async fn a_worker_busy_generating_keeps_answering_heartbeats() {
    let mut env = Env::new();
    env.amqp_url.push_str("?heartbeat=1");
    // One job at a time, so the jobs below keep it busy back to back: four times one job's time, which on
    // its own ran under 3 s on a fast machine.
    env.spawn_worker(&["--max-batch-size", "1"]);
    env.wait_for_consumers(1).await;
    let mut producer = RawProducer::new(&env).await;
    // Contrastive search: each step runs its 4 candidates, the slowest strategy a step.
    let job = json!({"strategy": "contrastive", "max_new_tokens": 2000});
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(producer.publish_job("Keep talking", job.clone()).await);
    }
    let replies = producer
        .replies_until(Duration::from_secs(300), |got| {
            got.iter().filter(|r| r.kind == "job.succeeded").count() == 4
        })
        .await;
    let mut busy_ms = 0;
    for id in &ids {
        let mine: Vec<&Reply> = replies
            .iter()
            .filter(|r| r.correlation_id.as_deref() == Some(id.as_str()))
            .collect();
        let kinds: Vec<&str> = mine.iter().map(|r| r.kind.as_str()).collect();
        assert_eq!(kinds, ["job.started", "job.succeeded"], "job {id}");
        let JobReply::Succeeded(done) = &mine[1].body else {
            panic!()
        };
        busy_ms += done.timings.inference_ms;
    }
    assert!(
        busy_ms >= 3_000,
        "the jobs took {busy_ms} ms in all: too short to span missed heartbeats; raise max_new_tokens"
    );
    assert!(!env.logs().contains("reconnecting"), "{}", env.logs());
    producer.close().await;
    env.finish().await;
}

#[tokio::test]
async fn closing_every_broker_connection_mid_run_loses_nothing() {
    let mut env = Env::with_vhost();
    let gw = env.gateway().await;
    env.spawn_worker(&[]);
    env.spawn_worker(&[]);
    env.wait_for_consumers(2).await;

    let mut ids = Vec::new();
    for i in 0..2 {
        // Long enough to outlast rabbitmqctl's start-up (about a second).
        ids.push(env.submit(&gw, &format!("long job {i}"), long_job(1500)).await);
        ids.push(env.submit(&gw, &format!("short job {i}"), short_job()).await);
    }
    env.poll_until(&gw, &ids[0], Duration::from_secs(30), |v| v["status"] != "queued")
        .await;
    rabbitmqctl(&[
        "close_all_connections",
        "--vhost",
        env.vhost.as_deref().unwrap(),
        "test",
    ]);

    // The gateway takes jobs again once it has reconnected (503 until then, never a lost job).
    for i in 0..2 {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let r = env
                .http
                .post(format!("{gw}/v1/jobs"))
                .json(&json!({"prompt": format!("after the cut {i}"), "parameters": short_job()}))
                .send()
                .await
                .unwrap();
            if r.status() == 202 {
                let body: Value = r.json().await.unwrap();
                ids.push(body["id"].as_str().unwrap().to_owned());
                break;
            }
            assert_eq!(r.status(), 503, "{:?}", r.text().await);
            assert!(
                std::time::Instant::now() < deadline,
                "the gateway never came back"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for id in &ids {
        let view = env
            .poll_until(&gw, id, Duration::from_secs(180), |v| {
                v["status"] == "succeeded" || v["status"] == "failed"
            })
            .await;
        assert_eq!(view["status"], "succeeded", "{view}");
    }
    // Both workers lost the broker and came back to the queue; a job was in hand when the connections
    // went (it came back redelivered); nothing was dead-lettered.
    for w in &env.workers {
        assert!(
            w.log().contains("reconnecting"),
            "{} never lost the broker:\n{}",
            w.id,
            w.log()
        );
    }
    assert!(
        env.logs().contains("redelivered=true"),
        "no job was cut mid-run:\n{}",
        env.logs()
    );
    env.wait_for_jobs_queue(0, 2).await;
    let producer = RawProducer::new(&env).await;
    assert!(producer.drain(&env.dead_letter_queue()).await.is_empty());
    producer.close().await;
    env.finish().await;
}

#[tokio::test]
async fn a_malformed_message_is_dead_lettered_and_answered_with_job_failed() {
    let mut env = Env::new();
    env.spawn_worker(&[]);
    env.wait_for_consumers(1).await;
    let mut producer = RawProducer::new(&env).await;

    let not_json = shared::JobId::new_random().to_string();
    producer.publish_raw(Some(&not_json), b"{\"prompt\": oops").await;
    let empty_prompt = shared::JobId::new_random().to_string();
    producer
        .publish_raw(Some(&empty_prompt), br#"{"version":1,"prompt":"\u0000\u0007"}"#)
        .await;
    producer
        .publish_raw(None, br#"{"version":1,"prompt":"who am I"}"#)
        .await;
    // The loop survived all three: a good job after them runs.
    let good = producer.publish_job("Still working", short_job()).await;

    let replies = producer
        .replies_until(Duration::from_secs(60), |got| {
            got.iter().any(|r| r.kind == "job.succeeded")
        })
        .await;
    let failed: Vec<(Option<&str>, ErrorCode)> = replies
        .iter()
        .filter_map(|r| match &r.body {
            JobReply::Failed(f) => Some((r.correlation_id.as_deref(), f.error.code)),
            _ => None,
        })
        .collect();
    assert_eq!(
        failed,
        [
            (Some(not_json.as_str()), ErrorCode::InvalidJson),
            (Some(empty_prompt.as_str()), ErrorCode::PromptEmpty),
            (None, ErrorCode::MissingCorrelationId),
        ]
    );
    assert!(
        replies
            .iter()
            .all(|r| r.kind != "job.failed" || matches!(r.body, JobReply::Failed(_)))
    );
    assert_eq!(
        replies.last().unwrap().correlation_id.as_deref(),
        Some(good.as_str())
    );

    let dead = producer.drain(&env.dead_letter_queue()).await;
    assert_eq!(dead.len(), 3, "all three are in {}", env.dead_letter_queue());
    assert!(dead.contains(&b"{\"prompt\": oops".to_vec()));
    producer.close().await;
    env.finish().await;
}

/// Exactly what docs/amqp.md tells a producer in another language to do.
#[tokio::test]
async fn a_raw_producer_gets_started_then_succeeded_as_the_amqp_guide_describes() {
    let mut env = Env::new();
    env.spawn_worker(&[]);
    env.wait_for_consumers(1).await;
    let mut producer = RawProducer::new(&env).await;

    let id = shared::JobId::new_random().to_string();
    let body = json!({
        "version": 1,
        "prompt": "Once upon a time",
        "parameters": {"max_new_tokens": 6, "strategy": "sample", "seed": 42, "top_k": 20, "logprobs": 2},
        "submitted_at_ms": shared::reply::now_ms(),
    });
    let props = BasicProperties::default()
        .with_correlation_id(id.as_str().into())
        .with_message_id(id.as_str().into())
        .with_reply_to(producer.reply_to.as_str().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_expiration("600000".into());
    let confirm = producer
        .channel
        .basic_publish(
            "".into(),
            env.jobs_queue().as_str().into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&body).unwrap(),
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());

    let started = producer.next_reply(Duration::from_secs(30)).await.unwrap();
    assert_eq!(started.kind, "job.started");
    assert_eq!(started.correlation_id.as_deref(), Some(id.as_str()));
    let JobReply::Started(s) = &started.body else {
        panic!("{started:?}")
    };
    assert_eq!((s.job_id.to_string(), s.redelivered), (id.clone(), false));

    // Tokens stream in as `job.token` replies, then the final reply. How many chunks go depends on how fast
    // the engine outruns the broker (a job that ends before its first chunk goes sends none, as the guide
    // says), so the contract checked is the chunks' order and that they are a prefix of the answer. The job
    // asked for log-probabilities: each chunk carries its tokens'.
    let mut streamed_text = String::new();
    let mut streamed_ids = Vec::new();
    let mut streamed_logprobs = Vec::new();
    let done = loop {
        let reply = producer.next_event(Duration::from_secs(30)).await.unwrap();
        let JobReply::Token(t) = &reply.body else {
            break reply;
        };
        assert_eq!(reply.kind, "job.token");
        assert_eq!(t.index as usize, streamed_ids.len(), "chunks follow each other");
        assert_eq!(t.text_offset as usize, streamed_text.len());
        let scores = t
            .logprobs
            .as_ref()
            .expect("the chunk carries its tokens' logprobs");
        assert_eq!(
            scores.iter().map(|s| s.id).collect::<Vec<_>>(),
            t.token_ids,
            "one per token id, in order"
        );
        streamed_ids.extend_from_slice(&t.token_ids);
        streamed_logprobs.extend(scores.iter().cloned());
        streamed_text.push_str(&t.text);
    };
    assert_eq!(done.kind, "job.succeeded");
    assert_eq!(done.correlation_id.as_deref(), Some(id.as_str()));
    let JobReply::Succeeded(s) = &done.body else {
        panic!("{done:?}")
    };
    assert_eq!(s.prompt, "Once upon a time");
    assert_eq!(s.worker_id, env.workers[0].id);
    assert_eq!(s.new_tokens as usize, s.token_ids.len());
    assert!((1..=6).contains(&s.token_ids.len()));
    assert!(
        s.token_ids.starts_with(&streamed_ids),
        "{streamed_ids:?} vs {:?}",
        s.token_ids
    );
    assert!(
        s.text.starts_with(&streamed_text),
        "{streamed_text:?} vs {:?}",
        s.text
    );
    assert!(
        s.logprobs
            .as_ref()
            .is_some_and(|all| all.starts_with(&streamed_logprobs)),
        "the chunks' logprobs are a prefix of the answer's"
    );
    assert_eq!(
        s.prompt_tokens,
        Some(4),
        "\"Once upon a time\" is four GPT-J tokens"
    );
    assert!(
        s.timings.queued_ms.is_some(),
        "submitted_at_ms gives the queue time"
    );
    producer.close().await;
    env.finish().await;
}

#[tokio::test]
async fn sigterm_mid_job_finishes_the_job_then_exits_zero_leaving_the_rest_queued() {
    let mut env = Env::new();
    // One place in the batch (and so a prefetch of 1): the second job waits in the queue.
    env.spawn_worker(&["--max-batch-size", "1"]);
    env.wait_for_consumers(1).await;
    let mut producer = RawProducer::new(&env).await;
    let long = producer.publish_job("Tell me everything", long_job(600)).await;
    let started = producer.next_reply(Duration::from_secs(30)).await.unwrap();
    assert_eq!(started.kind, "job.started");
    // Queued behind the long one (prefetch 1): the stopping worker must leave it for another.
    let waiting = producer.publish_job("Wait your turn", short_job()).await;

    env.workers[0].terminate();
    let done = producer.next_reply(Duration::from_secs(120)).await.unwrap();
    assert_eq!(
        (done.kind.as_str(), done.correlation_id.as_deref()),
        ("job.succeeded", Some(long.as_str()))
    );
    let status = env.workers[0].wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit status {status:?}\n{}", env.logs());

    assert!(
        producer.next_reply(Duration::from_millis(300)).await.is_none(),
        "{waiting} not taken"
    );
    env.wait_for_jobs_queue(1, 0).await;
    producer.close().await;
    env.finish().await;
}

#[tokio::test]
async fn sigterm_finishes_every_job_in_the_running_batch_then_exits_zero() {
    let mut env = Env::new();
    env.spawn_worker(&["--max-batch-size", "4"]);
    env.wait_for_consumers(1).await;
    let mut producer = RawProducer::new(&env).await;
    let long = producer.publish_job("Tell me everything", long_job(400)).await;
    let other = producer.publish_job("And the rest of it", long_job(300)).await;
    let mut started = Vec::new();
    while started.len() < 2 {
        let r = producer
            .next_reply(Duration::from_secs(60))
            .await
            .expect("job.started for both");
        assert_eq!(r.kind, "job.started", "{r:?}");
        started.extend(r.correlation_id);
    }

    env.workers[0].terminate();
    let mut done = Vec::new();
    while done.len() < 2 {
        let r = producer
            .next_reply(Duration::from_secs(180))
            .await
            .expect("both finish");
        match &r.body {
            JobReply::Succeeded(s) => assert_eq!(s.batch_size, Some(2), "they shared the batch: {s:?}"),
            other => panic!("expected job.succeeded, got {other:?}"),
        }
        done.extend(r.correlation_id);
    }
    done.sort();
    let mut expected = vec![long, other];
    expected.sort();
    assert_eq!(done, expected);
    let status = env.workers[0].wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit status {status:?}\n{}", env.logs());
    env.wait_for_jobs_queue(0, 0).await;
    producer.close().await;
    env.finish().await;
}

#[tokio::test]
async fn jobs_submitted_together_share_one_workers_batch_and_each_gets_its_text_alone() {
    let mut env = Env::new();
    let gw = env.gateway().await;
    let metrics = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    env.spawn_worker(&["--max-batch-size", "8", "--metrics-listen", &metrics.to_string()]);
    env.wait_for_consumers(1).await;

    let prompts = [
        "Hello there",
        "The quick brown fox jumps over the lazy dog",
        "Once upon a time",
        "A",
        "Rust is a language",
        "Queues absorb bursts",
    ];
    let params = |n: usize| {
        if n.is_multiple_of(2) {
            json!({"strategy": "greedy", "max_new_tokens": 24 + 4 * n, "min_new_tokens": 24})
        } else {
            json!({"strategy": "contrastive", "max_new_tokens": 20, "min_new_tokens": 20})
        }
    };
    let mut ids = Vec::new();
    for (n, p) in prompts.iter().enumerate() {
        ids.push(env.submit(&gw, p, params(n)).await);
    }
    let engine = worker::engine::Engine::load(&worker::engine::EngineOptions {
        model_dir: common::tiny_model().to_path_buf(),
        ..Default::default()
    })
    .unwrap();
    let mut widest = 0;
    for (n, (id, prompt)) in ids.iter().zip(prompts).enumerate() {
        let view = env
            .poll_until(&gw, id, Duration::from_secs(120), |v| {
                v["status"] == "succeeded" || v["status"] == "failed"
            })
            .await;
        assert_eq!(view["status"], "succeeded", "{view}");
        widest = widest.max(view["result"]["batch_size"].as_u64().unwrap());
        assert!(view["timings"]["time_to_first_token_ms"].is_u64(), "{view}");
        let parameters: shared::GenerationParameters = serde_json::from_value(params(n)).unwrap();
        let alone = engine.generate(prompt, &parameters.validate().unwrap()).unwrap();
        assert_eq!(
            view["result"]["text"],
            alone.text.as_str(),
            "{prompt:?} in a batch and alone"
        );
    }
    assert!(
        widest >= 3,
        "the jobs decoded together (batch of {widest} at most)"
    );

    let text = reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(
        value("worker_jobs_finished_total"),
        prompts.len() as f64,
        "{text}"
    );
    assert!(value("worker_generation_tokens_total") >= 6.0 * 20.0, "{text}");
    assert!(value("worker_batch_size_count") > 0.0, "{text}");
    assert!(
        text.contains("worker_time_to_first_token_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("worker_kv_cache_positions_budget"), "{text}");
    env.finish().await;
}

#[tokio::test]
async fn a_job_too_big_for_the_workers_kv_budget_fails_at_once_and_the_next_one_runs() {
    let mut env = Env::new();
    env.spawn_worker(&["--max-batch-tokens", "64"]);
    env.wait_for_consumers(1).await;
    let mut producer = RawProducer::new(&env).await;
    let big = producer.publish_job("Hello there", long_job(100)).await;
    let small = producer.publish_job("Hello there", short_job()).await;
    let replies = producer
        .replies_until(Duration::from_secs(60), |r| {
            r.iter().filter(|r| r.kind != "job.started").count() == 2
        })
        .await;
    let final_of = |id: &str| {
        replies
            .iter()
            .find(|r| r.correlation_id.as_deref() == Some(id) && r.kind != "job.started")
            .map(|r| r.body.clone())
    };
    match final_of(&big) {
        Some(JobReply::Failed(f)) => {
            assert_eq!(f.error.code, ErrorCode::ContextOverflow, "{f:?}");
            assert!(f.error.message.contains("--max-batch-tokens"), "{f:?}");
        }
        other => panic!("the big job should fail: {other:?}"),
    }
    assert!(
        matches!(final_of(&small), Some(JobReply::Succeeded(_))),
        "{replies:?}"
    );
    env.wait_for_jobs_queue(0, 1).await;
    producer.close().await;
    env.finish().await;
}
