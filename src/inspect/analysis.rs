//! Where a job's iterations go, from the ps-lite messages seen on the wire (sans-IO).
//!
//! Requests are matched with their responses by (worker, server, customer, timestamp).
//! A worker's n-th push of a key belongs to its iteration n (pulls to the iteration of
//! the key's last push). Per iteration: when it started (its first request), its
//! period (to the next start: what the job measures as its step time), how long the
//! next forward pass waited on its first layer (from the moment the worker's last
//! request of the iteration was entirely on the wire to the first layer's response; 0
//! when the first layer was back before, as priority scheduling aims for), and the
//! bytes on the busiest host's link. The estimate uses the benchmark's ideal bound:
//! compute (the period less that wait) or the busiest link at `rate`, whichever is
//! longer; what a priority-scheduled, sliced job could save is the period less that.
//!
//! Memory is bounded on a long capture: iterations are folded into fixed-size rows
//! once two later ones have started, keys and node pairs are aggregated, and the trace
//! keeps at most `max_trace_events` events.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use p3proxy_parsers::mxnet::ServerRanges;
use p3proxy_parsers::pslite::{MessageKind, Role};

use super::streams::{Content, ObservedMessage};
use crate::core::topology::{node_id_from_identity, MessageContext, Topology};

/// How the analysis is run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The links' rate in bits per second (for busy time and the ideal bound).
    pub rate_bps: f64,
    /// Layer priority by MXNet key (0 = first layer), from a priority map.
    pub priority: Option<HashMap<u64, u32>>,
    /// Most Chrome-trace events kept.
    pub max_trace_events: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rate_bps: 1e9,
            priority: None,
            max_trace_events: 200_000,
        }
    }
}

/// Iterations held open before they are folded into rows.
const OPEN_ITERATIONS: u32 = 3;

#[derive(Debug, Clone)]
struct Pending {
    worker: i32,
    key: u64,
    iteration: u32,
    push: bool,
    first_ts: f64,
    /// Its last byte: from then on it waits for its answer.
    last_ts: f64,
}

#[derive(Debug, Default)]
struct WorkerIteration {
    first_request: f64,
    last_request: f64,
    last_response: f64,
    /// Response (last byte) per key.
    responses: HashMap<u64, f64>,
    /// Push (first byte) per key, for the learned layer order.
    pushes: HashMap<u64, f64>,
    /// Push (last byte) per key, for the pair lag.
    push_ends: HashMap<u64, f64>,
}

#[derive(Debug, Default)]
struct OpenIteration {
    workers: BTreeMap<i32, WorkerIteration>,
    /// Bytes sent by each host (the sender's IP) for this iteration.
    host_bytes: HashMap<IpAddr, u64>,
    /// Each response's (or response part's) first and last byte.
    answer_spans: Vec<(f64, f64)>,
    /// Each request's wait for its answer: its last byte to the answer's first.
    waits: Vec<(f64, f64)>,
}

/// One iteration, folded.
#[derive(Debug, Clone, Serialize)]
pub struct IterationRow {
    /// Iteration number (per worker and key, from the first push seen).
    pub index: u32,
    /// Start: the first request of any worker, seconds from the capture's start.
    pub start_s: f64,
    /// To the next iteration's start.
    pub period_s: Option<f64>,
    /// From the start to the last response.
    pub comm_s: f64,
    /// The longest wait of a worker's next forward pass on its first layer: from its
    /// last request (end of backward) to the first layer's response.
    pub first_layer_wait_s: f64,
    /// Median over the keys every worker pushed of the time from the first to the
    /// last worker's push (last bytes): how long a key waits at its server for the
    /// slowest worker (captured at the server's host or the switch). `None` with one
    /// worker.
    pub pair_lag_s: Option<f64>,
    /// The time requests of the iteration waited for their answers (from a request's
    /// last byte to its answer's first; overlaps counted once).
    pub answer_wait_s: f64,
    /// Of that, the time no answer was on the wire: the answer direction idling while
    /// the servers wait for the slowest worker's copies (what the live
    /// `p3proxy_answer_idle_ratio` measures at the server's proxy).
    pub answer_idle_s: f64,
    /// Bytes sent by the busiest host, MB.
    pub busiest_link_mb: f64,
    /// Those bytes at the link rate.
    pub link_busy_s: f64,
    /// max(period - wait, link busy): the ideal bound's estimate.
    pub ideal_s: Option<f64>,
    /// Period less the ideal.
    pub saving_s: Option<f64>,
}

