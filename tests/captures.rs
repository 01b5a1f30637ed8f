//! Every byte of every real MXNet 1.9.1 capture (`tests/captures`, copied from
//! `../shared/wire/captures`) through the parsers: each message decodes, each
//! re-encodes to the exact bytes, and the stream decoder gives the same result
//! whatever the split points. The `.decoded.txt` files, written by an independent
//! decoder when the captures were made, are the expected values.

mod common;
use common::{capture_dir, RUNS};

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use bytes::Bytes;
use p3proxy::capture::{collect_connections, read_packets, CollectedConnection};
use p3proxy::parsers::mxnet::{CommandType, DataHandleType, RequestType, ServerRanges};
use p3proxy::parsers::pslite::{parse_meta, ControlCommand, MessageKind, PsMessage, Role, K_EMPTY};
use p3proxy::parsers::zmtp::{Command, Greeting, Limits, StreamDecoder, StreamEvent, ZmtpMessage};

/// One connection as the reference decoder saw it.
#[derive(Debug, Default)]
struct ExpectedConn {
    client: Option<SocketAddr>,
    server: Option<SocketAddr>,
    to_server_bytes: usize,
    to_client_bytes: usize,
    to_server_greeting: bool,
    to_server_messages: usize,
    to_client_messages: usize,
    categories: BTreeMap<String, usize>,
    metas: Vec<String>,
}

fn parse_decoded(text: &str) -> Vec<ExpectedConn> {
    let mut conns: Vec<ExpectedConn> = Vec::new();
    let mut dir_is_to_server = true;
    let mut current_msg_conn: Option<usize> = None;
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(rest) = line.strip_prefix("[conn ") {
            let (idx, rest) = rest.split_once("] ").unwrap();
            assert_eq!(idx.parse::<usize>().unwrap(), conns.len());
            let mut words = rest.split_whitespace();
            let client = words.next().unwrap().parse().unwrap();
            assert_eq!(words.next(), Some("->"));
            let server = words.next().unwrap().parse().unwrap();
            conns.push(ExpectedConn {
                client: Some(client),
                server: Some(server),
                ..Default::default()
            });
        } else if let Some(rest) = t.strip_prefix("client->server: ") {
            dir_is_to_server = true;
            let c = conns.last_mut().unwrap();
            c.to_server_bytes = rest.split_whitespace().next().unwrap().parse().unwrap();
            c.to_server_greeting = !rest.contains("no full greeting");
        } else if let Some(rest) = t.strip_prefix("server->client: ") {
            dir_is_to_server = false;
            conns.last_mut().unwrap().to_client_bytes =
                rest.split_whitespace().next().unwrap().parse().unwrap();
        } else if let Some(rest) = t.strip_prefix("messages: ") {
            let c = conns.last_mut().unwrap();
            let n: usize = rest.split_whitespace().next().unwrap().parse().unwrap();
            if dir_is_to_server {
                c.to_server_messages = n;
                let dict = &rest[rest.find('{').unwrap() + 1..rest.find('}').unwrap()];
                for item in dict.split(", ").filter(|s| !s.is_empty()) {
                    let (k, v) = item.split_once(": ").unwrap();
                    c.categories
                        .insert(k.trim_matches('\'').to_string(), v.parse().unwrap());
                }
            } else {
                c.to_client_messages = n;
            }
        } else if line.starts_with('#') && line.contains(" conn=") {
            let conn = line
                .split(" conn=")
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap();
            current_msg_conn = Some(conn.parse().unwrap());
        } else if let Some(hex) = t.strip_prefix("meta raw: ") {
            conns[current_msg_conn.unwrap()].metas.push(hex.to_string());
        }
    }
    conns
}

