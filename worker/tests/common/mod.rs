//! Harness for the end-to-end tests: real `worker serve` processes on a tiny random GPT-J, gateways started
//! in-process on port 0, and a raw AMQP producer, all on the machine's RabbitMQ and Redis. Every test has a
//! namespace of its own (and, when it cuts broker connections, a vhost of its own), deleted afterwards, so
//! tests run in parallel with each other and with other suites on the same broker.
#![allow(dead_code)] // each test uses a different part of the harness
#![allow(clippy::unwrap_used)] // a failed set-up step should fail the test

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde_json::Value;
use shared::{JobId, JobReply, Lane};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379/";

/// Runs the client script `tests/py/{script}` (the project venv's Python) against one gateway serving the
/// model as `gpt-j-tiny` and one worker (started with `worker_args`) on the tiny GPT-J, with the gateway's
/// base URL, the model's name, the tiny model's directory and `extra` as its arguments. The script exits
/// non-zero naming the check that failed; its last line must be `done` (its own "all … passed").
pub async fn python_client_checks(
    script: &str,
    worker_args: &[&str],
    extra: &[&std::ffi::OsStr],
    done: &str,
) {
    let mut env = Env::new();
    python_client_checks_in(&mut env, script, &[], worker_args, extra, done).await;
    env.finish().await;
}

/// [`python_client_checks`] in `env`, its gateway started with `gateway_args` besides.
pub async fn python_client_checks_in(
    env: &mut Env,
    script: &str,
    gateway_args: &[&str],
    worker_args: &[&str],
    extra: &[&std::ffi::OsStr],
    done: &str,
) {
    python_client_checks_by(env, "GPTJ_PYTHON", script, gateway_args, worker_args, extra, done).await;
}

/// [`python_client_checks_in`] with the interpreter `$python_var` names (scripts/lib.sh provisions each:
/// the main venv's, and instructor's own, whose pins the main one cannot share).
pub async fn python_client_checks_by(
    env: &mut Env,
    python_var: &str,
    script: &str,
    gateway_args: &[&str],
    worker_args: &[&str],
    extra: &[&std::ffi::OsStr],
    done: &str,
) {
    let Some(python) = std::env::var_os(python_var) else {
        panic!("{python_var} is not set: run the tests with scripts/test.sh, which provisions the venvs");
    };
    let mut args = vec!["--served-model-name", "gpt-j-tiny"];
    args.extend_from_slice(gateway_args);
    let base = env.gateway_with(&args).await;
    env.spawn_worker(worker_args);
    env.wait_for_consumers(1).await;
    let mut command = tokio::process::Command::new(python);
    command
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/py")
                .join(script),
        )
        .args([&base, "gpt-j-tiny"])
        .arg(tiny_model())
        .args(extra);
    let stdout = env.run_checks(command).await;
    assert!(stdout.contains(done), "{stdout}");
}

/// The tiny GPT-J ([`tiny_model`]) loaded as the worker loads it: for tests that drive its scheduler.
pub fn tiny_engine() -> worker::engine::Engine {
    worker::engine::Engine::load(&worker::engine::EngineOptions {
        model_dir: tiny_model().to_path_buf(),
        load: worker::model::LoadOptions::default(),
        threads: None,
    })
    .unwrap()
}

/// Submits every request to one running batch of `engine` before its first step and steps it until all have
/// finished: their results, in the requests' order.
pub fn run_batch(
    engine: &worker::engine::Engine,
    requests: Vec<worker::decoding::Request>,
) -> Vec<worker::decoding::FinishedSequence> {
    let mut scheduler = engine.scheduler(worker::decoding::Limits::unbounded());
    let ids: Vec<u64> = requests.iter().map(|r| r.id).collect();
    for request in requests {
        scheduler.submit(request).unwrap();
    }
    let mut done = std::collections::HashMap::new();
    tch::no_grad(|| {
        while scheduler.has_work() {
            for event in scheduler.step() {
                if let worker::decoding::Event::Finished { id, result } = event {
                    done.insert(id, result.unwrap());
                }
            }
        }
    });
    ids.iter().map(|id| done.remove(id).unwrap()).collect()
}

/// The tiny GPT-J every test's workers load: written once per test binary.
pub fn tiny_model() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        worker::tiny::write_tiny_model(dir.path(), &worker::tiny::TinyConfig::tiny(), 0).unwrap();
        dir
    })
    .path()
}

/// One `worker serve` process.
pub struct WorkerProcess {
    pub id: String,
    child: Child,
    log: PathBuf,
}

