//! Test harness: gateways started in-process on port 0, each test in its own namespace (queues and Redis
//! keys), deleted afterwards, so tests run in parallel on the machine's one Redis and one RabbitMQ.
#![allow(dead_code)] // each test binary uses a different part of the harness
#![allow(clippy::unwrap_used)] // test harness: a failed set-up step should panic the test

use std::time::Duration;

use futures::StreamExt;
use gateway::Config;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;
use shared::reply::{Started, Succeeded, now_ms};
use shared::{FinishReason, JobId, JobReply, Timings};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379/";

/// A namespace of its own; dropping it stops its gateways and deletes its queues and keys.
pub struct TestEnv {
    pub ns: String,
    gateways: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
    pub http: reqwest::Client,
}

pub struct Gateway {
    pub base: String,
}

impl Gateway {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }
}

impl TestEnv {
    pub fn new() -> Self {
        let ns = format!("gwt-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        Self {
            ns,
            gateways: Vec::new(),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .unwrap(),
        }
    }

    /// Starts a gateway on this namespace with the given extra flags, and waits for it to be ready
    /// unless `wait_ready` is false (for gateways pointed at something that is down).
    pub async fn gateway_with(&mut self, flags: &[&str], wait_ready: bool) -> Gateway {
        let mut args = vec!["gateway".to_owned()];
        let defaults = [
            ("--namespace", self.ns.as_str()),
            ("--amqp-url", AMQP_URL),
            ("--redis-url", REDIS_URL),
            ("--shutdown-grace-s", "2"),
            // Tests that exercise the backlog and cost bounds set them; the rest queue jobs freely.
            ("--token-rate-limit", "1000000000/1s"),
            ("--max-active-jobs-per-client", "0"),
        ];
        for (flag, value) in defaults {
            if !flags.contains(&flag) {
                args.extend([flag.to_owned(), value.to_owned()]);
            }
        }
        args.extend(flags.iter().map(|s| s.to_string()));
        let config = Config::from_args(args).unwrap();
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
        let gw = Gateway { base };
        if wait_ready {
            for _ in 0..100 {
                if let Ok(r) = self.http.get(gw.url("/readyz")).send().await
                    && r.status() == 200
                {
                    return gw;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("gateway on {} did not become ready", gw.base);
        }
        gw
    }

    pub async fn gateway(&mut self, flags: &[&str]) -> Gateway {
        self.gateway_with(flags, true).await
    }

    pub fn jobs_queue(&self) -> String {
        format!("{}.jobs", self.ns)
    }
    pub fn replies_queue(&self) -> String {
        format!("{}.replies", self.ns)
    }

    /// Stops the gateways, then deletes the namespace's queues and keys.
    pub async fn finish(mut self) {
        self.stop_gateways().await;
        cleanup(self.ns.clone()).await;
        self.ns.clear();
    }

    /// Stops the `index`th gateway started (shutdown as on SIGTERM); the others go on.
    pub async fn stop_gateway(&mut self, index: usize) {
        let (tx, handle) = self.gateways.remove(index);
        let _ = tx.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), handle).await;
    }

    async fn stop_gateways(&mut self) {
        for (tx, handle) in self.gateways.drain(..) {
            let _ = tx.send(());
            let _ = tokio::time::timeout(Duration::from_secs(10), handle).await;
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Reached without finish() only when a test failed: clean up anyway, best effort.
        if self.ns.is_empty() {
            return;
        }
        for (tx, handle) in self.gateways.drain(..) {
            let _ = tx.send(());
            handle.abort();
        }
        let ns = std::mem::take(&mut self.ns);
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Runtime::new() {
                rt.block_on(async {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    cleanup(ns).await;
                });
            }
        })
        .join();
    }
}

async fn cleanup(ns: String) {
    let Ok(topology) = shared::Topology::new(&ns, 3) else {
        return;
    };
    if let Ok(conn) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await {
        if let Ok(ch) = conn.create_channel().await {
            let _ = topology.delete(&ch).await;
        }
        let _ = conn.close(200, "bye".into()).await;
    }
    if let Ok(client) = redis::Client::open(REDIS_URL)
        && let Ok(mut conn) = client.get_multiplexed_async_connection().await
    {
        let keys: Vec<String> = {
            let mut iter = redis::AsyncCommands::scan_match::<_, String>(
                &mut conn,
                gateway::keys::Keys::new(&topology).pattern(),
            )
            .await
            .unwrap();
            let mut keys = Vec::new();
            while let Some(k) = iter.next().await {
                if let Ok(k) = k {
                    keys.push(k);
                }
            }
            keys
        };
        if !keys.is_empty() {
            let _: Result<i64, _> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
        }
    }
}

