//! Whether the redirect really sends this host's connections to this proxy (`/ready`):
//! a probe connection, without the proxy's exemption mark, to this host's own address
//! in the cluster CIDR on [`PROBE_PORT`]. With the redirect installed it is captured
//! and arrives at the redirect listener, which knows it by its original destination
//! and closes it; without, nothing listens there and the kernel refuses it. The probe
//! never leaves the host. A proxy exempted by uid cannot probe (every socket it opens
//! is exempt): its readiness does not include the redirect.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use super::net;
use crate::config::Config;

/// The port the probe connects to (inside the redirect's default port range, outside
/// the ports it excludes; nothing should listen there).
pub(crate) const PROBE_PORT: u16 = 15309;
/// How long a probe waits to be connected and to arrive.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The redirect check's state, kept by `io::state::Shared`.
#[derive(Debug, Default)]
pub(crate) struct RedirectCheck {
    /// Where the probe goes; `None`: not checked (uid exemption, no address in the CIDR).
    pub(crate) target: Option<SocketAddr>,
    verified: AtomicBool,
    arrived: Notify,
}

impl RedirectCheck {
    /// The check for a proxy with this config on this host.
    pub(crate) fn new(config: &Config) -> RedirectCheck {
        let target = config.exempt.mark.and_then(|_| {
            let ip = local_address_in(config)?;
            Some(SocketAddr::new(ip, PROBE_PORT))
        });
        RedirectCheck {
            target,
            ..RedirectCheck::default()
        }
    }

    /// The redirect is known to reach this proxy (or is not checked).
    pub(crate) fn ok(&self) -> bool {
        self.target.is_none() || self.verified.load(Ordering::Relaxed)
    }

    /// Whether it was verified (`None`: not checked).
    pub(crate) fn verified(&self) -> Option<bool> {
        self.target.map(|_| self.verified.load(Ordering::Relaxed))
    }

    /// A captured connection to `dst`: the probe, if it is its target (then the caller
    /// closes it).
    pub(crate) fn is_probe(&self, dst: SocketAddr) -> bool {
        if self.target != Some(dst) {
            return false;
        }
        self.arrived.notify_waiters();
        true
    }
}

/// This host's first non-loopback IPv4 address inside the cluster CIDR.
fn local_address_in(config: &Config) -> Option<IpAddr> {
    pnet_datalink::interfaces()
        .into_iter()
        .flat_map(|i| i.ips)
        .map(|n| n.ip())
        .find(|ip| {
            ip.is_ipv4() && !ip.is_loopback() && config.cluster_cidr.iter().any(|c| c.contains(*ip))
        })
}

/// Probes every second until the redirect is seen, then every five; logs changes.
pub(crate) async fn watch(check: &RedirectCheck) {
    let Some(target) = check.target else {
        return;
    };
    loop {
        let ok = probe(check, target).await;
        let was = check.verified.swap(ok, Ordering::Relaxed);
        match (was, ok) {
            (false, true) => {
                tracing::info!(probe = %target, "the redirect reaches this proxy: ready")
            }
            (true, false) => {
                tracing::warn!(probe = %target, "the redirect no longer reaches this proxy: not ready")
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_secs(if ok { 5 } else { 1 })).await;
    }
}

async fn probe(check: &RedirectCheck, target: SocketAddr) -> bool {
    let arrived = check.arrived.notified();
    tokio::pin!(arrived);
    arrived.as_mut().enable();
    let Ok(stream) = net::connect(target, None, None, None, PROBE_TIMEOUT).await else {
        return false;
    };
    let seen = tokio::time::timeout(PROBE_TIMEOUT, arrived).await.is_ok();
    drop(stream);
    seen
}
