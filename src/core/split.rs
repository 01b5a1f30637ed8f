//! Key splitting in front of a local server (DESIGN.md §7), sans-IO.
//!
//! A split cannot be undone (the server never holds the original key), so the
//! [`Splitter`] splits only with full history of the server: it saw the server
//! register, every worker of the node table reaches the server through this proxy,
//! sync mode came before the first init, no compression, no ACKs, no unknown command,
//! no fence, and the server-side optimizer is absent or allowlisted. Each big dense
//! key is decided at its init push; later requests for a split key become one request
//! per slice key, and their responses merge back into the one response the server
//! would have sent. Anything a layout cannot serve stops the server's traffic with a
//! [`Failure`]: a job that stops loudly beats one that trains on wrong values.
//!
//! The IO shell feeds messages in and writes what comes out; events (splits,
//! refusals, failures) are polled from [`Splitter::poll_event`], quinn style.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;

use bytes::Bytes;
use p3proxy_parsers::mxnet::{CommandType, DataHandleType, RequestType, ServerRanges};
use p3proxy_parsers::pslite::{ControlCommand, Meta, Role};
use p3proxy_parsers::zmtp::FrameHeader;

use super::optimizer::{optimizer_verdict_in, OptimizerSet};
use super::order::{Awaited, HoldReason, RequestOrder};
use super::slice::Part;
use super::topology::NodeInfo;

/// Slice keys start here above their server's range begin: the server reads
/// `int(key - begin)`, a negative int no real MXNet key has.
pub const SLICE_KEY_BASE: u64 = 1 << 31;
/// Most slice keys one server may get (they must stay negative ints).
pub const MAX_SLICE_KEYS: u64 = 1 << 31;
/// Most requests tracked at once (split requests awaiting slice responses, and
/// forwarded requests awaiting theirs); more is not a real job.
pub const MAX_TRACKED: usize = 1 << 20;

/// (server id, worker id, customer id, timestamp): one request and its response.
pub type Correlation = (i32, i32, i32, i32);

/// Why splitting is refused for a server's keys (metric label via [`Refusal::label`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// A worker of the node table does not reach the server through this proxy.
    WorkerNotProxied,
    /// This proxy did not see the server register.
    HistoryIncomplete,
    /// No node table (the scheduler's host runs no proxy).
    NoNodeTable,
    /// The first init came before `kSyncMode`.
    NotSyncMode,
    /// Gradient compression is on.
    Compression,
    /// ps-lite ACKs (`PS_RESEND`): duplicate detection keys on timestamps.
    Resend,
    /// A command MXNet 1.9.1 does not send.
    UnknownCommand,
    /// A message that is not ps-lite went to the server.
    NotPslite,
    /// The optimizer is not allowlisted (label from [`OptimizerRefusal`]).
    ///
    /// [`OptimizerRefusal`]: super::optimizer::OptimizerRefusal
    Optimizer(&'static str),
    /// The init push is not one dense key with one length (row-sparse, compressed,
    /// several keys, an unknown dtype).
    NotDense,
    /// This proxy restarted: it continues the journaled layouts and splits nothing new.
    Restarted,
}

impl Refusal {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::WorkerNotProxied => "worker_not_proxied",
            Refusal::HistoryIncomplete => "history_incomplete",
            Refusal::NoNodeTable => "no_node_table",
            Refusal::NotSyncMode => "not_sync_mode",
            Refusal::Compression => "compression",
            Refusal::Resend => "resend",
            Refusal::UnknownCommand => "unknown_command",
            Refusal::NotPslite => "not_pslite",
            Refusal::Optimizer(label) => label,
            Refusal::NotDense => "not_dense",
            Refusal::Restarted => "restarted",
        }
    }
}

/// A request or response the split layout cannot serve: the server's traffic stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The server's address.
    pub server: SocketAddr,
    /// The ps-lite key concerned, if one.
    pub key: Option<u64>,
    /// Metric label.
    pub reason: &'static str,
    /// What happened, for the log.
    pub detail: String,
}

/// What the splitter reports for the shell to log and count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitEvent {
    /// A key was split.
    Split {
        /// The server's address.
        server: SocketAddr,
        /// Its layout.
        layout: Layout,
        /// Slice keys the server has handed out now (for the journal).
        next_slice: u64,
    },
    /// A key above the threshold stays whole (reported once per key).
    Refused {
        /// The server's address.
        server: SocketAddr,
        /// The ps-lite key.
        key: u64,
        /// Why.
        reason: Refusal,
    },
    /// The server's traffic stops (reported once per server).
    Failed(Failure),
}

/// How one big key is stored on its server: `count` slice keys from `first`, each
/// `slice` bytes but the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    /// The original ps-lite key.
    pub key: u64,
    /// The `head` of its init push (dtype; dense).
    pub head: i32,
    /// Bytes of the whole value.
    pub total: u64,
    /// Bytes per slice (a multiple of the element size).
    pub slice: u64,
    /// ps-lite key of the first slice.
    pub first: u64,
    /// Number of slices.
    pub count: u32,
}

impl Layout {
    /// Byte range of slice `i` in the whole value.
    pub fn range(&self, i: u32) -> (u64, u64) {
        let off = u64::from(i) * self.slice;
        (off, self.slice.min(self.total - off))
    }

    /// Index of a slice key.
    pub fn index_of(&self, ps_key: u64) -> Option<u32> {
        let i = ps_key.checked_sub(self.first)?;
        (i < u64::from(self.count)).then_some(i as u32)
    }
}

/// A message body as zero-copy pieces (a frame's bytes may span several).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pieces {
    /// The pieces, in order.
    pub parts: Vec<Bytes>,
    /// Their total length.
    pub len: u64,
}

