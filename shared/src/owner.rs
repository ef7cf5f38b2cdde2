//! The owner header: who submitted a job, carried by the job's messages so that it outlives the gateway's
//! record of it.
//!
//! The gateway records a job's owner (the digest of the API key that submitted it; never the key) in the
//! job's Redis record, and answers a job only to its owner. Should Redis lose the record (restarted without
//! persistence, a failover to an empty replica), the worker's replies recreate it, but a reply's body does
//! not say whose the job is, and a record without its owner is nobody's: the job would answer 404 to the
//! client that submitted it, for good. So the gateway publishes each job with an `x-owner` header, a worker
//! copies it onto every reply of that job, and a record the replies recreate gets its owner back. A message
//! without the header (a job an AMQP producer published, or a worker of an older release) changes nothing.

/// The header's name, on a job message and on each of its replies.
pub const OWNER_HEADER: &str = "x-owner";

#[cfg(feature = "amqp")]
mod amqp {
    use lapin::BasicProperties;
    use lapin::types::{AMQPValue, LongString, ShortString};

    use super::OWNER_HEADER;

    /// The owner a message's headers name, if any.
    pub fn read(properties: &BasicProperties) -> Option<String> {
        let value = properties.headers().as_ref()?.inner().get(OWNER_HEADER)?;
        match value {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
            _ => None,
        }
        .filter(|owner| !owner.is_empty())
    }

    /// `properties` with the owner header set to `owner` (unchanged when there is none).
    pub fn write(properties: BasicProperties, owner: Option<&str>) -> BasicProperties {
        let Some(owner) = owner else {
            return properties;
        };
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(
            ShortString::from(OWNER_HEADER),
            AMQPValue::LongString(LongString::from(owner)),
        );
        properties.with_headers(headers)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn the_owner_written_is_the_owner_read_and_other_headers_stay() {
            let mut headers = lapin::types::FieldTable::default();
            headers.insert(
                super::ShortString::from("x-other"),
                super::AMQPValue::Boolean(true),
            );
            let props = super::BasicProperties::default().with_headers(headers);
            let written = super::write(props, Some("ab12"));
            assert_eq!(super::read(&written).as_deref(), Some("ab12"));
            assert!(
                written
                    .headers()
                    .as_ref()
                    .unwrap()
                    .inner()
                    .contains_key("x-other")
            );
            assert_eq!(
                super::read(&super::write(super::BasicProperties::default(), None)),
                None
            );
        }
    }
}

#[cfg(feature = "amqp")]
pub use amqp::{read, write};
