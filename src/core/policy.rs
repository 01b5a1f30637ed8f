//! What may be relayed where (DESIGN.md §2): loop refusal, tunnel admission,
//! the route of a captured connection, and what a failed tunnel probe means.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::{Duration, Instant};

/// An IP network, e.g. `10.0.0.0/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Every IPv4 address.
    pub const ANY_V4: Cidr = Cidr {
        addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        prefix: 0,
    };

    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not ADDRESS/PREFIX"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{addr}` is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("prefix `{prefix}` is not 0..={max}"))?;
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a connection was refused; also the `reason` label of
/// `p3proxy_connections_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// `SO_ORIGINAL_DST` could not be read (not a redirected connection).
    #[error("original destination unreadable")]
    NoOriginalDst,
    /// The destination is one of the proxy's own listeners: a loop.
    #[error("destination is the proxy itself (loop)")]
    Loop,
    /// A tunnel peer from outside the cluster CIDR.
    #[error("tunnel peer outside the cluster CIDR")]
    PeerNotInCidr,
    /// Bytes at the tunnel port that are not our preamble.
    #[error("not a p3proxy tunnel preamble")]
    BadPreamble,
    /// A tunnel asking for a port no local node registered.
    #[error("target port not registered by a local node")]
    Unregistered,
    /// A tunnel asking for a loopback address.
    #[error("target is a loopback address")]
    Loopback,
    /// A tunnel asking for an address this host does not have.
    #[error("target is not an address of this host")]
    NotLocal,
    /// A tunnel asking for one of the proxy's own ports.
    #[error("target is a port of the proxy itself")]
    OwnPort,
    /// A peer that ran a proxy during this job did not answer: never bypass it.
    #[error("peer proxy unreachable and it must not be bypassed")]
    ProxyNotBypassed,
    /// The upstream connection or handshake failed.
    #[error("upstream unreachable")]
    UpstreamFailed,
    /// The upstream handshake did not finish in time.
    #[error("upstream handshake timed out")]
    HandshakeTimeout,
    /// The app broke ZMTP during the handshake.
    #[error("downstream handshake failed")]
    DownstreamHandshake,
}

impl Refusal {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::NoOriginalDst => "no_original_dst",
            Refusal::Loop => "loop",
            Refusal::PeerNotInCidr => "peer_not_in_cidr",
            Refusal::BadPreamble => "bad_preamble",
            Refusal::Unregistered => "unregistered_target",
            Refusal::Loopback => "loopback_target",
            Refusal::NotLocal => "non_local_target",
            Refusal::OwnPort => "own_port",
            Refusal::ProxyNotBypassed => "proxy_not_bypassed",
            Refusal::UpstreamFailed => "upstream_failed",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::DownstreamHandshake => "downstream_handshake",
        }
    }
}

/// Where a captured ZMTP connection goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The destination is on this host: straight to its port, never through our own tunnel.
    SameHost,
    /// Try the destination host's proxy.
    Tunnel,
    /// The host is known to run no proxy: straight to the destination.
    Direct,
}

/// What to do when the destination host's tunnel port does not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeFailed {
    /// No proxy there: go straight to the destination.
    Direct,
    /// A proxy ran there during this job: close downstream without READY, let libzmq retry.
    Refuse,
}

/// The relay policy of one proxy.
#[derive(Debug)]
pub struct Policy {
    /// The proxy's own listening addresses (an unspecified IP means every local one).
    own: Vec<SocketAddr>,
    /// Networks tunnel peers may come from.
    cluster: Vec<Cidr>,
    /// ROUTER addresses that local nodes registered with the scheduler.
    registered: HashSet<SocketAddr>,
    /// The scheduler's port on this host, configured or learned.
    scheduler_port: Option<u16>,
    /// Hosts where a proxy answered during this job.
    proxy_seen: HashSet<IpAddr>,
    /// Destinations whose proxy holds split keys.
    pinned: HashSet<SocketAddr>,
    /// Hosts whose tunnel port did not answer, until when.
    no_proxy_until: HashMap<IpAddr, Instant>,
    no_proxy_ttl: Duration,
}

