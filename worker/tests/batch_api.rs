//! OpenAI's Batch API end to end, a real worker on the tiny GPT-J behind the gateway.
//!
//! The official `openai` SDK, unmodified (`tests/py/batch_client.py`), with files on the local file system
//! and on S3 (moto's standalone server, started here); then the faults: a gateway killed (SIGKILL) while it
//! expands a batch and another while it finalizes one, each batch taken over by another gateway; a worker
//! killed while it runs a batch's job. Each batch must end with every `custom_id` exactly once in its
//! output or error file.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, REDIS_URL, free_port, python_client_checks_in};
use gateway::batch_driver::output_file_id;
use gateway::batch_lines::job_id;
use serde_json::{Value, json};

const KEY: &str = "batch-key-a";
const OTHER_KEY: &str = "batch-key-b";
const DONE: &str = "all batch API checks passed";

/// The SDK's checks on a gateway whose files are kept by `storage_args`, a batch submitted three lines at
/// a time.
async fn sdk_checks(env: &mut Env, storage_args: &[&str]) {
    let keys = format!("{KEY},{OTHER_KEY}");
    let mut args = vec![
        "--api-keys",
        &keys,
        "--batch-slice",
        "3",
        "--batch-poll-ms",
        "50",
        "--max-file-bytes",
        "1000000",
    ];
    args.extend_from_slice(storage_args);
    let extra = [std::ffi::OsStr::new(KEY), std::ffi::OsStr::new(OTHER_KEY)];
    python_client_checks_in(env, "batch_client.py", &args, &[], &extra, DONE).await;
}

#[tokio::test]
async fn the_openai_sdk_runs_batches_with_files_on_the_local_file_system() {
    let mut env = Env::new();
    let files = env.dir().join("files");
    sdk_checks(&mut env, &["--files-dir", files.to_str().unwrap()]).await;
    let kept = std::fs::read_dir(files.join(&env.ns).join("files"))
        .unwrap()
        .count();
    assert!(kept >= 4, "the files are in --files-dir ({kept})");
    env.finish().await;
}

/// moto's S3-compatible server, on a free port, killed when dropped.
struct Moto {
    child: Child,
    url: String,
}

