//! The priority of every message (DESIGN.md §5), behind one small interface: MXNet key
//! order, a map from the model (`scripts/priority-map`), or the order learned from the
//! traffic ([`Learner`]): the job's one order ([`JobOrder`]), the lowest worker's, which
//! peer proxies pass on; plus what peer proxies said in their slice announcements.
//!
//! Priorities: 0 for fences (SimpleApp commands, control messages, anything not
//! ps-lite), then data from 1 (needed first by the forward pass). Key order gives key
//! `k` priority `1 + k`; a map or a trusted learned order gives its own ranks. Classes:
//! 0 for fences (CS6), then three bands of the data priorities seen so far (CS4, CS2, CS0).

use std::collections::HashMap;
use std::time::Instant;

use p3proxy_parsers::mxnet::ServerRanges;
use p3proxy_parsers::pslite::{MessageKind, PsMessage};

use crate::core::dscp::Dscp;
use crate::core::job_order::{JobOrder, OrderRecord};
use crate::core::learner::{Learner, RoundOutcome};

/// Priority of fences.
pub const FENCE: u32 = 0;
/// Number of priority classes (one connection and one DSCP each).
pub const CLASSES: usize = 4;
/// DSCP of each class, one per IP precedence band (switches often queue by those bits).
pub const CLASS_DSCP: [Dscp; CLASSES] = [Dscp::CS6, Dscp::CS4, Dscp::CS2, Dscp::CS0];
/// MXNet keys decode below this; slice keys (DESIGN.md §7) and compression's dummy
/// keys lie above it and are not layer keys.
const LAYER_KEYS: u64 = 1 << 31;

/// Where key priorities come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// MXNet key order (what MXNet's own P3 uses; not layer order for Gluon).
    Key,
    /// Learned from when each key's push appears in a round (the default).
    Learned,
    /// A file written from the model by `scripts/priority-map`.
    Map,
}

impl Source {
    /// Metric, log and config label.
    pub fn label(&self) -> &'static str {
        match self {
            Source::Key => "key",
            Source::Learned => "learned",
            Source::Map => "map",
        }
    }
}

/// A priority map: priority by MXNet key, for exactly `priorities.len()` keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriorityMap {
    /// Priority of key `k` at index `k` (1 = needed first).
    pub priorities: Vec<u32>,
}

/// How urgent a message is, and on which class it travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Urgency {
    /// Lower is more urgent.
    pub priority: u32,
    /// Priority class (index into [`CLASS_DSCP`]).
    pub class: usize,
    /// A fence: nothing passes it, it passes nothing.
    pub fence: bool,
}

/// Something the table learned that the operator should hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PriorityEvent {
    /// This proxy's learned order became trusted (keys ranked, groups of ties).
    Trusted,
    /// This proxy's learned order stopped holding (relearned; the job's order is the
    /// lowest worker's, key order while that one is not trusted).
    Distrusted,
    /// The map does not fit the job: a key at or past its size appeared.
    MapRefused {
        /// The map's size.
        keys: usize,
        /// The key seen.
        key: u64,
    },
}

/// The per-key priority table of one proxy.
#[derive(Debug)]
pub struct PriorityTable {
    source: Source,
    map: Option<PriorityMap>,
    learner: Learner,
    /// The job's order: this proxy's learned one and those peers passed on.
    job: JobOrder,
    /// The order in use changed since the shell last took it.
    job_changed: bool,
    /// The lowest node id of the local workers: the learner learns from its pushes.
    local_worker: Option<u32>,
    /// Wall clock of the order's versions: microseconds since the epoch at an instant.
    clock: Option<(u64, Instant)>,
    /// The last instant seen (the versions of changes that come without one).
    last_now: Option<Instant>,
    /// Priorities peer proxies announced, by learning key.
    hints: HashMap<u64, u32>,
    /// Largest data priority seen, to cut priorities into class bands.
    max_priority: u32,
}

/// A key as the learner sees it: MXNet key and server rank (a big array is split once
/// per server: each part is its own push), ordered by MXNet key.
fn learn_key(mx_key: u64, server: u64) -> u64 {
    mx_key << 16 | server.min(0xffff)
}

