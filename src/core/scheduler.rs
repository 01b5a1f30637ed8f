//! The egress scheduler, sans-IO (DESIGN.md §5): which bytes to write next, where.
//!
//! Messages belong to a *session* (one relayed ZMTP connection: the ordering domain of
//! DESIGN.md §4) and go out on a *lane* (an output connection: a tunnel class
//! connection, or a direct ZMTP connection). Strict priority across every lane of the
//! proxy, FIFO among equals; within a session a data message may overtake another only
//! if their keys are disjoint, and fences (commands, control, anything not ps-lite)
//! neither pass nor are passed. A sliced lane interleaves slices of several messages
//! (the tunnel's slice headers say whose bytes they are), so a more urgent message
//! preempts a big one between two slices; a whole lane carries one message at a time.
//!
//! No sockets, no clock: time is passed in. Call [`Scheduler::enqueue`] when a message
//! arrives, and [`Scheduler::poll_transmit`] whenever a lane can take bytes, until it
//! returns `None`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// An ordering domain: one relayed ZMTP connection.
pub type SessionId = u64;
/// An output connection.
pub type LaneId = u64;
/// A message, numbered in arrival order across the whole proxy.
pub type MsgId = u64;

/// How an output connection carries messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaneKind {
    /// Slices of several messages may interleave (a tunnel class connection).
    Sliced,
    /// One message at a time, start to end (a ZMTP connection to an app without proxy).
    Whole,
}

/// What the scheduler needs to know about a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageSpec {
    /// Its ordering domain.
    pub session: SessionId,
    /// The output connection it must go on.
    pub lane: LaneId,
    /// Lower is more urgent; 0 for fences.
    pub priority: u32,
    /// Bytes to send.
    pub len: u64,
    /// A fence: nothing passes it, it passes nothing.
    pub fence: bool,
    /// Keys of a data message (overtaking needs disjoint keys).
    pub keys: Vec<u64>,
}

/// Bytes to write now: `len` bytes of message `msg` from `offset`, on `lane`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Transmit {
    /// The message.
    pub msg: MsgId,
    /// Its session.
    pub session: SessionId,
    /// The output connection.
    pub lane: LaneId,
    /// First byte of the slice within the message.
    pub offset: u64,
    /// Slice length.
    pub len: u64,
    /// This slice ends the message (its memory is released).
    pub last: bool,
    /// Time from arrival to this message's first byte (set on its first slice).
    pub queue_delay: Option<Duration>,
    /// Sending this slice interrupted a less urgent message that is still unfinished on the same lane.
    pub preempted: bool,
}

/// Refused: the memory budget is full; stop reading from the app until bytes drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("scheduler memory budget of {budget} bytes is full ({used} used, {wanted} wanted)")]
pub struct Backpressure {
    /// The budget.
    pub budget: u64,
    /// In use.
    pub used: u64,
    /// Asked for.
    pub wanted: u64,
}

#[derive(Debug)]
struct Queued {
    spec: MessageSpec,
    sent: u64,
    arrived: Instant,
    started: bool,
}

/// The scheduler of one proxy.
#[derive(Debug)]
pub struct Scheduler {
    slice_bytes: u64,
    budget: u64,
    used: u64,
    next_id: MsgId,
    msgs: HashMap<MsgId, Queued>,
    /// Unfinished messages of each session, in arrival order.
    sessions: HashMap<SessionId, VecDeque<MsgId>>,
    /// Every unfinished message by (priority, arrival): the candidates, most urgent first.
    order: BTreeSet<(u32, MsgId)>,
    lanes: HashMap<LaneId, LaneKind>,
    /// The message a whole lane is in the middle of.
    busy: HashMap<LaneId, MsgId>,
    /// The message each lane sent its last slice of (to count preemptions).
    last_on_lane: HashMap<LaneId, MsgId>,
}

impl Scheduler {
    /// A scheduler cutting `slice_bytes` slices and holding at most `budget` bytes.
    pub fn new(slice_bytes: u64, budget: u64) -> Scheduler {
        assert!(slice_bytes > 0, "slices hold at least one byte");
        Scheduler {
            slice_bytes,
            budget,
            used: 0,
            next_id: 0,
            msgs: HashMap::new(),
            sessions: HashMap::new(),
            order: BTreeSet::new(),
            lanes: HashMap::new(),
            busy: HashMap::new(),
            last_on_lane: HashMap::new(),
        }
    }

    /// Declares an output connection (before messages use it).
    pub fn add_lane(&mut self, lane: LaneId, kind: LaneKind) {
        self.lanes.insert(lane, kind);
    }

