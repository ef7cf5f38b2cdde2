//! The worker's two broker connections: one consumes (jobs, their acknowledgements, the cancellations
//! stream), the other publishes (replies, the cancellations catch-up marker).
//!
//! RabbitMQ answers a memory or disk alarm by blocking every connection that publishes: it stops reading
//! from them, so everything else sent on such a connection waits too. With one connection, the alarm would
//! also hold the worker's acknowledgements, rejections and requeues, the very traffic that lets the broker
//! drain its queues and clear the alarm. The consuming connection never publishes, so the broker never
//! blocks it (RabbitMQ's advice: separate connections for publishers and consumers). lapin reports the
//! publishing connection's `connection.blocked` / `connection.unblocked`, which are logged and exported as
//! `worker_amqp_publish_blocked`; the wait for each reply's confirm is bounded (`replies`).

use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, Event};
use tracing::{info, warn};

use super::metrics;

/// Both connections of one session.
pub struct Connections {
    pub consume: Connection,
    pub publish: Connection,
    /// The publishing connection's events (blocked, unblocked, errors), listened to from its opening so
    /// that none is missed.
    publish_events: BoxStream<'static, Event>,
}

/// What the session makes of an event of the publishing connection.
pub enum PublishSide {
    /// Nothing to do (logged if worth it).
    Fine,
    /// The connection failed: the session ends, and reconnects.
    Lost(lapin::Error),
}

impl Connections {
    /// Opens the consuming connection, then the publishing one; `worker_id` names both in the broker's
    /// connection list. Both ask for heartbeats every `heartbeat_s` seconds unless `url` says otherwise.
    pub async fn open(url: &str, worker_id: &str, heartbeat_s: u16) -> Result<Self, lapin::Error> {
        let props = |role: &str| {
            ConnectionProperties::default().with_connection_name(format!("worker {worker_id} {role}").into())
        };
        let uri = with_heartbeat(url, heartbeat_s)?;
        let consume = Connection::connect_uri(uri.clone(), props("consume")).await?;
        let publish = match Connection::connect_uri(uri, props("publish")).await {
            Ok(publish) => publish,
            Err(e) => {
                close(&consume).await;
                return Err(e);
            }
        };
        let publish_events = publish.events_listener().boxed();
        Ok(Self {
            consume,
            publish,
            publish_events,
        })
    }

    /// The publishing connection's next event; `None` when its stream ended (the connection is gone).
    pub async fn next_publish_event(&mut self) -> Option<PublishSide> {
        let event = self.publish_events.next().await?;
        Some(match event {
            Event::ConnectionBlocked(reason) => {
                warn!(
                    %reason,
                    "the broker blocks the publishing connection (a memory or disk alarm): replies wait for it \
                     to clear, jobs and acknowledgements still flow on the consuming connection"
                );
                metrics::publish_blocked(true);
                PublishSide::Fine
            }
            Event::ConnectionUnblocked => {
                info!("the broker unblocked the publishing connection");
                metrics::publish_blocked(false);
                PublishSide::Fine
            }
            Event::Error(e) => PublishSide::Lost(e),
            _ => PublishSide::Fine,
        })
    }

    /// Closes both, the consuming one first (so the broker returns the unacknowledged jobs while the
    /// replies already confirmed stay confirmed). Never hangs a reconnect.
    pub async fn close(&mut self) {
        close(&self.consume).await;
        close(&self.publish).await;
        // A new publishing connection starts unblocked.
        metrics::publish_blocked(false);
    }
}

/// `url` asking for heartbeats every `heartbeat_s` seconds, unless it asks for an interval itself.
fn with_heartbeat(url: &str, heartbeat_s: u16) -> Result<AMQPUri, lapin::Error> {
    let mut uri: AMQPUri = url
        .parse()
        .map_err(|e: String| lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    if uri.query.heartbeat.is_none() && heartbeat_s > 0 {
        uri.query.heartbeat = Some(heartbeat_s);
    }
    Ok(uri)
}

/// The orderly goodbye; after an error it releases a connection that may still be open (a channel-level
/// error leaves it so).
async fn close(connection: &Connection) {
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        connection.close(200, "worker stopping".into()),
    )
    .await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn heartbeats_are_asked_for_unless_the_url_sets_them() {
        let asked = super::with_heartbeat("amqp://guest:guest@127.0.0.1:5672/%2f", 10).unwrap();
        assert_eq!(asked.query.heartbeat, Some(10));
        let own = super::with_heartbeat("amqp://127.0.0.1:5672/%2f?heartbeat=3", 10).unwrap();
        assert_eq!(own.query.heartbeat, Some(3));
        let none = super::with_heartbeat("amqp://127.0.0.1:5672/%2f", 0).unwrap();
        assert_eq!(none.query.heartbeat, None);
    }
}
