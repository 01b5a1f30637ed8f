//! The receiving side of a sliced tunnel session, from reassembly to delivery, sans-IO
//! (DESIGN.md §6-7): each reassembled message is checked to be exactly one ZMTP unit;
//! in front of a local server, a push of a split key becomes slice requests as its
//! bytes arrive (so the server aggregates the first slices while the rest is on the
//! wire) and the rest when it is complete; in front of a worker, the parts of a split
//! key's response that the server's proxy streamed merge into the one response the
//! worker expects. The shell feeds it progress and complete messages, asks the
//! splitter through it, and writes what it returns.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use bytes::Bytes;
use p3proxy_parsers::pslite::{parse_meta, Meta};
use p3proxy_parsers::zmtp::{copy_range, ByteSource, FrameScanner, Limits, ZmtpError};

use super::slice::{Progress, Reassembled};
use super::split::{byte_range, slice_request, Failure, HeadPlan, Layout, Merger, Pieces};

/// What was decided for a message still arriving.
#[derive(Debug)]
enum Stream {
    /// It goes to the app whole when complete.
    Whole,
    /// Its slice requests go out as their bytes arrive.
    Slicing {
        layout: Layout,
        meta: Pieces,
        /// Where its vals bytes start in the message.
        vals_off: u64,
        /// The next slice to send.
        next: u32,
    },
}

/// The delivery state of one receiving tunnel session.
#[derive(Debug)]
pub struct Delivery {
    /// The session goes to a local server this proxy fronts.
    to_server: bool,
    /// Messages still arriving, by number, that were decided.
    streams: HashMap<u64, Stream>,
    /// Parts of split keys' responses from the peer.
    merger: Merger,
}

/// The start of a data message: its meta frame, keys, and where its vals are.
struct Head {
    meta_frame: Bytes,
    keys: Vec<u64>,
    vals_off: u64,
    vals_len: u64,
}

enum HeadScan {
    More,
    NotData,
    Head(Head),
}

/// Reads a message's first three frame headers (and the meta and keys bodies) from
/// the bytes in so far.
fn scan_head(pieces: &[Bytes], limits: &Limits) -> HeadScan {
    let have = ByteSource::len(pieces);
    let mut scan = FrameScanner::new(limits);
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    for max in [MAX_META_LEN, 8 * 16, u64::MAX] {
        let f = match scan.next_frame(pieces) {
            Ok(Some(f)) => f,
            Ok(None) => return HeadScan::More,
            Err(_) => return HeadScan::NotData,
        };
        if f.header.command || !f.header.more || f.header.size > max {
            return HeadScan::NotData;
        }
        if let [meta, keys] = &mut bodies[..] {
            if keys.len() % 8 != 0 {
                return HeadScan::NotData;
            }
            return HeadScan::Head(Head {
                meta_frame: Bytes::from(std::mem::take(meta)),
                keys: keys
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
                vals_off: f.body,
                vals_len: f.header.size,
            });
        }
        if have < f.end() {
            return HeadScan::More;
        }
        bodies.push(copy_range(pieces, f.body, f.header.size as usize));
    }
    HeadScan::NotData
}

/// Bytes `off..off + n` of `pieces`, zero-copy.
fn range(pieces: &[Bytes], off: u64, n: u64) -> Pieces {
    Pieces {
        parts: byte_range(pieces, off, n),
        len: n,
    }
}

/// What a step produced: wire pieces to write to the destination, and what to count.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delivered {
    /// Bytes to write, in order.
    pub pieces: Vec<Bytes>,
    /// A request for a split key started to go out as slice requests.
    pub split_request: bool,
    /// Slice requests among `pieces`.
    pub slice_requests: u64,
    /// A split key's response was merged from its parts.
    pub merged: bool,
}

/// Why a session's delivery stops.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryError {
    /// A split layout cannot serve the message: the server's traffic stops.
    Stopped(Failure),
    /// A part of a split key's response that does not merge.
    BadPart(String),
}

impl Delivery {
    /// The state of a session going to a local server (`to_server`) or elsewhere.
    pub fn new(to_server: bool) -> Delivery {
        Delivery {
            to_server,
            streams: HashMap::new(),
            merger: Merger::default(),
        }
    }

    /// Its requests go to a local server: they may be split.
    pub fn in_front_of_server(&self) -> bool {
        self.to_server
    }