impl Pieces {
    /// One piece.
    pub fn one(b: Bytes) -> Pieces {
        Pieces {
            len: b.len() as u64,
            parts: vec![b],
        }
    }

    /// Bytes `off..off + n`, zero-copy.
    pub fn range(&self, off: u64, n: u64) -> Vec<Bytes> {
        byte_range(&self.parts, off, n)
    }

    /// The bytes as little-endian words of `N` bytes (keys: u64, lens: i32), if they
    /// divide evenly.
    pub fn le_words<const N: usize, T>(&self, word: fn([u8; N]) -> T) -> Option<Vec<T>> {
        let bytes = self.to_vec();
        (bytes.len() % N == 0).then(|| {
            bytes
                .chunks_exact(N)
                .map(|c| word(c.try_into().expect("N bytes")))
                .collect()
        })
    }

    /// The bytes, copied (small frames: keys, lens).
    pub fn to_vec(&self) -> Vec<u8> {
        self.parts.iter().flat_map(|p| p.iter().copied()).collect()
    }
}

/// Bytes `off..off + n` of the message held as `parts`, zero-copy.
pub fn byte_range(parts: &[Bytes], mut off: u64, n: u64) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut left = n;
    for p in parts {
        if left == 0 {
            break;
        }
        let len = p.len() as u64;
        if off >= len {
            off -= len;
            continue;
        }
        let take = left.min(len - off);
        out.push(p.slice(off as usize..(off + take) as usize));
        left -= take;
        off = 0;
    }
    out
}

/// The wire encoding of a message whose frames are given as pieces: libzmq's header
/// forms (long above 255 bytes), MORE on all but the last.
pub fn encode_message(frames: &[Pieces]) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(frames.len() * 2);
    for (i, f) in frames.iter().enumerate() {
        let mut header = Vec::with_capacity(9);
        FrameHeader::canonical(f.len, i + 1 < frames.len(), false).encode_into(&mut header);
        out.push(Bytes::from(header));
        out.extend(f.parts.iter().filter(|p| !p.is_empty()).cloned());
    }
    out
}

/// A data request going to a server, as the splitter needs to see it.
#[derive(Debug, Clone)]
pub struct DataRequest<'a> {
    /// Its meta.
    pub meta: &'a Meta,
    /// The meta frame as received (slice requests carry it unchanged).
    pub meta_frame: &'a Bytes,
    /// Keys (u64 LE).
    pub keys: &'a [u64],
    /// The vals frame.
    pub vals: &'a Pieces,
    /// Lens (i32 LE), if the frame is there.
    pub lens: Option<&'a [i32]>,
}

/// The keys of a request that name stored values: MXNet's row-sparse requests carry
/// the key then one key per row (`begin + key + row`, which may equal another key),
/// compressed pushes a dummy size key then the key (PROTOCOL.md §6).
fn real_keys(head: i32, keys: &[u64]) -> &[u64] {
    match DataHandleType::from_head(head).map(|h| h.request_type) {
        Some(RequestType::RowSparse) => &keys[..keys.len().min(1)],
        Some(RequestType::Compressed) if keys.len() == 2 => &keys[1..],
        _ => keys,
    }
}

/// What to do with a request to a local server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestPlan {
    /// Forward it unchanged.
    Forward,
    /// Rank 0's first init push waits until every worker reaches the server through
    /// this proxy (ask again; `waited` once the deadline passed).
    Hold,
    /// The server could serve it out of order (see [`crate::core::order`]): ask
    /// again once [`Splitter::take_released`] says something it waited for went.
    Behind(HoldReason),
    /// Send these messages (one per slice key) instead, as wire pieces.
    Split(Vec<Vec<Bytes>>),
    /// The server's traffic stops.
    Stop(Failure),
}

/// What to do with a data response from a local server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponsePlan {
    /// Forward it unchanged.
    Forward,
    /// A slice response, held for the merge.
    Absorb,
    /// The merged response, as wire pieces, instead of the last slice response.
    Merged {
        /// The original key (its priority is the response's).
        key: u64,
        /// Wire pieces.
        pieces: Vec<Bytes>,
    },
    /// Forward this slice response as a part for the peer proxy to merge.
    Part(Part),
    /// The server's traffic stops.
    Stop(Failure),
}

/// What to do with a request whose bytes still arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadPlan {
    /// Wait for the whole message.
    Whole,
    /// Send its slice requests as their bytes arrive (`slice_request`), then
    /// `finish_streamed`.
    Stream(Layout),
    /// The server's traffic stops.
    Stop(Failure),
}

/// Tunables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitConfig {
    /// Splitting on at all.
    pub enabled: bool,
    /// Bytes per slice key (rounded down to whole elements).
    pub slice_bytes: u64,
    /// Keys larger than this many bytes are split.
    pub min_bytes: u64,
    /// Server-side optimizers under which keys may be split.
    pub optimizers: OptimizerSet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyState {
    Whole,
    Split(Layout),
}

/// One server this proxy fronts.
#[derive(Debug, Default)]
struct ServerState {
    /// Its id from the node table.
    id: Option<i32>,
    /// Open request connections into it, by worker id.
    workers: HashMap<i32, u32>,
    sync_mode: bool,
    /// The first init push was decided.
    first_init: bool,
    /// Reasons that forbid splitting any key of this server.
    blockers: Vec<Refusal>,
    /// The verdict of the last optimizer seen (class path).
    optimizer: Option<String>,
    keys: HashMap<u64, KeyState>,
    /// Slice keys handed out.
    next_slice: u64,
    /// Number of split keys (pinned when > 0).
    split: usize,
    /// Restored from the journal after a restart: no new split.
    restored: bool,
    /// A request for a key never initialized waited its whole deadline: this job does
    /// not initialize as MXNet does (rank 0 first), so such requests no longer wait
    /// (one deadline per server, not one per key).
    init_wait_expired: bool,
    failed: Option<Failure>,
}

