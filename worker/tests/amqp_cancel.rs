//! docs/amqp.md's pika example (`examples/amqp_cancel.py`) run as written against a real worker: a raw
//! AMQP producer streams a job's tokens and cancels it through the control exchange.
#![allow(clippy::unwrap_used)]

mod common;

use common::Env;

#[tokio::test]
async fn the_pika_example_streams_a_job_and_cancels_it_over_amqp() {
    let python = std::env::var_os("GPTJ_PYTHON").expect("GPTJ_PYTHON: run the tests with scripts/test.sh");
    let mut env = Env::new();
    env.spawn_worker(&[]);
    env.wait_for_consumers(1).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/amqp_cancel.py");
    let mut command = tokio::process::Command::new(python);
    command
        .arg(script)
        .env("AMQP_URL", &env.amqp_url)
        .env("NAMESPACE", &env.ns);
    let stdout = env.run_checks(command).await;
    let tokens: u32 = stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("cancelled after ")?
                .strip_suffix(" tokens")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no cancelled reply:\n{stdout}"));
    assert!(
        (20..1000).contains(&tokens),
        "{tokens} tokens before the cancel took:\n{stdout}"
    );
    env.finish().await;
}
