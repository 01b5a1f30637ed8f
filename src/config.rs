//! The proxy's configuration: a TOML file (`--config`), overridden by flags.
//! Unknown fields are refused, and `validate` says which field is wrong and why.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::core::optimizer::{OptimizerSet, ALLOWED_OPTIMIZERS};
use crate::core::policy::Cidr;

/// Default redirect listener (DESIGN.md §2: not 15001, Istio owns 15000-15090).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:15301";
/// Default tunnel listener.
pub const DEFAULT_TUNNEL: &str = "0.0.0.0:15302";
/// Default Prometheus endpoint.
pub const DEFAULT_METRICS: &str = "127.0.0.1:9464";
/// Default socket mark that exempts the proxy's own sockets from the redirect;
/// clear of kube-proxy's 0x4000/0x8000, Istio's 1337 and Cilium's 0x0f00 mask.
pub const DEFAULT_MARK: u32 = 0x1000;
/// The mark bits kube-proxy sets on packets (0x4000 masquerade, 0x8000 drop).
const KUBE_PROXY_MARKS: u32 = 0xC000;
/// Default slice: 40,000 float32 parameters (P3's default).
pub const DEFAULT_SLICE_BYTES: u64 = 160_000;
/// Default `split_cost_bytes` where the server's updates compete for the cores with a
/// worker on its host: about 0.5 ms of MXNet server time per slice request at
/// 2.5 Gbit/s, measured on the colocated training benchmark.
pub const DEFAULT_SHARED_COST_BYTES: u64 = 160_000;
/// Default `split_max_requests` (slice requests per server and iteration).
pub const DEFAULT_MAX_REQUESTS: u64 = 2048;
/// Where the journal lives by default (an `emptyDir` in Kubernetes).
pub const DEFAULT_JOURNAL: &str = "/run/p3proxy/journal.jsonl";

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this structure (unknown field, wrong type).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What the TOML reader said, naming the field.
        message: String,
    },
    /// A field has a value that cannot work.
    #[error("invalid `{field}`: {reason}")]
    Invalid {
        /// The field, as written in the file.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

/// How the proxy's own sockets escape the redirect (must match `scripts/redirect`):
/// exactly one of `mark` (`SO_MARK`, needs CAP_NET_ADMIN) or `uid` (the rules exempt
/// the proxy's uid with `-m owner --uid-owner`; no capability needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exempt {
    /// Mark put on every socket the proxy opens.
    pub mark: Option<u32>,
    /// The bits of the packet mark the rules compare (`--mark MARK/MASK`; default: the
    /// mark's own bits), so that marks other software ORs in do not matter.
    pub mask: Option<u32>,
    /// The uid the proxy runs as, exempted by the rules.
    pub uid: Option<u32>,
}

impl Exempt {
    /// Exemption by socket mark.
    pub fn by_mark(mark: u32) -> Exempt {
        Exempt {
            mark: Some(mark),
            mask: None,
            uid: None,
        }
    }

    /// Exemption by owner uid.
    pub fn by_uid(uid: u32) -> Exempt {
        Exempt {
            mark: None,
            mask: None,
            uid: Some(uid),
        }
    }
}

