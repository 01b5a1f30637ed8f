//! Request order at a local server (README, "Request order at the server").
//!
//! MXNet 1.9.1's ps-lite server hands received requests to its one request thread
//! through a `std::priority_queue` keyed by the message's `priority`, which MXNet
//! always sends as 0 (compared with `<=`): once requests queue up, a later one can be
//! served first. The server's result for a key depends only on the sequence of
//! requests for that key, so two rules, applied where this proxy sees the answers,
//! keep that sequence what the workers sent:
//!
//! 1. A request of a worker for a key waits while an earlier pull of the same worker
//!    for that key is unanswered ([`HoldReason::EarlierPull`]: Gluon's initial
//!    broadcast pull, then the first step's pushpull).
//! 2. A request for a key waits while the key's init push is unanswered
//!    ([`HoldReason::InitInFlight`]); one for a key that was never initialized, other
//!    than rank 0's init push itself, waits for that init ([`HoldReason::NotInitialized`],
//!    bounded: the caller gives up after its deadline and the server decides, as
//!    without the proxy). The server kills itself on a pull of a key never pushed
//!    (`init N first`) and takes a push to an unknown key as its init.
//!
//! Why holding, and not the ps-lite `priority` field of requests (a decreasing counter
//! would make the server's heap pop oldest first): the server's `KVServer::Response`
//! does not echo it, but rewriting it re-encodes every request's meta (its length
//! changes, which the streamed and pass-through paths cannot do), it wraps after 2^32
//! requests, it orders only requests that are queued together (a request that reaches
//! the server before the init push it depends on, on another worker's connection, is
//! still served first), and it would make the server first-in first-out across keys,
//! undoing the priority order the scheduler sends in. Holding costs nothing in MXNet's
//! normal flow (nothing matches) and needs no rewrite.
//!
//! Why only behind pulls and init pushes: the server answers those at once, so a wait
//! behind one always ends. A push or pushpull is answered only when every worker's is
//! in, and a session is relayed in order, so waiting behind one could deadlock two
//! workers: each holds a request behind its own unanswered pushpull of one key while
//! its pushpull of another key, which the other worker's round needs, is queued behind
//! the held one. A push-only request in a round mixing push-only and pushpull
//! requests is never answered at all. MXNet itself never has two requests of one
//! worker for one key in flight except the broadcast pull and the pushpull after it.
//! Order across keys is not kept: the server's state is per key, and the scheduler
//! reorders across keys on purpose.

use std::collections::HashMap;

/// A local server's node id.
pub type ServerId = i32;
/// A worker's node id.
pub type WorkerId = i32;

/// Why a request waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HoldReason {
    /// An earlier pull of the same worker for one of its keys is unanswered.
    EarlierPull,
    /// The init push of one of its keys is unanswered.
    InitInFlight,
    /// One of its keys was never initialized (bounded wait).
    NotInitialized,
}

impl HoldReason {
    /// Every reason (each is exported at zero from the start).
    pub const ALL: [HoldReason; 3] = [
        HoldReason::EarlierPull,
        HoldReason::InitInFlight,
        HoldReason::NotInitialized,
    ];

    /// Every reason's label, in [`Self::ALL`]'s order.
    pub const LABELS: [&'static str; 3] = [
        Self::ALL[0].label(),
        Self::ALL[1].label(),
        Self::ALL[2].label(),
    ];

    /// The metric label (`p3proxy_requests_held_for_order_total{reason}`).
    pub const fn label(self) -> &'static str {
        match self {
            HoldReason::EarlierPull => "earlier_pull",
            HoldReason::InitInFlight => "init_in_flight",
            HoldReason::NotInitialized => "not_initialized",
        }
    }

    /// What the request waits for, for logs.
    pub fn describe(self) -> &'static str {
        match self {
            HoldReason::EarlierPull => {
                "the server to answer the same worker's earlier pull of its key"
            }
            HoldReason::InitInFlight => "the server to answer its key's init push",
            HoldReason::NotInitialized => "its key's init push (rank 0's), which has not come yet",
        }
    }
}

