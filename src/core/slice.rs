//! Slices between two proxies (DESIGN.md §6), sans-IO: the frames a tunnel session's
//! class connections carry, and the receiving side's reassembly and in-order delivery.
//!
//! ```text
//! announce (class 0 connection, in session order, before any slice of the message):
//!   0x41 seq:u64 total:u64 priority:u32 fence:u8 nkeys:u16 keys:u64*nkeys
//! announce of a part (a slice-key response the receiver merges, DESIGN.md §7):
//!   0x50 (as 0x41) key:u64 index:u32 count:u32 slice:u64 value_total:u64
//! slice (the message's class connection, in offset order):
//!   0x53 seq:u64 offset:u64 len:u32 payload
//! the job's order in use (class 0 connection, before the announcement it precedes;
//! `crate::core::job_order`):
//!   0x4f origin:u32 version:u64 nkeys:u32 (key:u64 priority:u32)*nkeys
//! ```
//! `seq` numbers the messages of one session in the order the app sent them. Because a
//! message travels on its class's connection and the announcements on the top one, a
//! message can be complete before an earlier one is, and its first slices can arrive
//! before its announcement (two TCP connections); the [`Reassembler`] holds such early
//! slices (counted in its memory bound), and delivers a complete message only when
//! every earlier message of its session is announced, and each one still undelivered is
//! neither a fence nor shares a key with it (§4).

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};

use nom::number::streaming::{be_u16, be_u32, be_u64, be_u8};
use nom::{IResult, Parser};

use crate::core::job_order::{OrderRecord, MAX_ORDER_KEYS};

/// Most keys an announcement lists; a message with more travels as a fence.
pub const MAX_ANNOUNCED_KEYS: usize = 4096;
/// Largest slice payload accepted.
pub const MAX_SLICE_LEN: u32 = 16 << 20;
/// How far past the last announcement an early slice may point.
pub const MAX_EARLY_MESSAGES: u64 = 4096;
const TAG_ANNOUNCE: u8 = 0x41;
const TAG_ANNOUNCE_PART: u8 = 0x50;
const TAG_SLICE: u8 = 0x53;
const TAG_ORDER: u8 = 0x4f;

/// What a message is, told before its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    /// Position in the session.
    pub seq: u64,
    /// Bytes of the whole message.
    pub total: u64,
    /// The priority the sender used (the server side needs no guess).
    pub priority: u32,
    /// Nothing passes it, it passes nothing.
    pub fence: bool,
    /// Its keys (empty for fences).
    pub keys: Vec<u64>,
    /// It is one slice-key response of a split key, for the receiver to merge.
    pub part: Option<Part>,
}

/// Which part of a split key's response a message is: the response to slice key
/// `index` of `count`, each `slice` bytes but the last, of a `total`-byte value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// The original ps-lite key.
    pub key: u64,
    /// The slice.
    pub index: u32,
    /// Slices of the key.
    pub count: u32,
    /// Bytes per slice.
    pub slice: u64,
    /// Bytes of the whole value.
    pub total: u64,
}

/// A frame on a tunnel class connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SliceFrame {
    /// A message's announcement.
    Announce(Announce),
    /// Bytes `offset..offset+payload.len()` of message `seq`.
    Slice {
        /// The message.
        seq: u64,
        /// Where the payload goes.
        offset: u64,
        /// The bytes.
        payload: Bytes,
    },
    /// The order the peer proxy uses for the job (not a message).
    Order(OrderRecord),
}

