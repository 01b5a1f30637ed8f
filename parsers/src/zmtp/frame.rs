//! ZMTP 3 frame headers: a flags byte, then a 1-byte or 8-byte big-endian size.
//! Only the header is parsed here; the body is moved by whoever holds the buffer.

use nom::number::streaming::{be_u64, be_u8};
use nom::IResult;

use super::ZmtpError;

/// More frames of this message follow.
pub const FLAG_MORE: u8 = 0x01;
/// The size is 8 bytes (big endian) instead of 1.
pub const FLAG_LONG: u8 = 0x02;
/// The frame is a command (READY, ERROR, PING, ...).
pub const FLAG_COMMAND: u8 = 0x04;
const RESERVED_FLAGS: u8 = !(FLAG_MORE | FLAG_LONG | FLAG_COMMAND);

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Another frame of the same message follows.
    pub more: bool,
    /// This frame is a command, not message data.
    pub command: bool,
    /// The size was sent in the 8-byte form; kept so that re-encoding is exact
    /// (libzmq uses it exactly when the size exceeds 255).
    pub long: bool,
    /// Body length in bytes, as claimed by the peer: check it before trusting it.
    pub size: u64,
}

impl FrameHeader {
    /// The header libzmq would write for a body of `size` bytes.
    pub fn canonical(size: u64, more: bool, command: bool) -> FrameHeader {
        FrameHeader {
            more,
            command,
            long: size > 255,
            size,
        }
    }

    /// Bytes this header takes on the wire.
    pub fn encoded_len(&self) -> usize {
        if self.long {
            9
        } else {
            2
        }
    }

    /// Appends the header bytes to `out`.
    ///
    /// Panics if a short header is asked for a size above 255 (a caller bug).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut flags = 0;
        if self.more {
            flags |= FLAG_MORE;
        }
        if self.command {
            flags |= FLAG_COMMAND;
        }
        if self.long {
            out.push(flags | FLAG_LONG);
            out.extend_from_slice(&self.size.to_be_bytes());
        } else {
            let size = u8::try_from(self.size).expect("short frame header holds at most 255");
            out.extend_from_slice(&[flags, size]);
        }
    }
}

/// Parses one frame header, refusing a size above `max_size` before anyone
/// allocates or waits for that many bytes.
pub fn parse_frame_header(input: &[u8], max_size: u64) -> IResult<&[u8], FrameHeader, ZmtpError> {
    let (rest, flags) = be_u8(input)?;
    if flags & RESERVED_FLAGS != 0 {
        return Err(nom::Err::Failure(ZmtpError::ReservedFlags(flags)));
    }
    let more = flags & FLAG_MORE != 0;
    let command = flags & FLAG_COMMAND != 0;
    let long = flags & FLAG_LONG != 0;
    if command && more {
        return Err(nom::Err::Failure(ZmtpError::MultipartCommand));
    }
    let (rest, size) = if long {
        be_u64(rest)?
    } else {
        let (rest, size) = be_u8(rest)?;
        (rest, u64::from(size))
    };
    if size > max_size {
        let what = if command { "command frame" } else { "frame" };
        return Err(nom::Err::Failure(ZmtpError::TooLarge {
            what,
            len: size,
            max: max_size,
        }));
    }
    Ok((
        rest,
        FrameHeader {
            more,
            command,
            long,
            size,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_headers_round_trip() {
        for header in [
            FrameHeader::canonical(0, false, false),
            FrameHeader::canonical(23, true, false),
            FrameHeader::canonical(4000, true, false),
            FrameHeader::canonical(44, false, true),
            FrameHeader {
                more: false,
                command: false,
                long: true,
                size: 5,
            },
        ] {
            let mut bytes = Vec::new();
            header.encode_into(&mut bytes);
            assert_eq!(bytes.len(), header.encoded_len());
            assert_eq!(parse_frame_header(&bytes, u64::MAX), Ok((&[][..], header)));
            for cut in 0..bytes.len() {
                assert!(matches!(
                    parse_frame_header(&bytes[..cut], u64::MAX),
                    Err(nom::Err::Incomplete(_))
                ));
            }
        }
    }

    #[test]
    fn header_from_the_walkthrough() {
        let bytes = [0x03, 0, 0, 0, 0, 0, 0, 0x0f, 0xa0];
        let (_, h) = parse_frame_header(&bytes, 1 << 20).unwrap();
        assert_eq!(
            h,
            FrameHeader {
                more: true,
                command: false,
                long: true,
                size: 4000
            }
        );
    }

    #[test]
    fn huge_size_is_refused_before_the_body() {
        let bytes = [0x02, 0x10, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            parse_frame_header(&bytes, 1 << 31),
            Err(nom::Err::Failure(ZmtpError::TooLarge {
                what: "frame",
                len: 1 << 60,
                max: 1 << 31
            }))
        );
    }

    #[test]
    fn reserved_bits_and_multipart_commands_are_errors() {
        assert_eq!(
            parse_frame_header(&[0x08, 0], 10),
            Err(nom::Err::Failure(ZmtpError::ReservedFlags(0x08)))
        );
        assert_eq!(
            parse_frame_header(&[0x05, 0], 10),
            Err(nom::Err::Failure(ZmtpError::MultipartCommand))
        );
    }
}