/// A forwarded request awaiting its response.
#[derive(Debug)]
struct Outstanding {
    /// Copies forwarded (a ps-lite resend repeats the correlation).
    count: u32,
    /// What later requests wait for until its (first) answer.
    awaited: Option<Awaited>,
}

/// The split decisions and the requests in flight of every local server.
#[derive(Debug)]
pub struct Splitter {
    config: SplitConfig,
    /// Local servers this proxy saw register, by address.
    servers: HashMap<SocketAddr, ServerState>,
    /// Server id -> address, for local servers.
    ids: HashMap<i32, SocketAddr>,
    /// Worker ids of the node table.
    workers: Option<Vec<i32>>,
    /// Number of servers (key ranges).
    num_servers: u64,
    pending: HashMap<Correlation, Merge>,
    /// Forwarded requests awaiting their response.
    outstanding: HashMap<Correlation, Outstanding>,
    /// The request-order rules (see [`RequestPlan::Behind`]).
    order: RequestOrder,
    refused_logged: HashSet<(SocketAddr, u64)>,
    events: VecDeque<SplitEvent>,
}

impl Splitter {
    /// A splitter with nothing seen yet.
    pub fn new(config: SplitConfig) -> Splitter {
        Splitter {
            config,
            servers: HashMap::new(),
            ids: HashMap::new(),
            workers: None,
            num_servers: 0,
            pending: HashMap::new(),
            outstanding: HashMap::new(),
            order: RequestOrder::new(),
            refused_logged: HashSet::new(),
            events: VecDeque::new(),
        }
    }

    /// The next event to log and count.
    pub fn poll_event(&mut self) -> Option<SplitEvent> {
        self.events.pop_front()
    }

    /// A local server registered with the scheduler through this proxy: a new
    /// server process (a new job), whatever was known of that address before.
    pub fn server_registered(&mut self, addr: SocketAddr) {
        if let Some(id) = self.servers.get(&addr).and_then(|s| s.id) {
            self.forget_server(id);
        }
        self.servers.insert(addr, ServerState::default());
        self.bind_ids();
    }

    /// A local server exited.
    pub fn server_exited(&mut self, addr: SocketAddr) {
        if let Some(id) = self.servers.remove(&addr).and_then(|s| s.id) {
            self.forget_server(id);
        }
    }

    /// A layout from the journal of this proxy's previous run: its key goes on being
    /// split; no other key of that server will be.
    pub fn restore(&mut self, server: SocketAddr, layout: Layout, next_slice: u64) {
        let s = self.servers.entry(server).or_default();
        s.restored = true;
        s.first_init = true;
        if s.keys.insert(layout.key, KeyState::Split(layout)).is_none() {
            s.split += 1;
        }
        s.next_slice = s.next_slice.max(next_slice);
        self.bind_ids();
    }

    /// The scheduler's node table.
    pub fn node_table(&mut self, nodes: &[NodeInfo]) {
        self.workers = Some(
            nodes
                .iter()
                .filter(|n| n.role == Role::Worker)
                .map(|n| n.id)
                .collect(),
        );
        self.num_servers = nodes.iter().filter(|n| n.role == Role::Server).count() as u64;
        self.ids.clear();
        for n in nodes.iter().filter(|n| n.role == Role::Server) {
            if let Some(addr) = n.addr {
                self.ids.insert(n.id, addr);
            }
        }
        self.bind_ids();
    }

    fn bind_ids(&mut self) {
        for (&id, addr) in &self.ids {
            if let Some(s) = self.servers.get_mut(addr) {
                s.id = Some(id);
            }
        }
    }

    /// `addr` is a local server this proxy fronts.
    pub fn is_server(&self, addr: SocketAddr) -> bool {
        self.servers.contains_key(&addr)
    }

    /// The address of local server `id`.
    pub fn server_addr(&self, id: i32) -> Option<SocketAddr> {
        self.ids
            .get(&id)
            .copied()
            .filter(|a| self.servers.contains_key(a))
    }

    /// The server holds split keys: a bypass would corrupt it (tunnel answers say so).
    pub fn pinned(&self, addr: SocketAddr) -> bool {
        self.servers.get(&addr).is_some_and(|s| s.split > 0)
    }

    /// Split keys over every server.
    pub fn split_keys(&self) -> usize {
        self.servers.values().map(|s| s.split).sum()
    }

    /// A request connection from `worker` into `server` completed its handshake.
    pub fn worker_connected(&mut self, server: SocketAddr, worker: i32) {
        if let Some(s) = self.servers.get_mut(&server) {
            *s.workers.entry(worker).or_insert(0) += 1;
        }
    }

    /// That connection closed: its requests will never be answered, forget them.
    pub fn worker_disconnected(&mut self, server: SocketAddr, worker: i32) {
        let Some(s) = self.servers.get_mut(&server) else {
            return;
        };
        if let Some(n) = s.workers.get_mut(&worker) {
            *n -= 1;
            if *n == 0 {
                s.workers.remove(&worker);
            }
        }
        if let Some(id) = s.id {
            self.forget(id, worker);
        }
    }

    /// A response connection from local server `server_id` to `worker` completed its
    /// handshake: this proxy sees that server's answers to that worker.
    pub fn responses_opened(&mut self, server_id: i32, worker: i32) {
        self.order.responses_opened(server_id, worker);
    }

    /// The server's response connection to `worker` closed.
    pub fn responses_closed(&mut self, server_id: i32, worker: i32) {
        self.order.responses_closed(server_id, worker);
        self.forget(server_id, worker);
    }

