//! Who is calling: API-key checks, the client identity that rate limits and `/run` wait slots count, and the
//! highest lane (`shared::Lane`) the caller's key may use: a request asks for a lane, its key clamps it.
//!
//! Keys are compared as SHA-256 digests in constant time, and only digests are kept, in memory and in job
//! records (a job's owner), so neither a timing side channel nor a Redis dump reveals a key.
//!
//! The identity is the key when API keys are configured (so one client behind many addresses shares one
//! budget), otherwise the peer address. A bearer token is *not* an identity when keys are off: anyone could
//! mint a fresh token per request and escape the limit. `X-Forwarded-For` is believed only when the peer
//! is a configured trusted proxy, and then read from the right, skipping trusted hops, because everything
//! left of the last untrusted hop is whatever the client chose to write.

use std::net::IpAddr;

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use ipnet::IpNet;
use shared::Lane;

/// SHA-256 of an API key; its hex form marks a job's owner.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyDigest({}…)", &self.hex()[..8])
    }
}

/// The configured API keys (digests only), each with the highest lane it may use. Empty means keys are off.
#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    digests: Vec<(KeyDigest, Lane)>,
}

/// Why a request is not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    Invalid,
}

impl ApiKeys {
    /// Keys that may use every lane.
    pub fn new(keys: &[&str]) -> Self {
        Self::with_ceilings(keys.iter().map(|k| (*k, Lane::Interactive)))
    }

    /// Keys, each with the highest lane it may use. A key given twice keeps its lowest ceiling.
    pub fn with_ceilings<'k>(keys: impl IntoIterator<Item = (&'k str, Lane)>) -> Self {
        let mut digests: Vec<(KeyDigest, Lane)> = Vec::new();
        for (key, ceiling) in keys {
            let digest = KeyDigest::of(key);
            match digests.iter_mut().find(|(d, _)| *d == digest) {
                Some((_, c)) => *c = (*c).min(ceiling),
                None => digests.push((digest, ceiling)),
            }
        }
        Self { digests }
    }

    /// The highest lane the key may use: every lane without keys.
    pub fn ceiling(&self, key: Option<KeyDigest>) -> Lane {
        key.and_then(|key| self.digests.iter().find(|(d, _)| *d == key))
            .map_or(Lane::Interactive, |(_, ceiling)| *ceiling)
    }

    pub fn enabled(&self) -> bool {
        !self.digests.is_empty()
    }

    /// `Ok(None)` when keys are off; `Ok(Some(digest))` for a configured key. Every configured key is
    /// compared, so the time taken does not tell which one nearly matched.
    pub fn check(&self, headers: &HeaderMap) -> Result<Option<KeyDigest>, AuthError> {
        if !self.enabled() {
            return Ok(None);
        }
        let presented = bearer(headers).ok_or(AuthError::Missing)?;
        let digest = KeyDigest::of(presented);
        let mut found = subtle::Choice::from(0);
        for (known, _) in &self.digests {
            found |= known.0.ct_eq(&digest.0);
        }
        if bool::from(found) {
            Ok(Some(digest))
        } else {
            Err(AuthError::Invalid)
        }
    }
}

