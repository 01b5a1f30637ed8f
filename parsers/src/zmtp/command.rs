//! ZMTP commands: the body of a frame with the COMMAND flag.
//!
//! ps-lite only ever exchanges READY (PROTOCOL.md §2.2); every other command is
//! parsed into its name and data and tolerated.

use bytes::Bytes;
use nom::bytes::complete::take;
use nom::number::complete::{be_u32, be_u8};
use nom::{IResult, Parser};

use super::{FrameHeader, ZmtpError};

/// Name of the READY command.
pub const READY: &[u8] = b"READY";
/// Name of the ERROR command.
pub const ERROR: &[u8] = b"ERROR";

/// One metadata property of a READY command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Property {
    /// Property name, e.g. `Socket-Type` or `Identity` (compare case-insensitively).
    pub name: Bytes,
    /// Property value, e.g. `DEALER` or `ps9`; may be empty.
    pub value: Bytes,
}

/// A ZMTP command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// READY with its metadata, in wire order (unknown properties kept).
    Ready(Vec<Property>),
    /// ERROR with its reason. Never sent to an app by this proxy: libzmq treats it as final.
    Error(Bytes),
    /// Any other command (PING, PONG, SUBSCRIBE, ...), tolerated and kept whole.
    Other {
        /// Command name.
        name: Bytes,
        /// Command data after the name.
        data: Bytes,
    },
}

impl Command {
    /// A READY command with the given properties, in this order.
    pub fn ready(properties: &[(&str, &[u8])]) -> Command {
        Command::Ready(
            properties
                .iter()
                .map(|(name, value)| Property {
                    name: Bytes::copy_from_slice(name.as_bytes()),
                    value: Bytes::copy_from_slice(value),
                })
                .collect(),
        )
    }

    /// The value of a READY property, matched case-insensitively as libzmq does.
    pub fn property(&self, name: &str) -> Option<&Bytes> {
        match self {
            Command::Ready(props) => props
                .iter()
                .find(|p| p.name.eq_ignore_ascii_case(name.as_bytes()))
                .map(|p| &p.value),
            _ => None,
        }
    }

    /// `Socket-Type` of a READY (`DEALER`, `ROUTER`, ...).
    pub fn socket_type(&self) -> Option<&Bytes> {
        self.property("Socket-Type")
    }

    /// `Identity` of a READY (`ps9`; empty for a ROUTER or an anonymous DEALER).
    pub fn identity(&self) -> Option<&Bytes> {
        self.property("Identity")
    }

    /// The command body (name and data), without the frame header.
    pub fn encode_body(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let put_name = |out: &mut Vec<u8>, name: &[u8]| {
            out.push(
                u8::try_from(name.len()).expect("command and property names are at most 255 bytes"),
            );
            out.extend_from_slice(name);
        };
        match self {
            Command::Ready(props) => {
                put_name(&mut out, READY);
                for p in props {
                    put_name(&mut out, &p.name);
                    let len = u32::try_from(p.value.len()).expect("property value fits u32");
                    out.extend_from_slice(&len.to_be_bytes());
                    out.extend_from_slice(&p.value);
                }
            }
            Command::Error(reason) => {
                put_name(&mut out, ERROR);
                out.push(u8::try_from(reason.len()).unwrap_or(u8::MAX));
                out.extend_from_slice(&reason[..reason.len().min(255)]);
            }
            Command::Other { name, data } => {
                put_name(&mut out, name);
                out.extend_from_slice(data);
            }
        }
        out
    }

    /// The whole command frame, header included, as libzmq writes it.
    pub fn encode(&self) -> Vec<u8> {
        let body = self.encode_body();
        let mut out = Vec::with_capacity(body.len() + 9);
        FrameHeader::canonical(body.len() as u64, false, true).encode_into(&mut out);
        out.extend_from_slice(&body);
        out
    }
}

