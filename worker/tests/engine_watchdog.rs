//! The engine watchdog end to end: real `worker serve` processes on the tiny GPT-J and the real RabbitMQ,
//! the engine broken on purpose with the hidden `--inject-engine-fault` hook. A worker whose engine hangs
//! or keeps failing must stop, give its unfinished jobs back to the queue, and exit non-zero, rather than
//! hold its jobs for ever or drain the queue into failures.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Env, RawProducer, Reply};
use serde_json::json;
use shared::{ErrorCode, JobReply};

/// Every reply that arrives until none has for `quiet`.
async fn replies_until_quiet(producer: &mut RawProducer, quiet: Duration) -> Vec<Reply> {
    let mut got = Vec::new();
    while let Some(reply) = producer.next_reply(quiet).await {
        got.push(reply);
    }
    got
}

#[tokio::test]
async fn a_worker_whose_engine_hangs_exits_non_zero_within_the_bound_and_another_worker_completes_its_job() {
    let mut env = Env::new();
    // The first step runs (the job joins and is started), the next never returns.
    env.spawn_worker(&["--inject-engine-fault", "hang", "--engine-step-timeout-s", "2"]);
    env.wait_for_consumers(1).await;
    let mut producer = RawProducer::new(&env).await;
    let id = producer
        .publish_job(
            "A story that never ends",
            json!({"strategy": "greedy", "max_new_tokens": 40}),
        )
        .await;
    let started = producer.next_reply(Duration::from_secs(60)).await.unwrap();
    assert_eq!(started.kind, "job.started", "{started:?}");
    assert_eq!(started.worker_id(), env.workers[0].id);
    let hung_since = Instant::now();

    // A healthy worker joins; the job is the hung worker's until that one lets it go.
    env.spawn_worker(&[]);
    let status = env.workers[0].wait_exit(Duration::from_secs(30));
    let took = hung_since.elapsed();
    assert!(!status.success(), "exit status {status:?}\n{}", env.logs());
    // Not before the bound (it is the watchdog that stopped it), and soon after it.
    assert!(
        (Duration::from_millis(1500)..Duration::from_secs(10)).contains(&took),
        "exited {took:?} after the job started\n{}",
        env.logs()
    );
    let log = env.workers[0].log();
    assert!(
        log.contains("engine step has run for") && log.contains("--engine-step-timeout-s"),
        "{log}"
    );

    let rest = producer
        .replies_until(Duration::from_secs(120), |got| {
            got.iter().any(|r| r.kind == "job.succeeded")
        })
        .await;
    let kinds: Vec<&str> = rest.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(kinds, ["job.started", "job.succeeded"], "{rest:#?}");
    let JobReply::Started(again) = &rest[0].body else {
        panic!()
    };
    assert!(again.redelivered, "the hung worker never acknowledged it");
    assert_eq!(again.worker_id, env.workers[1].id);
    let JobReply::Succeeded(done) = &rest[1].body else {
        panic!()
    };
    assert_eq!(done.job_id.to_string(), id);
    assert_eq!(done.new_tokens, 40);
    assert!(producer.next_reply(Duration::from_millis(500)).await.is_none());
    env.wait_for_jobs_queue(0, 1).await;
    assert!(producer.drain(&env.dead_letter_queue()).await.is_empty());
    producer.close().await;
    env.finish().await;
}

#[tokio::test]
async fn a_worker_whose_engine_fails_every_job_exits_after_n_failures_leaving_the_rest_queued() {
    let mut env = Env::new();
    // One job at a time (and so a prefetch of 1), so the jobs meet the broken engine one after the other.
    env.spawn_worker(&[
        "--inject-engine-fault",
        "fail",
        "--max-batch-size",
        "1",
        "--max-engine-failures",
        "3",
    ]);
    env.wait_for_consumers(1).await;
    let mut producer = RawProducer::new(&env).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            producer
                .publish_job(&format!("job {i}"), json!({"max_new_tokens": 4}))
                .await,
        );
    }

    let status = env.workers[0].wait_exit(Duration::from_secs(60));
    assert!(!status.success(), "exit status {status:?}\n{}", env.logs());
    let log = env.workers[0].log();
    assert!(log.contains("3 jobs in a row failed in the engine"), "{log}");

    // The first two failures were answered (a single failing job is answered as usual); the third, which
    // tripped the watchdog, was not, nor was any later job.
    let replies = replies_until_quiet(&mut producer, Duration::from_secs(1)).await;
    let failed: Vec<(&str, ErrorCode)> = replies
        .iter()
        .filter_map(|r| match &r.body {
            JobReply::Failed(f) => Some((r.correlation_id.as_deref().unwrap(), f.error.code)),
            _ => None,
        })
        .collect();
    assert_eq!(
        failed,
        [
            (ids[0].as_str(), ErrorCode::GenerationFailed),
            (ids[1].as_str(), ErrorCode::GenerationFailed)
        ],
        "{replies:#?}"
    );
    let answered: Vec<&str> = replies
        .iter()
        .filter_map(|r| r.correlation_id.as_deref())
        .collect();
    assert!(
        ids[2..].iter().all(|id| !answered.contains(&id.as_str())),
        "{replies:#?}"
    );
    // The other three are back in the queue, none dead-lettered.
    env.wait_for_jobs_queue(3, 0).await;
    assert!(producer.drain(&env.dead_letter_queue()).await.is_empty());

    // And a healthy worker completes them: the one the broken worker held comes back redelivered.
    env.spawn_worker(&[]);
    let replies = producer
        .replies_until(Duration::from_secs(120), |got| {
            got.iter().filter(|r| r.kind == "job.succeeded").count() == 3
        })
        .await;
    let mut succeeded: Vec<&str> = replies
        .iter()
        .filter(|r| r.kind == "job.succeeded")
        .map(|r| r.correlation_id.as_deref().unwrap())
        .collect();
    succeeded.sort();
    let mut expected: Vec<&str> = ids[2..].iter().map(String::as_str).collect();
    expected.sort();
    assert_eq!(succeeded, expected);
    let redelivered: Vec<&str> = replies
        .iter()
        .filter_map(|r| match &r.body {
            JobReply::Started(s) if s.redelivered => r.correlation_id.as_deref(),
            _ => None,
        })
        .collect();
    assert_eq!(redelivered, [ids[2].as_str()], "{replies:#?}");
    assert!(replies.iter().all(|r| r.worker_id() == env.workers[1].id));
    env.wait_for_jobs_queue(0, 1).await;
    producer.close().await;
    env.finish().await;
}
