//! Log-probabilities as OpenAI clients and evaluation harnesses ask for them, through the official `openai`
//! SDK against a gateway and a real worker on the tiny GPT-J, checked against transformers on the same
//! checkpoint (`tests/py/logprobs_client.py`): a text's loglikelihood with `echo` and `max_tokens: 0`, the
//! generated tokens' on completions and chat, and the same streamed, a chunk every two tokens.

mod common;

#[tokio::test]
async fn logprobs_through_the_sdk_equal_transformers() {
    // Small chunks: a stream's log-probabilities are cut in several places.
    let worker = ["--stream-tokens", "2", "--stream-interval-ms", "5"];
    common::python_client_checks("logprobs_client.py", &worker, &[], "all logprobs checks passed").await;
}
