//! A connection captured by the redirect: ZMTP detected from its first byte, the
//! upstream opened first (DESIGN.md §2, opening order), then the session relayed (plain,
//! or as the origin of a sliced tunnel session); anything else relayed opaque.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use p3proxy_parsers::zmtp::StreamDecoder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::error::Side;
use super::handshake::{accept_app, connect_as, PeerInfo};
use super::net;
use super::session::origin::{run_origin, Upstream};
use super::session::pump::{End, Sides};
use super::session::relay::relay;
use super::split::SplitLink;
use super::state::{SessionInfo, Shared};
use super::upstream::{
    connect_direct, downstream_failed, open_classes, outcome_label, read_answer, refuse,
    upstream_failed,
};
use crate::core::journal::Record;
use crate::core::policy::{ProbeFailed, Refusal, Route};
use crate::core::preamble::{Outcome, Preamble};
use crate::core::topology::node_id_from_identity;
use crate::metrics::{self, OpenConnection, INBOUND, OUTBOUND};

/// A connection captured by the redirect (`inbound`: from another host, for a
/// registered local node; else from a local process).
pub(super) async fn handle_captured(
    shared: Arc<Shared>,
    mut app: TcpStream,
    peer: SocketAddr,
    inbound: bool,
) {
    let dst = match (shared.env.orig_dst)(&app) {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(error = %e, "SO_ORIGINAL_DST");
            return refuse(Refusal::NoOriginalDst, "captured connection", peer, None);
        }
    };
    if !inbound && shared.redirect.is_probe(dst) {
        return; // The proxy's own probe: the redirect reaches it.
    }
    let dst_local = (shared.env.is_local)(dst.ip());
    let checked = if inbound {
        // Exactly what a tunnel may reach: a registered local node, from the cluster.
        shared.core().policy.admit(
            peer.ip(),
            dst,
            dst_local,
            (shared.env.is_loopback)(dst.ip()),
        )
    } else {
        shared.core().policy.check_captured(dst, dst_local)
    };
    if let Err(r) = checked {
        return refuse(r, "captured connection", peer, Some(dst));
    }
    if shared.config.opaque_ports.contains(&dst.port()) {
        return opaque(shared, app, peer, dst, Vec::new()).await;
    }
    // Detect ZMTP from the first byte; a silent client (server-speaks-first protocol) is opaque.
    let mut first = vec![0u8; 64];
    let n = match tokio::time::timeout(shared.config.detect_timeout(), app.read(&mut first)).await {
        Ok(Ok(0)) => return,
        Ok(Ok(n)) => n,
        Ok(Err(_)) => return,
        Err(_) => 0,
    };
    first.truncate(n);
    if first.first() != Some(&0xFF) {
        return opaque(shared, app, peer, dst, first).await;
    }
    let started = Instant::now();
    let route = shared.core().policy.route(dst, dst_local, started);
    // Upstream first: no byte goes to the app before the upstream connection exists.
    let (upstream, route) = match route {
        Route::SameHost | Route::Direct => match connect_direct(&shared, dst).await {
            Ok(s) => (s, route),
            Err(_) => {
                return refuse(
                    Refusal::UpstreamFailed,
                    "captured connection",
                    peer,
                    Some(dst),
                )
            }
        },
        Route::Tunnel => {
            let tunnel_addr = SocketAddr::new(dst.ip(), shared.config.peer_tunnel_port);
            // Probes and tunnel main streams travel in the top class.
            match net::connect(
                tunnel_addr,
                shared.config.mark(),
                None,
                Some(shared.config.class_dscp()[0]),
                shared.config.probe_timeout(),
            )
            .await
            {
                Ok(s) => (s, Route::Tunnel),
                Err(e) => {
                    let fallback = shared.core().policy.probe_failed(dst, Instant::now());
                    tracing::info!(host = %dst.ip(), error = %e, ?fallback, "no proxy answered on the tunnel port");
                    match fallback {
                        ProbeFailed::Refuse => {
                            return refuse(
                                Refusal::ProxyNotBypassed,
                                "captured connection",
                                peer,
                                Some(dst),
                            )
                        }
                        ProbeFailed::Direct => match connect_direct(&shared, dst).await {
                            Ok(s) => (s, Route::Direct),
                            Err(_) => {
                                return refuse(
                                    Refusal::UpstreamFailed,
                                    "captured connection",
                                    peer,
                                    Some(dst),
                                )
                            }
                        },
                    }
                }
            }
        }
    };
    let deadline = shared.config.handshake_timeout();
    let opened = tokio::time::timeout(
        deadline,
        open_upstream(&shared, &mut app, &first, upstream, route, dst),
    )
    .await;
    let Opened {
        app_dec,
        app_info,
        far,
        classes,
        far_info,
        route,
        session,
    } = match opened {
        Ok(Ok(x)) => x,
        Ok(Err(r)) => return refuse(r, "captured ZMTP connection", peer, Some(dst)),
        Err(_) => {
            return refuse(
                Refusal::HandshakeTimeout,
                "captured ZMTP connection",
                peer,
                Some(dst),
            )
        }
    };
    // Only now, with the upstream handshake done end to end, the app gets our READY.
    if app.write_all(&far_info.ready().encode()).await.is_err() {
        return;
    }
    let label = match route {
        _ if inbound => "inbound",
        Route::Tunnel => "tunnel",
        Route::Direct => "direct",
        Route::SameHost => "same_host",
    };
    // Bytes from a remote peer to a local node are inbound.
    let directions = if inbound {
        (INBOUND, OUTBOUND)
    } else {
        (OUTBOUND, INBOUND)
    };
    let _open = OpenConnection::new(label);
    tracing::debug!(%dst, route = label, identity = %String::from_utf8_lossy(&app_info.identity), "relaying");
    let info = SessionInfo {
        identity: app_info.identity,
        dst,
    };
    let app = End {
        stream: app,
        dec: app_dec,
    };
    let _link = SplitLink::new(&shared, &info);
    let scheduled = shared.config.schedule && route != Route::SameHost;
    if scheduled {
        let up = Upstream {
            main: far,
            sliced: route == Route::Tunnel,
            classes,
        };
        run_origin(shared, info, session, app, up, directions).await;
    } else {
        let far_side = if route == Route::Tunnel {
            Side::PeerProxy
        } else {
            Side::Upstream
        };
        let sides = Sides {
            from: Side::Downstream,
            to: far_side,
        };
        relay(shared, info, app, far, directions, sides, true).await;
    }
}

