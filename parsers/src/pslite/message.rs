//! The ps-lite message view: a decoded meta over the frames of one ZMTP message.

use bytes::Bytes;

use super::meta::{parse_meta, ControlCommand, Meta};
use super::PsError;
use crate::zmtp::{Frame, ZmtpMessage};

/// Most data frames accepted in one message (ps-lite sends at most three).
pub const MAX_DATA_FRAMES: usize = 16;

/// What a ps-lite message is, from its meta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// A control message (ADD_NODE, BARRIER, ...).
    Control(ControlCommand),
    /// A SimpleApp command (MXNet: set optimizer, sync mode, ...); `head` is the command.
    Command {
        /// Request (true) or its echo (false).
        request: bool,
        /// MXNet's command type.
        head: i32,
    },
    /// Key-value data.
    Data {
        /// Request (true) or response (false).
        request: bool,
        /// The request pushes values (responses echo it).
        push: bool,
        /// The request wants values back (responses echo it).
        pull: bool,
    },
}

/// A ps-lite message: meta plus data frames, zero-copy over the received bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsMessage {
    /// The decoded meta.
    pub meta: Meta,
    /// The meta frame as received: forwarding sends these bytes, never a re-encoding.
    pub meta_frame: Frame,
    /// Data frames (keys, vals, lens for MXNet).
    pub data: Vec<Frame>,
}

impl PsMessage {
    /// Reads a ZMTP message as ps-lite. On failure the message is handed back
    /// untouched with the reason, so that it can still be forwarded as a fence.
    #[allow(clippy::result_large_err)]
    pub fn from_zmtp(msg: ZmtpMessage) -> Result<PsMessage, (PsError, ZmtpMessage)> {
        match Self::check(&msg) {
            Ok(meta) => {
                let mut frames = msg.frames.into_iter();
                let meta_frame = frames.next().expect("checked non-empty");
                Ok(PsMessage {
                    meta,
                    meta_frame,
                    data: frames.collect(),
                })
            }
            Err(e) => Err((e, msg)),
        }
    }

    fn check(msg: &ZmtpMessage) -> Result<Meta, PsError> {
        let first = msg.frames.first().ok_or(PsError::Empty)?;
        let meta = parse_meta(&first.body)?;
        let found = msg.frames.len() - 1;
        if meta.data_type.len() != found {
            return Err(PsError::DataFrameCount {
                declared: meta.data_type.len(),
                found,
            });
        }
        for (index, (frame, ty)) in msg.frames[1..].iter().zip(meta.data_types()).enumerate() {
            if let Some(elem_size) = ty.elem_size() {
                if frame.body.len() % elem_size != 0 {
                    return Err(PsError::Ragged {
                        index,
                        len: frame.body.len(),
                        elem_size,
                    });
                }
            }
        }
        Ok(meta)
    }

    /// A message with a freshly encoded meta (libzmq's header forms).
    pub fn new(meta: Meta, data: Vec<Bytes>) -> PsMessage {
        let meta_frame = Frame::new(Bytes::from(meta.encode()));
        PsMessage {
            meta,
            meta_frame,
            data: data.into_iter().map(Frame::new).collect(),
        }
    }

    /// The ZMTP message to send: the meta frame as received and the data frames.
    pub fn to_zmtp(&self) -> ZmtpMessage {
        let mut frames = Vec::with_capacity(1 + self.data.len());
        frames.push(self.meta_frame.clone());
        frames.extend(self.data.iter().cloned());
        ZmtpMessage { frames }
    }

    /// What kind of message this is.
    pub fn kind(&self) -> MessageKind {
        let m = &self.meta;
        if let Some(control) = m.control_message() {
            MessageKind::Control(control.command())
        } else if m.is_simple_app() {
            MessageKind::Command {
                request: m.is_request(),
                head: m.head(),
            }
        } else {
            MessageKind::Data {
                request: m.is_request(),
                push: m.is_push(),
                pull: m.is_pull(),
            }
        }
    }

    /// The keys frame (u64 LE), for data messages that have one.
    pub fn keys(&self) -> Option<impl ExactSizeIterator<Item = u64> + '_> {
        let frame = self.data.first()?;
        Some(
            frame
                .body
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
        )
    }

    /// The vals frame (raw element bytes).
    pub fn vals(&self) -> Option<&Bytes> {
        self.data.get(1).map(|f| &f.body)
    }

    /// The lens frame (i32 LE), for messages that have one.
    pub fn lens(&self) -> Option<impl ExactSizeIterator<Item = i32> + '_> {
        let frame = self.data.get(2)?;
        Some(
            frame
                .body
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes"))),
        )
    }

    /// Bytes of the message on the wire.
    pub fn wire_len(&self) -> usize {
        self.to_zmtp().encoded_len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pslite::MetaError;

    #[test]
    fn not_pslite_is_handed_back() {
        let msg = ZmtpMessage::from_bodies([Bytes::from_static(b"\xff\xff")]);
        let (err, back) = PsMessage::from_zmtp(msg.clone()).unwrap_err();
        assert_eq!(err, PsError::Meta(MetaError::TruncatedVarint));
        assert_eq!(back, msg);
    }

    #[test]
    fn frame_count_must_match_data_type() {
        let meta = Meta {
            data_type: vec![8, 11, 3],
            ..Meta::default()
        };
        let msg =
            ZmtpMessage::from_bodies([Bytes::from(meta.encode()), Bytes::from_static(&[0; 8])]);
        assert_eq!(
            PsMessage::from_zmtp(msg).unwrap_err().0,
            PsError::DataFrameCount {
                declared: 3,
                found: 1
            }
        );
    }

    #[test]
    fn ragged_keys_frame_is_refused() {
        let meta = Meta {
            data_type: vec![8, 11],
            ..Meta::default()
        };
        let msg = ZmtpMessage::from_bodies([
            Bytes::from(meta.encode()),
            Bytes::from_static(&[0; 7]),
            Bytes::new(),
        ]);
        assert_eq!(
            PsMessage::from_zmtp(msg).unwrap_err().0,
            PsError::Ragged {
                index: 0,
                len: 7,
                elem_size: 8
            }
        );
    }
}
