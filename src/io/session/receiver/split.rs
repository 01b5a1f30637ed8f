//! The shell around `core::delivery` on a tunnel session's receiving side: asks it
//! (with the splitter, under the core's lock) what goes out as a message's bytes arrive
//! and once it is complete, counts what it reports, and writes it.

use std::time::Instant;

use bytes::Bytes;
use p3proxy_parsers::pslite::Meta;
use tokio::net::tcp::OwnedWriteHalf;

use crate::core::delivery::{Delivered, Delivery, DeliveryError, UnitShape};
use crate::core::slice::{Reassembled, Reassembler};
use crate::core::topology::node_id_from_identity;
use crate::io::egress::write_pieces;
use crate::io::error::{SessionError, Side};
use crate::io::state::{SessionInfo, Shared};
use crate::metrics;

impl From<DeliveryError> for SessionError {
    fn from(e: DeliveryError) -> SessionError {
        match e {
            DeliveryError::Stopped(f) => SessionError::Stopped(f),
            DeliveryError::BadPart(why) => SessionError::BadPart(why),
        }
    }
}

/// Message `seq` got bytes: in front of a local server, a push of a split key sends
/// the slice requests whose bytes are in.
pub(super) async fn on_progress(
    shared: &Shared,
    info: &SessionInfo,
    delivery: &mut Delivery,
    reasm: &Reassembler,
    seq: u64,
    out: &mut OwnedWriteHalf,
) -> Result<(), SessionError> {
    let Some(p) = reasm.progress(seq) else {
        return Ok(());
    };
    let sender = node_id_from_identity(&info.identity);
    // The splitter (and the core's lock) only for a message's head, once.
    let done = delivery.on_progress(sender, seq, &p, &shared.limits, |w, meta, keys, len| {
        shared.with_splitter(|sp| sp.on_request_head(info.dst, w, meta, keys, len))
    })?;
    count(&done);
    if done.pieces.is_empty() {
        return Ok(());
    }
    write_pieces(out, done.pieces)
        .await
        .map_err(|e| SessionError::Io {
            side: Side::Upstream,
            source: e,
        })
}

/// A complete message: `Some(bytes)` to write instead of it (the rest of a streamed
/// push, or a merged response; empty while parts are missing), `None` if it goes the
/// usual way.
pub(super) fn on_complete(
    shared: &Shared,
    info: &SessionInfo,
    delivery: &mut Delivery,
    msg: &Reassembled,
    shape: &UnitShape,
    meta: Option<&(Bytes, Meta)>,
) -> Result<Option<Vec<Bytes>>, SessionError> {
    // The splitter (and the core's lock) only for a streamed push's end.
    let mut streamed = None;
    let done = delivery.on_complete(msg, shape, meta, |layout, lens| {
        streamed = Some(layout.key);
        shared.with_splitter(|sp| sp.finish_streamed(info.dst, layout, lens))
    })?;
    if let (Some(key), Some(worker)) = (streamed, node_id_from_identity(&info.identity)) {
        shared.push_arrived(info.dst, &[key], worker, Instant::now());
    }
    Ok(done.map(|d| {
        count(&d);
        d.pieces
    }))
}

fn count(d: &Delivered) {
    if d.split_request {
        metrics::count(metrics::SPLIT_REQUESTS, 1);
    }
    if d.slice_requests > 0 {
        metrics::count(metrics::SLICE_REQUESTS, d.slice_requests);
    }
    if d.merged {
        metrics::count(metrics::SPLIT_RESPONSES_MERGED, 1);
    }
}
