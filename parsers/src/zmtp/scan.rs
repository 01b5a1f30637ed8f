//! The one frame scanner: walks a unit's frame headers over its bytes, whether they
//! sit in one buffer (the stream decoder) or in pieces (a message reassembled from
//! tunnel slices, or one still arriving), and checks every header against the limits
//! as soon as it is read, before the bytes its length claims have arrived (STYLE.md
//! 2 and 3: parse headers, move bodies; bound every length first).

use bytes::Bytes;

use super::{parse_frame_header, FrameHeader, Limits, ZmtpError};

/// Bytes a scan reads from, in order.
pub trait ByteSource {
    /// Bytes available now.
    fn len(&self) -> u64;
    /// Whether nothing is available.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies the bytes from `off` into `out` (as many as there are); returns how many.
    fn copy_at(&self, off: u64, out: &mut [u8]) -> usize;
}

impl ByteSource for [u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }

    fn copy_at(&self, off: u64, out: &mut [u8]) -> usize {
        let Some(rest) = usize::try_from(off).ok().and_then(|o| self.get(o..)) else {
            return 0;
        };
        let n = rest.len().min(out.len());
        out[..n].copy_from_slice(&rest[..n]);
        n
    }
}

impl ByteSource for [Bytes] {
    fn len(&self) -> u64 {
        self.iter().map(|p| p.len() as u64).sum()
    }

    fn copy_at(&self, mut off: u64, out: &mut [u8]) -> usize {
        let mut n = 0;
        for p in self {
            let len = p.len() as u64;
            if off >= len {
                off -= len;
                continue;
            }
            let take = (out.len() - n).min(p.len() - off as usize);
            out[n..n + take].copy_from_slice(&p[off as usize..off as usize + take]);
            n += take;
            off = 0;
            if n == out.len() {
                break;
            }
        }
        n
    }
}

/// One frame found by a scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSpan {
    /// Its header.
    pub header: FrameHeader,
    /// Where its body starts, from the unit's first byte.
    pub body: u64,
}

impl FrameSpan {
    /// Where its body ends (the next frame's header starts).
    pub fn end(&self) -> u64 {
        self.body + self.header.size
    }
}

/// Walks one unit's frames from its first byte: a command frame alone, or the frames
/// of a multipart message up to the one without MORE.
#[derive(Debug, Clone)]
pub struct FrameScanner {
    limits: Limits,
    /// Where the next header starts.
    pos: u64,
    /// Message frames returned so far.
    frames: usize,
    /// Their body bytes.
    total: u64,
    /// The unit's last frame was returned.
    done: bool,
}

/// Longest frame header (flags, 8-byte size).
const MAX_HEADER_LEN: usize = 9;

impl FrameScanner {
    /// A scan from the first byte of a unit.
    pub fn new(limits: &Limits) -> FrameScanner {
        FrameScanner {
            limits: *limits,
            pos: 0,
            frames: 0,
            total: 0,
            done: false,
        }
    }

    /// The next frame's header, once its header bytes are in `src` (`Ok(None)`: more
    /// bytes needed; call again with more). The body may still be arriving: compare
    /// [`FrameSpan::end`] with what `src` holds. An error as soon as the header is
    /// invalid or its length breaks a limit; `Ok(None)` for good once the unit's last
    /// frame was returned ([`Self::is_done`]).
    pub fn next_frame<S: ByteSource + ?Sized>(
        &mut self,
        src: &S,
    ) -> Result<Option<FrameSpan>, ZmtpError> {
        if self.done {
            return Ok(None);
        }
        let mut head = [0u8; MAX_HEADER_LEN];
        let n = src.copy_at(self.pos, &mut head);
        // Each kind of frame has its own bound, checked just below.
        let header = match parse_frame_header(&head[..n], u64::MAX) {
            Ok((_, header)) => header,
            Err(nom::Err::Incomplete(_)) => return Ok(None),
            Err(nom::Err::Error(e) | nom::Err::Failure(e)) => return Err(e),
        };
        if header.command {
            if self.frames > 0 {
                return Err(ZmtpError::Unexpected(
                    "command frame inside a multipart message",
                ));
            }
            if header.size > self.limits.max_command_len {
                return Err(ZmtpError::TooLarge {
                    what: "command frame",
                    len: header.size,
                    max: self.limits.max_command_len,
                });
            }
        } else {
            if header.size > self.limits.max_frame_len {
                return Err(ZmtpError::TooLarge {
                    what: "frame",
                    len: header.size,
                    max: self.limits.max_frame_len,
                });
            }
            if self.frames == self.limits.max_frames {
                return Err(ZmtpError::TooManyFrames {
                    max: self.limits.max_frames,
                });
            }
            self.total += header.size;
            if self.total > self.limits.max_message_len {
                return Err(ZmtpError::TooLarge {
                    what: "message",
                    len: self.total,
                    max: self.limits.max_message_len,
                });
            }
            self.frames += 1;
        }
        let body = self.pos + header.encoded_len() as u64;
        // Limits may be configured up to u64::MAX: a length past the address space
        // is too large whatever they say.
        self.pos = body.checked_add(header.size).ok_or(ZmtpError::TooLarge {
            what: "frame",
            len: header.size,
            max: u64::MAX - body,
        })?;
        let span = FrameSpan { header, body };
        self.done = header.command || !header.more;
        Ok(Some(span))
    }

