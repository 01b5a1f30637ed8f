//! A sans-IO decoder for one direction of a ZMTP connection: feed it bytes as
//! they arrive, take events out. It owns its buffer so that each message it
//! yields is a zero-copy view of the bytes received.

use bytes::{Buf, Bytes, BytesMut};

use super::greeting::{parse_greeting_prefix, GreetingProgress, GREETING_LEN};
use super::scan::{FrameScanner, FrameSpan};
use super::{scan_unit, Command, FrameHeader, Greeting, Limits, Unit, ZmtpError, ZmtpMessage};

/// Room a read gets at least: reads of a few bytes cost a syscall each.
const READ_CHUNK: usize = 64 * 1024;
/// Below this much room, a read first gets [`READ_CHUNK`].
const MIN_ROOM: usize = 16 * 1024;
/// Room enough for the frames after a big body (MXNet's lens: 13 bytes).
const TAIL_ROOM: usize = 512;
/// What is reserved ahead of the bytes a frame header announces, at most: a peer that
/// announces a huge frame and sends nothing does not get it mapped.
const MAX_AHEAD: usize = 64 << 20;

/// What the decoder found, in wire order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// The 10-byte signature is in: a peer may now send its major version byte.
    Signature,
    /// The major version byte is in: a peer may now send the rest of its greeting.
    Major(u8),
    /// The whole greeting.
    Greeting(Greeting),
    /// A command (the first one is READY under the NULL mechanism).
    Command(Command),
    /// A complete message.
    Message(ZmtpMessage),
    /// The end of a message whose body went by ([`StreamDecoder::take_pass`]): the
    /// wire bytes of its frames after that body (empty if the body was its last).
    Tail(Bytes),
}

/// A message's start whose frame body is still arriving, taken out of the decoder so
/// that the body can move from socket to socket without being copied in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pass {
    /// The bytes buffered so far: the message's first frames and the start of the body.
    pub head: Bytes,
    /// How many bytes of the body follow on the stream.
    pub body: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Inside the greeting; the last stage already reported.
    Greeting(u8),
    /// Greeting done, waiting for READY.
    Handshake,
    /// READY seen: messages flow.
    Traffic,
    /// A body taken by [`StreamDecoder::take_pass`] is going by, outside the decoder.
    Passing,
    /// After it: the message's remaining frames (the scan is in `tail`).
    Tail,
    /// An error was returned; the stream cannot be trusted any more.
    Failed,
}

/// Decodes one direction of a ZMTP 3 connection.
#[derive(Debug)]
pub struct StreamDecoder {
    buf: BytesMut,
    state: State,
    limits: Limits,
    /// `Passing` and `Tail`: the message's scan, positioned where the buffer starts.
    tail: Option<FrameScanner>,
}

impl StreamDecoder {
    /// A decoder at the start of a connection.
    pub fn new(limits: Limits) -> StreamDecoder {
        StreamDecoder {
            buf: BytesMut::new(),
            state: State::Greeting(0),
            limits,
            tail: None,
        }
    }

    /// A decoder for a stream that is already past its handshake: frames only
    /// (a tunnel between two proxies carries the frames of a terminated session).
    pub fn after_handshake(limits: Limits) -> StreamDecoder {
        StreamDecoder {
            buf: BytesMut::new(),
            state: State::Traffic,
            limits,
            tail: None,
        }
    }

    /// Takes back the bytes buffered but not yet decoded (to relay them opaquely).
    pub fn take_buffered(&mut self) -> BytesMut {
        self.buf.split()
    }

    /// The receive buffer with room for the next read (read into it, then call
    /// [`StreamDecoder::next_event`]). Once a frame's header is in, the room is the
    /// rest of that frame and a little more: its body lands in one allocation, in big
    /// reads, and the bytes already received are moved at most once, while they are a
    /// header and a read's worth, not the doubling of a growing message.
    pub fn buffer_for_read(&mut self) -> &mut BytesMut {
        let room = self.buf.capacity() - self.buf.len();
        let missing = self.missing_in_frame().min(MAX_AHEAD);
        if missing > room {
            // A fresh buffer with only the bytes still undecoded: `reserve` on a buffer
            // whose earlier messages are gone would grow the whole old allocation,
            // copying what was consumed too.
            let mut fresh = BytesMut::with_capacity(self.buf.len() + missing + MIN_ROOM);
            fresh.extend_from_slice(&self.buf);
            self.buf = fresh;
        } else if room < MIN_ROOM && !(self.buf.len() > READ_CHUNK && room >= TAIL_ROOM) {
            // Not for the tail of a big unit (the frames after its body, a few bytes)
            // while there is room for it: growing would copy the whole unit.
            self.buf.reserve(READ_CHUNK);
        }
        &mut self.buf
    }

