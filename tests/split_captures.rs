//! Key splitting on real bytes: every request of a real MXNet 1.9.1 job with two
//! servers (capture run B: key 1, 1.1M floats, which MXNet's big-array rule already
//! spread over both servers) goes through the splitter of each server's proxy, in the
//! order the servers received them; the big parts are split into slice requests that
//! carry exactly the original bytes, and each captured whole pull response, cut into the
//! slice responses the server sends for a split key, merges back into the captured
//! bytes exactly - on this proxy and on a peer proxy from parts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use p3proxy::capture::{collect_connections, read_packets};
use p3proxy::core::optimizer::OptimizerSet;
use p3proxy::core::split::{
    DataRequest, Merger, Pieces, RequestPlan, ResponsePlan, Sizing, SplitConfig, Splitter,
    SLICE_KEY_BASE,
};
use p3proxy::core::topology::{node_id_from_identity, NodeInfo};
use p3proxy::parsers::mxnet::ServerRanges;
use p3proxy::parsers::pslite::{ControlCommand, MessageKind, PsMessage, Role};
use p3proxy::parsers::zmtp::{Limits, StreamDecoder, StreamEvent, Unit, ZmtpMessage};

/// One direction of a connection: the sender's Identity and its messages.
struct Stream {
    identity: Bytes,
    server: SocketAddr,
    messages: Vec<PsMessage>,
}

fn streams() -> Vec<Stream> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/captures");
    let packets = read_packets(&dir.join("runB_2servers.pcap.gz")).unwrap();
    let mut out = Vec::new();
    for c in collect_connections(&packets) {
        let mut dec = StreamDecoder::new(Limits::default());
        dec.push(&c.to_server);
        let (mut identity, mut messages) = (Bytes::new(), Vec::new());
        while let Some(ev) = dec.next_event().unwrap() {
            match ev {
                StreamEvent::Command(cmd) => identity = cmd.identity().cloned().unwrap_or_default(),
                StreamEvent::Message(m) => messages.push(PsMessage::from_zmtp(m).unwrap()),
                _ => {}
            }
        }
        out.push(Stream {
            identity,
            server: c.server,
            messages,
        });
    }
    out
}

fn pieces(p: &[Bytes]) -> Vec<u8> {
    p.iter().flat_map(|b| b.iter().copied()).collect()
}

fn parse(wire: &[Bytes]) -> PsMessage {
    let bytes = Bytes::from(pieces(wire));
    let (unit, used) = p3proxy::parsers::zmtp::parse_unit(&bytes, &Limits::default())
        .unwrap()
        .unwrap();
    assert_eq!(used, bytes.len());
    match unit {
        Unit::Message(m) => PsMessage::from_zmtp(m).unwrap(),
        Unit::Command(_) => panic!("a command"),
    }
}

fn data(ps: &PsMessage) -> Vec<Pieces> {
    ps.data
        .iter()
        .map(|f| Pieces::one(f.body.clone()))
        .collect()
}