impl WorkerProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no goodbye to the broker, the job in hand is left unacknowledged.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as a container runtime stops it.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Sends `signal` (`STOP`, `CONT`): `docker pause` and `unpause` freeze and thaw a process so.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "worker {} did not exit:\n{}",
                self.id,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process's log so far, colours removed.
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes terminal colour sequences (`ESC [ … m`), so a log reads `key=value`.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A namespace (and optionally a vhost) of its own, with the workers and gateways a test starts.
pub struct Env {
    pub ns: String,
    pub vhost: Option<String>,
    pub amqp_url: String,
    pub workers: Vec<WorkerProcess>,
    gateways: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
    logs: tempfile::TempDir,
    pub http: reqwest::Client,
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &JobId::new_random().to_string()[..13])
}

impl Env {
    /// A namespace on the default vhost.
    pub fn new() -> Self {
        Self::build(None)
    }

    /// A namespace on a vhost of its own: `close_all_connections` on it touches nothing else.
    pub fn with_vhost() -> Self {
        let vhost = unique("wkt-vhost");
        rabbitmqctl(&["add_vhost", &vhost]);
        rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
        Self::build(Some(vhost))
    }

    fn build(vhost: Option<String>) -> Self {
        let amqp_url = match &vhost {
            Some(v) => format!("{BROKER}/{v}"),
            None => format!("{BROKER}/%2f"),
        };
        Self {
            ns: unique("wkt"),
            vhost,
            amqp_url,
            workers: Vec::new(),
            gateways: Vec::new(),
            logs: tempfile::tempdir().unwrap(),
            http: reqwest::Client::new(),
        }
    }

    /// A directory of this test's own (removed with it), for logs and files.
    pub fn dir(&self) -> &Path {
        self.logs.path()
    }

    pub fn jobs_queue(&self) -> String {
        format!("{}.jobs", self.ns)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.jobs.dead", self.ns)
    }

    /// Starts `worker serve` as a child process; returns its index in `self.workers`.
    pub fn spawn_worker(&mut self, extra_args: &[&str]) -> usize {
        let id = format!("{}-w{}", self.ns, self.workers.len());
        let log = self.logs.path().join(format!("{id}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_worker"))
            .arg("serve")
            .args(extra_args)
            .env("AMQP_URL", &self.amqp_url)
            .env("NAMESPACE", &self.ns)
            .env("MODEL_DIR", tiny_model())
            .env("WORKER_ID", &id)
            .env("THREADS", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.workers.push(WorkerProcess { id, child, log });
        self.workers.len() - 1
    }

    pub fn worker_by_id(&mut self, id: &str) -> &mut WorkerProcess {
        self.workers.iter_mut().find(|w| w.id == id).unwrap()
    }

    /// All workers' logs, for failure messages.
    pub fn logs(&self) -> String {
        self.workers
            .iter()
            .map(|w| format!("---- {} ----\n{}", w.id, w.log()))
            .collect()
    }

    pub async fn connect(&self) -> (Connection, Channel) {
        let conn = Connection::connect(&self.amqp_url, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        (conn, ch)
    }

    /// `(ready messages, consumers)` of the jobs queue, or `None` before anyone declared it.
    pub async fn jobs_queue_counts(&self) -> Option<(u32, u32)> {
        let (conn, ch) = self.connect().await;
        let q = ch
            .queue_declare(
                self.jobs_queue().as_str().into(),
                QueueDeclareOptions::durable().passive(),
                FieldTable::default(),
            )
            .await;
        let _ = conn.close(200, "".into()).await;
        q.ok().map(|q| (q.message_count(), q.consumer_count()))
    }

    /// Waits until `n` workers consume the jobs queue (each loaded its model and declared the topology).
    pub async fn wait_for_consumers(&self, n: u32) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.jobs_queue_counts().await.is_some_and(|(_, c)| c == n) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "{n} consumers never appeared on {}\n{}",
            self.jobs_queue(),
            self.logs()
        );
    }

