//! Acknowledging a delivery, exactly once.
//!
//! A delivery is settled by one of three calls, each of which consumes the [`Settlement`]: so a second ack
//! (which the broker answers by closing the channel, PRECONDITION_FAILED) does not compile. The acker sits
//! in an `Option` that each call `take`s, so `Drop` can tell an unsettled delivery from a settled one and
//! say in the log that the broker will redeliver it.

use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};

/// The broker did not take the acknowledgement: the channel closed first. The broker will redeliver the
/// message, so the caller treats this as a lost connection.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error("acknowledging failed: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the channel closed before the acknowledgement was sent")]
    ChannelClosed,
}

/// The obligation to settle one delivery.
#[derive(Debug)]
pub struct Settlement {
    acker: Option<Acker>,
}

impl Settlement {
    pub fn new(acker: Acker) -> Self {
        Self { acker: Some(acker) }
    }

    /// Done: the broker forgets the message.
    pub async fn ack(mut self) -> Result<(), SettleError> {
        let acker = self.acker.take();
        settled(async move {
            match acker {
                Some(a) => a.ack(BasicAckOptions::default()).await,
                None => Ok(false),
            }
        })
        .await
    }

    /// Unprocessable: the broker dead-letters it (the jobs queue routes rejects to `{ns}.jobs.dead`).
    pub async fn dead_letter(mut self) -> Result<(), SettleError> {
        let acker = self.acker.take();
        settled(async move {
            match acker {
                Some(a) => a.reject(BasicRejectOptions { requeue: false }).await,
                None => Ok(false),
            }
        })
        .await
    }

    /// Not taken after all (the worker is stopping): back to the queue for another worker.
    pub async fn requeue(mut self) -> Result<(), SettleError> {
        let acker = self.acker.take();
        settled(async move {
            match acker {
                Some(a) => {
                    a.nack(BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    })
                    .await
                }
                None => Ok(false),
            }
        })
        .await
    }
}

async fn settled(
    call: impl std::future::Future<Output = Result<bool, lapin::Error>>,
) -> Result<(), SettleError> {
    match call.await? {
        true => Ok(()),
        false => Err(SettleError::ChannelClosed),
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        if self.acker.is_some() {
            tracing::debug!("delivery left unsettled; the broker redelivers it when the channel closes");
        }
    }
}