/// One key, aggregated.
#[derive(Debug, Clone, Serialize)]
pub struct KeyRow {
    /// MXNet key (the ps-lite key less its server's range start).
    pub key: u64,
    /// Layer rank in forward order (0 first), from the map or learned from the traffic.
    pub layer: usize,
    /// Requests seen.
    pub requests: u64,
    /// Request bytes.
    pub bytes: u64,
    /// Median from a request's first byte to its response's last byte.
    pub median_latency_s: f64,
    /// Median start of its push within the iteration.
    pub median_push_offset_s: f64,
}

/// Messages between two nodes.
#[derive(Debug, Clone, Serialize)]
pub struct PairRow {
    /// Sender (`W9`, `S8`, `H1`, or `anon`).
    pub from: String,
    /// Receiver (a node, or its address if the node table was not seen).
    pub to: String,
    /// Through a p3proxy tunnel.
    pub tunnel: bool,
    /// Messages.
    pub messages: u64,
    /// Keys in its data messages.
    pub keys: u64,
    /// Message bytes (ZMTP framing included).
    pub bytes: u64,
}

/// A node of the job's table.
#[derive(Debug, Clone, Serialize)]
pub struct NodeRow {
    /// `W9`, `S8`, `H1`.
    pub node: String,
    /// Address.
    pub addr: Option<SocketAddr>,
}

/// The totals.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Iterations with a period (the first seen, often the init pushes, excluded).
    pub iterations: usize,
    /// Median period.
    pub median_period_s: Option<f64>,
    /// Median first-layer wait.
    pub median_first_layer_wait_s: Option<f64>,
    /// Median of the iterations' pair lags.
    pub median_pair_lag_s: Option<f64>,
    /// Over the iterations, the share of the answer wait with no answer on the wire.
    pub answer_idle_share: Option<f64>,
    /// Median busiest link, MB.
    pub median_busiest_link_mb: Option<f64>,
    /// Median ideal bound.
    pub median_ideal_s: Option<f64>,
    /// Median period over median ideal.
    pub estimated_speedup: Option<f64>,
    /// Link rate used, bits per second.
    pub rate_bps: f64,
    /// The first layer's key, and where the order came from (`map` or `learned`).
    pub first_layer_key: Option<u64>,
    /// `map`, `p3proxy` (the priorities p3proxy announced in its tunnels) or `learned`
    /// (the key pushed last in backward is the first layer).
    pub layer_order: &'static str,
}

/// Everything `inspect` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Nodes from the ADD_NODE broadcast (empty if the capture began after it).
    pub nodes: Vec<NodeRow>,
    /// Messages by node pair.
    pub pairs: Vec<PairRow>,
    /// Iterations.
    pub iterations: Vec<IterationRow>,
    /// Keys, first layer first.
    pub keys: Vec<KeyRow>,
    /// Totals.
    pub summary: Summary,
    /// Responses with no request seen (the capture began mid-request, or a path was
    /// not captured).
    pub unmatched_responses: u64,
    /// Well-framed messages that are not ps-lite.
    pub not_pslite_messages: u64,
}

/// One Chrome-trace event (complete event, microseconds).
#[derive(Debug, Clone, Serialize)]
pub struct TraceEvent {
    /// `key K`.
    pub name: String,
    /// `push`, `pushpull` or `pull`.
    pub cat: &'static str,
    /// Always `X`.
    pub ph: &'static str,
    /// Start, microseconds from the capture's start.
    pub ts: f64,
    /// Duration, microseconds.
    pub dur: f64,
    /// The worker.
    pub pid: i32,
    /// The key.
    pub tid: u64,
}

#[derive(Debug, Default)]
struct KeyAcc {
    requests: u64,
    bytes: u64,
    latencies: Vec<f64>,
    push_offsets: Vec<f64>,
}

/// Most samples kept per key for its medians.
const KEY_SAMPLES: usize = 4096;

