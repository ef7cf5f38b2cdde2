//! Test support shared by the gateway's and the worker's tests (cargo feature `testing`, enabled only as a
//! dev-dependency): a TCP proxy in front of the broker that can stall what the broker sends back on one of
//! the connections through it. Publishes still reach the broker, but their confirms (and everything else)
//! stop coming back: how a confirm goes missing in production (a congested or half-broken link, a
//! connection the broker has blocked), made on demand, on real connections to the real broker. The broker's
//! own alarms are global and would stop every other test on it, so they are not used. It can also freeze
//! both directions, a link gone dead: then not even the publish reaches the broker. And the prompt of the
//! OpenAI compatibility tests ([`LOAD_TESTER_PROMPT`]). And [`PrivateRedis`], a Redis server of a test's own.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A 325-character prompt as a load tester's captured request sends it: newlines, quotes, colons, `+`,
/// `*`, `&`, brackets, none of which the original's cleaning kept. It must reach the model as written.
pub const LOAD_TESTER_PROMPT: &str = "You are a helpful assistant: answer the user's questions precisely.\n\
    Q: What is 2 + 2? Explain step by step, e.g. \"2 + 2 = 4\".\n\
    A: Two plus two: (1) start at 2; (2) count up -> 3, 4; so it is 4!\n\
    Q: And 3 * 3? Keep the same format & be exact, please (no prose!).\n\
    A: Three times three is nine: 3 * 3 = 9. Anything else? [yes/no]\n";

pub struct StallProxy {
    pub port: u16,
    /// The switches of each connection accepted, in the order they came.
    stalls: Arc<Mutex<Vec<Arc<Switches>>>>,
    /// Whether a connection accepted now starts stalled ([`StallProxy::stall_all`]).
    stall_new: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl StallProxy {
    /// Listens on a free local port and forwards every connection to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let stalls: Arc<Mutex<Vec<Arc<Switches>>>> = Arc::default();
        let stall_new: Arc<AtomicBool> = Arc::default();
        let upstream = upstream.to_owned();
        let list = stalls.clone();
        let new_stalled = stall_new.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let stall = Arc::new(Switches {
                    upstream_port: server.local_addr().map_or(0, |a| a.port()),
                    down: AtomicBool::new(new_stalled.load(Ordering::SeqCst)),
                    ..Switches::default()
                });
                if let Ok(mut list) = list.lock() {
                    list.push(stall.clone());
                }
                tokio::spawn(forward(client, server, stall));
            }
        });
        Ok(Self {
            port,
            stalls,
            stall_new,
            task,
        })
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
        self.switch(n, |s| s.down.store(on, Ordering::SeqCst))
    }

    /// Stops (or resumes) forwarding what the upstream server sends on every connection, those accepted
    /// from now on included: whatever the client sends is carried out, and no answer comes back.
    pub fn stall_all(&self, on: bool) {
        self.stall_new.store(on, Ordering::SeqCst);
        if let Ok(list) = self.stalls.lock() {
            for s in list.iter() {
                s.down.store(on, Ordering::SeqCst);
            }
        }
    }

    /// Stops (or resumes) forwarding both ways on the `n`th connection: nothing the client sends reaches
    /// the broker either. Returns false when there is no such connection yet.
    pub fn freeze(&self, n: usize, on: bool) -> bool {
        self.switch(n, |s| {
            s.up.store(on, Ordering::SeqCst);
            s.down.store(on, Ordering::SeqCst);
        })
    }

    /// Which connection (from 0) reaches the upstream server from local port `port`: the port the server
    /// sees as its client's (Redis' `CLIENT LIST` shows it as `addr=127.0.0.1:PORT`).
    pub fn connection_from(&self, port: u16) -> Option<usize> {
        let list = self.stalls.lock().ok()?;
        list.iter().position(|s| s.upstream_port == port)
    }

    fn switch(&self, n: usize, set: impl FnOnce(&Switches)) -> bool {
        let Ok(list) = self.stalls.lock() else {
            return false;
        };
        list.get(n).map(|s| set(s)).is_some()
    }
}

