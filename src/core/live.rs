//! How the job is doing, live, from the requests and responses this proxy relays
//! (issue 28), sans-IO: time is passed in, and what an operator needs comes out as
//! [`LiveEvent`]s and the oldest unanswered request's age.
//!
//! The definitions are `p3proxy inspect`'s, so that the live numbers and a capture's
//! report agree: a worker's n-th push of a key belongs to its iteration n, a pull to
//! the iteration of the key's last push; an iteration starts with its first request;
//! its period runs to the next one's start (what the job measures as its step time);
//! the first-layer wait runs from the worker's last request of the iteration to the
//! response for the key the worker pushed last (the layer nearest the input, which the
//! next forward pass needs first). Iterations are folded once two later ones have
//! started, so every number is final when it is reported. Only workers on this host
//! are followed (a remote worker's requests reach this proxy reordered by its own).
//!
//! Every data request is tracked until its response for the hang detector, but only
//! between nodes whose responses this proxy has seen: a request to a server without a
//! proxy is answered around this one and would look unanswered forever.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// (requester, responder, customer, timestamp): one request and its response.
pub type Correlation = (i32, i32, i32, i32);

/// Most unanswered requests tracked; past it the oldest are dropped (and counted), so
/// that a job whose responses this proxy cannot see costs bounded memory.
pub const MAX_PENDING: usize = 1 << 16;
/// Periods the iteration estimate is the median of.
pub const PERIOD_WINDOW: usize = 5;
/// Iterations kept open per worker: one is folded once this many later ones started.
const OPEN_ITERATIONS: u32 = 2;

/// A data request an app sent, as the proxy saw it.
#[derive(Debug, Clone, Copy)]
pub struct RequestSeen {
    /// Its correlation with the response.
    pub corr: Correlation,
    /// The first ps-lite key (none where only the meta was looked at).
    pub key: Option<u64>,
    /// A push (with or without pull).
    pub push: bool,
    /// A pull (Gluon's pushpull is both).
    pub pull: bool,
    /// The requester runs on this host (its iterations are followed).
    pub local: bool,
    /// Bytes of the message.
    pub bytes: u64,
    /// The responder runs on this host and the requester elsewhere: the answer leaves
    /// through this host's link (the answers' idle time counts its wait).
    pub answered_here: bool,
}

/// What the job did, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LiveEvent {
    /// A local worker's iteration ended after `period`.
    Iteration {
        /// To the next iteration's start.
        period: Duration,
        /// The share of the period from its first request to its last response.
        comm_share: f64,
        /// What the period could save against the ideal bound (with a link rate).
        saving: Option<Duration>,
    },
    /// How long a local worker's next forward pass waited for its first layer.
    FirstLayerWait(Duration),
    /// A request to server `server` was answered after `latency`; `bytes` went both ways.
    Answered {
        /// The responder's node id.
        server: i32,
        /// From the request to its response, as this proxy saw them.
        latency: Duration,
        /// Request and response bytes.
        bytes: u64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    at: Instant,
    bytes: u64,
    /// (local worker, key, iteration) when the requester's iterations are followed.
    follow: Option<(u64, u32)>,
    /// Counted in `waiting_here`.
    answered_here: bool,
}

#[derive(Debug, Default)]
struct Iteration {
    first_request: Option<Instant>,
    last_request: Option<Instant>,
    last_response: Option<Instant>,
    /// The key pushed last, and when.
    last_push: Option<(Instant, u64)>,
    /// When each key's response came.
    responses: HashMap<u64, Instant>,
    /// Data bytes the worker sent and received for it.
    bytes_out: u64,
    bytes_in: u64,
}

