//! The listeners and per-connection handlers, shaped like mini-redis's server:
//! `run(bound, shared, shutdown)` accepts until shutdown, with a connection limit.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use p3proxy_parsers::zmtp::StreamDecoder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::net::{self, Bound};
use super::relay::{relay, End};
use super::scheduled::{run_origin, run_receiver, Upstream};
use super::session::{accept_app, connect_as, HandshakeError, PeerInfo};
use super::split::SplitLink;
use super::state::{SessionInfo, Shared};
use crate::core::journal::Record;
use crate::core::policy::{ProbeFailed, Refusal, Route};
use crate::core::preamble::{
    parse_answer, parse_preamble, Answer, Outcome, Preamble, MAX_PREAMBLE_LEN,
};
use crate::core::priority::CLASSES;
use crate::core::topology::node_id_from_identity;
use crate::metrics::{self, OpenConnection, INBOUND, OUTBOUND};

/// Accepts on every listener until `shutdown` completes.
pub async fn run(bound: Bound, shared: Arc<Shared>, shutdown: impl Future) {
    let limit = Arc::new(Semaphore::new(shared.config.max_connections));
    let redirect = accept_loop(
        bound.redirect,
        shared.clone(),
        limit.clone(),
        Kind::Redirect,
    );
    let tunnel = async {
        match bound.tunnel {
            Some(l) => accept_loop(l, shared.clone(), limit.clone(), Kind::Tunnel).await,
            None => std::future::pending().await,
        }
    };
    let inbound = async {
        match bound.inbound {
            Some(l) => accept_loop(l, shared.clone(), limit.clone(), Kind::Inbound).await,
            None => std::future::pending().await,
        }
    };
    let memory = async {
        let mut tick = tokio::time::interval(super::memory::TICK);
        // A late tick must not look like a quiet one after a few microseconds.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if shared.egress.memory_return_due() {
                let _ = tokio::task::spawn_blocking(super::memory::trim).await;
            }
        }
    };
    tokio::select! {
        _ = redirect => {}
        _ = tunnel => {}
        _ = inbound => {}
        _ = memory => {}
        _ = shutdown => tracing::info!("shutting down"),
    }
    shared.remove_inbound_rules();
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Captured from a local process (nat OUTPUT).
    Redirect,
    /// From a peer proxy.
    Tunnel,
    /// Captured from another host for a registered local node (nat PREROUTING).
    Inbound,
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
    kind: Kind,
) {
    loop {
        let permit = limit
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            match kind {
                Kind::Redirect => handle_captured(shared, stream, peer, false).await,
                Kind::Inbound => handle_captured(shared, stream, peer, true).await,
                Kind::Tunnel => handle_tunnel(shared, stream, peer).await,
            }
            drop(permit);
        });
    }
}

fn refuse(reason: Refusal, what: &str, peer: SocketAddr, dst: Option<SocketAddr>) {
    metrics::refused(reason.label());
    match dst {
        Some(dst) => tracing::warn!(%peer, %dst, reason = %reason, "{what} refused"),
        None => tracing::warn!(%peer, reason = %reason, "{what} refused"),
    }
}

/// A connection captured by the redirect (`inbound`: from another host, for a
/// registered local node; else from a local process).
async fn handle_captured(shared: Arc<Shared>, mut app: TcpStream, peer: SocketAddr, inbound: bool) {
    let dst = match (shared.env.orig_dst)(&app) {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(error = %e, "SO_ORIGINAL_DST");
            return refuse(Refusal::NoOriginalDst, "captured connection", peer, None);
        }
    };
    let dst_local = (shared.env.is_local)(dst.ip());
    let checked = if inbound {
        // Exactly what a tunnel may reach: a registered local node, from the cluster.
        shared.policy.lock().expect("policy lock").admit(
            peer.ip(),
            dst,
            dst_local,
            (shared.env.is_loopback)(dst.ip()),
        )
    } else {
        shared
            .policy
            .lock()
            .expect("policy lock")
            .check_captured(dst, dst_local)
    };
    if let Err(r) = checked {
        return refuse(r, "captured connection", peer, Some(dst));
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
    let route = shared
        .policy
        .lock()
        .expect("policy lock")
        .route(dst, dst_local, started);
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
                    let fallback = shared
                        .policy
                        .lock()
                        .expect("policy lock")
                        .probe_failed(dst, Instant::now());
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
        relay(shared, info, app, far, directions, true).await;
    }
}

