//! A connection from a peer proxy at the tunnel port: its preamble checked against the
//! policy, the destination app reached, the answer sent, then the session received
//! (plain relay, or the receiving end of a sliced session and its class connections).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use p3proxy_parsers::zmtp::StreamDecoder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::error::Side;
use super::handshake::{connect_as, PeerInfo};
use super::net;
use super::session::pump::{End, Sides};
use super::session::receiver::run_receiver;
use super::session::relay::relay;
use super::split::SplitLink;
use super::state::{SessionInfo, Shared};
use super::upstream::{connect_direct, refuse, upstream_failed};
use crate::core::policy::Refusal;
use crate::core::preamble::{parse_preamble, Answer, Outcome, Preamble, MAX_PREAMBLE_LEN};
use crate::core::priority::CLASSES;
use crate::metrics::{OpenConnection, INBOUND, OUTBOUND};

/// A connection from a peer proxy.
pub(super) async fn handle_tunnel(shared: Arc<Shared>, mut stream: TcpStream, peer: SocketAddr) {
    // What goes back to the peer proxy travels in the top class too.
    let sock = socket2::SockRef::from(&stream);
    let _ = net::set_dscp(&sock, peer.is_ipv4(), shared.config.class_dscp()[0]);
    let _ = sock.set_tcp_notsent_lowat(net::NOTSENT_LOWAT);
    // Read the preamble, bounded in size and time.
    let mut buf = Vec::with_capacity(64);
    let deadline = shared.config.handshake_timeout();
    let parsed = tokio::time::timeout(deadline, async {
        loop {
            match parse_preamble(&buf) {
                Ok((rest, p)) => return Ok((p, rest.to_vec())),
                Err(nom::Err::Incomplete(_)) if buf.len() < MAX_PREAMBLE_LEN => {}
                Err(_) => return Err(()),
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Err(()),
                Ok(_) => {}
            }
        }
    })
    .await;
    let (preamble, rest) = match parsed {
        Ok(Ok(x)) => x,
        _ => return refuse(Refusal::BadPreamble, "tunnel connection", peer, None),
    };
    if preamble.class > 0 {
        return attach_class(shared, stream, peer, preamble, rest).await;
    }
    let target = preamble.target;
    let target_local = (shared.env.is_local)(target.ip());
    let target_loopback = (shared.env.is_loopback)(target.ip());
    let admitted = shared
        .core()
        .policy
        .admit(peer.ip(), target, target_local, target_loopback);
    if let Err(r) = admitted {
        refuse(r, "tunnel", peer, Some(target));
        send_answer(&mut stream, &Answer::refused(Outcome::RefusedByPolicy)).await;
        return;
    }
    let app = PeerInfo {
        socket_type: preamble.socket_type.clone(),
        identity: preamble.identity.clone(),
    };
    let opened = tokio::time::timeout(deadline, async {
        let mut dst = connect_direct(&shared, target)
            .await
            .map_err(|_| Refusal::UpstreamFailed)?;
        let (info, dec) = connect_as(&mut dst, &app, shared.limits)
            .await
            .map_err(|e| upstream_failed(&e))?;
        Ok::<_, Refusal>((dst, info, dec))
    })
    .await
    .unwrap_or(Err(Refusal::HandshakeTimeout));
    let (dst_stream, dst_info, dst_dec) = match opened {
        Ok(x) => x,
        Err(r) => {
            refuse(r, "tunnel", peer, Some(target));
            send_answer(&mut stream, &Answer::refused(Outcome::Unreachable)).await;
            return;
        }
    };
    if !send_answer(
        &mut stream,
        &admitted_answer(&dst_info, shared.pinned(target)),
    )
    .await
    {
        return;
    }
    let _open = OpenConnection::new("tunnel_in");
    let info = SessionInfo {
        identity: preamble.identity,
        dst: target,
    };
    tracing::debug!(%peer, %target, session = preamble.session, sliced = preamble.sliced, "tunnel admitted");
    let _link = SplitLink::new(&shared, &info);
    let dst = End {
        stream: dst_stream,
        dec: dst_dec,
    };
    if preamble.sliced {
        run_receiver(
            shared,
            info,
            peer.ip(),
            preamble.session,
            stream,
            rest,
            dst,
            dst_info,
            (INBOUND, OUTBOUND),
        )
        .await;
        return;
    }
    let mut dec = StreamDecoder::after_handshake(shared.limits);
    dec.push(&rest);
    relay(
        shared,
        info,
        End { stream, dec },
        dst,
        (INBOUND, OUTBOUND),
        Sides {
            from: Side::PeerProxy,
            to: Side::Upstream,
        },
        false,
    )
    .await;
}

/// A class connection of a sliced tunnel session: handed to the session once its
/// main stream was admitted (it may arrive first, so it waits, bounded).
async fn attach_class(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    preamble: Preamble,
    rest: Vec<u8>,
) {
    let key = (peer.ip(), preamble.session);
    let deadline = Instant::now() + shared.config.handshake_timeout();
    let found = loop {
        // Armed before looking, so a session registered in between is not missed.
        let registered = shared.tunnels_changed.notified();
        tokio::pin!(registered);
        registered.as_mut().enable();
        let entry = shared
            .tunnels
            .lock()
            .expect("tunnel table")
            .get(&key)
            .map(|e| {
                (
                    e.target == preamble.target && e.identity == preamble.identity,
                    e.dst_info.clone(),
                    e.attach.clone(),
                )
            });
        if entry.is_some() || Instant::now() >= deadline {
            break entry;
        }
        let _ = tokio::time::timeout_at(deadline.into(), registered).await;
    };
    let valid = usize::from(preamble.class) < CLASSES && preamble.sliced;
    let Some((true, dst_info, attach)) = found.filter(|_| valid) else {
        refuse(
            Refusal::BadPreamble,
            "tunnel class connection",
            peer,
            Some(preamble.target),
        );
        send_answer(&mut stream, &Answer::refused(Outcome::Unreachable)).await;
        return;
    };
    let pinned = shared.pinned(preamble.target);
    if !send_answer(&mut stream, &admitted_answer(&dst_info, pinned)).await {
        return;
    }
    let open = OpenConnection::new("tunnel_class_in");
    // The session owns it from here (and ends it).
    let _ = attach.send((stream, rest, open));
}

/// Writes a tunnel answer; false if the peer is gone.
async fn send_answer(stream: &mut TcpStream, answer: &Answer) -> bool {
    stream.write_all(&answer.encode()).await.is_ok()
}

/// The answer admitting a tunnel to the destination app that sent `dst` in its READY;
/// `pinned`: that app is a server holding split keys (never bypass it).
fn admitted_answer(dst: &PeerInfo, pinned: bool) -> Answer {
    Answer {
        outcome: Outcome::Admitted,
        pinned,
        socket_type: dst.socket_type.clone(),
        identity: dst.identity.clone(),
    }
}