#[derive(Debug, Default)]
struct WorkerTrack {
    /// The next iteration of each key's pushes.
    next_iteration: HashMap<u64, u32>,
    /// Sends pushpulls (Gluon, Module): its earlier plain pushes were init pushes.
    pushpull: bool,
    open: BTreeMap<u32, Iteration>,
    folded_below: u32,
    /// The last folded iteration's index and start.
    last_start: Option<(u32, Instant)>,
    /// The key the last folded iteration pushed last (the first layer).
    first_layer: Option<u64>,
    /// The last folded iteration's first request to last response.
    last_comm: Duration,
    /// The last folded iteration's first-layer wait and its busier direction's bytes.
    last_wait: Duration,
    last_bytes: u64,
}

/// The job as it goes by.
#[derive(Debug, Default)]
pub struct JobWatch {
    pending: HashMap<Correlation, Pending>,
    /// Requester-responder pairs whose responses this proxy has seen.
    answered_pairs: HashSet<(i32, i32)>,
    /// Pending requests answered through this host's link, per requester-responder pair.
    waiting_here: HashMap<(i32, i32), usize>,
    /// What [`JobWatch::waiting_changed`] said last.
    reported_waiting: bool,
    workers: HashMap<i32, WorkerTrack>,
    periods: VecDeque<Duration>,
    waits: VecDeque<Duration>,
    shares: VecDeque<f64>,
    savings: VecDeque<Duration>,
    /// The host's link rate, bits per second, if known (`link_rate_bps`).
    rate_bps: Option<f64>,
    events: VecDeque<LiveEvent>,
    dropped: u64,
}

impl JobWatch {
    /// A watch that also estimates each iteration's saving against the ideal bound
    /// (`inspect`'s: compute, the period less the first-layer wait, or the worker's
    /// busier link direction at `rate_bps`, whichever is longer).
    pub fn with_link_rate(rate_bps: Option<f64>) -> JobWatch {
        JobWatch {
            rate_bps: rate_bps.filter(|r| *r > 0.0),
            ..JobWatch::default()
        }
    }

    /// An app sent a data request.
    pub fn request(&mut self, req: RequestSeen, now: Instant) {
        if self.pending.len() >= MAX_PENDING {
            self.drop_oldest();
        }
        let follow = if req.local {
            req.key.and_then(|key| {
                self.follow_request(req.corr.0, key, req.push, req.pull, req.bytes, now)
            })
        } else {
            None
        };
        let earlier = self.pending.insert(
            req.corr,
            Pending {
                at: now,
                bytes: req.bytes,
                follow,
                answered_here: req.answered_here,
            },
        );
        if let Some(e) = earlier {
            self.unpend(req.corr, &e);
        }
        if req.answered_here {
            *self
                .waiting_here
                .entry((req.corr.0, req.corr.1))
                .or_insert(0) += 1;
        }
    }

    /// A response with this correlation (requester, responder, customer, timestamp)
    /// went to its requester. A split key's slice responses share their request's
    /// correlation: the first one answers it.
    pub fn response(&mut self, corr: Correlation, bytes: u64, now: Instant) {
        self.answered_pairs.insert((corr.0, corr.1));
        let Some(p) = self.pending.remove(&corr) else {
            return;
        };
        self.unpend(corr, &p);
        self.events.push_back(LiveEvent::Answered {
            server: corr.1,
            latency: now.saturating_duration_since(p.at),
            bytes: p.bytes + bytes,
        });
        if let Some((key, iteration)) = p.follow {
            if let Some(it) = self
                .workers
                .get_mut(&corr.0)
                .and_then(|w| w.open.get_mut(&iteration))
            {
                it.last_response = Some(it.last_response.map_or(now, |t| t.max(now)));
                it.responses.insert(key, now);
                it.bytes_in += bytes;
            }
        }
    }

    /// The requests from `requester` to `responder` will never be answered (their
    /// connection died): forgotten.
    pub fn forget(&mut self, requester: i32, responder: i32) {
        self.pending
            .retain(|&(r, s, _, _), _| !(r == requester && s == responder));
        self.waiting_here.remove(&(requester, responder));
    }

    /// Whether a request from another host waits for its answer from a server on this
    /// one (`core::answer_idle` counts the egress's idle time then).
    pub fn waiting(&self) -> bool {
        !self.waiting_here.is_empty()
    }

