//! Opening a captured session's upstream: straight to the destination app, or through
//! the destination host's proxy (the tunnel preamble, its answer, a sliced session's
//! class connections); and refusals, logged and counted.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::handshake::HandshakeError;
use super::net;
use super::state::Shared;
use crate::core::policy::Refusal;
use crate::core::preamble::{parse_answer, Answer, Outcome, Preamble, MAX_PREAMBLE_LEN};
use crate::core::priority::CLASSES;
use crate::metrics::{self};

pub(super) fn refuse(reason: Refusal, what: &str, peer: SocketAddr, dst: Option<SocketAddr>) {
    metrics::refused(reason.label());
    match dst {
        Some(dst) => tracing::warn!(%peer, %dst, reason = %reason, "{what} refused"),
        None => tracing::warn!(%peer, reason = %reason, "{what} refused"),
    }
}

pub(super) async fn connect_direct(shared: &Shared, dst: SocketAddr) -> std::io::Result<TcpStream> {
    net::connect(
        dst,
        shared.config.mark(),
        None,
        None,
        shared.config.handshake_timeout(),
    )
    .await
}

/// Opens a sliced session's class connections (1..), each with its class's DSCP
/// for its whole life; each is admitted by the peer only for a session it admitted.
pub(super) async fn open_classes(
    shared: &Shared,
    main: &Preamble,
) -> Result<Vec<TcpStream>, Refusal> {
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

pub(super) fn outcome_label(o: Outcome) -> &'static str {
    match o {
        Outcome::Admitted => "admitted",
        Outcome::RefusedByPolicy => "refused_by_policy",
        Outcome::Unreachable => "unreachable",
    }
}

pub(super) fn downstream_failed(e: &HandshakeError) -> Refusal {
    if let Some(kind) = e.parse_kind() {
        metrics::parse_error(kind);
    }
    Refusal::DownstreamHandshake
}

pub(super) fn upstream_failed(e: &HandshakeError) -> Refusal {
    if let Some(kind) = e.parse_kind() {
        metrics::parse_error(kind);
    }
    tracing::debug!(error = %e, "upstream handshake failed");
    Refusal::UpstreamFailed
}

pub(super) async fn read_answer(upstream: &mut TcpStream) -> Result<(Answer, Vec<u8>), Refusal> {
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
