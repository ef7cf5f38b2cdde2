//! Log-probabilities as OpenAI clients and evaluation harnesses ask for them, through the official `openai`
//! SDK against a gateway and a real worker on the tiny GPT-J, checked against transformers on the same
//! checkpoint (`tests/py/logprobs_client.py`): a text's loglikelihood with `echo` and `max_tokens: 0`, the
//! generated tokens' on completions and chat, and the same streamed, a chunk every two tokens.
#![allow(clippy::unwrap_used)]

mod common;

use common::Env;

#[tokio::test]
async fn logprobs_through_the_sdk_equal_transformers() {
    let Some(python) = std::env::var_os("GPTJ_PYTHON") else {
        panic!("GPTJ_PYTHON is not set: run the tests with scripts/test.sh, which provisions the venv");
    };
    let mut env = Env::new();
    let base = env.gateway_with(&["--served-model-name", "gpt-j-tiny"]).await;
    // Small chunks: a stream's log-probabilities are cut in several places.
    env.spawn_worker(&["--stream-tokens", "2", "--stream-interval-ms", "5"]);
    env.wait_for_consumers(1).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/logprobs_client.py");
    let mut command = tokio::process::Command::new(python);
    command
        .arg(script)
        .args([&base, "gpt-j-tiny"])
        .arg(common::tiny_model());
    let stdout = env.run_checks(command).await;
    assert!(stdout.contains("all logprobs checks passed"), "{stdout}");
    env.finish().await;
}
