//! One direction of a session, message by message: decoded, observed (node table,
//! registrations, requests in flight), routed through the splitter and the order rules
//! when it goes to a local server, and forwarded; and what every session module shares
//! (its ends, the sides at fault, how a direction ended).

use std::time::Instant;

use bytes::Bytes;
use p3proxy_parsers::pslite::{parse_meta, MessageKind, PsMessage};
use p3proxy_parsers::zmtp::{Frame, StreamDecoder, StreamEvent, ZmtpError, ZmtpMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::core::split::Failure;
use crate::core::topology::MessageContext;
use crate::io::egress::write_pieces;
use crate::io::error::{SessionError, Side};
use crate::io::splice::{BodyMover, PassError};
use crate::io::split::{OrderWait, Outgoing};
use crate::io::state::{SessionInfo, Shared};
use crate::metrics;

/// How one direction of a relay ended.
#[derive(Debug)]
pub(crate) enum PumpEnd {
    /// The sender closed its side.
    Closed,
    /// It failed, by the fault of the side the error names.
    Failed(SessionError),
}

/// The sides one direction of a session reads from and writes to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sides {
    /// Who sends (its bytes are decoded; read errors are its).
    pub(crate) from: Side,
    /// Who receives (write errors are its).
    pub(crate) to: Side,
}

impl Sides {
    /// The other direction.
    pub(crate) fn back(self) -> Sides {
        Sides {
            from: self.to,
            to: self.from,
        }
    }

    pub(crate) fn read_failed(self, e: std::io::Error) -> PumpEnd {
        PumpEnd::Failed(SessionError::Io {
            side: self.from,
            source: e,
        })
    }

    /// The sender broke ZMTP framing or a limit.
    pub(crate) fn framing_failed(self, e: ZmtpError) -> PumpEnd {
        PumpEnd::Failed(SessionError::Framing {
            side: self.from,
            source: e,
        })
    }

    fn write_failed(self, e: std::io::Error) -> PumpEnd {
        PumpEnd::Failed(SessionError::Io {
            side: self.to,
            source: e,
        })
    }
}

/// One end of a relay: a socket and the decoder holding what was read from it.
pub(crate) struct End {
    pub(crate) stream: TcpStream,
    pub(crate) dec: StreamDecoder,
}

/// Pieces shorter than this are copied together (headers, metas, keys, small
/// messages); longer ones are written from where they were received.
const COPY_BELOW: usize = 4096;
/// Written out at once when this much is gathered, before the decode round ends.
const FLUSH_AT: usize = 1 << 20;

/// What one direction writes next, gathered for one vectored write per decode round
/// (one per message for big ones), where a buffered writer makes a separate write of
/// the buffered header before each big body.
pub(super) struct Outbox {
    wr: OwnedWriteHalf,
    pieces: Vec<Bytes>,
    small: Vec<u8>,
    len: usize,
}

impl Outbox {
    pub(super) fn new(wr: OwnedWriteHalf) -> Outbox {
        Outbox {
            wr,
            pieces: Vec::new(),
            small: Vec::new(),
            len: 0,
        }
    }

    /// Adds wire bytes; returns how many.
    fn push(&mut self, piece: Bytes) -> usize {
        let n = piece.len();
        if n < COPY_BELOW {
            self.small.extend_from_slice(&piece);
        } else {
            self.seal();
            self.pieces.push(piece);
        }
        self.len += n;
        n
    }

    fn seal(&mut self) {
        if !self.small.is_empty() {
            let small = std::mem::replace(&mut self.small, Vec::with_capacity(COPY_BELOW));
            self.pieces.push(Bytes::from(small));
        }
    }

    /// Adds the wire bytes of `pieces`, writing them out once enough is gathered.
    async fn add(&mut self, pieces: impl IntoIterator<Item = Bytes>) -> std::io::Result<usize> {
        let n = pieces.into_iter().map(|p| self.push(p)).sum();
        if self.len >= FLUSH_AT {
            self.flush().await?;
        }
        Ok(n)
    }

    /// Writes out everything gathered.
    pub(super) async fn flush(&mut self) -> std::io::Result<()> {
        self.seal();
        self.len = 0;
        if self.pieces.is_empty() {
            return Ok(());
        }
        write_pieces(&mut self.wr, std::mem::take(&mut self.pieces)).await
    }

