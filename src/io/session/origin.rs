//! The origin of a scheduled session (DESIGN.md §5-6): the app's messages are decoded,
//! observed, given their priority and queued; one writer task per output connection
//! writes what the egress scheduler picks: on a tunnel, slice frames on the session's
//! class connections (announcements on the main stream, class 0); on a direct hop,
//! whole messages in priority order. The other direction (the destination's ZMTP
//! frames back to the app) is a plain pump.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use p3proxy_parsers::pslite::PsMessage;
use p3proxy_parsers::zmtp::{StreamDecoder, StreamEvent};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::pump::{classify, pump, End, PumpEnd, Sides};
use crate::core::priority::{Urgency, FENCE};
use crate::core::scheduler::{LaneId, LaneKind, SessionId};
use crate::core::split::Pieces;
use crate::core::topology::node_id_from_identity;
use crate::io::egress::{run_lane, Body, Item};
use crate::io::error::{report, SessionError, Side};
use crate::io::split::Outgoing;
use crate::io::state::{SessionInfo, Shared};
use crate::metrics::{self};

const FENCE_URGENCY: Urgency = Urgency {
    priority: FENCE,
    class: 0,
    fence: true,
};

/// The app's messages go to the egress scheduler (this proxy) from the app.
const APP: Sides = Sides {
    from: Side::Downstream,
    to: Side::Internal,
};

/// Where a session's messages go: the main upstream connection, and for a sliced
/// tunnel one connection per other class.
pub(crate) struct Upstream {
    /// The main stream (tunnel class 0, or the direct ZMTP connection).
    pub(crate) main: End,
    /// Class connections 1.. (sliced tunnels only).
    pub(crate) classes: Vec<TcpStream>,
    /// Slice frames (a tunnel), or whole ZMTP messages (a direct hop).
    pub(crate) sliced: bool,
}

/// Origin side: relays `app`'s messages through the scheduler until either side ends.
pub(crate) async fn run_origin(
    shared: Arc<Shared>,
    info: SessionInfo,
    session: SessionId,
    app: End,
    up: Upstream,
    labels: (&'static str, &'static str),
) {
    let egress = shared.egress.clone();
    let kind = if up.sliced {
        LaneKind::Sliced
    } else {
        LaneKind::Whole
    };
    let (app_rd, app_wr) = app.stream.into_split();
    let (far_rd, far_wr) = up.main.stream.into_split();
    let mut writers = JoinSet::new();
    let mut lanes: Vec<LaneId> = Vec::new();
    // Class connections only send; their read halves live as long as the session.
    let mut idle_reads: Vec<OwnedReadHalf> = Vec::new();
    // A local server's session carries its answers (ps-lite: servers have even ids).
    let answers = node_id_from_identity(&info.identity).is_some_and(|id| id >= 8 && id % 2 == 0);
    let mut outputs = vec![far_wr];
    for conn in up.classes {
        let (rd, wr) = conn.into_split();
        idle_reads.push(rd);
        outputs.push(wr);
    }
    for wr in outputs {
        let peer = up.sliced.then(|| info.dst.ip());
        let (id, wake) = egress.add_lane(session, kind, answers, peer);
        lanes.push(id);
        writers.spawn(run_lane(egress.clone(), id, wake, wr));
    }
    let reader = read_to_egress(
        &shared, &info, app_rd, app.dec, session, &lanes, up.sliced, labels.0,
    );
    let far_side = if up.sliced {
        Side::PeerProxy
    } else {
        Side::Upstream
    };
    let back = Sides {
        from: far_side,
        to: Side::Downstream,
    };
    let to_app = pump(
        far_rd,
        up.main.dec,
        app_wr,
        labels.1,
        None,
        back,
        shared.body_mover(),
    );
    tokio::pin!(reader);
    tokio::pin!(to_app);
    let mut reading = true;
    let end: Option<PumpEnd> = loop {
        tokio::select! {
            end = &mut reader, if reading => match end {
                PumpEnd::Closed => {
                    // Write what the app handed over, then close.
                    egress.finish(&lanes);
                    reading = false;
                }
                PumpEnd::Failed(e) => {
                    report(&info, &e);
                    break None;
                }
            },
            done = writers.join_next() => match done {
                None => {
                    tracing::debug!(dst = %info.dst, "app closed its session; everything written");
                    break None;
                }
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => break Some(PumpEnd::Failed(SessionError::Io { side: far_side, source: e })),
                Some(Err(e)) => break Some(PumpEnd::Failed(SessionError::Io {
                    side: Side::Internal,
                    source: std::io::Error::other(e),
                })),
            },
            end = &mut to_app => {
                if let PumpEnd::Failed(e) = &end {
                    report(&info, e);
                }
                break Some(end);
            }
        }
    };
    egress.close(session, &lanes);
    drop(idle_reads);
    if let Some(end) = end {
        shared.upstream_died(&info, &end);
    }
}

