//! lm-evaluation-harness, unmodified, as evaluation users run it against an OpenAI-compatible server: its
//! `local-completions` model scores a loglikelihood task (`echo` + `logprobs`) and runs a generate_until task,
//! from a local dataset, against a gateway and a real worker on the tiny GPT-J; each loglikelihood equals
//! transformers' on the same checkpoint (`tests/py/eval_harness.py`).
#![allow(clippy::unwrap_used)]

mod common;

#[tokio::test]
async fn lm_evaluation_harness_scores_text_as_transformers_does() {
    let work = tempfile::tempdir().unwrap();
    common::python_client_checks(
        "eval_harness.py",
        &[],
        &[work.path().as_os_str()],
        "all eval harness checks passed",
    )
    .await;
}