    /// The socket, for what bypasses the outbox (flush first).
    fn stream(&self) -> &TcpStream {
        self.wr.as_ref()
    }

    async fn shutdown(&mut self) {
        if self.flush().await.is_ok() {
            let _ = self.wr.shutdown().await;
        }
    }
}

/// A decoded message from a session's DEALER side: ps-lite (observed, when `observe`
/// says by whom) or not (counted, and handed back to be forwarded unchanged as a fence).
pub(crate) fn classify(
    msg: ZmtpMessage,
    observe: Option<(&Shared, &SessionInfo)>,
    first_on_connection: bool,
) -> Result<PsMessage, ZmtpMessage> {
    let bytes = msg.encoded_len() as u64;
    match PsMessage::from_zmtp(msg) {
        Ok(ps) => {
            if let Some((shared, info)) = observe {
                observe_sent(shared, info, first_on_connection, &ps, bytes);
            }
            Ok(ps)
        }
        Err((reason, msg)) => {
            metrics::count(metrics::NOT_PSLITE, 1);
            tracing::debug!(%reason, "not ps-lite: forwarded unchanged as a fence");
            Err(msg)
        }
    }
}

/// Whether a message whose first frames are `frames` may go on before the rest of it
/// is read: a ps-lite data message in MXNet's shape (meta, keys, the body still
/// arriving with a frame after it) that neither the splitter nor the order rules act on. It is
/// observed here, as it would be whole (what that reads is in its meta).
fn passes_by_head(
    shared: &Shared,
    info: &SessionInfo,
    frames: &[Bytes],
    body_bytes: u64,
    first_on_connection: bool,
) -> bool {
    let [meta_frame, keys] = frames else {
        return false;
    };
    let Ok(meta) = parse_meta(meta_frame) else {
        return false;
    };
    if meta.data_type.len() != 3 || keys.len() % 8 != 0 {
        return false;
    }
    let head = PsMessage {
        meta,
        meta_frame: Frame::new(meta_frame.clone()),
        data: vec![Frame::new(keys.clone())],
    };
    let MessageKind::Data { request, .. } = head.kind() else {
        return false;
    };
    if shared.splitter_acts_on(info, request) {
        return false;
    }
    // Its size without the lens frame after the body (a few bytes).
    let bytes = meta_frame.len() as u64 + keys.len() as u64 + body_bytes;
    observe_sent(shared, info, first_on_connection, &head, bytes);
    true
}

/// Lets the proxy learn from a message a session's DEALER sent.
fn observe_sent(
    shared: &Shared,
    info: &SessionInfo,
    first_on_connection: bool,
    ps: &PsMessage,
    bytes: u64,
) {
    let ctx = MessageContext {
        sender_identity: &info.identity,
        dst: info.dst,
        first_on_connection,
    };
    shared.observe(&ctx, ps, bytes);
}

/// Routes `ps` through the splitter; while it must wait for order
/// (`Outgoing::Behind`), writes out what went before (what it waits for may be
/// among it) and waits.
async fn route_in_order(
    shared: &Shared,
    info: &SessionInfo,
    ps: &PsMessage,
    out: &mut Outbox,
) -> std::io::Result<Result<Outgoing, Failure>> {
    let mut wait = OrderWait::new(shared);
    loop {
        let answered = wait.armed();
        tokio::pin!(answered);
        answered.as_mut().enable();
        match shared.split_route(info, ps, false, wait.since).await {
            Ok(Outgoing::Behind(reason, ask_by)) => {
                out.flush().await?;
                wait.wait(info, reason, ask_by, answered).await;
            }
            routed => return Ok(routed),
        }
    }
}

/// Frame bodies still missing at least this much when their header is in go from
/// socket to socket (`io::splice`) where nothing needs to see them; shorter ones are
/// read in (a splice costs more syscalls than it saves on a few KB).
pub(crate) const PASS_MIN: u64 = 256 * 1024;