/// Reads the app's messages, observes them, and queues them (waiting while the
/// memory budget is full, which stops reading: backpressure).
#[allow(clippy::too_many_arguments)]
async fn read_to_egress(
    shared: &Shared,
    info: &SessionInfo,
    mut rd: OwnedReadHalf,
    mut dec: StreamDecoder,
    session: SessionId,
    lanes: &[LaneId],
    sliced: bool,
    direction: &'static str,
) -> PumpEnd {
    let mut seq = 0u64;
    loop {
        loop {
            let event = match dec.next_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => break,
                Err(e) => return APP.framing_failed(e),
            };
            let mut part = None;
            let (body, urgency, keys) = match event {
                StreamEvent::Message(msg) => match classify(msg, Some((shared, info)), seq == 0) {
                    Ok(ps) => match shared.split_route(info, &ps, sliced, Instant::now()).await {
                        Ok(Outgoing::Pass) => {
                            let urgency = shared.prioritize(&ps, info);
                            let keys: Vec<u64> = ps.keys().map(|k| k.collect()).unwrap_or_default();
                            (Body::Message(ps.to_zmtp()), urgency, keys)
                        }
                        Ok(Outgoing::Part(p)) => {
                            // A slice-key response: as urgent as its key, merged by the peer.
                            part = Some(p);
                            let view = PsMessage::new(
                                ps.meta.clone(),
                                vec![Bytes::copy_from_slice(&p.key.to_le_bytes())],
                            );
                            (
                                Body::Message(ps.to_zmtp()),
                                shared.prioritize(&view, info),
                                vec![p.key],
                            )
                        }
                        Ok(Outgoing::Absorb) => continue,
                        Ok(Outgoing::Merged(key, parts)) => {
                            // The merged response is as urgent as its key.
                            let view = PsMessage::new(
                                ps.meta.clone(),
                                vec![Bytes::copy_from_slice(&key.to_le_bytes())],
                            );
                            let len = parts.iter().map(|p| p.len() as u64).sum();
                            (
                                Body::Pieces(Pieces { parts, len }),
                                shared.prioritize(&view, info),
                                vec![key],
                            )
                        }
                        Ok(Outgoing::Replace(_) | Outgoing::Behind(..)) => {
                            // Requests to a local server never take this path (same host: relay).
                            return PumpEnd::Failed(SessionError::Io {
                                side: Side::Internal,
                                source: std::io::Error::other(
                                    "split requests on a scheduled session",
                                ),
                            });
                        }
                        Err(f) => return PumpEnd::Failed(SessionError::Stopped(f)),
                    },
                    Err(msg) => {
                        if let Err(f) = shared.split_request(info, None, Instant::now()).await {
                            return PumpEnd::Failed(SessionError::Stopped(f));
                        }
                        (Body::Message(msg), FENCE_URGENCY, Vec::new())
                    }
                },
                StreamEvent::Command(cmd) => (
                    Body::Raw(Bytes::from(cmd.encode())),
                    FENCE_URGENCY,
                    Vec::new(),
                ),
                // Greeting events cannot occur after the handshake.
                _ => continue,
            };
            metrics::forwarded(direction, body.len() as usize);
            let lane = if sliced {
                lanes[urgency.class.min(lanes.len() - 1)]
            } else {
                lanes[0]
            };
            let item = Item {
                session,
                lane,
                announce: sliced.then_some((lanes[0], seq)),
                urgency,
                keys,
                part,
                body,
            };
            shared.egress.enqueue(item).await;
            seq += 1;
        }
        match rd.read_buf(dec.buffer_for_read()).await {
            Ok(0) => return PumpEnd::Closed,
            Ok(_) => {}
            Err(e) => return APP.read_failed(e),
        }
    }
}
