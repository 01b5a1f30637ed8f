//! A discrete-event simulation of a data-parallel MXNet job through p3proxy (issue 27),
//! over the real sans-IO core: every host's egress is a real [`Scheduler`], and split
//! layouts come from the real [`Sizing`]. No sockets and no clock: time is fabricated,
//! as in quinn's tests, so a run is exactly reproducible and a 64-worker job at
//! 100 Gbit/s takes seconds.
//!
//! What is modelled (topology a of the training benchmark: workers and servers on
//! hosts of their own, one switch):
//! - each worker runs the benchmark's emulated loop (`bench/emulated_job.py`): forward
//!   layer by layer, each waiting for its parameters' last pull; backward from the last
//!   layer, each layer's pushpulls issued when its compute ends;
//! - MXNet's key placement: a key of more than a million elements is spread evenly over
//!   every server, a smaller one goes to server `key * 9973 % servers`;
//! - a host's link has one rate each way; the switch queues each output port FIFO, and
//!   each connection keeps at most `window` bytes in flight (TCP's window), so a host
//!   only sends what the far end can take;
//! - the server's proxy cuts a split key's push into slice requests as its bytes arrive;
//!   the server serves requests one at a time (`ServerCost`), updates a (slice) key once
//!   every worker's push of it is in, and answers every worker; the worker's proxy
//!   merges the slices.
//!
//! Not modelled: TCP's slow start and losses, the proxies' own CPU, DSCP bands.

mod engine;
pub mod profile;

use std::time::Duration;

pub use engine::simulate;
pub use profile::{Profile, ProfileError};

use crate::core::split::Sizing;

/// How each host's egress orders what it sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Order {
    /// Arrival order, whole messages: the job without a proxy (MXNet over ZMQ).
    Direct,
    /// MXNet key order (`p3proxy --priority key`; what MXNet's P3 uses).
    Key,
    /// Strict layer order: the first layer first (`learned` with `learned_defer = 0`).
    Layer,
    /// Production order (FIFO) except the first layers, whose parameters the next
    /// forward needs first: the layers from the input that hold `tail` of the model's
    /// bytes go first, in forward order.
    Tail {
        /// Share of the model's bytes in the tail (0 to 1).
        tail: f64,
    },
    /// Production order (FIFO), except the last layers, whose parameters the next
    /// forward needs last: the layers from the output that hold `tail` of the model's
    /// bytes go after everything else, in forward order, while the next forward runs
    /// the first layers.
    Defer {
        /// Share of the model's bytes deferred (0 to 1).
        tail: f64,
    },
}

impl Order {
    /// Name for reports.
    pub fn label(&self) -> String {
        match self {
            Order::Direct => "direct".into(),
            Order::Key => "key".into(),
            Order::Layer => "layer".into(),
            Order::Tail { tail } => format!("tail{:.0}", tail * 100.0),
            Order::Defer { tail } => format!("defer{:.0}", tail * 100.0),
        }
    }
}

/// What an MXNet server spends per request and per update (one thread serves both).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServerCost {
    /// Per request received.
    pub request: Duration,
    /// Per byte of a request (aggregation).
    pub request_ns_per_byte: f64,
    /// Per update of a (slice) key.
    pub update: Duration,
    /// Per byte updated.
    pub update_ns_per_byte: f64,
}

impl Default for ServerCost {
    /// Fitted to the training benchmark's servers' CPU per iteration (README): about
    /// 0.43 CPU-s for 57 MB of whole keys, and 0.5 ms more per extra slice key.
    fn default() -> Self {
        ServerCost {
            request: Duration::from_micros(50),
            request_ns_per_byte: 2.0,
            update: Duration::from_micros(400),
            update_ns_per_byte: 3.0,
        }
    }
}

/// One simulated job.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Workers.
    pub workers: usize,
    /// Servers.
    pub servers: usize,
    /// Every link's rate, bits per second, each way.
    pub rate_bps: f64,
    /// Compute per iteration (a third forward, two thirds backward, split by FLOPs).
    pub compute: Duration,
    /// Iterations measured, after `warmup`.
    pub iters: usize,
    /// Iterations not measured.
    pub warmup: usize,
    /// The egress order.
    pub order: Order,
    /// Key splitting in front of the servers (`None`: keys stay whole).
    pub split: Option<Sizing>,
    /// The tunnels' slice (bytes the egress hands out at a time).
    pub slice_bytes: u64,
    /// Bytes one connection keeps in flight.
    pub window: u64,
    /// The servers' costs.
    pub server: ServerCost,
    /// Worker `w` starts its first iteration `w * skew` late (0: all at once), to see
    /// whether an order pulls the workers back in step.
    pub skew: Duration,
}

impl SimConfig {
    /// The training benchmark's reference configuration at `workers` x `servers`:
    /// 1 Gbit/s, 300 ms compute, p3proxy's defaults (slices of 160,000 bytes, keys
    /// split uniformly: no worker shares a server's host).
    pub fn reference(workers: usize, servers: usize, order: Order) -> SimConfig {
        SimConfig {
            workers,
            servers,
            rate_bps: 1e9,
            compute: Duration::from_millis(300),
            iters: 10,
            warmup: 2,
            order,
            split: (order != Order::Direct).then(|| Sizing::uniform(160_000)),
            slice_bytes: 160_000,
            window: 1 << 20,
            server: ServerCost::default(),
            skew: Duration::ZERO,
        }
    }
}

/// What a simulated job measured.
#[derive(Debug, Clone, PartialEq)]
pub struct SimReport {
    /// Median iteration time (start to start) over the measured iterations.
    pub iteration: Duration,
    /// Every measured iteration's time.
    pub iterations: Vec<Duration>,
    /// The ideal bound: compute, or the busiest link direction's bytes at line rate.
    pub ideal: Duration,
    /// The same bytes with TCP/IP framing (1448 payload bytes in 1514 on the wire).
    pub wire: Duration,
    /// Requests the servers served per iteration.
    pub requests_per_iter: f64,
}

/// The ideal bound of topology a: the busiest link direction carries every worker's
/// share of a server (`workers * bytes / servers`) or one worker's whole push.
pub fn ideal_bound(
    bytes: u64,
    workers: usize,
    servers: usize,
    rate_bps: f64,
    compute: Duration,
) -> Duration {
    let busiest = (workers as f64 * bytes as f64 / servers as f64).max(bytes as f64);
    compute.max(Duration::from_secs_f64(busiest * 8.0 / rate_bps))
}

/// TCP/IP framing at MTU 1500 with timestamps: payload bytes per wire byte.
pub const WIRE_EFFICIENCY: f64 = 1448.0 / 1514.0;
