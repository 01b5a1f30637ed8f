//! Pure parsers and encoders for the bytes MXNet 1.9.1 puts on the wire: ZMTP 3.x
//! (greeting, commands, frames) and ps-lite (`PBMeta` and its data frames), with
//! MXNet's views on top (command types, data types, server key ranges).
//!
//! Nothing here does IO or reads a clock. Stream-level parsers use nom's
//! `streaming` style: short input is `Incomplete`, never an error, so the IO layer
//! can feed bytes as they arrive. Every length read from the wire is checked
//! against a named limit before it is trusted. Message views are zero-copy over
//! [`bytes::Bytes`].
//!
//! Layout: [`zmtp`] for the ZMTP layer, [`pslite`] for the protobuf meta and the
//! ps-lite message, [`mxnet`] for what MXNet's kvstore means by those fields,
//! [`pickle`] for the optimizer a `kController` command carries (read, never executed).

#![forbid(unsafe_code)]
#![warn(rust_2018_idioms, unreachable_pub, missing_docs)]

pub mod invariants;
pub mod mxnet;
pub mod pickle;
pub mod pslite;
pub mod zmtp;

pub use pslite::{Control, ControlCommand, Meta, Node, PsError, PsMessage, Role};
pub use zmtp::{
    Command, Frame, FrameHeader, Greeting, Limits, StreamDecoder, StreamEvent, ZmtpError,
    ZmtpMessage,
};
