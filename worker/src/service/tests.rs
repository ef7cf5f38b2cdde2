//! The queue loop against the real RabbitMQ, with a stand-in generator whose timing the test controls
//! (the end-to-end tests in `worker/tests/` run the real engine). Each test has its own namespace, and the
//! one that cuts connections has its own vhost, so nothing else on the broker is disturbed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use shared::{ErrorBody, ErrorCode, GenerationPlan, JobId, JobReply, Topology};
use tokio::sync::oneshot;

use super::generator::solo::{One, Solo, completion};
use super::*;

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672";

/// Generates instantly, except prompts starting with "hold", which wait for the test to release them.
struct Gate {
    calls: Arc<AtomicUsize>,
    release: Mutex<mpsc::Receiver<()>>,
}

impl Solo for Gate {
    fn generate(&self, prompt: &str, plan: &GenerationPlan) -> Result<Completion, ErrorBody> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if prompt.starts_with("hold") {
            let _ = self.release.lock().unwrap().recv();
        }
        Ok(completion(format!(" after {prompt}"), plan.max_new_tokens))
    }
}

struct Worker {
    topology: Topology,
    calls: Arc<AtomicUsize>,
    release: mpsc::Sender<()>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

async fn start_worker(url: &str) -> Worker {
    start_worker_with(url, Duration::from_secs(10)).await
}

/// A test engine's batch: one job at a time.
fn one_at_a_time() -> BatchSettings {
    BatchSettings {
        max_batch_size: Some(1),
        ..Default::default()
    }
}

/// The service's settings for a test worker: the default streaming.
fn test_config(url: &str, topology: Topology, publish_timeout: Duration) -> ServiceConfig {
    ServiceConfig {
        brokers: std::sync::Arc::new(shared::brokers::BrokerUrls::new(&[url]).unwrap()),
        topology,
        rules: shared::PromptRules::default(),
        prefetch: Some(1),
        interactive_reserve: 1,
        worker_id: "test-worker".into(),
        stream: StreamSettings {
            tokens: 16,
            interval: Duration::from_millis(50),
        },
        publish_timeout,
        heartbeat_s: super::args::DEFAULT_HEARTBEAT_S,
    }
}

async fn start_worker_with(url: &str, publish_timeout: Duration) -> Worker {
    let namespace = format!("svc-{}", &JobId::new_random().to_string()[..13]);
    let topology = Topology::new(&namespace, 3).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let (release, rx) = mpsc::channel();
    let gate = Gate {
        calls: calls.clone(),
        release: Mutex::new(rx),
    };
    let engine = EngineThread::start(move || Ok::<_, String>(One(gate)), one_at_a_time())
        .await
        .unwrap();
    let config = test_config(url, topology.clone(), publish_timeout);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(config, engine, async move {
        let _ = stopped.await;
    }));
    Worker {
        topology,
        calls,
        release,
        stop: Some(stop),
        task,
    }
}

async fn channel(url: &str) -> (Connection, Channel) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

