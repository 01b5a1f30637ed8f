//! ZMTP 3.x as libzmq 4.2.2 speaks it (PROTOCOL.md §2).
//!
//! Each TCP direction is a 64-byte greeting, then frames. A frame is either a
//! command (READY, ERROR, ...) or one part of a multipart message.

mod command;
mod decoder;
mod error;
mod frame;
mod greeting;
mod message;
mod scan;

pub use command::{parse_command, Command, Property, ERROR, READY};
pub use decoder::{Pass, StreamDecoder, StreamEvent};
pub use error::ZmtpError;
pub use frame::{parse_frame_header, FrameHeader, FLAG_COMMAND, FLAG_LONG, FLAG_MORE};
pub use greeting::{
    parse_greeting, parse_greeting_prefix, Greeting, GreetingProgress, Mechanism, GREETING_LEN,
    MAJOR_END, SIGNATURE_LEN,
};
pub(crate) use message::scan_unit;
pub use message::{
    parse_unit, Frame, Limits, Unit, ZmtpMessage, DEFAULT_MAX_COMMAND_LEN, DEFAULT_MAX_FRAMES,
    DEFAULT_MAX_FRAME_LEN, DEFAULT_MAX_MESSAGE_LEN,
};
pub use scan::{copy_range, ByteSource, FrameScanner, FrameSpan};