impl Policy {
    /// A policy for a proxy listening on `own`, accepting tunnel peers from `cluster`.
    pub fn new(
        own: Vec<SocketAddr>,
        cluster: Vec<Cidr>,
        scheduler_port: Option<u16>,
        no_proxy_ttl: Duration,
    ) -> Policy {
        Policy {
            own,
            cluster,
            registered: HashSet::new(),
            scheduler_port,
            proxy_seen: HashSet::new(),
            pinned: HashSet::new(),
            no_proxy_until: HashMap::new(),
            no_proxy_ttl,
        }
    }

    /// Whether `dst` (on a host where `dst_is_local`) is one of our own listeners.
    pub fn is_own(&self, dst: SocketAddr, dst_is_local: bool) -> bool {
        self.own.iter().any(|o| {
            o.port() == dst.port()
                && (o.ip() == dst.ip() || (o.ip().is_unspecified() && dst_is_local))
        })
    }

    /// Checks a captured connection's original destination.
    pub fn check_captured(&self, dst: SocketAddr, dst_is_local: bool) -> Result<(), Refusal> {
        if self.is_own(dst, dst_is_local) {
            return Err(Refusal::Loop);
        }
        Ok(())
    }

    /// The first route to try for a captured ZMTP connection.
    pub fn route(&mut self, dst: SocketAddr, dst_is_local: bool, now: Instant) -> Route {
        if dst_is_local {
            return Route::SameHost;
        }
        match self.no_proxy_until.get(&dst.ip()) {
            Some(&until) if now < until && !self.proxy_seen.contains(&dst.ip()) => Route::Direct,
            Some(_) => {
                self.no_proxy_until.remove(&dst.ip());
                Route::Tunnel
            }
            None => Route::Tunnel,
        }
    }

    /// The tunnel port of `dst`'s host did not answer.
    pub fn probe_failed(&mut self, dst: SocketAddr, now: Instant) -> ProbeFailed {
        if self.proxy_seen.contains(&dst.ip()) || self.pinned.contains(&dst) {
            return ProbeFailed::Refuse;
        }
        self.no_proxy_until
            .insert(dst.ip(), now + self.no_proxy_ttl);
        ProbeFailed::Direct
    }

    /// A proxy answered on `dst`'s host (`pinned`: it holds split keys for `dst`).
    pub fn proxy_answered(&mut self, dst: SocketAddr, pinned: bool) {
        self.proxy_seen.insert(dst.ip());
        self.no_proxy_until.remove(&dst.ip());
        if pinned {
            self.pinned.insert(dst);
        }
    }

    /// Hosts where a proxy was seen (to journal).
    pub fn proxy_seen(&self) -> impl Iterator<Item = &IpAddr> {
        self.proxy_seen.iter()
    }

    /// Decides a tunnel request from `peer` for `target` on this host.
    pub fn admit(
        &self,
        peer: IpAddr,
        target: SocketAddr,
        target_is_local: bool,
        target_is_loopback: bool,
    ) -> Result<(), Refusal> {
        if !self.cluster.iter().any(|c| c.contains(peer)) {
            return Err(Refusal::PeerNotInCidr);
        }
        if target_is_loopback {
            return Err(Refusal::Loopback);
        }
        if !target_is_local {
            return Err(Refusal::NotLocal);
        }
        if self.is_own(target, true) {
            return Err(Refusal::OwnPort);
        }
        if self.registered.contains(&target) || self.scheduler_port == Some(target.port()) {
            return Ok(());
        }
        Err(Refusal::Unregistered)
    }

    /// Records a local node's ROUTER address from its ADD_NODE registration. The
    /// caller checked that the address is local, not loopback, and listening.
    pub fn register(&mut self, addr: SocketAddr) -> Result<bool, Refusal> {
        if addr.port() < 1024 {
            return Err(Refusal::Unregistered);
        }
        if self.is_own(addr, true) {
            return Err(Refusal::OwnPort);
        }
        Ok(self.registered.insert(addr))
    }

    /// The registered local node addresses.
    pub fn registered(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.registered.iter().copied()
    }

    /// Forgets a node that exited.
    pub fn forget(&mut self, addr: SocketAddr) -> bool {
        self.registered.remove(&addr)
    }

