//! The egress scheduler's shell (DESIGN.md §5): one [`Scheduler`] per proxy behind a
//! lock. Session readers enqueue whole messages; one writer task per output
//! connection (a *lane*) asks it what to write next, writes it with one vectored
//! write, and asks again. Kernel queues stay short (`TCP_NOTSENT_LOWAT`, set on every
//! proxy socket), so the next pick is made late, with the latest arrivals in view.

use std::collections::HashMap;
use std::io::IoSlice;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Buf, Bytes};
use p3proxy_parsers::zmtp::ZmtpMessage;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use super::memory::MemoryReturn;
use crate::core::answer_idle::{AnswerIdle, AnswerTotals};
use crate::core::job_order::OrderRecord;
use crate::core::pacing::Pacer;
use crate::core::priority::Urgency;
use crate::core::scheduler::{LaneId, LaneKind, MessageSpec, MsgId, Scheduler, SessionId};
use crate::core::slice::{encode_slice_header, Announce, Part, SliceFrame, MAX_ANNOUNCED_KEYS};
use crate::core::split::Pieces;
use crate::metrics;

/// A session passes the job's order on again after this many announcements: a peer
/// that forgot it (a new node table) or never took it gets it back (a few KB, rarely).
const ORDER_RESEND_ANNOUNCEMENTS: u32 = 1024;

/// What a whole lane writes per wake-up at most, after its first message: small
/// messages go out in one write, a big one alone.
const WHOLE_BATCH: u64 = 256 * 1024;

/// The bytes of one queued unit: a ZMTP message, or a command frame's encoding.
#[derive(Debug)]
pub(crate) enum Body {
    /// A message (bodies are not copied; headers are made as the pieces are cut).
    Message(ZmtpMessage),
    /// Raw wire bytes (a ZMTP command).
    Raw(Bytes),
    /// Wire bytes as pieces (a merged split response).
    Pieces(Pieces),
}

impl Body {
    pub(crate) fn len(&self) -> u64 {
        match self {
            Body::Message(m) => m.encoded_len() as u64,
            Body::Raw(b) => b.len() as u64,
            Body::Pieces(p) => p.len,
        }
    }

    fn range(&self, offset: u64, len: u64) -> Vec<Bytes> {
        let (o, l) = (offset as usize, len as usize);
        match self {
            Body::Message(m) => m.wire_range(o, l),
            Body::Raw(b) => vec![b.slice(o..o + l)],
            Body::Pieces(p) => p.range(offset, len),
        }
    }
}

/// A message for the scheduler.
#[derive(Debug)]
pub(crate) struct Item {
    /// Its session.
    pub(crate) session: SessionId,
    /// The lane it goes on.
    pub(crate) lane: LaneId,
    /// Sliced sessions: the lane its announcement goes on (the main stream), and its
    /// number in the session.
    pub(crate) announce: Option<(LaneId, u64)>,
    /// Priority, class, fence.
    pub(crate) urgency: Urgency,
    /// Its ps-lite keys (overtaking needs disjoint keys).
    pub(crate) keys: Vec<u64>,
    /// A slice-key response the peer proxy merges.
    pub(crate) part: Option<Part>,
    /// Its bytes.
    pub(crate) body: Body,
}

#[derive(Debug)]
struct Queued {
    body: Body,
    seq: u64,
    class: usize,
}

#[derive(Debug)]
struct Lane {
    kind: LaneKind,
    session: SessionId,
    wake: Arc<Notify>,
    /// Announcements to write before the next slice.
    control: Vec<u8>,
    /// The session's reader ended: write what is queued, then end.
    finishing: bool,
    /// It carries a local server's answers.
    answers: bool,
    /// The peer proxy's host it goes to (a tunnel lane; paced toward it).
    peer: Option<IpAddr>,
    /// (origin, version) of the job's order last passed on here (a session's main
    /// stream), and the announcements since.
    order_sent: Option<(u32, u64)>,
    since_order: u32,
}