/// (MXNet key, learning key) of each layer key of a message.
fn layer_keys(msg: &PsMessage, ranges: Option<&ServerRanges>) -> Vec<(u64, u64)> {
    let Some(keys) = msg.keys() else {
        return Vec::new();
    };
    keys.map(|k| match ranges.and_then(|r| r.decode(k)) {
        Some(d) => (d.offset, learn_key(d.offset, d.server)),
        None => (k, learn_key(k.min(LAYER_KEYS), 0)),
    })
    .filter(|&(mx, _)| mx < LAYER_KEYS)
    .collect()
}

/// One key of the job's learned order in use (`/debug/state`).
#[derive(Debug, Clone, PartialEq)]
pub struct LearnedKey {
    /// The MXNet key.
    pub key: u64,
    /// The server rank holding this part of it.
    pub server: u64,
    /// 1 = most urgent.
    pub priority: u32,
    /// When backward produced it, after the round's first push (mean, ms).
    pub offset_ms: Option<f64>,
}

impl PriorityTable {
    /// A table using `source` (`map` must be given for [`Source::Map`]).
    pub fn new(source: Source, map: Option<PriorityMap>) -> PriorityTable {
        PriorityTable {
            source,
            map: if source == Source::Map { map } else { None },
            learner: Learner::default(),
            job: JobOrder::default(),
            job_changed: false,
            local_worker: None,
            clock: None,
            last_now: None,
            hints: HashMap::new(),
            max_priority: 1,
        }
    }

    /// The learned order's deferred share of the bytes ([`Learner::set_defer`]).
    pub fn set_defer(&mut self, share: f64) {
        self.learner.set_defer(share);
        if self.learner.is_trusted() {
            self.publish_local();
        }
    }

    /// The wall clock for the versions of this proxy's own order records: `epoch_us`
    /// microseconds since the epoch at `at` (the shell reads it once, at start).
    pub fn set_order_clock(&mut self, epoch_us: u64, at: Instant) {
        self.clock = Some((epoch_us, at));
    }

    /// The local learner's order (empty until trusted) becomes this proxy's record,
    /// once a local worker's id is known (without one, nothing to name it by: this
    /// proxy keeps its order to itself).
    fn publish_local(&mut self) {
        let Some(origin) = self.local_worker else {
            return;
        };
        let now_us = match (self.clock, self.last_now) {
            (Some((epoch_us, at)), Some(now)) => {
                epoch_us + now.saturating_duration_since(at).as_micros() as u64
            }
            (Some((epoch_us, _)), None) => epoch_us,
            (None, _) => 0,
        };
        if self.job.local(origin, self.learner.order(), now_us) {
            self.order_changed();
        }
    }

    fn order_changed(&mut self) {
        self.job_changed = true;
        if self.source == Source::Learned {
            // The scale changed (key order 1..keys; learned ranks: one per group, then
            // one per deferred key): the class bands are cut again over the new ones.
            self.max_priority = 1;
        }
    }

    /// A peer proxy passed on its order in use.
    pub fn order_received(&mut self, record: OrderRecord) {
        if self.job.received(record) {
            self.order_changed();
        }
    }

    /// A new job (node table): the orders of the one before are forgotten, and this
    /// proxy's own is passed on again under its local worker's new id at its next push.
    pub fn new_job(&mut self) {
        self.job.new_job();
        self.local_worker = None;
        self.job_changed = false;
    }

    /// This proxy's own learned order (its local worker's), whichever the job uses.
    pub fn own_order(&self) -> Vec<(u64, u32)> {
        self.learner.order()
    }

    /// The job's order in use, if it changed since the last call (to pass it on; a
    /// proxy configured with another source relays it all the same).
    #[must_use]
    pub fn take_order_change(&mut self) -> Option<OrderRecord> {
        if !std::mem::take(&mut self.job_changed) {
            return None;
        }
        self.job.in_use().cloned()
    }

