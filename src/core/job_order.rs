//! One learned order for the whole job (README, "One order for the job: the lowest
//! worker's").
//!
//! Every worker's proxy learns an order from its own worker's timing, and two proxies
//! can cut it differently (measured: under load the deferred tails differed by whole
//! layers, and a key deferred on one worker and not on the other waited at the server
//! for the rest of the iteration). So proxies pass their orders on over the tunnels and
//! every proxy uses the same one: the order learned from the worker with the lowest
//! node id. A proxy passes on the order it uses, with its origin and version, on every
//! tunnel session; a worker's proxy reaches every server's, and a server's proxy
//! reaches every worker's, so the lowest origin's order reaches every proxy. Versions
//! are publication times (microseconds since the epoch, as each proxy's clock has it),
//! so the newer of two records of one worker id wins whichever proxy made it: after a
//! job restart, worker 9 may be on another host.

use std::collections::{BTreeMap, HashMap};

/// Most keys an order record lists.
pub const MAX_ORDER_KEYS: usize = 1 << 16;

/// One worker's learned order as proxies pass it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRecord {
    /// The node id of the worker it was learned from.
    pub origin: u32,
    /// When it was made (microseconds since the epoch): newer records of one origin
    /// have higher versions.
    pub version: u64,
    /// (learning key, priority), most urgent first; empty: no trusted order (key order).
    pub keys: Vec<(u64, u32)>,
}

/// The orders this proxy knows, and the one it uses.
#[derive(Debug, Default)]
pub struct JobOrder {
    /// The newest record of each origin.
    records: BTreeMap<u32, OrderRecord>,
    /// The lowest id of the local workers this proxy learns from.
    local: Option<u32>,
    /// The version of this proxy's last own record (versions only grow).
    version: u64,
    /// Priorities of the record in use.
    in_use: HashMap<u64, u32>,
    /// (origin, version) of the record in use.
    stamp: Option<(u32, u64)>,
}

impl JobOrder {
    /// This proxy's own order changed at `now_us` (microseconds since the epoch): learned
    /// from local worker `origin` (the lowest local worker id), `keys` empty when it is
    /// not trusted. Returns whether the order in use changed.
    #[must_use]
    pub fn local(&mut self, origin: u32, mut keys: Vec<(u64, u32)>, now_us: u64) -> bool {
        if let Some(old) = self.local.replace(origin) {
            if old != origin {
                self.records.remove(&old);
            }
        }
        // Every proxy must use the same order: no more keys than a record carries.
        keys.truncate(MAX_ORDER_KEYS);
        self.version = now_us.max(self.version + 1);
        let record = OrderRecord {
            origin,
            version: self.version,
            keys,
        };
        self.records.insert(origin, record);
        self.choose()
    }

    /// A peer proxy passed on `record`: kept if it is newer than the one held for its
    /// origin, never for a worker of this proxy (this proxy is the authority on it).
    /// Returns whether the order in use changed.
    #[must_use]
    pub fn received(&mut self, record: OrderRecord) -> bool {
        if Some(record.origin) == self.local {
            return false;
        }
        if self
            .records
            .get(&record.origin)
            .is_some_and(|have| have.version >= record.version)
        {
            return false;
        }
        self.records.insert(record.origin, record);
        self.choose()
    }

    /// The lowest origin's record is the one in use.
    fn choose(&mut self) -> bool {
        let lowest = self.records.values().next();
        let stamp = lowest.map(|r| (r.origin, r.version));
        if stamp == self.stamp {
            return false;
        }
        self.stamp = stamp;
        self.in_use = lowest
            .map(|r| r.keys.iter().copied().collect())
            .unwrap_or_default();
        true
    }

    /// The record in use, if any.
    pub fn in_use(&self) -> Option<&OrderRecord> {
        self.records.values().next()
    }

    /// Whether the order in use ranks keys (an empty record means key order).
    pub fn ranks_keys(&self) -> bool {
        !self.in_use.is_empty()
    }

    /// The priority of learning key `key` in the order in use.
    pub fn priority(&self, key: u64) -> Option<u32> {
        self.in_use.get(&key).copied()
    }

    /// The local origin, once a local worker pushed.
    pub fn local_origin(&self) -> Option<u32> {
        self.local
    }

