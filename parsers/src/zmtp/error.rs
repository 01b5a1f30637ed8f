use nom::error::{ErrorKind, ParseError};

/// Why bytes are not valid ZMTP. Every variant means the stream cannot be
/// trusted any further: the connection is closed, never resynchronised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ZmtpError {
    /// Greeting byte `offset` is not what ZMTP requires there.
    #[error("not a ZMTP 3 greeting: byte {offset} is {found:#04x}")]
    BadSignature {
        /// Offset in the greeting.
        offset: usize,
        /// The byte found.
        found: u8,
    },
    /// The peer speaks a ZMTP version older than 3.0.
    #[error("unsupported ZMTP version {major}.{minor}")]
    UnsupportedVersion {
        /// Major version byte.
        major: u8,
        /// Minor version byte.
        minor: u8,
    },
    /// The mechanism field is not uppercase letters, digits, `-_.+` padded with NUL.
    #[error("malformed security mechanism name in greeting")]
    BadMechanism,
    /// The as-server byte is neither 0 nor 1.
    #[error("malformed as-server byte {0:#04x} in greeting")]
    BadAsServer(u8),
    /// Frame flags set bits that ZMTP 3 reserves.
    #[error("reserved frame flag bits set: {0:#04x}")]
    ReservedFlags(u8),
    /// A command frame with the MORE flag: commands are single frames.
    #[error("command frame with the MORE flag set")]
    MultipartCommand,
    /// A length from the wire exceeds its limit; nothing was allocated for it.
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// What was too large (frame, message, command).
        what: &'static str,
        /// The length claimed on the wire.
        len: u64,
        /// The limit in force.
        max: u64,
    },
    /// A multipart message with more frames than the limit (an endless MORE chain).
    #[error("message has more than {max} frames")]
    TooManyFrames {
        /// The limit in force.
        max: usize,
    },
    /// A command body that does not hold a well-formed name.
    #[error("malformed command: {0}")]
    MalformedCommand(&'static str),
    /// A READY property that is cut short or has an empty name.
    #[error("malformed READY property: {0}")]
    MalformedProperty(&'static str),
    /// A message frame arrived before the handshake finished, or a command after it
    /// where none is allowed.
    #[error("unexpected {0} in this state of the ZMTP session")]
    Unexpected(&'static str),
    /// A nom combinator failed (should not happen for well-bounded input).
    #[error("ZMTP parse failed in {0:?}")]
    Nom(ErrorKind),
}

impl<I> ParseError<I> for ZmtpError {
    fn from_error_kind(_input: I, kind: ErrorKind) -> Self {
        ZmtpError::Nom(kind)
    }

    fn append(_input: I, _kind: ErrorKind, other: Self) -> Self {
        other
    }
}
