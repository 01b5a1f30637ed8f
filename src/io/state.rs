//! The state every connection of one proxy shares: configuration, the one `core`
//! object that decides (`core::proxy::ProxyState`: policy, topology, priorities,
//! splitter) behind one lock, the journal file, the inbound capture rules, and the
//! table of tunnel sessions waiting for their class connections. What the core asks
//! for (journal records, iptables rules) is done after its lock is let go. The sessions
//! and handlers of `io` build on it; it builds on none of them (`scripts/check-layout`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use p3proxy_parsers::pslite::{PsMessage, Role};
use p3proxy_parsers::zmtp::Limits;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::egress::Egress;
use super::handshake::PeerInfo;
use super::inbound::{InboundError, InboundRules};
use super::journal::{JournalFile, JournalFileError};
use super::net::{Bound, Env};
use super::redirect_check::RedirectCheck;
use crate::config::{Config, PrioritySource};
use crate::core::job_order::OrderRecord;
use crate::core::journal::Record;
use crate::core::learner::DEFAULT_DEFER;
use crate::core::live::{JobWatch, LiveEvent};
use crate::core::policy::Policy;
use crate::core::priority::{PriorityEvent, PriorityTable, Source, Urgency};
use crate::core::proxy::{Effect, ProxyState, Registration};
use crate::core::split::Splitter;
use crate::core::topology::{node_id_from_identity, Learned, MessageContext};
use crate::metrics::{self, OpenConnection};

/// Who the relayed session is, for observation and logs.
#[derive(Debug, Clone)]
pub(crate) struct SessionInfo {
    /// Identity of the app that opened the session (the DEALER).
    pub(crate) identity: Bytes,
    /// The destination ROUTER.
    pub(crate) dst: SocketAddr,
}

/// A sliced tunnel session waiting for (or receiving) its class connections.
#[derive(Debug)]
pub(crate) struct TunnelEntry {
    /// The destination it was admitted to.
    pub(crate) target: SocketAddr,
    /// The originating app's Identity.
    pub(crate) identity: Bytes,
    /// The destination app's READY.
    pub(crate) dst_info: PeerInfo,
    /// Hands a class connection (and bytes read past its preamble) to the session.
    pub(crate) attach: mpsc::UnboundedSender<(TcpStream, Vec<u8>, OpenConnection)>,
}

/// Sliced tunnel sessions by (peer address, session id).
pub(crate) type TunnelTable = std::sync::Mutex<HashMap<(IpAddr, u64), TunnelEntry>>;

/// State shared by every connection of one proxy.
pub struct Shared {
    pub(crate) config: Config,
    pub(super) env: Env,
    pub(crate) limits: Limits,
    /// Everything that decides, behind one lock: never held across an await, and
    /// never while the journal is written or iptables runs. The egress's lock may be
    /// taken under it (the job's order passed on), never the other way round.
    core: Mutex<ProxyState>,
    pub(crate) egress: Arc<Egress>,
    pub(crate) tunnels: TunnelTable,
    /// Notified when a sliced session enters the tunnel table (its class connections
    /// may be waiting for it).
    pub(crate) tunnels_changed: tokio::sync::Notify,
    /// Notified when what held requests wait for changed (`Splitter::take_released`):
    /// an answer, a worker's connection, the node table, a server's registration.
    pub(crate) order_released: tokio::sync::Notify,
    pub(super) journal: Option<Mutex<JournalFile>>,
    /// Inbound capture of registered ports, if on.
    pub(super) inbound: Option<InboundRules>,
    pub(super) next_session: AtomicU64,
    /// Serving (every listener bound and accepting), not yet shutting down: `/ready`.
    ready: AtomicBool,
    /// Requests to local servers held for order now.
    pub(crate) held_now: AtomicI64,
    /// Whether the redirect reaches this proxy (`/ready`).
    pub(crate) redirect: RedirectCheck,
}

