/// Why a frame is not a valid protobuf `PBMeta` (or `PBControl`, `PBNode`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    /// A varint runs past the end of its message.
    #[error("truncated varint")]
    TruncatedVarint,
    /// A varint longer than 10 bytes.
    #[error("varint longer than 10 bytes")]
    OverlongVarint,
    /// A length-delimited or fixed-width field runs past the end of its message.
    #[error("field {field} runs past the end of its message")]
    Truncated {
        /// Field number.
        field: u32,
    },
    /// A known field carries the wrong wire type.
    #[error("field {field} of {message} has wire type {wire_type}")]
    WireType {
        /// Message name.
        message: &'static str,
        /// Field number.
        field: u32,
        /// Wire type found.
        wire_type: u8,
    },
    /// Field number 0, or a wire type protobuf does not define (6, 7) or
    /// ps-lite never uses (groups).
    #[error("invalid field key {0:#x}")]
    BadKey(u64),
    /// A known non-repeated field appears twice; ps-lite never does that, and
    /// merge rules could make us read it differently from the peer.
    #[error("field {field} of {message} appears twice")]
    DuplicateField {
        /// Message name.
        message: &'static str,
        /// Field number.
        field: u32,
    },
    /// More repeated entries than the limit.
    #[error("more than {max} {what}")]
    TooMany {
        /// What was counted.
        what: &'static str,
        /// The limit in force.
        max: usize,
    },
}

/// Why a ZMTP message is not a ps-lite message. The message may still be
/// forwarded unchanged as a fence (DESIGN.md §4).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PsError {
    /// The message has no frames.
    #[error("empty message")]
    Empty,
    /// The first frame is not a valid `PBMeta`.
    #[error("first frame is not a PBMeta: {0}")]
    Meta(#[from] MetaError),
    /// The number of data frames differs from the `data_type` list.
    #[error("meta declares {declared} data frames, message has {found}")]
    DataFrameCount {
        /// Entries in `data_type`.
        declared: usize,
        /// Data frames present.
        found: usize,
    },
    /// A typed data frame whose length is not a multiple of its element size.
    #[error(
        "data frame {index} of {len} bytes is not a whole number of {elem_size}-byte elements"
    )]
    Ragged {
        /// Data frame index (0 = keys).
        index: usize,
        /// Frame length.
        len: usize,
        /// Element size.
        elem_size: usize,
    },
}