    /// Bytes still to come of the frame being received, once its header is in (0
    /// when it is not, or in the greeting, or after an error: the next event says).
    fn missing_in_frame(&self) -> usize {
        let Some(mut scan) = self.unit_scan() else {
            return 0;
        };
        let have = self.buf.len() as u64;
        while let Ok(Some(frame)) = scan.next_frame(&self.buf[..]) {
            if frame.end() > have {
                return usize::try_from(frame.end() - have).unwrap_or(usize::MAX);
            }
        }
        0
    }

    /// A scan of the unit at the buffer's start: a fresh one, or in `Tail` the scan of
    /// the message whose body went by (`None` where frames are not decoded).
    fn unit_scan(&self) -> Option<FrameScanner> {
        match self.state {
            State::Handshake | State::Traffic => Some(FrameScanner::new(&self.limits)),
            State::Tail => self.tail.clone(),
            _ => None,
        }
    }

    /// Once every complete unit was taken ([`Self::next_event`] returned `Ok(None)`):
    /// if the buffer holds the start of a message whose frame body still misses at
    /// least `min` bytes, takes the buffered bytes and says how many body bytes follow.
    /// The caller writes `head` on, moves the body itself (e.g. with `splice(2)`), then
    /// calls [`Self::body_passed`]; the frames after the body come as
    /// [`StreamEvent::Tail`], checked against the limits as the whole message would be.
    pub fn take_pass(&mut self, min: u64) -> Option<Pass> {
        let (mut scan, frame, _) = self.find_pass(min)?;
        let have = self.buf.len() as u64;
        scan.rebase(frame.end());
        self.tail = Some(scan);
        self.state = State::Passing;
        Some(Pass {
            head: self.buf.split().freeze(),
            body: frame.end() - have,
        })
    }

    /// What [`Self::take_pass`] would take, to decide on first: the bodies of the
    /// message's frames before the one that would go by (copies: they are a meta and
    /// keys), and that frame's header. `None` if it would take nothing, or if the
    /// message started before the buffer (a body of it already went by).
    pub fn pass_head(&self, min: u64) -> Option<(Vec<Bytes>, FrameHeader)> {
        if self.state != State::Traffic {
            return None;
        }
        let (_, frame, before) = self.find_pass(min)?;
        let bodies = before
            .iter()
            .map(|f| Bytes::copy_from_slice(&self.buf[f.body as usize..f.end() as usize]))
            .collect();
        Some((bodies, frame.header))
    }

    /// The frame [`Self::take_pass`] takes, the scan past its header, and the
    /// complete frames before it in the buffer.
    fn find_pass(&self, min: u64) -> Option<(FrameScanner, FrameSpan, Vec<FrameSpan>)> {
        if self.state != State::Traffic && self.state != State::Tail {
            return None;
        }
        let mut scan = self.unit_scan()?;
        let have = self.buf.len() as u64;
        let mut before = Vec::new();
        loop {
            let frame = scan.next_frame(&self.buf[..]).ok()??;
            if frame.end() <= have {
                before.push(frame);
                continue;
            }
            if frame.header.command || frame.end() - have < min {
                return None;
            }
            return Some((scan, frame, before));
        }
    }

    /// A message whose body went by is still being received (its frames after it).
    pub fn in_tail(&self) -> bool {
        self.state == State::Tail
    }

    /// The body announced by [`Self::take_pass`] went by.
    pub fn body_passed(&mut self) {
        if self.state == State::Passing {
            self.state = State::Tail;
        }
    }

    /// Appends received bytes. Call [`StreamDecoder::next_event`] until it returns
    /// `Ok(None)` after each call.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet returned in an event.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The handshake (greeting and READY) is complete.
    pub fn is_ready(&self) -> bool {
        self.state == State::Traffic
    }