fn parse_name(input: &[u8]) -> IResult<&[u8], &[u8], ZmtpError> {
    let (input, len) = be_u8(input)?;
    take(len).parse(input)
}

/// Parses a command body (the bytes after a COMMAND frame header), zero-copy.
pub fn parse_command(body: &Bytes) -> Result<Command, ZmtpError> {
    let (data, name) =
        parse_name(body).map_err(|_| ZmtpError::MalformedCommand("name cut short"))?;
    if name.is_empty() {
        return Err(ZmtpError::MalformedCommand("empty name"));
    }
    let name = body.slice_ref(name);
    let data_bytes = body.slice_ref(data);
    if name.eq_ignore_ascii_case(READY) {
        return parse_properties(body, data).map(Command::Ready);
    }
    if name.eq_ignore_ascii_case(ERROR) {
        let (_, reason) =
            parse_name(data).map_err(|_| ZmtpError::MalformedCommand("ERROR reason cut short"))?;
        return Ok(Command::Error(body.slice_ref(reason)));
    }
    Ok(Command::Other {
        name,
        data: data_bytes,
    })
}

fn parse_properties(body: &Bytes, mut input: &[u8]) -> Result<Vec<Property>, ZmtpError> {
    let mut props = Vec::new();
    while !input.is_empty() {
        let (rest, name) =
            parse_name(input).map_err(|_| ZmtpError::MalformedProperty("name cut short"))?;
        if name.is_empty() {
            return Err(ZmtpError::MalformedProperty("empty name"));
        }
        let (rest, len) = be_u32::<_, ZmtpError>(rest)
            .map_err(|_| ZmtpError::MalformedProperty("value length cut short"))?;
        // `take` checks the length against what is there; nothing is allocated.
        let (rest, value) = take::<_, _, ZmtpError>(len)
            .parse(rest)
            .map_err(|_| ZmtpError::MalformedProperty("value runs past the command"))?;
        props.push(Property {
            name: body.slice_ref(name),
            value: body.slice_ref(value),
        });
        input = rest;
    }
    Ok(props)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEALER_PS9: &[u8] =
        b"\x05READY\x0bSocket-Type\x00\x00\x00\x06DEALER\x08Identity\x00\x00\x00\x03ps9";

    #[test]
    fn ready_from_the_capture() {
        let cmd = parse_command(&Bytes::from_static(DEALER_PS9)).unwrap();
        assert_eq!(cmd.socket_type().unwrap(), &b"DEALER"[..]);
        assert_eq!(cmd.identity().unwrap(), &b"ps9"[..]);
        assert_eq!(cmd.encode_body(), DEALER_PS9);
        assert_eq!(&cmd.encode()[..2], &[0x04, 0x2c]);
    }

    #[test]
    fn malformed_property_is_a_typed_error() {
        let mut bad = DEALER_PS9.to_vec();
        bad.truncate(bad.len() - 1);
        assert_eq!(
            parse_command(&Bytes::from(bad)),
            Err(ZmtpError::MalformedProperty("value runs past the command"))
        );
        let huge = b"\x05READY\x08Identity\xff\xff\xff\xffps9";
        assert_eq!(
            parse_command(&Bytes::from_static(huge)),
            Err(ZmtpError::MalformedProperty("value runs past the command"))
        );
        assert_eq!(
            parse_command(&Bytes::from_static(b"\x05READY\x00")),
            Err(ZmtpError::MalformedProperty("empty name"))
        );
    }

    #[test]
    fn unknown_commands_are_kept() {
        let cmd = parse_command(&Bytes::from_static(b"\x04PING\x00\x01xy")).unwrap();
        assert_eq!(
            cmd,
            Command::Other {
                name: Bytes::from_static(b"PING"),
                data: Bytes::from_static(b"\x00\x01xy")
            }
        );
        assert_eq!(cmd.encode_body(), b"\x04PING\x00\x01xy");
    }
}