#[derive(Debug)]
struct State {
    sched: Scheduler,
    bodies: HashMap<MsgId, Queued>,
    lanes: HashMap<LaneId, Lane>,
    next_lane: LaneId,
    /// The answers' idle time while requests wait (with the link rate).
    answer_link: Option<AnswerIdle>,
    /// Pacing: the rate toward each peer host, once known (`--pace`).
    pace_bps: Option<f64>,
    /// One pacer per peer host, over every lane to it.
    pacers: HashMap<IpAddr, Pacer>,
    /// The job's order in use ((origin, version), its frame), which every tunnel
    /// session passes on ahead of its next announcement.
    order: Option<((u32, u64), Vec<u8>)>,
}

/// The egress of one proxy.
#[derive(Debug)]
pub(crate) struct Egress {
    state: Mutex<State>,
    /// Woken when queued bytes are handed out (readers waiting on the budget).
    space: Notify,
    slice_bytes: u64,
    metrics: metrics::EgressMetrics,
    memory: MemoryReturn,
}

/// What a lane writer does next.
#[derive(Debug)]
pub(crate) enum Next {
    /// Write these pieces, in order.
    Write(Vec<Bytes>),
    /// Nothing to write: wait for the lane's wake-up.
    Idle,
    /// Paced: wait until then (or the wake-up) and ask again.
    Wait(Instant),
    /// The session finished and everything is written: shut the connection down.
    Finished,
}