fn category(msg: &PsMessage) -> String {
    match msg.kind() {
        MessageKind::Control(cmd) => {
            let name = match cmd {
                ControlCommand::Terminate => "TERMINATE",
                ControlCommand::AddNode => "ADD_NODE",
                ControlCommand::Barrier => "BARRIER",
                ControlCommand::Ack => "ACK",
                ControlCommand::Heartbeat => "HEARTBEAT",
                other => panic!("unexpected control {other:?}"),
            };
            format!("ctrl:{name}")
        }
        MessageKind::Command { request, .. } => {
            format!("simple_app-{}", if request { "req" } else { "resp" })
        }
        MessageKind::Data {
            request,
            push,
            pull,
        } => {
            let what = match (push, pull) {
                (true, true) => "push-pull",
                (true, false) => "push",
                (false, true) => "pull",
                (false, false) => panic!("data message neither push nor pull"),
            };
            format!("kv-{what}-{}", if request { "req" } else { "resp" })
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Everything the decoder made of one direction of a connection.
#[derive(Debug, Default, PartialEq)]
struct Decoded {
    signature_seen: bool,
    major: Option<u8>,
    greeting: Option<Greeting>,
    commands: Vec<Command>,
    messages: Vec<ZmtpMessage>,
}

fn decode(stream: &[u8], chunks: impl Iterator<Item = usize>) -> Decoded {
    let mut dec = StreamDecoder::new(Limits::default());
    let mut out = Decoded::default();
    let mut pos = 0;
    for len in chunks {
        let end = (pos + len).min(stream.len());
        dec.push(&stream[pos..end]);
        pos = end;
        while let Some(ev) = dec.next_event().expect("captured stream decodes") {
            match ev {
                StreamEvent::Signature => out.signature_seen = true,
                StreamEvent::Major(m) => out.major = Some(m),
                StreamEvent::Greeting(g) => out.greeting = Some(g),
                StreamEvent::Command(c) => out.commands.push(c),
                StreamEvent::Message(m) => out.messages.push(m),
                StreamEvent::Tail(_) => unreachable!("no body was passed"),
            }
        }
        if pos == stream.len() {
            break;
        }
    }
    assert_eq!(pos, stream.len());
    out
}

/// Decodes feeding one byte at a time: the decoder sees every prefix of the stream.
fn decode_byte_by_byte(stream: &[u8]) -> Decoded {
    decode(stream, std::iter::repeat(1))
}

/// Re-encodes what was decoded; must give back the stream exactly.
fn reencode(d: &Decoded) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(g) = d.greeting {
        out.extend(g.encode());
    }
    for c in &d.commands {
        out.extend(c.encode());
    }
    for m in &d.messages {
        m.encode_into(&mut out);
    }
    out
}

struct RunTotals {
    messages: usize,
    bytes: usize,
}

fn check_run(run: &str) -> RunTotals {
    let dir = capture_dir();
    let expected =
        parse_decoded(&std::fs::read_to_string(dir.join(format!("{run}.decoded.txt"))).unwrap());
    let packets = read_packets(&dir.join(format!("{run}.pcap.gz"))).unwrap();
    let conns = collect_connections(&packets);
    assert_eq!(conns.len(), expected.len(), "{run}: connection count");

    // Match connections by address pair, in order of appearance.
    let mut by_pair: HashMap<(SocketAddr, SocketAddr), Vec<&CollectedConnection>> = HashMap::new();
    for c in &conns {
        by_pair.entry((c.client, c.server)).or_default().push(c);
    }
    for list in by_pair.values_mut() {
        list.reverse();
    }

    // The node table, from the scheduler's ADD_NODE broadcast: listening port -> (role, id).
    let mut nodes: HashMap<u16, (Role, i32)> = HashMap::new();
    let mut totals = RunTotals {
        messages: 0,
        bytes: 0,
    };
    let mut decoded_conns = Vec::new();
    for (i, exp) in expected.iter().enumerate() {
        let conn = by_pair
            .get_mut(&(exp.client.unwrap(), exp.server.unwrap()))
            .and_then(|l| l.pop());
        let conn = conn.unwrap_or_else(|| panic!("{run}: conn {i} not reassembled"));
        assert!(!conn.gap, "{run}: conn {i} has a hole");
        assert_eq!(
            conn.to_server.len(),
            exp.to_server_bytes,
            "{run}: conn {i} client->server bytes"
        );
        assert_eq!(
            conn.to_client.len(),
            exp.to_client_bytes,
            "{run}: conn {i} server->client bytes"
        );
        totals.bytes += conn.to_server.len() + conn.to_client.len();

        let to_server = decode_byte_by_byte(&conn.to_server);
        let to_client = decode_byte_by_byte(&conn.to_client);
        for (d, stream, what) in [
            (&to_server, &conn.to_server, "client->server"),
            (&to_client, &conn.to_client, "server->client"),
        ] {
            assert_eq!(
                reencode(d),
                *stream,
                "{run}: conn {i} {what} re-encodes byte-exact"
            );
            if !stream.is_empty() {
                assert!(
                    d.signature_seen && d.major == Some(3),
                    "{run}: conn {i} {what} greeting stages"
                );
                assert_eq!(d.greeting.unwrap().minor, 0);
                assert_eq!(d.greeting.unwrap().mechanism.name(), b"NULL");
                assert_eq!(
                    d.commands.len(),
                    1,
                    "{run}: conn {i} {what}: exactly one READY"
                );
            }
        }
        assert_eq!(to_server.greeting.is_some(), exp.to_server_greeting);
        assert_eq!(
            to_server.messages.len(),
            exp.to_server_messages,
            "{run}: conn {i} messages"
        );
        assert_eq!(
            to_client.messages.len(),
            exp.to_client_messages,
            "{run}: conn {i} messages back"
        );
        if let Some(ready) = to_server.commands.first() {
            assert_eq!(ready.socket_type().unwrap(), &b"DEALER"[..]);
            let ready_back = &to_client.commands[0];
            assert_eq!(ready_back.socket_type().unwrap(), &b"ROUTER"[..]);
            assert_eq!(ready_back.identity().unwrap(), &b""[..]);
            // libzmq writes identity length + 1 into the signature padding.
            assert_eq!(
                to_server.greeting.unwrap().signature_padding,
                ready.identity().unwrap().len() as u64 + 1
            );
        }

        let mut categories = BTreeMap::new();
        let mut metas = Vec::new();
        let mut ps_messages = Vec::new();
        for m in &to_server.messages {
            let ps = PsMessage::from_zmtp(m.clone())
                .unwrap_or_else(|(e, _)| panic!("{run}: conn {i}: {e}"));
            // The meta re-encodes byte-exact from the decoded fields.
            assert_eq!(
                ps.meta.encode(),
                ps.meta_frame.body,
                "{run}: conn {i} meta re-encoding"
            );
            assert_eq!(ps.to_zmtp(), *m);
            *categories.entry(category(&ps)).or_insert(0) += 1;
            metas.push(hex(&ps.meta_frame.body));
            if let Some(c) = ps.meta.control_message() {
                // The scheduler's broadcast: ids assigned (a registration carries INT32_MAX).
                if c.command() == ControlCommand::AddNode {
                    for n in c.node.iter().filter(|n| n.id != Some(K_EMPTY)) {
                        nodes.insert(n.port.unwrap() as u16, (n.role(), n.id.unwrap()));
                    }
                }
            }
            ps_messages.push(ps);
        }
        assert_eq!(categories, exp.categories, "{run}: conn {i} message kinds");
        assert_eq!(metas, exp.metas, "{run}: conn {i} meta bytes");
        totals.messages += ps_messages.len();
        decoded_conns.push((conn, ps_messages));
    }

    // Every data request reaches the server that owns its keys, and MXNet's views hold.
    let servers = nodes.values().filter(|(r, _)| *r == Role::Server).count() as u64;
    let ranges = ServerRanges::new(servers).unwrap();
    let mut data_requests = 0;
    for (conn, msgs) in &decoded_conns {
        let Some(&(Role::Server, server_id)) = nodes.get(&conn.server.port()) else {
            continue;
        };
        let rank = (server_id as u64 - 8) / 2;
        for m in msgs {
            match m.kind() {
                MessageKind::Data {
                    request: true,
                    push,
                    ..
                } => {
                    data_requests += 1;
                    let handle = DataHandleType::from_head(m.meta.head()).unwrap();
                    let keys: Vec<u64> = m.keys().unwrap().collect();
                    if handle.request_type != RequestType::Compressed {
                        for k in &keys {
                            assert_eq!(
                                ranges.decode(*k).unwrap().server,
                                rank,
                                "{run}: key {k:#x} on server {server_id}"
                            );
                        }
                    }
                    if push && handle.request_type == RequestType::Default {
                        let lens: Vec<i32> = m.lens().unwrap().collect();
                        assert_eq!(lens.len(), keys.len());
                        let sum: i64 = lens.iter().map(|&l| i64::from(l)).sum();
                        assert_eq!(
                            sum as usize,
                            m.vals().unwrap().len(),
                            "{run}: lens are bytes"
                        );
                        assert_eq!(m.vals().unwrap().len() % handle.dtype.size().unwrap(), 0);
                    }
                }
                MessageKind::Command {
                    request: true,
                    head,
                } => {
                    let cmd = CommandType::from(head);
                    assert!(
                        !matches!(cmd, CommandType::Other(_)),
                        "{run}: unknown command {head}"
                    );
                    if cmd == CommandType::Controller {
                        assert!(
                            m.meta.body.as_ref().unwrap().starts_with(b"c"),
                            "pickled optimizer body"
                        );
                    }
                }
                _ => {}
            }
        }
    }
    assert!(data_requests > 0, "{run}: found data requests to servers");
    totals
}

#[test]
fn run_a_one_server() {
    let t = check_run("runA_1server");
    assert!(t.messages > 0 && t.bytes > 13_000_000);
}

#[test]
fn run_b_two_servers() {
    check_run("runB_2servers");
}

#[test]
fn run_c_optimizer_fp16_rowsparse_heartbeats() {
    check_run("runC_ext_2servers");
}

#[test]
fn run_d_gradient_compression() {
    check_run("runD_gc_2servers");
}

#[test]
fn run_e_resend_acks() {
    check_run("runE_resend_1server");
}

/// Two-chunk feeds at every split point of every small stream, and random chunk
/// sizes over the large ones: the result never depends on how bytes arrive.
#[test]
fn split_points_do_not_change_the_result() {
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for run in RUNS {
        let packets = read_packets(&capture_dir().join(format!("{run}.pcap.gz"))).unwrap();
        for conn in collect_connections(&packets) {
            for stream in [&conn.to_server, &conn.to_client] {
                let whole = decode(stream, std::iter::once(stream.len().max(1)));
                if stream.len() <= 4096 {
                    for cut in 1..stream.len() {
                        let split = decode(stream, [cut, stream.len() - cut].into_iter());
                        assert_eq!(split, whole, "{run}: split at {cut}");
                    }
                } else {
                    for _ in 0..8 {
                        let sizes: Vec<usize> = (0..stream.len())
                            .map(|_| 1 + (next() % 70_000) as usize)
                            .collect();
                        assert_eq!(
                            decode(stream, sizes.into_iter()),
                            whole,
                            "{run}: random chunks"
                        );
                    }
                }
            }
        }
    }
}

/// The optimizer pickle of run C arrives in a long meta frame (over 255 bytes).
#[test]
fn long_meta_frame_with_pickled_optimizer() {
    let packets = read_packets(&capture_dir().join("runC_ext_2servers.pcap.gz")).unwrap();
    let mut found = 0;
    for conn in collect_connections(&packets) {
        for m in decode(
            &conn.to_server,
            std::iter::once(conn.to_server.len().max(1)),
        )
        .messages
        {
            let meta = parse_meta(&m.frames[0].body).unwrap();
            if meta.is_simple_app() && meta.head() == 0 && meta.is_request() {
                assert!(m.frames[0].long && m.frames[0].body.len() > 255);
                assert!(meta.body.as_ref().is_some_and(|b: &Bytes| b.len() > 400));
                found += 1;
            }
        }
    }
    assert!(
        found >= 2,
        "both workers send the optimizer to both servers"
    );
}
