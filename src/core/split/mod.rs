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
//!
//! By job: this file holds the splitter's state, its lifecycle and the request and
//! response entry points; [`eligibility`] decides whether a server's keys may be
//! split and how (refusals, the init decision, loud failures); [`layout`] is how a
//! split key is stored and cut into slice requests; `rewrite` turns one request for a
//! split key into its slice requests; [`merge`] puts slice responses back together.
//! Request order at the server is [`crate::core::order`].

mod eligibility;
pub mod layout;
pub mod merge;
mod rewrite;

pub use eligibility::Refusal;
pub use layout::{byte_range, encode_message, slice_request, Layout, Pieces, Sizing};
use merge::Merge;
pub use merge::Merger;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use p3proxy_parsers::mxnet::{DataHandleType, RequestType};
use p3proxy_parsers::pslite::{Meta, Role};

use super::optimizer::OptimizerSet;
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
pub fn real_keys(head: i32, keys: &[u64]) -> &[u64] {
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
    /// How big the slices are and how many a server gets.
    pub sizing: Sizing,
    /// Keys larger than this many bytes may be split.
    pub min_bytes: u64,
    /// Server-side optimizers under which keys may be split.
    pub optimizers: OptimizerSet,
    /// How long a request may wait for something that may never come: rank 0's first
    /// init for every worker to connect, a request for the init of its key.
    pub hold: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyState {
    Whole,
    Split(Layout),
}

/// What the splitter knows of one local server, for an operator (`/debug/state`).
#[derive(Debug, Clone, PartialEq)]
pub struct ServerView {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its node id, once the node table is in.
    pub id: Option<i32>,
    /// Workers with a request connection open into it.
    pub workers: Vec<i32>,
    /// Keys initialized and left whole.
    pub whole_keys: usize,
    /// The layouts of its split keys, by key.
    pub layouts: Vec<Layout>,
    /// Why none of its keys may be split, if something forbids it.
    pub blockers: Vec<String>,
    /// Why its traffic was stopped, if it was.
    pub failed: Option<String>,
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
    /// Hosts (IP addresses) the node table's workers run on.
    worker_hosts: HashSet<IpAddr>,
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
            worker_hosts: HashSet::new(),
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
        self.order.changed();
        if let Some(id) = self.servers.get(&addr).and_then(|s| s.id) {
            self.forget_server(id);
        }
        self.servers.insert(addr, ServerState::default());
        self.bind_ids();
    }

    /// A local server exited.
    pub fn server_exited(&mut self, addr: SocketAddr) {
        self.order.changed();
        if let Some(id) = self.servers.remove(&addr).and_then(|s| s.id) {
            self.forget_server(id);
        }
    }

    /// A layout from the journal of this proxy's previous run: its key goes on being
    /// split; no other key of that server will be.
    pub fn restore(&mut self, server: SocketAddr, layout: Layout, next_slice: u64) {
        self.order.changed();
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
        self.order.changed();
        self.workers = Some(
            nodes
                .iter()
                .filter(|n| n.role == Role::Worker)
                .map(|n| n.id)
                .collect(),
        );
        self.worker_hosts = nodes
            .iter()
            .filter(|n| n.role == Role::Worker)
            .filter_map(|n| n.addr.map(|a| a.ip()))
            .collect();
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

    /// Local server `server` has seen a push of `key` (its init): a push of an unknown
    /// key is the key's init, from one worker only.
    pub fn knows_key(&self, server: SocketAddr, key: u64) -> bool {
        self.servers
            .get(&server)
            .is_some_and(|s| s.keys.contains_key(&key))
    }

    /// A local server runs on a host where a worker runs too (from the node table).
    pub fn server_shares_a_worker_host(&self) -> bool {
        self.servers
            .keys()
            .any(|a| self.worker_hosts.contains(&a.ip()))
    }

    /// Every local server as the splitter sees it, by address.
    pub fn servers(&self) -> Vec<ServerView> {
        let mut out: Vec<ServerView> = self
            .servers
            .iter()
            .map(|(addr, st)| {
                let mut layouts: Vec<Layout> = st
                    .keys
                    .values()
                    .filter_map(|k| match k {
                        KeyState::Split(l) => Some(*l),
                        KeyState::Whole => None,
                    })
                    .collect();
                layouts.sort_by_key(|l| l.key);
                let mut workers: Vec<i32> = st.workers.keys().copied().collect();
                workers.sort_unstable();
                ServerView {
                    addr: *addr,
                    id: st.id,
                    workers,
                    whole_keys: st.keys.len() - layouts.len(),
                    layouts,
                    blockers: st.blockers.iter().map(|b| b.label().to_string()).collect(),
                    failed: st.failed.as_ref().map(|f| f.detail.clone()),
                }
            })
            .collect();
        out.sort_by_key(|v| v.addr);
        out
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
        self.order.changed();
        if let Some(s) = self.servers.get_mut(&server) {
            *s.workers.entry(worker).or_insert(0) += 1;
        }
    }

    /// That connection closed: its requests will never be answered, forget them.
    pub fn worker_disconnected(&mut self, server: SocketAddr, worker: i32) {
        self.order.changed();
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

    /// Whether anything a held request ([`RequestPlan::Hold`], [`RequestPlan::Behind`])
    /// depends on changed since the last call (an answer, a connection, the node table,
    /// a server's registration): ask again. With the deadlines the caller keeps (the
    /// first init's hold, a never-initialized key's wait), this is when to wake; there
    /// is nothing to poll.
    pub fn take_released(&mut self) -> bool {
        self.order.take_released()
    }

    /// Requests tracked now (bounded by [`MAX_TRACKED`]).
    pub fn tracked(&self) -> usize {
        self.pending.len() + self.outstanding.len()
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

    /// A data request from `sender` to local server `server`, first asked about at
    /// `since`, asked (again) at `now`. With the plan, the time by which to ask again
    /// at the latest if nothing [`Self::take_released`] reports comes first (a
    /// `poll_timeout` for this request): the end of the first init's hold, or of the
    /// wait for a key's init; `None` when only an answer ends the wait.
    pub fn on_data_request_at(
        &mut self,
        server: SocketAddr,
        sender: i32,
        req: &DataRequest<'_>,
        since: Instant,
        now: Instant,
    ) -> (RequestPlan, Option<Instant>) {
        let deadline = since + self.config.hold;
        let plan = self.on_data_request(server, sender, req, now >= deadline);
        let by = match plan {
            RequestPlan::Hold | RequestPlan::Behind(HoldReason::NotInitialized) => Some(deadline),
            _ => None,
        };
        (plan, by)
    }

    /// [`Self::on_data_request_at`] with the time already judged: `waited`, the
    /// request's deadline passed.
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

#[cfg(test)]
mod tests;