    /// Message `seq` of `sender` to a local server got bytes (`p`): a push of a split
    /// key sends the slice requests whose bytes are in. Call in front of a server only.
    /// `ask_head` asks the splitter about a message's head (its
    /// [`crate::core::split::Splitter::on_request_head`]), once per message, when its head is in.
    pub fn on_progress(
        &mut self,
        sender: Option<i32>,
        seq: u64,
        p: &Progress<'_>,
        limits: &Limits,
        ask_head: impl FnOnce(i32, &Meta, &[u64], u64) -> HeadPlan,
    ) -> Result<Delivered, DeliveryError> {
        let mut out = Delivered::default();
        if let Entry::Vacant(slot) = self.streams.entry(seq) {
            if !p.may_pass {
                return Ok(out); // Asked again when more of it arrives.
            }
            let head = match scan_head(p.pieces, limits) {
                HeadScan::More => return Ok(out),
                HeadScan::NotData => None,
                HeadScan::Head(h) => Some(h),
            };
            let meta = head.as_ref().and_then(|h| parse_meta(&h.meta_frame).ok());
            let decided = match (head, meta, sender) {
                (Some(h), Some(meta), Some(sender)) => {
                    match ask_head(sender, &meta, &h.keys, h.vals_len) {
                        HeadPlan::Whole => Stream::Whole,
                        HeadPlan::Stop(f) => return Err(DeliveryError::Stopped(f)),
                        HeadPlan::Stream(layout) => {
                            out.split_request = true;
                            Stream::Slicing {
                                layout,
                                meta: Pieces::one(h.meta_frame),
                                vals_off: h.vals_off,
                                next: 0,
                            }
                        }
                    }
                }
                _ => Stream::Whole,
            };
            slot.insert(decided);
        }
        let Some(Stream::Slicing {
            layout,
            meta,
            vals_off,
            next,
        }) = self.streams.get_mut(&seq)
        else {
            return Ok(out);
        };
        while *next < layout.count {
            let (off, len) = layout.range(*next);
            if *vals_off + off + len > p.have {
                break;
            }
            let vals = range(p.pieces, *vals_off + off, len);
            out.pieces
                .extend(slice_request(meta, layout, *next, Some(vals)));
            *next += 1;
            out.slice_requests += 1;
        }
        Ok(out)
    }

    /// A complete message (`shape` from [`check_unit`], `meta` its parsed meta frame):
    /// `Some` to write instead of it (the rest of a streamed push, or a merged
    /// response; no pieces while parts are missing), `None` if it goes as it is.
    /// `finish` tells the splitter a streamed push is complete (its
    /// [`crate::core::split::Splitter::finish_streamed`]); it is called for those only.
    pub fn on_complete(
        &mut self,
        msg: &Reassembled,
        shape: &UnitShape,
        meta: Option<&(Bytes, Meta)>,
        finish: impl FnOnce(&Layout, Option<&[i32]>) -> Option<Failure>,
    ) -> Result<Option<Delivered>, DeliveryError> {
        let frames = || -> Vec<Pieces> {
            shape.frames[1..]
                .iter()
                .map(|&(off, len)| range(&msg.pieces, off, len))
                .collect()
        };
        if let Some(part) = msg.part {
            let Some((frame, meta)) = meta else {
                return Err(DeliveryError::BadPart(
                    "a part that is not a ps-lite message".into(),
                ));
            };
            let merged = self
                .merger
                .on_part(meta, frame, &frames(), part)
                .map_err(DeliveryError::BadPart)?;
            return Ok(Some(Delivered {
                merged: merged.is_some(),
                pieces: merged.unwrap_or_default(),
                ..Delivered::default()
            }));
        }
        let Some(Stream::Slicing {
            layout,
            meta: meta_frame,
            vals_off,
            next,
        }) = self.streams.remove(&msg.seq)
        else {
            return Ok(None);
        };
        let data = frames();
        // The head said where the vals are; the lens frame must be the layout's.
        let lens = (data.len() == 3 && shape.frames[2].0 == vals_off)
            .then(|| data[2].le_words(i32::from_le_bytes))
            .flatten();
        if let Some(f) = finish(&layout, lens.as_deref()) {
            return Err(DeliveryError::Stopped(f));
        }
        let mut out = Delivered::default();
        for i in next..layout.count {
            let (off, len) = layout.range(i);
            let vals = range(&msg.pieces, vals_off + off, len);
            out.pieces
                .extend(slice_request(&meta_frame, &layout, i, Some(vals)));
            out.slice_requests += 1;
        }
        Ok(Some(out))
    }
}