    /// ps-lite resends are on for `server` (it drops resent copies, which would never
    /// be answered): nothing waits for its answers any more.
    fn stop_holding(&mut self, server: SocketAddr) {
        let Some(s) = self.servers.get(&server) else {
            return;
        };
        let Some(id) = s.id.filter(|_| !s.blockers.contains(&Refusal::Resend)) else {
            return; // Done at the first ACK.
        };
        for (_, o) in self.outstanding.iter_mut().filter(|(c, _)| c.0 == id) {
            o.awaited = None;
        }
        for (_, m) in self.pending.iter_mut().filter(|(c, _)| c.0 == id) {
            m.awaited = None;
        }
        self.order.forget_server(id);
    }

    /// Every request in flight to server `server_id` (it exited or started afresh).
    fn forget_server(&mut self, server_id: i32) {
        self.pending.retain(|&(s, _, _, _), _| s != server_id);
        self.outstanding.retain(|&(s, _, _, _), _| s != server_id);
        self.order.forget_server(server_id);
    }

    fn forget(&mut self, server_id: i32, worker: i32) {
        self.pending
            .retain(|&(s, w, _, _), _| !(s == server_id && w == worker));
        self.outstanding
            .retain(|&(s, w, _, _), _| !(s == server_id && w == worker));
        self.order.forget(server_id, worker);
    }

    /// Whether a request stopped being unanswered since the last call: requests that
    /// were [`RequestPlan::Behind`] may go now.
    pub fn take_released(&mut self) -> bool {
        self.order.take_released()
    }

    /// Requests tracked now (bounded by [`MAX_TRACKED`]).
    pub fn tracked(&self) -> usize {
        self.pending.len() + self.outstanding.len()
    }

    fn fail(
        &mut self,
        server: SocketAddr,
        key: Option<u64>,
        reason: &'static str,
        detail: String,
    ) -> Failure {
        let failure = Failure {
            server,
            key,
            reason,
            detail,
        };
        if let Some(s) = self.servers.get_mut(&server) {
            if s.failed.is_none() {
                s.failed = Some(failure.clone());
                self.events.push_back(SplitEvent::Failed(failure.clone()));
            }
            return s.failed.clone().expect("set");
        }
        failure
    }

    /// A condition that forbids splitting appeared: before any split it only stops
    /// new splits; after one it stops the server's traffic.
    fn block(&mut self, server: SocketAddr, refusal: Refusal, detail: String) -> Option<Failure> {
        let s = self.servers.get_mut(&server)?;
        if s.split > 0 {
            let label = refusal.label();
            return Some(self.fail(
                server,
                None,
                label,
                format!("after keys were split: {detail}"),
            ));
        }
        if !s.blockers.contains(&refusal) {
            s.blockers.push(refusal);
        }
        None
    }

    /// A failed server stops everything.
    fn failed(&self, server: SocketAddr) -> Option<Failure> {
        self.servers.get(&server).and_then(|s| s.failed.clone())
    }

    /// A message that is not ps-lite went to `server`.
    pub fn on_fence(&mut self, server: SocketAddr) -> Option<Failure> {
        if let Some(f) = self.failed(server) {
            return Some(f);
        }
        self.block(
            server,
            Refusal::NotPslite,
            "a message that is not ps-lite".into(),
        )
    }

    /// A control message went to `server` (only ACK matters).
    pub fn on_control(&mut self, server: SocketAddr, cmd: ControlCommand) -> Option<Failure> {
        if let Some(f) = self.failed(server) {
            return Some(f);
        }
        match cmd {
            ControlCommand::Ack => {
                self.stop_holding(server);
                self.block(server, Refusal::Resend, "a ps-lite ACK (PS_RESEND)".into())
            }
            _ => None,
        }
    }

    /// A SimpleApp command went to `server`.
    pub fn on_command(&mut self, server: SocketAddr, head: i32, body: &[u8]) -> Option<Failure> {
        if let Some(f) = self.failed(server) {
            return Some(f);
        }
        let s = self.servers.get_mut(&server)?;
        let (refusal, detail) = match CommandType::from(head) {
            CommandType::SyncMode => {
                if !s.first_init {
                    s.sync_mode = true;
                }
                return None;
            }
            CommandType::Controller => match optimizer_verdict_in(body, self.config.optimizers) {
                Ok(class) => {
                    s.optimizer = Some(class);
                    return None;
                }
                Err(e) => (Refusal::Optimizer(e.label()), e.to_string()),
            },
            CommandType::SetGradientCompression => {
                (Refusal::Compression, "gradient compression".to_string())
            }
            CommandType::SetMultiPrecision
            | CommandType::StopServer
            | CommandType::SetProfilerParams => return None,
            CommandType::Other(h) => (Refusal::UnknownCommand, format!("unknown command {h}")),
        };
        self.block(server, refusal, detail)
    }

    /// Why this server's keys may not be split now, if anything forbids it
    /// (besides workers that have not connected yet).
    fn history_refusal(&self, server: SocketAddr) -> Option<Refusal> {
        let s = self.servers.get(&server)?;
        if s.restored {
            return Some(Refusal::Restarted);
        }
        if let Some(r) = s.blockers.first() {
            return Some(r.clone());
        }
        if self.workers.is_none() || s.id.is_none() || self.num_servers == 0 {
            return Some(Refusal::NoNodeTable);
        }
        if !s.sync_mode {
            return Some(Refusal::NotSyncMode);
        }
        None
    }

    fn all_workers_connected(&self, server: SocketAddr) -> bool {
        let (Some(s), Some(workers)) = (self.servers.get(&server), &self.workers) else {
            return false;
        };
        workers.iter().all(|w| s.workers.contains_key(w))
    }