/// What a forwarded request makes later ones wait for, until its answer
/// ([`RequestOrder::answered`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Awaited {
    /// Keys of a pull.
    pull_keys: Vec<u64>,
    /// Keys this init push initializes.
    init_keys: Vec<u64>,
}

/// The order rules' state for every local server: what is in flight that later
/// requests wait for, and where this proxy sees the answers.
#[derive(Debug, Default)]
pub struct RequestOrder {
    /// Unanswered pulls by (server, worker, key), counting resent copies.
    pulls: HashMap<(ServerId, WorkerId, u64), u32>,
    /// Unanswered init pushes by (server, key): the worker that sent it, copies.
    inits: HashMap<(ServerId, u64), (WorkerId, u32)>,
    /// Response connections from a server to a worker through this proxy, by
    /// (server, worker): only where the answer is seen can a request wait for it.
    answer_paths: HashMap<(ServerId, WorkerId), u32>,
    /// Something that requests waited for went since the last [`Self::take_released`].
    released: bool,
}

impl RequestOrder {
    /// Nothing in flight yet.
    pub fn new() -> RequestOrder {
        RequestOrder::default()
    }

    /// A response connection from `server` to `worker` completed its handshake.
    pub fn responses_opened(&mut self, server: ServerId, worker: WorkerId) {
        *self.answer_paths.entry((server, worker)).or_insert(0) += 1;
    }

    /// That connection closed: what waited for answers on it goes.
    pub fn responses_closed(&mut self, server: ServerId, worker: WorkerId) {
        if let Some(n) = self.answer_paths.get_mut(&(server, worker)) {
            *n -= 1;
            if *n == 0 {
                self.answer_paths.remove(&(server, worker));
            }
        }
        self.forget(server, worker);
    }

    fn sees_answers(&self, server: ServerId, worker: WorkerId) -> bool {
        self.answer_paths.contains_key(&(server, worker))
    }

    /// Why a request of `worker` for `keys` must wait before it goes to `server`, if
    /// it must. `uninitialized`: one of its keys was never initialized and this is not
    /// the init push (the caller knows the keys and stops asking after its deadline).
    pub fn hold_reason(
        &self,
        server: ServerId,
        worker: WorkerId,
        keys: &[u64],
        uninitialized: bool,
    ) -> Option<HoldReason> {
        if keys.iter().any(|&k| self.inits.contains_key(&(server, k))) {
            return Some(HoldReason::InitInFlight);
        }
        if self.sees_answers(server, worker)
            && keys
                .iter()
                .any(|&k| self.pulls.contains_key(&(server, worker, k)))
        {
            return Some(HoldReason::EarlierPull);
        }
        uninitialized.then_some(HoldReason::NotInitialized)
    }

    /// A request of `worker` goes to `server` now: a pull of `keys` (`pull_only`), or
    /// an init push of `init_keys`. Returns what its answer releases (nothing when
    /// this proxy does not see that answer).
    pub fn forwarded(
        &mut self,
        server: ServerId,
        worker: WorkerId,
        keys: &[u64],
        pull_only: bool,
        init_keys: &[u64],
    ) -> Option<Awaited> {
        if !init_keys.is_empty() {
            // Requests that waited for the key to be known look again.
            self.released = true;
        }
        if !self.sees_answers(server, worker) {
            return None;
        }
        let awaited = Awaited {
            pull_keys: if pull_only { keys.to_vec() } else { Vec::new() },
            init_keys: init_keys.to_vec(),
        };
        for &k in &awaited.pull_keys {
            *self.pulls.entry((server, worker, k)).or_insert(0) += 1;
        }
        for &k in &awaited.init_keys {
            self.inits.entry((server, k)).or_insert((worker, 0)).1 += 1;
        }
        (!awaited.pull_keys.is_empty() || !awaited.init_keys.is_empty()).then_some(awaited)
    }

