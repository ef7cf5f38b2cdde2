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
        let work = async {
            let conn = self.connection(slot).await?;
            f(conn).await.map_err(RedisError::from)
        };
        let result = tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| RedisError::Timeout(self.timeout))
            .and_then(|r| r);
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
