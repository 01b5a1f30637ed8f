//! Whole ZMTP units (a command, or a multipart message) cut zero-copy out of a
//! receive buffer, with every length bounded by [`Limits`].

use bytes::Bytes;

use super::{parse_command, Command, FrameHeader, FrameScanner, ZmtpError};

/// Default bound on one frame: ps-lite describes a value array by an i32 byte
/// count, so no real frame is larger.
pub const DEFAULT_MAX_FRAME_LEN: u64 = i32::MAX as u64;
/// Default bound on one message (all frames).
pub const DEFAULT_MAX_MESSAGE_LEN: u64 = 1 << 32;
/// Default bound on the frames of one message: ps-lite sends a meta and at most
/// three data frames.
pub const DEFAULT_MAX_FRAMES: usize = 64;
/// Default bound on a command body (READY is ~44 bytes).
pub const DEFAULT_MAX_COMMAND_LEN: u64 = 64 * 1024;

/// Bounds applied to every length read from the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame body accepted.
    pub max_frame_len: u64,
    /// Largest message (sum of frame bodies) accepted.
    pub max_message_len: u64,
    /// Most frames in one message (an endless MORE chain is cut here).
    pub max_frames: usize,
    /// Largest command body accepted.
    pub max_command_len: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            max_message_len: DEFAULT_MAX_MESSAGE_LEN,
            max_frames: DEFAULT_MAX_FRAMES,
            max_command_len: DEFAULT_MAX_COMMAND_LEN,
        }
    }
}

/// One frame of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The size went out in the 8-byte form; kept for exact re-encoding.
    pub long: bool,
    /// Frame body, a view into the receive buffer.
    pub body: Bytes,
}

impl Frame {
    /// A frame with the header form libzmq would choose.
    pub fn new(body: Bytes) -> Frame {
        Frame {
            long: body.len() > 255,
            body,
        }
    }
}

/// A multipart ZMTP message: MORE set on every frame but the last.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ZmtpMessage {
    /// Frames in order; never empty once parsed.
    pub frames: Vec<Frame>,
}

impl ZmtpMessage {
    /// A message of the given frame bodies, with libzmq's header forms.
    pub fn from_bodies(bodies: impl IntoIterator<Item = Bytes>) -> ZmtpMessage {
        ZmtpMessage {
            frames: bodies.into_iter().map(Frame::new).collect(),
        }
    }

    /// Bytes on the wire, headers included.
    pub fn encoded_len(&self) -> usize {
        self.frames
            .iter()
            .map(|f| if f.long { 9 } else { 2 } + f.body.len())
            .sum()
    }

    /// The header of frame `i`: MORE on every frame but the last, its own size form.
    fn frame_header(&self, i: usize) -> FrameHeader {
        let frame = &self.frames[i];
        FrameHeader {
            more: i + 1 < self.frames.len(),
            command: false,
            long: frame.long,
            size: frame.body.len() as u64,
        }
    }

    /// Appends the frame headers and bodies to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        for (i, frame) in self.frames.iter().enumerate() {
            self.frame_header(i).encode_into(out);
            out.extend_from_slice(&frame.body);
        }
    }

    /// The whole wire encoding as zero-copy pieces (headers, then bodies as they are):
    /// what a writer sends without copying the bodies.
    pub fn wire_pieces(&self) -> Vec<Bytes> {
        self.wire_range(0, usize::MAX)
    }

    /// Bytes `offset..offset + len` of the message's wire encoding, as zero-copy
    /// pieces (frame headers are small fresh buffers, bodies are slices of the frames):
    /// what a slice of this message carries, ready for a vectored write.
    pub fn wire_range(&self, offset: usize, len: usize) -> Vec<Bytes> {
        let end = offset.saturating_add(len).min(self.encoded_len());
        let mut out = Vec::new();
        let mut pos = 0usize;
        for (i, frame) in self.frames.iter().enumerate() {
            if pos >= end {
                break;
            }
            let mut header = Vec::with_capacity(9);
            self.frame_header(i).encode_into(&mut header);
            for piece in [Bytes::from(header), frame.body.clone()] {
                let (start, stop) = (pos, pos + piece.len());
                pos = stop;
                let (a, b) = (offset.max(start), end.min(stop));
                if a < b {
                    out.push(piece.slice(a - start..b - start));
                }
            }
        }
        out
    }

    /// The wire bytes of the message.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }
}

/// What one step of the frame layer yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unit {
    /// A command frame.
    Command(Command),
    /// A complete multipart message.
    Message(ZmtpMessage),
}

/// Where the next complete unit lies in a buffer, found without copying it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scan {
    /// Body spans: one for a command, one per frame for a message.
    spans: Vec<BodySpan>,
    /// The unit is a command frame.
    command: bool,
    /// Bytes the unit takes, headers included.
    pub(crate) consumed: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BodySpan {
    start: usize,
    len: usize,
    long: bool,
}