/// Why a proxy could not start serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The journal could not be opened or is damaged.
    #[error(transparent)]
    Journal(#[from] JournalFileError),
    /// The inbound capture rules could not be installed.
    #[error("inbound capture: {0}")]
    Inbound(#[from] InboundError),
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// What moves a direction's big frame bodies from socket to socket, if splicing
    /// is on (`config.splice`).
    pub(crate) fn body_mover(&self) -> Option<crate::io::splice::BodyMover> {
        self.config
            .splice
            .then(|| crate::io::splice::BodyMover::new(true))
    }

    /// Shared state for a proxy with these listeners (its own addresses are never
    /// relayed to), continuing from the journal if there is one.
    pub fn new(config: Config, env: Env, bound: &Bound) -> Result<Arc<Shared>, StartError> {
        let mut own = bound.addrs();
        own.extend(config.metrics);
        let policy = Policy::new(
            own,
            config.cluster_cidr.clone(),
            config.scheduler_port,
            std::time::Duration::from_secs(config.no_proxy_ttl_s),
        );
        let source = match config.priority {
            PrioritySource::Learned => Source::Learned,
            PrioritySource::Key => Source::Key,
            PrioritySource::Map => Source::Map,
        };
        // Validated with the config; a map that cannot be read now is reported then.
        let map = config.load_priority_map().unwrap_or_else(|e| {
            tracing::error!(error = %e, "priority map unusable: MXNet key order instead");
            None
        });
        let mut priority = PriorityTable::new(source, map);
        priority.set_defer(config.learned_defer.unwrap_or(DEFAULT_DEFER));
        // The job order's versions are publication times: a newer record of a worker
        // wins whichever proxy made it (after a job restart, worker 9 may be elsewhere).
        let epoch_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        priority.set_order_clock(epoch_us, Instant::now());
        tracing::info!(
            configured = source.label(),
            in_use = priority.in_use().label(),
            "key priorities"
        );
        metrics::priority_source(priority.in_use().label());
        let (journal, records) = match &config.journal {
            Some(path) => {
                let (file, records) = JournalFile::open(path)?;
                (Some(Mutex::new(file)), records)
            }
            None => (None, Vec::new()),
        };
        let inbound = match &bound.inbound {
            Some(l) => Some(InboundRules::install(
                l.local_addr().expect("bound").port(),
            )?),
            None => None,
        };
        let mut core = ProxyState::new(policy, priority, Splitter::new(config.split_config()));
        core.auto_defer = config.learned_defer.is_none();
        core.job = JobWatch::with_link_rate(config.link_rate_bps.map(|r| r as f64));
        if !records.is_empty() {
            let layouts = core.replay(&records);
            tracing::warn!(
                records = records.len(),
                layouts,
                split_keys = core.splitter.split_keys(),
                "continuing from the journal of a previous run"
            );
        }
        let redirect = RedirectCheck::new(&config);
        let shared = Arc::new(Shared {
            limits: Limits::default(),
            egress: Arc::new(Egress::new(
                config.slice_bytes,
                config.memory_budget_bytes,
                config.link_rate_bps.map(|r| r as f64),
            )),
            order_released: tokio::sync::Notify::new(),
            config,
            env,
            core: Mutex::new(core),
            tunnels: TunnelTable::default(),
            tunnels_changed: tokio::sync::Notify::new(),
            next_session: AtomicU64::new(rand_seed()),
            journal,
            inbound,
            ready: AtomicBool::new(false),
            held_now: AtomicI64::new(0),
            redirect,
        });
        // Replaying asks only that the journal's local nodes be captured inbound again.
        let effects = shared.effects(&mut shared.core());
        shared.apply(effects);
        Ok(shared)
    }

    /// Sends connections from other hosts to the local node at `addr` through the
    /// inbound listener, if inbound capture is on. A failure is loud but safe: peers
    /// then reach the node directly, so this proxy never sees their requests and splits
    /// nothing for them (with proxied workers too, it refuses: `worker_not_proxied`).
    fn capture_inbound(&self, addr: SocketAddr) {
        if let Some(rules) = &self.inbound {
            match rules.capture(addr) {
                Ok(()) => tracing::info!(%addr, "inbound connections to this node are captured"),
                Err(e) => tracing::error!(%addr, error = %e, "inbound capture failed"),
            }
        }
    }

    /// Removes the inbound capture rules (at shutdown).
    pub fn remove_inbound_rules(&self) {
        if let Some(rules) = &self.inbound {
            rules.remove();
        }
    }

    /// The core object, locked (never across an await).
    pub(crate) fn core(&self) -> MutexGuard<'_, ProxyState> {
        self.core.lock().expect("core lock")
    }

    /// What the core asks for now; `core` is the caller's guard, dropped before
    /// [`Self::apply`] carries it out.
    pub(crate) fn effects(&self, core: &mut ProxyState) -> Vec<Effect> {
        self.wake_held(&mut core.splitter);
        std::iter::from_fn(|| core.poll_effect()).collect()
    }

    /// Carries out what the core asked for (with its lock let go).
    pub(crate) fn apply(&self, effects: impl IntoIterator<Item = Effect>) {
        for effect in effects {
            match effect {
                Effect::Journal(record) => {
                    self.journal(&record, false);
                }
                Effect::CaptureInbound(addr) => self.capture_inbound(addr),
                Effect::ReleaseInbound(addr) => {
                    if let Some(rules) = &self.inbound {
                        if let Err(e) = rules.release(addr) {
                            tracing::warn!(%addr, error = %e, "inbound capture rule not removed");
                        }
                    }
                }
            }
        }
    }

    /// Appends a record to the journal; `sync`: a layout, on disk before it is used.
    pub(crate) fn journal(&self, record: &Record, sync: bool) -> bool {
        let Some(journal) = &self.journal else {
            return true;
        };
        let mut file = journal.lock().expect("journal lock");
        match file.append(record, sync) {
            Ok(()) => true,
            Err(e) => {
                metrics::count(metrics::JOURNAL_ERRORS, 1);
                tracing::error!(path = %file.path().display(), error = %e, "journal write failed");
                false
            }
        }
    }

    /// Looks at a message of `bytes` wire bytes going from a session's DEALER to its
    /// ROUTER, before it is forwarded, and acts on what it teaches.
    pub(crate) fn observe(&self, ctx: &MessageContext<'_>, msg: &PsMessage, bytes: u64) {
        let now = Instant::now();
        let (learned, live) = {
            let mut core = self.core();
            let learned = core.topology.observe(ctx, msg);
            core.watch(ctx, msg, bytes, now, &*self.env.is_local);
            self.sync_answer_wait(&mut core, now);
            (learned, self.live_events(&mut core))
        };
        if let Some(live) = live {
            metrics::job_events(&live);
        }
        match learned {
            Some(Learned::Registration { role, addr }) => {
                let local = (self.env.is_local)(addr.ip()) && !(self.env.is_loopback)(addr.ip());
                if !local {
                    return; // Another host's node: its own proxy learns it.
                }
                if !(self.env.is_listening)(addr) {
                    tracing::warn!(%addr, ?role, "registration ignored: nothing listens there");
                    return;
                }
                let (outcome, effects) = {
                    let mut core = self.core();
                    let outcome = core.register(addr, role);
                    (outcome, self.effects(&mut core))
                };
                self.apply(effects);
                match outcome {
                    Registration::New => {
                        tracing::info!(%addr, ?role, "local node registered: tunnels to it are admitted")
                    }
                    Registration::Known => {}
                    Registration::Refused(r) => {
                        tracing::warn!(%addr, reason = %r, "registration ignored")
                    }
                }
            }
            Some(Learned::NodeTable) => {
                let (table, effects, change, in_use) = {
                    let mut core = self.core();
                    core.node_table_learned();
                    if core.priority.order_stamp().is_none() {
                        // A new job forgot the orders: none to pass on until one is known.
                        self.egress.forget_order();
                    }
                    // A new deferred share may have changed this proxy's own.
                    let change = self.pass_on_order(&mut core);
                    let in_use = core.priority.in_use().label();
                    if let (true, Some(rate)) = (self.config.pace, self.config.link_rate_bps) {
                        let workers = core
                            .topology
                            .nodes()
                            .iter()
                            .filter(|n| n.role == Role::Worker)
                            .count()
                            .max(1);
                        let pace = rate as f64 / workers as f64;
                        self.egress.set_pacing(Some(pace));
                        tracing::info!(workers, pace_bps = pace, "pacing each peer host's tunnels");
                    }
                    let table: Vec<String> = core
                        .topology
                        .nodes()
                        .iter()
                        .map(|n| {
                            format!(
                                "{}={:?}@{}",
                                n.id,
                                n.role,
                                n.addr.map(|a| a.to_string()).unwrap_or_default()
                            )
                        })
                        .collect();
                    (table, self.effects(&mut core), change, in_use)
                };
                if let Some(record) = change {
                    self.order_in_use(record, in_use);
                }
                metrics::set(metrics::NODES, table.len() as f64);
                self.apply(effects);
                tracing::info!(nodes = %table.join(" "), "node table from ADD_NODE");
            }
            Some(Learned::NodeExit(addr)) => {
                let (exited, effects) = {
                    let mut core = self.core();
                    let exited = core.node_exited(addr);
                    (exited, self.effects(&mut core))
                };
                self.apply(effects);
                if exited {
                    tracing::info!(%addr, "local node exited: its registration is forgotten");
                }
            }
            None => {}
        }
    }

    /// The node id listening at `addr`, from the node table.
    pub(crate) fn node_at(&self, addr: SocketAddr) -> Option<i32> {
        self.core().topology.id_at(addr)
    }

    /// How urgent a message the local app of `info` sent is (its key's priority); a
    /// request also teaches the learned order and is checked against the map.
    pub(crate) fn prioritize(&self, msg: &PsMessage, info: &SessionInfo) -> Urgency {
        let sender = node_id_from_identity(&info.identity).and_then(|id| u32::try_from(id).ok());
        let (urgency, event, in_use, change) = {
            let mut core = self.core();
            let (urgency, event) = core.prioritize(msg, sender, Instant::now());
            let change = self.pass_on_order(&mut core);
            (urgency, event, core.priority.in_use().label(), change)
        };
        if let Some(record) = change {
            self.order_in_use(record, in_use);
        }
        if let Some(event) = event {
            match event {
                PriorityEvent::Trusted => tracing::info!(
                    "this host's learned layer order trusted (the job uses the lowest worker's)"
                ),
                PriorityEvent::Distrusted => tracing::warn!(
                    "this host's learned layer order no longer holds: relearning (the job uses the lowest worker's)"
                ),
                PriorityEvent::MapRefused { keys, key } => tracing::error!(
                    keys,
                    key,
                    "priority map refused: it has {keys} keys but the job uses key {key} (a map of another model?); MXNet key order instead"
                ),
            }
            metrics::priority_source(in_use);
        }
        urgency
    }

    /// A peer proxy passed on the job's order it uses.
    pub(crate) fn order_received(&self, record: OrderRecord) {
        metrics::order_record("received");
        let (change, in_use) = {
            let mut core = self.core();
            core.order_received(record);
            (
                self.pass_on_order(&mut core),
                core.priority.in_use().label(),
            )
        };
        if let Some(record) = change {
            self.order_in_use(record, in_use);
        }
    }

    /// If the job's order in use changed, every tunnel session passes it on from now.
    /// Under the core's lock: two changes racing would otherwise leave the older one
    /// with the egress. The record to report, if this proxy uses the learned source
    /// (others only relay it).
    fn pass_on_order(&self, core: &mut ProxyState) -> Option<OrderRecord> {
        let record = core.priority.take_order_change()?;
        self.egress.pass_on_order(&record);
        (core.priority.source() == Source::Learned).then_some(record)
    }

    /// The job's order in use changed (passed on already): the log and the metrics.
    fn order_in_use(&self, record: OrderRecord, in_use: &'static str) {
        if record.keys.is_empty() {
            tracing::info!(
                origin = record.origin,
                "job order: worker {} has no trusted order; MXNet key order",
                record.origin
            );
        } else {
            tracing::info!(
                origin = record.origin,
                version = record.version,
                keys = record.keys.len(),
                "job order: worker {}'s learned order in use",
                record.origin
            );
        }
        metrics::order_origin(record.origin);
        metrics::priority_source(in_use);
    }

    /// A peer proxy announced the priority it used for a message with these keys.
    pub(crate) fn priority_hint(&self, ps_keys: &[u64], priority: u32) {
        self.core().priority_hint(ps_keys, priority);
    }

    /// The upstream of a session died while its app lived: requests in flight are lost.
    pub(crate) fn upstream_died(&self, info: &SessionInfo, end: &impl std::fmt::Debug) {
        let (lost, responder) = {
            let mut core = self.core();
            let topo = &mut core.topology;
            (
                topo.take_lost(&info.identity, info.dst),
                topo.id_at(info.dst),
            )
        };
        if let (Some(from), Some(to)) = (node_id_from_identity(&info.identity), responder) {
            let mut core = self.core();
            core.job.forget(from, to);
            self.sync_answer_wait(&mut core, Instant::now());
        }
        if lost > 0 {
            metrics::count(metrics::REQUESTS_LOST, lost);
            tracing::error!(
                requester = %String::from_utf8_lossy(&info.identity),
                responder = ?responder,
                dst = %info.dst,
                lost,
                reason = ?end,
                "upstream died with requests in flight: ps-lite will not resend them; the job may stall"
            );
        } else {
            tracing::info!(dst = %info.dst, reason = ?end, "upstream closed; closing the app's connection");
        }
    }

    /// A session ended: what its requester asked its responder through it will not be
    /// answered through it (the hang detector and the answers' wait forget it).
    pub(crate) fn session_ended(&self, info: &SessionInfo) {
        let mut core = self.core();
        let responder = core.topology.id_at(info.dst);
        if let (Some(from), Some(to)) = (node_id_from_identity(&info.identity), responder) {
            core.job.forget(from, to);
            self.sync_answer_wait(&mut core, Instant::now());
        }
    }

    /// Tells the egress when requests answered through this host's link start or stop
    /// waiting (the answers' idle time). Under the core lock, so that the egress sees
    /// the changes in order (the egress never takes the core lock).
    fn sync_answer_wait(&self, core: &mut ProxyState, now: Instant) {
        if self.config.link_rate_bps.is_some() {
            if let Some(waiting) = core.job.waiting_changed() {
                self.egress.requests_waiting(now, waiting);
            }
        }
    }

    /// What the job watch has to report, with its estimates after it.
    fn live_events(&self, core: &mut ProxyState) -> Option<metrics::JobEvents> {
        let first = core.job.poll_event()?;
        let events: Vec<LiveEvent> = std::iter::once(first)
            .chain(std::iter::from_fn(|| core.job.poll_event()))
            .collect();
        Some(metrics::JobEvents {
            events,
            iteration: core.job.iteration_period(),
            first_layer_wait: core.job.first_layer_wait(),
            comm_share: core.job.comm_share(),
            saving: core.job.estimated_saving(),
        })
    }

    /// Sets the gauges that move without traffic (the oldest unanswered request's age:
    /// a hang sends nothing). At every tick and scrape.
    pub(crate) fn update_live_gauges(&self) {
        let (oldest, pending) = {
            let core = self.core();
            (
                core.job.oldest_request_age(Instant::now()),
                core.job.pending(),
            )
        };
        metrics::set(
            metrics::OLDEST_REQUEST_AGE,
            oldest.map_or(0.0, |d| d.as_secs_f64()),
        );
        metrics::set(metrics::REQUESTS_UNANSWERED, pending as f64);
    }

    /// Serving: every listener is bound and accepting (`false` again when shutting down).
    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether `/ready` says so: serving, and the redirect seen to reach this proxy
    /// where that can be checked.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.redirect.ok()
    }

    /// The proxy's state for an operator (`GET /debug/state`).
    pub fn debug_state(&self) -> serde_json::Value {
        use serde_json::json;
        let now = Instant::now();
        let core = self.core();
        let nodes: Vec<_> = core
            .topology
            .nodes()
            .iter()
            .map(|n| {
                json!({
                    "id": n.id,
                    "role": format!("{:?}", n.role).to_lowercase(),
                    "addr": n.addr.map(|a| a.to_string()),
                })
            })
            .collect();
        let order: Vec<_> = core
            .priority
            .learned_order()
            .into_iter()
            .map(|k| json!({"key": k.key, "server": k.server, "priority": k.priority, "offset_ms": k.offset_ms}))
            .collect();
        let servers: Vec<_> = core
            .splitter
            .servers()
            .into_iter()
            .map(|v| {
                let layouts: Vec<_> = v
                    .layouts
                    .iter()
                    .map(|l| json!({"key": l.key, "bytes": l.total, "slice_bytes": l.slice, "slices": l.count, "first_slice_key": l.first}))
                    .collect();
                json!({
                    "addr": v.addr.to_string(),
                    "id": v.id,
                    "workers": v.workers,
                    "whole_keys": v.whole_keys,
                    "layouts": layouts,
                    "blockers": v.blockers,
                    "failed": v.failed,
                })
            })
            .collect();
        let secs = |d: Option<std::time::Duration>| d.map(|d| d.as_secs_f64());
        let sessions: serde_json::Map<String, serde_json::Value> = metrics::open_by_route()
            .into_iter()
            .map(|(route, n)| (route.to_string(), json!(n)))
            .collect();
        json!({
            "ready": self.is_ready(),
            "redirect": {
                "probe": self.redirect.target.map(|t| t.to_string()),
                "verified": self.redirect.verified(),
            },
            "nodes": nodes,
            "priority": {
                "configured": core.priority.source().label(),
                "in_use": core.priority.in_use().label(),
                "learned_defer": core.priority.defer(),
                "learned_order": order,
                "own_order": core.priority.own_order().iter().map(|&(lk, p)| json!([lk >> 16, lk & 0xffff, p])).collect::<Vec<_>>(),
                "order_origin": core.priority.order_stamp().map(|(origin, _)| origin),
                "order_version": core.priority.order_stamp().map(|(_, version)| version),
            },
            "split_servers": servers,
            "sessions_by_route": sessions,
            "requests": {
                "unanswered": core.job.pending(),
                "oldest_age_s": secs(core.job.oldest_request_age(now)),
                "held_for_order": self.held_now.load(Ordering::Relaxed).max(0),
                "dropped_untracked": core.job.dropped(),
            },
            "job": {
                "iteration_s": secs(core.job.iteration_period()),
                "first_layer_wait_s": secs(core.job.first_layer_wait()),
                "comm_share": core.job.comm_share(),
                "estimated_saving_s": secs(core.job.estimated_saving()),
                "answers": self.egress.answer_totals().map(|t| json!({
                    "waiting_s": t.waiting.as_secs_f64(),
                    "idle_s": t.idle.as_secs_f64(),
                    "idle_share": t.idle_share(),
                })),
            },
        })
    }

    pub(super) fn session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }
}

fn rand_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32)
}

impl Shared {
    /// Wakes requests held behind an answer, if the splitter released any.
    pub(crate) fn wake_held(&self, sp: &mut Splitter) {
        if sp.take_released() {
            self.order_released.notify_waiters();
        }
    }
}