/// Everything `p3proxy run` can be told.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Redirect listener: connections captured by the iptables REDIRECT arrive here.
    pub listen: SocketAddr,
    /// Tunnel listener: peer proxies connect here. `None` disables it.
    pub tunnel: Option<SocketAddr>,
    /// Port of the peer proxies' tunnel listeners.
    pub peer_tunnel_port: u16,
    /// Inbound-capture listener (DESIGN.md §2, for worker hosts that run no proxy):
    /// connections from other hosts to this host's registered ps-lite ports are
    /// redirected here (nat PREROUTING rules the proxy keeps; needs CAP_NET_ADMIN).
    /// `None` (the default): inbound traffic is never captured.
    pub inbound: Option<SocketAddr>,
    /// Prometheus endpoint. `None` disables it.
    pub metrics: Option<SocketAddr>,
    /// Addresses of the cluster: only peers from here may open tunnels.
    pub cluster_cidr: Vec<Cidr>,
    /// Exemption of the proxy's own sockets from the redirect.
    pub exempt: Exempt,
    /// Smallest destination port the redirect captures (documents the rules; see scripts/redirect).
    pub min_port: u16,
    /// The scheduler's port, if known in advance (else learned from its self connection).
    pub scheduler_port: Option<u16>,
    /// Connect timeout when probing a peer's tunnel port, in milliseconds.
    pub probe_timeout_ms: u64,
    /// Deadline for the upstream side of a ZMTP handshake, in milliseconds.
    pub handshake_timeout_ms: u64,
    /// A captured client silent this long is relayed opaquely, in milliseconds.
    pub detect_timeout_ms: u64,
    /// How long a host whose tunnel port did not answer is remembered as proxy-less, in seconds.
    pub no_proxy_ttl_s: u64,
    /// Destination ports relayed opaquely at once, without waiting `detect_timeout_ms`
    /// for a first byte (server-speaks-first protocols: SSH, databases), as linkerd's
    /// `opaque-ports`. Ports the proxy should not see at all are skipped by the
    /// redirect instead (`scripts/redirect install --skip-ports`).
    pub opaque_ports: Vec<u16>,
    /// The host's link rate in bits per second, if known: the live estimate of what an
    /// iteration could save against the ideal bound needs it
    /// (`p3proxy_estimated_saving_seconds`). Unset: no estimate.
    pub link_rate_bps: Option<u64>,
    /// Pace every peer host's tunnel traffic at `link_rate_bps` / workers (issue 27):
    /// the workers' byte streams toward a server stay in step. Needs `link_rate_bps`.
    pub pace: bool,
    /// Static upstream (tests only): every captured connection goes here.
    pub upstream: Option<SocketAddr>,
    /// Priority scheduling (DESIGN.md §5-6): per-class tunnel connections carrying
    /// slices, whole messages in priority order on direct hops. `false`: plain relay.
    pub schedule: bool,
    /// Frame bodies the proxy only passes on (responses, same-host relays) go from
    /// socket to socket with `splice(2)`. `false`: every byte is read in and written out.
    pub splice: bool,
    /// Slice payload between proxies, in bytes (P3's 40,000 float32 parameters).
    pub slice_bytes: u64,
    /// Most bytes the egress scheduler holds before it stops reading from apps.
    pub memory_budget_bytes: u64,
    /// Most unfinished bytes one tunnel session may make the receiving proxy hold.
    pub reassembly_bytes: u64,
    /// DSCP of each priority class (top class first: control, commands, probes).
    pub class_dscp: [u8; 4],
    /// Threads that move bytes (1: a single-threaded runtime).
    pub threads: usize,
    /// Connections served at once (captured, tunnel and inbound together); more wait in
    /// the kernel's accept backlog until one closes.
    pub max_connections: usize,
    /// Where key priorities come from: `learned` (from the traffic), `key` (MXNet key
    /// order), or `map` (`priority_map`, written by scripts/priority-map).
    pub priority: PrioritySource,
    /// The priority map file, for `priority = "map"`.
    pub priority_map: Option<std::path::PathBuf>,
    /// The learned order's shape: 0 is strict layer order; above 0, production order
    /// with the last layers holding this share of the bytes deferred to the end (README,
    /// "The learned order now"). 0 to 1. Unset: 0 on a host where a worker shares a
    /// server's host (measured faster colocated), 0.2 elsewhere.
    pub learned_defer: Option<f64>,
    /// Key splitting in front of local servers (DESIGN.md §7), where it is provably safe.
    pub split: bool,
    /// Smallest slice a split key is cut into, in bytes (rounded down to whole
    /// elements).
    pub split_slice_bytes: u64,
    /// Keys larger than this may be split (default: `split_slice_bytes`).
    pub split_min_bytes: Option<u64>,
    /// Slices are `sqrt(key bytes * split_cost_bytes)` bytes, at least
    /// `split_slice_bytes`: what the link carries while the server handles one slice
    /// request (see README, "Key splitting"). 0: every slice `split_slice_bytes`.
    /// `None`: 160000 where a worker shares the server's host, else 0.
    pub split_cost_bytes: Option<u64>,
    /// Most slice requests per server and iteration (a slice key costs one per worker);
    /// keys past it stay whole (`budget`).
    pub split_max_requests: u64,
    /// How long rank 0's first init push waits for every worker to reach the server
    /// through this proxy before splitting is refused, in milliseconds.
    pub split_hold_ms: u64,
    /// Server-side optimizers under which keys may be split, by class name (`SGD`,
    /// `Adam`, ...): a subset of the built-in allowlist. `None`: the whole allowlist.
    pub split_optimizers: Option<Vec<String>>,
    /// The journal a restarted proxy continues the job from (split layouts, node
    /// table, learned ports). `None`: no journal, and no splitting.
    pub journal: Option<std::path::PathBuf>,
}

