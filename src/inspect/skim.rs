//! ZMTP traffic frames skimmed with bounded memory: small frames (a ps-lite meta, its
//! keys and lens) are kept whole, large ones (the values) are only measured, so that a
//! 40 MB push costs the analyzer a few bytes.

use bytes::{Bytes, BytesMut};

use p3proxy_parsers::zmtp::{parse_frame_header, ZmtpError, FLAG_LONG};

/// Frames up to this size are kept whole.
pub const KEEP_FRAME_BYTES: u64 = 64 * 1024;
/// Largest frame accepted (libzmq's own limit is the peer's choice; ps-lite values
/// stay far below).
pub const MAX_FRAME_BYTES: u64 = 1 << 40;

/// One frame of a skimmed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkimFrame {
    /// Its body.
    Kept(Bytes),
    /// Only its length.
    Measured(u64),
}

impl SkimFrame {
    /// Body length.
    pub fn body_len(&self) -> u64 {
        match self {
            SkimFrame::Kept(b) => b.len() as u64,
            SkimFrame::Measured(n) => *n,
        }
    }

    /// The body, if kept.
    pub fn body(&self) -> Option<&Bytes> {
        match self {
            SkimFrame::Kept(b) => Some(b),
            SkimFrame::Measured(_) => None,
        }
    }
}

/// A message, skimmed.
#[derive(Debug, Clone, PartialEq)]
pub struct SkimmedMessage {
    /// Its frames.
    pub frames: Vec<SkimFrame>,
    /// Bytes on the wire, headers included.
    pub wire_bytes: u64,
    /// When its first byte was seen.
    pub first_ts: f64,
    /// When its last byte was seen.
    pub last_ts: f64,
}

#[derive(Debug)]
struct Current {
    size: u64,
    left: u64,
    keep: Option<BytesMut>,
    more: bool,
    command: bool,
}

/// Skims one direction of ZMTP traffic after its handshake (or the messages a tunnel's
/// slices carry, which are the same bytes).
#[derive(Debug, Default)]
pub struct Skimmer {
    header: Vec<u8>,
    current: Option<Current>,
    frames: Vec<SkimFrame>,
    wire_bytes: u64,
    first_ts: Option<f64>,
    failed: bool,
}

impl Skimmer {
    /// Feeds bytes seen at `ts`; complete messages are appended to `out`. After an error
    /// the stream cannot be followed any more (every later call fails the same way).
    pub fn push(
        &mut self,
        mut input: &[u8],
        ts: f64,
        out: &mut Vec<SkimmedMessage>,
    ) -> Result<(), ZmtpError> {
        if self.failed {
            return Err(ZmtpError::Unexpected("use of a failed stream"));
        }
        while !input.is_empty() {
            if self.first_ts.is_none() {
                self.first_ts = Some(ts);
            }
            let Some(cur) = &mut self.current else {
                // A header: 2 bytes, or 9 with the long flag.
                if self.header.is_empty() {
                    self.header.push(input[0]);
                    input = &input[1..];
                }
                let want = if self.header[0] & FLAG_LONG != 0 {
                    9
                } else {
                    2
                };
                let n = (want - self.header.len()).min(input.len());
                self.header.extend_from_slice(&input[..n]);
                input = &input[n..];
                if self.header.len() < want {
                    break;
                }
                let (_, h) = match parse_frame_header(&self.header, MAX_FRAME_BYTES) {
                    Ok(x) => x,
                    Err(nom::Err::Error(e) | nom::Err::Failure(e)) => {
                        self.failed = true;
                        return Err(e);
                    }
                    Err(nom::Err::Incomplete(_)) => unreachable!("whole header present"),
                };
                self.wire_bytes += want as u64;
                self.header.clear();
                self.current = Some(Current {
                    size: h.size,
                    left: h.size,
                    keep: (h.size <= KEEP_FRAME_BYTES && !h.command)
                        .then(|| BytesMut::with_capacity(h.size as usize)),
                    more: h.more,
                    command: h.command,
                });
                if h.size == 0 {
                    self.finish_frame(ts, out);
                }
                continue;
            };
            let n = (cur.left.min(input.len() as u64)) as usize;
            if let Some(k) = &mut cur.keep {
                k.extend_from_slice(&input[..n]);
            }
            cur.left -= n as u64;
            self.wire_bytes += n as u64;
            input = &input[n..];
            if cur.left == 0 {
                self.finish_frame(ts, out);
            }
        }
        Ok(())
    }

    fn finish_frame(&mut self, ts: f64, out: &mut Vec<SkimmedMessage>) {
        let cur = self.current.take().expect("a frame in progress");
        if cur.command {
            // A command (a heartbeat, say) between messages is not traffic.
            if self.frames.is_empty() {
                self.first_ts = None;
                self.wire_bytes = 0;
            }
            return;
        }
        self.frames.push(match cur.keep {
            Some(k) => SkimFrame::Kept(k.freeze()),
            None => SkimFrame::Measured(cur.size),
        });
        if !cur.more {
            out.push(SkimmedMessage {
                frames: std::mem::take(&mut self.frames),
                wire_bytes: std::mem::take(&mut self.wire_bytes),
                first_ts: self.first_ts.take().unwrap_or(ts),
                last_ts: ts,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p3proxy_parsers::zmtp::{Command, ZmtpMessage};

    fn wire(bodies: &[&[u8]]) -> Vec<u8> {
        let m = ZmtpMessage::from_bodies(bodies.iter().map(|b| Bytes::copy_from_slice(b)));
        let mut out = Vec::new();
        m.encode_into(&mut out);
        out
    }

    #[test]
    fn any_split_gives_the_same_messages_small_frames_kept_large_measured() {
        let big = vec![7u8; KEEP_FRAME_BYTES as usize + 1];
        let mut bytes = wire(&[b"meta", b"", &big]);
        bytes.extend(Command::ready(&[("Socket-Type", b"DEALER")]).encode()); // skipped
        bytes.extend(wire(&[b"second"]));
        for chunk in [1, 2, 3, 9, 100, bytes.len()] {
            let mut s = Skimmer::default();
            let mut out = Vec::new();
            for (i, c) in bytes.chunks(chunk).enumerate() {
                s.push(c, i as f64, &mut out).unwrap();
            }
            assert_eq!(out.len(), 2, "chunk {chunk}");
            assert_eq!(
                out[0].frames,
                vec![
                    SkimFrame::Kept(Bytes::from_static(b"meta")),
                    SkimFrame::Kept(Bytes::new()),
                    SkimFrame::Measured(big.len() as u64)
                ]
            );
            assert_eq!(out[0].wire_bytes, 2 + 4 + 2 + 9 + big.len() as u64);
            assert_eq!(
                out[1].frames,
                vec![SkimFrame::Kept(Bytes::from_static(b"second"))]
            );
            assert_eq!(
                out[1].wire_bytes, 8,
                "the command between them is not counted"
            );
            assert!(out[0].first_ts == 0.0 && out[0].last_ts <= out[1].first_ts);
        }
    }

    #[test]
    fn a_bad_header_fails_the_stream_for_good() {
        let mut s = Skimmer::default();
        let mut out = Vec::new();
        assert!(
            s.push(&[0x80, 1, 2], 0.0, &mut out).is_err(),
            "reserved flag"
        );
        assert!(s.push(&wire(&[b"x"]), 0.0, &mut out).is_err());
        let mut s = Skimmer::default();
        let mut huge = vec![0x02];
        huge.extend(u64::MAX.to_be_bytes());
        assert!(s.push(&huge, 0.0, &mut out).is_err(), "a length near 2^64");
        assert!(out.is_empty());
    }
}
