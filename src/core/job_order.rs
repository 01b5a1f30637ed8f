//! One learned order for the whole job (README, "One order for every worker").
//!
//! Every worker's proxy learns an order from its own worker's timing, and two proxies
//! can cut it differently (measured: under load the deferred tails differed by whole
//! layers, and a key deferred on one worker and not on the other waited at the server
//! for the rest of the iteration). So proxies pass their orders on over the tunnels and
//! every proxy uses the same one: the order learned from the worker with the lowest
//! node id. A proxy passes on the order it uses, with its origin and version, on every
//! tunnel session; a worker's proxy reaches every server's, and a server's proxy
//! reaches every worker's, so the lowest origin's order reaches every proxy.

use std::collections::{BTreeMap, HashMap};

/// Most keys an order record lists.
pub const MAX_ORDER_KEYS: usize = 1 << 16;

/// One worker's learned order as proxies pass it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRecord {
    /// The node id of the worker it was learned from.
    pub origin: u32,
    /// Newer records of one origin have higher versions (a restarted proxy starts
    /// from its start time, so its records are newer than its previous run's).
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
    /// The version of this proxy's last own record.
    version: u64,
    /// Priorities of the record in use.
    in_use: HashMap<u64, u32>,
    /// (origin, version) of the record in use.
    stamp: Option<(u32, u64)>,
}

impl JobOrder {
    /// An empty book whose own records start above `version_base` (the shell passes the
    /// start time in microseconds).
    pub fn new(version_base: u64) -> JobOrder {
        JobOrder {
            version: version_base,
            ..JobOrder::default()
        }
    }

    /// This proxy's own order changed: learned from local worker `origin` (the lowest
    /// local worker id), `keys` empty when it is not trusted. Returns whether the order
    /// in use changed.
    pub fn local(&mut self, origin: u32, keys: Vec<(u64, u32)>) -> bool {
        if let Some(old) = self.local.replace(origin) {
            if old != origin {
                self.records.remove(&old);
            }
        }
        self.version += 1;
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
        let mut w11 = JobOrder::new(0);
        assert!(w11.local(11, vec![(1, 2), (2, 1)]));
        assert_eq!(w11.priority(2), Some(1));
        // Worker 9's order, passed on by a server's proxy, replaces its own.
        assert!(w11.received(record(9, 5, &[(1, 1), (2, 2)])));
        assert_eq!(w11.priority(1), Some(1));
        assert_eq!(w11.in_use().map(|r| r.origin), Some(9));
        // Its own order relearned later does not take over.
        assert!(!w11.local(11, vec![(1, 3), (2, 4)]));
        assert_eq!(w11.priority(1), Some(1));

        // A server's proxy holding both passes on worker 9's, in either arrival order.
        let mut server = JobOrder::new(0);
        assert!(server.received(record(11, 3, &[(1, 2), (2, 1)])));
        assert!(server.received(record(9, 5, &[(1, 1), (2, 2)])));
        assert!(!server.received(record(11, 4, &[(1, 2), (2, 1)])));
        assert_eq!(server.in_use(), Some(&record(9, 5, &[(1, 1), (2, 2)])));
    }

    #[test]
    fn stale_echoes_and_own_records_from_peers_change_nothing() {
        let mut w9 = JobOrder::new(100);
        assert!(w9.local(9, vec![(1, 1)]));
        let own = w9.in_use().cloned().expect("own record");
        assert_eq!(own.version, 101);
        // Its own order echoed back by a peer, or an older one of a previous run.
        assert!(!w9.received(own.clone()));
        assert!(!w9.received(record(9, 500, &[(1, 7)])));
        assert_eq!(w9.priority(1), Some(1));

        let mut server = JobOrder::new(0);
        assert!(server.received(own.clone()));
        assert!(!server.received(own.clone()));
        assert!(!server.received(record(9, 50, &[(1, 7)])));
        assert_eq!(server.priority(1), Some(1));
    }

    #[test]
    fn an_untrusted_lowest_order_means_key_order_everywhere() {
        let mut w11 = JobOrder::new(0);
        assert!(w11.local(11, vec![(1, 2), (2, 1)]));
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
        let mut host = JobOrder::new(0);
        assert!(host.local(11, vec![(1, 1)]));
        assert!(host.local(9, vec![(1, 2)]));
        assert_eq!(host.local_origin(), Some(9));
        assert_eq!(host.in_use().map(|r| (r.origin, r.version)), Some((9, 2)));
        // The record of 11 is gone: a peer's copy of it is kept as any other origin's.
        assert!(!host.received(record(11, 1, &[(1, 5)])));
        assert_eq!(host.priority(1), Some(2));
    }
}