    /// (origin worker, version) of the job's order in use.
    pub fn order_stamp(&self) -> Option<(u32, u64)> {
        self.job.in_use().map(|r| (r.origin, r.version))
    }

    /// The learned order's deferred share in use.
    pub fn defer(&self) -> f64 {
        self.learner.defer()
    }

    /// The source configured.
    pub fn source(&self) -> Source {
        self.source
    }

    /// The source in use now: a learned order only once the job's is trusted (the lowest
    /// worker's), a map only while it fits.
    pub fn in_use(&self) -> Source {
        match self.source {
            Source::Map if self.map.is_some() => Source::Map,
            Source::Learned if self.job.ranks_keys() => Source::Learned,
            // No order of any worker known (no local worker id): its own, once trusted.
            Source::Learned if self.job.in_use().is_none() && self.learner.is_trusted() => {
                Source::Learned
            }
            _ => Source::Key,
        }
    }

    /// The job's learned order in use (none with another source), most urgent first; a
    /// big array has one entry per server. Offsets are this proxy's own worker's, where
    /// it learned them.
    pub fn learned_order(&self) -> Vec<LearnedKey> {
        let order = match (self.source, self.job.in_use()) {
            (Source::Learned, Some(r)) => r.keys.clone(),
            (Source::Learned, None) => self.learner.order(),
            _ => Vec::new(),
        };
        order
            .iter()
            .map(|&(lk, priority)| LearnedKey {
                key: lk >> 16,
                server: lk & 0xffff,
                priority,
                offset_ms: self.learner.offset_ms(lk),
            })
            .collect()
    }

    /// Priority of one key.
    fn priority(&self, mx_key: u64, lk: u64) -> u32 {
        if let Some(p) = self
            .map
            .as_ref()
            .and_then(|m| m.priorities.get(mx_key as usize))
        {
            return *p;
        }
        if self.source == Source::Learned {
            let learned = match self.job.in_use() {
                Some(_) => self.job.priority(lk),
                None => self.learner.priority(lk),
            };
            if let Some(p) = learned {
                return p;
            }
        }
        if let Some(&p) = self.hints.get(&lk) {
            return p;
        }
        u32::try_from(mx_key)
            .unwrap_or(u32::MAX - 1)
            .saturating_add(1)
    }

    /// Class of a data priority: three bands over the priorities seen so far.
    fn data_class(&self, priority: u32) -> usize {
        let band = (u64::from(priority.max(1) - 1) * 3) / u64::from(self.max_priority);
        1 + (band as usize).min(2)
    }

    /// The urgency of a message; `ranges` (from the node table) turns ps-lite keys
    /// into MXNet keys. Without them, or for keys outside the server ranges, the
    /// message is treated by its raw key order.
    pub fn urgency(&mut self, msg: &PsMessage, ranges: Option<&ServerRanges>) -> Urgency {
        let fence = Urgency {
            priority: FENCE,
            class: 0,
            fence: true,
        };
        if !matches!(msg.kind(), MessageKind::Data { .. }) {
            return fence;
        }
        let Some(priority) = layer_keys(msg, ranges)
            .into_iter()
            .map(|(mx, lk)| self.priority(mx, lk))
            .min()
        else {
            return fence;
        };
        self.max_priority = self.max_priority.max(priority);
        Urgency {
            priority,
            class: self.data_class(priority),
            fence: false,
        }
    }

