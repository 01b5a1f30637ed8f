//! ps-lite's wire message: a protobuf `PBMeta` frame followed by data frames
//! (PROTOCOL.md §3-5).

mod error;
mod message;
mod meta;
mod protobuf;

pub use error::{MetaError, PsError};
pub use message::{MessageKind, PsMessage, MAX_DATA_FRAMES};
pub use meta::{
    parse_meta, Control, ControlCommand, DataType, Meta, Node, Role, K_EMPTY, MAX_NODES,
    MAX_UNKNOWN_FIELDS,
};