async fn connect_direct(shared: &Shared, dst: SocketAddr) -> std::io::Result<TcpStream> {
    net::connect(
        dst,
        shared.config.mark(),
        None,
        None,
        shared.config.handshake_timeout(),
    )
    .await
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
        if shared
            .policy
            .lock()
            .expect("policy lock")
            .learn_scheduler(dst.port())
        {
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
        ::metrics::counter!(metrics::TUNNEL_ANSWERS, "outcome" => outcome_label(answer.outcome))
            .increment(1);
        shared
            .policy
            .lock()
            .expect("policy lock")
            .proxy_answered(dst, answer.pinned);
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

/// Opens a sliced session's class connections (1..), each with its class's DSCP
/// for its whole life; each is admitted by the peer only for a session it admitted.
async fn open_classes(shared: &Shared, main: &Preamble) -> Result<Vec<TcpStream>, Refusal> {
    let tunnel_addr = SocketAddr::new(main.target.ip(), shared.config.peer_tunnel_port);
    let dscp = shared.config.class_dscp();
    let open = |class: usize| {
        let preamble = Preamble {
            class: class as u8,
            ..main.clone()
        };
        async move {
            let mut conn = net::connect(
                tunnel_addr,
                shared.config.mark(),
                None,
                Some(dscp[class]),
                shared.config.probe_timeout(),
            )
            .await
            .map_err(|_| Refusal::UpstreamFailed)?;
            conn.write_all(&preamble.encode())
                .await
                .map_err(|_| Refusal::UpstreamFailed)?;
            let (answer, rest) = read_answer(&mut conn).await?;
            if answer.outcome != Outcome::Admitted || !rest.is_empty() {
                return Err(Refusal::UpstreamFailed);
            }
            Ok(conn)
        }
    };
    const _: () = assert!(
        CLASSES == 4,
        "one class connection per class beyond the main one"
    );
    let (c1, c2, c3) = tokio::try_join!(open(1), open(2), open(3))?;
    Ok(vec![c1, c2, c3])
}

fn outcome_label(o: Outcome) -> &'static str {
    match o {
        Outcome::Admitted => "admitted",
        Outcome::RefusedByPolicy => "refused_by_policy",
        Outcome::Unreachable => "unreachable",
    }
}

fn downstream_failed(e: &HandshakeError) -> Refusal {
    if let Some(kind) = e.parse_kind() {
        metrics::parse_error(kind);
    }
    Refusal::DownstreamHandshake
}

fn upstream_failed(e: &HandshakeError) -> Refusal {
    if let Some(kind) = e.parse_kind() {
        metrics::parse_error(kind);
    }
    tracing::debug!(error = %e, "upstream handshake failed");
    Refusal::UpstreamFailed
}

async fn read_answer(upstream: &mut TcpStream) -> Result<(Answer, Vec<u8>), Refusal> {
    let mut buf = Vec::with_capacity(64);
    loop {
        match parse_answer(&buf) {
            Ok((rest, answer)) => return Ok((answer, rest.to_vec())),
            Err(nom::Err::Incomplete(_)) if buf.len() < MAX_PREAMBLE_LEN => {}
            Err(_) => return Err(Refusal::BadPreamble),
        }
        if upstream
            .read_buf(&mut buf)
            .await
            .map_err(|_| Refusal::UpstreamFailed)?
            == 0
        {
            return Err(Refusal::UpstreamFailed);
        }
    }
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

/// A connection from a peer proxy.
async fn handle_tunnel(shared: Arc<Shared>, mut stream: TcpStream, peer: SocketAddr) {
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
    let admitted = shared.policy.lock().expect("policy lock").admit(
        peer.ip(),
        target,
        target_local,
        target_loopback,
    );
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
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
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