    /// Waits until the jobs queue has no ready message and `consumers` consumers.
    pub async fn wait_for_jobs_queue(&self, ready: u32, consumers: u32) {
        let mut last = None;
        for _ in 0..100 {
            last = self.jobs_queue_counts().await;
            if last == Some((ready, consumers)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("jobs queue never reached ({ready}, {consumers}): {last:?}");
    }

    /// Starts a gateway in-process on port 0 with this namespace and broker, limits out of the way.
    pub async fn gateway(&mut self) -> String {
        self.gateway_with(&[]).await
    }

    /// A gateway with extra flags (which replace the defaults of the same name).
    pub async fn gateway_with(&mut self, extra: &[&str]) -> String {
        let defaults = [
            ("--namespace", self.ns.as_str()),
            ("--amqp-url", self.amqp_url.as_str()),
            ("--redis-url", REDIS_URL),
            ("--submit-rate-limit", "100000/1s"),
            ("--read-rate-limit", "100000/1s"),
            ("--token-rate-limit", "1000000000/1s"),
            ("--max-active-jobs-per-client", "0"),
            ("--shutdown-grace-s", "2"),
        ];
        let mut args = vec!["gateway"];
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                args.extend([flag, value]);
            }
        }
        args.extend_from_slice(extra);
        let config = gateway::Config::from_args(args).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            gateway::run(config, listener, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        self.gateways.push((tx, handle));
        for _ in 0..200 {
            if let Ok(r) = self.http.get(format!("{base}/readyz")).send().await
                && r.status() == 200
            {
                return base;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("gateway {base} never became ready");
    }

    /// Submits a job through the gateway; returns its id.
    pub async fn submit(&self, base: &str, prompt: &str, parameters: Value) -> String {
        let r = self
            .http
            .post(format!("{base}/v1/jobs"))
            .json(&serde_json::json!({"prompt": prompt, "parameters": parameters}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{:?}", r.text().await);
        let body: Value = r.json().await.unwrap();
        body["id"].as_str().unwrap().to_owned()
    }

    /// The job as `GET /v1/jobs/{id}` shows it.
    pub async fn view(&self, base: &str, id: &str) -> Value {
        let r = self
            .http
            .get(format!("{base}/v1/jobs/{id}"))
            .send()
            .await
            .unwrap();
        r.json().await.unwrap()
    }

    /// `DELETE /v1/jobs/{id}`: must answer 200; returns its body.
    pub async fn cancel(&self, base: &str, id: &str) -> Value {
        let r = self
            .http
            .delete(format!("{base}/v1/jobs/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    /// Runs a helper program (a Python or Node script) to its end; it must succeed. Returns its stdout.
    pub async fn run_checks(&self, mut command: tokio::process::Command) -> String {
        let out = command.output().await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        stdout
    }

    /// Polls a job until `done` says so (or `timeout` passes); returns its last view.
    pub async fn poll_until(
        &self,
        base: &str,
        id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let view = match self.http.get(format!("{base}/v1/jobs/{id}")).send().await {
                Ok(r) if r.status() == 200 => r.json::<Value>().await.ok(),
                _ => None,
            };
            if let Some(view) = &view
                && done(view)
            {
                return view.clone();
            }
            assert!(
                Instant::now() < deadline,
                "job {id} never got there: {view:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops gateways and workers, deletes the queues, Redis keys and vhost. `SHOW_WORKER_LOGS=1` prints
    /// the workers' logs first.
    pub async fn finish(mut self) {
        if std::env::var_os("SHOW_WORKER_LOGS").is_some() {
            eprintln!("{}", self.logs());
        }
        for (tx, handle) in self.gateways.drain(..) {
            let _ = tx.send(());
            let _ = tokio::time::timeout(Duration::from_secs(10), handle).await;
        }
        self.workers.clear();
        cleanup(&self.ns, &self.amqp_url, self.vhost.take()).await;
        self.ns.clear();
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Reached without finish() only when a test failed: clean up anyway, best effort.
        self.workers.clear();
        for (tx, handle) in self.gateways.drain(..) {
            let _ = tx.send(());
            handle.abort();
        }
        if self.ns.is_empty() {
            return;
        }
        let (ns, url, vhost) = (
            std::mem::take(&mut self.ns),
            self.amqp_url.clone(),
            self.vhost.take(),
        );
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Runtime::new() {
                rt.block_on(cleanup(&ns, &url, vhost));
            }
        })
        .join();
    }
}

async fn cleanup(ns: &str, amqp_url: &str, vhost: Option<String>) {
    match vhost {
        Some(v) => {
            let out = Command::new("rabbitmqctl").args(["delete_vhost", &v]).output();
            if !out.is_ok_and(|o| o.status.success()) {
                eprintln!("could not delete vhost {v}");
            }
        }
        None => {
            if let Ok(conn) = Connection::connect(amqp_url, ConnectionProperties::default()).await {
                if let (Ok(ch), Ok(topology)) = (conn.create_channel().await, shared::Topology::new(ns, 3)) {
                    let _ = topology.delete(&ch).await;
                }
                let _ = conn.close(200, "".into()).await;
            }
        }
    }
    if let Ok(client) = redis::Client::open(REDIS_URL)
        && let Ok(mut conn) = client.get_multiplexed_async_connection().await
    {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{ns}:*"))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
        }
    }
}

pub fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A producer that talks AMQP directly, as docs/amqp.md describes: its own exclusive reply queue, and
/// publisher confirms on its channel.
pub struct RawProducer {
    conn: Connection,
    pub channel: Channel,
    pub reply_to: String,
    replies: Consumer,
    topology: shared::Topology,
}

/// One reply as it arrived.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The AMQP `type` property.
    pub kind: String,
    pub correlation_id: Option<String>,
    pub body: JobReply,
}

impl Reply {
    /// The worker that sent it.
    pub fn worker_id(&self) -> &str {
        self.body.worker_id().expect("next_reply skips tokens")
    }
}

impl RawProducer {
    pub async fn new(env: &Env) -> Self {
        let (conn, channel) = env.connect().await;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        // Server-named, exclusive, auto-deleted: the broker picks a unique name, and the queue goes away
        // with this connection.
        let q = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions::exclusive().auto_delete(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let reply_to = q.name().as_str().to_owned();
        let replies = channel
            .basic_consume(
                reply_to.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        Self {
            conn,
            channel,
            reply_to,
            replies,
            topology: shared::Topology::new(&env.ns, shared::topology::DEFAULT_DELIVERY_LIMIT).unwrap(),
        }
    }

    /// Publishes `body` with the properties docs/amqp.md lists; `correlation_id` `None` leaves it out.
    pub async fn publish_raw(&self, correlation_id: Option<&str>, body: &[u8]) {
        self.publish_raw_to(Lane::Interactive, correlation_id, body).await;
    }

    /// [`RawProducer::publish_raw`] to `lane`'s queue.
    pub async fn publish_raw_to(&self, lane: Lane, correlation_id: Option<&str>, body: &[u8]) {
        let mut props = BasicProperties::default()
            .with_reply_to(self.reply_to.as_str().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        if let Some(id) = correlation_id {
            props = props.with_correlation_id(id.into()).with_message_id(id.into());
        }
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.topology.lane_queue(lane).as_str().into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }

    /// Publishes a job; returns its id.
    pub async fn publish_job(&self, prompt: &str, parameters: Value) -> String {
        self.publish_job_to(Lane::Interactive, prompt, parameters).await
    }

    /// Publishes a job to `lane`'s queue; returns its id.
    pub async fn publish_job_to(&self, lane: Lane, prompt: &str, parameters: Value) -> String {
        let id = JobId::new_random().to_string();
        let body = serde_json::json!({
            "version": 1,
            "prompt": prompt,
            "parameters": parameters,
            "submitted_at_ms": shared::reply::now_ms(),
        });
        self.publish_raw_to(lane, Some(&id), &serde_json::to_vec(&body).unwrap())
            .await;
        id
    }

    /// The next reply, within `timeout`.
    /// The next reply other than `job.token` (the lifecycle: started, then the final reply).
    pub async fn next_reply(&mut self, timeout: Duration) -> Option<Reply> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let reply = self.next_event(left).await?;
            if reply.kind != "job.token" {
                return Some(reply);
            }
        }
    }

    /// The next reply of any kind, `job.token` included.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<Reply> {
        let d = tokio::time::timeout(timeout, self.replies.next())
            .await
            .ok()??
            .unwrap();
        Some(Reply {
            kind: d.properties.kind().as_ref().unwrap().as_str().to_owned(),
            correlation_id: d
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str().to_owned()),
            body: serde_json::from_slice(&d.data).unwrap(),
        })
    }

    /// Collects replies until `done` holds for what was collected, failing after `timeout`.
    pub async fn replies_until(&mut self, timeout: Duration, done: impl Fn(&[Reply]) -> bool) -> Vec<Reply> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while !done(&got) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_reply(left).await {
                Some(r) => got.push(r),
                None => panic!("replies stopped short: {got:#?}"),
            }
        }
        got
    }

    /// Every message in a queue, taken off it.
    pub async fn drain(&self, queue: &str) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            out.push(m.delivery.data);
        }
        out
    }

    pub async fn close(self) {
        let _ = self.conn.close(200, "".into()).await;
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
pub struct Sse {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

/// Reads a `text/event-stream` response event by event (comments and keep-alives skipped).
pub struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> Self {
        assert_eq!(response.status(), 200, "an event stream answers 200");
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event, or `None` when the stream ended.
    pub async fn next(&mut self) -> Option<Sse> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Sse {
                    id: None,
                    event: "message".into(),
                    data: String::new(),
                };
                let mut any = false;
                for line in block.lines() {
                    let (field, value) = match line.split_once(':') {
                        Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                        None => (line, ""),
                    };
                    match field {
                        "id" => event.id = Some(value.to_owned()),
                        "event" => event.event = value.to_owned(),
                        "data" => {
                            if !event.data.is_empty() {
                                event.data.push('\n');
                            }
                            event.data.push_str(value);
                        }
                        _ => continue,
                    }
                    any = true;
                }
                if any {
                    return Some(event);
                }
                continue;
            }
            match self.response.chunk().await {
                Ok(Some(bytes)) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                _ => return None,
            }
        }
    }
}

/// A local port nobody listens on (bound, then released), for a worker's `--metrics-listen`.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A counter's value (summed over its labels) from a Prometheus `/metrics` page.
pub async fn metric(http: &reqwest::Client, url: &str, name: &str) -> f64 {
    let Ok(r) = http.get(url).send().await else {
        return 0.0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
