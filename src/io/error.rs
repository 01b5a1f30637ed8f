//! Why a relayed session ended, with the side at fault (pingora's `ErrorSource` is the
//! model), and the one end-of-session report that logs it at the level its side
//! deserves and counts what the metrics count.

use std::fmt;

use p3proxy_parsers::zmtp::ZmtpError;

use super::state::SessionInfo;
use crate::core::slice::SliceError;
use crate::core::split::Failure;
use crate::metrics;

/// Which side of a session was at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Side {
    /// The app that opened the session (the DEALER whose connection the redirect
    /// captured).
    Downstream,
    /// The app the session goes to (the ROUTER), reached directly or by the peer proxy.
    Upstream,
    /// The peer proxy at the other end of a tunnel.
    PeerProxy,
    /// This proxy: a decision of its own (stopping a server's traffic).
    Internal,
}

impl Side {
    /// For logs.
    pub fn label(self) -> &'static str {
        match self {
            Side::Downstream => "downstream app",
            Side::Upstream => "upstream app",
            Side::PeerProxy => "peer proxy",
            Side::Internal => "this proxy",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Why a session ended other than by a clean close.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// Reading from or writing to a side failed.
    #[error("{side}: {source}")]
    Io {
        /// Whose socket.
        side: Side,
        /// What failed.
        source: std::io::Error,
    },
    /// A side broke ZMTP framing or a limit.
    #[error("{side}: ZMTP framing: {source}")]
    Framing {
        /// Who sent the bytes.
        side: Side,
        /// What was wrong with them.
        source: ZmtpError,
    },
    /// The peer proxy sent a tunnel frame this proxy does not take.
    #[error("peer proxy: bad tunnel frame: {0}")]
    TunnelFrame(SliceError),
    /// A tunnel connection closed in the middle of a frame.
    #[error("peer proxy: tunnel connection closed mid-frame")]
    TunnelTruncated,
    /// Every reader of the session's tunnel connections ended.
    #[error("peer proxy: every tunnel reader ended")]
    TunnelGone,
    /// The peer proxy's slices could not be reassembled (out of order, over the
    /// bound, past their message).
    #[error("peer proxy: reassembly: {0}")]
    Reassembly(SliceError),
    /// A reassembled message is not exactly one ZMTP unit.
    #[error("peer proxy: a reassembled message is not one ZMTP unit: {0}")]
    NotOneUnit(&'static str),
    /// A part of a split key's response that does not merge.
    #[error("peer proxy: merging a split key's response: {0}")]
    BadPart(String),
    /// A split layout cannot serve a message: the server's traffic stops.
    #[error("this proxy stopped the server's traffic ({}): {}", .0.reason, .0.detail)]
    Stopped(Failure),
}

impl SessionError {
    /// Who was at fault.
    pub fn side(&self) -> Side {
        match self {
            SessionError::Io { side, .. } | SessionError::Framing { side, .. } => *side,
            SessionError::TunnelFrame(_)
            | SessionError::TunnelTruncated
            | SessionError::TunnelGone
            | SessionError::Reassembly(_)
            | SessionError::NotOneUnit(_)
            | SessionError::BadPart(_) => Side::PeerProxy,
            SessionError::Stopped(_) => Side::Internal,
        }
    }

    /// The `kind` of `p3proxy_parse_errors_total` it counts, if any.
    pub fn parse_kind(&self) -> Option<&'static str> {
        match self {
            SessionError::Framing { .. } => Some("zmtp_framing"),
            SessionError::TunnelFrame(_) | SessionError::TunnelTruncated => Some("tunnel_frame"),
            SessionError::Reassembly(_) => Some("tunnel_reassembly"),
            SessionError::NotOneUnit(_) => Some("tunnel_message"),
            _ => None,
        }
    }
}

/// The end-of-session report, once per session that ended on an error: counts its
/// parse error and logs it (a stopped server's traffic as an error, a broken peer as a
/// warning, a connection that went away as debug).
pub(crate) fn report(info: &SessionInfo, err: &SessionError) {
    if let Some(kind) = err.parse_kind() {
        metrics::parse_error(kind);
    }
    let identity = String::from_utf8_lossy(&info.identity);
    let side = err.side().label();
    match err {
        SessionError::Stopped(f) => tracing::error!(dst = %info.dst, %identity, reason = f.reason,
            "session closed: the server's traffic is stopped"),
        SessionError::Io { .. } | SessionError::TunnelGone => {
            tracing::debug!(dst = %info.dst, %identity, side, error = %err, "session ended")
        }
        _ => tracing::warn!(dst = %info.dst, %identity, side, error = %err, "closing session"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_names_its_side_and_parse_kind() {
        let io = || std::io::Error::other("reset");
        let cases = [
            (
                SessionError::Io {
                    side: Side::Upstream,
                    source: io(),
                },
                Side::Upstream,
                None,
            ),
            (
                SessionError::Framing {
                    side: Side::Downstream,
                    source: ZmtpError::ReservedFlags(0x80),
                },
                Side::Downstream,
                Some("zmtp_framing"),
            ),
            (
                SessionError::TunnelTruncated,
                Side::PeerProxy,
                Some("tunnel_frame"),
            ),
            (
                SessionError::TunnelFrame(SliceError::Tag(9)),
                Side::PeerProxy,
                Some("tunnel_frame"),
            ),
            (
                SessionError::Reassembly(SliceError::Tag(9)),
                Side::PeerProxy,
                Some("tunnel_reassembly"),
            ),
            (
                SessionError::NotOneUnit("too many frames"),
                Side::PeerProxy,
                Some("tunnel_message"),
            ),
            (SessionError::BadPart("x".into()), Side::PeerProxy, None),
            (SessionError::TunnelGone, Side::PeerProxy, None),
        ];
        for (err, side, kind) in cases {
            assert_eq!((err.side(), err.parse_kind()), (side, kind), "{err}");
            assert!(metrics::PARSE_ERROR_KINDS.iter().any(|k| Some(*k) == kind) || kind.is_none());
        }
        let e = SessionError::Framing {
            side: Side::PeerProxy,
            source: ZmtpError::ReservedFlags(0x80),
        };
        assert!(
            e.to_string().starts_with("peer proxy: ZMTP framing: "),
            "{e}"
        );
    }
}