    /// Learns the scheduler's port from its connection to itself (`ps1` to a local address).
    pub fn learn_scheduler(&mut self, port: u16) -> bool {
        if self.scheduler_port == Some(port) {
            return false;
        }
        self.scheduler_port = Some(port);
        true
    }

    /// The scheduler port, if known.
    pub fn scheduler_port(&self) -> Option<u16> {
        self.scheduler_port
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn policy() -> Policy {
        Policy::new(
            vec![addr("127.0.0.1:15301"), addr("0.0.0.0:15302")],
            vec!["10.77.0.0/16".parse().unwrap()],
            None,
            Duration::from_secs(60),
        )
    }

    #[test]
    fn cidr_contains() {
        let c: Cidr = "10.77.0.0/16".parse().unwrap();
        assert!(c.contains("10.77.3.4".parse().unwrap()));
        assert!(!c.contains("10.78.0.1".parse().unwrap()));
        assert!(Cidr::ANY_V4.contains("1.2.3.4".parse().unwrap()));
        assert_eq!(
            "10.0.0.0/33".parse::<Cidr>().unwrap_err(),
            "prefix `33` is not 0..=32"
        );
        assert!("10.0.0.0".parse::<Cidr>().is_err());
    }

    #[test]
    fn loops_are_refused() {
        let p = policy();
        assert_eq!(
            p.check_captured(addr("127.0.0.1:15301"), true),
            Err(Refusal::Loop)
        );
        assert_eq!(
            p.check_captured(addr("10.77.0.11:15302"), true),
            Err(Refusal::Loop)
        );
        assert_eq!(p.check_captured(addr("10.77.0.12:15302"), false), Ok(()));
        assert_eq!(p.check_captured(addr("10.77.0.11:40000"), true), Ok(()));
    }

    #[test]
    fn admission_needs_cidr_registration_and_a_local_address() {
        let mut p = policy();
        let peer: IpAddr = "10.77.0.12".parse().unwrap();
        let target = addr("10.77.0.11:40000");
        assert_eq!(
            p.admit("192.168.1.1".parse().unwrap(), target, true, false),
            Err(Refusal::PeerNotInCidr)
        );
        assert_eq!(
            p.admit(peer, target, true, false),
            Err(Refusal::Unregistered)
        );
        assert_eq!(
            p.admit(peer, addr("127.0.0.1:40000"), true, true),
            Err(Refusal::Loopback)
        );
        assert_eq!(
            p.admit(peer, addr("10.77.0.11:15302"), true, false),
            Err(Refusal::OwnPort)
        );
        assert_eq!(
            p.admit(peer, addr("10.77.0.99:40000"), false, false),
            Err(Refusal::NotLocal)
        );
        assert_eq!(p.register(target), Ok(true));
        assert_eq!(p.admit(peer, target, true, false), Ok(()));
        assert_eq!(
            p.admit(peer, addr("10.77.0.11:40001"), true, false),
            Err(Refusal::Unregistered)
        );
        assert!(p.forget(target));
        assert_eq!(
            p.admit(peer, target, true, false),
            Err(Refusal::Unregistered)
        );
        assert_eq!(
            p.register(addr("10.77.0.11:80")),
            Err(Refusal::Unregistered)
        );
        p.learn_scheduler(29091);
        assert_eq!(p.admit(peer, addr("10.77.0.11:29091"), true, false), Ok(()));
    }

    #[test]
    fn a_host_that_ran_a_proxy_is_never_bypassed() {
        let mut p = policy();
        let t0 = Instant::now();
        let dst = addr("10.77.0.12:40000");
        assert_eq!(p.route(dst, true, t0), Route::SameHost);
        assert_eq!(p.route(dst, false, t0), Route::Tunnel);
        assert_eq!(p.probe_failed(dst, t0), ProbeFailed::Direct);
        assert_eq!(
            p.route(dst, false, t0 + Duration::from_secs(1)),
            Route::Direct
        );
        assert_eq!(
            p.route(dst, false, t0 + Duration::from_secs(61)),
            Route::Tunnel
        );
        p.proxy_answered(dst, false);
        assert_eq!(p.probe_failed(dst, t0), ProbeFailed::Refuse);
        assert_eq!(p.route(dst, false, t0), Route::Tunnel);
    }
}