    /// [`JobWatch::waiting`], when it changed since the last call.
    pub fn waiting_changed(&mut self) -> Option<bool> {
        let now = self.waiting();
        (now != self.reported_waiting).then(|| {
            self.reported_waiting = now;
            now
        })
    }

    /// `p`, the request `corr`, no longer waits.
    fn unpend(&mut self, corr: Correlation, p: &Pending) {
        let pair = (corr.0, corr.1);
        if !p.answered_here {
            return;
        }
        if let Some(n) = self.waiting_here.get_mut(&pair) {
            *n -= 1;
            if *n == 0 {
                self.waiting_here.remove(&pair);
            }
        }
    }

    /// The age of the oldest request still unanswered, among those whose answers this
    /// proxy sees.
    pub fn oldest_request_age(&self, now: Instant) -> Option<Duration> {
        self.pending
            .iter()
            .filter(|((r, s, _, _), _)| self.answered_pairs.contains(&(*r, *s)))
            .map(|(_, p)| now.saturating_duration_since(p.at))
            .max()
    }

    /// The job's iteration period: the median of the last [`PERIOD_WINDOW`] periods
    /// of the local workers.
    pub fn iteration_period(&self) -> Option<Duration> {
        lower_median(&self.periods, Duration::cmp)
    }

    /// How long the next forward pass waited for its first layer: the median of the
    /// last [`PERIOD_WINDOW`] iterations of the local workers.
    pub fn first_layer_wait(&self) -> Option<Duration> {
        lower_median(&self.waits, Duration::cmp)
    }

    /// The communication share of the iteration (first request to last response over
    /// the period): the median of the last [`PERIOD_WINDOW`] iterations.
    pub fn comm_share(&self) -> Option<f64> {
        lower_median(&self.shares, f64::total_cmp)
    }

    /// What an iteration could save against the ideal bound: the median of the last
    /// [`PERIOD_WINDOW`] (only with a link rate).
    pub fn estimated_saving(&self) -> Option<Duration> {
        lower_median(&self.savings, Duration::cmp)
    }

    /// Requests dropped untracked because [`MAX_PENDING`] were unanswered.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Requests tracked and unanswered.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The next thing to report.
    pub fn poll_event(&mut self) -> Option<LiveEvent> {
        self.events.pop_front()
    }

    fn drop_oldest(&mut self) {
        if let Some(corr) = self
            .pending
            .iter()
            .min_by_key(|(_, p)| p.at)
            .map(|(c, _)| *c)
        {
            if let Some(p) = self.pending.remove(&corr) {
                self.unpend(corr, &p);
            }
            self.dropped += 1;
        }
    }

    /// Places a local worker's request in its iteration; the (key, iteration) its
    /// response belongs to.
    fn follow_request(
        &mut self,
        worker: i32,
        key: u64,
        push: bool,
        pull: bool,
        bytes: u64,
        now: Instant,
    ) -> Option<(u64, u32)> {
        let w = self.workers.entry(worker).or_default();
        if push && pull && !w.pushpull {
            // Gluon and Module: the plain pushes before were init pushes, no iteration.
            *w = WorkerTrack {
                pushpull: true,
                ..WorkerTrack::default()
            };
        }
        if push && !pull && w.pushpull {
            return None;
        }
        let counter = w.next_iteration.entry(key).or_insert(0);
        let iteration = if push {
            *counter += 1;
            *counter - 1
        } else {
            counter.checked_sub(1)?
        };
        if iteration < w.folded_below {
            return None; // A straggler of an iteration already reported.
        }
        let it = w.open.entry(iteration).or_default();
        it.first_request.get_or_insert(now);
        it.last_request = Some(it.last_request.map_or(now, |t| t.max(now)));
        it.bytes_out += bytes;
        if push && it.last_push.is_none_or(|(t, _)| now >= t) {
            it.last_push = Some((now, key));
        }
        self.fold(worker, iteration);
        Some((key, iteration))
    }

