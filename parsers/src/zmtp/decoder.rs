//! A sans-IO decoder for one direction of a ZMTP connection: feed it bytes as
//! they arrive, take events out. It owns its buffer so that each message it
//! yields is a zero-copy view of the bytes received.

use bytes::{Buf, BytesMut};

use super::greeting::{parse_greeting_prefix, GreetingProgress, GREETING_LEN};
use super::{scan_unit, Command, Greeting, Limits, Unit, ZmtpError, ZmtpMessage};

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Inside the greeting; the last stage already reported.
    Greeting(u8),
    /// Greeting done, waiting for READY.
    Handshake,
    /// READY seen: messages flow.
    Traffic,
    /// An error was returned; the stream cannot be trusted any more.
    Failed,
}

/// Decodes one direction of a ZMTP 3 connection.
#[derive(Debug)]
pub struct StreamDecoder {
    buf: BytesMut,
    state: State,
    limits: Limits,
}

impl StreamDecoder {
    /// A decoder at the start of a connection.
    pub fn new(limits: Limits) -> StreamDecoder {
        StreamDecoder {
            buf: BytesMut::new(),
            state: State::Greeting(0),
            limits,
        }
    }

    /// A decoder for a stream that is already past its handshake: frames only
    /// (a tunnel between two proxies carries the frames of a terminated session).
    pub fn after_handshake(limits: Limits) -> StreamDecoder {
        StreamDecoder {
            buf: BytesMut::new(),
            state: State::Traffic,
            limits,
        }
    }

    /// Takes back the bytes buffered but not yet decoded (to relay them opaquely).
    pub fn take_buffered(&mut self) -> BytesMut {
        self.buf.split()
    }

    /// The receive buffer, for reading from a socket straight into it (no copy).
    /// Call [`StreamDecoder::next_event`] after adding bytes.
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
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