    /// Bytes queued and not yet handed out.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Messages not yet fully handed out.
    pub fn queued(&self) -> usize {
        self.msgs.len()
    }

    /// Queues a message that arrived at `now`. A message larger than the whole
    /// budget is admitted when nothing else is queued, so that it cannot wedge.
    pub fn enqueue(&mut self, spec: MessageSpec, now: Instant) -> Result<MsgId, Backpressure> {
        assert!(
            self.lanes.contains_key(&spec.lane),
            "lane {} was not declared",
            spec.lane
        );
        let fits = self.used + spec.len <= self.budget || self.used == 0;
        if !fits {
            return Err(Backpressure {
                budget: self.budget,
                used: self.used,
                wanted: spec.len,
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        self.used += spec.len;
        self.order.insert((spec.priority, id));
        self.sessions.entry(spec.session).or_default().push_back(id);
        self.msgs.insert(
            id,
            Queued {
                spec,
                sent: 0,
                arrived: now,
                started: false,
            },
        );
        Ok(id)
    }

    /// Whether a session has messages not yet fully handed out.
    pub fn has_queued(&self, session: SessionId) -> bool {
        self.sessions.contains_key(&session)
    }

    /// Drops every unsent message of a session whose connections closed, releasing
    /// their memory; returns the dropped messages. Lanes mid-message are freed.
    pub fn drop_session(&mut self, session: SessionId) -> Vec<MsgId> {
        let Some(queue) = self.sessions.remove(&session) else {
            return Vec::new();
        };
        for id in &queue {
            let m = self.msgs.remove(id).expect("queued message");
            self.used -= m.spec.len;
            self.order.remove(&(m.spec.priority, *id));
            if self.busy.get(&m.spec.lane) == Some(id) {
                self.busy.remove(&m.spec.lane);
            }
        }
        queue.into()
    }

    /// Forgets an output connection that closed (its session was dropped first).
    pub fn remove_lane(&mut self, lane: LaneId) {
        self.lanes.remove(&lane);
        self.busy.remove(&lane);
        self.last_on_lane.remove(&lane);
    }

    /// Whether message `id` may send now under the ordering rules of its session.
    fn eligible(&self, id: MsgId) -> bool {
        let m = &self.msgs[&id];
        let queue = &self.sessions[&m.spec.session];
        for &earlier in queue.iter().take_while(|&&e| e != id) {
            let e = &self.msgs[&earlier];
            if m.spec.fence || e.spec.fence {
                return false;
            }
            if e.spec.keys.iter().any(|k| m.spec.keys.contains(k)) {
                return false;
            }
        }
        true
    }

    /// The next slice to write, given how many bytes each lane can take now.
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        capacity: impl Fn(LaneId) -> u64,
    ) -> Option<Transmit> {
        let pick = self.order.iter().map(|&(_, id)| id).find(|&id| {
            let m = &self.msgs[&id];
            let lane = m.spec.lane;
            capacity(lane) > 0 && self.busy.get(&lane).is_none_or(|&b| b == id) && self.eligible(id)
        })?;
        let lane = self.msgs[&pick].spec.lane;
        let room = capacity(lane);
        // A less urgent message on this lane was started and is not finished: preempted.
        let preempted = self
            .last_on_lane
            .insert(lane, pick)
            .is_some_and(|prev| prev != pick && self.msgs.get(&prev).is_some_and(|p| p.sent > 0));
        let m = self.msgs.get_mut(&pick).expect("picked from the queue");
        let kind = self.lanes[&lane];
        let remaining = m.spec.len - m.sent;
        let len = remaining.min(room).min(if kind == LaneKind::Sliced {
            self.slice_bytes
        } else {
            u64::MAX
        });
        let offset = m.sent;
        m.sent += len;
        let queue_delay = (!m.started).then(|| now.saturating_duration_since(m.arrived));
        m.started = true;
        let last = m.sent == m.spec.len;
        let session = m.spec.session;
        let priority = m.spec.priority;
        if kind == LaneKind::Whole {
            if last {
                self.busy.remove(&lane);
            } else {
                self.busy.insert(lane, pick);
            }
        }
        if last {
            self.used -= m.spec.len;
            self.msgs.remove(&pick);
            self.order.remove(&(priority, pick));
            let q = self
                .sessions
                .get_mut(&session)
                .expect("session of a queued message");
            q.retain(|&x| x != pick);
            if q.is_empty() {
                self.sessions.remove(&session);
            }
        }
        Some(Transmit {
            msg: pick,
            session,
            lane,
            offset,
            len,
            last,
            queue_delay,
            preempted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(
        session: SessionId,
        lane: LaneId,
        priority: u32,
        len: u64,
        keys: &[u64],
    ) -> MessageSpec {
        MessageSpec {
            session,
            lane,
            priority,
            len,
            fence: false,
            keys: keys.to_vec(),
        }
    }

    fn fence(session: SessionId, lane: LaneId, len: u64) -> MessageSpec {
        MessageSpec {
            session,
            lane,
            priority: 0,
            len,
            fence: true,
            keys: vec![],
        }
    }

    fn drain(s: &mut Scheduler, now: Instant) -> Vec<Transmit> {
        std::iter::from_fn(|| s.poll_transmit(now, |_| u64::MAX)).collect()
    }

    #[test]
    fn urgent_message_overtakes_a_big_one_between_slices() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(160_000, 1 << 30);
        s.add_lane(1, LaneKind::Sliced);
        s.add_lane(2, LaneKind::Sliced);
        let big = s.enqueue(data(1, 2, 100, 40_000_000, &[7]), t0).unwrap();
        // Three slices of the big one go out...
        for _ in 0..3 {
            assert_eq!(s.poll_transmit(t0, |_| u64::MAX).unwrap().msg, big);
        }
        // ...then a first-layer key arrives on another session and goes next.
        let t1 = t0 + Duration::from_millis(5);
        let urgent = s.enqueue(data(2, 1, 1, 200_000, &[0]), t1).unwrap();
        let tx = s.poll_transmit(t1, |_| u64::MAX).unwrap();
        assert_eq!(
            (tx.msg, tx.len, tx.queue_delay),
            (urgent, 160_000, Some(Duration::ZERO))
        );
        let tx = s.poll_transmit(t1, |_| u64::MAX).unwrap();
        assert_eq!(
            (tx.msg, tx.offset, tx.len, tx.last),
            (urgent, 160_000, 40_000, true)
        );
        assert_eq!(s.poll_transmit(t1, |_| u64::MAX).unwrap().msg, big);
    }

    #[test]
    fn dropping_a_session_releases_its_memory_and_its_lanes() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(100, 1000);
        s.add_lane(1, LaneKind::Whole);
        s.add_lane(2, LaneKind::Sliced);
        s.enqueue(data(1, 1, 5, 600, &[1]), t0).unwrap();
        s.enqueue(data(2, 2, 9, 300, &[2]), t0).unwrap();
        // Lane 1 is mid-message when its session goes away.
        let tx = s
            .poll_transmit(t0, |l| if l == 1 { 200 } else { 0 })
            .unwrap();
        assert!(!tx.last);
        assert!(s.enqueue(data(2, 2, 9, 300, &[3]), t0).is_err());
        assert_eq!(s.drop_session(1), vec![0]);
        assert_eq!(s.drop_session(1), Vec::<MsgId>::new());
        s.remove_lane(1);
        assert_eq!((s.used(), s.queued()), (300, 1));
        s.enqueue(data(2, 2, 9, 300, &[3]), t0).unwrap();
        let sent: u64 = drain(&mut s, t0).iter().map(|t| t.len).sum();
        assert_eq!((sent, s.used()), (600, 0));
    }

    #[test]
    fn preemption_on_one_sliced_lane_is_counted() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(100, 1 << 20);
        s.add_lane(1, LaneKind::Sliced);
        let low = s.enqueue(data(1, 1, 9, 1000, &[5]), t0).unwrap();
        assert_eq!(s.poll_transmit(t0, |_| u64::MAX).unwrap().msg, low);
        let high = s.enqueue(data(1, 1, 1, 50, &[0]), t0).unwrap();
        let tx = s.poll_transmit(t0, |_| u64::MAX).unwrap();
        assert_eq!((tx.msg, tx.preempted), (high, true));
    }

    #[test]
    fn a_whole_lane_finishes_its_message_first() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(100, 1 << 20);
        s.add_lane(1, LaneKind::Whole);
        let low = s.enqueue(data(1, 1, 9, 1000, &[5]), t0).unwrap();
        // The lane takes 300 bytes now: the message is started.
        let tx = s.poll_transmit(t0, |_| 300).unwrap();
        assert_eq!((tx.msg, tx.len), (low, 300));
        let high = s.enqueue(data(2, 1, 1, 50, &[0]), t0).unwrap();
        let tx = s.poll_transmit(t0, |_| u64::MAX).unwrap();
        assert_eq!((tx.msg, tx.offset, tx.len, tx.last), (low, 300, 700, true));
        assert_eq!(s.poll_transmit(t0, |_| u64::MAX).unwrap().msg, high);
    }

    #[test]
    fn fences_and_shared_keys_keep_their_order() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(1 << 20, 1 << 30);
        s.add_lane(1, LaneKind::Sliced);
        let a = s.enqueue(data(1, 1, 50, 10, &[3]), t0).unwrap();
        let f = s.enqueue(fence(1, 1, 10), t0).unwrap();
        let b = s.enqueue(data(1, 1, 1, 10, &[4]), t0).unwrap();
        let c = s.enqueue(data(1, 1, 0, 10, &[4]), t0).unwrap();
        let order: Vec<MsgId> = drain(&mut s, t0).iter().map(|t| t.msg).collect();
        assert_eq!(
            order,
            [a, f, b, c],
            "fence waits for a; b and c share key 4"
        );
    }

