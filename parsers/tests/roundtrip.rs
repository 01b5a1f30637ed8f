//! Property tests: whatever we encode, we decode back to the same value.

use bytes::Bytes;
use p3proxy_parsers::pslite::{parse_meta, Control, Meta, Node, PsMessage};
use p3proxy_parsers::zmtp::{
    parse_command, parse_unit, Command, Greeting, Limits, Mechanism, Unit, ZmtpMessage,
};
use p3proxy_parsers::zmtp::{parse_greeting, Property};
use proptest::prelude::*;

fn opt<T: std::fmt::Debug + Clone + 'static>(
    s: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<Option<T>> {
    proptest::option::of(s).boxed()
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn node() -> impl Strategy<Value = Node> {
    (
        opt(0..3i32),
        opt(any::<i32>()),
        opt(bytes(20)),
        opt(any::<i32>()),
        opt(any::<bool>()),
        opt(any::<i32>()),
    )
        .prop_map(
            |(role, id, hostname, port, is_recovery, customer_id)| Node {
                role,
                id,
                hostname,
                port,
                is_recovery,
                customer_id,
                unknown: vec![],
            },
        )
}

fn control() -> impl Strategy<Value = Control> {
    (
        opt(0..6i32),
        proptest::collection::vec(node(), 0..5),
        opt(any::<i32>()),
        opt(any::<u64>()),
    )
        .prop_map(|(cmd, node, barrier_group, msg_sig)| Control {
            cmd,
            node,
            barrier_group,
            msg_sig,
            unknown: vec![],
        })
}

prop_compose! {
    fn meta()(
        head in opt(any::<i32>()),
        body in opt(bytes(600)),
        control in opt(control()),
        flags in (opt(any::<bool>()), opt(any::<bool>()), opt(any::<bool>()), opt(any::<bool>())),
        ints in (opt(any::<i32>()), opt(any::<i32>()), opt(any::<i32>()), opt(any::<i32>()), opt(any::<i32>())),
        data_type in proptest::collection::vec(any::<i32>(), 0..4),
    ) -> Meta {
        let (request, push, simple_app, pull) = flags;
        let (app_id, timestamp, customer_id, data_size, priority) = ints;
        Meta {
            head, body, control, request, push, simple_app, app_id, timestamp, data_type,
            customer_id, data_size, pull, priority, unknown: vec![],
        }
    }
}

proptest! {
    #[test]
    fn meta_round_trips(m in meta()) {
        let wire = Bytes::from(m.encode());
        prop_assert_eq!(parse_meta(&wire).unwrap(), m);
    }

    #[test]
    fn zmtp_message_round_trips(bodies in proptest::collection::vec(bytes(700), 1..6), longs in proptest::collection::vec(any::<bool>(), 6)) {
        let mut msg = ZmtpMessage::from_bodies(bodies);
        for (f, long) in msg.frames.iter_mut().zip(longs) {
            f.long |= long; // the long form is legal for any size
        }
        let wire = Bytes::from(msg.encode());
        prop_assert_eq!(parse_unit(&wire, &Limits::default()).unwrap(), Some((Unit::Message(msg), wire.len())));
    }

    #[test]
    fn ps_message_round_trips(m in meta(), frames in proptest::collection::vec(bytes(64), 0..4)) {
        let m = Meta { data_type: vec![11; frames.len()], control: None, ..m };
        let msg = PsMessage::new(m, frames);
        let wire = Bytes::from(msg.to_zmtp().encode());
        let Some((Unit::Message(z), _)) = parse_unit(&wire, &Limits::default()).unwrap() else { panic!() };
        prop_assert_eq!(PsMessage::from_zmtp(z).unwrap(), msg);
    }

    #[test]
    fn ready_round_trips(props in proptest::collection::vec((proptest::string::string_regex("[A-Za-z-]{1,20}").unwrap(), bytes(300)), 0..5)) {
        let cmd = Command::Ready(props.into_iter().map(|(n, v)| Property { name: Bytes::from(n), value: v }).collect());
        let body = Bytes::from(cmd.encode_body());
        prop_assert_eq!(parse_command(&body).unwrap(), cmd);
    }

    #[test]
    fn greeting_round_trips(padding in any::<u64>(), minor in any::<u8>(), as_server in any::<bool>(), filler in proptest::collection::vec(any::<u8>(), 31)) {
        let g = Greeting {
            signature_padding: padding, major: 3, minor, mechanism: Mechanism::NULL, as_server,
            filler: filler.try_into().unwrap(),
        };
        let wire = g.encode();
        prop_assert_eq!(parse_greeting(&wire).unwrap().1, g);
    }

    /// Any cut of a message into slices reassembles to its exact wire bytes.
    #[test]
    fn wire_ranges_reassemble(bodies in proptest::collection::vec(bytes(700), 1..5), cuts in proptest::collection::vec(1usize..400, 1..20)) {
        let msg = ZmtpMessage::from_bodies(bodies);
        let wire = msg.encode();
        let mut joined = Vec::new();
        let mut off = 0;
        for step in cuts.iter().cycle() {
            if off >= wire.len() { break; }
            for piece in msg.wire_range(off, *step) { joined.extend_from_slice(&piece); }
            off += step;
        }
        prop_assert_eq!(joined, wire);
    }

    /// Arbitrary bytes never panic the decoders.
    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let b = Bytes::from(data);
        let _ = parse_meta(&b);
        let _ = parse_unit(&b, &Limits::default());
        let _ = parse_command(&b);
        let mut dec = p3proxy_parsers::StreamDecoder::new(Limits::default());
        let mut wire = Greeting::null(0).encode().to_vec();
        wire.extend_from_slice(&b);
        dec.push(&wire);
        while let Ok(Some(_)) = dec.next_event() {}
    }
}