/// The analysis of one capture.
#[derive(Debug)]
pub struct Analysis {
    options: Options,
    topology: Topology,
    t0: Option<f64>,
    /// By sender, destination address and path (labelled at the end, when the node
    /// table is known).
    pairs: BTreeMap<(String, SocketAddr, bool), PairRow>,
    pending: HashMap<(i32, i32, i32, i32), Pending>,
    /// The pending request of (worker, server, ps-lite key), for split responses that
    /// come back as parts (slice-key responses) a worker's proxy merges.
    pending_by_key: HashMap<(i32, i32, u64), (i32, i32)>,
    /// Parts seen of each of those responses.
    parts_seen: HashMap<(i32, i32, u64), u32>,
    /// When the first part of a split response began (its request's wait ended).
    first_part_ts: HashMap<(i32, i32, u64), f64>,
    /// The priority p3proxy announced for each key (lower is more urgent).
    announced: HashMap<u64, u32>,
    /// The next iteration of each worker's pushes of each ps-lite key (a big array's
    /// part on each server is a key of its own).
    next_iteration: HashMap<(i32, u64), u32>,
    /// Iterations below this are folded: late requests for them are not counted.
    folded_below: u32,
    /// The answers of the iteration folded last: a wait of the next one may overlap them.
    folded_answers: Vec<(f64, f64)>,
    /// Workers seen sending pushpulls: from their first one on, only pushpulls start
    /// iterations (rank 0's init pushes do not).
    pushpull_workers: std::collections::HashSet<i32>,
    open: BTreeMap<u32, OpenIteration>,
    rows: Vec<IterationRow>,
    keys: BTreeMap<u64, KeyAcc>,
    /// Hosts that sent a worker's requests / a server's responses (when the node table
    /// was not seen: one node of a role per host).
    worker_at: HashMap<IpAddr, i32>,
    server_at: HashMap<IpAddr, i32>,
    trace: Vec<TraceEvent>,
    unmatched: u64,
    not_pslite: u64,
}

fn label(id: Option<i32>) -> String {
    match id {
        Some(1) => "H1".into(),
        Some(id) if id >= 8 && id % 2 == 0 => format!("S{id}"),
        Some(id) if id >= 9 => format!("W{id}"),
        Some(id) => format!("N{id}"),
        None => "anon".into(),
    }
}

/// The spans merged: disjoint, in order (empty spans dropped).
fn union(mut spans: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut merged: Vec<(f64, f64)> = Vec::new();
    for (from, to) in spans.into_iter().filter(|(a, b)| b > a) {
        match merged.last_mut() {
            Some(last) if from <= last.1 => last.1 = last.1.max(to),
            _ => merged.push((from, to)),
        }
    }
    merged
}