/// Why tunnel bytes or a peer's behaviour are refused; the session is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SliceError {
    /// Not a frame this proxy knows.
    #[error("unknown tunnel frame tag {0:#04x}")]
    Tag(u8),
    /// A length over its limit.
    #[error("{what} of {len} exceeds the limit of {max}")]
    TooLarge {
        /// What.
        what: &'static str,
        /// Claimed.
        len: u64,
        /// Limit.
        max: u64,
    },
    /// A slice for a message never announced.
    #[error("slice of unannounced message {0}")]
    Unannounced(u64),
    /// A slice that does not continue its message, or runs past its end.
    #[error("slice of message {seq} at {offset} does not continue its {have} bytes of {total}")]
    BadOffset {
        /// The message.
        seq: u64,
        /// Where the slice claimed to go.
        offset: u64,
        /// Bytes already in.
        have: u64,
        /// The message's size.
        total: u64,
    },
    /// Announcements out of session order.
    #[error("announcement {got} where {want} was due")]
    Sequence {
        /// Expected.
        want: u64,
        /// Received.
        got: u64,
    },
    /// A frame only the main stream carries, on a class connection.
    #[error("{0} frame on a class connection (only the main stream carries it)")]
    OffMain(&'static str),
    /// The peer holds more unfinished bytes than the memory bound.
    #[error("reassembly would hold {wanted} bytes, over the bound of {bound}")]
    Memory {
        /// Bytes that would be held.
        wanted: u64,
        /// The bound.
        bound: u64,
    },
}

impl<I> nom::error::ParseError<I> for SliceError {
    fn from_error_kind(_: I, _: nom::error::ErrorKind) -> Self {
        SliceError::Tag(0)
    }
    fn append(_: I, _: nom::error::ErrorKind, other: Self) -> Self {
        other
    }
}

impl SliceFrame {
    /// Appends the frame's header (and for an announcement, all of it) to `out`;
    /// a slice's payload is written by the caller after it (no copy).
    pub fn encode_header(&self, out: &mut Vec<u8>) {
        match self {
            SliceFrame::Announce(a) => {
                out.push(if a.part.is_some() {
                    TAG_ANNOUNCE_PART
                } else {
                    TAG_ANNOUNCE
                });
                out.extend_from_slice(&a.seq.to_be_bytes());
                out.extend_from_slice(&a.total.to_be_bytes());
                out.extend_from_slice(&a.priority.to_be_bytes());
                out.push(u8::from(a.fence));
                let keys = &a.keys[..a.keys.len().min(MAX_ANNOUNCED_KEYS)];
                out.extend_from_slice(&(keys.len() as u16).to_be_bytes());
                for k in keys {
                    out.extend_from_slice(&k.to_be_bytes());
                }
                if let Some(p) = &a.part {
                    out.extend_from_slice(&p.key.to_be_bytes());
                    out.extend_from_slice(&p.index.to_be_bytes());
                    out.extend_from_slice(&p.count.to_be_bytes());
                    out.extend_from_slice(&p.slice.to_be_bytes());
                    out.extend_from_slice(&p.total.to_be_bytes());
                }
            }
            SliceFrame::Slice {
                seq,
                offset,
                payload,
            } => encode_slice_header(*seq, *offset, payload.len() as u32, out),
            SliceFrame::Order(r) => {
                let keys = &r.keys[..r.keys.len().min(MAX_ORDER_KEYS)];
                out.push(TAG_ORDER);
                out.extend_from_slice(&r.origin.to_be_bytes());
                out.extend_from_slice(&r.version.to_be_bytes());
                out.extend_from_slice(&(keys.len() as u32).to_be_bytes());
                for (k, p) in keys {
                    out.extend_from_slice(&k.to_be_bytes());
                    out.extend_from_slice(&p.to_be_bytes());
                }
            }
        }
    }

    /// The whole frame (tests, small frames).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_header(&mut out);
        if let SliceFrame::Slice { payload, .. } = self {
            out.extend_from_slice(payload);
        }
        out
    }
}