    /// A new job (a new node table): node ids are handed out again, so every record,
    /// this proxy's own too, is of the job before.
    pub fn new_job(&mut self) {
        self.records.clear();
        self.local = None;
        self.in_use.clear();
        self.stamp = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(origin: u32, version: u64, keys: &[(u64, u32)]) -> OrderRecord {
        OrderRecord {
            origin,
            version,
            keys: keys.to_vec(),
        }
    }

    #[test]
    fn the_lowest_workers_order_is_used_whichever_arrives_first() {
        let mut w11 = JobOrder::default();
        assert!(w11.local(11, vec![(1, 2), (2, 1)], 1));
        assert_eq!(w11.priority(2), Some(1));
        // Worker 9's order, passed on by a server's proxy, replaces its own.
        assert!(w11.received(record(9, 5, &[(1, 1), (2, 2)])));
        assert_eq!(w11.priority(1), Some(1));
        assert_eq!(w11.in_use().map(|r| r.origin), Some(9));
        // Its own order relearned later does not take over.
        assert!(!w11.local(11, vec![(1, 3), (2, 4)], 9));
        assert_eq!(w11.priority(1), Some(1));

        // A server's proxy holding both passes on worker 9's, in either arrival order.
        let mut server = JobOrder::default();
        assert!(server.received(record(11, 3, &[(1, 2), (2, 1)])));
        assert!(server.received(record(9, 5, &[(1, 1), (2, 2)])));
        assert!(!server.received(record(11, 4, &[(1, 2), (2, 1)])));
        assert_eq!(server.in_use(), Some(&record(9, 5, &[(1, 1), (2, 2)])));
    }

    #[test]
    fn stale_echoes_and_own_records_from_peers_change_nothing() {
        let mut w9 = JobOrder::default();
        assert!(w9.local(9, vec![(1, 1)], 100));
        let own = w9.in_use().cloned().expect("own record");
        assert_eq!(own.version, 100);
        // Its own order echoed back by a peer; a record of worker 9 from elsewhere, even
        // a newer one: this proxy is the authority on its own worker.
        assert!(!w9.received(own.clone()));
        assert!(!w9.received(record(9, 500, &[(1, 7)])));
        assert_eq!(w9.priority(1), Some(1));
        // Versions only grow, even if the clock steps back.
        assert!(w9.local(9, vec![(1, 2)], 50));
        assert_eq!(w9.in_use().map(|r| r.version), Some(101));

        let mut server = JobOrder::default();
        assert!(server.received(own.clone()));
        assert!(!server.received(own.clone()));
        // An older record of the same worker (delayed on another path) changes nothing.
        assert!(!server.received(record(9, 50, &[(1, 7)])));
        assert_eq!(server.priority(1), Some(1));
    }

    #[test]
    fn an_untrusted_lowest_order_means_key_order_everywhere() {
        let mut w11 = JobOrder::default();
        assert!(w11.local(11, vec![(1, 2), (2, 1)], 1));
        assert!(w11.ranks_keys());
        // Worker 9's proxy stopped trusting its order: every proxy goes to key order,
        // not each to its own.
        assert!(w11.received(record(9, 7, &[])));
        assert!(!w11.ranks_keys());
        assert_eq!(w11.priority(2), None);
        assert!(w11.received(record(9, 8, &[(2, 1), (1, 2)])));
        assert_eq!(w11.priority(2), Some(1));
    }

    #[test]
    fn a_lower_local_worker_replaces_the_proxys_own_record() {
        let mut host = JobOrder::default();
        assert!(host.local(11, vec![(1, 1)], 1));
        assert!(host.local(9, vec![(1, 2)], 2));
        assert_eq!(host.local_origin(), Some(9));
        assert_eq!(host.in_use().map(|r| (r.origin, r.version)), Some((9, 2)));
        // The record of 11 is gone: a peer's copy of it is kept as any other origin's.
        assert!(!host.received(record(11, 1, &[(1, 5)])));
        assert_eq!(host.priority(1), Some(2));
    }

    #[test]
    fn a_new_job_forgets_every_record_and_takes_the_first_of_each_worker() {
        let mut server = JobOrder::default();
        assert!(server.received(record(9, 1_000, &[(1, 1)])));
        server.new_job();
        assert_eq!(server.in_use(), None);
        assert_eq!(server.priority(1), None);
        // Worker 9 of the new job is on a host whose proxy's clock is behind: its first
        // record is taken, and a stale one of the job before, relayed late, is older.
        assert!(server.received(record(9, 900, &[(1, 2)])));
        assert!(!server.received(record(9, 800, &[(1, 1)])));
        assert_eq!(server.priority(1), Some(2));
    }
}