/// A broker channel for a test acting as a worker at the AMQP contract level.
pub async fn amqp() -> (Connection, Channel) {
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    (conn, channel)
}

/// Messages ready on `queue`, as the broker counts them (a passive declare on a connection of the test's).
pub async fn depth(channel: &Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count()
}

/// A connection to the tests' Redis, for what a test reads or changes there behind the gateway's back.
pub async fn redis() -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(REDIS_URL).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

/// The Redis key names of namespace `ns`, as its gateways name them.
pub fn keys(ns: &str) -> gateway::keys::Keys {
    gateway::keys::Keys::new(&shared::Topology::new(ns, 3).unwrap())
}

/// Takes one message from `queue`, waiting up to 5 s for it to arrive.
pub async fn take(channel: &Channel, queue: &str) -> lapin::message::BasicGetMessage {
    for _ in 0..100 {
        if let Some(msg) = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            msg.delivery.ack(BasicAckOptions::default()).await.unwrap();
            return msg;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no message on {queue}");
}

/// Publishes a reply the way a worker does: on `reply_to`, `type` = event, `correlation_id` = job id.
pub async fn reply(channel: &Channel, reply_to: &str, reply: &JobReply) {
    let id = reply.job_id().unwrap().to_string();
    channel
        .basic_publish(
            "".into(),
            reply_to.into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(reply).unwrap(),
            BasicProperties::default()
                .with_type(reply.kind().into())
                .with_correlation_id(id.into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

pub async fn json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

/// Submits `body` and returns (status, JSON body).
pub async fn submit(http: &reqwest::Client, gw: &Gateway, body: Value) -> (u16, Value) {
    json(http.post(gw.url("/v1/jobs")).json(&body).send().await.unwrap()).await
}

/// A closed local port (bound, then released), for pointing a gateway at a dependency that is down.
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The gateway's `/metrics` page.
pub async fn metrics_text(env: &TestEnv, gw: &Gateway) -> String {
    env.http
        .get(gw.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// True when the Prometheus text has the series `series` (name and labels, as rendered) at `min` or more.
pub fn metric_at_least(text: &str, series: &str, min: f64) -> bool {
    text.lines()
        .filter_map(|l| l.strip_prefix(series))
        .filter_map(|rest| rest.trim().parse::<f64>().ok())
        .any(|v| v >= min)
}

/// The job as `GET /v1/jobs/{id}` reports it (asserting 200).
pub async fn poll(env: &TestEnv, gw: &Gateway, id: &str) -> Value {
    let (status, body) = read_job(env, gw, id).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// `GET /v1/jobs/{id}`: its status and body, whatever they are.
pub async fn read_job(env: &TestEnv, gw: &Gateway, id: &str) -> (u16, Value) {
    json(
        env.http
            .get(gw.url(&format!("/v1/jobs/{id}")))
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// Polls until the job's status is `wanted` (10 s at most).
pub async fn poll_until(env: &TestEnv, gw: &Gateway, id: &str, wanted: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..200 {
        last = poll(env, gw, id).await;
        if last["status"] == wanted {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {id} never became {wanted}: {last}");
}

/// A worker's `job.started` for `id`, as the contract says.
pub fn started(id: JobId) -> JobReply {
    JobReply::Started(Started {
        job_id: id,
        worker_id: "test-worker".into(),
        started_at_ms: now_ms(),
        redelivered: false,
        prompt_tokens: None,
    })
}

/// A worker's `job.succeeded` for `id`: `text` after `prompt`, with fixed timings the tests check.
pub fn succeeded(id: JobId, prompt: &str, text: &str) -> JobReply {
    JobReply::Succeeded(Succeeded {
        job_id: id,
        worker_id: "test-worker".into(),
        prompt: prompt.into(),
        text: text.into(),
        token_ids: vec![1, 2, 3],
        new_tokens: 3,
        prompt_tokens: Some(2),
        finish_reason: FinishReason::Length,
        timings: Timings {
            queued_ms: Some(5),
            prefill_ms: 10,
            decode_ms: 20,
            inference_ms: 30,
            time_to_first_token_ms: Some(12),
        },
        batch_size: Some(4),
        logprobs: None,
        prompt_logprobs: None,
        finished_at_ms: now_ms(),
    })
}