/// The length two sets of disjoint, ordered spans share.
fn overlap(a: &[(f64, f64)], b: &[(f64, f64)]) -> f64 {
    let (mut i, mut j, mut total) = (0, 0, 0.0);
    while i < a.len() && j < b.len() {
        let (from, to) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if to > from {
            total += to - from;
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    total
}

/// The median over the keys every worker of an iteration pushed of the time from the
/// first to the last worker's push.
fn pair_lag(workers: &BTreeMap<i32, WorkerIteration>) -> Option<f64> {
    if workers.len() < 2 {
        return None;
    }
    let first = workers.values().next()?;
    let mut lags: Vec<f64> = first
        .push_ends
        .keys()
        .filter_map(|k| {
            let ends: Vec<f64> = workers
                .values()
                .filter_map(|w| w.push_ends.get(k).copied())
                .collect();
            (ends.len() == workers.len()).then(|| {
                ends.iter().copied().fold(f64::NEG_INFINITY, f64::max)
                    - ends.iter().copied().fold(f64::INFINITY, f64::min)
            })
        })
        .collect();
    median(&mut lags)
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

impl Analysis {
    /// A new analysis.
    pub fn new(options: Options) -> Analysis {
        Analysis {
            options,
            topology: Topology::default(),
            t0: None,
            pairs: BTreeMap::new(),
            pending: HashMap::new(),
            pending_by_key: HashMap::new(),
            parts_seen: HashMap::new(),
            first_part_ts: HashMap::new(),
            announced: HashMap::new(),
            next_iteration: HashMap::new(),
            folded_below: 0,
            folded_answers: Vec::new(),
            pushpull_workers: Default::default(),
            open: BTreeMap::new(),
            rows: Vec::new(),
            keys: BTreeMap::new(),
            worker_at: HashMap::new(),
            server_at: HashMap::new(),
            trace: Vec::new(),
            unmatched: 0,
            not_pslite: 0,
        }
    }

    /// The capture's first timestamp (times in the report count from it).
    pub fn start_at(&mut self, ts: f64) {
        self.t0.get_or_insert(ts);
    }

    fn rel(&self, ts: f64) -> f64 {
        ts - self.t0.unwrap_or(ts)
    }

    fn mxnet_key(&self, ps_key: u64) -> u64 {
        let servers = self.topology.num_servers() as u64;
        match ServerRanges::new(servers).and_then(|r| r.decode(ps_key)) {
            Some(d) => d.offset,
            None => ps_key,
        }
    }

    fn node_of(&self, addr: SocketAddr, role: Role) -> Option<i32> {
        self.topology.id_at(addr).or_else(|| match role {
            Role::Worker => self.worker_at.get(&addr.ip()).copied(),
            _ => self.server_at.get(&addr.ip()).copied(),
        })
    }

    /// Takes one message.
    pub fn on_message(&mut self, m: &ObservedMessage) {
        self.start_at(m.first_ts);
        let sender = node_id_from_identity(&m.identity);
        let Content::Ps(ps) = &m.content else {
            self.not_pslite += 1;
            self.count_pair(sender, m, 0);
            return;
        };
        if let Some(msg) = &ps.message {
            if matches!(msg.kind(), MessageKind::Control(_)) {
                let ctx = MessageContext {
                    sender_identity: &m.identity,
                    dst: m.dst,
                    first_on_connection: m.first_on_connection,
                };
                self.topology.observe(&ctx, msg);
            }
        }
        let kind = match &ps.message {
            Some(msg) => msg.kind(),
            None => MessageKind::Data {
                request: ps.meta.is_request(),
                push: ps.meta.is_push(),
                pull: ps.meta.is_pull(),
            },
        };
        let data = matches!(kind, MessageKind::Data { .. });
        self.count_pair(sender, m, if data { ps.keys.len() as u64 } else { 0 });
        let MessageKind::Data {
            request,
            push,
            pull,
        } = kind
        else {
            return;
        };
        let Some(sender) = sender else {
            return;
        };
        let customer = ps.meta.customer_id();
        let ts = ps.meta.timestamp();
        let ps_key = ps.keys.first().copied();
        let key = ps_key.map(|k| self.mxnet_key(k));
        if request {
            // A worker's request: learn its host, find its server.
            self.worker_at.entry(m.client.ip()).or_insert(sender);
            let Some(server) = self.node_of(m.dst, Role::Server) else {
                return;
            };
            let (Some(key), Some(ps_key)) = (key, ps_key) else {
                return;
            };
            if push && pull && self.pushpull_workers.insert(sender) {
                // Gluon and Module: what came before (init pushes) was not an iteration.
                self.next_iteration.retain(|(w, _), _| *w != sender);
                for it in self.open.values_mut() {
                    it.workers.remove(&sender);
                }
            }
            if push && !pull && self.pushpull_workers.contains(&sender) {
                return;
            }
            let counter = self.next_iteration.entry((sender, ps_key)).or_insert(0);
            let iteration = if push {
                *counter += 1;
                *counter - 1
            } else {
                counter.saturating_sub(1)
            };
            if iteration < self.folded_below {
                return; // A straggler of an iteration already reported.
            }
            let offset = {
                let it = self.open.entry(iteration).or_default();
                let w = it.workers.entry(sender).or_insert_with(|| WorkerIteration {
                    first_request: m.first_ts,
                    ..Default::default()
                });
                w.first_request = w.first_request.min(m.first_ts);
                w.last_request = w.last_request.max(m.last_ts);
                if push {
                    w.pushes.entry(key).or_insert(m.first_ts);
                    let end = w.push_ends.entry(key).or_insert(m.last_ts);
                    *end = end.max(m.last_ts);
                }
                *it.host_bytes.entry(m.client.ip()).or_insert(0) += m.wire_bytes;
                m.first_ts - w.first_request
            };
            let k = self.keys.entry(key).or_default();
            k.requests += 1;
            k.bytes += m.wire_bytes;
            if push && k.push_offsets.len() < KEY_SAMPLES {
                k.push_offsets.push(offset);
            }
            if let Some(p) = m.priority {
                let a = self.announced.entry(key).or_insert(p);
                *a = (*a).min(p);
            }
            self.pending_by_key
                .insert((sender, server, ps_key), (customer, ts));
            self.pending.insert(
                (sender, server, customer, ts),
                Pending {
                    worker: sender,
                    key,
                    iteration,
                    push: push || !pull,
                    first_ts: m.first_ts,
                    last_ts: m.last_ts,
                },
            );
            self.fold(iteration);
        } else {
            self.server_at.entry(m.client.ip()).or_insert(sender);
            let Some(worker) = self.node_of(m.dst, Role::Worker) else {
                self.unmatched += 1;
                return;
            };
            let mut answer_began = m.first_ts;
            let found = match m.part {
                None => self.pending.remove(&(worker, sender, customer, ts)),
                Some(part) => {
                    // One slice-key response of a split key: the response is complete
                    // with its last part; the wait for it ended with its first.
                    let id = (worker, sender, part.key);
                    let began = *self.first_part_ts.entry(id).or_insert(m.first_ts);
                    let seen = self.parts_seen.entry(id).or_insert(0);
                    *seen += 1;
                    if *seen < part.count {
                        if let Some(it) = self
                            .pending_by_key
                            .get(&id)
                            .and_then(|k| self.pending.get(&(worker, sender, k.0, k.1)))
                            .and_then(|p| self.open.get_mut(&p.iteration))
                        {
                            *it.host_bytes.entry(m.client.ip()).or_insert(0) += m.wire_bytes;
                            it.answer_spans.push((m.first_ts, m.last_ts));
                        }
                        return;
                    }
                    self.parts_seen.remove(&id);
                    self.first_part_ts.remove(&id);
                    answer_began = began;
                    self.pending_by_key
                        .get(&id)
                        .copied()
                        .and_then(|(c, t)| self.pending.remove(&(worker, sender, c, t)))
                }
            };
            let Some(p) = found else {
                self.unmatched += 1;
                return;
            };
            if let Some(it) = self.open.get_mut(&p.iteration) {
                *it.host_bytes.entry(m.client.ip()).or_insert(0) += m.wire_bytes;
                it.answer_spans.push((m.first_ts, m.last_ts));
                it.waits.push((p.last_ts, answer_began));
                if let Some(w) = it.workers.get_mut(&p.worker) {
                    w.last_response = w.last_response.max(m.last_ts);
                    let r = w.responses.entry(p.key).or_insert(m.last_ts);
                    *r = r.max(m.last_ts);
                }
            }
            let k = self.keys.entry(p.key).or_default();
            if k.latencies.len() < KEY_SAMPLES {
                k.latencies.push(m.last_ts - p.first_ts);
            }
            if self.trace.len() < self.options.max_trace_events {
                self.trace.push(TraceEvent {
                    name: format!("key {}", p.key),
                    cat: match (p.push, pull) {
                        (true, true) => "pushpull",
                        (true, false) => "push",
                        _ => "pull",
                    },
                    ph: "X",
                    ts: self.rel(p.first_ts) * 1e6,
                    dur: (m.last_ts - p.first_ts) * 1e6,
                    pid: p.worker,
                    tid: p.key,
                });
            }
        }
    }

    fn count_pair(&mut self, sender: Option<i32>, m: &ObservedMessage, keys: u64) {
        let from = label(sender);
        let row = self
            .pairs
            .entry((from.clone(), m.dst, m.tunnel))
            .or_insert_with(|| PairRow {
                from,
                to: String::new(),
                tunnel: m.tunnel,
                messages: 0,
                keys: 0,
                bytes: 0,
            });
        row.messages += 1;
        row.keys += keys;
        row.bytes += m.wire_bytes;
    }

    /// The layer rank of each key: from the map, or learned (pushed later in backward =
    /// nearer the input).
    fn layer_order(&self) -> (Vec<u64>, &'static str) {
        let mut keys: Vec<u64> = self.keys.keys().copied().collect();
        if let Some(map) = &self.options.priority {
            keys.sort_by_key(|k| (map.get(k).copied().unwrap_or(u32::MAX), *k));
            return (keys, "map");
        }
        if !self.announced.is_empty() {
            // Through p3proxy the wire order is the proxy's: its announced priorities
            // say the order it used.
            keys.sort_by_key(|k| (self.announced.get(k).copied().unwrap_or(u32::MAX), *k));
            return (keys, "p3proxy");
        }
        let mut offset: HashMap<u64, f64> = HashMap::new();
        for (k, acc) in &self.keys {
            let mut v = acc.push_offsets.clone();
            offset.insert(*k, median(&mut v).unwrap_or(f64::NEG_INFINITY));
        }
        keys.sort_by(|a, b| offset[b].total_cmp(&offset[a]).then(a.cmp(b)));
        (keys, "learned")
    }

    /// Folds iterations that can no longer change (two later ones have started).
    fn fold(&mut self, newest: u32) {
        while let Some((&oldest, _)) = self.open.first_key_value() {
            if oldest + OPEN_ITERATIONS > newest {
                break;
            }
            self.fold_one(oldest);
        }
    }

    fn fold_one(&mut self, index: u32) {
        let Some(it) = self.open.remove(&index) else {
            return;
        };
        self.folded_below = self.folded_below.max(index + 1);
        if it.workers.is_empty() {
            return;
        }
        let first = self.layer_order().0.first().copied();
        let start = it
            .workers
            .values()
            .map(|w| w.first_request)
            .fold(f64::INFINITY, f64::min);
        let end = it
            .workers
            .values()
            .map(|w| w.last_response)
            .fold(f64::NEG_INFINITY, f64::max);
        let wait = it
            .workers
            .values()
            .filter_map(|w| {
                let ready = w.responses.get(&first?)?;
                Some((ready - w.last_request).max(0.0))
            })
            .fold(0.0, f64::max);
        let busiest = it.host_bytes.values().copied().max().unwrap_or(0) as f64;
        let pair_lag = pair_lag(&it.workers);
        // Any answer on the wire keeps the direction busy, also one of the iterations
        // before or after (the tail of one overlaps the next).
        let waiting = union(it.waits);
        let answer_wait: f64 = waiting.iter().map(|(a, b)| b - a).sum();
        let answers = union(
            self.open
                .values()
                .flat_map(|o| o.answer_spans.iter().copied())
                .chain(it.answer_spans.iter().copied())
                .chain(self.folded_answers.iter().copied())
                .collect(),
        );
        // Clamped: the subtraction of equal sums may round below zero.
        let answer_idle = (answer_wait - overlap(&waiting, &answers)).max(0.0);
        self.folded_answers = it.answer_spans;
        if let Some(prev) = self.rows.last_mut() {
            if prev.index + 1 == index {
                let period = self.t0.map_or(start, |t| start - t) - prev.start_s;
                prev.period_s = Some(period);
                let compute = (period - prev.first_layer_wait_s).max(0.0);
                let ideal = compute.max(prev.link_busy_s);
                prev.ideal_s = Some(ideal);
                prev.saving_s = Some((period - ideal).max(0.0));
            }
        }
        self.rows.push(IterationRow {
            index,
            start_s: self.rel(start),
            period_s: None,
            comm_s: (end - start).max(0.0),
            first_layer_wait_s: wait,
            pair_lag_s: pair_lag,
            answer_wait_s: answer_wait,
            answer_idle_s: answer_idle,
            busiest_link_mb: busiest / 1e6,
            link_busy_s: busiest * 8.0 / self.options.rate_bps,
            ideal_s: None,
            saving_s: None,
        });
    }

    /// The trace events kept.
    pub fn trace(&self) -> &[TraceEvent] {
        &self.trace
    }

    /// Folds what is left and reports.
    pub fn finish(&mut self) -> Report {
        let open: Vec<u32> = self.open.keys().copied().collect();
        for i in open {
            self.fold_one(i);
        }
        let (order, source) = self.layer_order();
        let rank: HashMap<u64, usize> = order.iter().enumerate().map(|(i, k)| (*k, i)).collect();
        let mut keys: Vec<KeyRow> = self
            .keys
            .iter()
            .map(|(k, acc)| KeyRow {
                key: *k,
                layer: rank[k],
                requests: acc.requests,
                bytes: acc.bytes,
                median_latency_s: median(&mut acc.latencies.clone()).unwrap_or(0.0),
                median_push_offset_s: median(&mut acc.push_offsets.clone()).unwrap_or(0.0),
            })
            .collect();
        keys.sort_by_key(|k| k.layer);
        let steady: Vec<&IterationRow> = self
            .rows
            .iter()
            .skip(1)
            .filter(|r| r.period_s.is_some())
            .collect();
        let mut periods: Vec<f64> = steady.iter().filter_map(|r| r.period_s).collect();
        let mut waits: Vec<f64> = steady.iter().map(|r| r.first_layer_wait_s).collect();
        let mut lags: Vec<f64> = steady.iter().filter_map(|r| r.pair_lag_s).collect();
        let answer_wait: f64 = steady.iter().map(|r| r.answer_wait_s).sum();
        let answer_idle: f64 = steady.iter().map(|r| r.answer_idle_s).sum();
        let mut links: Vec<f64> = steady.iter().map(|r| r.busiest_link_mb).collect();
        let mut ideals: Vec<f64> = steady.iter().filter_map(|r| r.ideal_s).collect();
        let (mp, mi) = (median(&mut periods), median(&mut ideals));
        let nodes = self
            .topology
            .nodes()
            .iter()
            .map(|n| NodeRow {
                node: label(Some(n.id)),
                addr: n.addr,
            })
            .collect();
        let mut pairs: BTreeMap<(String, String, bool), PairRow> = BTreeMap::new();
        for ((from, dst, tunnel), row) in &self.pairs {
            let to = match self.topology.id_at(*dst) {
                Some(id) => label(Some(id)),
                None => dst.to_string(),
            };
            let merged = pairs
                .entry((from.clone(), to.clone(), *tunnel))
                .or_insert_with(|| PairRow {
                    to,
                    messages: 0,
                    keys: 0,
                    bytes: 0,
                    ..row.clone()
                });
            merged.messages += row.messages;
            merged.keys += row.keys;
            merged.bytes += row.bytes;
        }
        Report {
            nodes,
            pairs: pairs.into_values().collect(),
            iterations: self.rows.clone(),
            keys,
            summary: Summary {
                iterations: steady.len(),
                median_period_s: mp,
                median_first_layer_wait_s: median(&mut waits),
                median_pair_lag_s: median(&mut lags),
                answer_idle_share: (answer_wait > 0.0).then(|| answer_idle / answer_wait),
                median_busiest_link_mb: median(&mut links),
                median_ideal_s: mi,
                estimated_speedup: mp.zip(mi).map(|(p, i)| p / i),
                rate_bps: self.options.rate_bps,
                first_layer_key: order.first().copied(),
                layer_order: source,
            },
            unmatched_responses: self.unmatched,
            not_pslite_messages: self.not_pslite,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::slice::Part;
    use crate::inspect::streams::PsSummary;
    use bytes::Bytes;
    use p3proxy_parsers::pslite::Meta;

    fn msg(
        identity: &str,
        dst: &str,
        request: bool,
        key: u64,
        ts: i32,
        at: f64,
    ) -> ObservedMessage {
        ObservedMessage {
            conn: 0,
            identity: Bytes::copy_from_slice(identity.as_bytes()),
            dst: dst.parse().unwrap(),
            client: if identity == "ps8" {
                "10.0.0.2:1"
            } else {
                "10.0.0.3:1"
            }
            .parse()
            .unwrap(),
            tunnel: true,
            first_on_connection: false,
            wire_bytes: 100,
            first_ts: at,
            last_ts: at + 0.01,
            content: Content::Ps(Box::new(PsSummary {
                meta: Meta {
                    head: Some(0),
                    request: Some(request),
                    push: Some(true),
                    pull: Some(true),
                    timestamp: Some(ts),
                    customer_id: Some(0),
                    ..Default::default()
                },
                keys: vec![key],
                vals_bytes: 80,
                message: None,
            })),
            priority: None,
            part: None,
        }
    }

    #[test]
    fn a_split_response_is_complete_with_its_last_part_and_announced_priorities_order_keys() {
        const SERVER: &str = "10.0.0.2:4000";
        const WORKER: &str = "10.0.0.3:5000";
        let mut a = Analysis::new(Options::default());
        // No node table: which host the server answers from is learned from its traffic.
        a.on_message(&msg("ps8", "10.0.0.9:1", false, 99, 99, 0.5));
        for (i, (key, priority)) in [(7u64, 2u32), (3, 1)].into_iter().enumerate() {
            let mut req = msg("ps9", SERVER, true, key, i as i32, 1.0 + i as f64 * 0.1);
            req.priority = Some(priority);
            a.on_message(&req);
        }
        // Key 7's response comes back as three parts (slice-key responses with their own
        // keys and timestamps), key 3's whole.
        for index in 0..3u32 {
            let mut part = msg(
                "ps8",
                WORKER,
                false,
                (1 << 31) + u64::from(index),
                50 + index as i32,
                2.0 + f64::from(index),
            );
            part.part = Some(Part {
                key: 7,
                index,
                count: 3,
                slice: 40,
                total: 100,
            });
            a.on_message(&part);
            assert_eq!(
                a.trace().len(),
                usize::from(index == 2),
                "complete with the last part"
            );
        }
        a.on_message(&msg("ps8", WORKER, false, 3, 1, 1.5));
        assert_eq!(a.trace().len(), 2);
        let r = a.finish();
        let key7 = r.keys.iter().find(|k| k.key == 7).unwrap();
        assert!((key7.median_latency_s - (4.01 - 1.0)).abs() < 1e-9);
        assert_eq!(r.summary.layer_order, "p3proxy");
        assert_eq!(r.keys.iter().map(|k| k.key).collect::<Vec<_>>(), vec![3, 7]);
        assert_eq!(r.unmatched_responses, 1, "only the stray");
    }

    #[test]
    fn the_pair_lag_is_the_median_over_keys_of_first_to_last_workers_push() {
        const SERVER: &str = "10.0.0.2:4000";
        let mut a = Analysis::new(Options::default());
        // The server's host, learned from its traffic (no node table).
        a.on_message(&msg("ps8", "10.0.0.9:1", false, 99, 99, 0.5));
        for it in 0..4 {
            let t = 1.0 + f64::from(it);
            let ts = it * 10;
            // Worker 11's pushes end 50 ms (key 3) and 20 ms (key 7) after worker 9's.
            a.on_message(&msg("ps9", SERVER, true, 3, ts, t));
            a.on_message(&msg("ps11", SERVER, true, 3, ts, t + 0.05));
            a.on_message(&msg("ps9", SERVER, true, 7, ts + 1, t + 0.1));
            a.on_message(&msg("ps11", SERVER, true, 7, ts + 1, t + 0.12));
        }
        let r = a.finish();
        assert!(r.iterations.len() >= 3, "{:?}", r.iterations);
        for row in &r.iterations {
            let lag = row.pair_lag_s.expect("two workers pushed both keys");
            assert!((lag - 0.05).abs() < 1e-9, "{row:?}");
        }
        assert!((r.summary.median_pair_lag_s.unwrap() - 0.05).abs() < 1e-9);
        // One worker: no lag to measure.
        let mut one = Analysis::new(Options::default());
        one.on_message(&msg("ps8", "10.0.0.9:1", false, 99, 99, 0.5));
        for it in 0..3 {
            one.on_message(&msg("ps9", SERVER, true, 3, it, 1.0 + f64::from(it)));
        }
        assert!(one
            .finish()
            .iterations
            .iter()
            .all(|r| r.pair_lag_s.is_none()));
    }

    #[test]
    fn answer_idle_is_the_time_requests_wait_with_no_answer_on_the_wire() {
        const SERVER: &str = "10.0.0.2:4000";
        const WORKER: &str = "10.0.0.3:5000";
        let mut a = Analysis::new(Options::default());
        a.on_message(&msg("ps8", "10.0.0.9:1", false, 99, 99, 0.5));
        for it in 0..3 {
            let t = 1.0 + f64::from(it);
            let ts = it * 10;
            // Pushes at t and t + 0.1 (10 ms on the wire); answers at t + 0.3 and
            // t + 0.305 (10 ms each, overlapping 5 ms): requests wait from t + 0.01 to
            // t + 0.305, and answers are on the wire 5 ms of that.
            a.on_message(&msg("ps9", SERVER, true, 3, ts, t));
            a.on_message(&msg("ps9", SERVER, true, 7, ts + 1, t + 0.1));
            a.on_message(&msg("ps8", WORKER, false, 3, ts, t + 0.3));
            a.on_message(&msg("ps8", WORKER, false, 7, ts + 1, t + 0.305));
        }
        let r = a.finish();
        assert_eq!(r.iterations.len(), 3, "{:?}", r.iterations);
        for row in &r.iterations {
            assert!((row.answer_wait_s - 0.295).abs() < 1e-9, "{row:?}");
            assert!((row.answer_idle_s - 0.29).abs() < 1e-9, "{row:?}");
        }
        assert!((r.summary.answer_idle_share.unwrap() - 0.29 / 0.295).abs() < 1e-9);
    }

    #[test]
    fn spans_are_merged_once_and_their_overlap_measured() {
        let a = union(vec![
            (1.2, 2.0),
            (0.5, 1.5),
            (3.0, 3.5),
            (4.5, 6.0),
            (7.0, 7.0),
        ]);
        assert_eq!(a, vec![(0.5, 2.0), (3.0, 3.5), (4.5, 6.0)]);
        let b = union(vec![(1.0, 5.0)]);
        assert!((overlap(&a, &b) - (1.0 + 0.5 + 0.5)).abs() < 1e-12);
        assert_eq!(overlap(&a, &[]), 0.0);
    }
}
