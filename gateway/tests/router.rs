//! The HTTP surface without Redis or RabbitMQ: every refusal the gateway makes before it needs either,
//! through the router itself (`tower::ServiceExt::oneshot`), so these run in milliseconds. Redis and the
//! broker point at a closed port; nothing here may depend on them.
#![allow(clippy::unwrap_used)]

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::Value;
use shared::testing::LOAD_TESTER_PROMPT;
use tower::ServiceExt;

fn router(extra: &[&str]) -> axum::Router {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut args = vec![
        "gateway".to_owned(),
        "--redis-url".to_owned(),
        format!("redis://127.0.0.1:{closed}/"),
        "--amqp-url".to_owned(),
        format!("amqp://guest:guest@127.0.0.1:{closed}/%2f"),
        "--redis-timeout-ms".to_owned(),
        "50".to_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let config = gateway::Config::from_args(args).unwrap();
    gateway::routes::router(gateway::app(&config).unwrap())
}

async fn call(router: &axum::Router, request: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let body =
        serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, headers, body)
}

fn post(path: &str, body: &str) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

/// Refusals before Redis or the broker: (path, body, status, code, the field blamed). The OpenAI routes
/// answer in OpenAI's shape (`{"error": {...}}`, invalid parameters as 400), ours as `{code, message}`.
#[rustfmt::skip]
const REFUSALS: &[(&str, &str, u16, &str, Option<&str>)] = &[
    ("/v1/jobs", "{\"prompt\": ", 400, "invalid_json", None),
    ("/v1/jobs", r#"{"prompt": "hi", "colour": 1}"#, 422, "unknown_field", None),
    ("/v1/jobs", r#"{"prompt": "hi", "parameters": {"max_new_tokens": 0}}"#, 422, "invalid_parameter", None),
    ("/v1/jobs", r#"{"prompt": "\u0000\u0007"}"#, 422, "prompt_empty", None),
    ("/run", r#"{"data": "$$$"}"#, 422, "prompt_empty", None),
    ("/run", r#"{"prompt": "$$$"}"#, 422, "prompt_empty", None),
    ("/v1/jobs", r#"{"prompt": "hi", "version": 99}"#, 422, "unsupported_version", None),
    ("/v1/jobs", r#"{"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}"#, 422, "invalid_parameter", None),
    ("/run", r#"{"data": "x", "num_tokens": 0}"#, 422, "invalid_parameter", None),
    ("/v1/jobs", r#"{"prompt": "Once upon a time", "parameters": {"max_new_tokens": 2045}}"#, 422, "context_overflow", None),
    ("/run", r#"{"data": "Once upon a time", "num_tokens": 2048}"#, 422, "context_overflow", None),
    ("/v1/completions", r#"{"model": "gpt-j", "prompt": "hi", "max_tokens": 2048}"#, 400, "context_overflow", Some("max_tokens")),
    ("/v1/completions", r#"{"model": "gpt-j", "prompt": "hi", "max_tokens": 4, "min_tokens": 5}"#, 400, "invalid_parameter", Some("min_tokens")),
    ("/v1/completions", r#"{"model": "gpt-j", "prompt": "hi", "max_tokens": 3000}"#, 400, "invalid_parameter", Some("max_tokens")),
    ("/v1/completions", r#"{"model": "gpt-j", "prompt": "\u0000"}"#, 400, "prompt_empty", Some("prompt")),
    ("/v1/completions", r#"{"model": "gpt-j", "prompt": "hi", "min_p": 1.5}"#, 400, "invalid_parameter", Some("min_p")),
    ("/v1/completions", r#"{"model": "gpt-j", "prompt": "hi", "stream": true, "stream_options": {"include_usage": true, "chunk_every": 2}}"#, 400, "unknown_field", Some("stream_options.chunk_every")),
    ("/run", r#"{"data": "x", "decoding_strategy": "telepathy"}"#, 422, "invalid_parameter", None),
    ("/v1/completions", r#"{"model": "gpt-4", "prompt": "hi"}"#, 404, "model_not_found", Some("model")),
    ("/v1/completions", r#"{"model": "gpt-j", "prompt": "hi", "temperature": -1}"#, 400, "invalid_parameter", Some("temperature")),
    ("/v1/completions", r#"{"model": "gpt-j", "prompt": "hi", "logprobs": 21}"#, 400, "invalid_parameter", Some("logprobs")),
    ("/v1/completions", r#"{"model": "gpt-j", "prompt": "hi", "n": 9}"#, 400, "invalid_parameter", Some("n")),
    ("/v1/completions", r#"{"model": "gpt-j", "prompt": "hi", "wat": 1}"#, 400, "unknown_field", Some("wat")),
    ("/v1/chat/completions", r#"{"model": "gpt-j", "messages": [], "max_tokens": 3}"#, 400, "invalid_parameter", Some("messages")),
    ("/v1/chat/completions", "{", 400, "invalid_json", None),
];

#[tokio::test]
async fn malformed_requests_are_refused_naming_the_problem_in_each_routes_shape() {
    let r = router(&["--served-model-name", "gpt-j"]);
    for (path, body, status, code, param) in REFUSALS {
        let (got, _, json) = call(&r, post(path, body)).await;
        let openai = path.starts_with("/v1/completions") || path.starts_with("/v1/chat/");
        let e = if openai { &json["error"] } else { &json };
        assert_eq!(
            (got.as_u16(), e["code"].as_str()),
            (*status, Some(*code)),
            "{path} {body}: {json}"
        );
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{json}");
        if openai {
            assert_eq!(e["type"], "invalid_request_error", "{json}");
            assert_eq!(e["param"].as_str(), *param, "{json}");
            let message = e["message"].as_str().unwrap();
            assert!(
                !message.contains("max_new_tokens") && !message.contains("min_new_tokens"),
                "OpenAI's names, not ours: {json}"
            );
        }
    }
    // One that fits goes on to the rate limiter, which needs Redis (down here): not refused for its size.
    let (status, _, _) = call(
        &r,
        post(
            "/v1/jobs",
            r#"{"prompt": "Once upon a time", "parameters": {"max_new_tokens": 2044}}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(70_000));
    let (status, _, json) = call(&r, post("/v1/jobs", &big)).await;
    assert_eq!(
        (status, json["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
    );
    let (status, _, json) = call(&r, get("/v1/models")).await;
    assert_eq!(
        (status, json["data"][0]["id"].as_str()),
        (StatusCode::OK, Some("gpt-j"))
    );
}

#[tokio::test]
async fn bad_job_ids_unknown_routes_and_wrong_methods_get_json_errors() {
    let r = router(&[]);
    for path in ["/v1/jobs/not-a-uuid", "/v1/jobs/not-a-uuid/events"] {
        let (status, _, json) = call(&r, get(path)).await;
        assert_eq!(
            (status, json["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_job_id")),
            "{path}"
        );
    }
    let delete = Request::delete("/v1/jobs/nope").body(Body::empty()).unwrap();
    let (status, _, json) = call(&r, delete).await;
    assert_eq!(
        (status, json["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_job_id"))
    );
    let (status, _, json) = call(&r, get("/v2/everything")).await;
    assert_eq!(
        (status, json["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let put = Request::put("/v1/jobs").body(Body::empty()).unwrap();
    let (status, _, json) = call(&r, put).await;
    assert_eq!(
        (status, json["code"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
    );
}

#[tokio::test]
async fn with_keys_on_a_missing_or_wrong_key_is_401_before_anything_else() {
    let r = router(&["--api-keys", "s3cret"]);
    let (status, _, json) = call(&r, post("/v1/jobs", r#"{"prompt": "hi"}"#)).await;
    assert_eq!(
        (status, json["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    let wrong = Request::get("/v1/jobs/6f1c2b1e-0000-4000-8000-000000000000")
        .header(header::AUTHORIZATION, "Bearer nope")
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&r, wrong).await.0, StatusCode::UNAUTHORIZED);
    let (status, _, json) = call(&r, post("/v1/completions", r#"{"model": "m", "prompt": "hi"}"#)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        json["error"]["type"], "authentication_error",
        "OpenAI's shape on its routes: {json}"
    );
}

#[tokio::test]
async fn a_preflight_from_a_configured_origin_is_allowed_and_others_are_not() {
    let preflight = |origin: &str| {
        Request::options("/v1/jobs")
            .header(header::ORIGIN, origin)
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .header(
                header::ACCESS_CONTROL_REQUEST_HEADERS,
                "authorization,content-type",
            )
            .body(Body::empty())
            .unwrap()
    };
    let r = router(&["--cors-allow-origins", "https://app.example"]);
    let (status, headers, _) = call(&r, preflight("https://app.example")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://app.example"
    );
    assert!(
        headers[header::ACCESS_CONTROL_ALLOW_HEADERS]
            .to_str()
            .unwrap()
            .contains("authorization")
    );
    let (_, headers, _) = call(&r, preflight("https://evil.example")).await;
    assert!(!headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
    // Off by default: no CORS headers at all.
    let (_, headers, _) = call(&router(&[]), preflight("https://app.example")).await;
    assert!(!headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
    // Any origin, on a plain request too.
    let any = router(&["--cors-allow-origins", "*"]);
    let request = Request::get("/healthz")
        .header(header::ORIGIN, "https://x.example")
        .body(Body::empty())
        .unwrap();
    let (_, headers, _) = call(&any, request).await;
    assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
}

#[tokio::test]
async fn the_playground_and_the_api_reference_are_served_from_the_binary_alone() {
    let r = router(&[]);
    let response = r.clone().oneshot(get("/")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let csp = response.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.starts_with("default-src 'self'"), "{csp}");
    let page = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let page = String::from_utf8_lossy(&page);
    assert!(
        page.contains("GPT-J playground") && !page.contains("https://"),
        "the page references another host"
    );

    for path in [
        "/docs/",
        "/docs/swagger-initializer.js",
        "/docs/swagger-ui-bundle.js",
    ] {
        let (status, _, _) = call(&r, get(path)).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    let (_, _, init) = call(&r, get("/docs/swagger-initializer.js")).await;
    let init = init.as_str().unwrap().to_owned();
    assert!(
        init.contains("/openapi.json") && init.contains("\"validatorUrl\": \"none\""),
        "{init}"
    );
    let (_, _, index) = call(&r, get("/docs/")).await;
    assert!(
        !index.as_str().unwrap().contains("//cdn"),
        "the docs page loads a CDN"
    );
}

/// A body that passed every check reaches the broker, which is down here: 503, not a refusal.
fn accepted(status: StatusCode, json: &Value) {
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{json}");
}

#[tokio::test]
async fn harmless_and_vllm_fields_are_accepted_on_both_openai_routes() {
    assert_eq!(LOAD_TESTER_PROMPT.chars().count(), 325);
    let r = router(&["--served-model-name", "gpt-j"]);
    let ignored = r#""user": "u", "metadata": {"run": "1"}, "store": false, "service_tier": "auto",
        "safety_identifier": "s", "prompt_cache_key": "k", "parallel_tool_calls": false,
        "reasoning_effort": "low", "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0,
        "ignore_eos": true, "min_p": 0.05, "stream": true,
        "stream_options": {"include_usage": true, "continuous_usage_stats": true}"#;
    let prompt = serde_json::to_string(LOAD_TESTER_PROMPT).unwrap();
    let completion = format!(r#"{{"model": "gpt-j", "prompt": {prompt}, "max_tokens": 8, {ignored}}}"#);
    let (status, _, json) = call(&r, post("/v1/completions", &completion)).await;
    accepted(status, &json);
    let chat = format!(
        r#"{{"model": "gpt-j", "messages": [{{"role": "user", "content": [{{"type": "text", "text": {prompt}}}]}}],
            "max_completion_tokens": 8, {ignored}}}"#
    );
    let (status, _, json) = call(&r, post("/v1/chat/completions", &chat)).await;
    accepted(status, &json);
    // What cannot be delivered is still refused by name: tools without a forced call mean `auto`, which the
    // model cannot decide.
    let tools = r#"{"model": "gpt-j", "messages": [{"role": "user", "content": "hi"}], "parallel_tool_calls": true,
        "tools": [{"type": "function", "function": {"name": "f"}}]}"#;
    let (status, _, json) = call(&r, post("/v1/chat/completions", tools)).await;
    assert_eq!(
        (status, json["error"]["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("tool_choice"))
    );
}

#[tokio::test]
async fn prompts_are_taken_as_written_on_the_openai_routes_and_v1_jobs_and_cleaned_on_run() {
    let r = router(&[]);
    let prompt = serde_json::to_string(LOAD_TESTER_PROMPT).unwrap();
    let (status, _, json) = call(&r, post("/v1/jobs", &format!(r#"{{"prompt": {prompt}}}"#))).await;
    accepted(status, &json);
    let messages = format!(
        r#"{{"messages": [{{"role": "system", "content": {prompt}}}, {{"role": "user", "content": "hi"}}]}}"#
    );
    let (status, _, json) = call(&r, post("/v1/jobs", &messages)).await;
    accepted(status, &json);
    // /run keeps the original's 200 characters, counted after cleaning.
    let (status, _, json) = call(&r, post("/run", &format!(r#"{{"data": {prompt}}}"#))).await;
    assert_eq!(
        (status, json["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("prompt_too_long")),
        "{json}"
    );
    // --prompt-policy clean moves /v1/jobs (alone) back to the original's rules.
    let clean = router(&["--prompt-policy", "clean"]);
    let (status, _, json) = call(&clean, post("/v1/jobs", &format!(r#"{{"prompt": {prompt}}}"#))).await;
    assert_eq!(json["code"].as_str(), Some("prompt_too_long"), "{status} {json}");
    let completion = format!(r#"{{"model": "EleutherAI/gpt-j-6b", "prompt": {prompt}}}"#);
    let (status, _, json) = call(&clean, post("/v1/completions", &completion)).await;
    accepted(status, &json);
    // As written, bounded in tokens: a prompt past the context is refused whatever its characters.
    let long = serde_json::to_string(&"token ".repeat(2100)).unwrap();
    let (status, _, json) = call(
        &r,
        post(
            "/v1/completions",
            &format!(r#"{{"model": "EleutherAI/gpt-j-6b", "prompt": {long}}}"#),
        ),
    )
    .await;
    assert_eq!(
        (status, json["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("context_overflow")),
        "{json}"
    );
}

#[tokio::test]
async fn health_answers_as_readyz_under_the_name_vllm_and_tgi_use() {
    // Redis and the broker are down here: not ready, on both names.
    let r = router(&[]);
    let (status, _, health) = call(&r, get("/health")).await;
    let (ready_status, _, ready) = call(&r, get("/readyz")).await;
    assert_eq!((status, &health), (ready_status, &ready));
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health["ready"], false, "{health}");
}

#[tokio::test]
async fn a_model_is_retrieved_by_its_id_and_an_unknown_one_is_404_in_openais_shape() {
    let r = router(&[]);
    let (status, _, model) = call(&r, get("/v1/models/EleutherAI/gpt-j-6b")).await;
    assert_eq!(status, StatusCode::OK, "{model}");
    assert_eq!(model["id"], "EleutherAI/gpt-j-6b");
    assert_eq!(model["object"], "model");
    assert!(
        model["created"].is_u64() && model["owned_by"].is_string(),
        "{model}"
    );
    let (_, _, list) = call(&r, get("/v1/models")).await;
    assert_eq!(list["data"][0], model, "the list holds the same object");
    // An id with its `/` percent-encoded, as some clients send it.
    let (status, _, _) = call(&r, get("/v1/models/EleutherAI%2Fgpt-j-6b")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, json) = call(&r, get("/v1/models/gpt-4o")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        json["error"],
        serde_json::json!({"message": "the model `gpt-4o` does not exist; GET /v1/models lists the one served here",
            "type": "invalid_request_error", "param": "model", "code": "model_not_found"})
    );
}

#[tokio::test]
async fn every_404_405_and_413_under_the_openai_paths_has_openais_shape() {
    let r = router(&["--body-limit-bytes", "2048"]);
    let big = format!(
        r#"{{"model": "EleutherAI/gpt-j-6b", "prompt": "{}"}}"#,
        "a".repeat(4096)
    );
    let chat_big = format!(
        r#"{{"model": "EleutherAI/gpt-j-6b", "messages": [{{"role": "user", "content": "{}"}}]}}"#,
        "a".repeat(4096)
    );
    let cases = [
        (
            post("/v1/completions", &big),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            post("/v1/chat/completions", &chat_big),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            get("/v1/completions"),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            get("/v1/chat/completions"),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            post("/v1/models", "{}"),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            Request::delete("/v1/models/EleutherAI/gpt-j-6b")
                .body(Body::empty())
                .unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            post("/v1/completions/extra", "{}"),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            get("/v1/chat/completions/abc"),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ];
    for (request, status, code) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        let (got, headers, json) = call(&r, request).await;
        assert_eq!(got, status, "{what}: {json}");
        assert_eq!(headers[header::CONTENT_TYPE], "application/json", "{what}");
        let e = &json["error"];
        assert_eq!(e["code"], code, "{what}: {json}");
        assert_eq!(e["type"], "invalid_request_error", "{what}: {json}");
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {json}"
        );
        assert!(e.get("param").is_some(), "{what}: {json}");
    }
    // Our own paths keep our shape.
    let (status, _, json) = call(&r, post("/v1/jobs", &big)).await;
    assert_eq!(
        (status, json["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
    );
}

#[tokio::test]
async fn every_401_names_the_bearer_scheme() {
    let r = router(&["--api-keys", "s3cret"]);
    for request in [
        post("/v1/jobs", r#"{"prompt": "hi"}"#),
        post("/run", r#"{"data": "hi"}"#),
        get("/v1/queue"),
        get("/v1/models"),
        get("/v1/models/EleutherAI/gpt-j-6b"),
        post("/v1/completions", r#"{"model": "m", "prompt": "hi"}"#),
        post("/v1/chat/completions", r#"{"model": "m", "messages": []}"#),
    ] {
        let what = format!("{} {}", request.method(), request.uri());
        let (status, headers, _) = call(&r, request).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer", "{what}");
    }
}
