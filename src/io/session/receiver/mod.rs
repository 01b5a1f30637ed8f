//! The receiving end of a sliced tunnel session: every connection of the session feeds
//! one reassembler; complete messages are checked to be one ZMTP unit each and go to the
//! destination app in the order rules of DESIGN.md §4 (in front of a local server,
//! through the splitter: `split`).

mod split;

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use p3proxy_parsers::pslite::{parse_meta, PsMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::pump::{pump, End, PumpEnd, Sides};
use crate::core::delivery::{check_unit, Delivery};
use crate::core::slice::{take_frame, Reassembled, Reassembler, SliceError, SliceFrame};
use crate::core::split::Pieces;
use crate::core::topology::MessageContext;
use crate::io::egress::write_pieces;
use crate::io::error::{report, SessionError, Side};
use crate::io::handshake::PeerInfo;
use crate::io::split::{OrderWait, Outgoing, Unit};
use crate::io::state::{SessionInfo, Shared, TunnelEntry, TunnelTable};
use crate::metrics::{self, OpenConnection};

/// Removes a session from the table when its task ends.
struct Registered<'a> {
    table: &'a TunnelTable,
    key: (IpAddr, u64),
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.table.lock().expect("tunnel table").remove(&self.key);
    }
}

#[derive(Debug)]
enum FrameEvent {
    Frame(SliceFrame),
    Bad(SliceError),
    Closed,
    Truncated,
    Io(std::io::Error),
}

/// Reads slice frames from connection `id` of a session (0: the main stream).
async fn read_frames(
    id: usize,
    mut rd: OwnedReadHalf,
    rest: Vec<u8>,
    tx: mpsc::Sender<(usize, FrameEvent)>,
) {
    const CHUNK: usize = 256 * 1024;
    let mut buf = BytesMut::with_capacity(CHUNK);
    buf.extend_from_slice(&rest);
    loop {
        loop {
            match take_frame(&mut buf) {
                Ok(Some(SliceFrame::Order(_))) if id != 0 => {
                    let _ = tx
                        .send((id, FrameEvent::Bad(SliceError::OffMain("order"))))
                        .await;
                    return;
                }
                Ok(Some(f)) => {
                    if tx.send((id, FrameEvent::Frame(f))).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send((id, FrameEvent::Bad(e))).await;
                    return;
                }
            }
        }
        if buf.capacity() - buf.len() < CHUNK / 4 {
            // A fresh chunk with the partial frame: `reserve` on a chunk whose frames
            // are gone would grow the old allocation, consumed bytes and all.
            let mut fresh = BytesMut::with_capacity(CHUNK.max(2 * buf.len()));
            fresh.extend_from_slice(&buf);
            buf = fresh;
        }
        let event = match rd.read_buf(&mut buf).await {
            Ok(0) if buf.is_empty() => FrameEvent::Closed,
            Ok(0) => FrameEvent::Truncated,
            Ok(_) => continue,
            Err(e) => FrameEvent::Io(e),
        };
        let _ = tx.send((id, event)).await;
        return;
    }
}

/// What woke a receiving session.
enum Wake {
    Attached((TcpStream, Vec<u8>, OpenConnection)),
    Frames(Option<(usize, FrameEvent)>),
    Back(PumpEnd),
}

/// Takes one frame into the reassembler: its message number (none for the job's order,
/// which goes to the priorities), and the messages it completed, in order.
fn reassemble(
    shared: &Shared,
    reasm: &mut Reassembler,
    held: &mut u64,
    frame: SliceFrame,
) -> Result<(Option<u64>, Vec<Reassembled>), SessionError> {
    let seq = match frame {
        SliceFrame::Order(record) => {
            shared.order_received(record);
            return Ok((None, Vec::new()));
        }
        SliceFrame::Slice { seq, .. } => {
            metrics::count(metrics::SLICES_REASSEMBLED, 1);
            seq
        }
        SliceFrame::Announce(ref a) => {
            shared.priority_hint(&a.keys, a.priority);
            a.seq
        }
    };
    let ready = reasm.on_frame(frame).map_err(SessionError::Reassembly)?;
    let now_held = reasm.held();
    metrics::reassembly_held(*held, now_held);
    *held = now_held;
    Ok((Some(seq), ready))
}

/// The session's incoming frames while a delivery waits for a server's answer: they
/// are reassembled and their messages queued behind the waiting one, so the tunnel
/// keeps being read (a stalled reader would fill the origin's egress budget, shared
/// by every session of that host, and could hold up the very answer waited for).
/// Anything but a frame is kept for the session loop.
struct Inflow<'a> {
    frames: &'a mut mpsc::Receiver<(usize, FrameEvent)>,
    reasm: &'a mut Reassembler,
    held: &'a mut u64,
    deferred: &'a mut Option<Option<(usize, FrameEvent)>>,
}

