//! The topology declared over AMQP: the queues' and the exchange's arguments, and the declaration (and, for
//! tests, the deletion) that every gateway and worker runs.
//!
//! Behind the `amqp` feature: producers that only read and write the contract's messages do not build an
//! AMQP client for it.

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use super::{CANCEL_RETENTION, Topology};
use crate::lane::Lane;

impl Topology {
    /// Arguments of every lane's jobs queue. They must be identical in every process, or the broker refuses the
    /// second declaration (PRECONDITION_FAILED).
    pub fn jobs_queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        args.insert(
            ShortString::from("x-delivery-limit"),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(LongString::from("")),
        );
        args.insert(
            ShortString::from("x-dead-letter-routing-key"),
            AMQPValue::LongString(LongString::from(self.dead_letter_queue())),
        );
        args
    }

    fn quorum() -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        args
    }

    /// Arguments of the cancellations stream: retention by age, in small segments so that old cancels are
    /// really dropped (a stream truncates whole segments only).
    pub fn cancellations_arguments() -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(LongString::from("stream")),
        );
        args.insert(
            ShortString::from("x-max-age"),
            AMQPValue::LongString(LongString::from(CANCEL_RETENTION)),
        );
        args.insert(
            ShortString::from("x-stream-max-segment-size-bytes"),
            AMQPValue::LongLongInt(1_000_000),
        );
        args
    }

    /// Declares the dead-letter queue, every lane's jobs queue, the replies queue, and the control exchange
    /// with its cancellations stream. Idempotent.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare(self.dead_letter_queue().as_str().into(), durable, Self::quorum())
            .await?;
        for lane in Lane::ALL {
            channel
                .queue_declare(
                    self.lane_queue(lane).as_str().into(),
                    durable,
                    self.jobs_queue_arguments(),
                )
                .await?;
        }
        channel
            .queue_declare(self.replies_queue().as_str().into(), durable, Self::quorum())
            .await?;
        channel
            .exchange_declare(
                self.control_exchange().as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                self.cancellations_queue().as_str().into(),
                durable,
                Self::cancellations_arguments(),
            )
            .await?;
        channel
            .queue_bind(
                self.cancellations_queue().as_str().into(),
                self.control_exchange().as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// Deletes the queues [`Topology::declare`] makes, messages and all: for tests and benchmarks that
    /// ran in a namespace of their own. Missing queues are not an error.
    pub async fn delete(&self, channel: &Channel) -> Result<(), lapin::Error> {
        for queue in [
            self.lane_queue(Lane::Interactive),
            self.lane_queue(Lane::Batch),
            self.dead_letter_queue(),
            self.replies_queue(),
            self.cancellations_queue(),
        ] {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        channel
            .exchange_delete(
                self.control_exchange().as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await?;
        Ok(())
    }
}