/// The token of `Authorization: Bearer TOKEN` (scheme case-insensitive), if well formed.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The address of the client: the peer, or, when the peer is a trusted proxy, the nearest untrusted hop
/// named in `X-Forwarded-For`.
/// A trusted-proxy entry: a CIDR block, or a single address (a block of one).
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{s}` is not an address or CIDR block"))
}

/// Whether `ip` is in one of the blocks; an IPv4-mapped IPv6 peer counts as the IPv4 address it is.
pub(crate) fn is_trusted(trusted: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    trusted.iter().any(|net| net.contains(&ip))
}

pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: IpAddr| is_trusted(trusted, ip);
    if !is_trusted(peer) {
        return peer;
    }
    let hops: Vec<Option<IpAddr>> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(hop_address)
        .collect();
    // From the nearest hop outwards, while the hops are our proxies. A hop that cannot be read (`unknown`, an
    // obfuscated name) ends the walk at the proxy that wrote it: what is left of it may be made up, so a
    // spoofed address there must never become the client.
    let mut client = peer;
    for hop in hops.into_iter().rev() {
        let Some(hop) = hop else {
            break;
        };
        client = hop;
        if !is_trusted(hop) {
            break;
        }
    }
    client
}

/// One `X-Forwarded-For` hop: an address, `ip:port`, or `[v6]:port`; `None` when it is none of these.
fn hop_address(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    hop.parse::<std::net::SocketAddr>().ok().map(|s| s.ip())
}

/// Who a request counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientId {
    Key(KeyDigest),
    Ip(IpAddr),
}

impl ClientId {
    /// The part of a Redis key naming this client. Never contains the raw key.
    pub fn key_part(&self) -> String {
        match self {
            // 128 bits of the digest are plenty to keep clients apart and keep keys short.
            Self::Key(d) => format!("key:{}", &d.hex()[..32]),
            Self::Ip(IpAddr::V4(ip)) => format!("ip:{ip}"),
            // An IPv6 client usually holds a whole /64: keyed per address, it would have 2^64 budgets.
            Self::Ip(IpAddr::V6(ip)) => match ip.to_ipv4_mapped() {
                Some(v4) => format!("ip:{v4}"),
                None => {
                    let s = ip.segments();
                    format!("ip6:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
                }
            },
        }
    }
}

/// What the auth layer learned about a request; handlers and the rate limiter read it from extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub id: ClientId,
    /// The key's digest when API keys are on (the owner of the jobs this caller submits).
    pub key: Option<KeyDigest>,
    /// The highest lane the caller may use ([`ApiKeys::ceiling`]).
    pub ceiling: Lane,
}

impl Caller {
    pub fn identify(key: Option<KeyDigest>, peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> Self {
        let id = match key {
            Some(k) => ClientId::Key(k),
            None => ClientId::Ip(client_ip(peer, headers, trusted)),
        };
        Self {
            id,
            key,
            ceiling: Lane::Interactive,
        }
    }

    /// The same caller, limited to `ceiling`.
    pub fn with_ceiling(self, ceiling: Lane) -> Self {
        Self { ceiling, ..self }
    }

    /// The lane a request of this caller goes to: the one it asks for (interactive by default), clamped to
    /// its ceiling, never refused.
    pub fn lane(&self, asked: Option<Lane>) -> Lane {
        asked.unwrap_or_default().clamp_to(self.ceiling)
    }
}

impl Caller {
    /// The caller as text, kept with work done on its behalf later (a batch's jobs are admitted as its
    /// owner's): the key's digest or the address, never the key. [`Caller::from_token`] reads it back, its
    /// ceiling as [`Caller::identify`] sets it: such work names its lane itself.
    pub fn token(&self) -> String {
        match &self.id {
            ClientId::Key(digest) => format!("key:{}", digest.hex()),
            ClientId::Ip(ip) => format!("ip:{ip}"),
        }
    }

    pub fn from_token(token: &str) -> Option<Self> {
        if let Some(hex) = token.strip_prefix("key:") {
            let digest = KeyDigest::from_hex(hex)?;
            return Some(Self {
                id: ClientId::Key(digest),
                key: Some(digest),
                ceiling: Lane::Interactive,
            });
        }
        let ip = token.strip_prefix("ip:")?.parse().ok()?;
        Some(Self {
            id: ClientId::Ip(ip),
            key: None,
            ceiling: Lane::Interactive,
        })
    }
}

impl KeyDigest {
    /// The digest [`KeyDigest::hex`] wrote.
    pub fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callers_token_reads_back_as_the_same_caller() {
        let keyed = Caller::identify(
            Some(KeyDigest::of("k")),
            "10.0.0.1".parse().unwrap(),
            &HeaderMap::new(),
            &[],
        );
        let by_address = Caller::identify(None, "::1".parse().unwrap(), &HeaderMap::new(), &[]);
        for caller in [keyed, by_address] {
            assert_eq!(Caller::from_token(&caller.token()), Some(caller.clone()));
        }
        assert_eq!(Caller::from_token("key:zz"), None);
    }
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_client_whatever_the_header_says() {
        let h = headers(&[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(client_ip(ip("9.9.9.9"), &h, &[]), ip("9.9.9.9"));
    }

    #[test]
    fn a_trusted_proxy_forwards_the_nearest_untrusted_hop() {
        let trusted: Vec<IpNet> = vec![parse_net("10.0.0.0/8").unwrap()];
        // The client wrote a fake 6.6.6.6 itself; 5.5.5.5 is what our proxies saw.
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 5.5.5.5, 10.0.0.7")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("5.5.5.5"));
        // No header: the proxy itself is the client.
        assert_eq!(
            client_ip(ip("10.0.0.1"), &HeaderMap::new(), &trusted),
            ip("10.0.0.1")
        );
        // Garbage hops are skipped.
        let h = headers(&[("x-forwarded-for", "nonsense, 7.7.7.7")]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("7.7.7.7"));
    }

    #[test]
    fn the_rate_limit_key_is_the_api_key_digest_when_keys_are_on_else_the_address() {
        let keys = ApiKeys::new(&["alpha", "beta"]);
        let h = headers(&[("authorization", "Bearer beta")]);
        let key = keys.check(&h).unwrap();
        let caller = Caller::identify(key, ip("127.0.0.1"), &h, &[]);
        let part = caller.id.key_part();
        assert!(part.starts_with("key:") && !part.contains("beta"), "{part}");
        assert_eq!(part, Caller::identify(key, ip("8.8.8.8"), &h, &[]).id.key_part());

        let off = ApiKeys::default();
        let key = off.check(&h).unwrap();
        assert_eq!(key, None);
        // With keys off a bearer token is not an identity: the address is.
        assert_eq!(
            Caller::identify(key, ip("127.0.0.1"), &h, &[]).id.key_part(),
            "ip:127.0.0.1"
        );
        assert_eq!(
            Caller::identify(None, ip("::ffff:127.0.0.1"), &h, &[])
                .id
                .key_part(),
            "ip:127.0.0.1"
        );
    }

    #[test]
    fn a_keys_ceiling_clamps_the_lane_it_asks_for() {
        let keys = ApiKeys::with_ceilings([("alpha", Lane::Interactive), ("bulk", Lane::Batch)]);
        let bulk = keys.check(&headers(&[("authorization", "Bearer bulk")])).unwrap();
        assert_eq!(keys.ceiling(bulk), Lane::Batch);
        let caller =
            Caller::identify(bulk, ip("127.0.0.1"), &HeaderMap::new(), &[]).with_ceiling(Lane::Batch);
        assert_eq!(caller.lane(None), Lane::Batch, "clamped, not refused");
        assert_eq!(caller.lane(Some(Lane::Interactive)), Lane::Batch);
        let alpha = keys
            .check(&headers(&[("authorization", "Bearer alpha")]))
            .unwrap();
        assert_eq!(keys.ceiling(alpha), Lane::Interactive);
        let caller = Caller::identify(alpha, ip("127.0.0.1"), &HeaderMap::new(), &[]);
        assert_eq!(
            caller.lane(Some(Lane::Batch)),
            Lane::Batch,
            "a lower lane is always allowed"
        );
        assert_eq!(
            ApiKeys::default().ceiling(None),
            Lane::Interactive,
            "keys off: every lane"
        );
        let twice = ApiKeys::with_ceilings([("k", Lane::Interactive), ("k", Lane::Batch)]);
        assert_eq!(twice.ceiling(Some(KeyDigest::of("k"))), Lane::Batch);
    }

    #[test]
    fn keys_are_checked_when_configured() {
        let keys = ApiKeys::new(&["alpha"]);
        assert_eq!(keys.check(&HeaderMap::new()), Err(AuthError::Missing));
        assert_eq!(
            keys.check(&headers(&[("authorization", "Bearer nope")])),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            keys.check(&headers(&[("authorization", "Basic alpha")])),
            Err(AuthError::Missing)
        );
        assert!(
            keys.check(&headers(&[("authorization", "bearer alpha")]))
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn trusted_blocks_contain_their_addresses_ipv4_mapped_ones_included() {
        let net = parse_net("10.1.0.0/16").unwrap();
        assert!(is_trusted(&[net], "10.1.200.3".parse().unwrap()));
        assert!(!is_trusted(&[net], "10.2.0.1".parse().unwrap()));
        assert!(is_trusted(&[net], "::ffff:10.1.0.9".parse().unwrap()));
        assert!(is_trusted(&[parse_net("::1").unwrap()], "::1".parse().unwrap()));
        assert!(parse_net("10.0.0.0/33").is_err());
        assert!(parse_net("proxy.local").is_err());
    }

    #[test]
    fn forwarded_hops_with_ports_are_read_and_an_unreadable_hop_ends_the_walk() {
        let proxy = [parse_net("10.0.0.0/8").unwrap()];
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let with = |xff: &str| {
            let mut h = HeaderMap::new();
            h.insert("x-forwarded-for", xff.parse().unwrap());
            client_ip(peer, &h, &proxy)
        };
        assert_eq!(
            with("203.0.113.7:51234"),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            with("[2001:db8::5]:443"),
            "2001:db8::5".parse::<IpAddr>().unwrap()
        );
        // A spoofed hop left of an unreadable one is never the client: the walk stops at the proxy.
        assert_eq!(with("198.51.100.9, unknown"), peer);
        assert_eq!(with("198.51.100.9, 10.0.0.2:80, unknown"), peer);
        assert_eq!(
            with("198.51.100.9, 203.0.113.7:1"),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64_bit_prefix() {
        let a = ClientId::Ip("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = ClientId::Ip("2001:db8:1:2:bbbb::9".parse().unwrap());
        let c = ClientId::Ip("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a.key_part(), b.key_part());
        assert_ne!(a.key_part(), c.key_part());
        assert_eq!(
            ClientId::Ip("::ffff:192.0.2.1".parse().unwrap()).key_part(),
            "ip:192.0.2.1"
        );
    }
}