/// Receiving side of a sliced tunnel session: reassembles what the origin's
/// connections carry and writes complete messages to the destination app.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_receiver(
    shared: Arc<Shared>,
    info: SessionInfo,
    peer: IpAddr,
    session: u64,
    main: TcpStream,
    rest: Vec<u8>,
    dst: End,
    dst_info: PeerInfo,
    labels: (&'static str, &'static str),
) {
    let (attach, mut attached) = mpsc::unbounded_channel();
    let key = (peer, session);
    shared.tunnels.lock().expect("tunnel table").insert(
        key,
        TunnelEntry {
            target: info.dst,
            identity: info.identity.clone(),
            dst_info,
            attach,
        },
    );
    shared.tunnels_changed.notify_waiters();
    let _registered = Registered {
        table: &shared.tunnels,
        key,
    };
    let (frames_tx, mut frames) = mpsc::channel(64);
    let (main_rd, main_wr) = main.into_split();
    let mut readers = JoinSet::new();
    readers.spawn(read_frames(0, main_rd, rest, frames_tx.clone()));
    // Class connections only receive; their write halves live as long as the session.
    let mut idle_writes: Vec<(OwnedWriteHalf, OpenConnection)> = Vec::new();
    let (dst_rd, mut dst_wr) = dst.stream.into_split();
    let sides = Sides {
        from: Side::Upstream,
        to: Side::PeerProxy,
    };
    let back = pump(
        dst_rd,
        dst.dec,
        main_wr,
        labels.1,
        None,
        sides,
        shared.body_mover(),
    );
    tokio::pin!(back);
    let mut reasm = Reassembler::new(shared.config.reassembly_bytes);
    // In front of a local server this proxy saw register: its requests may be split.
    let mut delivery = Delivery::new(shared.core().splitter.is_server(info.dst));
    let mut held = 0u64;
    // The session ends when its main stream and every class connection that attached
    // have closed (the origin closes them all; one that failed to open never attaches).
    let (mut main_closed, mut class_open) = (false, 0usize);
    let mut first = true;
    // A frame-channel event taken while a delivery waited (see `Inflow`).
    let mut deferred: Option<Option<(usize, FrameEvent)>> = None;
    let outcome: Result<(), SessionError> = loop {
        let next = match deferred.take() {
            Some(event) => Wake::Frames(event),
            None => tokio::select! {
                Some(a) = attached.recv() => Wake::Attached(a),
                event = frames.recv() => Wake::Frames(event),
                end = &mut back => Wake::Back(end),
            },
        };
        match next {
            Wake::Attached((conn, rest, open)) => {
                let (rd, wr) = TcpStream::into_split(conn);
                idle_writes.push((wr, open));
                class_open += 1;
                readers.spawn(read_frames(1, rd, rest, frames_tx.clone()));
            }
            Wake::Frames(event) => {
                let frame = match event {
                    Some((_, FrameEvent::Frame(f))) => f,
                    Some((id, FrameEvent::Closed)) => {
                        if id == 0 {
                            main_closed = true;
                        } else {
                            class_open -= 1;
                        }
                        if main_closed {
                            // Attachments already handed over still count.
                            while let Ok((conn, rest, open)) = attached.try_recv() {
                                let (rd, wr) = TcpStream::into_split(conn);
                                idle_writes.push((wr, open));
                                class_open += 1;
                                readers.spawn(read_frames(1, rd, rest, frames_tx.clone()));
                            }
                            if class_open == 0 {
                                break Ok(());
                            }
                        }
                        continue;
                    }
                    Some((_, FrameEvent::Bad(e))) => break Err(SessionError::TunnelFrame(e)),
                    Some((_, FrameEvent::Truncated)) => break Err(SessionError::TunnelTruncated),
                    Some((_, FrameEvent::Io(e))) => {
                        break Err(SessionError::Io {
                            side: Side::PeerProxy,
                            source: e,
                        })
                    }
                    None => break Err(SessionError::TunnelGone),
                };
                let (seq, ready) = match reassemble(&shared, &mut reasm, &mut held, frame) {
                    Ok(x) => x,
                    Err(e) => break Err(e),
                };
                if let (true, Some(seq)) = (delivery.in_front_of_server(), seq) {
                    if let Err(e) =
                        split::on_progress(&shared, &info, &mut delivery, &reasm, seq, &mut dst_wr)
                            .await
                    {
                        break Err(e);
                    }
                }
                let mut inflow = Inflow {
                    frames: &mut frames,
                    reasm: &mut reasm,
                    held: &mut held,
                    deferred: &mut deferred,
                };
                if let Err(e) = deliver(
                    &shared,
                    &info,
                    ready,
                    &mut dst_wr,
                    &mut first,
                    &mut delivery,
                    labels.0,
                    &mut inflow,
                )
                .await
                {
                    break Err(e);
                }
            }
            Wake::Back(end) => {
                tracing::debug!(dst = %info.dst, reason = ?end, "destination side ended");
                break Ok(());
            }
        }
    };
    metrics::reassembly_held(held, 0);
    match outcome {
        Ok(()) => {
            let _ = dst_wr.shutdown().await;
        }
        Err(e) => report(&info, &e),
    }
    drop(idle_writes);
    shared.session_ended(&info);
}