    /// Folds the worker's iterations that can no longer change.
    fn fold(&mut self, worker: i32, newest: u32) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        while let Some((&index, _)) = w.open.first_key_value() {
            if index + OPEN_ITERATIONS > newest {
                break;
            }
            let it = w.open.remove(&index).expect("the first key");
            w.folded_below = index + 1;
            let Some(start) = it.first_request else {
                continue;
            };
            if let Some((prev_index, prev_start)) = w.last_start {
                if prev_index + 1 == index {
                    let period = start.saturating_duration_since(prev_start);
                    // The previous iteration's share is known only now.
                    let comm = w.last_comm;
                    let share = if period.is_zero() {
                        0.0
                    } else {
                        (comm.as_secs_f64() / period.as_secs_f64()).min(1.0)
                    };
                    let saving = self.rate_bps.map(|rate| {
                        let compute = period.saturating_sub(w.last_wait);
                        let link = Duration::from_secs_f64(w.last_bytes as f64 * 8.0 / rate);
                        period.saturating_sub(compute.max(link))
                    });
                    push_window(&mut self.periods, period);
                    push_window(&mut self.shares, share);
                    if let Some(saving) = saving {
                        push_window(&mut self.savings, saving);
                    }
                    self.events.push_back(LiveEvent::Iteration {
                        period,
                        comm_share: share,
                        saving,
                    });
                }
            }
            // The first layer: what this worker pushed last, as in the iteration before
            // when that one saw no response for it yet.
            let first = it.last_push.map(|(_, k)| k).or(w.first_layer);
            let wait = first.zip(it.last_request).and_then(|(key, last)| {
                Some(it.responses.get(&key)?.saturating_duration_since(last))
            });
            if let Some(wait) = wait {
                push_window(&mut self.waits, wait);
                self.events.push_back(LiveEvent::FirstLayerWait(wait));
            }
            w.last_wait = wait.unwrap_or_default();
            w.last_bytes = it.bytes_out.max(it.bytes_in);
            w.first_layer = first;
            w.last_start = Some((index, start));
            w.last_comm = it
                .last_response
                .map(|end| end.saturating_duration_since(start))
                .unwrap_or_default();
        }
    }
}

/// The lower median of a window (`None` when empty).
fn lower_median<T: Copy>(
    window: &VecDeque<T>,
    cmp: impl FnMut(&T, &T) -> std::cmp::Ordering,
) -> Option<T> {
    let mut v: Vec<T> = window.iter().copied().collect();
    v.sort_unstable_by(cmp);
    v.get(v.len().saturating_sub(1) / 2).copied()
}

