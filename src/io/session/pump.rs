//! One direction of a session, message by message: decoded, observed (node table,
//! registrations, requests in flight), routed through the splitter and the order rules
//! when it goes to a local server, and forwarded; and what every session module shares
//! (its ends, the sides at fault, how a direction ended).

use std::time::Instant;

use bytes::Bytes;
use p3proxy_parsers::pslite::PsMessage;
use p3proxy_parsers::zmtp::{StreamDecoder, StreamEvent, ZmtpError, ZmtpMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::core::split::Failure;
use crate::core::topology::MessageContext;
use crate::io::error::{SessionError, Side};
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

const WRITE_BUFFER: usize = 64 * 1024;

/// Writes one message's wire bytes (bodies are not copied before the buffer).
pub(super) async fn write_message(
    out: &mut BufWriter<OwnedWriteHalf>,
    msg: &ZmtpMessage,
) -> std::io::Result<usize> {
    let mut total = 0;
    for piece in msg.wire_pieces() {
        out.write_all(&piece).await?;
        total += piece.len();
    }
    Ok(total)
}

/// Writes messages given as wire pieces.
pub(super) async fn write_all_pieces(
    out: &mut BufWriter<OwnedWriteHalf>,
    msgs: Vec<Vec<Bytes>>,
) -> std::io::Result<usize> {
    let mut total = 0;
    for piece in msgs.into_iter().flatten() {
        out.write_all(&piece).await?;
        total += piece.len();
    }
    Ok(total)
}

/// A decoded message from a session's DEALER side: ps-lite (observed, when `observe`
/// says by whom) or not (counted, and handed back to be forwarded unchanged as a fence).
pub(crate) fn classify(
    msg: ZmtpMessage,
    observe: Option<(&Shared, &SessionInfo)>,
    first_on_connection: bool,
) -> Result<PsMessage, ZmtpMessage> {
    match PsMessage::from_zmtp(msg) {
        Ok(ps) => {
            if let Some((shared, info)) = observe {
                let ctx = MessageContext {
                    sender_identity: &info.identity,
                    dst: info.dst,
                    first_on_connection,
                };
                shared.observe(&ctx, &ps);
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

/// Routes `ps` through the splitter; while it must wait for order
/// (`Outgoing::Behind`), writes out what went before (what it waits for may be
/// among it) and waits.
async fn route_in_order(
    shared: &Shared,
    info: &SessionInfo,
    ps: &PsMessage,
    out: &mut BufWriter<OwnedWriteHalf>,
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

/// Moves messages from `rd` (already partly decoded in `dec`) to `wr`.
/// `observe`: this direction goes from the session's DEALER to its ROUTER.
pub(crate) async fn pump(
    mut rd: OwnedReadHalf,
    mut dec: StreamDecoder,
    wr: OwnedWriteHalf,
    direction: &'static str,
    observe: Option<(&Shared, &SessionInfo)>,
    sides: Sides,
) -> PumpEnd {
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, wr);
    let mut seen = 0u64;
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
                                    write_message(&mut out, &ps.to_zmtp()).await
                                }
                                Ok(Ok(Outgoing::Absorb)) => Ok(0),
                                Ok(Ok(Outgoing::Replace(msgs))) => {
                                    write_all_pieces(&mut out, msgs).await
                                }
                                Ok(Ok(Outgoing::Merged(_, pieces))) => {
                                    write_all_pieces(&mut out, vec![pieces]).await
                                }
                                Ok(Err(f)) => return PumpEnd::Failed(SessionError::Stopped(f)),
                            }
                        }
                        None => write_message(&mut out, &ps.to_zmtp()).await,
                    },
                    Err(msg) => {
                        if let Some((shared, info)) = observe {
                            if let Err(f) = shared.split_request(info, None, Instant::now()).await {
                                return PumpEnd::Failed(SessionError::Stopped(f));
                            }
                        }
                        write_message(&mut out, &msg).await
                    }
                },
                StreamEvent::Command(cmd) => {
                    let bytes = cmd.encode();
                    out.write_all(&bytes).await.map(|()| bytes.len())
                }
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
        if let Err(e) = out.flush().await {
            return sides.write_failed(e);
        }
        match rd.read_buf(dec.buffer_mut()).await {
            Ok(0) => {
                let _ = out.shutdown().await;
                return PumpEnd::Closed;
            }
            Ok(_) => {}
            Err(e) => return sides.read_failed(e),
        }
    }
}