    /// Looks at a request an app of this host (node `sender`, if its identity says) sent,
    /// at `now`: pushes teach the learner (the round order of backward), and every key
    /// is checked against the map.
    pub fn observe_request(
        &mut self,
        msg: &PsMessage,
        sender: Option<u32>,
        ranges: Option<&ServerRanges>,
        now: Instant,
    ) -> Option<PriorityEvent> {
        let MessageKind::Data {
            request: true,
            push,
            ..
        } = msg.kind()
        else {
            return None;
        };
        let keys = layer_keys(msg, ranges);
        if let Some(map) = &self.map {
            if let Some(&(key, _)) = keys
                .iter()
                .find(|(mx, _)| *mx as usize >= map.priorities.len())
            {
                let keys = map.priorities.len();
                self.map = None;
                return Some(PriorityEvent::MapRefused { keys, key });
            }
        }
        if self.source != Source::Learned || !push {
            return None;
        }
        self.last_now = Some(now);
        if let Some(id) = sender {
            let lowest = self.local_worker.map_or(id, |w| w.min(id));
            if self.local_worker != Some(lowest) {
                self.local_worker = Some(lowest);
                // Named by its worker from now on (a new job, or a lower local worker).
                if self.learner.is_trusted() {
                    self.publish_local();
                }
            }
            if id != lowest {
                // Only one worker's rounds: another's pushes of the same keys would
                // close every round half way.
                return None;
            }
        }
        let mut event = None;
        // A push's values, shared evenly over its keys (one key for MXNet).
        let bytes = msg.data.get(1).map_or(0, |f| f.body.len() as u64) / keys.len().max(1) as u64;
        for (_, lk) in keys {
            match self.learner.observe(lk, bytes, now) {
                Some(RoundOutcome::Trusted) => event = Some(PriorityEvent::Trusted),
                Some(RoundOutcome::Distrusted) => event = Some(PriorityEvent::Distrusted),
                _ => {}
            }
        }
        if event.is_some() {
            self.publish_local();
        }
        event
    }

    /// A peer proxy announced `priority` for a message with these ps-lite keys: the
    /// side that did not see the pushes (a server's) uses it for the responses.
    pub fn hint(&mut self, ps_keys: &[u64], ranges: Option<&ServerRanges>, priority: u32) {
        if priority == FENCE {
            return;
        }
        for &k in ps_keys {
            let lk = match ranges.and_then(|r| r.decode(k)) {
                Some(d) if d.offset < LAYER_KEYS => learn_key(d.offset, d.server),
                Some(_) => continue,
                None if k < LAYER_KEYS => learn_key(k, 0),
                None => continue,
            };
            self.hints.insert(lk, priority);
        }
    }
}

/// Why a priority map file is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum MapError {
    /// Not the expected TOML.
    #[error("{0}")]
    Format(String),
    /// `priority` does not have `keys` entries.
    #[error("the map declares {keys} keys but lists {listed} priorities")]
    Size {
        /// Declared.
        keys: usize,
        /// Listed.
        listed: usize,
    },
    /// A priority of 0 (reserved for fences).
    #[error("key {0} has priority 0; data priorities start at 1")]
    Zero(usize),
}

