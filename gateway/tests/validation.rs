//! Bad input gets a clear JSON error with a stable code, and never reaches the queue.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions panic on purpose

mod common;

use common::{TestEnv, json, submit};
use serde_json::json;

const GENEROUS: &[&str] = &["--submit-rate-limit", "10000/1s", "--read-rate-limit", "10000/1s"];

#[tokio::test]
async fn bad_bodies_get_400_413_or_422_naming_the_problem() {
    let mut env = TestEnv::new();
    let mut flags = GENEROUS.to_vec();
    flags.extend(["--body-limit-bytes", "1024"]);
    let gw = env.gateway(&flags).await;
    let http = env.http.clone();

    // Over the body limit: 413, and the connection closes (the rest of the body was never read), which the
    // answer says so that a client does not send its next request on it.
    let big = json!({"prompt": "a".repeat(2000)});
    let r = http.post(gw.url("/v1/jobs")).json(&big).send().await.unwrap();
    let connection = r.headers().get("connection").cloned();
    let (status, body) = json(r).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (413, Some("payload_too_large")),
        "{body}"
    );
    assert_eq!(connection.as_ref().and_then(|c| c.to_str().ok()), Some("close"));

    // Not JSON: 400.
    let r = http
        .post(gw.url("/v1/jobs"))
        .header("content-type", "application/json")
        .body("{\"prompt\": ")
        .send()
        .await
        .unwrap();
    let (status, body) = json(r).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_json")),
        "{body}"
    );

    // Unknown field, top level and nested: 422 naming it.
    let (status, body) = submit(&http, &gw, json!({"prompt": "hi", "temprature": 1})).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("unknown_field")),
        "{body}"
    );
    assert!(body["message"].as_str().unwrap().contains("temprature"), "{body}");
    let (status, body) = submit(
        &http,
        &gw,
        json!({"prompt": "hi", "parameters": {"max_tokens": 5}}),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("unknown_field")),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("parameters.max_tokens"),
        "{body}"
    );

    // Wrong type and out of range: 422 naming the field.
    let (status, body) = submit(
        &http,
        &gw,
        json!({"prompt": "hi", "parameters": {"top_k": "many"}}),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("invalid_parameter")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("parameters.top_k"),
        "{body}"
    );
    let (status, body) = submit(
        &http,
        &gw,
        json!({"prompt": "hi", "parameters": {"max_new_tokens": 0}}),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("invalid_parameter")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("max_new_tokens"),
        "{body}"
    );
    let (status, body) = submit(
        &http,
        &gw,
        json!({"prompt": "hi", "parameters": {"strategy": "sample", "temperature": -1.0}}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("temperature"),
        "{body}"
    );

    // A prompt of nothing but control characters is empty once they are removed: 422.
    let (status, body) = submit(&http, &gw, json!({"prompt": "\u{0}\u{1b}\u{7f}"})).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("prompt_empty")),
        "{body}"
    );
    // Anything else is taken as written, and the answer says what the model will see.
    let written = "Résumé:\n\t\"$5 + 10%\" <b>ok</b>\u{0}";
    let (status, body) = submit(&http, &gw, json!({"prompt": written})).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["prompt"], "Résumé:\n\t\"$5 + 10%\" <b>ok</b>", "{body}");

    // The /run original body: an unknown strategy is named.
    let r = http
        .post(gw.url("/run"))
        .json(&json!({"data": "hi", "decoding_strategy": "telepathy"}))
        .send()
        .await
        .unwrap();
    let (status, body) = json(r).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("decoding_strategy"),
        "{body}"
    );

    // Job ids: malformed 400, unknown 404.
    let (status, body) = json(http.get(gw.url("/v1/jobs/not-a-uuid")).send().await.unwrap()).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_job_id")),
        "{body}"
    );
    let unknown = uuid::Uuid::new_v4();
    let (status, body) = json(
        http.get(gw.url(&format!("/v1/jobs/{unknown}")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );

    env.finish().await;
}

#[tokio::test]
async fn v1_jobs_configured_to_clean_applies_the_originals_rules_and_the_reject_policy() {
    let mut env = TestEnv::new();
    let mut flags = GENEROUS.to_vec();
    flags.extend(["--prompt-policy", "clean"]);
    let gw = env.gateway(&flags).await;
    let http = env.http.clone();
    let (status, body) = submit(&http, &gw, json!({"prompt": "$$ ** @@"})).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("prompt_empty")),
        "{body}"
    );
    let (status, body) = submit(&http, &gw, json!({"prompt": "a".repeat(201)})).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("prompt_too_long")),
        "{body}"
    );
    // ... while 200 allowed characters plus removable ones pass, cleaned.
    let (status, body) = submit(&http, &gw, json!({"prompt": format!("{}$$$", "a".repeat(200))})).await;
    assert_eq!(
        (status, body["prompt"].as_str()),
        (202, Some("a".repeat(200).as_str())),
        "{body}"
    );

    let mut flags = GENEROUS.to_vec();
    flags.extend(["--prompt-policy", "clean", "--prompt-disallowed", "reject"]);
    let gw = env.gateway(&flags).await;
    let (status, body) = submit(&http, &gw, json!({"prompt": "hello $world"})).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("prompt_disallowed_characters")),
        "{body}"
    );
    env.finish().await;
}

#[tokio::test]
async fn a_client_that_dribbles_its_headers_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut env = TestEnv::new();
    let mut flags = GENEROUS.to_vec();
    flags.extend(["--header-read-timeout-ms", "300"]);
    let gw = env.gateway(&flags).await;
    let addr = gw.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Never finish the headers: the server must close the connection, soon after the timeout.
    let start = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection still open after 5 s");
    assert!(
        start.elapsed() < std::time::Duration::from_secs(2),
        "closed after {:?}",
        start.elapsed()
    );
    env.finish().await;
}

#[tokio::test]
async fn wrong_methods_and_unknown_paths_get_json_errors() {
    let mut env = TestEnv::new();
    let gw = env.gateway(GENEROUS).await;
    let http = env.http.clone();

    let (status, body) = json(http.get(gw.url("/run")).send().await.unwrap()).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (405, Some("method_not_allowed")),
        "{body}"
    );
    let (status, body) = json(http.delete(gw.url("/v1/queue")).send().await.unwrap()).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (405, Some("method_not_allowed")),
        "{body}"
    );
    let (status, body) = json(http.get(gw.url("/v2/nothing")).send().await.unwrap()).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("no such path"),
        "{body}"
    );
    env.finish().await;
}
