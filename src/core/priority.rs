//! The priority of every message (DESIGN.md §5), behind one small interface so that
//! later sources (learned from traffic, mapped from the model) plug in beside MXNet
//! key order.
//!
//! Priorities: 0 for fences (SimpleApp commands, control messages, anything not
//! ps-lite), then 1 + the key's rank for data: lower is more urgent. Classes: 0 for
//! fences (CS6), then the data keys in three bands of the key space (CS4, CS2, CS0).

use std::collections::HashMap;

use p3proxy_parsers::mxnet::ServerRanges;
use p3proxy_parsers::pslite::{MessageKind, PsMessage};

use crate::core::dscp::Dscp;

/// Priority of fences.
pub const FENCE: u32 = 0;
/// Number of priority classes (one connection and one DSCP each).
pub const CLASSES: usize = 4;
/// DSCP of each class, one per IP precedence band (switches often queue by those bits).
pub const CLASS_DSCP: [Dscp; CLASSES] = [Dscp::CS6, Dscp::CS4, Dscp::CS2, Dscp::CS0];

/// Where key priorities come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// MXNet key order (what MXNet's own P3 uses; not layer order for Gluon).
    Key,
}

impl Source {
    /// Metric and log label.
    pub fn label(&self) -> &'static str {
        match self {
            Source::Key => "key",
        }
    }
}

/// The per-key priority table of one proxy.
#[derive(Debug)]
pub struct PriorityTable {
    source: Source,
    /// Explicit priorities by MXNet key (a later source fills these).
    by_key: HashMap<u64, u32>,
    /// Largest MXNet key seen, to cut the key space into class bands.
    max_key: u64,
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

impl PriorityTable {
    /// An empty table using `source`.
    pub fn new(source: Source) -> PriorityTable {
        PriorityTable {
            source,
            by_key: HashMap::new(),
            max_key: 0,
        }
    }

    /// The source in use.
    pub fn source(&self) -> Source {
        self.source
    }

    /// Priority of one MXNet key.
    pub fn key_priority(&self, key: u64) -> u32 {
        self.by_key
            .get(&key)
            .copied()
            .unwrap_or_else(|| u32::try_from(key).unwrap_or(u32::MAX - 1).saturating_add(1))
    }

    /// Class of a data priority: three bands over the keys seen so far.
    fn data_class(&self, key: u64) -> usize {
        let span = self.max_key + 1;
        1 + usize::try_from((key.min(self.max_key) * 3) / span)
            .unwrap_or(2)
            .min(2)
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
        let Some(keys) = msg.keys() else {
            return fence;
        };
        let mx_keys: Vec<u64> = keys
            .map(|k| ranges.and_then(|r| r.decode(k)).map_or(k, |d| d.offset))
            // Slice keys (offsets of 2^31 and up) and compression's dummy keys are not layer keys.
            .filter(|&k| k < 1 << 31)
            .collect();
        let Some(&first) = mx_keys.iter().min_by_key(|&&k| self.key_priority(k)) else {
            return fence;
        };
        self.max_key = self.max_key.max(mx_keys.iter().copied().max().unwrap_or(0));
        Urgency {
            priority: self.key_priority(first),
            class: self.data_class(first),
            fence: false,
        }
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
        let mut t = PriorityTable::new(Source::Key);
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
}