/// Moves messages from `rd` (already partly decoded in `dec`) to `wr`.
/// `observe`: this direction goes from the session's DEALER to its ROUTER.
/// `mover`: big bodies bypass the process (only where nothing observes them).
pub(crate) async fn pump(
    mut rd: OwnedReadHalf,
    mut dec: StreamDecoder,
    wr: OwnedWriteHalf,
    direction: &'static str,
    observe: Option<(&Shared, &SessionInfo)>,
    sides: Sides,
    mut mover: Option<BodyMover>,
) -> PumpEnd {
    let mut out = Outbox::new(wr);
    let mut seen = 0u64;
    // Bytes of a message whose body went by, counted when its tail is written.
    let mut passed = 0usize;
    loop {
        loop {
            let event = match dec.next_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(e) => return sides.framing_failed(e),
            };
            let written = match event {
                StreamEvent::Message(msg) => match classify(msg, observe, seen == 0) {
                    Ok(ps) => match observe {
                        Some((shared, info)) => {
                            match route_in_order(shared, info, &ps, &mut out).await {
                                Err(e) => return sides.write_failed(e),
                                Ok(Ok(Outgoing::Behind(..))) => unreachable!("waited out"),
                                Ok(Ok(Outgoing::Pass | Outgoing::Part(_))) => {
                                    out.add(ps.to_zmtp().wire_pieces()).await
                                }
                                Ok(Ok(Outgoing::Absorb)) => Ok(0),
                                Ok(Ok(Outgoing::Replace(msgs))) => {
                                    out.add(msgs.into_iter().flatten()).await
                                }
                                Ok(Ok(Outgoing::Merged(_, pieces))) => out.add(pieces).await,
                                Ok(Err(f)) => return PumpEnd::Failed(SessionError::Stopped(f)),
                            }
                        }
                        None => out.add(ps.to_zmtp().wire_pieces()).await,
                    },
                    Err(msg) => {
                        if let Some((shared, info)) = observe {
                            if let Err(f) = shared.split_request(info, None, Instant::now()).await {
                                return PumpEnd::Failed(SessionError::Stopped(f));
                            }
                        }
                        out.add(msg.wire_pieces()).await
                    }
                },
                StreamEvent::Command(cmd) => out.add([Bytes::from(cmd.encode())]).await,
                StreamEvent::Tail(rest) => out
                    .add([rest])
                    .await
                    .map(|n| n + std::mem::take(&mut passed)),
                // Greeting events cannot occur after the handshake.
                _ => Ok(0),
            };
            match written {
                Ok(n) => {
                    seen += 1;
                    metrics::forwarded(direction, n);
                }
                Err(e) => return sides.write_failed(e),
            }
        }
        if let Some(mover) = &mut mover {
            // Where this direction is observed, a message goes by only when its head
            // shows that no rule needs the rest; the tail of one that does is decided.
            let decided = match observe {
                None => true,
                Some((shared, info)) => {
                    dec.in_tail()
                        || dec.pass_head(PASS_MIN).is_some_and(|(frames, body)| {
                            body.more && passes_by_head(shared, info, &frames, body.size, seen == 0)
                        })
                }
            };
            if let Some(pass) = decided.then(|| dec.take_pass(PASS_MIN)).flatten() {
                passed += pass.head.len() + pass.body as usize;
                if let Err(e) = out.add([pass.head]).await {
                    return sides.write_failed(e);
                }
                if let Err(e) = out.flush().await {
                    return sides.write_failed(e);
                }
                match mover.pass(rd.as_ref(), out.stream(), pass.body).await {
                    Ok(how) => {
                        dec.body_passed();
                        metrics::count_by(metrics::PASSED_BODIES, how, 1);
                        metrics::count_by(metrics::PASSED_BYTES, how, pass.body);
                    }
                    Err(PassError::Read(e)) => return sides.read_failed(e),
                    Err(PassError::Write(e)) => return sides.write_failed(e),
                }
                continue;
            }
        }
        if let Err(e) = out.flush().await {
            return sides.write_failed(e);
        }
        match rd.read_buf(dec.buffer_for_read()).await {
            Ok(0) => {
                out.shutdown().await;
                return PumpEnd::Closed;
            }
            Ok(_) => {}
            Err(e) => return sides.read_failed(e),
        }
    }
}
