//! The OpenAI-compatible API as its users meet it: the official `openai` Python SDK (in the project's venv)
//! against two gateway replicas sharing one broker, a real worker on the tiny GPT-J behind them. The checks
//! themselves are in `tests/py/openai_client.py`: completions and chat, streamed and not, usage, n choices,
//! our own parameters and vLLM's as extra fields, the SDK's bookkeeping fields accepted and ignored,
//! `models.retrieve`, `/health`, greedy text equal to `/v1/jobs`', errors in OpenAI's shape and names.
#![allow(clippy::unwrap_used)]

mod common;

use common::Env;

#[tokio::test]
async fn the_openai_python_sdk_works_against_two_replicas() {
    let Some(python) = std::env::var_os("GPTJ_PYTHON") else {
        panic!("GPTJ_PYTHON is not set: run the tests with scripts/test.sh, which provisions the venv");
    };
    let mut env = Env::new();
    let a = env.gateway_with(&["--served-model-name", "gpt-j-tiny"]).await;
    let b = env.gateway_with(&["--served-model-name", "gpt-j-tiny"]).await;
    env.spawn_worker(&[]);
    env.wait_for_consumers(1).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/openai_client.py");
    let mut command = tokio::process::Command::new(python);
    command.arg(script).args([&a, &b, "gpt-j-tiny"]);
    let stdout = env.run_checks(command).await;
    assert!(stdout.contains("all openai SDK checks passed"), "{stdout}");
    env.finish().await;
}
