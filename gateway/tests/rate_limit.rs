//! Rate limiting through Redis: one budget across replicas, exact in every rolling window, headers on
//! every limited response, and a decided behaviour when Redis is unreachable or hung.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions panic on purpose

mod common;

use std::time::{Duration, Instant};

use common::{TestEnv, json, submit};
use futures::future::join_all;
use serde_json::json;

#[tokio::test]
async fn two_replicas_admit_exactly_the_limit_of_200_concurrent_requests() {
    let mut env = TestEnv::new();
    let flags = ["--submit-rate-limit", "10/60s"];
    let a = env.gateway(&flags).await;
    let b = env.gateway(&flags).await;
    let calls = (0..200).map(|i| {
        let http = env.http.clone();
        let url = if i % 2 == 0 {
            a.url("/v1/jobs")
        } else {
            b.url("/v1/jobs")
        };
        async move {
            let r = http
                .post(url)
                .json(&json!({"prompt": format!("job {i}")}))
                .send()
                .await
                .unwrap();
            let retry_after = r.headers().contains_key("retry-after");
            let limit_headers = ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"]
                .iter()
                .all(|h| r.headers().contains_key(*h));
            (r.status().as_u16(), retry_after, limit_headers)
        }
    });
    let results = join_all(calls).await;
    let admitted = results.iter().filter(|r| r.0 == 202).count();
    let refused = results.iter().filter(|r| r.0 == 429).count();
    assert_eq!((admitted, refused), (10, 190), "{results:?}");
    assert!(
        results.iter().all(|r| r.2),
        "RateLimit-* headers on every response"
    );
    assert!(
        results.iter().filter(|r| r.0 == 429).all(|r| r.1),
        "Retry-After on every refusal"
    );
    env.finish().await;
}

