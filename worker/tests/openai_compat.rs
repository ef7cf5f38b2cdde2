//! The OpenAI routes as a load tester meets them: its request bodies, byte for byte as it sends them
//! (streamed, `stream_options` with vLLM's `continuous_usage_stats`, `ignore_eos`, chat content as a list of
//! text parts with `max_completion_tokens`, a 325-character prompt with newlines and punctuation), against a
//! real gateway and a worker on the tiny GPT-J. Each must succeed, carry the usage in every chunk, generate
//! exactly the tokens asked, and show that the prompt reached the model unchanged: its token count in the
//! usage is the tokenizer's count of the text as written (for chat, of the conversation as the template
//! renders it), and the job's record holds that very text.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Env, SseReader};
use serde_json::{Value, json};
use shared::chat::{ChatMessage, ChatTemplate, Role};
use shared::testing::LOAD_TESTER_PROMPT;

const MODEL: &str = "gpt-j-tiny";
const MAX_TOKENS: u64 = 24;

/// The chunks of a streamed answer, parsed, up to `[DONE]` (which must end it).
async fn stream(env: &Env, url: &str, body: &Value) -> Vec<Value> {
    let response = env.http.post(url).json(body).send().await.unwrap();
    let status = response.status();
    if status != 200 {
        panic!("{url} answered {status}: {}", response.text().await.unwrap());
    }
    let mut events = SseReader::new(response);
    let mut chunks = Vec::new();
    while let Some(event) = events.next().await {
        if event.data == "[DONE]" {
            assert!(events.next().await.is_none(), "nothing after [DONE]");
            return chunks;
        }
        chunks.push(serde_json::from_str(&event.data).unwrap());
    }
    panic!("{url}: the stream ended without [DONE]: {chunks:?}");
}

/// Checks a stream's chunks against what the request asked; returns its text and its job's id.
fn check(chunks: &[Value], prompt_tokens: u64, text_of: impl Fn(&Value) -> Option<&str>) -> (String, String) {
    assert!(chunks.len() >= 2, "{chunks:?}");
    let mut so_far = 0;
    for chunk in chunks {
        assert!(chunk.get("error").is_none(), "{chunk}");
        let usage = &chunk["usage"];
        assert!(usage.is_object(), "usage in every chunk: {chunk}");
        assert_eq!(usage["prompt_tokens"], prompt_tokens, "{chunk}");
        let completion = usage["completion_tokens"].as_u64().unwrap();
        assert!(completion >= so_far, "completion tokens only grow: {chunk}");
        assert_eq!(usage["total_tokens"], prompt_tokens + completion, "{chunk}");
        so_far = completion;
    }
    let last = chunks.last().unwrap();
    assert_eq!(
        last["choices"],
        json!([]),
        "the usage chunk ends the stream: {last}"
    );
    assert_eq!(
        last["usage"]["completion_tokens"], MAX_TOKENS,
        "every token asked, EOS ignored: {last}"
    );
    let finishes: Vec<&Value> = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap())
        .filter(|c| !c["finish_reason"].is_null())
        .map(|c| &c["finish_reason"])
        .collect();
    assert_eq!(finishes, [&json!("length")], "{chunks:?}");
    let text: String = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap())
        .filter_map(&text_of)
        .collect();
    let id = last["id"].as_str().unwrap();
    let job = id.split_once('-').unwrap().1.parse::<shared::JobId>().unwrap();
    (text, job.to_string())
}

#[tokio::test]
async fn a_load_testers_streamed_requests_succeed_with_usage_in_every_chunk_every_token_and_the_prompt_as_written()
 {
    let mut env = Env::new();
    let gw = env.gateway_with(&["--served-model-name", MODEL]).await;
    env.spawn_worker(&[]);
    env.wait_for_consumers(1).await;
    let tokenizer = worker::tokenizer::load(common::tiny_model()).unwrap();
    let count = |text: &str| tokenizer.encode(text, false).unwrap().len() as u64;
    let options = json!({"include_usage": true, "continuous_usage_stats": true});

    // /v1/completions, as vLLM's benchmark_serving sends it (with the load tester's stream options).
    let body = json!({
        "model": MODEL, "prompt": LOAD_TESTER_PROMPT, "temperature": 0.0, "repetition_penalty": 1.0,
        "max_tokens": MAX_TOKENS, "logprobs": null, "stream": true, "stream_options": options,
        "ignore_eos": true,
    });
    let chunks = stream(&env, &format!("{gw}/v1/completions"), &body).await;
    let (text, job) = check(&chunks, count(LOAD_TESTER_PROMPT), |c| c["text"].as_str());
    let view = env.view(&gw, &job).await;
    assert_eq!(
        view["prompt"], LOAD_TESTER_PROMPT,
        "the prompt as written: {view}"
    );
    assert_eq!(view["result"]["text"], text.as_str(), "{view}");
    assert_eq!(view["result"]["new_tokens"], MAX_TOKENS, "{view}");

    // /v1/chat/completions: content as a list of text parts, max_completion_tokens.
    let body = json!({
        "model": MODEL, "temperature": 0.0, "max_completion_tokens": MAX_TOKENS, "stream": true,
        "stream_options": options, "ignore_eos": true,
        "messages": [{"role": "user", "content": [{"type": "text", "text": LOAD_TESTER_PROMPT}]}],
    });
    let rendered = ChatTemplate::default_template(None)
        .render(&[ChatMessage::new(Role::User, LOAD_TESTER_PROMPT)], true)
        .unwrap();
    let chunks = stream(&env, &format!("{gw}/v1/chat/completions"), &body).await;
    let (text, job) = check(&chunks, count(&rendered), |c| c["delta"]["content"].as_str());
    let view = env.view(&gw, &job).await;
    assert_eq!(
        view["result"]["full_text"],
        format!("{rendered}{text}"),
        "the conversation the model ran is the content as written, rendered: {view}"
    );
    env.finish().await;
}
