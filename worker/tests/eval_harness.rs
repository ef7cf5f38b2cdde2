//! lm-evaluation-harness, unmodified, as evaluation users run it against an OpenAI-compatible server: its
//! `local-completions` model scores a loglikelihood task (`echo` + `logprobs`) and runs a generate_until task,
//! from a local dataset, against a gateway and a real worker on the tiny GPT-J; each loglikelihood equals
//! transformers' on the same checkpoint (`tests/py/eval_harness.py`).
#![allow(clippy::unwrap_used)]

mod common;

use common::Env;

#[tokio::test]
async fn lm_evaluation_harness_scores_text_as_transformers_does() {
    let Some(python) = std::env::var_os("GPTJ_PYTHON") else {
        panic!("GPTJ_PYTHON is not set: run the tests with scripts/test.sh, which provisions the venv");
    };
    let mut env = Env::new();
    let base = env.gateway_with(&["--served-model-name", "gpt-j-tiny"]).await;
    env.spawn_worker(&[]);
    env.wait_for_consumers(1).await;
    let work = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/eval_harness.py");
    let mut command = tokio::process::Command::new(python);
    command
        .arg(script)
        .args([&base, "gpt-j-tiny"])
        .arg(common::tiny_model())
        .arg(work.path());
    let stdout = env.run_checks(command).await;
    assert!(stdout.contains("all eval harness checks passed"), "{stdout}");
    env.finish().await;
}
