//! Key splitting on a tunnel session's receiving side (DESIGN.md §6-7): in front of a
//! local server, a push of a split key goes out slice request by slice request as
//! its bytes arrive (so the server aggregates the first slices while the rest is on
//! the wire); in front of a worker, the parts of a split key's response that the
//! server's proxy streamed are merged into the one response the worker expects.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use bytes::Bytes;
use p3proxy_parsers::pslite::{parse_meta, Meta};
use p3proxy_parsers::zmtp::{copy_range, ByteSource, FrameScanner, Limits, ZmtpError};
use tokio::net::tcp::OwnedWriteHalf;

use crate::core::slice::{Reassembled, Reassembler};
use crate::core::split::{byte_range, slice_request, HeadPlan, Layout, Merger, Pieces};
use crate::core::topology::node_id_from_identity;
use crate::io::egress::write_pieces;
use crate::io::error::{SessionError, Side};
use crate::io::state::{SessionInfo, Shared};
use crate::metrics;

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

/// The split state of one receiving tunnel session.
#[derive(Debug)]
pub(crate) struct ReceiverSplit {
    /// The session goes to a local server this proxy fronts.
    to_server: bool,
    streams: HashMap<u64, Stream>,
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

impl ReceiverSplit {
    /// The state of a session going to a local server (`to_server`) or elsewhere.
    pub(crate) fn new(to_server: bool) -> ReceiverSplit {
        ReceiverSplit {
            to_server,
            streams: HashMap::new(),
            merger: Merger::default(),
        }
    }

    /// Its requests go to a local server: they may be split.
    pub(crate) fn in_front_of_server(&self) -> bool {
        self.to_server
    }

    /// Message `seq` got bytes: in front of a local server, a push of a split key
    /// sends the slice requests whose bytes are in.
    pub(crate) async fn on_progress(
        &mut self,
        shared: &Shared,
        info: &SessionInfo,
        reasm: &Reassembler,
        seq: u64,
        out: &mut OwnedWriteHalf,
    ) -> Result<(), SessionError> {
        let Some(p) = reasm.progress(seq) else {
            return Ok(());
        };
        if let Entry::Vacant(slot) = self.streams.entry(seq) {
            if !p.may_pass {
                return Ok(()); // Asked again when more of it arrives.
            }
            let head = match scan_head(p.pieces, &shared.limits) {
                HeadScan::More => return Ok(()),
                HeadScan::NotData => None,
                HeadScan::Head(h) => Some(h),
            };
            let decided = match head {
                None => Stream::Whole,
                Some(h) => {
                    let meta: Option<Meta> = parse_meta(&h.meta_frame).ok();
                    let sender = node_id_from_identity(&info.identity);
                    match (meta, sender) {
                        (Some(meta), Some(sender)) => {
                            match shared.split_head(info, sender, &meta, &h.keys, h.vals_len) {
                                HeadPlan::Whole => Stream::Whole,
                                HeadPlan::Stop(f) => return Err(SessionError::Stopped(f)),
                                HeadPlan::Stream(layout) => {
                                    metrics::count(metrics::SPLIT_REQUESTS, 1);
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
                    }
                }
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
            return Ok(());
        };
        let mut pieces = Vec::new();
        while *next < layout.count {
            let (off, len) = layout.range(*next);
            if *vals_off + off + len > p.have {
                break;
            }
            let vals = range(p.pieces, *vals_off + off, len);
            pieces.extend(slice_request(meta, layout, *next, Some(vals)));
            *next += 1;
            metrics::count(metrics::SLICE_REQUESTS, 1);
        }
        if pieces.is_empty() {
            return Ok(());
        }
        write_pieces(out, pieces)
            .await
            .map_err(|e| SessionError::Io {
                side: Side::Upstream,
                source: e,
            })
    }

    /// A complete message: `Some(bytes)` to write instead of it (the rest of a
    /// streamed push, or a merged response; empty while parts are missing), `None`
    /// if it goes the usual way.
    pub(crate) fn on_complete(
        &mut self,
        shared: &Shared,
        info: &SessionInfo,
        msg: &Reassembled,
        shape: &UnitShape,
        meta: Option<&(Bytes, Meta)>,
    ) -> Result<Option<Vec<Bytes>>, SessionError> {
        let frames = || -> Vec<Pieces> {
            shape.frames[1..]
                .iter()
                .map(|&(off, len)| range(&msg.pieces, off, len))
                .collect()
        };
        if let Some(part) = msg.part {
            let Some((frame, meta)) = meta else {
                return Err(SessionError::BadPart(
                    "a part that is not a ps-lite message".into(),
                ));
            };
            let merged = self
                .merger
                .on_part(meta, frame, &frames(), part)
                .map_err(SessionError::BadPart)?;
            if merged.is_some() {
                metrics::count(metrics::SPLIT_RESPONSES_MERGED, 1);
            }
            return Ok(Some(merged.unwrap_or_default()));
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
        if let Some(f) = shared.split_finished(info, &layout, lens.as_deref()) {
            return Err(SessionError::Stopped(f));
        }
        let mut pieces = Vec::new();
        for i in next..layout.count {
            let (off, len) = layout.range(i);
            let vals = range(&msg.pieces, vals_off + off, len);
            pieces.extend(slice_request(&meta_frame, &layout, i, Some(vals)));
            metrics::count(metrics::SLICE_REQUESTS, 1);
        }
        Ok(Some(pieces))
    }
}

/// Largest first frame read as a ps-lite meta for observation.
pub(crate) const MAX_META_LEN: u64 = 64 * 1024;

/// The shape of a reassembled unit, read from its frame headers.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct UnitShape {
    /// Its first frame, if small enough to be a ps-lite meta (not for commands).
    pub(crate) meta: Option<Bytes>,
    /// (offset, length) of each frame body in the unit.
    pub(crate) frames: Vec<(u64, u64)>,
    /// A ZMTP command, not a message.
    pub(crate) command: bool,
}

/// Checks that a reassembled message is exactly one ZMTP unit (frame headers
/// consistent to its last byte, within the limits), without copying its bodies.
pub(crate) fn check_unit(msg: &Reassembled, limits: &Limits) -> Result<UnitShape, &'static str> {
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
    use crate::core::slice::Reassembled;
    use bytes::Bytes;
    use p3proxy_parsers::zmtp::{Command, Limits, ZmtpMessage};

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
