//! Structured output as its users meet it: the official `openai` SDK's `chat.completions.parse` with Pydantic
//! models, vLLM's extra fields and LangChain's `with_structured_output`, against a gateway and a real worker on
//! the tiny random GPT-J, whose unconstrained text is noise. The checks are in `tests/py/structured_output.py`:
//! every answer of 20 schemas of different shapes parses and validates, greedy and sampled.
#![allow(clippy::unwrap_used)]

mod common;

use common::Env;

#[tokio::test]
async fn unmodified_clients_get_answers_that_validate_against_their_schemas() {
    let Some(python) = std::env::var_os("GPTJ_PYTHON") else {
        panic!("GPTJ_PYTHON is not set: run the tests with scripts/test.sh, which provisions the venv");
    };
    let mut env = Env::new();
    let base = env.gateway_with(&["--served-model-name", "gpt-j-tiny"]).await;
    env.spawn_worker(&[]);
    env.wait_for_consumers(1).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/structured_output.py");
    let mut command = tokio::process::Command::new(python);
    command.arg(script).args([&base, "gpt-j-tiny"]);
    let stdout = env.run_checks(command).await;
    assert!(stdout.contains("all structured output checks passed"), "{stdout}");
    env.finish().await;
}
