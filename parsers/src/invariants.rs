//! What must hold for any input at all, asserted by the fuzz targets (`parsers/fuzz`)
//! and by the test that replays their corpora (`parsers/tests/corpus.rs`): no panic,
//! never more consumed than given, and whatever decodes encodes back - to the exact
//! bytes where the format keeps every byte (greetings, frames), else to a value that
//! decodes to itself (protobuf metas and commands, whose encoders are canonical).
//!
//! Each function panics when an invariant breaks; that is what a fuzzer reports.

use bytes::Bytes;

use crate::pickle::read_pickle;
use crate::pslite::{parse_meta, PsMessage};
use crate::zmtp::{
    parse_command, parse_greeting, parse_greeting_prefix, parse_unit, GreetingProgress, Limits,
    StreamDecoder, StreamEvent, Unit, ZmtpMessage,
};

/// A greeting, whole or partial.
pub fn greeting(data: &[u8]) {
    let progress = parse_greeting_prefix(data);
    match parse_greeting(data) {
        Ok((rest, g)) => {
            assert_eq!(data.len() - rest.len(), 64, "a greeting is 64 bytes");
            assert_eq!(&g.encode()[..], &data[..64], "greetings re-encode exactly");
            assert!(
                matches!(progress, Ok(GreetingProgress::Complete(ref p)) if *p == g),
                "the prefix parser agrees: {progress:?}"
            );
        }
        Err(nom::Err::Incomplete(_)) => assert!(data.len() < 64),
        Err(_) => assert!(progress.is_err(), "the prefix parser agrees: {progress:?}"),
    }
}

/// A command body.
pub fn command(data: &[u8]) {
    if let Ok(cmd) = parse_command(&Bytes::copy_from_slice(data)) {
        let again =
            parse_command(&Bytes::from(cmd.encode_body())).expect("re-encoded command parses");
        assert_eq!(again, cmd, "commands re-encode to themselves");
    }
}

/// Frames: units one after another from the front of a buffer.
pub fn frames(data: &[u8]) {
    let limits = Limits::default();
    let mut buf = Bytes::copy_from_slice(data);
    while let Ok(Some((unit, used))) = parse_unit(&buf, &limits) {
        assert!(
            used > 0 && used <= buf.len(),
            "consumed {used} of {}",
            buf.len()
        );
        if let Unit::Message(m) = &unit {
            assert_eq!(m.encode(), &buf[..used], "messages re-encode exactly");
            assert_eq!(m.encoded_len(), used);
        }
        buf = buf.slice(used..);
    }
}

/// A whole stream, fed in pieces whose sizes come from the input's first byte: the
/// events must be the same as when fed at once.
pub fn stream(data: &[u8]) {
    let Some((&step, data)) = data.split_first() else {
        return;
    };
    let step = usize::from(step.max(1));
    let events = |chunk: usize| {
        let mut d = StreamDecoder::new(Limits::default());
        let mut out: Vec<StreamEvent> = Vec::new();
        let mut fed = 0;
        for piece in data.chunks(chunk) {
            d.push(piece);
            fed += piece.len();
            loop {
                match d.next_event() {
                    Ok(Some(e)) => out.push(e),
                    Ok(None) => break,
                    Err(_) => return (out, true),
                }
            }
            assert!(d.buffered() <= fed);
        }
        (out, false)
    };
    let (whole, whole_failed) = events(data.len().max(1));
    let (pieces, pieces_failed) = events(step);
    assert_eq!(whole_failed, pieces_failed, "split points change nothing");
    if !whole_failed {
        assert_eq!(whole, pieces, "split points change nothing");
    }
}

/// A `PBMeta` frame.
pub fn meta(data: &[u8]) {
    if let Ok(m) = parse_meta(&Bytes::copy_from_slice(data)) {
        let again = parse_meta(&Bytes::from(m.encode())).expect("re-encoded meta parses");
        assert_eq!(again, m, "metas re-encode to themselves");
    }
}

/// A ps-lite message: the input cut into frames at the positions its first bytes give.
pub fn message(data: &[u8]) {
    let Some((&n, mut rest)) = data.split_first() else {
        return;
    };
    let mut bodies = Vec::new();
    for _ in 0..(n % 6) {
        let Some((&len, tail)) = rest.split_first() else {
            break;
        };
        let len = usize::from(len).min(tail.len());
        bodies.push(Bytes::copy_from_slice(&tail[..len]));
        rest = &tail[len..];
    }
    bodies.push(Bytes::copy_from_slice(rest));
    let zmtp = ZmtpMessage::from_bodies(bodies);
    match PsMessage::from_zmtp(zmtp.clone()) {
        Ok(ps) => {
            assert_eq!(ps.to_zmtp(), zmtp, "the frames are kept as they were");
            let _ = (
                ps.kind(),
                ps.keys().map(Iterator::count),
                ps.lens().map(Iterator::count),
            );
        }
        Err((_, back)) => assert_eq!(back, zmtp, "a refused message is handed back untouched"),
    }
}

/// A pickle (read, never executed).
pub fn pickle(data: &[u8]) {
    let _ = read_pickle(data);
}