#[tokio::test]
async fn headers_tell_the_budget_and_a_refusal_says_when_to_retry() {
    let mut env = TestEnv::new();
    let gw = env.gateway(&["--submit-rate-limit", "2/30s"]).await;
    let mut remaining = Vec::new();
    for _ in 0..2 {
        let r = env
            .http
            .post(gw.url("/v1/jobs"))
            .json(&json!({"prompt": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        assert_eq!(r.headers()["ratelimit-limit"], "2");
        remaining.push(r.headers()["ratelimit-remaining"].to_str().unwrap().to_owned());
    }
    assert_eq!(remaining, ["1", "0"]);
    let r = env
        .http
        .post(gw.url("/v1/jobs"))
        .json(&json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    assert_eq!(r.headers()["ratelimit-remaining"], "0");
    let (status, body) = json(r).await;
    assert_eq!((status, body["code"].as_str()), (429, Some("rate_limited")));
    // Reads have their own budget: still open.
    let r = env.http.get(gw.url("/v1/queue")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["ratelimit-limit"], "500");
    env.finish().await;
}

/// With 10 per 2 s: a burst of 10 passes, a second burst 0.8 s later (which a fixed window would admit if
/// a boundary fell between them) gets nothing, and a third burst once the first has left the window
/// passes again. Then a steady stream checks the property itself: no 11 admissions within any 2 s.
#[tokio::test]
async fn the_limit_holds_in_every_rolling_window() {
    let mut env = TestEnv::new();
    let gw = env.gateway(&["--submit-rate-limit", "10/2s"]).await;
    let burst = || async {
        let calls = (0..10).map(|_| {
            let http = env.http.clone();
            let url = gw.url("/v1/jobs");
            async move {
                http.post(url)
                    .json(&json!({"prompt": "x"}))
                    .send()
                    .await
                    .unwrap()
                    .status()
            }
        });
        join_all(calls).await.iter().filter(|s| s.as_u16() == 202).count()
    };
    assert_eq!(burst().await, 10);
    // Every admission of the first burst happened before this instant.
    let t0 = Instant::now();
    tokio::time::sleep_until((t0 + Duration::from_millis(800)).into()).await;
    assert_eq!(burst().await, 0, "a second burst inside the window");
    tokio::time::sleep_until((t0 + Duration::from_millis(2200)).into()).await;
    assert_eq!(burst().await, 10, "the first burst has left the window");

    // Steady stream: one request every 50 ms for 5 s. Each admission happened at a Redis time inside
    // [sent, received]; 11 admissions within less than 2 s would break the limit.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut admitted = Vec::new();
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    while start.elapsed() < Duration::from_secs(5) {
        tick.tick().await;
        let sent = Instant::now();
        let (status, _) = submit(&env.http, &gw, json!({"prompt": "x"})).await;
        let received = Instant::now();
        assert!(status == 202 || status == 429, "{status}");
        if status == 202 {
            admitted.push((sent, received));
        }
    }
    for w in admitted.windows(11) {
        let span = w[10].1 - w[0].0;
        assert!(span >= Duration::from_secs(2), "11 admissions within {span:?}");
    }
    // The budget refills as the window rolls: far more than one window's worth over 5 s.
    assert!(admitted.len() >= 20, "only {} admitted in 5 s", admitted.len());
    env.finish().await;
}

#[tokio::test]
async fn with_redis_unreachable_submission_fails_closed_by_default_and_open_when_set() {
    let mut env = TestEnv::new();
    let redis = format!("redis://127.0.0.1:{}/", common::closed_port());
    let closed = env.gateway_with(&["--redis-url", redis.as_str()], false).await;
    let open = env
        .gateway_with(
            &[
                "--redis-url",
                redis.as_str(),
                "--submit-rate-limit-on-error",
                "open",
            ],
            false,
        )
        .await;

    let r = env
        .http
        .post(closed.url("/v1/jobs"))
        .json(&json!({"prompt": "x"}))
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

    // Fail open: admitted, and the broker gets the job even without its Redis record.
    let mut status = 0;
    for _ in 0..100 {
        // The gateway's broker connection comes up in the background.
        status = submit(&env.http, &open, json!({"prompt": "x"})).await.0;
        if status == 202 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 202);
    let (_conn, channel) = common::amqp().await;
    common::take(&channel, &env.jobs_queue()).await;

    // Reads fail open by default.
    let r = env.http.get(closed.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    env.finish().await;
}

#[tokio::test]
async fn a_hung_redis_cannot_hang_requests() {
    let mut env = TestEnv::new();
    // Accepts connections and never answers.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = hung.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held.push(s);
        }
    });
    let redis = format!("redis://127.0.0.1:{port}/");
    let gw = env
        .gateway_with(
            &["--redis-url", redis.as_str(), "--redis-timeout-ms", "300"],
            false,
        )
        .await;
    // Serving (liveness needs no Redis) before the clock starts: the bound is on the request, not on startup.
    for _ in 0..200 {
        if env
            .http
            .get(gw.url("/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let start = Instant::now();
    let (status, body) = submit(&env.http, &gw, json!({"prompt": "x"})).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
    env.finish().await;
}

#[tokio::test]
async fn wrong_keys_are_rate_limited_per_address_so_they_cannot_be_guessed_at_speed() {
    let mut env = TestEnv::new();
    let gw = env
        .gateway(&["--api-keys", "the-right-key", "--read-rate-limit", "3/60s"])
        .await;
    let mut statuses = Vec::new();
    for i in 0..5 {
        let r = env
            .http
            .get(gw.url("/v1/queue"))
            .header("authorization", format!("Bearer guess-{i}"))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(
        statuses,
        vec![401, 401, 401, 429, 429],
        "the fourth guess is refused unread"
    );
    env.finish().await;
}

/// An OpenAI request's `n` choices are admitted whole or not at all: with room for two jobs, a request for
/// three is refused, none of its choices reaches the queue (none can run), and the two it was charged
/// for before the refusal are given back, so the client's next two jobs pass.
#[tokio::test]
async fn an_openai_request_is_admitted_whole_or_not_at_all() {
    let mut env = TestEnv::new();
    let gw = env
        .gateway(&["--submit-rate-limit", "2/60s", "--served-model-name", "gpt-j"])
        .await;
    let r = env
        .http
        .post(gw.url("/v1/completions"))
        .json(&json!({"model": "gpt-j", "prompt": "Hello", "max_tokens": 2, "n": 3}))
        .send()
        .await
        .unwrap();
    let (status, body) = json(r).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    let (_conn, channel) = common::amqp().await;
    assert_eq!(
        common::depth(&channel, &env.jobs_queue()).await,
        0,
        "no choice of a refused request was published"
    );
    for _ in 0..2 {
        let (status, body) = submit(&env.http, &gw, json!({"prompt": "x"})).await;
        assert_eq!(status, 202, "the refused request's charges came back: {body}");
    }
    env.finish().await;
}