    fn refuse(&mut self, server: SocketAddr, key: u64, reason: Refusal) {
        if self.refused_logged.insert((server, key)) {
            self.events.push_back(SplitEvent::Refused {
                server,
                key,
                reason,
            });
        }
    }

    /// Whether requests to `server` may wait for its answers: not with ps-lite
    /// resends on (a resent copy the server drops would never be answered).
    fn waits_for_answers(&self, server: SocketAddr) -> bool {
        self.servers
            .get(&server)
            .is_some_and(|s| !s.blockers.contains(&Refusal::Resend))
    }

    /// Why a request of `sender` for `keys` (`known`: their states) must wait before
    /// it goes to `server`, if it must ([`crate::core::order`]). `waited`: it waited
    /// past its deadline, so a key never initialized no longer holds it.
    fn hold_reason(
        &self,
        server: SocketAddr,
        sender: i32,
        meta: &Meta,
        keys: &[u64],
        known: &[Option<KeyState>],
        waited: bool,
    ) -> Option<HoldReason> {
        let id = self.servers.get(&server)?.id?;
        if !self.waits_for_answers(server) {
            return None;
        }
        // A request naming a split key goes on to the layout's checks.
        let split = known.iter().any(|k| matches!(k, Some(KeyState::Split(_))));
        let uninitialized = !waited
            && !split
            && known.iter().any(Option::is_none)
            && self.sees_every_init(server)
            && !self.is_init_push(sender, meta);
        self.order.hold_reason(id, sender, keys, uninitialized)
    }

    /// Rank 0's push (MXNet's `Init` pushes from rank 0 only; a push to an unknown
    /// key from any other worker is a gradient the server would take as the init).
    fn is_init_push(&self, sender: i32, meta: &Meta) -> bool {
        let rank0 = self.workers.as_ref().and_then(|w| w.iter().min().copied());
        meta.is_push() && !meta.is_pull() && Some(sender) == rank0
    }

    /// Whether every init push to `server` passes this proxy: it saw the server
    /// register (not restored from a journal) and every worker reach it through here.
    fn sees_every_init(&self, server: SocketAddr) -> bool {
        self.servers
            .get(&server)
            .is_some_and(|s| !s.restored && !s.init_wait_expired)
            && self.all_workers_connected(server)
    }

    /// A request goes to `server` now: what its answer releases (see
    /// [`RequestOrder::forwarded`]).
    fn awaited(
        &mut self,
        server: SocketAddr,
        corr: Correlation,
        meta: &Meta,
        keys: &[u64],
        init_keys: &[u64],
    ) -> Option<Awaited> {
        if !self.waits_for_answers(server) {
            return None;
        }
        let pull_only = meta.is_pull() && !meta.is_push();
        self.order
            .forwarded(corr.0, corr.1, keys, pull_only, init_keys)
    }

    fn track(
        &mut self,
        server: SocketAddr,
        corr: Correlation,
        meta: &Meta,
        keys: &[u64],
        init_keys: &[u64],
    ) -> Result<(), ()> {
        if self.tracked() >= MAX_TRACKED {
            return Err(());
        }
        if let Some(o) = self.outstanding.get_mut(&corr) {
            o.count += 1; // A resent copy: the first answer releases what waits.
            return Ok(());
        }
        let awaited = self.awaited(server, corr, meta, keys, init_keys);
        self.outstanding
            .insert(corr, Outstanding { count: 1, awaited });
        Ok(())
    }

    /// A data request from `sender` to local server `server`. `waited`: the hold of
    /// the first init push timed out.
    pub fn on_data_request(
        &mut self,
        server: SocketAddr,
        sender: i32,
        req: &DataRequest<'_>,
        waited: bool,
    ) -> RequestPlan {
        if let Some(f) = self.failed(server) {
            return RequestPlan::Stop(f);
        }
        let Some(state) = self.servers.get(&server) else {
            return RequestPlan::Forward; // Not a server this proxy saw register.
        };
        let server_id = state.id;
        let real = real_keys(req.meta.head(), req.keys);
        let known: Vec<Option<KeyState>> =
            real.iter().map(|k| state.keys.get(k).copied()).collect();
        let split_key = known.iter().zip(real).find_map(|(s, k)| match s {
            Some(KeyState::Split(l)) => Some((*k, *l)),
            _ => None,
        });
        let corr = server_id.map(|id| (id, sender, req.meta.customer_id(), req.meta.timestamp()));
        if let Some(reason) = self.hold_reason(server, sender, req.meta, real, &known, waited) {
            return RequestPlan::Behind(reason);
        }
        if waited
            && split_key.is_none()
            && known.iter().any(Option::is_none)
            && !self.is_init_push(sender, req.meta)
        {
            if let Some(s) = self.servers.get_mut(&server) {
                s.init_wait_expired = true;
            }
        }
        if let Some((key, layout)) = split_key {
            return self.split_request(server, corr, key, layout, req, false);
        }
        let push = req.meta.is_push();
        let mut init_keys = Vec::new();
        let new_keys: Vec<u64> = real
            .iter()
            .zip(&known)
            .filter(|(_, s)| s.is_none())
            .map(|(k, _)| *k)
            .collect();
        if push && !new_keys.is_empty() {
            // An init push (the server takes a push to an unknown key as its init),
            // unless this proxy restarted: then the key was initialized before.
            let restored = self.servers.get(&server).is_some_and(|s| s.restored);
            let candidate = self.candidate(req).filter(|_| !restored);
            if restored
                && self.config.enabled
                && req.keys.len() == 1
                && req.vals.len > self.config.min_bytes
            {
                self.refuse(server, req.keys[0], Refusal::Restarted);
            } else if let Some(total) = candidate {
                if let Some(plan) = self.decide_init(server, sender, corr, req, total, waited) {
                    return plan;
                }
            } else if req.keys.len() == 1
                && req.vals.len > self.config.min_bytes
                && self.config.enabled
            {
                self.refuse(server, req.keys[0], Refusal::NotDense);
            }
            if !restored {
                init_keys.clone_from(&new_keys);
            }
            let s = self.servers.get_mut(&server).expect("checked");
            for k in new_keys {
                s.keys.insert(k, KeyState::Whole);
            }
            if !s.first_init {
                s.first_init = true;
            }
        }
        if let Some(corr) = corr {
            if self
                .track(server, corr, req.meta, real, &init_keys)
                .is_err()
            {
                let f = self.fail(
                    server,
                    None,
                    "too_many_requests",
                    format!("more than {MAX_TRACKED} requests in flight"),
                );
                return RequestPlan::Stop(f);
            }
        }
        RequestPlan::Forward
    }