    /// The answer to a request [`Self::forwarded`] returned `awaited` for passed.
    pub fn answered(&mut self, server: ServerId, worker: WorkerId, awaited: &Awaited) {
        for &k in &awaited.pull_keys {
            if let Some(n) = self.pulls.get_mut(&(server, worker, k)) {
                *n -= 1;
                if *n == 0 {
                    self.pulls.remove(&(server, worker, k));
                    self.released = true;
                }
            }
        }
        for &k in &awaited.init_keys {
            if let Some((_, n)) = self.inits.get_mut(&(server, k)) {
                *n -= 1;
                if *n == 0 {
                    self.inits.remove(&(server, k));
                    self.released = true;
                }
            }
        }
    }

    /// `worker`'s requests to `server` will never be answered (a connection closed).
    pub fn forget(&mut self, server: ServerId, worker: WorkerId) {
        let before = self.pulls.len() + self.inits.len();
        self.pulls
            .retain(|&(s, w, _), _| !(s == server && w == worker));
        self.inits
            .retain(|&(s, _), (w, _)| !(s == server && *w == worker));
        self.released |= self.pulls.len() + self.inits.len() != before;
    }

    /// Nothing of `server`'s is awaited any more (it exited, started afresh, or
    /// drops resent copies, which would never be answered).
    pub fn forget_server(&mut self, server: ServerId) {
        let before = self.pulls.len() + self.inits.len();
        self.pulls.retain(|&(s, _, _), _| s != server);
        self.inits.retain(|&(s, _), _| s != server);
        self.released |= self.pulls.len() + self.inits.len() != before;
    }

    /// Something else a held request depends on changed (the node table, a worker's
    /// connection, a server's registration): requests that were held ask again.
    pub fn changed(&mut self) {
        self.released = true;
    }