/// Appends the header of a slice of `len` bytes (the payload follows it on the wire).
pub fn encode_slice_header(seq: u64, offset: u64, len: u32, out: &mut Vec<u8>) {
    out.push(TAG_SLICE);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Size of a slice header.
pub const SLICE_HEADER_LEN: usize = 21;

/// A frame's header: a whole announcement, or where a slice's payload goes.
enum Head {
    Announce(Announce),
    Slice { seq: u64, offset: u64, len: u32 },
    Order(OrderRecord),
}

fn parse_head(input: &[u8]) -> IResult<&[u8], Head, SliceError> {
    let (rest, tag) = be_u8(input)?;
    match tag {
        TAG_ANNOUNCE | TAG_ANNOUNCE_PART => {
            let (rest, (seq, total, priority, fence, n)) =
                (be_u64, be_u64, be_u32, be_u8, be_u16).parse(rest)?;
            if usize::from(n) > MAX_ANNOUNCED_KEYS {
                let e = SliceError::TooLarge {
                    what: "announced keys",
                    len: n.into(),
                    max: MAX_ANNOUNCED_KEYS as u64,
                };
                return Err(nom::Err::Failure(e));
            }
            let (rest, keys) = nom::multi::count(be_u64, usize::from(n)).parse(rest)?;
            let (rest, part) = if tag == TAG_ANNOUNCE_PART {
                let (rest, (key, index, count, slice, total)) =
                    (be_u64, be_u32, be_u32, be_u64, be_u64).parse(rest)?;
                let part = Part {
                    key,
                    index,
                    count,
                    slice,
                    total,
                };
                (rest, Some(part))
            } else {
                (rest, None)
            };
            let a = Announce {
                seq,
                total,
                priority,
                fence: fence != 0,
                keys,
                part,
            };
            Ok((rest, Head::Announce(a)))
        }
        TAG_SLICE => {
            let (rest, (seq, offset, len)) = (be_u64, be_u64, be_u32).parse(rest)?;
            if len > MAX_SLICE_LEN {
                let e = SliceError::TooLarge {
                    what: "slice",
                    len: len.into(),
                    max: MAX_SLICE_LEN.into(),
                };
                return Err(nom::Err::Failure(e));
            }
            Ok((rest, Head::Slice { seq, offset, len }))
        }
        TAG_ORDER => {
            let (rest, (origin, version, n)) = (be_u32, be_u64, be_u32).parse(rest)?;
            if n as usize > MAX_ORDER_KEYS {
                let e = SliceError::TooLarge {
                    what: "order keys",
                    len: n.into(),
                    max: MAX_ORDER_KEYS as u64,
                };
                return Err(nom::Err::Failure(e));
            }
            let (rest, keys) = nom::multi::count((be_u64, be_u32), n as usize).parse(rest)?;
            let r = OrderRecord {
                origin,
                version,
                keys,
            };
            Ok((rest, Head::Order(r)))
        }
        t => Err(nom::Err::Failure(SliceError::Tag(t))),
    }
}

/// Parses one frame from the front of `buf` (streaming: `Incomplete` until it is in);
/// payloads are zero-copy slices of `buf`. Lengths are checked before waiting for them.
pub fn parse_frame(buf: &Bytes) -> IResult<&[u8], SliceFrame, SliceError> {
    let input: &[u8] = buf;
    match parse_head(input)? {
        (rest, Head::Announce(a)) => Ok((rest, SliceFrame::Announce(a))),
        (rest, Head::Order(r)) => Ok((rest, SliceFrame::Order(r))),
        (rest, Head::Slice { seq, offset, len }) => {
            let (rest, payload) = nom::bytes::streaming::take(len).parse(rest)?;
            Ok((
                rest,
                SliceFrame::Slice {
                    seq,
                    offset,
                    payload: buf.slice_ref(payload),
                },
            ))
        }
    }
}

/// Takes one frame off the front of a read buffer, if it is all in (the payload is
/// split off without a copy).
pub fn take_frame(buf: &mut BytesMut) -> Result<Option<SliceFrame>, SliceError> {
    let (used, head) = match parse_head(buf) {
        Ok((rest, head)) => (buf.len() - rest.len(), head),
        Err(nom::Err::Incomplete(_)) => return Ok(None),
        Err(nom::Err::Error(e) | nom::Err::Failure(e)) => return Err(e),
    };
    match head {
        Head::Announce(a) => {
            let _ = buf.split_to(used);
            Ok(Some(SliceFrame::Announce(a)))
        }
        Head::Order(r) => {
            let _ = buf.split_to(used);
            Ok(Some(SliceFrame::Order(r)))
        }
        Head::Slice { seq, offset, len } => {
            let len = len as usize;
            if buf.len() < used + len {
                buf.reserve(used + len - buf.len());
                return Ok(None);
            }
            let _ = buf.split_to(used);
            let payload = buf.split_to(len).freeze();
            Ok(Some(SliceFrame::Slice {
                seq,
                offset,
                payload,
            }))
        }
    }
}

#[derive(Debug, Default)]
struct Pending {
    /// `None` while only early slices are in.
    announce: Option<Announce>,
    /// The payloads as they arrived (no copy: a message is written out piece by piece).
    pieces: Vec<Bytes>,
    have: u64,
}

/// A complete message, as the payload pieces that make it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reassembled {
    /// Its number in the session.
    pub seq: u64,
    /// Its bytes, in order.
    pub pieces: Vec<Bytes>,
    /// Their total length.
    pub len: u64,
    /// Announced as a fence (a command, control message, or not ps-lite).
    pub fence: bool,
    /// Announced as a part of a split key's response.
    pub part: Option<Part>,
}