/// Keeps the last [`PERIOD_WINDOW`] values.
fn push_window<T>(window: &mut VecDeque<T>, value: T) {
    window.push_back(value);
    if window.len() > PERIOD_WINDOW {
        window.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::answer_idle::{AnswerIdle, AnswerTotals};

    const WORKER: i32 = 9;
    const SERVER: i32 = 8;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A Gluon worker on this host: `iters` iterations of `period_ms`, each pushpulling
    /// keys 3, 2, 1, 0 (backward order) 10 ms apart from its start; the response for
    /// key `k` comes `answer_ms(k)` after its request.
    fn run_job(
        watch: &mut JobWatch,
        t0: Instant,
        iters: u64,
        period_ms: u64,
        answer_ms: impl Fn(u64) -> u64,
    ) -> Vec<LiveEvent> {
        let mut ts = 0;
        // Init pushes of every key (plain pushes), answered at once.
        for k in 0..4 {
            ts += 1;
            let corr = (WORKER, SERVER, 0, ts);
            let req = RequestSeen {
                corr,
                key: Some(k),
                push: true,
                pull: false,
                local: true,
                bytes: 100,
                answered_here: false,
            };
            watch.request(req, t0);
            watch.response(corr, 10, t0);
        }
        // Requests and responses in time order.
        let mut timeline: Vec<(Instant, bool, Correlation, u64)> = Vec::new();
        for i in 0..iters {
            let start = t0 + ms(1000 + i * period_ms);
            for (n, k) in [3u64, 2, 1, 0].into_iter().enumerate() {
                ts += 1;
                let at = start + ms(10 * n as u64);
                timeline.push((at, true, (WORKER, SERVER, 0, ts), k));
                timeline.push((at + ms(answer_ms(k)), false, (WORKER, SERVER, 0, ts), k));
            }
        }
        timeline.sort_by_key(|(at, request, _, _)| (*at, !*request));
        let mut events = Vec::new();
        for (at, request, corr, k) in timeline {
            if request {
                let req = RequestSeen {
                    corr,
                    key: Some(k),
                    push: true,
                    pull: true,
                    local: true,
                    bytes: 1000,
                    answered_here: false,
                };
                watch.request(req, at);
            } else {
                watch.response(corr, 1000, at);
            }
            while let Some(ev) = watch.poll_event() {
                events.push(ev);
            }
        }
        events
    }

    fn first_layer_waits(events: &[LiveEvent]) -> Vec<Duration> {
        events
            .iter()
            .filter_map(|e| match e {
                LiveEvent::FirstLayerWait(d) => Some(*d),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_steady_job_reports_its_period_its_first_layer_wait_and_its_comm_share() {
        let mut watch = JobWatch::default();
        // Key 0 (the first layer, pushed last at +30 ms) is back 70 ms after it left.
        let events = run_job(&mut watch, Instant::now(), 8, 400, |k| {
            if k == 0 {
                70
            } else {
                20
            }
        });
        let periods: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                LiveEvent::Iteration {
                    period, comm_share, ..
                } => Some((*period, *comm_share)),
                _ => None,
            })
            .collect();
        // 8 iterations, the last two still open: 6 folded, 5 with a period (init pushes
        // were not an iteration).
        assert_eq!(periods.len(), 5, "{events:?}");
        for (period, share) in &periods {
            assert_eq!(*period, ms(400));
            // From the first request (+0) to the last response (+30 + 70 ms).
            assert!((share - 100.0 / 400.0).abs() < 1e-9, "{share}");
        }
        let waits = first_layer_waits(&events);
        assert_eq!(waits, vec![ms(70); 6]);
        assert_eq!(watch.iteration_period(), Some(ms(400)));
        assert_eq!(watch.first_layer_wait(), Some(ms(70)));
        assert!((watch.comm_share().unwrap() - 0.25).abs() < 1e-9);
        let answered: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                LiveEvent::Answered {
                    server,
                    latency,
                    bytes,
                } => Some((*server, *latency, *bytes)),
                _ => None,
            })
            .collect();
        // Every request is answered: 8 iterations of 4 keys, and the 4 init pushes.
        assert_eq!(answered.len(), 8 * 4 + 4);
        assert!(answered.contains(&(SERVER, ms(70), 2000)));
        assert!(answered.contains(&(SERVER, ms(20), 2000)));
    }

    #[test]
    fn with_a_link_rate_the_saving_is_the_period_less_the_longer_of_compute_and_the_link() {
        // 4 keys of 1000 bytes each way per iteration; the first layer waits 70 ms.
        // At 80 kbit/s the link needs 400 ms: no saving. At 1 Mbit/s it needs 32 ms, and
        // compute is the period less the wait (330 ms): 70 ms to save.
        for (rate, want) in [(80_000.0, ms(0)), (1_000_000.0, ms(70))] {
            let mut watch = JobWatch::with_link_rate(Some(rate));
            let events = run_job(&mut watch, Instant::now(), 8, 400, |k| {
                if k == 0 {
                    70
                } else {
                    20
                }
            });
            let savings: Vec<_> = events
                .iter()
                .filter_map(|e| match e {
                    LiveEvent::Iteration { saving, .. } => *saving,
                    _ => None,
                })
                .collect();
            assert_eq!(savings, vec![want; 5], "{rate}");
            assert_eq!(watch.estimated_saving(), Some(want));
        }
        let mut watch = JobWatch::default();
        run_job(&mut watch, Instant::now(), 8, 400, |_| 20);
        assert_eq!(watch.estimated_saving(), None);
    }

    #[test]
    fn the_first_layer_back_before_the_last_request_waits_zero() {
        let mut watch = JobWatch::default();
        // Key 0 is answered as it leaves, but key 1's response is later: the wait
        // still counts from the last request (key 0's, at +30 ms).
        let events = run_job(&mut watch, Instant::now(), 5, 300, |k| {
            if k == 0 {
                0
            } else {
                50
            }
        });
        let waits = first_layer_waits(&events);
        assert_eq!(waits, vec![Duration::ZERO; 3]);
    }

    #[test]
    fn the_iteration_estimate_is_the_median_of_the_last_periods() {
        let mut watch = JobWatch {
            periods: [ms(500), ms(100), ms(300), ms(900), ms(200)].into(),
            ..JobWatch::default()
        };
        assert_eq!(watch.iteration_period(), Some(ms(300)));
        watch.periods = [ms(500), ms(100)].into();
        assert_eq!(watch.iteration_period(), Some(ms(100)));
        assert_eq!(JobWatch::default().iteration_period(), None);
    }

    fn pull(corr: Correlation, local: bool) -> RequestSeen {
        RequestSeen {
            corr,
            key: Some(1),
            push: false,
            pull: true,
            local,
            bytes: 50,
            answered_here: !local,
        }
    }

    #[test]
    fn the_oldest_unanswered_request_ages_with_time_and_answers_reset_it() {
        let mut watch = JobWatch::default();
        let t0 = Instant::now();
        // Nothing answered yet on this pair: not counted (the answers may go around).
        watch.request(pull((9, 8, 0, 1), false), t0);
        assert_eq!(watch.oldest_request_age(t0 + ms(5000)), None);
        watch.response((9, 8, 0, 1), 50, t0 + ms(10));
        watch.request(pull((9, 8, 0, 2), false), t0 + ms(20));
        watch.request(pull((9, 8, 0, 3), false), t0 + ms(30));
        assert_eq!(watch.oldest_request_age(t0 + ms(1020)), Some(ms(1000)));
        watch.response((9, 8, 0, 2), 50, t0 + ms(1030));
        assert_eq!(watch.oldest_request_age(t0 + ms(2030)), Some(ms(2000)));
        // A pair without a seen answer (a server around this proxy) never counts.
        watch.request(pull((11, 10, 0, 1), false), t0);
        assert_eq!(watch.oldest_request_age(t0 + ms(2030)), Some(ms(2000)));
        // The server's connection died: ps-lite never answers those.
        watch.forget(9, 8);
        assert_eq!(watch.oldest_request_age(t0 + ms(3000)), None);
        assert_eq!(watch.pending(), 1);
    }

    #[test]
    fn unanswered_requests_cost_bounded_memory() {
        let mut watch = JobWatch::default();
        let t0 = Instant::now();
        for ts in 0..(MAX_PENDING as i32 + 10) {
            watch.request(pull((9, 8, 0, ts), false), t0 + ms(ts as u64));
        }
        assert_eq!(watch.pending(), MAX_PENDING);
        assert_eq!(watch.dropped(), 10);
        // The oldest went first.
        watch.response((9, 8, 0, 10), 0, t0);
        watch.response((9, 8, 0, 9), 0, t0);
        assert_eq!(watch.pending(), MAX_PENDING - 1);
    }

    #[test]
    fn remote_requesters_are_tracked_for_age_but_not_followed() {
        let mut watch = JobWatch::default();
        let t0 = Instant::now();
        for i in 0..6u64 {
            let corr = (9, 8, 0, i as i32);
            let req = RequestSeen {
                corr,
                key: Some(1),
                push: true,
                pull: true,
                local: false,
                bytes: 10,
                answered_here: true,
            };
            watch.request(req, t0 + ms(100 * i));
            watch.response(corr, 10, t0 + ms(100 * i + 5));
        }
        let mut n = 0;
        while let Some(ev) = watch.poll_event() {
            assert!(matches!(ev, LiveEvent::Answered { .. }), "{ev:?}");
            n += 1;
        }
        assert_eq!(n, 6);
        assert_eq!(watch.iteration_period(), None);
    }

    /// A server's proxy: two remote workers push keys 0..4 of 1000 bytes each per 50 ms
    /// iteration; worker 11 runs `lag_ms` behind worker 9, and the server answers a
    /// key when both copies are in, its answers going out at once. The answers' idle
    /// time while requests wait, as the shell measures it.
    fn server_view(lag_ms: u64) -> AnswerTotals {
        let mut watch = JobWatch::default();
        // 8 Mbit/s: an answer of 1000 bytes holds the link 1 ms.
        let mut link = AnswerIdle::new(8e6);
        let t0 = Instant::now();
        let mut timeline: Vec<(Instant, Option<RequestSeen>, Correlation)> = Vec::new();
        let mut ts = 0;
        for iteration in 0..100u64 {
            let start = t0 + ms(iteration * 50);
            for k in 0..4u64 {
                for (worker, lag) in [(9, 0), (11, lag_ms)] {
                    ts += 1;
                    let corr = (worker, 8, 0, ts);
                    let at = start + ms(5 * k + lag);
                    let req = RequestSeen {
                        corr,
                        key: Some(k),
                        push: true,
                        pull: true,
                        local: false,
                        bytes: 1000,
                        answered_here: true,
                    };
                    timeline.push((at, Some(req), corr));
                    timeline.push((start + ms(5 * k + lag_ms), None, corr));
                }
            }
        }
        timeline.sort_by_key(|(at, req, _)| (*at, req.is_none()));
        for (at, req, corr) in timeline {
            match req {
                Some(req) => watch.request(req, at),
                None => {
                    watch.response(corr, 1000, at);
                    link.sent(at, 1000);
                }
            }
            link.set_waiting(at, watch.waiting());
        }
        link.totals()
    }

    #[test]
    fn a_server_waiting_for_its_slowest_worker_shows_as_answer_idle_time() {
        // In step: each key is answered as its copies arrive, nothing waits.
        assert_eq!(server_view(0).waiting, ms(0));
        // 30 ms apart: per 50 ms iteration the server holds requests from 0 to 45 ms;
        // answers hold the link 30-32, 35-37 and 40-42 (the last pair's answers leave
        // after the wait ended): 39 of 45 ms idle.
        let apart = server_view(30);
        assert!((apart.idle_share() - 39.0 / 45.0).abs() < 0.01, "{apart:?}");
    }

    #[test]
    fn only_requests_answered_through_this_hosts_link_wait() {
        let mut watch = JobWatch::default();
        let t0 = Instant::now();
        // A local worker's pull from another host's server: answered elsewhere.
        watch.request(pull((9, 8, 0, 1), true), t0);
        assert!(!watch.waiting());
        assert_eq!(watch.waiting_changed(), None);
        // A remote worker's pull from a server here waits until it is answered.
        watch.request(pull((11, 10, 0, 1), false), t0);
        assert!(watch.waiting());
        assert_eq!(watch.waiting_changed(), Some(true));
        assert_eq!(watch.waiting_changed(), None);
        watch.response((11, 10, 0, 1), 50, t0);
        assert_eq!(watch.waiting_changed(), Some(false));
        // The same correlation twice (a resent request) counts once.
        watch.request(pull((11, 10, 0, 2), false), t0);
        watch.request(pull((11, 10, 0, 2), false), t0);
        watch.response((11, 10, 0, 2), 50, t0);
        assert!(!watch.waiting());
        // A dead connection's requests are forgotten.
        watch.request(pull((11, 10, 0, 3), false), t0);
        watch.forget(11, 10);
        assert!(!watch.waiting());
        assert_eq!(
            watch.pending(),
            1,
            "the local worker's pull is still tracked"
        );
    }
}
