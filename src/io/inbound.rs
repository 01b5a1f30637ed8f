//! Inbound capture for unproxied peers (DESIGN.md §2, optional, off by default): where
//! a worker host runs no proxy, this (server) host redirects the TCP connections that
//! arrive for its registered ps-lite ports to the proxy's inbound listener, so that the
//! proxy still sees every request its servers get.
//!
//! The rules live in a nat chain of their own, jumped to from `PREROUTING` for local
//! destinations, one rule per registered address: nothing else that arrives on the host
//! (ssh, NFS, other services) is touched. A port gets its rule when its node's
//! ADD_NODE registration is learned, before that message goes on to the scheduler, so
//! before any peer can know the address; it loses it when the node exits. Needs
//! CAP_NET_ADMIN (iptables).

use std::net::SocketAddr;
use std::process::Command;

/// The chain the rules live in; `scripts/redirect remove` removes it too.
pub(crate) const CHAIN: &str = "P3PROXY_INBOUND";

/// The jump from nat PREROUTING to the chain, for local destinations only.
const JUMP: [&str; 9] = [
    "PREROUTING",
    "-p",
    "tcp",
    "-m",
    "addrtype",
    "--dst-type",
    "LOCAL",
    "-j",
    CHAIN,
];

/// Why the inbound rules could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("iptables {args}: {reason}")]
pub struct InboundError {
    args: String,
    reason: String,
}

/// The `PREROUTING` rules that send registered ports to the inbound listener.
#[derive(Debug)]
pub(crate) struct InboundRules {
    iptables: String,
    to_port: u16,
}

impl InboundRules {
    /// Creates (or empties) the chain and its jump, for a listener on `to_port`.
    pub(crate) fn install(to_port: u16) -> Result<InboundRules, InboundError> {
        let rules = InboundRules {
            iptables: std::env::var("IPTABLES").unwrap_or_else(|_| "iptables".into()),
            to_port,
        };
        if rules.iptables(&["-t", "nat", "-N", CHAIN]).is_err() {
            // It exists (a previous run): start from no rules.
            rules.iptables(&["-t", "nat", "-F", CHAIN])?;
        }
        if rules.iptables(&with(&["-t", "nat", "-C"], &JUMP)).is_err() {
            rules.iptables(&with(&["-t", "nat", "-A"], &JUMP))?;
        }
        Ok(rules)
    }

    /// Sends new connections to `addr` (a registered local node) to the listener.
    pub(crate) fn capture(&self, addr: SocketAddr) -> Result<(), InboundError> {
        let rule = self.rule(addr);
        let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
        if self
            .iptables(&with(&["-t", "nat", "-C", CHAIN], &rule))
            .is_ok()
        {
            return Ok(());
        }
        self.iptables(&with(&["-t", "nat", "-A", CHAIN], &rule))
    }

    /// Stops capturing `addr` (its node exited).
    pub(crate) fn release(&self, addr: SocketAddr) -> Result<(), InboundError> {
        let rule = self.rule(addr);
        let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
        self.iptables(&with(&["-t", "nat", "-D", CHAIN], &rule))
    }

    fn rule(&self, addr: SocketAddr) -> Vec<String> {
        vec![
            "-p".into(),
            "tcp".into(),
            "-d".into(),
            addr.ip().to_string(),
            "--dport".into(),
            addr.port().to_string(),
            "-j".into(),
            "REDIRECT".into(),
            "--to-ports".into(),
            self.to_port.to_string(),
        ]
    }

    /// Removes every rule, the jump and the chain (at shutdown).
    pub(crate) fn remove(&self) {
        while self.iptables(&with(&["-t", "nat", "-D"], &JUMP)).is_ok() {}
        let _ = self.iptables(&["-t", "nat", "-F", CHAIN]);
        let _ = self.iptables(&["-t", "nat", "-X", CHAIN]);
    }

    // A blocking call, made only when a node registers or exits (a few times per job):
    // a rule must be in place before the registration goes on, so it is awaited here.
    fn iptables(&self, args: &[&str]) -> Result<(), InboundError> {
        let err = |reason: String| InboundError {
            args: args.join(" "),
            reason,
        };
        let out = Command::new(&self.iptables)
            .args(["-w", "5"])
            .args(args)
            .output()
            .map_err(|e| err(e.to_string()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()))
        }
    }
}

fn with<'a>(head: &[&'a str], tail: &[&'a str]) -> Vec<&'a str> {
    head.iter().chain(tail).copied().collect()
}