/// How far an unfinished message has arrived.
#[derive(Debug)]
pub struct Progress<'a> {
    /// Its bytes so far, in order.
    pub pieces: &'a [Bytes],
    /// Their length.
    pub have: u64,
    /// The message's length.
    pub total: u64,
    /// It may go to the app now as far as the order rules go (every earlier message
    /// still undelivered is announced, not a fence, and shares no key with it).
    pub may_pass: bool,
}

impl Reassembled {
    /// The bytes in one buffer (tests, small messages).
    pub fn to_vec(&self) -> Vec<u8> {
        self.pieces.concat()
    }
}

/// Reassembly and delivery for one tunnel session, with bounded memory.
#[derive(Debug)]
pub struct Reassembler {
    bound: u64,
    held: u64,
    next_announce: u64,
    /// Announced (or with early slices) and not yet delivered, by seq.
    pending: BTreeMap<u64, Pending>,
}

impl Reassembler {
    /// A reassembler holding at most `bound` unfinished bytes (one message larger
    /// than the bound is accepted when nothing else is held, so that it cannot wedge).
    pub fn new(bound: u64) -> Reassembler {
        Reassembler {
            bound,
            held: 0,
            next_announce: 0,
            pending: BTreeMap::new(),
        }
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.held
    }

    fn reserve(&mut self, more: u64) -> Result<(), SliceError> {
        let wanted = self.held + more;
        if wanted > self.bound && self.held > 0 {
            return Err(SliceError::Memory {
                wanted,
                bound: self.bound,
            });
        }
        self.held = wanted;
        Ok(())
    }

    /// Takes one frame; returns the messages that may now go to the app, in order.
    pub fn on_frame(&mut self, frame: SliceFrame) -> Result<Vec<Reassembled>, SliceError> {
        match frame {
            // Not part of any message: the shell hands it to the job order.
            SliceFrame::Order(_) => return Ok(Vec::new()),
            SliceFrame::Announce(a) => {
                if a.seq != self.next_announce {
                    return Err(SliceError::Sequence {
                        want: self.next_announce,
                        got: a.seq,
                    });
                }
                self.next_announce += 1;
                let have = self.pending.get(&a.seq).map_or(0, |p| p.have);
                if have > a.total {
                    return Err(SliceError::BadOffset {
                        seq: a.seq,
                        offset: 0,
                        have,
                        total: a.total,
                    });
                }
                // Early bytes are already counted.
                self.reserve(a.total - have)?;
                let seq = a.seq;
                self.pending.entry(seq).or_default().announce = Some(a);
            }
            SliceFrame::Slice {
                seq,
                offset,
                payload,
            } => {
                let early = seq >= self.next_announce;
                if early && seq - self.next_announce >= MAX_EARLY_MESSAGES {
                    return Err(SliceError::Unannounced(seq));
                }
                if !early && !self.pending.contains_key(&seq) {
                    return Err(SliceError::Unannounced(seq));
                }
                if early {
                    self.reserve(payload.len() as u64)?;
                }
                let p = self.pending.entry(seq).or_default();
                let have = p.have;
                let total = p.announce.as_ref().map_or(u64::MAX, |a| a.total);
                if offset != have || have + payload.len() as u64 > total {
                    return Err(SliceError::BadOffset {
                        seq,
                        offset,
                        have,
                        total,
                    });
                }
                p.have += payload.len() as u64;
                if !payload.is_empty() {
                    p.pieces.push(payload);
                }
            }
        }
        Ok(self.deliverable())
    }