impl Moto {
    async fn start(bucket: &str) -> Self {
        let python = std::env::var_os("GPTJ_PYTHON").expect("GPTJ_PYTHON (scripts/test.sh sets it)");
        let port = free_port();
        let child = Command::new(python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let moto = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.put(format!("{}/{bucket}", moto.url)).send().await {
                assert!(r.status().is_success(), "moto made no bucket: {}", r.status());
                return moto;
            }
            assert!(Instant::now() < deadline, "moto never answered on {}", moto.url);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_openai_sdk_runs_batches_with_files_on_s3() {
    let moto = Moto::start("batch-files").await;
    let mut env = Env::new();
    sdk_checks(
        &mut env,
        &[
            "--files-s3-bucket",
            "batch-files",
            "--files-s3-endpoint",
            &moto.url,
            "--files-s3-access-key-id",
            "test",
            "--files-s3-secret-access-key",
            "test",
            // Nothing may land in a local directory.
            "--files-dir",
            "/nonexistent/batch-files",
        ],
    )
    .await;
    let listing = reqwest::get(format!(
        "{}/batch-files?list-type=2&prefix={}/files/",
        moto.url, env.ns
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert!(
        listing.matches("<Key>").count() >= 4,
        "the files are in the bucket: {listing}"
    );
    env.finish().await;
}

/// A `gateway` process (the binary `cargo test` builds beside the worker's), killed when dropped.
struct GatewayProcess {
    child: Child,
    base: String,
    log: PathBuf,
}

impl GatewayProcess {
    /// SIGKILL: no shutdown, its leases left to lapse.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The flags every gateway of a fault test takes, less those `extra` sets: the env's namespace and broker,
/// limits out of the way, files in the env's directory, batches looked at often and left by a dead gateway
/// after a second.
fn gateway_flags(env: &Env, extra: &[&str]) -> Vec<String> {
    let files = env.dir().join("files");
    let defaults = [
        ("--namespace", env.ns.as_str()),
        ("--amqp-url", env.amqp_url.as_str()),
        ("--redis-url", REDIS_URL),
        ("--served-model-name", "gpt-j-tiny"),
        ("--submit-rate-limit", "100000/1s"),
        ("--read-rate-limit", "100000/1s"),
        ("--token-rate-limit", "1000000000/1s"),
        ("--max-active-jobs-per-client", "0"),
        ("--files-dir", files.to_str().unwrap()),
        ("--batch-poll-ms", "50"),
        ("--batch-lease-ms", "1000"),
    ];
    let mut flags = Vec::new();
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            flags.extend([flag.to_owned(), value.to_owned()]);
        }
    }
    flags.extend(extra.iter().map(|s| s.to_string()));
    flags
}

async fn spawn_gateway(env: &Env, extra: &[&str]) -> GatewayProcess {
    let bin = Path::new(env!("CARGO_BIN_EXE_worker")).with_file_name("gateway");
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build -p gateway`; `cargo test --workspace` does)",
        bin.display()
    );
    let port = free_port();
    let log = env.dir().join(format!("gateway-{port}.log"));
    let child = Command::new(bin)
        .args(gateway_flags(env, extra))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let gateway = GatewayProcess {
        child,
        base: format!("http://127.0.0.1:{port}"),
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = env.http.get(format!("{}/readyz", gateway.base)).send().await
            && r.status() == 200
        {
            return gateway;
        }
        assert!(
            Instant::now() < deadline,
            "gateway never ready:\n{}",
            gateway.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An in-process gateway like [`spawn_gateway`]'s (the harness gives it the namespace, broker and limits),
/// to finish what a killed one left.
async fn gateway_in_process(env: &mut Env, extra: &[&str]) -> String {
    let files = env.dir().join("files");
    let mut args = vec![
        "--served-model-name",
        "gpt-j-tiny",
        "--files-dir",
        files.to_str().unwrap(),
        "--batch-poll-ms",
        "50",
        "--batch-lease-ms",
        "1000",
    ];
    args.extend_from_slice(extra);
    env.gateway_with(&args).await
}

/// A chat batch file of `lines` requests (`custom_id` `req-{i}`), each asking `max_tokens(i)` tokens.
fn chat_file(lines: usize, max_tokens: impl Fn(usize) -> u32) -> String {
    (0..lines)
        .map(|i| {
            json!({"custom_id": format!("req-{i}"), "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "gpt-j-tiny", "messages": [{"role": "user", "content": format!("Line {i}")}],
                    "max_tokens": max_tokens(i), "temperature": 0}})
            .to_string()
                + "\n"
        })
        .collect()
}

/// Uploads `text` as a batch file and creates a chat batch of it; returns the batch's id.
async fn create_batch(env: &Env, base: &str, text: &str) -> String {
    const BOUNDARY: &str = "batch-test-boundary";
    let form = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n{text}\r\n--{BOUNDARY}--\r\n"
    );
    let file: Value = env
        .http
        .post(format!("{base}/v1/files"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let batch: Value = env
        .http
        .post(format!("{base}/v1/batches"))
        .json(&json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    batch["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{file} {batch}"))
        .to_owned()
}

async fn get(env: &Env, url: String) -> Option<Value> {
    match env.http.get(url).send().await {
        Ok(r) if r.status() == 200 => r.json().await.ok(),
        _ => None,
    }
}

/// Polls `what` every 20 ms until it gives something, for at most `timeout`.
async fn until<T, F: std::future::Future<Output = Option<T>>>(
    timeout: Duration,
    what: &str,
    f: impl Fn() -> F,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for batch `id` to end; asserts it completed with every one of its `lines` requests in its output
/// or error file exactly once, and returns how many of them were answered.
async fn completes_with_every_request_once(env: &Env, base: &str, id: &str, lines: usize) -> usize {
    let lines = ends_with_every_request_once(env, base, id, lines, "completed").await;
    lines.keys().filter(|k| !k.starts_with("error:")).count()
}

/// Waits for batch `id` to end; asserts it ended `status` with every one of its `lines` requests in its
/// output or error file exactly once; returns the output file's lines by `custom_id`, and the error file's
/// after them under `error:{custom_id}`.
async fn ends_with_every_request_once(
    env: &Env,
    base: &str,
    id: &str,
    lines: usize,
    status: &str,
) -> HashMap<String, Value> {
    let batch = until(Duration::from_secs(180), "the batch ends", || async {
        get(env, format!("{base}/v1/batches/{id}")).await.filter(|b| {
            ["completed", "failed", "expired", "cancelled"].contains(&b["status"].as_str().unwrap())
        })
    })
    .await;
    assert_eq!(batch["status"], status, "{batch}\n{}", env.logs());
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut answered = HashMap::new();
    for (file, prefix) in [
        (&batch["output_file_id"], ""),
        (&batch["error_file_id"], "error:"),
    ] {
        let Some(file) = file.as_str() else { continue };
        let text = env
            .http
            .get(format!("{base}/v1/files/{file}/content"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for line in text.lines() {
            let line: Value = serde_json::from_str(line).unwrap();
            let custom_id = line["custom_id"].as_str().unwrap().to_owned();
            *seen.entry(custom_id.clone()).or_default() += 1;
            answered.insert(format!("{prefix}{custom_id}"), line);
        }
    }
    let expected: HashMap<String, usize> = (0..lines).map(|i| (format!("req-{i}"), 1)).collect();
    assert_eq!(seen, expected, "every custom_id exactly once: {batch}");
    let counts = &batch["request_counts"];
    assert_eq!(counts["total"], lines);
    let output = answered.keys().filter(|k| !k.starts_with("error:")).count();
    assert_eq!(counts["completed"], output);
    assert_eq!(counts["failed"], lines - output);
    answered
}

#[tokio::test]
async fn a_gateway_killed_while_expanding_a_batch_leaves_it_to_another_and_it_completes_once() {
    let mut env = Env::new();
    // One line at a time: until its job ends, the rest of the batch is not submitted.
    let mut first = spawn_gateway(&env, &["--batch-slice", "1"]).await;
    let id = create_batch(&env, &first.base, &chat_file(5, |_| 4)).await;
    // No worker yet, so the first line's job stays queued: the gateway has submitted 1 of 5 lines.
    let job = job_id(&id, 0, 0);
    until(Duration::from_secs(30), "the first line's job is queued", || {
        get(&env, format!("{}/v1/jobs/{job}", first.base))
    })
    .await;
    let batch = get(&env, format!("{}/v1/batches/{id}", first.base))
        .await
        .unwrap();
    assert_eq!(batch["status"], "in_progress", "{batch}");
    first.kill();

    let second = gateway_in_process(&mut env, &["--batch-slice", "1"]).await;
    env.spawn_worker(&[]);
    let answered = completes_with_every_request_once(&env, &second, &id, 5).await;
    assert_eq!(answered, 5, "{}", first.log());
    env.finish().await;
}

#[tokio::test]
async fn a_gateway_killed_while_finalizing_a_batch_leaves_it_to_another_and_it_completes_once() {
    let mut env = Env::new();
    env.spawn_worker(&[]);
    env.wait_for_consumers(1).await;
    // This gateway holds finalization after writing the batch's files, before recording them.
    let mut first = spawn_gateway(&env, &["--batch-finalize-hold-ms", "600000"]).await;
    let id = create_batch(&env, &first.base, &chat_file(4, |_| 4)).await;
    let output = env
        .dir()
        .join("files")
        .join(&env.ns)
        .join("files")
        .join(output_file_id(&id, "output"));
    until(Duration::from_secs(120), "the output file is written", || async {
        output.exists().then_some(())
    })
    .await;
    let batch = get(&env, format!("{}/v1/batches/{id}", first.base))
        .await
        .unwrap();
    assert_eq!(batch["status"], "finalizing", "{batch}");
    first.kill();

    let second = gateway_in_process(&mut env, &[]).await;
    let answered = completes_with_every_request_once(&env, &second, &id, 4).await;
    assert_eq!(answered, 4);
    let batch = get(&env, format!("{second}/v1/batches/{id}")).await.unwrap();
    assert_eq!(
        batch["output_file_id"],
        output_file_id(&id, "output"),
        "the redone output replaced the first"
    );
    env.finish().await;
}

#[tokio::test]
async fn a_worker_killed_mid_batch_leaves_its_job_to_another_worker_and_the_batch_completes_once() {
    let mut env = Env::new();
    let base = gateway_in_process(&mut env, &[]).await;
    let doomed = env.spawn_worker(&[]);
    env.wait_for_consumers(1).await;
    // The first line is long, so the worker is killed while it runs it.
    let id = create_batch(&env, &base, &chat_file(3, |i| if i == 0 { 600 } else { 4 })).await;
    let job = job_id(&id, 0, 0);
    until(Duration::from_secs(60), "the long line's job runs", || async {
        get(&env, format!("{base}/v1/jobs/{job}"))
            .await
            .filter(|j| j["status"] == "running")
    })
    .await;
    env.workers[doomed].kill();
    env.spawn_worker(&[]);
    let answered = completes_with_every_request_once(&env, &base, &id, 3).await;
    assert_eq!(answered, 3);
    env.finish().await;
}

#[tokio::test]
async fn a_batch_past_its_window_ends_expired_keeping_its_finished_lines() {
    let mut env = Env::new();
    // A window of 20 s; one line at a time.
    let base = gateway_in_process(&mut env, &["--batch-window-s", "20", "--batch-slice", "1"]).await;
    let worker = env.spawn_worker(&[]);
    env.wait_for_consumers(1).await;
    let id = create_batch(&env, &base, &chat_file(3, |i| if i == 0 { 4 } else { 600 })).await;
    until(Duration::from_secs(60), "the first line is answered", || async {
        get(&env, format!("{base}/v1/batches/{id}"))
            .await
            .filter(|b| b["request_counts"]["completed"] == 1)
    })
    .await;
    // No worker from now on: what is left cannot finish before the window ends.
    env.workers[worker].kill();
    let lines = ends_with_every_request_once(&env, &base, &id, 3, "expired").await;
    assert_eq!(
        lines["req-0"]["response"]["status_code"], 200,
        "the finished line is kept"
    );
    for unfinished in ["error:req-1", "error:req-2"] {
        assert_eq!(lines[unfinished]["response"], Value::Null, "{lines:?}");
        assert_eq!(lines[unfinished]["error"]["code"], "batch_expired", "{lines:?}");
    }
    env.finish().await;
}

#[tokio::test]
async fn a_batchs_jobs_are_admitted_as_its_owners_within_the_owners_cap_of_active_jobs() {
    let mut env = Env::new();
    // The owner may have 2 jobs queued or running at once; the batch would queue 8.
    let gateway = spawn_gateway(&env, &["--max-active-jobs-per-client", "2", "--batch-slice", "8"]).await;
    env.spawn_worker(&[]);
    env.wait_for_consumers(1).await;
    let id = create_batch(&env, &gateway.base, &chat_file(6, |_| 16)).await;
    let redis = redis::Client::open(REDIS_URL).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let active = format!("{}:active:ip:127.0.0.1", env.ns);
    let mut most = 0;
    loop {
        let now: usize = redis::cmd("ZCARD")
            .arg(&active)
            .query_async(&mut conn)
            .await
            .unwrap();
        most = most.max(now);
        let batch = get(&env, format!("{}/v1/batches/{id}", gateway.base))
            .await
            .unwrap();
        if batch["status"] != "in_progress" && batch["status"] != "validating" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        most <= 2,
        "the owner's cap held the batch to 2 jobs at once, saw {most}"
    );
    // Refused for now, not for good: every line still ran.
    let answered = completes_with_every_request_once(&env, &gateway.base, &id, 6).await;
    assert_eq!(answered, 6, "{}", gateway.log());
    env.finish().await;
}

#[tokio::test]
async fn two_gateway_replicas_drive_a_batch_one_at_a_time_and_it_completes_once() {
    let mut env = Env::new();
    let a = gateway_in_process(&mut env, &["--batch-slice", "2"]).await;
    let b = gateway_in_process(&mut env, &["--batch-slice", "2"]).await;
    env.spawn_worker(&[]);
    env.wait_for_consumers(1).await;
    let id = create_batch(&env, &a, &chat_file(10, |_| 4)).await;
    let answered = completes_with_every_request_once(&env, &b, &id, 10).await;
    assert_eq!(answered, 10);
    env.finish().await;
}