    /// The unit's first `n` bytes are gone from the bytes it reads (a body that went
    /// by outside them): positions count from what follows. `n` is at most
    /// [`Self::offset`].
    pub fn rebase(&mut self, n: u64) {
        self.pos -= n.min(self.pos);
    }

    /// The unit's last frame was returned.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Where the frames returned so far end: the unit's length once [`Self::is_done`].
    pub fn offset(&self) -> u64 {
        self.pos
    }
}

/// Copies bytes `off..off + n` of `src` (fewer if it ends first).
pub fn copy_range<S: ByteSource + ?Sized>(src: &S, off: u64, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    let got = src.copy_at(off, &mut out);
    out.truncate(got);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zmtp::{Command, ZmtpMessage};

    fn frames<S: ByteSource + ?Sized>(
        src: &S,
        limits: &Limits,
    ) -> Result<Vec<FrameSpan>, ZmtpError> {
        let mut scan = FrameScanner::new(limits);
        let mut out = Vec::new();
        while let Some(f) = scan.next_frame(src)? {
            out.push(f);
        }
        Ok(out)
    }

    #[test]
    fn one_buffer_and_pieces_cut_anywhere_give_the_same_frames() {
        let msg = ZmtpMessage::from_bodies([
            Bytes::from_static(b"meta"),
            Bytes::from(vec![7u8; 300]),
            Bytes::new(),
        ]);
        let wire = msg.encode();
        let whole = frames(&wire[..], &Limits::default()).unwrap();
        assert_eq!(
            whole
                .iter()
                .map(|f| (f.body, f.header.size))
                .collect::<Vec<_>>(),
            [(2, 4), (15, 300), (317, 0)]
        );
        assert_eq!(whole.last().unwrap().end(), wire.len() as u64);
        for cut in 1..wire.len() {
            let pieces = [
                Bytes::copy_from_slice(&wire[..cut]),
                Bytes::copy_from_slice(&wire[cut..]),
            ];
            assert_eq!(
                frames(&pieces[..], &Limits::default()).unwrap(),
                whole,
                "cut {cut}"
            );
        }
    }

    #[test]
    fn a_header_not_yet_in_asks_for_more_and_the_scan_resumes() {
        let wire =
            ZmtpMessage::from_bodies([Bytes::from_static(b"a"), Bytes::from(vec![1u8; 400])])
                .encode();
        let mut scan = FrameScanner::new(&Limits::default());
        assert_eq!(scan.next_frame(&wire[..0]).unwrap(), None);
        let first = scan.next_frame(&wire[..3]).unwrap().unwrap();
        assert_eq!((first.body, first.end()), (2, 3));
        // The long header of the second frame is 9 bytes: 8 of them are not enough.
        assert_eq!(scan.next_frame(&wire[..3 + 8]).unwrap(), None);
        let second = scan.next_frame(&wire[..3 + 9]).unwrap().unwrap();
        assert_eq!((second.body, second.header.size), (12, 400));
        assert!(scan.is_done());
        assert_eq!(scan.offset(), wire.len() as u64);
        assert_eq!(scan.next_frame(&wire[..]).unwrap(), None, "done for good");
    }

    #[test]
    fn each_limit_is_checked_from_the_header_alone() {
        let limits = Limits {
            max_frame_len: 100,
            max_message_len: 150,
            max_frames: 2,
            max_command_len: 10,
        };
        let header = |size: u64, more: bool, command: bool| {
            let mut b = Vec::new();
            FrameHeader::canonical(size, more, command).encode_into(&mut b);
            b
        };
        let err = |wire: Vec<u8>| frames(&wire[..], &limits).unwrap_err();
        assert!(matches!(
            err(header(101, false, false)),
            ZmtpError::TooLarge { what: "frame", .. }
        ));
        assert!(matches!(
            err(header(11, false, true)),
            ZmtpError::TooLarge {
                what: "command frame",
                ..
            }
        ));
        let mut two = header(100, true, false);
        two.extend(vec![0u8; 100]);
        two.extend(header(60, false, false));
        assert!(matches!(
            err(two),
            ZmtpError::TooLarge {
                what: "message",
                ..
            }
        ));
        let mut three = Vec::new();
        for _ in 0..3 {
            three.extend(header(0, true, false));
        }
        assert!(matches!(err(three), ZmtpError::TooManyFrames { max: 2 }));
        let mut inside = header(0, true, false);
        inside.extend(header(0, false, true));
        assert!(matches!(err(inside), ZmtpError::Unexpected(_)));
        assert_eq!(err(vec![0x80, 0]), ZmtpError::ReservedFlags(0x80));
        // A command is a unit of its own.
        let ready = Command::ready(&[("Socket-Type", b"DEALER")]).encode();
        let limits = Limits::default();
        let spans = frames(&ready[..], &limits).unwrap();
        assert_eq!(spans.len(), 1);
        assert!(spans[0].header.command);
    }

    #[test]
    fn copy_range_reads_across_pieces_and_stops_at_the_end() {
        let pieces = [
            Bytes::from_static(b"abc"),
            Bytes::new(),
            Bytes::from_static(b"defg"),
        ];
        assert_eq!(copy_range(&pieces[..], 2, 3), b"cde");
        assert_eq!(copy_range(&pieces[..], 5, 9), b"fg");
        assert_eq!(copy_range(&pieces[..], 9, 2), b"");
        assert_eq!(copy_range(&b"xyz"[..], 1, 5), b"yz");
    }
}
