//! A producer that bypasses the gateway: it publishes one job straight to `{ns}.jobs` and prints the
//! replies that arrive on its own reply queue. This is the Rust example of docs/amqp.md; it only uses
//! lapin and serde_json, as a client outside this workspace would.
//!
//! ```text
//! cargo run -p worker --example amqp_producer -- "Once upon a time"
//! AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f NAMESPACE=gptj cargo run -p worker --example amqp_producer -- "Hi"
//! ```

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use serde_json::{Value, json};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let namespace = std::env::var("NAMESPACE").unwrap_or_else(|_| "gptj".into());
    let prompt = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "Once upon a time".into());

    let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;

    // 1. A reply queue of our own: server-named, exclusive, deleted when we disconnect.
    let reply_queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions::exclusive().auto_delete(),
            FieldTable::default(),
        )
        .await?;
    let reply_to = reply_queue.name().as_str().to_owned();
    let mut replies = channel
        .basic_consume(
            reply_to.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;

    // 2. The job: a fresh UUID as correlation id, the body per docs/schema/job-request.schema.json.
    let job_id = shared::JobId::new_random().to_string();
    let body = json!({
        "version": 1,
        "prompt": prompt,
        "parameters": {"max_new_tokens": 20, "strategy": "greedy"},
        "submitted_at_ms": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64,
    });
    let properties = BasicProperties::default()
        .with_correlation_id(job_id.as_str().into())
        .with_message_id(job_id.as_str().into())
        .with_reply_to(reply_to.as_str().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2) // persistent
        .with_expiration("600000".into()); // optional: drop it if no worker took it within 10 minutes

    // 3. Publish on the default exchange to `{ns}.jobs`; `mandatory` returns it if the queue does not exist.
    let confirm = channel
        .basic_publish(
            "".into(),
            format!("{namespace}.jobs").as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &serde_json::to_vec(&body)?,
            properties,
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(None) => println!("queued job {job_id}"),
        Confirmation::Ack(Some(_)) => {
            return Err(format!("no queue {namespace}.jobs: is a worker or gateway up?").into());
        }
        other => return Err(format!("the broker did not take the job: {other:?}").into()),
    }

    // 4. Replies: dispatch on the `type` property; ignore replies for other jobs.
    while let Some(delivery) = replies.next().await {
        let delivery = delivery?;
        let correlation_id = delivery.properties.correlation_id().as_ref().map(|c| c.as_str());
        if correlation_id != Some(job_id.as_str()) {
            continue;
        }
        let kind = delivery
            .properties
            .kind()
            .as_ref()
            .map(|k| k.as_str().to_owned())
            .unwrap_or_default();
        let reply: Value = serde_json::from_slice(&delivery.data)?;
        match kind.as_str() {
            "job.started" => println!("started on {}", reply["worker_id"]),
            "job.succeeded" => {
                println!(
                    "{}{}",
                    reply["prompt"].as_str().unwrap_or(""),
                    reply["text"].as_str().unwrap_or("")
                );
                println!("({} tokens, {})", reply["new_tokens"], reply["finish_reason"]);
                break;
            }
            "job.failed" => {
                eprintln!(
                    "failed: {} ({})",
                    reply["error"]["message"], reply["error"]["code"]
                );
                break;
            }
            _ => {} // job.token and future events
        }
    }
    conn.close(200, "done".into()).await?;
    Ok(())
}
