//! Jobs the broker gave up on, as final states: a job dead-lettered into `{ns}.jobs.dead` (it expired while
//! queued, or was delivered more often than the delivery limit allows, each worker that took it dying) would
//! otherwise read `queued` for its record's whole life, and `/run` would wait for it to its timeout.
//!
//! The gateway consumes the dead-letter queue with its replies (one job's in order, see [`crate::replies`])
//! and turns each message into the `job.failed` the job never got, with a stable code from the broker's
//! `x-death` header. A gateway job's record takes it (a final state a worker's earlier `job.failed` would have
//! already set is kept); an AMQP producer's job gets the reply on its own `reply_to`, so every accepted job
//! ends in a true state wherever it came from. A message a worker refused (`rejected`) was answered by that
//! worker before it was rejected, and gets no second answer.

use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use shared::reply::{Failed, now_ms};
use shared::{ErrorBody, ErrorCode, JobId, JobReply};

/// Who the failure reply names as having answered.
pub const BROKER: &str = "broker";

/// Why the broker dead-lettered a message, from `x-death` (newest first) or `x-first-death-reason`.
fn reason(headers: Option<&FieldTable>) -> Option<String> {
    let headers = headers?;
    let text = |v: &AMQPValue| match v {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    };
    if let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death")
        && let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first()
        && let Some(reason) = death.inner().get("reason").and_then(text)
    {
        return Some(reason);
    }
    headers.inner().get("x-first-death-reason").and_then(text)
}

/// The error a dead-lettered job ends with.
pub fn error(headers: Option<&FieldTable>) -> ErrorBody {
    match reason(headers).as_deref() {
        Some("expired") => ErrorBody::new(
            ErrorCode::Expired,
            "the job waited in the queue past its expiration and no worker took it",
        ),
        Some("delivery_limit") => ErrorBody::new(
            ErrorCode::DeliveryLimit,
            "the job was handed to workers as often as the delivery limit allows and none finished it (each \
             died or lost its connection); it is not tried again",
        ),
        Some("maxlen") => ErrorBody::new(ErrorCode::Rejected, "the jobs queue was full and dropped the job"),
        Some(reason) => ErrorBody::new(
            ErrorCode::Rejected,
            format!("the broker dead-lettered the job ({reason})"),
        ),
        None => ErrorBody::new(ErrorCode::Rejected, "the broker dead-lettered the job"),
    }
}

/// The `job.failed` a dead-lettered delivery stands for, and where it goes; `None` without a job id.
pub fn failure(delivery: &Delivery) -> Option<(JobReply, Option<String>)> {
    let id: JobId = delivery
        .properties
        .correlation_id()
        .as_ref()?
        .as_str()
        .parse()
        .ok()?;
    let reply_to = delivery
        .properties
        .reply_to()
        .as_ref()
        .map(|r| r.as_str().to_owned());
    let reply = JobReply::Failed(Failed {
        job_id: Some(id),
        worker_id: BROKER.to_owned(),
        error: error(delivery.properties.headers().as_ref()),
        finished_at_ms: now_ms(),
    });
    Some((reply, reply_to))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString, ShortString};

    fn death(reason: &str, count: i64) -> FieldTable {
        let mut d = FieldTable::default();
        d.insert(
            ShortString::from("reason"),
            AMQPValue::LongString(LongString::from(reason)),
        );
        d.insert(ShortString::from("count"), AMQPValue::LongLongInt(count));
        let mut h = FieldTable::default();
        h.insert(
            ShortString::from("x-death"),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(d)])),
        );
        h
    }

    #[test]
    fn the_brokers_reason_becomes_a_stable_code() {
        assert_eq!(error(Some(&death("expired", 1))).code, ErrorCode::Expired);
        assert_eq!(
            error(Some(&death("delivery_limit", 3))).code,
            ErrorCode::DeliveryLimit
        );
        assert_eq!(error(Some(&death("rejected", 1))).code, ErrorCode::Rejected);
        assert_eq!(error(None).code, ErrorCode::Rejected);
        let mut first = FieldTable::default();
        first.insert(
            ShortString::from("x-first-death-reason"),
            AMQPValue::LongString(LongString::from("expired")),
        );
        assert_eq!(error(Some(&first)).code, ErrorCode::Expired);
    }
}
