//! Test support shared by the gateway's and the worker's tests (cargo feature `testing`, enabled only as a
//! dev-dependency): a TCP proxy in front of the broker that can stall what the broker sends back on one of
//! the connections through it. Publishes still reach the broker, but their confirms (and everything else)
//! stop coming back: how a confirm goes missing in production (a congested or half-broken link, a
//! connection the broker has blocked), made on demand, on real connections to the real broker. The broker's
//! own alarms are global and would stop every other test on it, so they are not used.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct StallProxy {
    pub port: u16,
    /// One switch per connection accepted, in the order they came.
    stalls: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StallProxy {
    /// Listens on a free local port and forwards every connection to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let stalls: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let upstream = upstream.to_owned();
        let list = stalls.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let stall = Arc::new(AtomicBool::new(false));
                if let Ok(mut list) = list.lock() {
                    list.push(stall.clone());
                }
                tokio::spawn(forward(client, server, stall));
            }
        });
        Ok(Self { port, stalls, task })
    }

    /// The AMQP URL (guest, default vhost) that goes through this proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.stalls.lock().map_or(0, |l| l.len())
    }

    /// Stops (or resumes) forwarding what the broker sends on the `n`th connection (from 0). Returns false
    /// when there is no such connection yet.
    pub fn stall(&self, n: usize, on: bool) -> bool {
        let Ok(list) = self.stalls.lock() else {
            return false;
        };
        match list.get(n) {
            Some(switch) => {
                switch.store(on, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(client: TcpStream, server: TcpStream, stall: Arc<AtomicBool>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let up = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match server_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Held bytes wait here (and the broker's further bytes in its socket) until the stall lifts.
        while stall.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if client_write.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    up.abort();
}