impl Scan {
    /// Builds the unit from the buffer that was scanned (zero-copy slices of it).
    pub(crate) fn into_unit(self, buf: &Bytes) -> Result<Unit, ZmtpError> {
        let slice = |s: &BodySpan| buf.slice(s.start..s.start + s.len);
        if self.command {
            return parse_command(&slice(&self.spans[0])).map(Unit::Command);
        }
        let frames = self
            .spans
            .iter()
            .map(|s| Frame {
                long: s.long,
                body: slice(s),
            })
            .collect();
        Ok(Unit::Message(ZmtpMessage { frames }))
    }
}

/// Finds the next complete unit at the front of `buf`: `Ok(None)` when more bytes
/// are needed, an error as soon as a header is invalid or a length breaks a limit
/// (before the bytes it claims have arrived).
pub(crate) fn scan_unit(buf: &[u8], limits: &Limits) -> Result<Option<Scan>, ZmtpError> {
    let mut scan = FrameScanner::new(limits);
    let mut spans = Vec::new();
    while let Some(frame) = scan.next_frame(buf)? {
        if (buf.len() as u64) < frame.end() {
            return Ok(None);
        }
        // Inside `buf`, so the offsets fit in usize.
        spans.push(BodySpan {
            start: frame.body as usize,
            len: frame.header.size as usize,
            long: frame.header.long,
        });
        if scan.is_done() {
            return Ok(Some(Scan {
                spans,
                command: frame.header.command,
                consumed: scan.offset() as usize,
            }));
        }
    }
    Ok(None)
}

/// Cuts the next complete unit off the front of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, `Ok(Some((unit, consumed)))`
/// when a whole unit is in (its frames are zero-copy slices of `buf`), or an error
/// as soon as a header is invalid or a length breaks a limit (before the bytes it
/// claims have arrived).
pub fn parse_unit(buf: &Bytes, limits: &Limits) -> Result<Option<(Unit, usize)>, ZmtpError> {
    match scan_unit(buf, limits)? {
        None => Ok(None),
        Some(scan) => {
            let consumed = scan.consumed;
            Ok(Some((scan.into_unit(buf)?, consumed)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trip_and_every_prefix_is_incomplete() {
        let msg = ZmtpMessage::from_bodies([
            Bytes::from_static(b"meta"),
            Bytes::from(vec![7u8; 300]),
            Bytes::new(),
        ]);
        let wire = Bytes::from(msg.encode());
        assert_eq!(wire.len(), msg.encoded_len());
        for cut in 0..wire.len() {
            assert_eq!(
                parse_unit(&wire.slice(..cut), &Limits::default()),
                Ok(None),
                "cut {cut}"
            );
        }
        assert_eq!(
            parse_unit(&wire, &Limits::default()),
            Ok(Some((Unit::Message(msg), wire.len())))
        );
    }

    #[test]
    fn wire_ranges_cover_the_encoding_exactly() {
        let msg = ZmtpMessage::from_bodies([
            Bytes::from_static(b"meta"),
            Bytes::from(vec![7u8; 300]),
            Bytes::new(),
            Bytes::from_static(b"xyz"),
        ]);
        let wire = msg.encode();
        for step in [1, 2, 5, 9, 100, 1000] {
            let mut joined = Vec::new();
            let mut off = 0;
            while off < wire.len() {
                for piece in msg.wire_range(off, step) {
                    joined.extend_from_slice(&piece);
                }
                off += step;
            }
            assert_eq!(joined, wire, "slices of {step} bytes");
        }
        assert!(msg.wire_range(wire.len(), 10).is_empty());
    }

    #[test]
    fn endless_more_chain_is_cut() {
        let wire = Bytes::from([0x01u8, 0x00].repeat(100));
        let limits = Limits {
            max_frames: 8,
            ..Limits::default()
        };
        assert_eq!(
            parse_unit(&wire, &limits),
            Err(ZmtpError::TooManyFrames { max: 8 })
        );
    }

    #[test]
    fn message_limit_counts_all_frames() {
        let limits = Limits {
            max_message_len: 100,
            ..Limits::default()
        };
        let mut wire = vec![0x01, 60];
        wire.extend([0; 60]);
        wire.extend([0x00, 60]);
        assert_eq!(
            parse_unit(&Bytes::from(wire), &limits),
            Err(ZmtpError::TooLarge {
                what: "message",
                len: 120,
                max: 100
            })
        );
    }

    #[test]
    fn command_inside_a_message_is_an_error() {
        let wire = Bytes::from_static(&[0x01, 0x00, 0x04, 0x00]);
        assert_eq!(
            parse_unit(&wire, &Limits::default()),
            Err(ZmtpError::Unexpected(
                "command frame inside a multipart message"
            ))
        );
    }
}
