//! The accept loop. `axum::serve` has no header-read timeout, so connections are served by hyper's
//! HTTP/1 builder directly: a client that dribbles its headers is cut off after `header_read_timeout`
//! (slow bodies are cut off by the body deadline, `routes::body_deadline`). Shutdown stops accepting, lets
//! open requests finish for up to the grace period, then returns.
//!
//! Connections are bounded twice: at most `max_connections` in all, and at most
//! `max_connections_per_client` from one client address (a trusted proxy's are not counted: the clients
//! behind it are bounded by their streams, `routes::follow_slot`). A connection past either bound is not
//! left in the backlog, where a liveness probe would time out behind it and restart a healthy gateway: it is
//! taken into a small [`OVERFLOW`] reserve and served one request by the overflow router, which answers
//! the health routes as usual and everything else with 429 (the client's own bound) or 503 (the gateway's),
//! `Retry-After` and `Connection: close`. The reserve has a short header deadline and a per-address share,
//! so one client cannot hold it either; only past the reserve does the loop stop accepting.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use ipnet::IpNet;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::auth::ClientId;
use crate::places::{PerKey, Place};

/// The bounds of the accept loop.
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// 0: no per-address bound.
    pub max_connections_per_client: usize,
    /// Peers whose connections carry many clients: not bounded per address.
    pub trusted_proxies: Vec<IpNet>,
    pub grace: Duration,
}

/// Connections served by the overflow router at most, beyond `max_connections`.
pub const OVERFLOW: usize = 64;
/// Of those, at most this many from one address; past it a connection is closed unanswered.
const OVERFLOW_PER_CLIENT: usize = 2;
/// The header deadline of an overflow connection: it gets one request, and promptly.
const OVERFLOW_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a connection is served by the overflow router; the router reads it from the request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// The client's address holds `max_connections_per_client` connections.
    Client { limit: usize },
    /// The gateway holds `max_connections`.
    Gateway { limit: usize },
}

/// What the loop decided for one accepted connection.
enum Admission {
    /// The full router, holding its places.
    Serve(Option<Place<String>>, tokio::sync::OwnedSemaphorePermit),
    /// The overflow router, for the given reason.
    Overflow(Overflow, Place<String>, tokio::sync::OwnedSemaphorePermit),
    /// Closed at once: the address has its share of the overflow too.
    Close,
}

struct Gate {
    limits: Limits,
    /// `max_connections` places.
    main: Arc<Semaphore>,
    /// [`OVERFLOW`] places.
    overflow: Arc<Semaphore>,
    /// Connections per client address (its [`ClientId::key_part`], so an IPv6 client's /64 counts as one).
    per_client: Arc<PerKey<String>>,
    per_client_overflow: Arc<PerKey<String>>,
}

impl Gate {
    fn new(limits: Limits) -> Self {
        Self {
            main: Arc::new(Semaphore::new(limits.max_connections)),
            overflow: Arc::new(Semaphore::new(OVERFLOW)),
            per_client: Arc::default(),
            per_client_overflow: Arc::default(),
            limits,
        }
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        crate::auth::is_trusted(&self.limits.trusted_proxies, ip)
    }

    fn admit(&self, peer: IpAddr) -> Admission {
        let address = ClientId::Ip(peer).key_part();
        let per_client = self.limits.max_connections_per_client;
        let mut held = None;
        if per_client > 0 && !self.trusted(peer) {
            held = self.per_client.take(&address, per_client);
            if held.is_none() {
                return self.overflow(Overflow::Client { limit: per_client }, address);
            }
        }
        match self.main.clone().try_acquire_owned() {
            Ok(permit) => Admission::Serve(held, permit),
            Err(_) => {
                drop(held);
                let limit = self.limits.max_connections;
                self.overflow(Overflow::Gateway { limit }, address)
            }
        }
    }

    /// A place in the overflow for `address`, or none: its share is taken, or the reserve is full.
    fn overflow(&self, reason: Overflow, address: String) -> Admission {
        let Some(share) = self.per_client_overflow.take(&address, OVERFLOW_PER_CLIENT) else {
            return Admission::Close;
        };
        match self.overflow.clone().try_acquire_owned() {
            Ok(permit) => Admission::Overflow(reason, share, permit),
            Err(_) => Admission::Close,
        }
    }