    /// The byte length of an init push that may be split: one dense key above the
    /// threshold with one length equal to its vals.
    fn candidate(&self, req: &DataRequest<'_>) -> Option<u64> {
        if !self.config.enabled || req.keys.len() != 1 || req.vals.len <= self.config.min_bytes {
            return None;
        }
        let handle = DataHandleType::from_head(req.meta.head())?;
        let elem = handle.dtype.size()? as u64;
        let dense = handle.request_type == RequestType::Default;
        let lens_ok =
            req.lens == Some(&[req.vals.len as i32][..]) && req.vals.len <= i32::MAX as u64;
        (dense && lens_ok && req.vals.len % elem == 0 && !req.meta.is_pull())
            .then_some(req.vals.len)
    }

    fn decide_init(
        &mut self,
        server: SocketAddr,
        sender: i32,
        corr: Option<Correlation>,
        req: &DataRequest<'_>,
        total: u64,
        waited: bool,
    ) -> Option<RequestPlan> {
        let key = req.keys[0];
        if let Some(reason) = self.history_refusal(server) {
            self.refuse(server, key, reason);
            return None;
        }
        if !self.all_workers_connected(server) {
            let s = self.servers.get(&server).expect("checked");
            if !s.first_init && !waited {
                return Some(RequestPlan::Hold);
            }
            self.servers
                .get_mut(&server)
                .expect("checked")
                .blockers
                .push(Refusal::WorkerNotProxied);
            self.refuse(server, key, Refusal::WorkerNotProxied);
            return None;
        }
        let ranges = ServerRanges::new(self.num_servers)?;
        let Some(decoded) = ranges.decode(key) else {
            self.refuse(server, key, Refusal::NotDense);
            return None;
        };
        let elem = DataHandleType::from_head(req.meta.head())?.dtype.size()? as u64;
        let slice = (self.config.slice_bytes / elem).max(1) * elem;
        let count = total.div_ceil(slice);
        let s = self.servers.get_mut(&server).expect("checked");
        if s.next_slice + count > MAX_SLICE_KEYS {
            return None;
        }
        let layout = Layout {
            key,
            head: req.meta.head(),
            total,
            slice,
            first: ranges.begin(decoded.server) + SLICE_KEY_BASE + s.next_slice,
            count: count as u32,
        };
        s.next_slice += count;
        s.split += 1;
        s.first_init = true;
        s.keys.insert(key, KeyState::Split(layout));
        let _ = sender;
        let next_slice = s.next_slice;
        self.events.push_back(SplitEvent::Split {
            server,
            layout,
            next_slice,
        });
        Some(self.split_request(server, corr, key, layout, req, true))
    }