    #[test]
    fn disjoint_keys_overtake_within_a_session() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(1 << 20, 1 << 30);
        s.add_lane(1, LaneKind::Sliced);
        let late_layer = s.enqueue(data(1, 1, 30, 10, &[30]), t0).unwrap();
        let first_layer = s.enqueue(data(1, 1, 1, 10, &[1]), t0).unwrap();
        let order: Vec<MsgId> = drain(&mut s, t0).iter().map(|t| t.msg).collect();
        assert_eq!(order, [first_layer, late_layer]);
    }

    #[test]
    fn memory_budget_applies_backpressure() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(100, 1000);
        s.add_lane(1, LaneKind::Sliced);
        s.enqueue(data(1, 1, 1, 800, &[1]), t0).unwrap();
        assert_eq!(
            s.enqueue(data(1, 1, 1, 300, &[2]), t0),
            Err(Backpressure {
                budget: 1000,
                used: 800,
                wanted: 300
            })
        );
        let _ = drain(&mut s, t0);
        assert_eq!(s.used(), 0);
        // Bigger than the budget, but alone: admitted so it cannot wedge.
        assert!(s.enqueue(data(1, 1, 1, 5000, &[2]), t0).is_ok());
    }

    #[test]
    fn a_full_lane_does_not_block_the_others() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(100, 1 << 20);
        s.add_lane(1, LaneKind::Sliced);
        s.add_lane(2, LaneKind::Sliced);
        s.enqueue(data(1, 1, 1, 100, &[1]), t0).unwrap();
        let other = s.enqueue(data(2, 2, 9, 100, &[2]), t0).unwrap();
        let tx = s
            .poll_transmit(t0, |lane| if lane == 1 { 0 } else { 1000 })
            .unwrap();
        assert_eq!(tx.msg, other);
    }

    /// A simulated link: the lane drains `rate` bytes per millisecond of fabricated time.
    #[test]
    fn simulated_link_first_layer_waits_only_for_the_slice_in_flight() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(160_000, 1 << 30);
        s.add_lane(1, LaneKind::Sliced);
        let rate_per_ms = 125_000u64; // 1 Gbit/s
        let big = s.enqueue(data(1, 1, 100, 40_000_000, &[9]), t0).unwrap();
        let mut now = t0;
        let mut arrived_first = None;
        let mut first = None;
        for step in 0..400u64 {
            if step == 100 {
                first = Some(s.enqueue(data(2, 1, 1, 16_000, &[0]), now).unwrap());
            }
            if let Some(tx) = s.poll_transmit(now, |_| u64::MAX) {
                now += Duration::from_micros(tx.len * 1000 / rate_per_ms);
                if Some(tx.msg) == first && tx.last {
                    arrived_first = Some(now);
                }
            }
        }
        let _ = big;
        let enqueued_at = t0 + Duration::from_micros(100 * 160_000 * 1000 / rate_per_ms);
        let waited = arrived_first.unwrap() - enqueued_at;
        // At most one 160 KB slice (1.28 ms) plus its own 16 KB (0.128 ms).
        assert!(
            waited <= Duration::from_micros(1_280 + 128),
            "waited {waited:?}"
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Enqueue {
            session: u8,
            lane: u8,
            priority: u8,
            len: u16,
            fence: bool,
            key: u8,
        },
        Poll {
            lane_room: u16,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (
                0..3u8,
                0..3u8,
                0..5u8,
                1..3000u16,
                proptest::bool::weighted(0.15),
                0..6u8
            )
                .prop_map(|(session, lane, priority, len, fence, key)| Op::Enqueue {
                    session,
                    lane,
                    priority,
                    len,
                    fence,
                    key
                }),
            (0..2000u16).prop_map(|lane_room| Op::Poll { lane_room }),
        ]
    }

    proptest! {
        /// Under random interleavings: every byte of every message is handed out once,
        /// in order; fences and shared keys are never overtaken within a session; the
        /// most urgent eligible message always goes first; memory stays in budget.
        #[test]
        fn ordering_rules_hold(ops in proptest::collection::vec(op(), 1..200), whole in proptest::bool::ANY) {
            let t0 = Instant::now();
            let budget = 20_000;
            let mut s = Scheduler::new(500, budget);
            for lane in 0..3 {
                s.add_lane(lane, if whole && lane == 2 { LaneKind::Whole } else { LaneKind::Sliced });
            }
            let mut specs: HashMap<MsgId, MessageSpec> = HashMap::new();
            let mut arrival: Vec<MsgId> = vec![];
            let mut sent: HashMap<MsgId, u64> = HashMap::new();
            let mut done: Vec<MsgId> = vec![];
            let mut started: Vec<MsgId> = vec![];
            let check_tx = |tx: &Transmit, specs: &HashMap<MsgId, MessageSpec>, sent: &HashMap<MsgId, u64>, done: &Vec<MsgId>, arrival: &Vec<MsgId>| -> Result<(), TestCaseError> {
                let spec = &specs[&tx.msg];
                prop_assert_eq!(tx.offset, sent.get(&tx.msg).copied().unwrap_or(0), "contiguous");
                // Nothing earlier in the session that this message may not pass is unfinished.
                for &e in arrival.iter().take_while(|&&e| e != tx.msg) {
                    let es = &specs[&e];
                    if es.session != spec.session || done.contains(&e) { continue; }
                    let blocks = es.fence || spec.fence || es.keys.iter().any(|k| spec.keys.contains(k));
                    prop_assert!(!blocks, "message {} passed {} in session {}", tx.msg, e, spec.session);
                }
                Ok(())
            };
            for o in ops.into_iter().chain(std::iter::repeat_n(Op::Poll { lane_room: u16::MAX }, 400)) {
                match o {
                    Op::Enqueue { session, lane, priority, len, fence, key } => {
                        let spec = MessageSpec { session: session.into(), lane: lane.into(), priority: if fence { 0 } else { u32::from(priority) + 1 }, len: len.into(), fence, keys: if fence { vec![] } else { vec![key.into()] } };
                        if let Ok(id) = s.enqueue(spec.clone(), t0) {
                            specs.insert(id, spec);
                            arrival.push(id);
                        }
                        prop_assert!(s.used() <= budget.max(specs.values().map(|s| s.len).max().unwrap_or(0)));
                    }
                    Op::Poll { lane_room } => {
                        if let Some(tx) = s.poll_transmit(t0, |_| u64::from(lane_room)) {
                            check_tx(&tx, &specs, &sent, &done, &arrival)?;
                            if !whole {
                                // Strict priority: no eligible unfinished message is more urgent.
                                for &m in arrival.iter().filter(|m| !done.contains(m)) {
                                    let ms = &specs[&m];
                                    let blocked = arrival.iter().take_while(|&&e| e != m).any(|e| {
                                        let es = &specs[e];
                                        es.session == ms.session && !done.contains(e)
                                            && (es.fence || ms.fence || es.keys.iter().any(|k| ms.keys.contains(k)))
                                    });
                                    if !blocked {
                                        prop_assert!((ms.priority, m) >= (specs[&tx.msg].priority, tx.msg), "{} went before more urgent {}", tx.msg, m);
                                    }
                                }
                            }
                            if !started.contains(&tx.msg) { started.push(tx.msg); }
                            *sent.entry(tx.msg).or_insert(0) += tx.len;
                            prop_assert!(tx.len > 0 && tx.len <= 500 || s.lanes[&tx.lane] == LaneKind::Whole);
                            if tx.last {
                                prop_assert_eq!(sent[&tx.msg], specs[&tx.msg].len);
                                done.push(tx.msg);
                            }
                        }
                    }
                }
            }
            prop_assert_eq!(s.queued(), 0);
            prop_assert_eq!(s.used(), 0);
            let mut all: Vec<MsgId> = specs.keys().copied().collect();
            all.sort_unstable();
            let mut finished = done.clone();
            finished.sort_unstable();
            prop_assert_eq!(all, finished, "every message handed out once");
        }
    }
}