impl Egress {
    /// An egress cutting `slice_bytes` slices, holding at most `budget` bytes; with the
    /// link's rate, it measures how long answers idle while requests wait.
    pub(crate) fn new(slice_bytes: u64, budget: u64, link_rate_bps: Option<f64>) -> Egress {
        Egress {
            state: Mutex::new(State {
                sched: Scheduler::new(slice_bytes, budget),
                bodies: HashMap::new(),
                lanes: HashMap::new(),
                next_lane: 0,
                answer_link: link_rate_bps.map(AnswerIdle::new),
                pace_bps: None,
                pacers: HashMap::new(),
                order: None,
            }),
            space: Notify::new(),
            slice_bytes,
            metrics: metrics::EgressMetrics::new(),
            memory: MemoryReturn::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("egress lock")
    }

    /// Whether the queue is empty after enough went through it that the freed
    /// memory should go back to the kernel (see `io::memory`).
    pub(crate) fn memory_return_due(&self) -> bool {
        let used = self.lock().sched.used();
        self.memory.due(used)
    }

    /// Declares an output connection of `session` (`answers`: a local server's; `peer`:
    /// the peer proxy's host of a tunnel lane); returns its id and wake-up.
    pub(crate) fn add_lane(
        &self,
        session: SessionId,
        kind: LaneKind,
        answers: bool,
        peer: Option<IpAddr>,
    ) -> (LaneId, Arc<Notify>) {
        let mut st = self.lock();
        let id = st.next_lane;
        st.next_lane += 1;
        st.sched.add_lane(id, kind);
        let wake = Arc::new(Notify::new());
        st.lanes.insert(
            id,
            Lane {
                kind,
                session,
                wake: wake.clone(),
                control: Vec::new(),
                finishing: false,
                answers,
                peer,
                order_sent: None,
                since_order: 0,
            },
        );
        (id, wake)
    }

    /// From now on every tunnel session passes `record` on to its peer proxy, once,
    /// ahead of its next announcement (`crate::core::job_order`).
    pub(crate) fn pass_on_order(&self, record: &OrderRecord) {
        let mut frame = Vec::new();
        SliceFrame::Order(record.clone()).encode_header(&mut frame);
        self.lock().order = Some(((record.origin, record.version), frame));
    }

    /// No order to pass on (a new job forgot the one before).
    pub(crate) fn forget_order(&self) {
        self.lock().order = None;
    }

    /// Paces every peer host's lanes at `rate_bps` from now on (`None`: no pacing).
    pub(crate) fn set_pacing(&self, rate_bps: Option<f64>) {
        let mut st = self.lock();
        if st.pace_bps != rate_bps {
            st.pace_bps = rate_bps;
            st.pacers.clear();
        }
    }

    /// From `now` on, requests this proxy relayed wait for answers or not.
    pub(crate) fn requests_waiting(&self, now: Instant, waiting: bool) {
        let mut st = self.lock();
        if let Some(a) = &mut st.answer_link {
            a.set_waiting(now, waiting);
            if let Some(w) = a.take_window() {
                metrics::answer_idle(w.idle_share());
            }
        }
    }

    /// Time with requests waiting, and how long of it no answer was on the link (only
    /// with the link rate).
    pub(crate) fn answer_totals(&self) -> Option<AnswerTotals> {
        self.lock().answer_link.as_ref().map(AnswerIdle::totals)
    }

    /// Queues a message, waiting while the memory budget is full (which stops the
    /// caller from reading its app: backpressure).
    pub(crate) async fn enqueue(&self, item: Item) {
        let fence = item.urgency.fence || item.keys.len() > MAX_ANNOUNCED_KEYS;
        let keys = if fence { Vec::new() } else { item.keys };
        let spec = MessageSpec {
            session: item.session,
            lane: item.lane,
            priority: item.urgency.priority,
            len: item.body.len(),
            fence,
            keys,
        };
        let mut body = Some(item.body);
        loop {
            // Registered before the check: a release in between is not missed.
            let released = self.space.notified();
            {
                let mut st = self.lock();
                if let Ok(id) = st.sched.enqueue(spec.clone(), Instant::now()) {
                    let seq = item.announce.map_or(0, |(_, seq)| seq);
                    if let Some((main, seq)) = item.announce {
                        let frame = SliceFrame::Announce(Announce {
                            seq,
                            total: spec.len,
                            priority: spec.priority,
                            fence: spec.fence,
                            keys: spec.keys,
                            part: item.part,
                        });
                        let st = &mut *st;
                        if let Some(lane) = st.lanes.get_mut(&main) {
                            if let Some((stamp, order)) = &st.order {
                                lane.since_order += 1;
                                if lane.order_sent != Some(*stamp)
                                    || lane.since_order >= ORDER_RESEND_ANNOUNCEMENTS
                                {
                                    lane.control.extend_from_slice(order);
                                    lane.order_sent = Some(*stamp);
                                    lane.since_order = 0;
                                    metrics::order_record("sent");
                                }
                            }
                            frame.encode_header(&mut lane.control);
                            lane.wake.notify_one();
                        }
                    }
                    let queued = Queued {
                        body: body.take().expect("enqueued once"),
                        seq,
                        class: item.urgency.class,
                    };
                    st.bodies.insert(id, queued);
                    if let Some(lane) = st.lanes.get(&item.lane) {
                        lane.wake.notify_one();
                    }
                    self.metrics.queued(st.sched.used());
                    self.memory.queued(spec.len);
                    return;
                }
            }
            released.await;
        }
    }

    /// What lane `id` writes next.
    pub(crate) fn next(&self, id: LaneId) -> Next {
        let mut st = self.lock();
        let st = &mut *st;
        let Some(lane) = st.lanes.get_mut(&id) else {
            return Next::Finished;
        };
        let sliced = lane.kind == LaneKind::Sliced;
        let mut header = std::mem::take(&mut lane.control);
        let finishing = lane.finishing;
        let session = lane.session;
        let answers = lane.answers;
        let paced = lane.peer.zip(st.pace_bps);
        if let Some((peer, rate)) = paced {
            let pacer = st
                .pacers
                .entry(peer)
                // Two slices ahead of the rate: a lane has the next slice ready while
                // the socket sends one.
                .or_insert_with(|| Pacer::new(rate, 2 * self.slice_bytes));
            let wait = pacer.wait_until(Instant::now());
            if let Some(at) = wait.filter(|_| st.sched.has_queued(session)) {
                if !header.is_empty() {
                    // Announcements are not paced: the peer needs them for the slices
                    // the session's other lanes send.
                    return Next::Write(vec![Bytes::from(header)]);
                }
                self.metrics.paced_wait();
                return Next::Wait(at);
            }
        }
        let mut pieces = Vec::new();
        let mut total = 0u64;
        let mut released = false;
        let now = Instant::now();
        loop {
            let cap = match (sliced, total) {
                (false, 0) => u64::MAX,
                (false, t) => WHOLE_BATCH.saturating_sub(t),
                (true, t) => self.slice_bytes.saturating_sub(t),
            };
            if cap == 0 {
                break;
            }
            let Some(tx) = st
                .sched
                .poll_transmit(now, |l| if l == id { cap } else { 0 })
            else {
                break;
            };
            let q = &st.bodies[&tx.msg];
            if sliced {
                encode_slice_header(q.seq, tx.offset, tx.len as u32, &mut header);
            }
            if !header.is_empty() {
                pieces.push(Bytes::from(std::mem::take(&mut header)));
            }
            pieces.extend(q.body.range(tx.offset, tx.len));
            total += tx.len;
            self.metrics
                .transmitted(q.class, tx.len, sliced, tx.queue_delay, tx.preempted);
            if tx.last {
                st.bodies.remove(&tx.msg);
                released = true;
            }
        }
        if !header.is_empty() {
            pieces.push(Bytes::from(header));
        }
        if let (true, Some(a)) = (answers && total > 0, &mut st.answer_link) {
            // Handed out as the socket takes them: on the link from now.
            a.sent(now, total);
        }
        if let Some((peer, _)) = paced.filter(|_| total > 0) {
            if let Some(p) = st.pacers.get_mut(&peer) {
                p.sent(now, total);
            }
        }
        if released {
            self.metrics.queued(st.sched.used());
            self.space.notify_waiters();
            // A finished message may unblock later ones of its session on other lanes.
            for (&other, lane) in &st.lanes {
                if other != id && lane.session == session {
                    lane.wake.notify_one();
                }
            }
        }
        // A finishing lane ends only when its whole session is out: a message blocked
        // behind another lane's (a fence) still comes here.
        match (
            pieces.is_empty(),
            finishing && !st.sched.has_queued(session),
        ) {
            (false, _) => Next::Write(pieces),
            (true, false) => Next::Idle,
            (true, true) => Next::Finished,
        }
    }

    /// The session's reader ended: its lanes write what is queued, then end.
    pub(crate) fn finish(&self, lanes: &[LaneId]) {
        let mut st = self.lock();
        for id in lanes {
            if let Some(lane) = st.lanes.get_mut(id) {
                lane.finishing = true;
                lane.wake.notify_one();
            }
        }
    }

    /// The session is gone: its queued messages are dropped and its lanes forgotten.
    pub(crate) fn close(&self, session: SessionId, lanes: &[LaneId]) {
        let mut st = self.lock();
        let dropped = st.sched.drop_session(session);
        for id in &dropped {
            st.bodies.remove(id);
        }
        for id in lanes {
            st.sched.remove_lane(*id);
            if let Some(lane) = st.lanes.remove(id) {
                lane.wake.notify_one();
            }
        }
        if !dropped.is_empty() {
            tracing::debug!(
                session,
                dropped = dropped.len(),
                "session closed with messages unsent"
            );
        }
        self.metrics.queued(st.sched.used());
        drop(st);
        self.space.notify_waiters();
    }
}

/// Writes every piece, with as few syscalls as the socket allows.
pub(crate) async fn write_pieces(
    wr: &mut OwnedWriteHalf,
    mut pieces: Vec<Bytes>,
) -> std::io::Result<()> {
    pieces.retain(|p| !p.is_empty());
    let mut i = 0;
    while i < pieces.len() {
        let slices: Vec<IoSlice<'_>> = pieces[i..]
            .iter()
            .take(64)
            .map(|b| IoSlice::new(b))
            .collect();
        let mut n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let head = &mut pieces[i];
            if n >= head.len() {
                n -= head.len();
                i += 1;
            } else {
                head.advance(n);
                n = 0;
            }
        }
    }
    Ok(())
}

/// The writer of one lane: writes what the scheduler says until the session ends.
pub(crate) async fn run_lane(
    egress: Arc<Egress>,
    id: LaneId,
    wake: Arc<Notify>,
    mut wr: OwnedWriteHalf,
) -> std::io::Result<()> {
    loop {
        match egress.next(id) {
            Next::Write(pieces) => write_pieces(&mut wr, pieces).await?,
            Next::Idle => wake.notified().await,
            Next::Wait(at) => {
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep_until(at.into()) => {}
                }
            }
            Next::Finished => {
                let _ = wr.shutdown().await;
                return Ok(());
            }
        }
    }
}