/// Observes complete messages and writes them to the destination app.
#[allow(clippy::too_many_arguments)]
async fn deliver(
    shared: &Shared,
    info: &SessionInfo,
    ready: Vec<Reassembled>,
    out: &mut OwnedWriteHalf,
    first: &mut bool,
    delivery: &mut Delivery,
    direction: &'static str,
    inflow: &mut Inflow<'_>,
) -> Result<(), SessionError> {
    if ready.is_empty() {
        return Ok(());
    }
    let mut ready = VecDeque::from(ready);
    let mut pieces = Vec::new();
    while let Some(msg) = ready.pop_front() {
        let shape = check_unit(&msg, &shared.limits).map_err(SessionError::NotOneUnit)?;
        let meta = shape
            .meta
            .as_ref()
            .and_then(|m| parse_meta(m).ok().map(|p| (m.clone(), p)));
        let replaced = split::on_complete(shared, info, delivery, &msg, &shape, meta.as_ref())?;
        if msg.part.is_some() && replaced.as_ref().is_some_and(|r| r.is_empty()) {
            continue; // A part of a response still missing others: nothing to observe yet.
        }
        // Only the meta matters to the node table and the requests in flight.
        if let Some((_, meta)) = &meta {
            let ctx = MessageContext {
                sender_identity: &info.identity,
                dst: info.dst,
                first_on_connection: *first,
            };
            // A merged response's size is the merge's, not its last part's.
            let bytes = match &replaced {
                Some(r) if msg.part.is_some() => r.iter().map(|b| b.len() as u64).sum(),
                _ => msg.len,
            };
            shared.observe(&ctx, &PsMessage::new(meta.clone(), Vec::new()), bytes);
        }
        *first = false;
        metrics::forwarded(direction, msg.len as usize);
        if let Some(replaced) = replaced {
            pieces.extend(replaced);
            continue;
        }
        if shape.command || !delivery.in_front_of_server() {
            pieces.extend(msg.pieces);
            continue;
        }
        let routed = match &meta {
            Some((frame, meta)) => {
                let whole = Pieces {
                    parts: msg.pieces.clone(),
                    len: msg.len,
                };
                let data: Vec<Pieces> = shape.frames[1..]
                    .iter()
                    .map(|&(off, len)| Pieces {
                        parts: whole.range(off, len),
                        len,
                    })
                    .collect();
                let mut wait = OrderWait::new(shared);
                loop {
                    let answered = wait.armed();
                    tokio::pin!(answered);
                    answered.as_mut().enable();
                    let unit = Unit {
                        meta,
                        meta_frame: frame,
                        data: &data,
                    };
                    match shared.split_request(info, Some(unit), wait.since).await {
                        Ok(Outgoing::Behind(reason, ask_by)) => {
                            // What went before (the pull it waits for may be among it) goes first.
                            write_pieces(out, std::mem::take(&mut pieces))
                                .await
                                .map_err(|e| SessionError::Io {
                                    side: Side::Upstream,
                                    source: e,
                                })?;
                            // Messages waiting here left the reassembler: they count
                            // against its bound, past which the tunnel is not read.
                            let waiting: u64 = ready.iter().map(|m| m.len).sum::<u64>() + msg.len;
                            let room =
                                inflow.reasm.held() + waiting < shared.config.reassembly_bytes;
                            tokio::select! {
                                _ = wait.wait(info, reason, ask_by, answered) => {}
                                event = inflow.frames.recv(), if inflow.deferred.is_none() && room => match event {
                                    Some((_, FrameEvent::Frame(f))) => {
                                        let (_, more) = reassemble(shared, inflow.reasm, inflow.held, f)?;
                                        ready.extend(more);
                                        let now = inflow.reasm.held() + waiting;
                                        metrics::reassembly_held(*inflow.held, now);
                                        *inflow.held = now;
                                    }
                                    other => *inflow.deferred = Some(other),
                                },
                            }
                        }
                        routed => break routed,
                    }
                }
            }
            None => shared.split_request(info, None, Instant::now()).await,
        };
        match routed {
            Ok(Outgoing::Replace(msgs)) => pieces.extend(msgs.into_iter().flatten()),
            Ok(_) => pieces.extend(msg.pieces),
            Err(f) => return Err(SessionError::Stopped(f)),
        }
    }
    let now = inflow.reasm.held();
    metrics::reassembly_held(*inflow.held, now);
    *inflow.held = now;
    write_pieces(out, pieces)
        .await
        .map_err(|e| SessionError::Io {
            side: Side::Upstream,
            source: e,
        })
}
