//! The tunnel preamble between two proxies and the peer's answer (DESIGN.md §2).
//!
//! ```text
//! preamble: "P3PX" version:u8 sliced:1bit|class:7bits session:u64 family:u8(4|6) ip:4|16 port:u16
//!           socket_type:len8+bytes identity:len8+bytes
//! answer:   "P3PA" outcome:u8 flags:u8 socket_type:len8+bytes identity:len8+bytes
//! ```
//! The preamble carries what the terminated ZMTP session needs (the app's socket
//! type and Identity); the answer carries the destination app's, so that the
//! originating proxy greets its app as the destination would have. After an
//! admitted answer, the peer-to-origin direction carries ZMTP frames (no greeting,
//! no READY); the origin-to-peer direction carries ZMTP frames too, unless `sliced`:
//! then every connection of the session (the main one, class 0, and one per other
//! class) carries slice frames (`core::slice`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::Bytes;
use nom::bytes::streaming::{tag, take};
use nom::number::streaming::{be_u16, be_u64, be_u8};
use nom::{IResult, Parser};

/// Magic of a preamble.
pub const PREAMBLE_MAGIC: &[u8; 4] = b"P3PX";
/// Magic of an answer.
pub const ANSWER_MAGIC: &[u8; 4] = b"P3PA";
/// Tunnel protocol version.
pub const VERSION: u8 = 2;
/// Longest possible preamble (IPv6, 255-byte socket type and identity).
pub const MAX_PREAMBLE_LEN: usize = 4 + 2 + 8 + 1 + 16 + 2 + 256 + 256;

/// Why tunnel opening bytes are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PreambleError {
    /// Wrong magic: not a p3proxy tunnel.
    #[error("bad magic")]
    Magic,
    /// A version this proxy does not speak.
    #[error("unsupported tunnel version {0}")]
    Version(u8),
    /// An address family other than 4 or 6.
    #[error("bad address family {0}")]
    Family(u8),
    /// An outcome code this proxy does not know.
    #[error("bad answer outcome {0}")]
    Outcome(u8),
}

/// The opening of a tunnel connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preamble {
    /// Priority class of this connection: 0 is the session's main stream (the only one
    /// that reaches the app), 1.. its class connections.
    pub class: u8,
    /// The origin sends slice frames (scheduling on), not ZMTP frames.
    pub sliced: bool,
    /// Session id shared by the connections of one relayed ZMTP connection.
    pub session: u64,
    /// The original destination: the app the peer proxy must reach.
    pub target: SocketAddr,
    /// The originating app's `Socket-Type`.
    pub socket_type: Bytes,
    /// The originating app's `Identity` (`ps9`, or empty).
    pub identity: Bytes,
}

/// The three outcomes of a tunnel request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The peer reached the app and finished its handshake.
    Admitted,
    /// The peer does not relay this port: go straight to it.
    RefusedByPolicy,
    /// The peer could not reach the app: close downstream without READY.
    Unreachable,
}

/// The peer proxy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// What happened.
    pub outcome: Outcome,
    /// The peer holds split keys for this destination: never bypass it.
    pub pinned: bool,
    /// The destination app's `Socket-Type` (when admitted).
    pub socket_type: Bytes,
    /// The destination app's `Identity` (when admitted).
    pub identity: Bytes,
}

fn put_short(out: &mut Vec<u8>, b: &[u8]) {
    let n = b.len().min(255);
    out.push(n as u8);
    out.extend_from_slice(&b[..n]);
}

fn short_bytes(input: &[u8]) -> IResult<&[u8], Bytes, PreambleError> {
    let (input, n) = be_u8(input)?;
    let (input, b) = take(n).parse(input)?;
    Ok((input, Bytes::copy_from_slice(b)))
}

impl<I> nom::error::ParseError<I> for PreambleError {
    fn from_error_kind(_: I, _: nom::error::ErrorKind) -> Self {
        PreambleError::Magic
    }
    fn append(_: I, _: nom::error::ErrorKind, other: Self) -> Self {
        other
    }
}

impl Preamble {
    /// Wire bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(PREAMBLE_MAGIC);
        out.push(VERSION);
        out.push(self.class & 0x7f | u8::from(self.sliced) << 7);
        out.extend_from_slice(&self.session.to_be_bytes());
        match self.target.ip() {
            IpAddr::V4(ip) => {
                out.push(4);
                out.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                out.push(6);
                out.extend_from_slice(&ip.octets());
            }
        }
        out.extend_from_slice(&self.target.port().to_be_bytes());
        put_short(&mut out, &self.socket_type);
        put_short(&mut out, &self.identity);
        out
    }
}

