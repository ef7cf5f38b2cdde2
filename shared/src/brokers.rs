//! The broker's URLs: one, or one per node of a RabbitMQ cluster. A client connects to one at a time and,
//! when that connection fails or is lost, moves on to the next, so losing a node costs a reconnect, not
//! the service. Any node serves every queue (a quorum queue's leader may live on another node; the broker
//! forwards), so the order is only a preference. One type for the gateway and the worker.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The URLs, and which one is in use.
#[derive(Debug)]
pub struct BrokerUrls {
    urls: Vec<String>,
    current: AtomicUsize,
}

impl BrokerUrls {
    /// From the `--amqp-url` values (each may itself be a comma-separated list); at least one.
    pub fn new<S: AsRef<str>>(values: &[S]) -> Result<Self, String> {
        let urls: Vec<String> = values
            .iter()
            .flat_map(|v| v.as_ref().split(','))
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if urls.is_empty() {
            return Err("--amqp-url: at least one broker URL is needed".into());
        }
        if let Some(bad) = urls
            .iter()
            .find(|u| !(u.starts_with("amqp://") || u.starts_with("amqps://")))
        {
            return Err(format!("--amqp-url: `{bad}` is not an amqp:// or amqps:// URL"));
        }
        Ok(Self {
            urls,
            current: AtomicUsize::new(0),
        })
    }

    /// The URL to connect to now.
    pub fn current(&self) -> &str {
        &self.urls[self.current.load(Ordering::Relaxed) % self.urls.len()]
    }

    /// Moves on to the next URL (after the current one failed); wraps around.
    pub fn advance(&self) {
        self.current.fetch_add(1, Ordering::Relaxed);
    }

    pub fn all(&self) -> &[String] {
        &self.urls
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_tried_in_turn_and_wrap_around() {
        let urls = BrokerUrls::new(&["amqp://a:5672, amqp://b:5672", "amqp://c:5672"]).unwrap();
        assert_eq!(urls.all().len(), 3);
        assert_eq!(urls.current(), "amqp://a:5672");
        urls.advance();
        assert_eq!(urls.current(), "amqp://b:5672");
        urls.advance();
        urls.advance();
        assert_eq!(urls.current(), "amqp://a:5672");
    }

    #[test]
    fn an_empty_list_or_another_scheme_is_refused() {
        assert!(BrokerUrls::new::<&str>(&[]).is_err());
        assert!(BrokerUrls::new(&[" , "]).is_err());
        assert!(BrokerUrls::new(&["redis://x"]).is_err());
    }
}
