//! Hostile bytes: each is a typed error, never a panic and never an allocation
//! of the size the peer claims.

use bytes::Bytes;
use p3proxy_parsers::pslite::{parse_meta, MetaError, PsError, PsMessage};
use p3proxy_parsers::zmtp::{
    Command, Greeting, Limits, StreamDecoder, StreamEvent, ZmtpError, ZmtpMessage,
};

/// A decoder past the handshake (greeting and READY of a DEALER `ps9`).
fn ready_decoder() -> StreamDecoder {
    let mut dec = StreamDecoder::new(Limits::default());
    dec.push(&Greeting::null(3).encode());
    dec.push(&Command::ready(&[("Socket-Type", b"DEALER"), ("Identity", b"ps9")]).encode());
    while let Some(ev) = dec.next_event().unwrap() {
        if let StreamEvent::Command(_) = ev {
            assert!(dec.is_ready());
        }
    }
    dec
}

fn first_error(dec: &mut StreamDecoder) -> ZmtpError {
    loop {
        match dec.next_event() {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("expected an error, decoder wants more bytes"),
            Err(e) => return e,
        }
    }
}

#[test]
fn long_frame_claiming_2_pow_60_bytes() {
    let mut dec = ready_decoder();
    let mut wire = vec![0x03];
    wire.extend((1u64 << 60).to_be_bytes());
    wire.extend([0u8; 16]);
    dec.push(&wire);
    assert_eq!(
        first_error(&mut dec),
        ZmtpError::TooLarge {
            what: "frame",
            len: 1 << 60,
            max: i32::MAX as u64
        }
    );
    // Refused from the header alone: nothing beyond what arrived is buffered.
    assert!(dec.buffered() <= wire.len());
}

#[test]
fn long_frame_near_2_pow_64_bytes() {
    let mut dec = ready_decoder();
    let mut wire = vec![0x02];
    wire.extend(u64::MAX.to_be_bytes());
    dec.push(&wire);
    assert!(matches!(
        first_error(&mut dec),
        ZmtpError::TooLarge { len: u64::MAX, .. }
    ));
}

#[test]
fn ready_with_a_malformed_property() {
    let mut dec = StreamDecoder::new(Limits::default());
    dec.push(&Greeting::null(0).encode());
    // Identity claims 0x7fffffff bytes of value; 3 follow.
    let body = b"\x05READY\x08Identity\x7f\xff\xff\xffps9";
    dec.push(&[0x04, body.len() as u8]);
    dec.push(body);
    assert_eq!(
        first_error(&mut dec),
        ZmtpError::MalformedProperty("value runs past the command")
    );
}

#[test]
fn oversized_command_is_refused_from_its_header() {
    let mut dec = StreamDecoder::new(Limits::default());
    dec.push(&Greeting::null(0).encode());
    let mut wire = vec![0x06];
    wire.extend((1u64 << 40).to_be_bytes());
    dec.push(&wire);
    assert_eq!(
        first_error(&mut dec),
        ZmtpError::TooLarge {
            what: "command frame",
            len: 1 << 40,
            max: 64 * 1024
        }
    );
}

#[test]
fn meta_claiming_thousands_of_data_frames() {
    // data_type: 3000 packed entries.
    let mut meta = vec![0x08, 0x00, 0x4a];
    let n = 3000usize;
    meta.extend([(n as u8 & 0x7f) | 0x80, (n >> 7) as u8]);
    meta.extend(std::iter::repeat_n(0x0b, n));
    assert_eq!(
        parse_meta(&Bytes::from(meta.clone())),
        Err(MetaError::TooMany {
            what: "data types",
            max: 16
        })
    );
    let msg = ZmtpMessage::from_bodies([Bytes::from(meta)]);
    let (err, back) = PsMessage::from_zmtp(msg.clone()).unwrap_err();
    assert_eq!(
        err,
        PsError::Meta(MetaError::TooMany {
            what: "data types",
            max: 16
        })
    );
    assert_eq!(
        back, msg,
        "not ps-lite: handed back intact to forward as a fence"
    );
}

#[test]
fn endless_more_chain() {
    let mut dec = ready_decoder();
    dec.push(&[0x01, 0x00].repeat(10_000));
    assert_eq!(first_error(&mut dec), ZmtpError::TooManyFrames { max: 64 });
}

#[test]
fn truncated_varints() {
    for bad in [
        &[0x08, 0x80][..],
        &[0x08, 0xff, 0xff, 0xff],
        &[0x88],
        &[0x4a, 0x02, 0x08, 0x80],
    ] {
        assert_eq!(
            parse_meta(&Bytes::copy_from_slice(bad)),
            Err(MetaError::TruncatedVarint),
            "{bad:02x?}"
        );
    }
    assert_eq!(
        parse_meta(&Bytes::from(
            vec![0x08; 1]
                .into_iter()
                .chain([0xff; 12])
                .collect::<Vec<_>>()
        )),
        Err(MetaError::OverlongVarint)
    );
}

#[test]
fn length_delimited_field_claiming_more_than_the_frame() {
    // body (field 2) claims 2^62 bytes.
    let meta = [
        0x12, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x40, 0x00,
    ];
    assert_eq!(
        parse_meta(&Bytes::copy_from_slice(&meta)),
        Err(MetaError::Truncated { field: 2 })
    );
}

#[test]
fn garbage_instead_of_a_greeting() {
    let mut dec = StreamDecoder::new(Limits::default());
    dec.push(b"GET / HTTP/1.1\r\n");
    assert_eq!(
        first_error(&mut dec),
        ZmtpError::BadSignature {
            offset: 0,
            found: b'G'
        }
    );
    // Failed streams stay failed.
    assert!(dec.next_event().is_err());
}