    /// Waits until a connection could be taken somewhere: a main place or an overflow place is free.
    async fn room(&self) {
        loop {
            if self.main.available_permits() > 0 || self.overflow.available_permits() > 0 {
                return;
            }
            // Both full: wait for either to give a place back, without holding it.
            tokio::select! {
                permit = self.main.acquire() => drop(permit),
                permit = self.overflow.acquire() => drop(permit),
            }
        }
    }
}

pub async fn serve(
    listener: TcpListener,
    router: Router,
    overflow_router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let mut http_overflow = hyper::server::conn::http1::Builder::new();
    http_overflow
        .timer(TokioTimer::new())
        .header_read_timeout(OVERFLOW_HEADER_TIMEOUT.min(limits.header_read_timeout))
        .keep_alive(false);
    let graceful = GracefulShutdown::new();
    let gate = Gate::new(limits.clone());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = gate.room() => {}
            _ = &mut shutdown => break,
        }
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (router, http, places, reason) = match gate.admit(peer.ip()) {
            Admission::Serve(held, permit) => (router.clone(), &http, (held, Some(permit)), None),
            Admission::Overflow(reason, share, permit) => {
                metrics::counter!(crate::telemetry::CONNECTIONS_OVER_BOUND, "bound" => reason.name())
                    .increment(1);
                (
                    overflow_router.clone(),
                    &http_overflow,
                    (Some(share), Some(permit)),
                    Some(reason),
                )
            }
            Admission::Close => {
                metrics::counter!(crate::telemetry::CONNECTIONS_OVER_BOUND, "bound" => "closed").increment(1);
                drop(stream);
                continue;
            }
        };
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            if let Some(reason) = reason {
                request.extensions_mut().insert(reason);
            }
            router.clone().oneshot(request)
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(places);
        });
    }
    drop(listener);
    tracing::info!("shutting down: draining open requests");
    let grace = limits.grace;
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => tracing::warn!(?grace, "requests still open after the grace period"),
    }
}

impl Overflow {
    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            Self::Client { .. } => "client",
            Self::Gateway { .. } => "gateway",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_client: usize, trusted: &[&str]) -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            max_connections: max,
            max_connections_per_client: per_client,
            trusted_proxies: trusted
                .iter()
                .map(|t| crate::auth::parse_net(t).unwrap())
                .collect(),
            grace: Duration::from_secs(1),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_client_past_its_share_is_served_by_the_overflow_and_then_closed_while_others_are_served() {
        let gate = Gate::new(limits(100, 2, &[]));
        let a = ip("10.0.0.1");
        let first = gate.admit(a);
        let second = gate.admit(a);
        assert!(matches!(first, Admission::Serve(..)));
        assert!(matches!(second, Admission::Serve(..)));
        let over: Vec<Admission> = (0..OVERFLOW_PER_CLIENT).map(|_| gate.admit(a)).collect();
        for o in &over {
            assert!(matches!(
                o,
                Admission::Overflow(Overflow::Client { limit: 2 }, ..)
            ));
        }
        assert!(matches!(gate.admit(a), Admission::Close));
        assert!(matches!(gate.admit(ip("10.0.0.2")), Admission::Serve(..)));
        drop(first);
        assert!(
            matches!(gate.admit(a), Admission::Serve(..)),
            "a place given back is taken again"
        );
    }

    #[test]
    fn an_ipv6_client_is_one_client_across_its_64_and_a_trusted_proxy_is_not_bounded() {
        let gate = Gate::new(limits(100, 1, &["10.9.0.0/16"]));
        let _one = gate.admit(ip("2001:db8:1:2::1"));
        assert!(matches!(
            gate.admit(ip("2001:db8:1:2::ffff")),
            Admission::Overflow(Overflow::Client { .. }, ..)
        ));
        let proxied: Vec<Admission> = (0..10).map(|_| gate.admit(ip("10.9.1.1"))).collect();
        assert!(proxied.iter().all(|a| matches!(a, Admission::Serve(..))));
    }

    #[test]
    fn past_the_gateways_bound_connections_go_to_the_overflow_until_it_is_full() {
        let gate = Gate::new(limits(1, 0, &[]));
        let _held = gate.admit(ip("10.0.0.1"));
        let mut over = Vec::new();
        for i in 0..OVERFLOW {
            let a = gate.admit(ip(&format!("10.1.{}.{}", i / 200, i % 200 + 1)));
            assert!(matches!(
                a,
                Admission::Overflow(Overflow::Gateway { limit: 1 }, ..)
            ));
            over.push(a);
        }
        assert!(matches!(gate.admit(ip("10.2.0.1")), Admission::Close));
    }
}