    fn split_request(
        &mut self,
        server: SocketAddr,
        corr: Option<Correlation>,
        key: u64,
        layout: Layout,
        req: &DataRequest<'_>,
        init: bool,
    ) -> RequestPlan {
        let stop = |this: &mut Self, reason: &'static str, detail: String| {
            RequestPlan::Stop(this.fail(server, Some(key), reason, detail))
        };
        if req.meta.head() != layout.head {
            let shape = |head: i32| match DataHandleType::from_head(head) {
                Some(h) => format!("{:?} {:?}", h.request_type, h.dtype),
                None => format!("head {head}"),
            };
            return stop(
                self,
                "layout_mismatch",
                format!(
                    "a {} request; the split layout holds {}",
                    shape(req.meta.head()),
                    shape(layout.head)
                ),
            );
        }
        if req.keys.len() != 1 {
            return stop(
                self,
                "layout_mismatch",
                format!(
                    "a request for {} keys includes split key {key}",
                    req.keys.len()
                ),
            );
        }
        let push = req.meta.is_push();
        if push {
            if req.vals.len != layout.total || req.lens != Some(&[layout.total as i32][..]) {
                return stop(
                    self,
                    "layout_mismatch",
                    format!(
                        "{} bytes pushed, lens {:?}; the split layout holds {} bytes",
                        req.vals.len, req.lens, layout.total
                    ),
                );
            }
        } else if req.vals.len != 0 || req.lens.is_some_and(|l| !l.is_empty()) {
            return stop(
                self,
                "layout_mismatch",
                format!("a pull carrying {} bytes", req.vals.len),
            );
        }
        let Some(corr) = corr else {
            return stop(self, "no_node_table", "the server's id is unknown".into());
        };
        if self.pending.contains_key(&corr) || self.outstanding.contains_key(&corr) {
            return stop(
                self,
                "duplicate_request",
                format!(
                    "timestamp {} of customer {} from worker {} is already in flight",
                    corr.3, corr.2, corr.1
                ),
            );
        }
        if self.tracked() >= MAX_TRACKED {
            return stop(
                self,
                "too_many_requests",
                format!("more than {MAX_TRACKED} requests in flight"),
            );
        }
        let mut merge = Merge::new(layout, req.meta.is_pull());
        let init_keys = if init { &[key][..] } else { &[] };
        merge.awaited = self.awaited(server, corr, req.meta, &[key], init_keys);
        self.pending.insert(corr, merge);
        let meta = Pieces::one(req.meta_frame.clone());
        let messages = (0..layout.count)
            .map(|i| {
                let vals = push.then(|| {
                    let (off, len) = layout.range(i);
                    Pieces {
                        parts: req.vals.range(off, len),
                        len,
                    }
                });
                slice_request(&meta, &layout, i, vals)
            })
            .collect();
        RequestPlan::Split(messages)
    }

    /// The head of a data request to local server `server` whose bytes still arrive
    /// (its meta, keys, and the length of its vals frame): a push of a split key may
    /// go to the server slice by slice as its bytes come in. Anything unusual waits
    /// for the whole message, where every check runs.
    pub fn on_request_head(
        &mut self,
        server: SocketAddr,
        sender: i32,
        meta: &Meta,
        keys: &[u64],
        vals_len: u64,
    ) -> HeadPlan {
        if let Some(f) = self.failed(server) {
            return HeadPlan::Stop(f);
        }
        let Some(state) = self.servers.get(&server) else {
            return HeadPlan::Whole;
        };
        let (Some(id), [key]) = (state.id, keys) else {
            return HeadPlan::Whole;
        };
        let Some(KeyState::Split(layout)) = state.keys.get(key).copied() else {
            return HeadPlan::Whole;
        };
        let corr = (id, sender, meta.customer_id(), meta.timestamp());
        let fits = meta.is_request()
            && meta.is_push()
            && !meta.is_simple_app()
            && meta.head() == layout.head
            && vals_len == layout.total;
        let tracked = self.pending.contains_key(&corr) || self.outstanding.contains_key(&corr);
        let held = self.waits_for_answers(server)
            && self.order.hold_reason(id, sender, &[*key], false).is_some();
        if !fits || tracked || self.tracked() >= MAX_TRACKED || held {
            return HeadPlan::Whole;
        }
        // A push: nothing waits for it.
        self.pending
            .insert(corr, Merge::new(layout, meta.is_pull()));
        HeadPlan::Stream(layout)
    }

    /// A streamed request is complete: its lens frame must be the layout's.
    pub fn finish_streamed(
        &mut self,
        server: SocketAddr,
        layout: &Layout,
        lens: Option<&[i32]>,
    ) -> Option<Failure> {
        if lens == Some(&[layout.total as i32][..]) {
            return None;
        }
        Some(self.fail(
            server,
            Some(layout.key),
            "layout_mismatch",
            format!(
                "lens {lens:?} after {} bytes streamed as slices",
                layout.total
            ),
        ))
    }

    /// A data response from local server `server_id` to `worker`. `defer`: the
    /// response goes to a peer proxy, which merges the parts (so the pull side
    /// pipelines too); else this proxy merges them.
    pub fn on_data_response(
        &mut self,
        server_id: i32,
        worker: i32,
        meta: &Meta,
        meta_frame: &Bytes,
        data: &[Pieces],
        defer: bool,
    ) -> ResponsePlan {
        let Some(server) = self.server_addr(server_id) else {
            return ResponsePlan::Forward;
        };
        if let Some(f) = self.failed(server) {
            return ResponsePlan::Stop(f);
        }
        let corr = (server_id, worker, meta.customer_id(), meta.timestamp());
        if let Some(m) = self.pending.get_mut(&corr) {
            let layout = m.layout;
            let index = if m.pull {
                let keys = data.first().map(Pieces::to_vec).unwrap_or_default();
                (keys.len() == 8)
                    .then(|| u64::from_le_bytes(keys.try_into().expect("8 bytes")))
                    .and_then(|k| layout.index_of(k))
            } else {
                Some(m.got) // acks carry no keys: numbered as they come
            };
            let outcome = match index {
                Some(i) => m.absorb(i, meta_frame, data, !defer),
                None => Err("a slice response with unexpected keys".to_string()),
            };
            let done = match outcome {
                Err(detail) => {
                    if let Some(a) = self.pending.remove(&corr).and_then(|m| m.awaited) {
                        self.order.answered(server_id, worker, &a);
                    }
                    return ResponsePlan::Stop(self.fail(
                        server,
                        Some(layout.key),
                        "bad_slice_response",
                        detail,
                    ));
                }
                Ok(done) => done,
            };
            if done.is_some() {
                if let Some(a) = self.pending.remove(&corr).and_then(|m| m.awaited) {
                    self.order.answered(server_id, worker, &a);
                }
            }
            if defer {
                return ResponsePlan::Part(Part {
                    key: layout.key,
                    index: index.expect("absorbed"),
                    count: layout.count,
                    slice: layout.slice,
                    total: layout.total,
                });
            }
            return match done {
                None => ResponsePlan::Absorb,
                Some(pieces) => ResponsePlan::Merged {
                    key: layout.key,
                    pieces,
                },
            };
        }
        if let Some(o) = self.outstanding.get_mut(&corr) {
            o.count -= 1;
            let awaited = o.awaited.take();
            if o.count == 0 {
                self.outstanding.remove(&corr);
            }
            if let Some(a) = awaited {
                self.order.answered(server_id, worker, &a);
            }
            return ResponsePlan::Forward;
        }
        if self.pinned(server) {
            return ResponsePlan::Stop(self.fail(
                server,
                None,
                "bypass",
                format!(
                    "a response to worker {worker} (customer {}, timestamp {}) for a request this proxy never relayed: something reaches the server around the proxy",
                    meta.customer_id(),
                    meta.timestamp()
                ),
            ));
        }
        ResponsePlan::Forward
    }
}

