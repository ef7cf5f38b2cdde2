//! Publishing replies: on the default exchange to the job's `reply_to` queue, under its correlation id,
//! persistent, and confirmed by the broker before the job is acknowledged.
//!
//! The wait for the confirm is bounded: a broker under a memory or disk alarm blocks publishing connections
//! and confirms nothing until the alarm clears, and a worker waiting without a bound would hold its jobs
//! (and their places in the batch) for as long. A reply not confirmed in time may still reach its queue
//! later, so the callers treat it like a refused one (the job is not acknowledged): at worst the job is
//! answered twice, never acknowledged unanswered.
//!
//! The AMQP `type` property is the event name (`job.started`, `job.succeeded`, `job.failed`), the same as
//! the body's `event` field, so a consumer can dispatch on either (docs/amqp.md).

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation};
use shared::JobReply;

use super::metrics;

/// AMQP delivery mode 2: the broker writes the reply to disk on durable queues.
const PERSISTENT: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("publishing a reply failed: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused (nacked) the reply")]
    Nacked,
    /// No confirm within `--publish-timeout-ms` (the broker may be blocking publishers: an alarm).
    #[error("the broker did not confirm the reply within {} ms", .0.as_millis())]
    Timeout(Duration),
    #[error("the channel is not in confirm mode")]
    NotConfirmed,
    #[error("encoding the reply failed: {0}")]
    Encode(#[from] serde_json::Error),
}

impl PublishError {
    /// The broker did not take the message (nacked) or did not say so in time: the connection still
    /// works, and what to do next is the caller's choice, not a reason to reconnect.
    pub fn unconfirmed(&self) -> bool {
        matches!(self, Self::Nacked | Self::Timeout(_))
    }
}

/// The properties of a reply: its job's correlation id and owner header ([`shared::owner`]) when it has
/// them.
pub fn properties(correlation_id: Option<&str>, owner: Option<&str>, reply: &JobReply) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(PERSISTENT)
        .with_type(reply.kind().into())
        .with_timestamp(shared::reply::now_ms() / 1000);
    if let Some(id) = correlation_id {
        props = props.with_correlation_id(id.into());
    }
    shared::owner::write(props, owner)
}

/// Where and how replies are published: a confirm-mode channel of the publishing connection, and the
/// longest wait for a confirm.
#[derive(Clone, Copy)]
pub struct Publisher<'a> {
    pub channel: &'a Channel,
    pub timeout: Duration,
}

impl Publisher<'_> {
    /// Publishes `reply` to `reply_to` and waits for the broker's confirm, `timeout` at most.
    pub async fn publish(
        &self,
        reply_to: &str,
        correlation_id: Option<&str>,
        owner: Option<&str>,
        reply: &JobReply,
    ) -> Result<(), PublishError> {
        let body = serde_json::to_vec(reply)?;
        let props = properties(correlation_id, owner, reply);
        self.confirmed("", reply_to, &body, props).await
    }

    /// Publishes a message and waits for its confirm, `timeout` at most (sending included: a blocked
    /// connection does not even send).
    pub async fn confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), PublishError> {
        let confirm = async {
            self.channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body,
                    props,
                )
                .await?
                .await
        };
        match tokio::time::timeout(self.timeout, confirm).await {
            Ok(confirm) => settled(confirm?),
            Err(_) => {
                metrics::publish_timeout();
                Err(PublishError::Timeout(self.timeout))
            }
        }
    }
}

fn settled(confirm: Confirmation) -> Result<(), PublishError> {
    match confirm {
        Confirmation::Ack(_) => Ok(()),
        Confirmation::Nack(_) => Err(PublishError::Nacked),
        Confirmation::NotRequested => Err(PublishError::NotConfirmed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    use lapin::{Connection, ConnectionProperties};
    use shared::reply::Started;

    fn started() -> JobReply {
        JobReply::Started(Started {
            job_id: shared::JobId::new_random(),
            worker_id: "w".into(),
            started_at_ms: 1,
            redelivered: false,
            prompt_tokens: None,
        })
    }

    #[tokio::test]
    async fn a_reply_the_broker_does_not_confirm_in_time_fails_as_a_timeout_and_the_channel_goes_on() {
        let proxy = shared::testing::StallProxy::start("127.0.0.1:5672")
            .await
            .unwrap();
        let url = proxy.amqp_url();
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        // Server-named and exclusive: deleted with the connection.
        let queue = channel
            .queue_declare("".into(), QueueDeclareOptions::exclusive(), FieldTable::default())
            .await
            .unwrap();
        let reply_to = queue.name().as_str().to_owned();
        let publisher = Publisher {
            channel: &channel,
            timeout: Duration::from_millis(300),
        };
        publisher
            .publish(&reply_to, Some("c"), None, &started())
            .await
            .unwrap();

        proxy.stall(0, true);
        let begun = std::time::Instant::now();
        let err = publisher
            .publish(&reply_to, Some("c"), None, &started())
            .await
            .unwrap_err();
        let waited = begun.elapsed();
        assert!(
            matches!(err, PublishError::Timeout(t) if t == Duration::from_millis(300)),
            "{err}"
        );
        assert!(
            (Duration::from_millis(300)..Duration::from_secs(3)).contains(&waited),
            "waited {waited:?}"
        );

        // The late confirm does not confuse the channel: once the broker is heard again, publishing works.
        proxy.stall(0, false);
        publisher
            .publish(&reply_to, Some("c"), None, &started())
            .await
            .unwrap();
        let _ = conn.close(200, "".into()).await;
    }

    #[test]
    fn a_reply_names_its_event_in_the_type_property_and_is_persistent_json() {
        let reply = started();
        let p = properties(Some("abc"), None, &reply);
        assert_eq!(p.kind().as_ref().map(|k| k.as_str()), Some("job.started"));
        assert_eq!(p.correlation_id().as_ref().map(|c| c.as_str()), Some("abc"));
        assert_eq!(
            p.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        assert_eq!(*p.delivery_mode(), Some(2));
    }
}
