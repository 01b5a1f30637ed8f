//! Socket helpers and the seams tests replace: original destination, "is this
//! address mine", "is something listening there".

use crate::config::Config;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

use tokio::net::{TcpSocket, TcpStream};

use crate::core::dscp::Dscp;

/// Reads a redirected connection's original destination.
pub type OrigDst = Arc<dyn Fn(&TcpStream) -> io::Result<SocketAddr> + Send + Sync>;

/// The host as the proxy sees it. Production uses [`Env::system`]; tests inject
/// destinations and pretend that some loopback addresses are other hosts.
#[derive(Clone)]
pub struct Env {
    /// Original destination of a captured connection.
    pub orig_dst: OrigDst,
    /// Whether an IP address belongs to this host.
    pub is_local: Arc<dyn Fn(IpAddr) -> bool + Send + Sync>,
    /// Whether a TCP socket listens at this address on this host.
    pub is_listening: Arc<dyn Fn(SocketAddr) -> bool + Send + Sync>,
    /// Whether an address is loopback (tests use 127.0.0.2 and up as other hosts).
    pub is_loopback: Arc<dyn Fn(IpAddr) -> bool + Send + Sync>,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Env")
    }
}

impl Env {
    /// The real host: `SO_ORIGINAL_DST`, local addresses by trying to bind them,
    /// listening sockets from `/proc/net/tcp{,6}`.
    pub fn system() -> Env {
        Env {
            orig_dst: Arc::new(original_dst),
            is_local: Arc::new(is_local_address),
            is_listening: Arc::new(is_listening),
            is_loopback: Arc::new(|ip: IpAddr| ip.is_loopback()),
        }
    }

    /// Every captured connection "was" to `upstream` (static mode, tests only).
    pub fn with_static_upstream(mut self, upstream: SocketAddr) -> Env {
        self.orig_dst = Arc::new(move |_| Ok(upstream));
        self
    }
}

/// `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6) of a redirected connection.
pub(crate) fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = if stream.local_addr()?.is_ipv4() {
        sock.original_dst_v4()?
    } else {
        sock.original_dst_v6()?
    };
    addr.as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "original destination is not IP"))
}

