//! A TCP proxy to the machine's RabbitMQ, for tests, whose broker-to-client direction can be held: what
//! the client sends still reaches the broker, but nothing the broker answers (confirms included) comes back
//! until released, as when a broker stops confirming (an alarm blocks the connection, a network stalls).
//! The broker's own alarms are global and would stop every other test on it, so they are not used.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Starts a proxy; returns its AMQP URL (guest, default vhost) and the switch that holds the broker's
/// answers. `only` limits the holding to the connection accepted `only`-th (from 0), e.g. a worker's
/// publishing connection, which it opens second.
pub async fn holding_proxy(only: Option<usize>) -> (String, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("amqp://guest:guest@{}/%2f", listener.local_addr().unwrap());
    let held = Arc::new(AtomicBool::new(false));
    let hold = held.clone();
    tokio::spawn(async move {
        let mut accepted = 0;
        while let Ok((client, _)) = listener.accept().await {
            let holds = only.is_none_or(|n| n == accepted);
            accepted += 1;
            let upstream = TcpStream::connect("127.0.0.1:5672").await.unwrap();
            let (mut client_read, mut client_write) = client.into_split();
            let (mut broker_read, mut broker_write) = upstream.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut client_read, &mut broker_write).await });
            let hold = hold.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = broker_read.read(&mut buf).await {
                    while holds && hold.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (url, held)
}