#[test]
fn a_real_jobs_big_array_parts_split_and_merge_back_to_the_captured_bytes() {
    let streams = streams();
    // The node table, from the scheduler's broadcast.
    let table = streams
        .iter()
        .filter(|s| s.identity == "ps1")
        .flat_map(|s| &s.messages)
        .find_map(|m| {
            let c = m.meta.control_message()?;
            (c.command() == ControlCommand::AddNode && c.node.len() > 1).then(|| c.node.clone())
        })
        .unwrap();
    let nodes: Vec<NodeInfo> = table
        .iter()
        .map(|n| NodeInfo {
            id: n.id.unwrap(),
            role: n.role(),
            addr: format!("{}:{}", n.hostname_str(), n.port.unwrap())
                .parse()
                .ok(),
        })
        .collect();
    let servers: Vec<(i32, SocketAddr)> = nodes
        .iter()
        .filter(|n| n.role == Role::Server)
        .map(|n| (n.id, n.addr.unwrap()))
        .collect();
    assert_eq!(servers.len(), 2);
    let ranges = ServerRanges::new(2).unwrap();
    let config = SplitConfig {
        enabled: true,
        sizing: Sizing::uniform(160_000),
        min_bytes: 160_000,
        optimizers: OptimizerSet::ALL,
        hold: std::time::Duration::from_secs(10),
    };
    let mut split_keys = Vec::new();
    for &(server_id, server) in &servers {
        // One proxy in front of this server: it saw the registration and the table.
        let mut sp = Splitter::new(config);
        sp.server_registered(server);
        sp.node_table(&nodes);
        let to_server: Vec<&Stream> = streams
            .iter()
            .filter(|s| s.server == server && s.identity.starts_with(b"ps"))
            .collect();
        for s in &to_server {
            sp.worker_connected(server, node_id_from_identity(&s.identity).unwrap());
        }
        // Responses by (worker, timestamp), to cut into slice responses below.
        let responses: HashMap<(i32, i32), &PsMessage> = streams
            .iter()
            .filter(|s| node_id_from_identity(&s.identity) == Some(server_id))
            .flat_map(|s| {
                let worker = nodes
                    .iter()
                    .find(|n| n.addr == Some(s.server))
                    .map(|n| n.id);
                s.messages
                    .iter()
                    .map(move |m| ((worker.unwrap_or(-1), m.meta.timestamp()), m))
            })
            .collect();
        // Rank 0 (ps9: kSyncMode, then the inits) first, each worker in its own order.
        let mut requests: Vec<(i32, &PsMessage)> = to_server
            .iter()
            .flat_map(|s| {
                let sender = node_id_from_identity(&s.identity).unwrap();
                s.messages.iter().map(move |m| (sender, m))
            })
            .filter(|(_, m)| !matches!(m.kind(), MessageKind::Control(_)))
            .collect();
        requests.sort_by_key(|(sender, m)| (*sender, m.meta.timestamp()));
        for (sender, m) in requests {
            if let MessageKind::Command { head, .. } = m.kind() {
                assert_eq!(
                    sp.on_command(server, head, m.meta.body.as_deref().unwrap_or_default()),
                    None
                );
                continue;
            }
            let keys: Vec<u64> = m.keys().unwrap().collect();
            let lens: Option<Vec<i32>> = m.lens().map(|l| l.collect());
            let vals = Pieces::one(m.vals().cloned().unwrap_or_default());
            let req = DataRequest {
                meta: &m.meta,
                meta_frame: &m.meta_frame.body,
                keys: &keys,
                vals: &vals,
                lens: lens.as_deref(),
            };
            let plan = sp.on_data_request(server, sender, &req, false);
            let RequestPlan::Split(slices) = plan else {
                assert_eq!(plan, RequestPlan::Forward);
                assert!(vals.len <= 160_000, "a big key left whole: {keys:?}");
                continue;
            };
            // The part of MXNet key 1 on this server: 550,000 floats.
            let begin = ranges.begin(ranges.decode(keys[0]).unwrap().server);
            assert_eq!(keys[0], begin + 1);
            split_keys.push(keys[0]);
            let slices: Vec<PsMessage> = slices.iter().map(|s| parse(s)).collect();
            assert_eq!(slices.len(), 14, "2,200,000 bytes in 160,000-byte slices");
            for (i, s) in slices.iter().enumerate() {
                assert_eq!(s.meta_frame.body, m.meta_frame.body);
                assert_eq!(
                    s.keys().unwrap().collect::<Vec<_>>(),
                    vec![begin + SLICE_KEY_BASE + i as u64]
                );
            }
            if m.meta.is_push() {
                let joined: Vec<u8> = slices
                    .iter()
                    .flat_map(|s| s.vals().unwrap().to_vec())
                    .collect();
                assert_eq!(
                    &joined[..],
                    &m.vals().unwrap()[..],
                    "slices carry the original bytes"
                );
            }
            // What the server sends for the whole key, cut into slice responses.
            let whole = responses[&(sender, m.meta.timestamp())];
            let wire = whole.to_zmtp().encode();
            let mut merger = Merger::default();
            let mut merged_here = None;
            let mut merged_there = None;
            for (i, s) in slices.iter().enumerate().rev() {
                let key = s.keys().unwrap().next().unwrap();
                let response = if m.meta.is_pull() {
                    let off = i * 160_000;
                    let part = whole
                        .vals()
                        .unwrap()
                        .slice(off..(off + 160_000).min(2_200_000));
                    let len = (part.len() as i32).to_le_bytes();
                    PsMessage::from_zmtp(ZmtpMessage::from_bodies([
                        whole.meta_frame.body.clone(),
                        Bytes::copy_from_slice(&key.to_le_bytes()),
                        part,
                        Bytes::copy_from_slice(&len),
                    ]))
                    .unwrap()
                } else {
                    whole.clone() // a push ack carries no key
                };
                let d = data(&response);
                // This proxy merges (a worker beside the server)...
                let mut here = merge_here(&mut sp, server_id, sender, &response, &d);
                if let Some(m) = here.take() {
                    merged_here = Some(m);
                }
                // ...or a peer proxy merges the parts.
                let part = p3proxy::core::slice::Part {
                    key: keys[0],
                    index: i as u32,
                    count: 14,
                    slice: 160_000,
                    total: 2_200_000,
                };
                if let Some(m) = merger
                    .on_part(&response.meta, &response.meta_frame.body, &d, part)
                    .unwrap()
                {
                    merged_there = Some(m);
                }
            }
            assert_eq!(
                pieces(&merged_here.unwrap()),
                wire,
                "byte-identical to the server's response"
            );
            assert_eq!(
                pieces(&merged_there.unwrap()),
                wire,
                "and from parts on the peer"
            );
        }
    }
    // Each server's part of key 1 was split (init, two pushes and two pulls).
    split_keys.sort();
    split_keys.dedup();
    assert_eq!(split_keys, vec![1, ranges.begin(1) + 1]);
}

/// Feeds one slice response to this proxy's splitter; the merged response when complete.
fn merge_here(
    sp: &mut Splitter,
    server_id: i32,
    worker: i32,
    response: &PsMessage,
    d: &[Pieces],
) -> Option<Vec<Bytes>> {
    match sp.on_data_response(
        server_id,
        worker,
        &response.meta,
        &response.meta_frame.body,
        d,
        false,
    ) {
        ResponsePlan::Absorb => None,
        ResponsePlan::Merged { pieces, .. } => Some(pieces),
        other => panic!("{other:?}"),
    }
}