/// Largest first frame read as a ps-lite meta for observation.
pub const MAX_META_LEN: u64 = 64 * 1024;

/// The shape of a reassembled unit, read from its frame headers.
#[derive(Debug, PartialEq, Eq)]
pub struct UnitShape {
    /// Its first frame, if small enough to be a ps-lite meta (not for commands).
    pub meta: Option<Bytes>,
    /// (offset, length) of each frame body in the unit.
    pub frames: Vec<(u64, u64)>,
    /// A ZMTP command, not a message.
    pub command: bool,
}

/// Checks that a reassembled message is exactly one ZMTP unit (frame headers
/// consistent to its last byte, within the limits), without copying its bodies.
pub fn check_unit(msg: &Reassembled, limits: &Limits) -> Result<UnitShape, &'static str> {
    let (mut meta, mut command, mut frames) = (None, false, Vec::new());
    let mut scan = FrameScanner::new(limits);
    let pieces = &msg.pieces[..];
    while let Some(f) = scan.next_frame(pieces).map_err(|e| match e {
        ZmtpError::Unexpected(_) | ZmtpError::MultipartCommand => "a command inside a message",
        ZmtpError::TooManyFrames { .. } => "too many frames",
        ZmtpError::TooLarge { .. } => "a frame is over the limits",
        _ => "a frame header is broken",
    })? {
        if f.end() > msg.len {
            return Err("a frame runs past the message");
        }
        if f.header.command {
            command = true;
        } else if frames.is_empty() && f.header.size <= MAX_META_LEN {
            meta = Some(Bytes::from(copy_range(
                pieces,
                f.body,
                f.header.size as usize,
            )));
        }
        frames.push((f.body, f.header.size));
    }
    if !scan.is_done() {
        return Err("a frame runs past the message");
    }
    if scan.offset() != msg.len {
        return Err("bytes after the message's last frame");
    }
    Ok(UnitShape {
        meta,
        frames,
        command,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    use crate::core::optimizer::OptimizerSet;
    use crate::core::split::{DataRequest, RequestPlan, SplitConfig, Splitter};
    use crate::core::topology::NodeInfo;
    use p3proxy_parsers::pslite::{PsMessage, Role};
    use p3proxy_parsers::zmtp::{parse_unit, Command, Unit, ZmtpMessage};

    const SERVER: &str = "10.0.0.1:4000";

    /// A splitter in front of one server, with key 7 (4000 bytes) split into 10 slice
    /// keys and its init answered, as a job's first step finds it.
    fn split_key_7() -> Splitter {
        let server: SocketAddr = SERVER.parse().unwrap();
        let mut sp = Splitter::new(SplitConfig {
            enabled: true,
            sizing: crate::core::split::Sizing::uniform(400),
            min_bytes: 400,
            optimizers: OptimizerSet::ALL,
            hold: std::time::Duration::from_secs(10),
        });
        sp.server_registered(server);
        let worker = |id| NodeInfo {
            id,
            role: Role::Worker,
            addr: None,
        };
        sp.node_table(&[
            NodeInfo {
                id: 8,
                role: Role::Server,
                addr: Some(server),
            },
            worker(9),
            worker(11),
        ]);
        sp.worker_connected(server, 9);
        sp.worker_connected(server, 11);
        assert_eq!(sp.on_command(server, 3, b""), None);
        let init = PsMessage::from_zmtp(crate::testkit::push_request(
            1,
            7,
            Bytes::from(vec![0u8; 4000]),
        ))
        .unwrap();
        let vals = Pieces::one(init.data[1].body.clone());
        let req = DataRequest {
            meta: &init.meta,
            meta_frame: &init.meta_frame.body,
            keys: &[7],
            vals: &vals,
            lens: Some(&[4000]),
        };
        assert!(
            matches!(sp.on_data_request(server, 9, &req, false), RequestPlan::Split(m) if m.len() == 10)
        );
        let mut ack = init.meta.clone();
        ack.request = Some(false);
        ack.data_type = vec![];
        let ack_frame = Bytes::from(ack.encode());
        for _ in 0..10 {
            sp.on_data_response(8, 9, &ack, &ack_frame, &[], false);
        }
        sp
    }

    /// The slice requests in `pieces`, parsed: (slice key, values).
    fn slices(pieces: &[Bytes]) -> Vec<(u64, Vec<u8>)> {
        let mut wire = Bytes::from(
            pieces
                .iter()
                .flat_map(|p| p.iter().copied())
                .collect::<Vec<u8>>(),
        );
        let mut out = Vec::new();
        while let Some((unit, used)) = parse_unit(&wire, &Limits::default()).unwrap() {
            let Unit::Message(m) = unit else {
                panic!("a command")
            };
            let ps = PsMessage::from_zmtp(m).unwrap();
            let key = u64::from_le_bytes(ps.data[0].body[..8].try_into().unwrap());
            out.push((key, ps.data[1].body.to_vec()));
            wire = wire.slice(used..);
        }
        assert!(wire.is_empty());
        out
    }

    #[test]
    fn a_split_keys_push_goes_out_slice_by_slice_as_its_bytes_arrive() {
        let mut sp = split_key_7();
        let server: SocketAddr = SERVER.parse().unwrap();
        let vals: Vec<u8> = (0..4000u32).map(|i| (i * 13 % 251) as u8).collect();
        let wire = crate::testkit::push_request(2, 7, Bytes::from(vals.clone())).encode();
        let mut d = Delivery::new(true);
        let limits = Limits::default();
        let mut sent = Vec::new();
        let mut first_split = None;
        // The bytes arrive 700 at a time, in pieces as the reassembler holds them.
        let mut have = Vec::new();
        for chunk in wire.chunks(700) {
            have.push(Bytes::copy_from_slice(chunk));
            let got: u64 = have.iter().map(|b| b.len() as u64).sum();
            if got == wire.len() as u64 {
                break; // the last bytes complete the message
            }
            let p = Progress {
                pieces: &have,
                have: got,
                total: wire.len() as u64,
                may_pass: true,
            };
            let out = d
                .on_progress(Some(11), 0, &p, &limits, |w, m, k, n| {
                    sp.on_request_head(server, w, m, k, n)
                })
                .unwrap();
            if out.split_request {
                assert!(first_split.replace(got).is_none(), "decided once");
            }
            sent.extend(slices(&out.pieces));
        }
        assert!(
            first_split.is_some(),
            "sliced before the message was complete"
        );
        assert!(
            !sent.is_empty() && sent.len() < 10,
            "{} slices before the end",
            sent.len()
        );
        let msg = Reassembled {
            seq: 0,
            part: None,
            pieces: vec![Bytes::from(wire.clone())],
            len: wire.len() as u64,
            fence: false,
        };
        let shape = check_unit(&msg, &limits).unwrap();
        let meta = shape
            .meta
            .clone()
            .map(|m| (m.clone(), parse_meta(&m).unwrap()));
        let rest = d
            .on_complete(&msg, &shape, meta.as_ref(), |l, lens| {
                sp.finish_streamed(server, l, lens)
            })
            .unwrap()
            .unwrap();
        assert_eq!(rest.slice_requests as usize, 10 - sent.len());
        sent.extend(slices(&rest.pieces));
        // Every slice once, in order, carrying exactly its bytes of the push.
        assert_eq!(sent.len(), 10);
        let first = sent[0].0;
        for (i, (key, bytes)) in sent.iter().enumerate() {
            assert_eq!(*key, first + i as u64);
            assert_eq!(bytes[..], vals[i * 400..(i + 1) * 400]);
        }
    }

    #[test]
    fn a_message_that_may_not_pass_yet_or_is_no_split_push_goes_whole() {
        let mut sp = split_key_7();
        let server: SocketAddr = SERVER.parse().unwrap();
        let limits = Limits::default();
        let wire = crate::testkit::push_request(2, 7, Bytes::from(vec![1u8; 4000])).encode();
        let have = [Bytes::copy_from_slice(&wire[..2000])];
        let mut d = Delivery::new(true);
        // Behind an earlier message it must not overtake: not decided, asked again later.
        let held = Progress {
            pieces: &have,
            have: 2000,
            total: wire.len() as u64,
            may_pass: false,
        };
        assert_eq!(
            d.on_progress(Some(11), 0, &held, &limits, |w, m, k, n| {
                sp.on_request_head(server, w, m, k, n)
            })
            .unwrap(),
            Delivered::default()
        );
        // Another key (not split): whole.
        let other = crate::testkit::push_request(3, 5, Bytes::from(vec![1u8; 4000])).encode();
        let have = [Bytes::copy_from_slice(&other[..2000])];
        let p = Progress {
            pieces: &have,
            have: 2000,
            total: other.len() as u64,
            may_pass: true,
        };
        assert_eq!(
            d.on_progress(Some(11), 1, &p, &limits, |w, m, k, n| {
                sp.on_request_head(server, w, m, k, n)
            })
            .unwrap(),
            Delivered::default()
        );
        let msg = Reassembled {
            seq: 1,
            part: None,
            pieces: vec![Bytes::from(other)],
            len: 0,
            fence: false,
        };
        let msg = Reassembled {
            len: msg.pieces[0].len() as u64,
            ..msg
        };
        let shape = check_unit(&msg, &limits).unwrap();
        assert_eq!(
            d.on_complete(&msg, &shape, None, |l, lens| {
                sp.finish_streamed(server, l, lens)
            })
            .unwrap(),
            None,
            "goes as it is"
        );
    }

    #[test]
    fn a_part_that_is_not_ps_lite_stops_the_session() {
        let mut sp = split_key_7();
        let server: SocketAddr = SERVER.parse().unwrap();
        let wire = ZmtpMessage::from_bodies([Bytes::from_static(b"not a meta")]).encode();
        let part = crate::core::slice::Part {
            key: 7,
            index: 0,
            count: 10,
            slice: 400,
            total: 4000,
        };
        let msg = Reassembled {
            seq: 0,
            part: Some(part),
            len: wire.len() as u64,
            pieces: vec![Bytes::from(wire)],
            fence: false,
        };
        let shape = check_unit(&msg, &Limits::default()).unwrap();
        let mut d = Delivery::new(false);
        assert_eq!(
            d.on_complete(&msg, &shape, None, |l, lens| {
                sp.finish_streamed(server, l, lens)
            }),
            Err(DeliveryError::BadPart(
                "a part that is not a ps-lite message".into()
            ))
        );
    }

    /// `bytes` cut into pieces at every `step` bytes.
    fn pieces(bytes: &[u8], step: usize) -> Reassembled {
        Reassembled {
            seq: 0,
            part: None,
            pieces: bytes.chunks(step).map(Bytes::copy_from_slice).collect(),
            len: bytes.len() as u64,
            fence: false,
        }
    }

    #[test]
    fn reassembled_units_are_checked_across_piece_boundaries() {
        let limits = Limits::default();
        let meta = Bytes::from_static(b"\x08\x01meta bytes");
        let msg = ZmtpMessage::from_bodies([
            meta.clone(),
            Bytes::from(vec![7u8; 300]),
            Bytes::from_static(b"lens"),
        ])
        .encode();
        for step in [1, 2, 3, 9, 100, msg.len()] {
            let shape = check_unit(&pieces(&msg, step), &limits).unwrap();
            assert_eq!(shape.meta, Some(meta.clone()));
            let bodies: Vec<u64> = shape.frames.iter().map(|f| f.1).collect();
            assert_eq!(bodies, vec![meta.len() as u64, 300, 4]);
            assert_eq!(shape.frames[1].0, 2 + meta.len() as u64 + 9);
        }
        let cmd = Command::ready(&[("Socket-Type", b"DEALER")]).encode();
        let shape = check_unit(&pieces(&cmd, 5), &limits).unwrap();
        assert!(shape.command && shape.meta.is_none());
        let mut trailing = msg.clone();
        trailing.push(0);
        assert_eq!(
            check_unit(&pieces(&trailing, 7), &limits).unwrap_err(),
            "bytes after the message's last frame"
        );
        assert_eq!(
            check_unit(&pieces(&msg[..msg.len() - 1], 7), &limits).unwrap_err(),
            "a frame runs past the message"
        );
        let mut two = vec![0x01, 0x01, b'x']; // a one-byte frame with MORE...
        two.extend(&cmd); // ...then a command
        assert_eq!(
            check_unit(&pieces(&two, 4), &limits).unwrap_err(),
            "a command inside a message"
        );
    }
}