    /// How far announced message `seq` has arrived, while it is not delivered.
    pub fn progress(&self, seq: u64) -> Option<Progress<'_>> {
        let p = self.pending.get(&seq)?;
        let me = p.announce.as_ref()?;
        Some(Progress {
            pieces: &p.pieces,
            have: p.have,
            total: me.total,
            may_pass: !self.blocked(seq, me),
        })
    }

    fn blocked(&self, seq: u64, me: &Announce) -> bool {
        self.pending.range(..seq).any(|(_, e)| {
            e.announce
                .as_ref()
                .is_none_or(|e| e.fence || me.fence || e.keys.iter().any(|k| me.keys.contains(k)))
        })
    }

    fn complete(p: &Pending) -> bool {
        p.announce.as_ref().is_some_and(|a| p.have == a.total)
    }

    fn deliverable(&mut self) -> Vec<Reassembled> {
        let mut out = Vec::new();
        loop {
            let mut pick = None;
            // Only announced messages: every earlier one is known.
            for (&seq, p) in self.pending.range(..self.next_announce) {
                if !Self::complete(p) {
                    continue;
                }
                let me = p.announce.as_ref().expect("complete means announced");
                if !self.blocked(seq, me) {
                    pick = Some(seq);
                    break;
                }
            }
            let Some(seq) = pick else { return out };
            let p = self.pending.remove(&seq).expect("picked");
            self.held -= p.have;
            let announce = p.announce.expect("complete means announced");
            out.push(Reassembled {
                seq,
                pieces: p.pieces,
                len: p.have,
                fence: announce.fence,
                part: announce.part,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announce(seq: u64, total: u64, fence: bool, keys: &[u64]) -> SliceFrame {
        SliceFrame::Announce(Announce {
            seq,
            total,
            priority: 1,
            fence,
            keys: keys.to_vec(),
            part: None,
        })
    }

    #[test]
    fn a_part_announcement_round_trips_and_reaches_the_reassembled_message() {
        let part = Part {
            key: 9,
            index: 2,
            count: 3,
            slice: 400,
            total: 1000,
        };
        let a = SliceFrame::Announce(Announce {
            seq: 0,
            total: 3,
            priority: 7,
            fence: false,
            keys: vec![9],
            part: Some(part),
        });
        let wire = Bytes::from(a.encode());
        assert_eq!(wire[0], TAG_ANNOUNCE_PART);
        let (rest, back) = parse_frame(&wire).unwrap();
        assert!(rest.is_empty());
        assert_eq!(back, a);
        for n in 0..wire.len() {
            assert!(matches!(
                parse_frame(&wire.slice(..n)),
                Err(nom::Err::Incomplete(_))
            ));
        }
        let mut r = Reassembler::new(1 << 20);
        r.on_frame(a).unwrap();
        let out = r.on_frame(slice(0, 0, b"abc")).unwrap();
        assert_eq!(out[0].part, Some(part));
        assert_eq!(out[0].seq, 0);
    }

    #[test]
    fn progress_shows_the_prefix_and_whether_the_order_rules_let_it_pass() {
        let mut r = Reassembler::new(1 << 20);
        r.on_frame(announce(0, 10, false, &[1])).unwrap();
        r.on_frame(announce(1, 6, false, &[2])).unwrap();
        r.on_frame(announce(2, 4, false, &[1])).unwrap();
        r.on_frame(slice(1, 0, b"abc")).unwrap();
        let p = r.progress(1).unwrap();
        assert_eq!((p.have, p.total, p.may_pass), (3, 6, true));
        assert_eq!(p.pieces.concat(), b"abc");
        r.on_frame(slice(2, 0, b"xy")).unwrap();
        assert!(
            !r.progress(2).unwrap().may_pass,
            "shares key 1 with message 0"
        );
        r.on_frame(announce(3, 2, true, &[])).unwrap();
        assert!(!r.progress(3).unwrap().may_pass, "a fence passes nothing");
        assert!(r.progress(9).is_none());
        // Delivered messages have no progress.
        let out = r.on_frame(slice(1, 3, b"def")).unwrap();
        assert_eq!(out[0].seq, 1);
        assert!(r.progress(1).is_none());
    }

    /// Each delivered message's bytes.
    fn flat(msgs: Vec<Reassembled>) -> Vec<Vec<u8>> {
        msgs.iter().map(Reassembled::to_vec).collect()
    }

    fn slice(seq: u64, offset: u64, data: &[u8]) -> SliceFrame {
        SliceFrame::Slice {
            seq,
            offset,
            payload: Bytes::copy_from_slice(data),
        }
    }

    #[test]
    fn frames_round_trip_and_every_prefix_is_incomplete() {
        for f in [
            announce(3, 99, false, &[1, 2, 0x8000_0000_0000_0000]),
            slice(7, 160_000, b"abc"),
        ] {
            let wire = Bytes::from(f.encode());
            assert_eq!(parse_frame(&wire).unwrap().1, f);
            let mut buf = BytesMut::from(&wire[..]);
            buf.extend_from_slice(b"next");
            assert_eq!(take_frame(&mut buf).unwrap(), Some(f.clone()));
            assert_eq!(&buf[..], b"next");
            let mut short = BytesMut::from(&wire[..wire.len() - 1]);
            assert_eq!(take_frame(&mut short).unwrap(), None);
            assert_eq!(
                short.len(),
                wire.len() - 1,
                "nothing taken from a partial frame"
            );
            for cut in 0..wire.len() {
                assert!(matches!(
                    parse_frame(&wire.slice(..cut)),
                    Err(nom::Err::Incomplete(_))
                ));
            }
        }
    }

    #[test]
    fn an_order_record_round_trips_between_announcements_and_takes_no_sequence_number() {
        let order = SliceFrame::Order(OrderRecord {
            origin: 9,
            version: 1_700_000_000_000_001,
            keys: vec![(3 << 16, 1), (1 << 16 | 1, 2), (0, 3)],
        });
        let wire = order.encode();
        assert_eq!(wire.len(), 1 + 4 + 8 + 4 + 3 * 12);
        for n in 0..wire.len() {
            assert!(matches!(
                parse_frame(&Bytes::copy_from_slice(&wire[..n])),
                Err(nom::Err::Incomplete(_))
            ));
        }
        // On the main stream between two announcements, as the egress writes it.
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&announce(0, 1, false, &[1]).encode());
        buf.extend_from_slice(&wire);
        buf.extend_from_slice(&announce(1, 1, false, &[2]).encode());
        let mut r = Reassembler::new(1 << 20);
        let mut got = Vec::new();
        while let Some(f) = take_frame(&mut buf).unwrap() {
            got.push(f.clone());
            assert!(r.on_frame(f).unwrap().is_empty());
        }
        assert_eq!(got[1], order);
        assert_eq!(got.len(), 3, "the second announcement is still seq 1");
    }

    #[test]
    fn hostile_frames() {
        let mut many = vec![TAG_ORDER];
        many.extend([0u8; 12]);
        many.extend((MAX_ORDER_KEYS as u32 + 1).to_be_bytes());
        assert_eq!(
            parse_frame(&Bytes::from(many)),
            Err(nom::Err::Failure(SliceError::TooLarge {
                what: "order keys",
                len: MAX_ORDER_KEYS as u64 + 1,
                max: MAX_ORDER_KEYS as u64
            }))
        );
        let mut big = vec![TAG_SLICE];
        big.extend([0u8; 16]);
        big.extend(u32::MAX.to_be_bytes());
        assert!(matches!(
            parse_frame(&Bytes::from(big)),
            Err(nom::Err::Failure(SliceError::TooLarge {
                what: "slice",
                ..
            }))
        ));
        assert_eq!(
            parse_frame(&Bytes::from_static(b"X")),
            Err(nom::Err::Failure(SliceError::Tag(b'X')))
        );
        let mut r = Reassembler::new(1000);
        assert_eq!(
            r.on_frame(slice(MAX_EARLY_MESSAGES, 0, b"x")),
            Err(SliceError::Unannounced(MAX_EARLY_MESSAGES)),
            "an early slice too far ahead"
        );
        flat(r.on_frame(announce(0, 4, false, &[1])).unwrap());
        assert_eq!(
            r.on_frame(slice(0, 2, b"x")),
            Err(SliceError::BadOffset {
                seq: 0,
                offset: 2,
                have: 0,
                total: 4
            }),
            "a slice pointing past what is in"
        );
        assert_eq!(
            r.on_frame(slice(0, 0, b"12345")),
            Err(SliceError::BadOffset {
                seq: 0,
                offset: 0,
                have: 0,
                total: 4
            }),
            "a slice running past the message"
        );
        assert_eq!(
            r.on_frame(announce(5, 4, false, &[])),
            Err(SliceError::Sequence { want: 1, got: 5 })
        );
        assert_eq!(
            r.on_frame(announce(1, 2000, false, &[2])),
            Err(SliceError::Memory {
                wanted: 2004,
                bound: 1000
            })
        );
    }

    #[test]
    fn early_slices_wait_for_their_announcement_within_the_bound() {
        let mut r = Reassembler::new(10);
        // Message 0's slices overtake its announcement (another connection).
        assert_eq!(
            flat(r.on_frame(slice(0, 0, b"ab")).unwrap()),
            Vec::<Vec<u8>>::new()
        );
        assert_eq!(
            flat(r.on_frame(slice(0, 2, b"c")).unwrap()),
            Vec::<Vec<u8>>::new()
        );
        assert_eq!(r.held(), 3);
        assert_eq!(
            r.on_frame(slice(1, 0, b"0123456789")),
            Err(SliceError::Memory {
                wanted: 13,
                bound: 10
            }),
            "early bytes count against the bound"
        );
        assert_eq!(
            flat(r.on_frame(announce(0, 3, false, &[4])).unwrap()),
            vec![b"abc".to_vec()]
        );
        assert_eq!(r.held(), 0);
        assert_eq!(
            r.on_frame(slice(0, 0, b"x")),
            Err(SliceError::Unannounced(0)),
            "a delivered message gets no more bytes"
        );
        // An announcement smaller than what arrived early.
        flat(r.on_frame(slice(1, 0, b"xyz")).unwrap());
        assert_eq!(
            r.on_frame(announce(1, 2, false, &[])),
            Err(SliceError::BadOffset {
                seq: 1,
                offset: 0,
                have: 3,
                total: 2
            })
        );
    }

    #[test]
    fn disjoint_messages_overtake_fences_and_shared_keys_do_not() {
        let mut r = Reassembler::new(1 << 20);
        // 0: big, key 30 (low class); 1: small, key 0 (high class); 2: fence; 3: key 0 again.
        flat(r.on_frame(announce(0, 6, false, &[30])).unwrap());
        flat(r.on_frame(announce(1, 2, false, &[0])).unwrap());
        flat(r.on_frame(announce(2, 1, true, &[])).unwrap());
        flat(r.on_frame(announce(3, 1, false, &[0])).unwrap());
        flat(r.on_frame(slice(0, 0, b"big")).unwrap());
        assert_eq!(
            flat(r.on_frame(slice(1, 0, b"hi")).unwrap()),
            vec![b"hi".to_vec()],
            "overtakes the big one"
        );
        assert_eq!(
            flat(r.on_frame(slice(3, 0, b"z")).unwrap()),
            Vec::<Vec<u8>>::new(),
            "behind the fence"
        );
        assert_eq!(
            flat(r.on_frame(slice(2, 0, b"F")).unwrap()),
            Vec::<Vec<u8>>::new(),
            "the fence waits for 0"
        );
        assert_eq!(
            flat(r.on_frame(slice(0, 3, b"msg")).unwrap()),
            vec![b"bigmsg".to_vec(), b"F".to_vec(), b"z".to_vec()]
        );
        assert_eq!(r.held(), 0);
    }
}