    /// Whether something that requests waited for went since the last call: requests
    /// that were held may go now (ask again).
    pub fn take_released(&mut self) -> bool {
        std::mem::take(&mut self.released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: ServerId = 8;
    const W9: WorkerId = 9;
    const W11: WorkerId = 11;

    fn both_paths() -> RequestOrder {
        let mut o = RequestOrder::new();
        o.responses_opened(S, W9);
        o.responses_opened(S, W11);
        o
    }

    #[test]
    fn every_request_for_a_key_waits_for_its_init_answer_from_any_worker() {
        let mut o = both_paths();
        let init = o.forwarded(S, W9, &[3], false, &[3]).expect("seen");
        assert!(o.take_released(), "a key became known");
        assert_eq!(
            o.hold_reason(S, W11, &[3], false),
            Some(HoldReason::InitInFlight)
        );
        assert_eq!(
            o.hold_reason(S, W9, &[3], false),
            Some(HoldReason::InitInFlight)
        );
        assert_eq!(
            o.hold_reason(S, W11, &[1, 3], false),
            Some(HoldReason::InitInFlight)
        );
        assert_eq!(o.hold_reason(S, W11, &[1], false), None, "other keys go");
        assert_eq!(
            o.hold_reason(8 + 2, W11, &[3], false),
            None,
            "other servers go"
        );
        o.answered(S, W9, &init);
        assert!(o.take_released());
        assert_eq!(o.hold_reason(S, W11, &[3], false), None);
        assert!(!o.take_released(), "released once");
    }

    #[test]
    fn a_request_for_a_key_never_initialized_waits_until_its_init_went_and_was_answered() {
        let mut o = both_paths();
        assert_eq!(
            o.hold_reason(S, W11, &[3], true),
            Some(HoldReason::NotInitialized)
        );
        let init = o.forwarded(S, W9, &[3], false, &[3]).expect("seen");
        assert!(o.take_released());
        // Now known to the caller (uninitialized = false): the init's answer is next.
        assert_eq!(
            o.hold_reason(S, W11, &[3], false),
            Some(HoldReason::InitInFlight)
        );
        o.answered(S, W9, &init);
        assert_eq!(o.hold_reason(S, W11, &[3], false), None);
    }

    #[test]
    fn a_later_request_of_the_same_worker_waits_for_its_pull_of_the_key() {
        let mut o = both_paths();
        let pull = o.forwarded(S, W9, &[3], true, &[]).expect("a pull");
        assert_eq!(
            o.hold_reason(S, W9, &[3], false),
            Some(HoldReason::EarlierPull)
        );
        assert_eq!(o.hold_reason(S, W11, &[3], false), None, "other workers go");
        assert_eq!(o.hold_reason(S, W9, &[4], false), None, "other keys go");
        // A pushpull or push is awaited by nothing.
        assert_eq!(o.forwarded(S, W11, &[3], false, &[]), None);
        assert_eq!(o.hold_reason(S, W11, &[3], false), None);
        o.answered(S, W9, &pull);
        assert!(o.take_released());
        assert_eq!(o.hold_reason(S, W9, &[3], false), None);
    }

    #[test]
    fn nothing_waits_for_an_answer_this_proxy_does_not_see() {
        let mut o = RequestOrder::new();
        o.responses_opened(S, W11);
        assert_eq!(o.forwarded(S, W9, &[3], false, &[3]), None);
        assert_eq!(o.forwarded(S, W9, &[4], true, &[]), None);
        assert_eq!(o.hold_reason(S, W11, &[3], false), None);
        assert_eq!(o.hold_reason(S, W9, &[4], false), None);
        // The path closing mid-wait releases what waited on it.
        let pull = o.forwarded(S, W11, &[5], true, &[]);
        assert!(pull.is_some());
        assert_eq!(
            o.hold_reason(S, W11, &[5], false),
            Some(HoldReason::EarlierPull)
        );
        o.take_released();
        o.responses_closed(S, W11);
        assert!(o.take_released());
        assert_eq!(o.hold_reason(S, W11, &[5], false), None);
    }

    #[test]
    fn two_pulls_of_one_key_in_flight_hold_a_later_request_until_both_are_answered() {
        let mut o = both_paths();
        let first = o.forwarded(S, W9, &[3], true, &[]).expect("seen");
        let copy = o.forwarded(S, W9, &[3], true, &[]).expect("seen");
        o.answered(S, W9, &first);
        assert!(!o.take_released(), "a copy is still unanswered");
        assert_eq!(
            o.hold_reason(S, W9, &[3], false),
            Some(HoldReason::EarlierPull)
        );
        o.answered(S, W9, &copy);
        assert!(o.take_released());
        // An answer for something never awaited changes nothing.
        o.answered(S, W9, &copy);
        assert!(!o.take_released());
    }

    #[test]
    fn a_closing_request_connection_or_server_releases_its_waits() {
        let mut o = both_paths();
        o.forwarded(S, W9, &[3], false, &[3]);
        o.forwarded(S, W11, &[4], true, &[]);
        o.take_released();
        o.forget(S, W11);
        assert!(o.take_released());
        assert_eq!(o.hold_reason(S, W11, &[4], false), None);
        assert_eq!(
            o.hold_reason(S, W11, &[3], false),
            Some(HoldReason::InitInFlight)
        );
        o.forget(S, W9);
        assert!(
            o.take_released(),
            "the init's sender is gone: it is never answered"
        );
        assert_eq!(o.hold_reason(S, W11, &[3], false), None);
        o.forwarded(S, W9, &[5], true, &[]);
        o.take_released();
        o.forget_server(S);
        assert!(o.take_released());
        assert_eq!(o.hold_reason(S, W9, &[5], false), None);
    }

    #[test]
    fn labels_are_the_metric_values() {
        let labels: Vec<_> = HoldReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(
            labels,
            ["earlier_pull", "init_in_flight", "not_initialized"]
        );
    }
}