/// A captured session whose upstream is open end to end.
struct Opened {
    app_dec: StreamDecoder,
    app_info: PeerInfo,
    /// The main upstream connection.
    far: End,
    /// A sliced tunnel's class connections (1..).
    classes: Vec<TcpStream>,
    far_info: PeerInfo,
    route: Route,
    session: u64,
}

/// The app's greeting and READY, then the upstream handshake (direct, or through the tunnel).
async fn open_upstream(
    shared: &Arc<Shared>,
    app: &mut TcpStream,
    prefix: &[u8],
    mut upstream: TcpStream,
    mut route: Route,
    dst: SocketAddr,
) -> Result<Opened, Refusal> {
    let (app_info, app_dec) = accept_app(app, prefix, shared.limits)
        .await
        .map_err(|e| downstream_failed(&e))?;
    if node_id_from_identity(&app_info.identity) == Some(1) && route == Route::SameHost {
        // The scheduler's connection to itself tells us its port.
        if shared.core().policy.learn_scheduler(dst.port()) {
            shared.journal(&Record::SchedulerPort { port: dst.port() }, false);
            tracing::info!(
                port = dst.port(),
                "scheduler port learned from its self connection"
            );
        }
    }
    let session = shared.session_id();
    let sliced = shared.config.schedule;
    if route == Route::Tunnel {
        let preamble = Preamble {
            class: 0,
            sliced,
            session,
            target: dst,
            socket_type: app_info.socket_type.clone(),
            identity: app_info.identity.clone(),
        };
        upstream
            .write_all(&preamble.encode())
            .await
            .map_err(|_| Refusal::UpstreamFailed)?;
        let (answer, rest) = read_answer(&mut upstream).await?;
        metrics::count_by(metrics::TUNNEL_ANSWERS, outcome_label(answer.outcome), 1);
        shared.core().policy.proxy_answered(dst, answer.pinned);
        match answer.outcome {
            Outcome::Admitted => {
                let mut dec = StreamDecoder::after_handshake(shared.limits);
                dec.push(&rest);
                let far_info = PeerInfo {
                    socket_type: answer.socket_type,
                    identity: answer.identity,
                };
                let far = End {
                    stream: upstream,
                    dec,
                };
                let classes = if sliced {
                    open_classes(shared, &preamble).await?
                } else {
                    Vec::new()
                };
                return Ok(Opened {
                    app_dec,
                    app_info,
                    far,
                    classes,
                    far_info,
                    route: Route::Tunnel,
                    session,
                });
            }
            Outcome::Unreachable => return Err(Refusal::UpstreamFailed),
            Outcome::RefusedByPolicy if answer.pinned => return Err(Refusal::ProxyNotBypassed),
            Outcome::RefusedByPolicy => {
                // Normal (e.g. the scheduler's port before it is learned): go straight there.
                tracing::debug!(%dst, "tunnel refused by policy: going direct");
                upstream = connect_direct(shared, dst)
                    .await
                    .map_err(|_| Refusal::UpstreamFailed)?;
                route = Route::Direct;
            }
        }
    }
    let (far_info, dec) = connect_as(&mut upstream, &app_info, shared.limits)
        .await
        .map_err(|e| upstream_failed(&e))?;
    Ok(Opened {
        app_dec,
        app_info,
        far: End {
            stream: upstream,
            dec,
        },
        classes: Vec::new(),
        far_info,
        route,
        session,
    })
}

/// A captured connection that is not ZMTP: relayed byte for byte, from the app's
/// own source address, as the process would have reached it anyway.
async fn opaque(
    shared: Arc<Shared>,
    mut app: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    first: Vec<u8>,
) {
    let source: Option<IpAddr> = Some(peer.ip()).filter(|ip| !(shared.env.is_loopback)(*ip));
    let mut upstream = match net::connect(
        dst,
        shared.config.mark(),
        source,
        None,
        shared.config.handshake_timeout(),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%dst, error = %e, "opaque upstream");
            return refuse(
                Refusal::UpstreamFailed,
                "opaque connection",
                peer,
                Some(dst),
            );
        }
    };
    let _open = OpenConnection::new("opaque");
    if upstream.write_all(&first).await.is_err() {
        return;
    }
    metrics::forwarded_opaque(OUTBOUND, first.len() as u64);
    if let Ok((out, back)) = tokio::io::copy_bidirectional(&mut app, &mut upstream).await {
        metrics::forwarded_opaque(OUTBOUND, out);
        metrics::forwarded_opaque(INBOUND, back);
    }
}