    /// The next event, `Ok(None)` if more bytes are needed. After an error every
    /// later call returns the same kind of error.
    pub fn next_event(&mut self) -> Result<Option<StreamEvent>, ZmtpError> {
        let result = self.step();
        if result.is_err() {
            self.state = State::Failed;
        }
        result
    }

    fn step(&mut self) -> Result<Option<StreamEvent>, ZmtpError> {
        match self.state {
            State::Failed => Err(ZmtpError::Unexpected("use of a failed stream")),
            State::Passing => Ok(None),
            State::Tail => {
                let mut scan = self.tail.clone().expect("a tail has its scan");
                let have = self.buf.len() as u64;
                while !scan.is_done() {
                    match scan.next_frame(&self.buf[..])? {
                        Some(f) if f.end() <= have => {}
                        _ => return Ok(None),
                    }
                }
                self.tail = None;
                self.state = State::Traffic;
                let end = scan.offset() as usize;
                Ok(Some(StreamEvent::Tail(self.buf.split_to(end).freeze())))
            }
            State::Greeting(reported) => {
                let progress = parse_greeting_prefix(&self.buf)?;
                let reached = match progress {
                    GreetingProgress::Partial => 0,
                    GreetingProgress::Signature => 1,
                    GreetingProgress::Major(_) => 2,
                    GreetingProgress::Complete(_) => 3,
                };
                if reached <= reported {
                    return Ok(None);
                }
                // Report the stages one by one, in order, even if they arrived together.
                let stage = reported + 1;
                self.state = State::Greeting(stage);
                Ok(Some(match (stage, progress) {
                    (1, _) => StreamEvent::Signature,
                    (2, _) => StreamEvent::Major(self.buf[10]),
                    (_, GreetingProgress::Complete(g)) => {
                        self.buf.advance(GREETING_LEN);
                        self.state = State::Handshake;
                        StreamEvent::Greeting(g)
                    }
                    _ => unreachable!("stage 3 is only reached with a complete greeting"),
                }))
            }
            State::Handshake | State::Traffic => {
                let Some(scan) = scan_unit(&self.buf, &self.limits)? else {
                    return Ok(None);
                };
                let bytes = self.buf.split_to(scan.consumed).freeze();
                match scan.into_unit(&bytes)? {
                    Unit::Command(cmd) => {
                        if matches!(cmd, Command::Ready(_)) {
                            self.state = State::Traffic;
                        }
                        Ok(Some(StreamEvent::Command(cmd)))
                    }
                    Unit::Message(_) if self.state == State::Handshake => {
                        Err(ZmtpError::Unexpected("message before READY"))
                    }
                    Unit::Message(msg) => Ok(Some(StreamEvent::Message(msg))),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn handshake(identity: &[u8]) -> Vec<u8> {
        let mut wire = Greeting::null(identity.len()).encode().to_vec();
        wire.extend(Command::ready(&[("Socket-Type", b"DEALER"), ("Identity", identity)]).encode());
        wire
    }

    /// Reads as a socket gives them: at most `room` bytes and at most `chunk`.
    fn read_like_a_socket(
        dec: &mut StreamDecoder,
        wire: &[u8],
        chunk: usize,
    ) -> (Vec<ZmtpMessage>, Vec<(usize, usize)>) {
        let (mut msgs, mut buffers, mut at) = (Vec::new(), Vec::new(), 0);
        while at < wire.len() {
            let buf = dec.buffer_for_read();
            let room = buf.capacity() - buf.len();
            assert!(
                room >= MIN_ROOM.min(READ_CHUNK),
                "a read gets real room, not {room} bytes"
            );
            buffers.push((buf.as_ptr() as usize + buf.capacity(), room));
            let n = room.min(chunk).min(wire.len() - at);
            buf.extend_from_slice(&wire[at..at + n]);
            at += n;
            while let Some(ev) = dec.next_event().unwrap() {
                if let StreamEvent::Message(m) = ev {
                    msgs.push(m);
                }
            }
        }
        (msgs, buffers)
    }

    #[test]
    fn a_big_frame_is_read_into_one_allocation_sized_from_its_header() {
        let big = ZmtpMessage::from_bodies([
            Bytes::from(vec![7u8; 112]),
            Bytes::from(vec![1u8; 8]),
            Bytes::from((0..4_000_000u32).map(|i| i as u8).collect::<Vec<u8>>()),
            Bytes::from(vec![2u8; 4]),
        ]);
        let small =
            ZmtpMessage::from_bodies([Bytes::from_static(b"meta"), Bytes::from(vec![3u8; 100])]);
        let mut wire = small.encode();
        wire.extend(big.encode());
        wire.extend(small.encode());
        let mut dec = StreamDecoder::after_handshake(Limits::default());
        let (msgs, buffers) = read_like_a_socket(&mut dec, &wire, 60_000);
        assert_eq!(msgs, vec![small.clone(), big.clone(), small]);
        // Where each read's buffer ends (its allocation): it moves when the big
        // frame's header is in (one copy of what came before), and once more when the
        // next message starts past the end of the frame's room; not as a doubling buffer
        // would, about log2(4 MB / 64 KB) times.
        let starts: Vec<usize> = buffers.iter().map(|b| b.0).collect();
        let moves = starts.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(moves <= 3, "the buffer moved {moves} times: {starts:x?}");
        let biggest = buffers.iter().map(|b| b.1).max().unwrap();
        assert!(
            biggest >= 4_000_000 - 60_000,
            "the frame's rest was reserved at once: {biggest}"
        );
    }

    #[test]
    fn an_announced_frame_is_reserved_only_up_to_a_bound() {
        let mut dec = StreamDecoder::after_handshake(Limits::default());
        // A long frame header announcing 1 GB, and nothing after it.
        let mut wire = vec![0x02u8];
        wire.extend((1u64 << 30).to_be_bytes());
        dec.push(&wire);
        assert_eq!(dec.next_event().unwrap(), None);
        let buf = dec.buffer_for_read();
        let room = buf.capacity() - buf.len();
        assert!(
            (MAX_AHEAD..MAX_AHEAD + READ_CHUNK).contains(&room),
            "{room}"
        );
    }

    /// Relays `wire` as a pump with pass-through does, reading `chunk` bytes at a time:
    /// what it would write, and how many bytes went by outside the decoder.
    fn relay_with_passes(
        limits: Limits,
        wire: &[u8],
        chunk: usize,
        min: u64,
    ) -> Result<(Vec<u8>, u64, usize), ZmtpError> {
        let mut dec = StreamDecoder::after_handshake(limits);
        let (mut out, mut passed, mut messages, mut at) = (Vec::new(), 0u64, 0, 0);
        loop {
            while let Some(ev) = dec.next_event()? {
                match ev {
                    StreamEvent::Message(m) => out.extend(m.encode()),
                    StreamEvent::Tail(t) => out.extend_from_slice(&t),
                    other => panic!("{other:?}"),
                }
                messages += 1;
            }
            if let Some(pass) = dec.take_pass(min) {
                assert_eq!(
                    dec.next_event(),
                    Ok(None),
                    "nothing is decoded while a body goes by"
                );
                out.extend_from_slice(&pass.head);
                let body = pass.body as usize;
                out.extend_from_slice(&wire[at..at + body]);
                at += body;
                passed += pass.body;
                dec.body_passed();
                continue;
            }
            if at == wire.len() {
                return Ok((out, passed, messages));
            }
            let n = chunk.min(wire.len() - at);
            dec.push(&wire[at..at + n]);
            at += n;
        }
    }

    #[test]
    fn big_bodies_go_by_and_the_rest_decodes_byte_exact() {
        let push = |vals: usize| {
            ZmtpMessage::from_bodies([
                Bytes::from(vec![7u8; 112]),
                Bytes::from(vec![1u8; 8]),
                Bytes::from((0..vals).map(|i| (i * 31) as u8).collect::<Vec<u8>>()),
                Bytes::from(vec![2u8; 4]),
            ])
        };
        // The big frame last, two big frames, a small message between big ones.
        let last = ZmtpMessage::from_bodies([
            Bytes::from(vec![9u8; 50]),
            Bytes::from(vec![5u8; 3_000_000]),
        ]);
        let two = ZmtpMessage::from_bodies([
            Bytes::from(vec![5u8; 900_000]),
            Bytes::from(vec![6u8; 10]),
            Bytes::from(vec![4u8; 700_000]),
        ]);
        let msgs = [
            push(100),
            push(4_000_000),
            push(1000),
            last,
            two,
            push(300_000),
            push(10),
        ];
        let wire: Vec<u8> = msgs.iter().flat_map(|m| m.encode()).collect();
        for chunk in [1000, 65_536, 1 << 20] {
            let (out, passed, messages) =
                relay_with_passes(Limits::default(), &wire, chunk, 256 * 1024).unwrap();
            assert!(out == wire, "chunk {chunk}: the relayed bytes differ");
            assert_eq!(messages, msgs.len(), "chunk {chunk}");
            assert!(
                passed > 4_000_000 + 3_000_000 - 2 * chunk as u64,
                "chunk {chunk}: only {passed} bytes went by"
            );
        }
        // Nothing goes by below the minimum: every message decodes whole.
        let (out, passed, _) =
            relay_with_passes(Limits::default(), &wire, 65_536, u64::MAX).unwrap();
        assert!(out == wire);
        assert_eq!(passed, 0);
    }

    #[test]
    fn a_message_whose_body_went_by_still_obeys_the_limits() {
        let limits = Limits {
            max_frames: 3,
            ..Limits::default()
        };
        let msg = ZmtpMessage::from_bodies([
            Bytes::from(vec![1u8; 10]),
            Bytes::from(vec![2u8; 1_000_000]),
            Bytes::from(vec![3u8; 10]),
            Bytes::from(vec![4u8; 10]),
        ]);
        let err = relay_with_passes(limits, &msg.encode(), 4096, 256 * 1024).unwrap_err();
        assert_eq!(err, ZmtpError::TooManyFrames { max: 3 });
        let limits = Limits {
            max_message_len: 1_000_020,
            ..Limits::default()
        };
        let err = relay_with_passes(limits, &msg.encode(), 4096, 256 * 1024).unwrap_err();
        assert!(
            matches!(
                err,
                ZmtpError::TooLarge {
                    what: "message",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn stages_then_ready_then_messages_byte_by_byte() {
        let mut wire = handshake(b"ps9");
        let msg = ZmtpMessage::from_bodies([Bytes::from_static(b"m"), Bytes::from(vec![1; 400])]);
        wire.extend(msg.encode());
        let mut dec = StreamDecoder::new(Limits::default());
        let mut events = Vec::new();
        for b in &wire {
            dec.push(&[*b]);
            while let Some(ev) = dec.next_event().unwrap() {
                events.push(ev);
            }
        }
        assert_eq!(events.len(), 5);
        assert_eq!(events[0], StreamEvent::Signature);
        assert_eq!(events[1], StreamEvent::Major(3));
        assert_eq!(events[2], StreamEvent::Greeting(Greeting::null(3)));
        assert!(
            matches!(&events[3], StreamEvent::Command(c) if c.identity().unwrap() == &b"ps9"[..])
        );
        assert_eq!(events[4], StreamEvent::Message(msg));
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn every_split_of_the_greeting_reports_every_stage_once() {
        let wire = handshake(b"ps9");
        for cut in 0..wire.len() {
            let mut dec = StreamDecoder::new(Limits::default());
            let mut events = Vec::new();
            for part in [&wire[..cut], &wire[cut..]] {
                dec.push(part);
                while let Some(ev) = dec.next_event().unwrap() {
                    events.push(ev);
                }
            }
            assert_eq!(
                events[..2],
                [StreamEvent::Signature, StreamEvent::Major(3)],
                "cut {cut}"
            );
            assert_eq!(events.len(), 4, "cut {cut}");
        }
    }

    #[test]
    fn all_at_once_reports_every_stage() {
        let mut dec = StreamDecoder::new(Limits::default());
        dec.push(&handshake(b""));
        let mut events = Vec::new();
        while let Some(ev) = dec.next_event().unwrap() {
            events.push(ev);
        }
        assert_eq!(events.len(), 4);
        assert!(dec.is_ready());
    }

    #[test]
    fn message_before_ready_is_refused() {
        let mut wire = Greeting::null(0).encode().to_vec();
        wire.extend([0x00, 0x01, 0x42]);
        let mut dec = StreamDecoder::new(Limits::default());
        dec.push(&wire);
        let err = loop {
            match dec.next_event() {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("wanted an error"),
                Err(e) => break e,
            }
        };
        assert_eq!(err, ZmtpError::Unexpected("message before READY"));
        assert!(dec.next_event().is_err());
    }
}
