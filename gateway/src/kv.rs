//! Redis connections, with one time limit around every call: a hung Redis must not hang requests, it
//! must turn into a quick error that the caller maps to fail-open, fail-closed or 503.
//!
//! Connections are redis-rs multiplexed connections: one socket carries many concurrent calls,
//! pipelined. deadpool-redis creates them (with its creation timeout); the gateway then keeps a few and
//! shares clones among all requests instead of checking one out per call, because a checkout costs a
//! `PING` round trip (deadpool's recycle check), which doubled Redis traffic on the submission path. A
//! connection that fails or times out is dropped and replaced on the next call.

use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use deadpool_redis::{Pool, PoolConfig, Runtime, Timeouts};
use redis::aio::MultiplexedConnection;

/// Why a Redis call failed.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("no redis connection: {0}")]
    Pool(String),
    #[error("redis: {0}")]
    Command(#[from] redis::RedisError),
    #[error("unexpected redis data: {0}")]
    Corrupt(String),
}

impl RedisError {
    /// Whether the command may have been carried out though this error came back: it was sent, or may
    /// have been, and no answer came (a timeout, a connection lost under it), or the answer was not
    /// understood. A refused connection or an error Redis itself answered means it was not.
    pub fn may_have_applied(&self) -> bool {
        match self {
            RedisError::Timeout(_) | RedisError::Corrupt(_) => true,
            RedisError::Pool(_) => false,
            RedisError::Command(e) => e.is_io_error() || e.is_connection_dropped() || e.is_timeout(),
        }
    }
}

/// A Redis client whose calls all carry the configured timeout.
#[derive(Clone)]
pub struct Redis {
    pool: Pool,
    timeout: Duration,
    slots: Arc<Vec<Mutex<Option<MultiplexedConnection>>>>,
    next: Arc<AtomicUsize>,
}

impl Redis {
    /// Prepares `connections` shared connections; none is opened until the first call, so a gateway
    /// starts (and reports not ready) while Redis is down.
    pub fn new(url: &str, connections: usize, timeout: Duration) -> Result<Self, String> {
        let connections = connections.max(1);
        let mut config = deadpool_redis::Config::from_url(url);
        let mut pool = PoolConfig::new(connections);
        pool.timeouts = Timeouts {
            wait: Some(timeout),
            create: Some(timeout),
            recycle: Some(timeout),
        };
        config.pool = Some(pool);
        let pool = config
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|e| format!("redis pool for {url}: {e}"))?;
        Ok(Self {
            pool,
            timeout,
            slots: Arc::new((0..connections).map(|_| Mutex::new(None)).collect()),
            next: Arc::new(AtomicUsize::new(0)),
        })
    }

    async fn connection(&self, slot: usize) -> Result<MultiplexedConnection, RedisError> {
        if let Some(conn) = self.slots[slot].lock().ok().and_then(|s| s.clone()) {
            return Ok(conn);
        }
        let object = self
            .pool
            .get()
            .await
            .map_err(|e| RedisError::Pool(e.to_string()))?;
        // Taken out of the pool for good: this slot owns it now, and the pool may create another.
        let conn = deadpool_redis::Connection::take(object);
        if let Ok(mut s) = self.slots[slot].lock() {
            *s = Some(conn.clone());
        }
        Ok(conn)
    }

    fn discard(&self, slot: usize) {
        if let Ok(mut s) = self.slots[slot].lock() {
            *s = None;
        }
    }

    /// Runs `f` on a shared connection, connecting (if needed) and the call together bounded by the
    /// timeout.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, RedisError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, redis::RedisError>>,
    {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let deadline = tokio::time::Instant::now() + self.timeout;
        // Connecting and the call share the deadline, but not the error: a call that never got a connection
        // was never sent ([`RedisError::may_have_applied`] is false), one that timed out may have been.
        let conn = match tokio::time::timeout_at(deadline, self.connection(slot)).await {
            Ok(conn) => conn?,
            Err(_) => {
                return Err(RedisError::Pool(format!(
                    "no connection within {:?}",
                    self.timeout
                )));
            }
        };
        let result = tokio::time::timeout_at(deadline, f(conn))
            .await
            .map_err(|_| RedisError::Timeout(self.timeout))
            .and_then(|r| r.map_err(RedisError::from));
        match &result {
            Err(RedisError::Timeout(_)) => self.discard(slot),
            Err(RedisError::Command(e))
                if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() =>
            {
                self.discard(slot)
            }
            _ => {}
        }
        result
    }

    pub async fn ping(&self) -> Result<(), RedisError> {
        self.call(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn set(redis: &Redis) -> Result<(), RedisError> {
        redis
            .call(|mut c| async move {
                redis::cmd("SET")
                    .arg("kv-test")
                    .arg(1)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
    }

    #[tokio::test]
    async fn a_call_that_never_got_a_connection_was_not_applied() {
        // A port nothing listens on: refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let redis = Redis::new(
            &format!("redis://127.0.0.1:{port}/"),
            1,
            Duration::from_millis(300),
        )
        .unwrap();
        let e = set(&redis).await.unwrap_err();
        assert!(!e.may_have_applied(), "{e}");
        // A listener that accepts and never answers: the connection's handshake times out, not the call.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}/", silent.local_addr().unwrap());
        let redis = Redis::new(&url, 1, Duration::from_millis(300)).unwrap();
        let e = set(&redis).await.unwrap_err();
        assert!(!e.may_have_applied(), "{e}");
    }
}