/// The wire pieces of the request for slice `i` of `layout`: the request's meta frame
/// unchanged, the slice key, and for a push the slice's bytes and their length (a
/// pull sends an empty vals frame, as ZPull does).
pub fn slice_request(meta: &Pieces, layout: &Layout, i: u32, vals: Option<Pieces>) -> Vec<Bytes> {
    let key = layout.first + u64::from(i);
    let keys = Pieces::one(Bytes::copy_from_slice(&key.to_le_bytes()));
    match vals {
        Some(vals) => {
            let lens = Pieces::one(Bytes::copy_from_slice(&(vals.len as i32).to_le_bytes()));
            encode_message(&[meta.clone(), keys, vals, lens])
        }
        None => encode_message(&[meta.clone(), keys, Pieces::default()]),
    }
}

/// The slice responses of one request, merged into the response the server would
/// have sent for the whole key.
#[derive(Debug)]
struct Merge {
    layout: Layout,
    pull: bool,
    /// What later requests wait for until it is merged.
    awaited: Option<Awaited>,
    got: u32,
    seen: Vec<bool>,
    meta_frame: Option<Bytes>,
    vals: Vec<Vec<Bytes>>,
}

impl Merge {
    fn new(layout: Layout, pull: bool) -> Merge {
        Merge {
            layout,
            pull,
            awaited: None,
            got: 0,
            seen: vec![false; layout.count as usize],
            meta_frame: None,
            vals: vec![Vec::new(); if pull { layout.count as usize } else { 0 }],
        }
    }

    /// Takes the response to slice `index`; once every slice is in, the merged
    /// response (`keep`: built from the values kept; else empty: the peer merges).
    fn absorb(
        &mut self,
        index: u32,
        meta_frame: &Bytes,
        data: &[Pieces],
        keep: bool,
    ) -> Result<Option<Vec<Bytes>>, String> {
        let layout = self.layout;
        if self.meta_frame.as_ref().is_some_and(|m| m != meta_frame) {
            return Err("slice responses of one request differ in their meta".into());
        }
        if index >= layout.count || self.seen[index as usize] {
            return Err(format!(
                "slice {index} of {} answered twice or out of range",
                layout.count
            ));
        }
        if self.pull {
            let (_, len) = layout.range(index);
            let lens = data.get(2).map(Pieces::to_vec).unwrap_or_default();
            if data.len() != 3 || data[1].len != len || lens != (len as i32).to_le_bytes() {
                let got = data.get(1).map_or(0, |v| v.len);
                return Err(format!(
                    "slice {index} answered with {got} bytes, lens {lens:?}; expected {len}"
                ));
            }
            if keep {
                self.vals[index as usize] = data[1].parts.clone();
            }
        } else if !data.is_empty() {
            return Err("a push ack with data".into());
        }
        self.seen[index as usize] = true;
        self.got += 1;
        self.meta_frame = Some(meta_frame.clone());
        if self.got < layout.count {
            return Ok(None);
        }
        if !keep {
            return Ok(Some(Vec::new()));
        }
        let meta = Pieces::one(meta_frame.clone());
        if !self.pull {
            return Ok(Some(encode_message(&[meta])));
        }
        let keys = Pieces::one(Bytes::copy_from_slice(&layout.key.to_le_bytes()));
        let vals = Pieces {
            parts: std::mem::take(&mut self.vals)
                .into_iter()
                .flatten()
                .collect(),
            len: layout.total,
        };
        let lens = Pieces::one(Bytes::copy_from_slice(&(layout.total as i32).to_le_bytes()));
        Ok(Some(encode_message(&[meta, keys, vals, lens])))
    }
}

/// The receiving side of deferred merges: a peer proxy's parts of split keys'
/// responses, merged into the one response the worker expects (per tunnel session,
/// which is one server's responses to one worker).
#[derive(Debug, Default)]
pub struct Merger {
    merges: HashMap<(i32, i32), Merge>,
}

impl Merger {
    /// Takes one part (a slice-key response and what the peer said it is); the merged
    /// response once every part is in.
    pub fn on_part(
        &mut self,
        meta: &Meta,
        meta_frame: &Bytes,
        data: &[Pieces],
        part: Part,
    ) -> Result<Option<Vec<Bytes>>, String> {
        let sane = part.slice > 0
            && part.total <= i32::MAX as u64
            && part.count > 0
            && u64::from(part.count) == part.total.div_ceil(part.slice);
        if !sane || meta.is_request() {
            return Err(format!("a part that describes no layout: {part:?}"));
        }
        let corr = (meta.customer_id(), meta.timestamp());
        if !self.merges.contains_key(&corr) && self.merges.len() >= MAX_TRACKED {
            return Err(format!("more than {MAX_TRACKED} merges in flight"));
        }
        let layout = Layout {
            key: part.key,
            head: meta.head(),
            total: part.total,
            slice: part.slice,
            first: 0,
            count: part.count,
        };
        let m = self
            .merges
            .entry(corr)
            .or_insert_with(|| Merge::new(layout, meta.is_pull()));
        if m.layout != layout || m.pull != meta.is_pull() {
            return Err(format!("part {part:?} does not match the parts before it"));
        }
        let merged = m.absorb(part.index, meta_frame, data, true);
        if !matches!(merged, Ok(None)) {
            self.merges.remove(&corr);
        }
        merged
    }

    /// Merges waiting for parts.
    pub fn waiting(&self) -> usize {
        self.merges.len()
    }
}

#[cfg(test)]
mod tests;