/// Checks the magic as soon as its bytes arrive, so garbage is refused early.
fn magic<'a>(input: &'a [u8], want: &'static [u8; 4]) -> IResult<&'a [u8], (), PreambleError> {
    let n = input.len().min(4);
    if input[..n] != want[..n] {
        return Err(nom::Err::Failure(PreambleError::Magic));
    }
    let (input, _) = tag(&want[..]).parse(input)?;
    Ok((input, ()))
}

/// Parses a preamble (streaming: `Incomplete` until it is all in).
pub fn parse_preamble(input: &[u8]) -> IResult<&[u8], Preamble, PreambleError> {
    let (input, ()) = magic(input, PREAMBLE_MAGIC)?;
    let (input, version) = be_u8(input)?;
    if version != VERSION {
        return Err(nom::Err::Failure(PreambleError::Version(version)));
    }
    let (input, (class_byte, session, family)) = (be_u8, be_u64, be_u8).parse(input)?;
    let (class, sliced) = (class_byte & 0x7f, class_byte & 0x80 != 0);
    let (input, ip) = match family {
        4 => {
            let (i, b) = take(4usize).parse(input)?;
            (
                i,
                IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b).expect("4 bytes"))),
            )
        }
        6 => {
            let (i, b) = take(16usize).parse(input)?;
            (
                i,
                IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16 bytes"))),
            )
        }
        f => return Err(nom::Err::Failure(PreambleError::Family(f))),
    };
    let (input, (port, socket_type, identity)) = (be_u16, short_bytes, short_bytes).parse(input)?;
    Ok((
        input,
        Preamble {
            class,
            sliced,
            session,
            target: SocketAddr::new(ip, port),
            socket_type,
            identity,
        },
    ))
}

impl Answer {
    /// An answer without a session (refused or unreachable).
    pub fn refused(outcome: Outcome) -> Answer {
        Answer {
            outcome,
            pinned: false,
            socket_type: Bytes::new(),
            identity: Bytes::new(),
        }
    }

    /// Wire bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        out.extend_from_slice(ANSWER_MAGIC);
        out.push(match self.outcome {
            Outcome::Admitted => 0,
            Outcome::RefusedByPolicy => 1,
            Outcome::Unreachable => 2,
        });
        out.push(u8::from(self.pinned));
        put_short(&mut out, &self.socket_type);
        put_short(&mut out, &self.identity);
        out
    }
}

/// Parses an answer (streaming).
pub fn parse_answer(input: &[u8]) -> IResult<&[u8], Answer, PreambleError> {
    let (input, ()) = magic(input, ANSWER_MAGIC)?;
    let (input, (code, flags, socket_type, identity)) =
        (be_u8, be_u8, short_bytes, short_bytes).parse(input)?;
    let outcome = match code {
        0 => Outcome::Admitted,
        1 => Outcome::RefusedByPolicy,
        2 => Outcome::Unreachable,
        c => return Err(nom::Err::Failure(PreambleError::Outcome(c))),
    };
    Ok((
        input,
        Answer {
            outcome,
            pinned: flags & 1 != 0,
            socket_type,
            identity,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_round_trip_and_every_prefix_is_incomplete() {
        for (target, class, sliced) in [
            ("10.77.0.11:40000", 0, false),
            ("[fd00::1]:29091", 0, true),
            ("10.77.0.12:40000", 3, true),
        ] {
            let p = Preamble {
                class,
                sliced,
                session: 0xdead_beef,
                target: target.parse().unwrap(),
                socket_type: Bytes::from_static(b"DEALER"),
                identity: Bytes::from_static(b"ps9"),
            };
            let wire = p.encode();
            assert!(wire.len() <= MAX_PREAMBLE_LEN);
            assert_eq!(parse_preamble(&wire).unwrap(), (&[][..], p));
            for cut in 0..wire.len() {
                assert!(
                    matches!(parse_preamble(&wire[..cut]), Err(nom::Err::Incomplete(_))),
                    "cut {cut}"
                );
            }
        }
    }

    #[test]
    fn answer_round_trip() {
        let a = Answer {
            outcome: Outcome::Admitted,
            pinned: true,
            socket_type: Bytes::from_static(b"ROUTER"),
            identity: Bytes::new(),
        };
        assert_eq!(parse_answer(&a.encode()).unwrap().1, a);
        let r = Answer::refused(Outcome::Unreachable);
        assert_eq!(parse_answer(&r.encode()).unwrap().1, r);
    }

    #[test]
    fn garbage_is_refused_from_the_first_wrong_byte() {
        assert_eq!(
            parse_preamble(b"G"),
            Err(nom::Err::Failure(PreambleError::Magic))
        );
        assert_eq!(
            parse_preamble(b"P3PX\x07"),
            Err(nom::Err::Failure(PreambleError::Version(7)))
        );
        // A ZMTP greeting sent to the tunnel port by mistake.
        assert_eq!(
            parse_preamble(&[0xff, 0, 0]),
            Err(nom::Err::Failure(PreambleError::Magic))
        );
    }
}
