//! ZMTP handshakes. The proxy terminates ZMTP toward each app: it greets the app
//! as the peer the app expected, and greets the destination as the app.

use bytes::Bytes;
use p3proxy_parsers::zmtp::{Command, Greeting, Limits, StreamDecoder, StreamEvent, ZmtpError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a ZMTP peer said about itself in READY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerInfo {
    /// `Socket-Type` (DEALER for ps-lite senders, ROUTER for receivers).
    pub(crate) socket_type: Bytes,
    /// `Identity` (`ps9`, or empty).
    pub(crate) identity: Bytes,
}

impl PeerInfo {
    /// The READY command announcing this peer.
    pub(crate) fn ready(&self) -> Command {
        Command::ready(&[
            ("Socket-Type", &self.socket_type),
            ("Identity", &self.identity),
        ])
    }
}

/// Why a handshake failed, and whose fault it was.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("ZMTP: {0}")]
    Zmtp(#[from] ZmtpError),
    #[error("peer closed during the handshake")]
    Closed,
    #[error("security mechanism {0} is not NULL")]
    Mechanism(String),
    #[error("{0} before READY")]
    Unexpected(&'static str),
}

impl HandshakeError {
    /// Metric label for a parse error (`None` for plain IO trouble).
    pub(crate) fn parse_kind(&self) -> Option<&'static str> {
        match self {
            HandshakeError::Zmtp(_) => Some("zmtp_handshake"),
            HandshakeError::Mechanism(_) => Some("zmtp_mechanism"),
            HandshakeError::Unexpected(_) => Some("zmtp_handshake"),
            _ => None,
        }
    }
}

/// Reads a peer's greeting and READY into `dec` (which may hold bytes already).
/// Bytes after READY stay in `dec`.
async fn read_ready(
    stream: &mut TcpStream,
    dec: &mut StreamDecoder,
) -> Result<PeerInfo, HandshakeError> {
    loop {
        while let Some(event) = dec.next_event()? {
            match event {
                StreamEvent::Signature | StreamEvent::Major(_) => {}
                StreamEvent::Greeting(g) => {
                    if g.mechanism.name() != b"NULL" {
                        return Err(HandshakeError::Mechanism(
                            String::from_utf8_lossy(g.mechanism.name()).into(),
                        ));
                    }
                }
                StreamEvent::Command(cmd @ Command::Ready(_)) => {
                    return Ok(PeerInfo {
                        socket_type: cmd.socket_type().cloned().unwrap_or_default(),
                        identity: cmd.identity().cloned().unwrap_or_default(),
                    });
                }
                StreamEvent::Command(_) => {
                    return Err(HandshakeError::Unexpected("command other than READY"))
                }
                StreamEvent::Message(_) | StreamEvent::Tail(_) => {
                    return Err(HandshakeError::Unexpected("message"))
                }
            }
        }
        if stream.read_buf(dec.buffer_for_read()).await? == 0 {
            return Err(HandshakeError::Closed);
        }
    }
}

/// Greets the app as the destination would, and reads the app's greeting and
/// READY. Our READY is not sent: that waits for the upstream (DESIGN.md §2).
/// `prefix` holds bytes already read from the app.
pub(crate) async fn accept_app(
    stream: &mut TcpStream,
    prefix: &[u8],
    limits: Limits,
) -> Result<(PeerInfo, StreamDecoder), HandshakeError> {
    // Our whole greeting at once: libzmq reads it stage by stage, and we never wait
    // for the app's full greeting before sending ours (that would deadlock).
    stream.write_all(&Greeting::null(0).encode()).await?;
    let mut dec = StreamDecoder::new(limits);
    dec.push(prefix);
    let app = read_ready(stream, &mut dec).await?;
    Ok((app, dec))
}

/// Opens a ZMTP session to a destination as the app `me`; returns what the
/// destination said in its READY, and the decoder for what follows.
pub(crate) async fn connect_as(
    stream: &mut TcpStream,
    me: &PeerInfo,
    limits: Limits,
) -> Result<(PeerInfo, StreamDecoder), HandshakeError> {
    let mut hello = Greeting::null(me.identity.len()).encode().to_vec();
    hello.extend(me.ready().encode());
    stream.write_all(&hello).await?;
    let mut dec = StreamDecoder::new(limits);
    let peer = read_ready(stream, &mut dec).await?;
    Ok((peer, dec))
}