/// Whether `ip` is an address of this host: binding to it succeeds only then.
pub(crate) fn is_local_address(ip: IpAddr) -> bool {
    !ip.is_unspecified() && std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Whether a TCP socket listens at `addr` (or on the wildcard address with its port).
pub(crate) fn is_listening(addr: SocketAddr) -> bool {
    let files: &[&str] = if addr.is_ipv4() {
        &["/proc/net/tcp", "/proc/net/tcp6"]
    } else {
        &["/proc/net/tcp6"]
    };
    files
        .iter()
        .any(|f| std::fs::read_to_string(f).is_ok_and(|text| listening_in(&text, addr)))
}

/// Parses `/proc/net/tcp` text: is there a LISTEN (state 0A) socket for `addr`?
fn listening_in(text: &str, addr: SocketAddr) -> bool {
    text.lines().skip(1).any(|line| {
        let mut cols = line.split_whitespace();
        let (Some(local), Some(_), Some(state)) = (cols.nth(1), cols.next(), cols.next()) else {
            return false;
        };
        let Some((ip_hex, port_hex)) = local.split_once(':') else {
            return false;
        };
        if state != "0A" || u16::from_str_radix(port_hex, 16).ok() != Some(addr.port()) {
            return false;
        }
        match (ip_hex.len(), addr.ip()) {
            (8, IpAddr::V4(ip)) => {
                let raw = u32::from_str_radix(ip_hex, 16).unwrap_or(1);
                // The kernel prints the address in host byte order (little endian here).
                let listen = std::net::Ipv4Addr::from(raw.swap_bytes());
                listen.is_unspecified() || listen == ip
            }
            (32, _) => ip_hex.chars().all(|c| c == '0'), // a v6 wildcard also takes v4
            _ => false,
        }
    })
}

/// Unsent bytes a proxy socket may queue in the kernel before it stops reporting
/// writable (`TCP_NOTSENT_LOWAT`): a bit under one 160 KB slice, so that what the
/// scheduler picks next is never stuck behind a deep kernel queue.
pub(crate) const NOTSENT_LOWAT: u32 = 128 * 1024;

/// Opens a TCP connection from the proxy: marked so the redirect lets it pass,
/// optionally from `source` (opaque relays keep the app's source address), with a
/// fixed DSCP for the whole connection if `dscp` is given.
pub(crate) async fn connect(
    dst: SocketAddr,
    mark: Option<u32>,
    source: Option<IpAddr>,
    dscp: Option<Dscp>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(mark) = mark {
        socket2::SockRef::from(&socket).set_mark(mark)?;
    }
    if let Some(dscp) = dscp {
        set_dscp(&socket2::SockRef::from(&socket), dst.is_ipv4(), dscp)?;
    }
    if let Some(src) = source {
        socket.bind(SocketAddr::new(src, 0))?;
    }
    // The scheduler, not the kernel's send queue, must decide what goes next.
    socket2::SockRef::from(&socket).set_tcp_notsent_lowat(NOTSENT_LOWAT)?;
    let stream = tokio::time::timeout(timeout, socket.connect(dst))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {dst} timed out"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sets the DSCP of every packet a socket sends (never changed afterwards: one
/// connection, one class).
pub(crate) fn set_dscp(sock: &socket2::SockRef<'_>, ipv4: bool, dscp: Dscp) -> io::Result<()> {
    if ipv4 {
        sock.set_tos_v4(dscp.tos())
    } else {
        sock.set_tclass_v6(dscp.tos())
    }
}

/// The listeners of one proxy, bound (port 0 allowed) before `run`.
#[derive(Debug)]
pub struct Bound {
    /// Redirect listener.
    pub redirect: TcpListener,
    /// Tunnel listener, if any.
    pub tunnel: Option<TcpListener>,
    /// Inbound-capture listener, if any.
    pub inbound: Option<TcpListener>,
}

impl Bound {
    /// Binds the listeners of `config`.
    pub async fn bind(config: &Config) -> std::io::Result<Bound> {
        let redirect = TcpListener::bind(config.listen).await?;
        let tunnel = match config.tunnel {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        let inbound = match config.inbound {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        Ok(Bound {
            redirect,
            tunnel,
            inbound,
        })
    }

    /// The addresses actually bound.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        let mut v = vec![self.redirect.local_addr().expect("bound")];
        for l in self.tunnel.iter().chain(&self.inbound) {
            v.push(l.local_addr().expect("bound"));
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3BCD 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0
   2: 0100007F:9C40 0100007F:3BCD 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 100 0 0 10 0";

    #[test]
    fn proc_net_tcp_listeners() {
        assert!(listening_in(PROC, "127.0.0.1:15309".parse().unwrap()));
        assert!(!listening_in(PROC, "10.0.0.1:15309".parse().unwrap()));
        assert!(listening_in(PROC, "10.0.0.1:8080".parse().unwrap()));
        assert!(
            !listening_in(PROC, "127.0.0.1:40000".parse().unwrap()),
            "established, not listening"
        );
    }

    #[tokio::test]
    async fn proxy_sockets_keep_a_short_kernel_queue() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let s = connect(addr, None, None, Some(Dscp::CS6), Duration::from_secs(1))
            .await
            .unwrap();
        let sock = socket2::SockRef::from(&s);
        assert_eq!(sock.tcp_notsent_lowat().unwrap(), NOTSENT_LOWAT);
        assert_eq!(sock.tos_v4().unwrap(), 0xc0);
    }

    #[test]
    fn loopback_is_local() {
        assert!(is_local_address("127.0.0.1".parse().unwrap()));
        assert!(!is_local_address("0.0.0.0".parse().unwrap()));
    }
}
