//! The playground at `/` in a real browser (Debian's headless Chromium, driven by Playwright for Python from
//! the venv, both installed by `scripts/test.sh`), against the real gateway and a worker on the tiny GPT-J:
//! the page loads from the gateway alone, a prompt shows streamed text, the cancel button cancels. The checks
//! are in `tests/py/playground.py`; screenshots are kept in `target/playground/`.
#![allow(clippy::unwrap_used)]

mod common;

use common::Env;

#[tokio::test]
async fn the_playground_streams_a_job_and_cancels_one_in_a_real_browser() {
    let Some(python) = std::env::var_os("GPTJ_PYTHON") else {
        panic!("GPTJ_PYTHON is not set: run the tests with scripts/test.sh, which provisions the venv");
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/playground.py");
    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/playground");
    std::fs::create_dir_all(&shots).unwrap();
    let mut env = Env::new();
    let gw = env.gateway().await;
    env.spawn_worker(&[]);
    env.wait_for_consumers(1).await;
    let mut command = tokio::process::Command::new(python);
    command.arg(script).arg(&gw).arg(&shots);
    let stdout = env.run_checks(command).await;
    assert!(stdout.contains("playground checks passed"), "{stdout}");
    assert!(shots.join("playground-succeeded.png").exists());
    env.finish().await;
}
