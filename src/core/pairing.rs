//! How far apart the workers' copies of a key reach a server (issue 27), sans-IO.
//!
//! A synchronous server aggregates a key only once every worker's push of it is in, so
//! the lag between the first and the last copy is time the key waits at the server
//! for the slowest worker. Under strict layer order each worker's proxy preempts on its
//! own timing, and the workers' byte sequences can drift apart; this measures by how
//! much. Time is passed in.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Most keys with a round in progress; past it the oldest rounds are dropped (a job
/// in which some worker never pushes some key teaches nothing here).
pub const MAX_OPEN: usize = 1 << 16;

#[derive(Debug)]
struct Round {
    first: Instant,
    workers: Vec<i32>,
}

/// The rounds in progress of every key of every local server.
#[derive(Debug, Default)]
pub struct PairLag {
    workers: usize,
    open: HashMap<(SocketAddr, u64), Round>,
}

impl PairLag {
    /// The node table's worker count (0: unknown, nothing is measured).
    pub fn set_workers(&mut self, workers: usize) {
        if workers != self.workers {
            self.open.clear();
        }
        self.workers = workers;
    }

    /// `worker`'s push of `key` reached the proxy in front of `server` at `at`: the
    /// lag between the first and the last worker's copy once every worker's is in.
    pub fn push_arrived(
        &mut self,
        server: SocketAddr,
        key: u64,
        worker: i32,
        at: Instant,
    ) -> Option<Duration> {
        if self.workers < 2 {
            return None;
        }
        if self.open.len() >= MAX_OPEN && !self.open.contains_key(&(server, key)) {
            self.open.clear();
        }
        let round = self.open.entry((server, key)).or_insert_with(|| Round {
            first: at,
            workers: Vec::new(),
        });
        if round.workers.contains(&worker) {
            // This worker is a round ahead of one that never sent: start again.
            round.first = at;
            round.workers.clear();
        }
        round.workers.push(worker);
        if round.workers.len() < self.workers {
            return None;
        }
        let first = round.first;
        self.open.remove(&(server, key));
        Some(at.saturating_duration_since(first))
    }

    /// A local server exited or started afresh: its rounds end unmeasured.
    pub fn forget_server(&mut self, server: SocketAddr) {
        self.open.retain(|(s, _), _| *s != server);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn the_lag_is_measured_once_every_worker_pushed_the_key() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = PairLag::default();
        assert_eq!(p.push_arrived(s(1), 3, 9, t0), None, "workers unknown");
        p.set_workers(3);
        assert_eq!(p.push_arrived(s(1), 3, 9, t0), None);
        assert_eq!(p.push_arrived(s(1), 3, 11, t0 + ms(4)), None);
        // Another key and another server interleave without mixing.
        assert_eq!(p.push_arrived(s(2), 3, 9, t0 + ms(5)), None);
        assert_eq!(p.push_arrived(s(1), 4, 9, t0 + ms(5)), None);
        assert_eq!(p.push_arrived(s(1), 3, 13, t0 + ms(7)), Some(ms(7)));
        // The next round of the key starts afresh.
        assert_eq!(p.push_arrived(s(1), 3, 11, t0 + ms(10)), None);
        assert_eq!(p.push_arrived(s(1), 3, 9, t0 + ms(10)), None);
        assert_eq!(p.push_arrived(s(1), 3, 13, t0 + ms(10)), Some(ms(0)));
    }

    #[test]
    fn a_worker_a_round_ahead_restarts_the_round_and_a_server_is_forgotten() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = PairLag::default();
        p.set_workers(2);
        assert_eq!(p.push_arrived(s(1), 3, 9, t0), None);
        assert_eq!(
            p.push_arrived(s(1), 3, 9, t0 + ms(50)),
            None,
            "9 again: a new round"
        );
        assert_eq!(p.push_arrived(s(1), 3, 11, t0 + ms(52)), Some(ms(2)));
        assert_eq!(p.push_arrived(s(1), 5, 9, t0), None);
        p.forget_server(s(1));
        assert_eq!(
            p.push_arrived(s(1), 5, 11, t0 + ms(1)),
            None,
            "its round was forgotten"
        );
        // A new worker count starts every round again.
        p.set_workers(3);
        assert_eq!(p.push_arrived(s(1), 5, 9, t0 + ms(2)), None);
    }

    #[test]
    fn open_rounds_are_bounded() {
        let t0 = Instant::now();
        let mut p = PairLag::default();
        p.set_workers(2);
        for k in 0..(MAX_OPEN as u64 + 10) {
            assert_eq!(p.push_arrived(s(1), k, 9, t0), None);
        }
        assert!(p.open.len() <= MAX_OPEN);
    }
}
