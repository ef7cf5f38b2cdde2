//! The Redis pool, with one time limit around every call: a hung Redis must not hang requests, it must
//! turn into a quick error that the caller maps to fail-open, fail-closed or 503.

use std::future::Future;
use std::time::Duration;

use deadpool_redis::{Connection, Pool, PoolConfig, Runtime, Timeouts};

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

/// A pooled Redis client whose calls all carry the configured timeout.
#[derive(Clone)]
pub struct Redis {
    pool: Pool,
    timeout: Duration,
}

impl Redis {
    /// Builds the pool; no connection is made until the first call, so a gateway starts (and reports not
    /// ready) while Redis is down.
    pub fn new(url: &str, max_size: usize, timeout: Duration) -> Result<Self, String> {
        let mut config = deadpool_redis::Config::from_url(url);
        let mut pool = PoolConfig::new(max_size.max(1));
        pool.timeouts = Timeouts {
            wait: Some(timeout),
            create: Some(timeout),
            recycle: Some(timeout),
        };
        config.pool = Some(pool);
        let pool = config
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|e| format!("redis pool for {url}: {e}"))?;
        Ok(Self { pool, timeout })
    }

    /// Runs `f` on a pooled connection, the checkout and the call together bounded by the timeout.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, RedisError>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = Result<T, redis::RedisError>>,
    {
        let work = async {
            let conn = self
                .pool
                .get()
                .await
                .map_err(|e| RedisError::Pool(e.to_string()))?;
            f(conn).await.map_err(RedisError::from)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| RedisError::Timeout(self.timeout))?
    }

    pub async fn ping(&self) -> Result<(), RedisError> {
        self.call(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
            .map(|_| ())
    }
}
