//! Key splitting on a tunnel session's receiving side (DESIGN.md §6-7): in front of a
//! local server, a push of a split key goes out slice request by slice request as
//! its bytes arrive (so the server aggregates the first slices while the rest is on
//! the wire); in front of a worker, the parts of a split key's response that the
//! server's proxy streamed are merged into the one response the worker expects.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use bytes::Bytes;
use p3proxy_parsers::pslite::{parse_meta, Meta};
use p3proxy_parsers::zmtp::{copy_range, ByteSource, FrameScanner, Limits};
use tokio::net::tcp::OwnedWriteHalf;

use super::egress::write_pieces;
use super::relay::SessionInfo;
use super::scheduled::{UnitShape, MAX_META_LEN};
use super::server::Shared;
use crate::core::slice::{Reassembled, Reassembler};
use crate::core::split::{byte_range, slice_request, HeadPlan, Layout, Merger, Pieces};
use crate::core::topology::node_id_from_identity;
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

fn stopped(f: crate::core::split::Failure) -> String {
    format!(
        "the server's traffic is stopped ({}): {}",
        f.reason, f.detail
    )
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
    ) -> Result<(), String> {
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
                                HeadPlan::Stop(f) => return Err(stopped(f)),
                                HeadPlan::Stream(layout) => {
                                    ::metrics::counter!(metrics::SPLIT_REQUESTS).increment(1);
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
            ::metrics::counter!(metrics::SLICE_REQUESTS).increment(1);
        }
        if pieces.is_empty() {
            return Ok(());
        }
        write_pieces(out, pieces)
            .await
            .map_err(|e| format!("writing to the destination: {e}"))
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
    ) -> Result<Option<Vec<Bytes>>, String> {
        let frames = || -> Vec<Pieces> {
            shape.frames[1..]
                .iter()
                .map(|&(off, len)| range(&msg.pieces, off, len))
                .collect()
        };
        if let Some(part) = msg.part {
            let Some((frame, meta)) = meta else {
                return Err("a part that is not a ps-lite message".into());
            };
            let merged = self
                .merger
                .on_part(meta, frame, &frames(), part)
                .map_err(|e| format!("merging a split key's response: {e}"))?;
            if merged.is_some() {
                ::metrics::counter!(metrics::SPLIT_RESPONSES_MERGED).increment(1);
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
            return Err(stopped(f));
        }
        let mut pieces = Vec::new();
        for i in next..layout.count {
            let (off, len) = layout.range(i);
            let vals = range(&msg.pieces, vals_off + off, len);
            pieces.extend(slice_request(&meta_frame, &layout, i, Some(vals)));
            ::metrics::counter!(metrics::SLICE_REQUESTS).increment(1);
        }
        Ok(Some(pieces))
    }
}