/// Waits until the worker consumes the jobs queue (it declared it).
async fn wait_for_consumer(url: &str, topology: &Topology) {
    for _ in 0..100 {
        let (conn, ch) = channel(url).await;
        let q = ch
            .queue_declare(
                topology.jobs_queue().as_str().into(),
                QueueDeclareOptions::durable().passive(),
                FieldTable::default(),
            )
            .await;
        let _ = conn.close(200, "".into()).await;
        if q.is_ok_and(|q| q.consumer_count() >= 1) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the worker never consumed {}", topology.jobs_queue());
}

async fn publish(
    ch: &Channel,
    topology: &Topology,
    correlation_id: Option<&str>,
    reply_to: &str,
    body: &[u8],
) {
    let mut props = BasicProperties::default()
        .with_reply_to(reply_to.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    if let Some(id) = correlation_id {
        props = props.with_correlation_id(id.into());
    }
    ch.basic_publish(
        "".into(),
        topology.jobs_queue().as_str().into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .unwrap();
}

async fn reply_queue(ch: &Channel) -> (String, Consumer) {
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions::exclusive().auto_delete(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let name = q.name().as_str().to_owned();
    let consumer = ch
        .basic_consume(
            name.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    (name, consumer)
}

/// The next reply: its `type` property, its correlation id, its body.
async fn next_reply(consumer: &mut Consumer) -> (String, Option<String>, JobReply) {
    let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .expect("a reply within 20 s")
        .unwrap()
        .unwrap();
    let kind = d.properties.kind().as_ref().unwrap().as_str().to_owned();
    let corr = d
        .properties
        .correlation_id()
        .as_ref()
        .map(|c| c.as_str().to_owned());
    (kind, corr, serde_json::from_slice(&d.data).unwrap())
}

async fn delete_queues(url: &str, topology: &Topology) {
    let (conn, ch) = channel(url).await;
    let _ = topology.delete(&ch).await;
    let _ = conn.close(200, "".into()).await;
}

fn job(prompt: &str) -> Vec<u8> {
    format!(r#"{{"version":1,"prompt":"{prompt}","parameters":{{"max_new_tokens":3}}}}"#).into_bytes()
}

impl Worker {
    async fn stop(mut self) -> Result<(), ServeError> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .unwrap()
            .unwrap()
    }
}

#[tokio::test]
async fn a_malformed_message_is_answered_dead_lettered_and_the_loop_goes_on() {
    let worker = start_worker(BROKER).await;
    let t = worker.topology.clone();
    wait_for_consumer(BROKER, &t).await;
    let (conn, ch) = channel(BROKER).await;
    let (reply_to, mut replies) = reply_queue(&ch).await;

    let bad = JobId::new_random().to_string();
    publish(&ch, &t, Some(&bad), &reply_to, b"{not json").await;
    let (kind, corr, reply) = next_reply(&mut replies).await;
    assert_eq!(kind, "job.failed");
    assert_eq!(corr.as_deref(), Some(bad.as_str()));
    let JobReply::Failed(failed) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(failed.error.code, ErrorCode::InvalidJson);

    // No usable correlation id: still answered, echoing what was sent.
    publish(&ch, &t, Some("order-17"), &reply_to, &job("fine")).await;
    let (kind, corr, _) = next_reply(&mut replies).await;
    assert_eq!((kind.as_str(), corr.as_deref()), ("job.failed", Some("order-17")));

    let good = JobId::new_random().to_string();
    publish(&ch, &t, Some(&good), &reply_to, &job("Hello there")).await;
    let (kind, _, _) = next_reply(&mut replies).await;
    assert_eq!(kind, "job.started");
    let (kind, corr, reply) = next_reply(&mut replies).await;
    assert_eq!(
        (kind.as_str(), corr.as_deref()),
        ("job.succeeded", Some(good.as_str()))
    );
    let JobReply::Succeeded(s) = reply else { panic!() };
    assert_eq!((s.text.as_str(), s.new_tokens), (" after Hello there", 3));

    // Both refused messages sit in the dead-letter queue, the bad body intact.
    let mut dead = Vec::new();
    while let Some(m) = ch
        .basic_get(
            t.dead_letter_queue().as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        dead.push(m.delivery.data);
    }
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(dead.contains(&b"{not json".to_vec()));

    let _ = conn.close(200, "".into()).await;
    worker.stop().await.unwrap();
    delete_queues(BROKER, &t).await;
}

#[tokio::test]
async fn stopping_mid_job_finishes_and_acknowledges_it() {
    let worker = start_worker(BROKER).await;
    let t = worker.topology.clone();
    wait_for_consumer(BROKER, &t).await;
    let (conn, ch) = channel(BROKER).await;
    let (reply_to, mut replies) = reply_queue(&ch).await;
    let id = JobId::new_random().to_string();
    publish(&ch, &t, Some(&id), &reply_to, &job("hold on")).await;
    assert_eq!(next_reply(&mut replies).await.0, "job.started");

    let release = worker.release.clone();
    let stopping = tokio::spawn(worker.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    release.send(()).unwrap();
    assert_eq!(next_reply(&mut replies).await.0, "job.succeeded");
    stopping.await.unwrap().unwrap();

    // Acknowledged: nothing went back to the queue when the worker left (the consumer count is
    // updated by the broker a moment later).
    let mut counts = (u32::MAX, u32::MAX);
    for _ in 0..50 {
        let q = ch
            .queue_declare(
                t.jobs_queue().as_str().into(),
                QueueDeclareOptions::durable().passive(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        counts = (q.message_count(), q.consumer_count());
        if counts == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(counts, (0, 0));
    let _ = conn.close(200, "".into()).await;
    delete_queues(BROKER, &t).await;
}

/// Of a cluster's URLs, the first node is down: the worker moves on to the next and serves.
#[tokio::test]
async fn a_worker_given_several_broker_urls_moves_on_past_a_node_that_is_down() {
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = down.local_addr().unwrap().port();
    drop(down);
    let urls = format!("amqp://guest:guest@127.0.0.1:{port}/%2f,{BROKER}");
    let worker = start_worker(&urls).await;
    let t = worker.topology.clone();
    wait_for_consumer(BROKER, &t).await;
    let (conn, ch) = channel(BROKER).await;
    let (reply_to, mut replies) = reply_queue(&ch).await;
    let id = JobId::new_random().to_string();
    publish(&ch, &t, Some(&id), &reply_to, &job("any node")).await;
    assert_eq!(next_reply(&mut replies).await.0, "job.started");
    worker.release.send(()).unwrap();
    assert_eq!(next_reply(&mut replies).await.0, "job.succeeded");
    worker.stop().await.unwrap();
    let _ = conn.close(200, "".into()).await;
    delete_queues(BROKER, &t).await;
}

/// A broker that stops confirming the worker's replies (as under an alarm) must neither hang the worker nor
/// let it acknowledge a job whose answer is unconfirmed: the job comes back, and once the broker is heard
/// again it is answered (from memory: generated once) and acknowledged.
#[tokio::test]
async fn a_final_reply_not_confirmed_in_time_returns_the_job_and_it_is_answered_once_confirms_flow() {
    // The worker's second connection, its publishing one, is the one whose confirms are held.
    let proxy = shared::testing::StallProxy::start("127.0.0.1:5672")
        .await
        .unwrap();
    let url = proxy.amqp_url();
    let worker = start_worker_with(&url, Duration::from_millis(500)).await;
    let t = worker.topology.clone();
    wait_for_consumer(BROKER, &t).await;
    let (conn, ch) = channel(BROKER).await;
    let (reply_to, mut replies) = reply_queue(&ch).await;

    assert!(
        proxy.stall(1, true),
        "the worker's publishing connection is its second"
    );
    let id = JobId::new_random().to_string();
    publish(&ch, &t, Some(&id), &reply_to, &job("Hello")).await;
    // Only the confirms are held, so the replies themselves arrive; the job, unacknowledged, comes back.
    let mut kinds = Vec::new();
    loop {
        let (kind, corr, reply) = next_reply(&mut replies).await;
        assert_eq!(corr.as_deref(), Some(id.as_str()));
        kinds.push(kind);
        if let JobReply::Started(s) = reply
            && s.redelivered
        {
            break;
        }
    }
    assert_eq!(kinds, ["job.started", "job.succeeded", "job.started"]);

    proxy.stall(1, false);
    assert_eq!(next_reply(&mut replies).await.0, "job.succeeded");
    assert_eq!(worker.calls.load(Ordering::SeqCst), 1, "generated once");
    let more = tokio::time::timeout(Duration::from_secs(1), replies.next()).await;
    assert!(more.is_err(), "nothing more: the job was acknowledged");
    worker.stop().await.unwrap();
    // Acknowledged: nothing went back to the queue when the worker left, nothing was dead-lettered.
    let counts = |queue: String| {
        let ch = &ch;
        async move {
            let q = ch
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions::durable().passive(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
            (q.message_count(), q.consumer_count())
        }
    };
    let mut jobs = (u32::MAX, u32::MAX);
    for _ in 0..50 {
        jobs = counts(t.jobs_queue()).await;
        if jobs == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(jobs, (0, 0));
    assert_eq!(counts(t.dead_letter_queue()).await.0, 0);
    let _ = conn.close(200, "".into()).await;
    delete_queues(BROKER, &t).await;
}

/// The `type` of every reply waiting in a durable queue, taking them.
async fn drain(url: &str, queue: &str) -> Vec<String> {
    let (conn, ch) = channel(url).await;
    let mut found = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        found.push(m.delivery.properties.kind().as_ref().unwrap().as_str().to_owned());
    }
    let _ = conn.close(200, "".into()).await;
    found
}

fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_job_finished_while_disconnected_is_answered_once_from_memory_after_reconnecting() {
    let vhost = format!("svc-test-{}", &JobId::new_random().to_string()[..8]);
    rabbitmqctl(&["add_vhost", &vhost]);
    rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    let url = format!("{BROKER}/{vhost}");
    let worker = start_worker(&url).await;
    let t = worker.topology.clone();
    wait_for_consumer(&url, &t).await;

    // A durable reply queue: the test's own connection is cut too, and must find its replies afterwards.
    let reply_to = format!("{}.test-replies", t.namespace());
    {
        let (conn, ch) = channel(&url).await;
        ch.queue_declare(
            reply_to.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let id = JobId::new_random().to_string();
        publish(&ch, &t, Some(&id), &reply_to, &job("hold the line")).await;
        let _ = conn.close(200, "".into()).await;
    }
    let mut got: Vec<String> = Vec::new();
    for _ in 0..100 {
        got.extend(drain(&url, &reply_to).await);
        if got.contains(&"job.started".to_owned()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(got, ["job.started"]);

    rabbitmqctl(&["close_all_connections", "--vhost", &vhost, "test"]);
    worker.release.send(()).unwrap();
    for _ in 0..200 {
        got.extend(drain(&url, &reply_to).await);
        if got.contains(&"job.succeeded".to_owned()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Started again on the redelivery, finished once, and generated once.
    assert_eq!(got, ["job.started", "job.started", "job.succeeded"]);
    assert_eq!(worker.calls.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    got.extend(drain(&url, &reply_to).await);
    assert_eq!(got.len(), 3, "no further reply: {got:?}");

    worker.stop().await.unwrap();
    rabbitmqctl(&["delete_vhost", &vhost]);
}

#[tokio::test]
async fn a_jobs_queue_declared_with_another_delivery_limit_stops_the_worker_with_a_clear_error() {
    let namespace = format!("svc-{}", &JobId::new_random().to_string()[..13]);
    let other = Topology::new(&namespace, 5).unwrap();
    let (conn, ch) = channel(BROKER).await;
    other.declare(&ch).await.unwrap();

    let gate = Gate {
        calls: Arc::new(AtomicUsize::new(0)),
        release: Mutex::new(mpsc::channel().1),
    };
    let engine = EngineThread::start(move || Ok::<_, String>(One(gate)), one_at_a_time())
        .await
        .unwrap();
    let config = test_config(
        BROKER,
        Topology::new(&namespace, 3).unwrap(),
        Duration::from_secs(10),
    );
    let ended = tokio::time::timeout(
        Duration::from_secs(20),
        serve(config, engine, std::future::pending()),
    )
    .await
    .expect("the worker gives up instead of retrying forever");
    let err = ended.unwrap_err().to_string();
    assert!(
        err.contains("delivery-limit") && err.contains("PRECONDITION_FAILED"),
        "{err}"
    );
    let _ = conn.close(200, "".into()).await;
    delete_queues(BROKER, &other).await;
}