/// Whether a connection holds what each side sends.
#[derive(Default)]
struct Switches {
    /// The local port of the connection to the upstream server.
    upstream_port: u16,
    /// What the client sends.
    up: AtomicBool,
    /// What the broker sends.
    down: AtomicBool,
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(client: TcpStream, server: TcpStream, stall: Arc<Switches>) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up_stall = stall.clone();
    let up = tokio::spawn(relay(client_read, server_write, up_stall, |s| &s.up));
    relay(server_read, client_write, stall, |s| &s.down).await;
    up.abort();
}

/// Copies `from` to `to`, holding each chunk while its switch is on.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stall: Arc<Switches>,
    switch: fn(&Switches) -> &AtomicBool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Held bytes wait here (and the sender's further bytes in its socket) until the stall lifts.
        while switch(&stall).load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

/// A Redis server of a test's own (`redis-server` on a free port, nothing persisted): what a gateway asks of
/// Redis can be counted without the other tests' traffic, and Redis can be restarted empty as a Redis
/// without persistence comes back. Stopped when dropped. Set-up failures panic: they are the test's.
pub struct PrivateRedis {
    child: std::process::Child,
    port: u16,
    pub url: String,
}

impl PrivateRedis {
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let redis = Self {
            child: Self::spawn(port),
            port,
            url: format!("redis://127.0.0.1:{port}/"),
        };
        redis.ready().await;
        redis
    }

    /// Kills the server and starts an empty one on the same port, as a Redis without persistence
    /// restarts: every key is gone, and clients reconnect to the same address.
    pub async fn restart_empty(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(self.port);
        self.ready().await;
    }

    fn spawn(port: u16) -> std::process::Child {
        std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test.sh installs it)")
    }

    async fn ready(&self) {
        for _ in 0..200 {
            if self.command_counts().await.is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("redis-server on port {} did not start", self.port);
    }

    /// A command's text answer, on a connection of its own; `None` while the server is down.
    async fn text(&self, cmd: &redis::Cmd) -> Option<String> {
        let client = redis::Client::open(self.url.as_str()).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        cmd.query_async(&mut conn).await.ok()
    }

    /// Calls of each command so far (`INFO commandstats`), e.g. `xrange` → 12; `None` while it is down.
    pub async fn command_counts(&self) -> Option<std::collections::HashMap<String, u64>> {
        let info = self.text(redis::cmd("INFO").arg("commandstats")).await?;
        // Lines like `cmdstat_xrange:calls=12,usec=...`.
        Some(
            info.lines()
                .filter_map(|l| l.strip_prefix("cmdstat_"))
                .filter_map(|l| {
                    let (name, rest) = l.split_once(':')?;
                    let calls = rest.strip_prefix("calls=")?.split(',').next()?.parse().ok()?;
                    Some((name.to_owned(), calls))
                })
                .collect(),
        )
    }

    /// The connections subscribed to a channel (`CLIENT LIST`: `sub=` above 0) as the server sees them:
    /// (client id, which is new for each connection; client port); `None` while it is down.
    pub async fn subscribers(&self) -> Option<Vec<(u64, u16)>> {
        let list = self.text(redis::cmd("CLIENT").arg("LIST")).await?;
        // Lines like `id=7 addr=127.0.0.1:53312 ... sub=2 psub=0 ...`.
        let field = |line: &str, name: &str| -> Option<String> {
            line.split(' ')
                .find_map(|f| f.strip_prefix(name).map(str::to_owned))
        };
        Some(
            list.lines()
                .filter(|l| field(l, "sub=").is_some_and(|n| n != "0"))
                .filter_map(|l| {
                    let id = field(l, "id=")?.parse().ok()?;
                    let port = field(l, "addr=")?.rsplit(':').next()?.parse().ok()?;
                    Some((id, port))
                })
                .collect(),
        )
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