/// `priority` in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PrioritySource {
    /// Learned from the traffic (key order until trusted).
    Learned,
    /// MXNet key order.
    Key,
    /// A map file from the model.
    Map,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("valid"),
            tunnel: Some(DEFAULT_TUNNEL.parse().expect("valid")),
            inbound: None,
            peer_tunnel_port: 15302,
            metrics: Some(DEFAULT_METRICS.parse().expect("valid")),
            cluster_cidr: vec![Cidr::ANY_V4],
            exempt: Exempt::by_mark(DEFAULT_MARK),
            min_port: 1024,
            scheduler_port: None,
            probe_timeout_ms: 1000,
            handshake_timeout_ms: 5000,
            detect_timeout_ms: 1000,
            no_proxy_ttl_s: 60,
            opaque_ports: Vec::new(),
            link_rate_bps: None,
            pace: false,
            upstream: None,
            schedule: true,
            splice: true,
            slice_bytes: DEFAULT_SLICE_BYTES,
            // Half the reassembly bound: a peer reserves what this proxy has announced
            // (its queue) plus what it sent of messages not finished yet.
            memory_budget_bytes: 1 << 29,
            reassembly_bytes: 1 << 30,
            class_dscp: [48, 32, 16, 0],
            threads: 1,
            priority: PrioritySource::Learned,
            priority_map: None,
            learned_defer: None,
            split: true,
            split_slice_bytes: DEFAULT_SLICE_BYTES,
            split_min_bytes: None,
            split_cost_bytes: None,
            split_max_requests: DEFAULT_MAX_REQUESTS,
            split_hold_ms: 10_000,
            split_optimizers: None,
            max_connections: 8192,
            journal: Some(DEFAULT_JOURNAL.into()),
        }
    }
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: name.clone(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: name,
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.to_string(),
            })
        };
        if self.cluster_cidr.is_empty() {
            return invalid(
                "cluster_cidr",
                "list at least one CIDR (tunnel peers must come from it)",
            );
        }
        if self.peer_tunnel_port == 0 {
            return invalid("peer_tunnel_port", "must be a port number, not 0");
        }
        if self.min_port == 0 {
            return invalid("min_port", "must be at least 1");
        }
        match (self.exempt.mark, self.exempt.uid) {
            (Some(_), Some(_)) => return invalid("exempt", "set `mark` or `uid`, not both"),
            (None, None) => {
                return invalid(
                    "exempt",
                    "set `mark` or `uid`: the proxy's own sockets must escape the redirect",
                )
            }
            (Some(0), None) => {
                return invalid("exempt.mark", "0 marks nothing; pick a non-zero mark")
            }
            _ => {}
        }
        if let Some(mark) = self.exempt.mark {
            let mask = self.exempt.mask.unwrap_or(mark);
            if mark & KUBE_PROXY_MARKS != 0 || mask & KUBE_PROXY_MARKS != 0 {
                let field = if mark & KUBE_PROXY_MARKS != 0 {
                    "exempt.mark"
                } else {
                    "exempt.mask"
                };
                return invalid(
                    field,
                    "overlaps kube-proxy's packet marks 0x4000/0x8000 (masquerade, drop): pick bits clear of them, e.g. 0x1000",
                );
            }
            if mask == 0 || mark & !mask != 0 {
                return invalid("exempt.mask", "must cover every bit of `mark`");
            }
        } else if self.exempt.mask.is_some() {
            return invalid(
                "exempt.mask",
                "only with `mark` (a uid exemption has no mark)",
            );
        }
        for (field, ms) in [
            ("probe_timeout_ms", self.probe_timeout_ms),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("detect_timeout_ms", self.detect_timeout_ms),
            ("split_hold_ms", self.split_hold_ms),
        ] {
            if ms == 0 || ms > 600_000 {
                return invalid(field, "must be between 1 and 600000 milliseconds");
            }
        }
        if self
            .link_rate_bps
            .is_some_and(|r| !(1_000_000..=10_000_000_000_000).contains(&r))
        {
            return invalid(
                "link_rate_bps",
                "must be between 1 Mbit/s and 10 Tbit/s (1000000 to 10000000000000)",
            );
        }
        if self.pace && self.link_rate_bps.is_none() {
            return invalid(
                "pace",
                "needs link_rate_bps (the rate to share among the workers)",
            );
        }
        if self.opaque_ports.contains(&0) {
            return invalid("opaque_ports", "ports are 1-65535");
        }
        if Some(self.listen) == self.tunnel {
            return invalid("tunnel", "must differ from `listen`");
        }
        if let Some(inbound) = self.inbound {
            let ports = [Some(self.listen), self.tunnel, self.metrics];
            if ports.iter().flatten().any(|a| a.port() == inbound.port()) {
                return invalid(
                    "inbound",
                    "needs a port of its own (not `listen`'s, `tunnel`'s or `metrics`')",
                );
            }
            if inbound.ip().is_loopback() {
                return invalid(
                    "inbound",
                    "must listen on the host address (or 0.0.0.0): a REDIRECT in PREROUTING goes to the receiving interface's address",
                );
            }
            if self.upstream.is_some() {
                return invalid("inbound", "not with `upstream` (static mode)");
            }
        }
        let max_slice = u64::from(crate::core::slice::MAX_SLICE_LEN);
        if !(1024..=max_slice).contains(&self.slice_bytes) {
            return invalid(
                "slice_bytes",
                &format!("must be between 1024 and {max_slice} bytes"),
            );
        }
        if self.memory_budget_bytes < self.slice_bytes {
            return invalid("memory_budget_bytes", "must hold at least one slice");
        }
        if self.reassembly_bytes < self.slice_bytes {
            return invalid("reassembly_bytes", "must hold at least one slice");
        }
        if self.memory_budget_bytes > self.reassembly_bytes / 2 {
            return invalid(
                "memory_budget_bytes",
                "must be at most half of `reassembly_bytes`: a receiving proxy holds what a sender announced (its queue) and what it sent of unfinished messages; keep the same values on every host",
            );
        }
        match (self.priority, &self.priority_map) {
            (PrioritySource::Map, None) => {
                return invalid(
                    "priority_map",
                    "`priority = \"map\"` needs the map file (scripts/priority-map writes it)",
                )
            }
            (PrioritySource::Map, Some(_)) => {
                self.load_priority_map()?;
            }
            (_, Some(_)) => return invalid("priority_map", "given, but `priority` is not \"map\""),
            _ => {}
        }
        if self
            .learned_defer
            .is_some_and(|d| !(0.0..=1.0).contains(&d))
        {
            return invalid(
                "learned_defer",
                "must be between 0 (strict layer order) and 1",
            );
        }
        if !(1024..=1 << 30).contains(&self.split_slice_bytes) {
            return invalid(
                "split_slice_bytes",
                "must be between 1024 and 1073741824 bytes",
            );
        }
        if self
            .split_min_bytes
            .is_some_and(|m| m < self.split_slice_bytes)
        {
            return invalid(
                "split_min_bytes",
                "must be at least `split_slice_bytes` (a smaller key would become one slice)",
            );
        }
        if self.split_cost_bytes.is_some_and(|c| c > 1 << 30) {
            return invalid("split_cost_bytes", "must be at most 1073741824 bytes");
        }
        if self.split_max_requests == 0 {
            return invalid(
                "split_max_requests",
                "must be at least 1 (`split = false` turns splitting off)",
            );
        }
        self.optimizer_set()?;
        if !(16..=1_000_000).contains(&self.max_connections) {
            return invalid("max_connections", "must be between 16 and 1000000");
        }
        if !(1..=64).contains(&self.threads) {
            return invalid("threads", "must be between 1 and 64");
        }
        if let Some(v) = self.class_dscp.iter().find(|&&v| v > 63) {
            return invalid(
                "class_dscp",
                &format!("{v} is not a DSCP value (0-63: six bits)"),
            );
        }
        Ok(())
    }

    /// `probe_timeout_ms` as a duration.
    pub fn probe_timeout(&self) -> Duration {
        Duration::from_millis(self.probe_timeout_ms)
    }
    /// `handshake_timeout_ms` as a duration.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
    /// `detect_timeout_ms` as a duration.
    pub fn detect_timeout(&self) -> Duration {
        Duration::from_millis(self.detect_timeout_ms)
    }
    /// `split_hold_ms` as a duration.
    pub fn split_hold(&self) -> Duration {
        Duration::from_millis(self.split_hold_ms)
    }
    /// `split_optimizers` as a set, or the name that is not allowlisted.
    pub fn optimizer_set(&self) -> Result<OptimizerSet, ConfigError> {
        let Some(names) = &self.split_optimizers else {
            return Ok(OptimizerSet::ALL);
        };
        OptimizerSet::from_names(names.iter().map(String::as_str)).map_err(|name| {
            let known: Vec<&str> = ALLOWED_OPTIMIZERS
                .iter()
                .filter_map(|p| p.rsplit('.').next())
                .collect();
            ConfigError::Invalid {
                field: "split_optimizers",
                reason: format!(
                    "{name:?} is not an optimizer p3proxy has checked to update slices like the whole key; choose from {}",
                    known.join(", ")
                ),
            }
        })
    }
    /// What the splitter is told.
    pub fn split_config(&self) -> crate::core::split::SplitConfig {
        // Few cores alone is no reason for coarse slices: on the 2-core testbed a
        // server's host without a worker trained VGG-19 4% slower with them.
        let (cost_bytes, shared_cost_bytes) = match self.split_cost_bytes {
            Some(c) => (c, c),
            None => (0, DEFAULT_SHARED_COST_BYTES),
        };
        crate::core::split::SplitConfig {
            // A split cannot be undone: only where a restart can continue it.
            enabled: self.split && self.journal.is_some(),
            sizing: crate::core::split::Sizing {
                min_slice: self.split_slice_bytes,
                cost_bytes,
                shared_cost_bytes,
                max_requests: self.split_max_requests,
            },
            min_bytes: self.split_min_bytes.unwrap_or(self.split_slice_bytes),
            // Validated before use; an invalid list splits under no optimizer.
            optimizers: self.optimizer_set().unwrap_or(OptimizerSet::NONE),
            hold: self.split_hold(),
        }
    }
    /// Reads and checks the priority map, if the source is `map`.
    pub fn load_priority_map(
        &self,
    ) -> Result<Option<crate::core::priority::PriorityMap>, ConfigError> {
        let Some(path) = self
            .priority_map
            .as_ref()
            .filter(|_| self.priority == PrioritySource::Map)
        else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        crate::core::priority::PriorityMap::parse(&text)
            .map(Some)
            .map_err(|e| ConfigError::Invalid {
                field: "priority_map",
                reason: format!("{}: {e}", path.display()),
            })
    }

    /// The DSCP of each priority class.
    pub fn class_dscp(&self) -> [crate::core::dscp::Dscp; 4] {
        self.class_dscp
            .map(|v| crate::core::dscp::Dscp::new(v).expect("validated: at most 63"))
    }
    /// The mark to put on the proxy's sockets, if exemption is by mark.
    pub fn mark(&self) -> Option<u32> {
        self.exempt.mark
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_config_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 3, "configs/ holds the examples");
    }

    #[test]
    fn every_invalid_config_fails_with_its_message() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/invalid");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let want = text
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("# expect: "))
                .expect("first line: # expect: MESSAGE");
            let err = Config::load(&path).expect_err("invalid").to_string();
            assert!(
                err.contains(want),
                "{}: {err:?} lacks {want:?}",
                path.display()
            );
            n += 1;
        }
        assert!(n >= 5);
    }

    #[test]
    fn slices_are_coarser_where_a_worker_shares_the_host_or_where_set() {
        let sizing = Config::default().split_config().sizing;
        assert_eq!(
            (sizing.cost_bytes, sizing.shared_cost_bytes),
            (0, DEFAULT_SHARED_COST_BYTES)
        );
        assert_eq!(sizing.min_slice, DEFAULT_SLICE_BYTES);
        assert_eq!(sizing.max_requests, DEFAULT_MAX_REQUESTS);
        let set = Config {
            split_cost_bytes: Some(0),
            ..Config::default()
        }
        .split_config()
        .sizing;
        assert_eq!((set.cost_bytes, set.shared_cost_bytes), (0, 0));
    }
}