impl PriorityMap {
    /// Parses a map file (TOML: `keys = N`, `priority = [p0, p1, ...]` with N entries,
    /// `model` optional).
    pub fn parse(text: &str) -> Result<PriorityMap, MapError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[allow(dead_code)]
            model: Option<String>,
            keys: usize,
            priority: Vec<u32>,
        }
        let f: File = toml::from_str(text).map_err(|e| MapError::Format(e.to_string()))?;
        if f.priority.len() != f.keys {
            return Err(MapError::Size {
                keys: f.keys,
                listed: f.priority.len(),
            });
        }
        if let Some(k) = f.priority.iter().position(|&p| p == 0) {
            return Err(MapError::Zero(k));
        }
        Ok(PriorityMap {
            priorities: f.priority,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use p3proxy_parsers::pslite::Meta;

    fn push(keys: &[u64]) -> PsMessage {
        let meta = Meta {
            head: Some(0),
            request: Some(true),
            push: Some(true),
            data_type: vec![8, 11, 3],
            ..Meta::default()
        };
        let k: Vec<u8> = keys.iter().flat_map(|k| k.to_le_bytes()).collect();
        PsMessage::new(meta, vec![Bytes::from(k), Bytes::new(), Bytes::new()])
    }

    #[test]
    fn classes_have_distinct_precedence_bands() {
        let bands: Vec<u8> = CLASS_DSCP.iter().map(|d| d.precedence()).collect();
        let mut unique = bands.clone();
        unique.dedup();
        assert_eq!(bands, unique);
        assert_eq!(bands, [6, 4, 2, 0]);
    }

    #[test]
    fn key_order_and_fences() {
        let mut t = PriorityTable::new(Source::Key, None);
        let ranges = ServerRanges::new(2).unwrap();
        // Learn the key space: keys 0..=29.
        t.urgency(&push(&[29]), Some(&ranges));
        let first = t.urgency(&push(&[0]), Some(&ranges));
        assert_eq!(
            first,
            Urgency {
                priority: 1,
                class: 1,
                fence: false
            }
        );
        let last = t.urgency(&push(&[ranges.begin(1) + 29]), Some(&ranges));
        assert_eq!(
            last,
            Urgency {
                priority: 30,
                class: 3,
                fence: false
            }
        );
        let middle = t.urgency(&push(&[15]), Some(&ranges));
        assert_eq!(middle.class, 2);
        let command = PsMessage::new(
            Meta {
                simple_app: Some(true),
                request: Some(true),
                ..Meta::default()
            },
            vec![],
        );
        assert_eq!(
            t.urgency(&command, Some(&ranges)),
            Urgency {
                priority: FENCE,
                class: 0,
                fence: true
            }
        );
        assert_eq!(t.source().label(), "key");
    }

    fn pushes_at(
        t: &mut PriorityTable,
        ranges: &ServerRanges,
        t0: Instant,
        at: &[(u64, f64)],
    ) -> Vec<PriorityEvent> {
        at.iter()
            .filter_map(|&(k, ms)| {
                t.observe_request(&push(&[k]), Some(9), Some(ranges), after(t0, ms))
            })
            .collect()
    }

    #[test]
    fn learned_order_replaces_key_order_once_trusted() {
        let ranges = ServerRanges::new(1).unwrap();
        let mut t = PriorityTable::new(Source::Learned, None);
        let t0 = Instant::now();
        // Gluon-like keys, not in layer order: key 2 is the last layer (produced first by
        // backward), key 1 the first layer (produced last); 20 ms of backward between them.
        let mut events = Vec::new();
        for round in 0..4 {
            let base = round as f64 * 1000.0;
            events.extend(pushes_at(
                &mut t,
                &ranges,
                t0,
                &[(2, base), (0, base + 20.0), (1, base + 40.0)],
            ));
            if round == 0 {
                assert_eq!(t.in_use(), Source::Key, "key order until trusted");
                assert_eq!(t.urgency(&push(&[0]), Some(&ranges)).priority, 1);
            }
        }
        assert_eq!(events, vec![PriorityEvent::Trusted]);
        assert_eq!(t.in_use(), Source::Learned);
        // Class bands over the learned ranks (1..3), not over the key order seen before.
        let classes: Vec<usize> = [1, 0, 2]
            .iter()
            .map(|&k| t.urgency(&push(&[k]), Some(&ranges)).class)
            .collect();
        assert_eq!(classes, vec![1, 2, 3]);
        assert_eq!(
            t.urgency(&push(&[1]), Some(&ranges)).priority,
            1,
            "the first layer"
        );
        assert_eq!(
            t.urgency(&push(&[2]), Some(&ranges)).priority,
            3,
            "the last layer"
        );
        assert_eq!(t.source().label(), "learned");
    }

    /// Every key's priority under `t`'s order in use.
    fn priorities(t: &mut PriorityTable, ranges: &ServerRanges, keys: &[u64]) -> Vec<u32> {
        keys.iter()
            .map(|&k| t.urgency(&push(&[k]), Some(ranges)).priority)
            .collect()
    }

    #[test]
    fn every_proxy_uses_the_lowest_workers_order_once_passed_on() {
        let ranges = ServerRanges::new(1).unwrap();
        let t0 = Instant::now();
        // Worker 11's proxy sees the last two layers' pushes as one burst, worker 9's
        // as two: they rank them differently.
        let (mut w9, mut w11) = (
            PriorityTable::new(Source::Learned, None),
            PriorityTable::new(Source::Learned, None),
        );
        let keys = [0, 1, 2, 3];
        learn(&mut w9, &ranges, 9, t0, 5.0);
        learn(&mut w11, &ranges, 11, t0, 1.0);
        let own9 = priorities(&mut w9, &ranges, &keys);
        assert_ne!(
            own9,
            priorities(&mut w11, &ranges, &keys),
            "two orders to agree on"
        );
        let from9 = w9.take_order_change().expect("worker 9's order to pass on");
        assert_eq!(from9.origin, 9);
        let from11 = w11
            .take_order_change()
            .expect("worker 11's order to pass on");
        // A server's proxy gets both, worker 11's first, and passes on worker 9's.
        let mut server = PriorityTable::new(Source::Learned, None);
        server.order_received(from11);
        assert_eq!(server.take_order_change().map(|r| r.origin), Some(11));
        server.order_received(from9.clone());
        let passed = server
            .take_order_change()
            .expect("the lowest worker's order");
        assert_eq!(passed, from9);
        w11.order_received(passed);
        assert_eq!(priorities(&mut w11, &ranges, &keys), own9);
        assert_eq!(w11.order_stamp(), w9.order_stamp());
        let ranked = |t: &PriorityTable| {
            t.learned_order()
                .iter()
                .map(|k| (k.key, k.priority))
                .collect::<Vec<_>>()
        };
        assert_eq!(ranked(&w11), ranked(&w9));
        // Worker 9's proxy ignores its own order echoed back.
        w9.order_received(from9);
        assert_eq!(w9.take_order_change(), None);
    }

    /// Four rounds of pushes of keys 0-3 (key, ms after the start), the last two layers
    /// (keys 3 and 2) `gap` ms apart.
    fn four_rounds(gap: f64) -> Vec<(u64, f64)> {
        (0..4)
            .flat_map(|round| {
                let base = f64::from(round) * 1000.0;
                [
                    (3, base),
                    (2, base + gap),
                    (0, base + 30.0),
                    (1, base + 60.0),
                ]
            })
            .collect()
    }

    /// `ms` after `t0`.
    fn after(t0: Instant, ms: f64) -> Instant {
        t0 + std::time::Duration::from_micros((ms * 1000.0) as u64)
    }

    /// Worker `sender`'s pushes of [`four_rounds`] from `t0`.
    fn learn(t: &mut PriorityTable, ranges: &ServerRanges, sender: u32, t0: Instant, gap: f64) {
        for (k, ms) in four_rounds(gap) {
            let _ = t.observe_request(&push(&[k]), Some(sender), Some(ranges), after(t0, ms));
        }
    }

    #[test]
    fn a_new_job_passes_the_own_order_on_under_the_workers_new_id() {
        let ranges = ServerRanges::new(1).unwrap();
        let t0 = Instant::now();
        let mut t = PriorityTable::new(Source::Learned, None);
        t.set_order_clock(1_000_000, t0);
        learn(&mut t, &ranges, 9, t0, 5.0);
        let first = t.take_order_change().expect("worker 9's order");
        assert_eq!(first.origin, 9);
        assert!(first.version > 1_000_000, "a publication time");
        let ranked = priorities(&mut t, &ranges, &[0, 1, 2, 3]);
        // A new node table: this host's worker is 11 now.
        t.new_job();
        assert_eq!(t.order_stamp(), None);
        assert_eq!(t.take_order_change(), None);
        let later = t0 + std::time::Duration::from_secs(10);
        let _ = t.observe_request(&push(&[3]), Some(11), Some(&ranges), later);
        let again = t.take_order_change().expect("passed on again");
        assert_eq!((again.origin, &again.keys), (11, &first.keys));
        assert!(again.version > first.version);
        assert_eq!(priorities(&mut t, &ranges, &[0, 1, 2, 3]), ranked);
    }

    #[test]
    fn only_the_lowest_local_workers_pushes_teach_the_order() {
        let ranges = ServerRanges::new(1).unwrap();
        let t0 = Instant::now();
        let mut t = PriorityTable::new(Source::Learned, None);
        let _ = t.observe_request(&push(&[3]), Some(9), Some(&ranges), t0);
        // A second local worker's pushes of the same keys, every round, in between.
        for (k, ms) in four_rounds(5.0) {
            for (sender, late) in [(9, 0.0), (11, 1.0)] {
                let now = after(t0, ms + late);
                let _ = t.observe_request(&push(&[k]), Some(sender), Some(&ranges), now);
            }
        }
        assert_eq!(
            t.in_use(),
            Source::Learned,
            "worker 11's pushes closed no round"
        );
        assert_eq!(t.order_stamp().map(|(origin, _)| origin), Some(9));
    }

    #[test]
    fn a_proxy_on_key_order_relays_the_jobs_order_without_using_it() {
        let ranges = ServerRanges::new(1).unwrap();
        let mut w9 = PriorityTable::new(Source::Learned, None);
        learn(&mut w9, &ranges, 9, Instant::now(), 5.0);
        let record = w9.take_order_change().expect("worker 9's order");
        let mut t = PriorityTable::new(Source::Key, None);
        t.order_received(record.clone());
        assert_eq!(t.take_order_change(), Some(record), "passed on");
        assert_eq!(t.in_use(), Source::Key);
        assert_eq!(priorities(&mut t, &ranges, &[0, 1, 2, 3]), vec![1, 2, 3, 4]);
        assert!(t.learned_order().is_empty());
    }

    #[test]
    fn a_cpu_job_teaches_nothing() {
        let ranges = ServerRanges::new(2).unwrap();
        let mut t = PriorityTable::new(Source::Learned, None);
        let t0 = Instant::now();
        // Every pushpull after backward, in key order, in one burst; big keys split
        // over both servers.
        for round in 0..6 {
            let base = round as f64 * 1000.0;
            let mut at = Vec::new();
            for k in 0..20u64 {
                at.push((k, base + k as f64 * 0.01));
                if k % 5 == 0 {
                    at.push((ranges.begin(1) + k, base + k as f64 * 0.01 + 0.001));
                }
            }
            assert_eq!(pushes_at(&mut t, &ranges, t0, &at), vec![]);
        }
        assert_eq!(t.in_use(), Source::Key);
    }

    #[test]
    fn a_map_gives_priorities_and_a_wrong_sized_one_is_refused() {
        let ranges = ServerRanges::new(1).unwrap();
        let map = PriorityMap::parse("model = \"m\"\nkeys = 3\npriority = [3, 1, 2]\n").unwrap();
        let mut t = PriorityTable::new(Source::Map, Some(map));
        assert_eq!(t.in_use(), Source::Map);
        assert_eq!(t.urgency(&push(&[1]), Some(&ranges)).priority, 1);
        assert_eq!(t.urgency(&push(&[0]), Some(&ranges)).priority, 3);
        // The job has a key the map does not know: the map is for another model.
        assert_eq!(
            t.observe_request(&push(&[7]), Some(9), Some(&ranges), Instant::now()),
            Some(PriorityEvent::MapRefused { keys: 3, key: 7 })
        );
        assert_eq!(t.in_use(), Source::Key);
        assert_eq!(
            t.urgency(&push(&[0]), Some(&ranges)).priority,
            1,
            "key order"
        );
        assert_eq!(
            PriorityMap::parse("keys = 3\npriority = [1, 2]"),
            Err(MapError::Size { keys: 3, listed: 2 })
        );
        assert_eq!(
            PriorityMap::parse("keys = 1\npriority = [0]"),
            Err(MapError::Zero(0))
        );
        assert!(matches!(
            PriorityMap::parse("keys = 1\nprio = [1]"),
            Err(MapError::Format(_))
        ));
    }

    #[test]
    fn announced_priorities_order_the_responses() {
        let ranges = ServerRanges::new(2).unwrap();
        let mut t = PriorityTable::new(Source::Learned, None);
        let k = ranges.begin(1) + 9;
        t.hint(&[k], Some(&ranges), 2);
        assert_eq!(t.urgency(&push(&[k]), Some(&ranges)).priority, 2);
        assert_eq!(
            t.urgency(&push(&[9]), Some(&ranges)).priority,
            10,
            "the other server's part: no hint"
        );
    }
}
