use super::*;
use crate::core::order::HoldReason;
use p3proxy_parsers::mxnet::ServerRanges;
use p3proxy_parsers::pslite::ControlCommand;
use p3proxy_parsers::pslite::PsMessage;
use p3proxy_parsers::zmtp::{parse_unit, Limits};

const OPTIMIZERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/parsers/tests/optimizers/");
const S8: &str = "10.0.0.1:4000";
const W9: i32 = 9;
const W11: i32 = 11;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{OPTIMIZERS}{name}")).unwrap()
}

fn nodes(servers: usize) -> Vec<NodeInfo> {
    let mut v = Vec::new();
    for r in 0..servers {
        v.push(NodeInfo {
            id: 8 + 2 * r as i32,
            role: Role::Server,
            addr: Some(SocketAddr::new(addr(S8).ip(), 4000 + r as u16)),
        });
    }
    for id in [W9, W11] {
        v.push(NodeInfo {
            id,
            role: Role::Worker,
            addr: Some(addr("10.0.0.2:5000")),
        });
    }
    v
}

const CONFIG: SplitConfig = SplitConfig {
    enabled: true,
    sizing: Sizing::uniform(400),
    min_bytes: 400,
    optimizers: OptimizerSet::ALL,
    hold: std::time::Duration::from_secs(10),
};

/// A splitter in front of S8 (of `servers`) with full history: registration, node
/// table, both workers connected, sync mode, and `optimizer` (a fixture) if any.
fn ready(servers: usize, optimizer: Option<&str>) -> Splitter {
    let mut sp = Splitter::new(CONFIG);
    for r in 0..servers {
        sp.server_registered(SocketAddr::new(addr(S8).ip(), 4000 + r as u16));
    }
    sp.node_table(&nodes(servers));
    for r in 0..servers {
        let server = SocketAddr::new(addr(S8).ip(), 4000 + r as u16);
        sp.worker_connected(server, W9);
        sp.worker_connected(server, W11);
        assert_eq!(sp.on_command(server, 3, b""), None);
        if let Some(o) = optimizer {
            assert_eq!(sp.on_command(server, 0, &fixture(o)), None);
        }
    }
    sp
}

/// A splitter with `config` in front of S8 alone, with full history and no optimizer.
fn ready_with(config: SplitConfig) -> Splitter {
    let mut sp = Splitter::new(config);
    sp.server_registered(addr(S8));
    sp.node_table(&nodes(1));
    sp.worker_connected(addr(S8), W9);
    sp.worker_connected(addr(S8), W11);
    assert_eq!(sp.on_command(addr(S8), 3, b""), None);
    sp
}

fn meta(head: i32, push: bool, pull: bool, ts: i32, request: bool, data: bool) -> Meta {
    Meta {
        head: Some(head),
        request: Some(request),
        push: Some(push),
        simple_app: Some(false),
        app_id: Some(0),
        timestamp: Some(ts),
        data_type: if data { vec![8, 11, 3] } else { vec![] },
        customer_id: Some(0),
        pull: Some(pull),
        priority: Some(0),
        ..Meta::default()
    }
}

/// A request as MXNet sends it, its parts owned.
struct Req {
    meta: Meta,
    meta_frame: Bytes,
    keys: Vec<u64>,
    vals: Pieces,
    lens: Option<Vec<i32>>,
}

impl Req {
    fn push(key: u64, vals: Vec<u8>, ts: i32, pull: bool, head: i32) -> Req {
        let m = meta(head, true, pull, ts, true, true);
        Req {
            meta_frame: Bytes::from(m.encode()),
            meta: m,
            keys: vec![key],
            lens: Some(vec![vals.len() as i32]),
            // Cut in odd places, as a reassembled message is.
            vals: Pieces {
                len: vals.len() as u64,
                parts: vals.chunks(333).map(Bytes::copy_from_slice).collect(),
            },
        }
    }

    fn pull(key: u64, ts: i32) -> Req {
        let mut m = meta(0, false, true, ts, true, true);
        m.data_type = vec![8, 11]; // keys and an empty vals frame
        Req {
            meta_frame: Bytes::from(m.encode()),
            meta: m,
            keys: vec![key],
            vals: Pieces::default(),
            lens: None,
        }
    }

    fn view(&self) -> DataRequest<'_> {
        DataRequest {
            meta: &self.meta,
            meta_frame: &self.meta_frame,
            keys: &self.keys,
            vals: &self.vals,
            lens: self.lens.as_deref(),
        }
    }
}

fn values(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn concat(pieces: &[Bytes]) -> Vec<u8> {
    pieces.iter().flat_map(|p| p.iter().copied()).collect()
}

/// Parses wire pieces as one ps-lite message.
fn parse(pieces: &[Bytes]) -> PsMessage {
    let bytes = Bytes::from(concat(pieces));
    let (unit, used) = parse_unit(&bytes, &Limits::default()).unwrap().unwrap();
    assert_eq!(used, bytes.len(), "exactly one unit");
    let msg = match unit {
        p3proxy_parsers::zmtp::Unit::Message(m) => m,
        other => panic!("not a message: {other:?}"),
    };
    PsMessage::from_zmtp(msg).unwrap()
}

fn split(plan: RequestPlan) -> Vec<PsMessage> {
    match plan {
        RequestPlan::Split(msgs) => msgs.iter().map(|m| parse(m)).collect(),
        other => panic!("not split: {other:?}"),
    }
}

/// The response the server sends for `req` (a pushpull or pull), with `vals`.
fn response(req: &Meta, key: u64, vals: &[u8]) -> (Meta, Bytes, Vec<Pieces>) {
    let m = meta(
        req.head(),
        req.is_push(),
        req.is_pull(),
        req.timestamp(),
        false,
        true,
    );
    let data = vec![
        Pieces::one(Bytes::copy_from_slice(&key.to_le_bytes())),
        Pieces::one(Bytes::copy_from_slice(vals)),
        Pieces::one(Bytes::copy_from_slice(&(vals.len() as i32).to_le_bytes())),
    ];
    (m.clone(), Bytes::from(m.encode()), data)
}

fn ack(req: &Meta) -> (Meta, Bytes) {
    let m = meta(req.head(), true, false, req.timestamp(), false, false);
    (m.clone(), Bytes::from(m.encode()))
}

fn events(sp: &mut Splitter) -> Vec<SplitEvent> {
    std::iter::from_fn(|| sp.poll_event()).collect()
}

#[test]
fn an_init_push_becomes_slice_pushes_and_their_acks_one_ack() {
    let mut sp = ready(1, Some("gluon-sgd.pickle"));
    let value = values(1001 * 4, 1); // 4004 bytes: 10 slices of 400, then 4
    let init = Req::push(7, value.clone(), 1, false, 0);
    let slices = split(sp.on_data_request(addr(S8), W9, &init.view(), false));
    assert_eq!(slices.len(), 11);
    let mut joined = Vec::new();
    for (i, s) in slices.iter().enumerate() {
        assert_eq!(
            s.meta_frame.body, init.meta_frame,
            "the meta goes unchanged"
        );
        let key = s.keys().unwrap().collect::<Vec<_>>();
        assert_eq!(key, vec![SLICE_KEY_BASE + i as u64]);
        // The server reads a negative int.
        assert!((key[0] as i64 as i32) < 0 || key[0] >= SLICE_KEY_BASE);
        let vals = s.vals().unwrap();
        assert_eq!(
            s.lens().unwrap().collect::<Vec<_>>(),
            vec![vals.len() as i32]
        );
        joined.extend_from_slice(vals);
    }
    assert_eq!(joined, value);
    assert_eq!(slices[10].vals().unwrap().len(), 4);
    match &events(&mut sp)[..] {
        [SplitEvent::Split {
            layout,
            next_slice: 11,
            ..
        }] => {
            assert_eq!((layout.key, layout.count, layout.total), (7, 11, 4004))
        }
        other => panic!("{other:?}"),
    }
    assert!(sp.pinned(addr(S8)));
    let (m, frame) = ack(&init.meta);
    for _ in 0..10 {
        assert_eq!(
            sp.on_data_response(8, W9, &m, &frame, &[], false),
            ResponsePlan::Absorb
        );
    }
    let merged = sp.on_data_response(8, W9, &m, &frame, &[], false);
    let ResponsePlan::Merged { key: 7, pieces } = merged else {
        panic!("{merged:?}")
    };
    // Byte for byte the ack the server sends for the whole key.
    let whole = PsMessage::new(m, vec![]).to_zmtp().encode();
    assert_eq!(concat(&pieces), whole);
    assert_eq!(sp.tracked(), 0);
}

#[test]
fn pushpull_responses_merge_into_the_servers_own_response_in_any_order() {
    let mut sp = ready(1, Some("gluon-adam.pickle"));
    let value = values(2000, 3);
    let init = Req::push(5, value.clone(), 1, false, 0);
    split(sp.on_data_request(addr(S8), W9, &init.view(), false));
    let (m, f) = ack(&init.meta);
    for _ in 0..5 {
        sp.on_data_response(8, W9, &m, &f, &[], false);
    }
    let pp = Req::push(5, values(2000, 9), 2, true, 0);
    let slices = split(sp.on_data_request(addr(S8), W11, &pp.view(), false));
    assert_eq!(slices.len(), 5);
    let new_value = values(2000, 77);
    let mut order: Vec<usize> = vec![3, 0, 4, 1, 2];
    let mut result = None;
    for (n, i) in order.drain(..).enumerate() {
        let key = SLICE_KEY_BASE + i as u64;
        let (rm, rf, data) = response(&pp.meta, key, &new_value[i * 400..(i + 1) * 400]);
        let plan = sp.on_data_response(8, W11, &rm, &rf, &data, false);
        if n < 4 {
            assert_eq!(plan, ResponsePlan::Absorb);
        } else {
            result = Some(plan);
        }
    }
    let Some(ResponsePlan::Merged { key: 5, pieces }) = result else {
        panic!("{result:?}")
    };
    let (wm, _, _) = response(&pp.meta, 5, &new_value);
    let whole = PsMessage::new(
        wm,
        vec![
            Bytes::copy_from_slice(&5u64.to_le_bytes()),
            Bytes::from(new_value.clone()),
            Bytes::copy_from_slice(&2000i32.to_le_bytes()),
        ],
    )
    .to_zmtp()
    .encode();
    assert_eq!(concat(&pieces), whole);
}

#[test]
fn pulls_split_without_values_and_fp16_slices_keep_whole_elements() {
    let mut sp = ready_with(SplitConfig {
        sizing: Sizing::uniform(401), // not a multiple of 2 or 4
        ..CONFIG
    });
    let fp16 = DataHandleType {
        request_type: RequestType::Default,
        dtype: p3proxy_parsers::mxnet::Dtype::Float16,
    }
    .to_head();
    assert_eq!(fp16, 5);
    let init = Req::push(3, values(1002, 0), 1, false, fp16);
    let slices = split(sp.on_data_request(addr(S8), W9, &init.view(), false));
    let lens: Vec<usize> = slices.iter().map(|s| s.vals().unwrap().len()).collect();
    assert_eq!(lens, vec![400, 400, 202]);
    let mut pull = Req::pull(3, 2);
    pull.meta.head = Some(fp16);
    pull.meta_frame = Bytes::from(pull.meta.encode());
    let pulls = split(sp.on_data_request(addr(S8), W9, &pull.view(), false));
    assert_eq!(pulls.len(), 3);
    for (i, p) in pulls.iter().enumerate() {
        assert_eq!(
            p.keys().unwrap().collect::<Vec<_>>(),
            vec![SLICE_KEY_BASE + i as u64]
        );
        assert_eq!(p.vals().unwrap().len(), 0);
        assert_eq!(
            p.data.len(),
            2,
            "keys and an empty vals frame, as ZPull sends"
        );
    }
    // A pull of another dtype does not fit the layout.
    let f32_pull = Req::pull(3, 3);
    let stop = sp.on_data_request(addr(S8), W9, &f32_pull.view(), false);
    assert!(
        matches!(
            stop,
            RequestPlan::Stop(Failure {
                reason: "layout_mismatch",
                key: Some(3),
                ..
            })
        ),
        "{stop:?}"
    );
}

#[test]
fn a_bigarray_part_on_the_second_server_gets_slice_keys_of_that_server() {
    let mut sp = ready(2, None);
    let s10 = addr("10.0.0.1:4001");
    let ranges = ServerRanges::new(2).unwrap();
    let part = ranges.begin(1) + 1; // MXNet key 1's part on server 1
    let init = Req::push(part, values(1200, 5), 1, false, 0);
    let slices = split(sp.on_data_request(s10, W9, &init.view(), false));
    let first = slices[0].keys().unwrap().next().unwrap();
    assert_eq!(first, ranges.begin(1) + SLICE_KEY_BASE);
    let decoded = ranges.decode(first).unwrap();
    assert_eq!(decoded.server, 1);
    assert_eq!(
        decoded.server_key(),
        i32::MIN,
        "the server reads a negative key"
    );
    assert!(sp.pinned(s10) && !sp.pinned(addr(S8)));
}

#[test]
fn small_keys_and_commands_pass_and_are_not_refusals() {
    let mut sp = ready(1, Some("gluon-sgd.pickle"));
    let small = Req::push(1, values(400, 0), 1, false, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &small.view(), false),
        RequestPlan::Forward
    );
    assert_eq!(events(&mut sp), vec![]);
    // Its ack is forwarded and its tracking ends.
    let (m, f) = ack(&small.meta);
    assert_eq!(
        sp.on_data_response(8, W9, &m, &f, &[], false),
        ResponsePlan::Forward
    );
    assert_eq!(sp.tracked(), 0);
}

fn refused(sp: &mut Splitter, key: u64) -> Vec<&'static str> {
    let init = Req::push(key, values(800, 0), 1, false, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &init.view(), false),
        RequestPlan::Forward
    );
    events(sp)
        .into_iter()
        .map(|e| match e {
            SplitEvent::Refused { reason, .. } => reason.label(),
            other => panic!("{other:?}"),
        })
        .collect()
}

#[test]
fn every_missing_condition_refuses_with_its_reason() {
    for (optimizer, reason) in [
        ("gluon-lamb.pickle", "optimizer_not_allowed"),
        ("module-sgd.pickle", "optimizer_multipliers"),
    ] {
        let mut sp = ready(1, Some(optimizer));
        assert_eq!(refused(&mut sp, 4), vec![reason]);
        assert!(!sp.pinned(addr(S8)));
    }
    let mut sp = ready(1, None);
    sp.on_command(addr(S8), 4, b"1,0.5");
    assert_eq!(refused(&mut sp, 4), vec!["compression"]);
    let mut sp = ready(1, None);
    sp.on_control(addr(S8), ControlCommand::Ack);
    assert_eq!(refused(&mut sp, 4), vec!["resend"]);
    let mut sp = ready(1, None);
    sp.on_command(addr(S8), 9, b"");
    assert_eq!(refused(&mut sp, 4), vec!["unknown_command"]);
    let mut sp = ready(1, None);
    sp.on_fence(addr(S8));
    assert_eq!(refused(&mut sp, 4), vec!["not_pslite"]);
    // No sync mode before the first init.
    let mut sp = Splitter::new(CONFIG);
    sp.server_registered(addr(S8));
    sp.node_table(&nodes(1));
    sp.worker_connected(addr(S8), W9);
    sp.worker_connected(addr(S8), W11);
    assert_eq!(refused(&mut sp, 4), vec!["not_sync_mode"]);
    // No node table.
    let mut sp = Splitter::new(CONFIG);
    sp.server_registered(addr(S8));
    sp.on_command(addr(S8), 3, b"");
    assert_eq!(refused(&mut sp, 4), vec!["no_node_table"]);
    // Logged once per key.
    assert_eq!(refused(&mut sp, 4), Vec::<&str>::new());
    // A server this proxy did not see register is never split, and never reported.
    let mut sp = ready(1, None);
    let other = addr("10.0.0.1:4999");
    let init = Req::push(4, values(800, 0), 1, false, 0);
    assert_eq!(
        sp.on_data_request(other, W9, &init.view(), false),
        RequestPlan::Forward
    );
    assert_eq!(events(&mut sp), vec![]);
}

#[test]
fn an_optimizer_the_operator_left_out_of_split_optimizers_is_refused() {
    let adam_only = SplitConfig {
        optimizers: OptimizerSet::from_names(["Adam"]).unwrap(),
        ..CONFIG
    };
    let mut sp = Splitter::new(adam_only);
    sp.server_registered(addr(S8));
    sp.node_table(&nodes(1));
    sp.worker_connected(addr(S8), W9);
    sp.worker_connected(addr(S8), W11);
    sp.on_command(addr(S8), 3, b"");
    sp.on_command(addr(S8), 0, &fixture("gluon-sgd.pickle"));
    assert_eq!(refused(&mut sp, 4), vec!["optimizer_not_allowed"]);
    assert_eq!(
        OptimizerSet::from_names(["SGD", "LAMB"]),
        Err("LAMB".into())
    );
    assert!(OptimizerSet::from_names(["mxnet.optimizer.optimizer.SGD"])
        .unwrap()
        .contains("mxnet.optimizer.optimizer.SGD"));
}

#[test]
fn the_first_init_waits_for_every_worker_then_refuses() {
    let mut sp = Splitter::new(CONFIG);
    sp.server_registered(addr(S8));
    sp.node_table(&nodes(1));
    sp.on_command(addr(S8), 3, b"");
    sp.worker_connected(addr(S8), W9);
    let init = Req::push(4, values(800, 0), 1, false, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &init.view(), false),
        RequestPlan::Hold
    );
    // The second worker arrives: split.
    sp.worker_connected(addr(S8), W11);
    assert!(matches!(
        sp.on_data_request(addr(S8), W9, &init.view(), false),
        RequestPlan::Split(_)
    ));
    // Elsewhere it never arrives: after the hold, refused for good.
    let mut sp = Splitter::new(CONFIG);
    sp.server_registered(addr(S8));
    sp.node_table(&nodes(1));
    sp.on_command(addr(S8), 3, b"");
    sp.worker_connected(addr(S8), W9);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &init.view(), false),
        RequestPlan::Hold
    );
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &init.view(), true),
        RequestPlan::Forward
    );
    assert_eq!(
        events(&mut sp),
        vec![SplitEvent::Refused {
            server: addr(S8),
            key: 4,
            reason: Refusal::WorkerNotProxied
        }]
    );
    sp.worker_connected(addr(S8), W11);
    assert_eq!(refused(&mut sp, 6), vec!["worker_not_proxied"]);
}

/// A splitter holding split key 7 (4000 bytes, 10 slices) with its init acked.
fn split_job() -> Splitter {
    let mut sp = ready(1, Some("gluon-sgd-multiprecision-lrsched.pickle"));
    let init = Req::push(7, values(4000, 1), 1, false, 0);
    split(sp.on_data_request(addr(S8), W9, &init.view(), false));
    let (m, f) = ack(&init.meta);
    for _ in 0..10 {
        sp.on_data_response(8, W9, &m, &f, &[], false);
    }
    initialized(&mut sp, 1, 90); // and a small key, whole
    events(&mut sp);
    sp
}

fn stopped(plan: RequestPlan) -> Failure {
    match plan {
        RequestPlan::Stop(f) => f,
        other => panic!("not stopped: {other:?}"),
    }
}

#[test]
fn after_a_split_what_the_layout_cannot_serve_stops_the_server() {
    // Another length.
    let mut sp = split_job();
    let short = Req::push(7, values(3996, 1), 2, true, 0);
    let f = stopped(sp.on_data_request(addr(S8), W9, &short.view(), false));
    assert_eq!((f.reason, f.key), ("layout_mismatch", Some(7)));
    assert!(f.detail.contains("3996"), "{}", f.detail);
    assert_eq!(events(&mut sp), vec![SplitEvent::Failed(f.clone())]);
    // Everything after that stops too, once reported.
    let fine = Req::push(1, values(8, 1), 3, false, 0);
    assert_eq!(
        stopped(sp.on_data_request(addr(S8), W9, &fine.view(), false)),
        f
    );
    assert_eq!(events(&mut sp), vec![]);
    // Row-sparse (head 1).
    let mut sp = split_job();
    let sparse = Req::push(7, values(4000, 1), 2, true, 1);
    assert_eq!(
        stopped(sp.on_data_request(addr(S8), W9, &sparse.view(), false)).reason,
        "layout_mismatch"
    );
    // Several keys.
    let mut sp = split_job();
    let mut two = Req::push(7, values(4000, 1), 2, true, 0);
    two.keys.push(8);
    assert_eq!(
        stopped(sp.on_data_request(addr(S8), W9, &two.view(), false)).reason,
        "layout_mismatch"
    );
    // Compression, a refused optimizer, ACKs: the decision is contradicted.
    let mut sp = split_job();
    assert_eq!(
        sp.on_command(addr(S8), 4, b"1,0.5").unwrap().reason,
        "compression"
    );
    let mut sp = split_job();
    assert_eq!(
        sp.on_command(addr(S8), 0, &fixture("gluon-lamb.pickle"))
            .unwrap()
            .reason,
        "optimizer_not_allowed"
    );
    let mut sp = split_job();
    assert_eq!(
        sp.on_control(addr(S8), ControlCommand::Ack).unwrap().reason,
        "resend"
    );
    // Another worker's optimizer that is allowlisted agrees with the decision.
    let mut sp = split_job();
    assert_eq!(
        sp.on_command(addr(S8), 0, &fixture("gluon-sgd.pickle")),
        None
    );
    assert_eq!(
        sp.on_command(addr(S8), 1, b""),
        None,
        "multi-precision is elementwise"
    );
}

#[test]
fn a_response_to_a_request_never_relayed_is_a_bypass() {
    let mut sp = split_job();
    let stray = Req::push(1, values(8, 0), 9, true, 0);
    let (m, f, data) = response(&stray.meta, 1, &values(8, 0));
    match sp.on_data_response(8, W11, &m, &f, &data, false) {
        ResponsePlan::Stop(f) => assert_eq!(f.reason, "bypass"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_slice_responses_stop_and_closed_connections_leave_nothing_behind() {
    let mut sp = split_job();
    let pp = Req::push(7, values(4000, 2), 2, true, 0);
    split(sp.on_data_request(addr(S8), W9, &pp.view(), false));
    let (m, f, data) = response(&pp.meta, SLICE_KEY_BASE, &values(399, 0));
    match sp.on_data_response(8, W9, &m, &f, &data, false) {
        ResponsePlan::Stop(f) => assert_eq!((f.reason, f.key), ("bad_slice_response", Some(7))),
        other => panic!("{other:?}"),
    }
    let mut sp = split_job();
    split(sp.on_data_request(addr(S8), W9, &pp.view(), false));
    let small = Req::push(1, values(8, 0), 3, true, 0);
    sp.on_data_request(addr(S8), W9, &small.view(), false);
    assert_eq!(sp.tracked(), 2);
    // The same timestamp again while in flight is not something ps-lite does.
    let f = stopped(sp.on_data_request(addr(S8), W9, &pp.view(), false));
    assert_eq!(f.reason, "duplicate_request");
    let mut sp = split_job();
    split(sp.on_data_request(addr(S8), W9, &pp.view(), false));
    sp.on_data_request(addr(S8), W11, &small.view(), false);
    sp.worker_disconnected(addr(S8), W9);
    assert_eq!(sp.tracked(), 1);
    sp.responses_closed(8, W11);
    assert_eq!(sp.tracked(), 0);
}

#[test]
fn row_sparse_row_keys_are_not_keys() {
    // Key 7 row-sparse: keys [7, 7+0, 7+1, ...] name rows; key 11 (= 7 + 4) is its own.
    let mut sp = ready(1, None);
    let mut rows = Req::push(7, values(160, 0), 1, false, 1);
    rows.keys.extend(7..17);
    rows.lens = Some(vec![0; 11]);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &rows.view(), false),
        RequestPlan::Forward
    );
    let init = Req::push(11, values(800, 0), 2, false, 0);
    assert!(matches!(
        sp.on_data_request(addr(S8), W9, &init.view(), false),
        RequestPlan::Split(_)
    ));
    // Row-sparse traffic of key 7 names row 11 again: not a request for key 11.
    rows.meta.timestamp = Some(3);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &rows.view(), false),
        RequestPlan::Forward
    );
    // A compressed push names its key second.
    let mut sp = split_job();
    let mut gc = Req::push(7, values(100, 0), 2, false, 3);
    gc.keys = vec![1000, 7];
    gc.lens = Some(vec![0, 100]);
    let f = stopped(sp.on_data_request(addr(S8), W9, &gc.view(), false));
    assert_eq!((f.reason, f.key), ("layout_mismatch", Some(7)));
}

#[test]
fn a_restored_layout_goes_on_and_nothing_new_is_split() {
    let mut live = split_job();
    let layout = match live.servers[&addr(S8)].keys[&7] {
        KeyState::Split(l) => l,
        KeyState::Whole => unreachable!(),
    };
    // The restarted proxy: the journal's records, then the node table and connections.
    let mut sp = Splitter::new(CONFIG);
    sp.restore(addr(S8), layout, 10);
    sp.node_table(&nodes(1));
    sp.worker_connected(addr(S8), W9);
    sp.worker_connected(addr(S8), W11);
    assert!(sp.pinned(addr(S8)));
    let pp = Req::push(7, values(4000, 2), 5, true, 0);
    let a = split(live.on_data_request(addr(S8), W9, &pp.view(), false));
    let b = split(sp.on_data_request(addr(S8), W9, &pp.view(), false));
    assert_eq!(a, b, "the same slice requests as before the restart");
    // A key it does not know was initialized before the restart: never an init now.
    let other = Req::push(12, values(800, 0), 6, true, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &other.view(), false),
        RequestPlan::Forward
    );
    assert_eq!(
        events(&mut sp),
        vec![SplitEvent::Refused {
            server: addr(S8),
            key: 12,
            reason: Refusal::Restarted
        }]
    );
    // A new registration of that address is a new server: its history starts again.
    sp.server_registered(addr(S8));
    assert!(!sp.pinned(addr(S8)));
}

#[test]
fn deferred_parts_merge_on_the_peer_into_the_same_bytes() {
    let value = values(4000, 2);
    let new_value = values(4000, 99);
    // Server side: parts instead of a merge.
    let mut sp = split_job();
    let pp = Req::push(7, value.clone(), 2, true, 0);
    split(sp.on_data_request(addr(S8), W9, &pp.view(), false));
    let mut merger = Merger::default();
    let mut merged = None;
    for (n, i) in [9u32, 0, 5, 1, 2, 3, 4, 6, 7, 8].into_iter().enumerate() {
        let (rm, rf, data) = response(
            &pp.meta,
            SLICE_KEY_BASE + u64::from(i),
            &new_value[i as usize * 400..][..400],
        );
        let part = match sp.on_data_response(8, W9, &rm, &rf, &data, true) {
            ResponsePlan::Part(p) => p,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            (part.key, part.index, part.count, part.total),
            (7, i, 10, 4000)
        );
        // Worker side.
        let out = merger.on_part(&rm, &rf, &data, part).unwrap();
        assert_eq!(out.is_some(), n == 9);
        merged = out.or(merged);
    }
    assert_eq!(sp.tracked(), 0, "the server side forgot the request");
    assert_eq!(merger.waiting(), 0);
    let (wm, _, _) = response(&pp.meta, 7, &new_value);
    let whole = PsMessage::new(
        wm,
        vec![
            Bytes::copy_from_slice(&7u64.to_le_bytes()),
            Bytes::from(new_value),
            Bytes::copy_from_slice(&4000i32.to_le_bytes()),
        ],
    )
    .to_zmtp()
    .encode();
    assert_eq!(concat(&merged.unwrap()), whole);
}

#[test]
fn the_peer_refuses_parts_that_do_not_add_up() {
    let mut merger = Merger::default();
    let pp = Req::push(7, values(8, 0), 2, true, 0);
    let (rm, rf, data) = response(&pp.meta, 1, &values(400, 0));
    let part = Part {
        key: 7,
        index: 0,
        count: 10,
        slice: 400,
        total: 4000,
    };
    assert_eq!(merger.on_part(&rm, &rf, &data, part), Ok(None));
    let twice = merger.on_part(&rm, &rf, &data, part).unwrap_err();
    assert!(twice.contains("answered twice"), "{twice}");
    let mut merger = Merger::default();
    let lies = Part { count: 3, ..part };
    assert!(merger
        .on_part(&rm, &rf, &data, lies)
        .unwrap_err()
        .contains("describes no layout"));
    let mut merger = Merger::default();
    merger.on_part(&rm, &rf, &data, part).unwrap();
    let other = Part {
        total: 3999,
        ..part
    };
    let e = merger
        .on_part(&rm, &rf, &data, Part { index: 1, ..other })
        .unwrap_err();
    assert!(e.contains("does not match"), "{e}");
    let short = response(&pp.meta, 1, &values(399, 0));
    let mut merger = Merger::default();
    assert!(merger
        .on_part(&short.0, &short.1, &short.2, part)
        .unwrap_err()
        .contains("399 bytes"));
}

#[test]
fn a_streamed_push_is_tracked_and_its_lens_checked() {
    let mut sp = split_job();
    let pp = Req::push(7, values(4000, 2), 2, true, 0);
    let layout = match sp.on_request_head(addr(S8), W9, &pp.meta, &[7], 4000) {
        HeadPlan::Stream(l) => l,
        other => panic!("{other:?}"),
    };
    assert_eq!(layout.count, 10);
    assert_eq!(sp.tracked(), 1);
    assert_eq!(sp.finish_streamed(addr(S8), &layout, Some(&[4000])), None);
    // Its responses merge like any split request's.
    let (m, f, d) = response(&pp.meta, SLICE_KEY_BASE, &values(400, 0));
    assert_eq!(
        sp.on_data_response(8, W9, &m, &f, &d, false),
        ResponsePlan::Absorb
    );
    // Anything unusual waits for the whole message.
    assert_eq!(
        sp.on_request_head(addr(S8), W9, &pp.meta, &[7], 3996),
        HeadPlan::Whole
    );
    assert_eq!(
        sp.on_request_head(addr(S8), W9, &pp.meta, &[7], 4000),
        HeadPlan::Whole,
        "in flight"
    );
    assert_eq!(
        sp.on_request_head(addr(S8), W9, &Req::pull(7, 3).meta, &[7], 0),
        HeadPlan::Whole
    );
    assert_eq!(
        sp.on_request_head(
            addr(S8),
            W9,
            &Req::push(1, values(8, 0), 4, true, 0).meta,
            &[1],
            8
        ),
        HeadPlan::Whole
    );
    let f = sp
        .finish_streamed(addr(S8), &layout, Some(&[3996]))
        .unwrap();
    assert_eq!((f.reason, f.key), ("layout_mismatch", Some(7)));
}

/// The server's answer to `req` as the response connection carries it.
fn answer(sp: &mut Splitter, worker: i32, req: &Req, key: u64, vals: &[u8]) -> ResponsePlan {
    if req.meta.is_pull() {
        let (m, f, d) = response(&req.meta, key, vals);
        sp.on_data_response(8, worker, &m, &f, &d, false)
    } else {
        let (m, f) = ack(&req.meta);
        sp.on_data_response(8, worker, &m, &f, &[], false)
    }
}

/// Rank 0's init push of `key` (timestamp `ts`), forwarded and answered, as MXNet's
/// `Init` does before any other request for the key.
fn initialized(sp: &mut Splitter, key: u64, ts: i32) {
    let init = Req::push(key, values(8, 1), ts, false, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &init.view(), false),
        RequestPlan::Forward
    );
    assert_eq!(answer(sp, W9, &init, key, &[]), ResponsePlan::Forward);
    sp.take_released();
}

#[test]
fn a_request_waits_while_the_same_workers_earlier_request_for_its_key_is_unanswered() {
    // Gluon with worker-side updates: rank 0's init push, each worker's broadcast
    // pull, then without waiting for it the first step's pushpull of the same key.
    let mut sp = ready(1, None);
    sp.responses_opened(8, W9);
    sp.responses_opened(8, W11);
    let init = Req::push(1, values(8, 1), 1, false, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &init.view(), false),
        RequestPlan::Forward
    );
    assert!(
        sp.take_released(),
        "requests waiting for the key to be known look again"
    );
    assert_eq!(answer(&mut sp, W9, &init, 1, &[]), ResponsePlan::Forward);
    assert!(
        sp.take_released(),
        "requests waiting for the init's answer go"
    );
    let pull9 = Req::pull(1, 2);
    let pull11 = Req::pull(1, 1);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &pull9.view(), false),
        RequestPlan::Forward
    );
    assert_eq!(
        sp.on_data_request(addr(S8), W11, &pull11.view(), false),
        RequestPlan::Forward
    );
    let pp9 = Req::push(1, values(8, 2), 3, true, 0);
    let pp11 = Req::push(1, values(8, 3), 2, true, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &pp9.view(), false),
        RequestPlan::Behind(HoldReason::EarlierPull)
    );
    assert_eq!(
        sp.on_data_request(addr(S8), W11, &pp11.view(), false),
        RequestPlan::Behind(HoldReason::EarlierPull)
    );
    // Other keys, and the other worker's answers, do not hold it.
    initialized(&mut sp, 3, 40);
    let other = Req::push(3, values(8, 4), 4, true, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &other.view(), false),
        RequestPlan::Forward
    );
    assert!(!sp.take_released());
    assert_eq!(
        answer(&mut sp, W11, &pull11, 1, &values(8, 1)),
        ResponsePlan::Forward
    );
    assert!(sp.take_released());
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &pp9.view(), false),
        RequestPlan::Behind(HoldReason::EarlierPull)
    );
    assert_eq!(
        sp.on_data_request(addr(S8), W11, &pp11.view(), false),
        RequestPlan::Forward
    );
    assert_eq!(
        answer(&mut sp, W9, &pull9, 1, &values(8, 1)),
        ResponsePlan::Forward
    );
    assert!(sp.take_released());
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &pp9.view(), false),
        RequestPlan::Forward
    );
    // Nothing waits behind a push or pushpull: the server answers those only once
    // every worker's is in (holding could deadlock two workers).
    let pull9b = Req::pull(1, 5);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &pull9b.view(), false),
        RequestPlan::Forward
    );
    let pp9b = Req::push(1, values(8, 5), 7, true, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &pp9b.view(), false),
        RequestPlan::Behind(HoldReason::EarlierPull)
    );
    assert_eq!(
        answer(&mut sp, W9, &pp9, 1, &values(8, 5)),
        ResponsePlan::Forward
    );
    assert!(!sp.take_released(), "a pushpull's answer releases nothing");
    assert_eq!(
        answer(&mut sp, W9, &pull9b, 1, &values(8, 5)),
        ResponsePlan::Forward
    );
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &pp9b.view(), false),
        RequestPlan::Forward
    );
    // A closed request connection forgets its requests, and what waited on them goes.
    let pull11b = Req::pull(1, 5);
    assert_eq!(
        sp.on_data_request(addr(S8), W11, &pull11b.view(), false),
        RequestPlan::Forward
    );
    let pp11b = Req::push(1, values(8, 6), 6, true, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W11, &pp11b.view(), false),
        RequestPlan::Behind(HoldReason::EarlierPull)
    );
    sp.worker_disconnected(addr(S8), W11);
    assert!(sp.take_released());
    assert_eq!(
        sp.on_data_request(addr(S8), W11, &pp11b.view(), false),
        RequestPlan::Forward
    );
}

#[test]
fn nothing_waits_for_an_answer_this_proxy_would_not_see() {
    // The server's response connection to W11 does not pass this proxy.
    let mut sp = ready(1, None);
    sp.responses_opened(8, W9);
    initialized(&mut sp, 1, 1);
    let pull = Req::pull(1, 2);
    let pp = Req::push(1, values(8, 2), 3, true, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W11, &pull.view(), false),
        RequestPlan::Forward
    );
    assert_eq!(
        sp.on_data_request(addr(S8), W11, &pp.view(), false),
        RequestPlan::Forward
    );
    // Once it closes, W9's requests no longer wait either.
    let pull9 = Req::pull(1, 4);
    let pp9 = Req::push(1, values(8, 3), 5, true, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &pull9.view(), false),
        RequestPlan::Forward
    );
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &pp9.view(), false),
        RequestPlan::Behind(HoldReason::EarlierPull)
    );
    sp.responses_closed(8, W9);
    assert!(sp.take_released());
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &pp9.view(), false),
        RequestPlan::Forward
    );
}

#[test]
fn a_split_keys_pushpull_waits_for_every_slice_of_the_pull_before_it() {
    let mut sp = split_job();
    sp.responses_opened(8, W9);
    let pull = Req::pull(7, 2);
    assert_eq!(
        split(sp.on_data_request(addr(S8), W9, &pull.view(), false)).len(),
        10
    );
    let pp = Req::push(7, values(4000, 2), 3, true, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &pp.view(), false),
        RequestPlan::Behind(HoldReason::EarlierPull)
    );
    // Nor may its bytes stream to the server as slices meanwhile.
    assert_eq!(
        sp.on_request_head(addr(S8), W9, &pp.meta, &[7], 4000),
        HeadPlan::Whole
    );
    for i in 0..10u64 {
        assert_eq!(
            sp.on_data_request(addr(S8), W9, &pp.view(), false),
            RequestPlan::Behind(HoldReason::EarlierPull)
        );
        let (m, f, d) = response(&pull.meta, SLICE_KEY_BASE + i, &values(400, i as u8));
        let plan = sp.on_data_response(8, W9, &m, &f, &d, false);
        assert_eq!(
            matches!(plan, ResponsePlan::Merged { .. }),
            i == 9,
            "slice {i}: {plan:?}"
        );
    }
    assert!(sp.take_released());
    assert_eq!(
        split(sp.on_data_request(addr(S8), W9, &pp.view(), false)).len(),
        10
    );
}

#[test]
fn a_pull_sent_twice_waits_for_the_first_answer_and_resends_turn_waiting_off() {
    let mut sp = ready(1, None);
    sp.responses_opened(8, W9);
    initialized(&mut sp, 1, 1);
    let pull = Req::pull(1, 2);
    let pp = Req::push(1, values(8, 2), 3, true, 0);
    // The same pull twice: the copy waits for the first answer, the pushpull for both.
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &pull.view(), false),
        RequestPlan::Forward
    );
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &pull.view(), false),
        RequestPlan::Behind(HoldReason::EarlierPull)
    );
    assert_eq!(
        answer(&mut sp, W9, &pull, 1, &values(8, 1)),
        ResponsePlan::Forward
    );
    assert!(sp.take_released());
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &pull.view(), false),
        RequestPlan::Forward
    );
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &pp.view(), false),
        RequestPlan::Behind(HoldReason::EarlierPull)
    );
    assert_eq!(
        answer(&mut sp, W9, &pull, 1, &values(8, 1)),
        ResponsePlan::Forward
    );
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &pp.view(), false),
        RequestPlan::Forward
    );
    // With ps-lite ACKs (PS_RESEND) on, the server drops resent copies: nothing waits,
    // from the first ACK on (what waited then goes).
    let mut sp = ready(1, None);
    sp.responses_opened(8, W9);
    initialized(&mut sp, 1, 1);
    sp.on_data_request(addr(S8), W9, &Req::pull(1, 2).view(), false);
    let pp = Req::push(1, values(8, 2), 3, true, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &pp.view(), false),
        RequestPlan::Behind(HoldReason::EarlierPull)
    );
    assert_eq!(sp.on_control(addr(S8), ControlCommand::Ack), None);
    assert!(sp.take_released());
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &pp.view(), false),
        RequestPlan::Forward
    );
    let pull = Req::pull(1, 4);
    let pp = Req::push(1, values(8, 2), 5, true, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &pull.view(), false),
        RequestPlan::Forward
    );
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &pp.view(), false),
        RequestPlan::Forward
    );
}

#[test]
fn a_server_starting_afresh_or_exiting_releases_what_waited_on_it() {
    for exit in [false, true] {
        let mut sp = ready(1, None);
        sp.responses_opened(8, W9);
        initialized(&mut sp, 1, 1);
        let pull = Req::pull(1, 2);
        let pp = Req::push(1, values(8, 2), 3, true, 0);
        sp.on_data_request(addr(S8), W9, &pull.view(), false);
        assert_eq!(
            sp.on_data_request(addr(S8), W9, &pp.view(), false),
            RequestPlan::Behind(HoldReason::EarlierPull)
        );
        if exit {
            sp.server_exited(addr(S8));
        } else {
            sp.server_registered(addr(S8));
        }
        assert!(sp.take_released());
        assert_eq!(sp.tracked(), 0);
    }
}

#[test]
fn a_request_for_a_key_waits_for_its_init_push_and_its_answer_from_rank_0() {
    // kv_init_then_pull.py: rank 0 pushes the key's init while the server is busy; the
    // other worker pulls it after a barrier. The server's heap could serve the pull
    // first and die (`init 21 first`).
    let mut sp = ready(1, None);
    sp.responses_opened(8, W9);
    sp.responses_opened(8, W11);
    let pull = Req::pull(21, 1);
    assert_eq!(
        sp.on_data_request(addr(S8), W11, &pull.view(), false),
        RequestPlan::Behind(HoldReason::NotInitialized),
        "before the init push came"
    );
    let init = Req::push(21, values(8, 1), 1, false, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &init.view(), false),
        RequestPlan::Forward
    );
    assert!(sp.take_released(), "the key is known now");
    assert_eq!(
        sp.on_data_request(addr(S8), W11, &pull.view(), false),
        RequestPlan::Behind(HoldReason::InitInFlight),
        "the init went but is unanswered"
    );
    // Rank 0's own later requests for the key wait for it as well.
    let pp = Req::push(21, values(8, 2), 2, true, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &pp.view(), false),
        RequestPlan::Behind(HoldReason::InitInFlight)
    );
    assert_eq!(answer(&mut sp, W9, &init, 21, &[]), ResponsePlan::Forward);
    assert!(sp.take_released());
    assert_eq!(
        sp.on_data_request(addr(S8), W11, &pull.view(), false),
        RequestPlan::Forward
    );
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &pp.view(), false),
        RequestPlan::Forward
    );
}

#[test]
fn pushes_of_one_round_from_two_workers_never_wait_for_each_other() {
    // The server answers a round's pushes only once every worker's is in: a push
    // waiting behind another worker's push, or behind its own, could deadlock.
    let mut sp = ready(1, None);
    sp.responses_opened(8, W9);
    sp.responses_opened(8, W11);
    initialized(&mut sp, 1, 1);
    initialized(&mut sp, 3, 2);
    for (ts, key) in [(3, 1), (4, 3)] {
        for w in [W9, W11] {
            let pp = Req::push(key, values(8, ts as u8), ts, true, 0);
            assert_eq!(
                sp.on_data_request(addr(S8), w, &pp.view(), false),
                RequestPlan::Forward,
                "worker {w} key {key}"
            );
        }
    }
    // A push-only round too, with the next round's pushpull of the same worker.
    let push = Req::push(1, values(8, 9), 5, false, 0);
    let next = Req::push(1, values(8, 9), 6, true, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &push.view(), false),
        RequestPlan::Forward
    );
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &next.view(), false),
        RequestPlan::Forward
    );
    assert!(!sp.take_released());
}

#[test]
fn a_job_that_does_not_initialize_from_rank_0_waits_one_deadline_per_server() {
    // A ps-lite app whose other worker pushes a key first: its push waits its whole
    // deadline, then goes (the server takes it as the init, as without the proxy);
    // from then on this server's never-initialized keys hold nothing.
    let mut sp = ready(1, None);
    sp.responses_opened(8, W9);
    sp.responses_opened(8, W11);
    let first = Req::push(4, values(8, 1), 1, false, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W11, &first.view(), false),
        RequestPlan::Behind(HoldReason::NotInitialized)
    );
    assert_eq!(
        sp.on_data_request(addr(S8), W11, &first.view(), true),
        RequestPlan::Forward
    );
    let second = Req::push(5, values(8, 1), 2, false, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W11, &second.view(), false),
        RequestPlan::Forward
    );
    // Rank 0's first init waiting out its own hold does not turn the rule off.
    let mut sp = Splitter::new(CONFIG);
    sp.server_registered(addr(S8));
    sp.node_table(&nodes(1));
    sp.on_command(addr(S8), 3, b"");
    sp.worker_connected(addr(S8), W9);
    sp.worker_connected(addr(S8), W11);
    sp.responses_opened(8, W9);
    sp.responses_opened(8, W11);
    let init = Req::push(6, values(8, 1), 1, false, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &init.view(), true),
        RequestPlan::Forward
    );
    assert_eq!(
        sp.on_data_request(addr(S8), W11, &Req::pull(8, 1).view(), false),
        RequestPlan::Behind(HoldReason::NotInitialized)
    );
}

#[test]
fn what_a_held_request_depends_on_says_when_to_ask_again() {
    // Rank 0's first init waits for every worker: the connection that completes the
    // set is what wakes it (no polling in the shell).
    let mut sp = Splitter::new(CONFIG);
    sp.server_registered(addr(S8));
    sp.node_table(&nodes(1));
    sp.on_command(addr(S8), 3, b"");
    sp.worker_connected(addr(S8), W9);
    sp.take_released();
    let init = Req::push(4, values(800, 0), 1, false, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &init.view(), false),
        RequestPlan::Hold
    );
    assert!(!sp.take_released(), "nothing changed yet");
    sp.worker_connected(addr(S8), W11);
    assert!(sp.take_released(), "a worker connected");
    assert!(matches!(
        sp.on_data_request(addr(S8), W9, &init.view(), false),
        RequestPlan::Split(_)
    ));
    // A never-initialized key's wait ends when a worker leaves (this proxy no longer
    // sees every init), and the node table or a server's registration may change it.
    let mut sp = ready(1, None);
    sp.responses_opened(8, W9);
    sp.responses_opened(8, W11);
    sp.take_released();
    assert_eq!(
        sp.on_data_request(addr(S8), W11, &Req::pull(8, 1).view(), false),
        RequestPlan::Behind(HoldReason::NotInitialized)
    );
    sp.worker_disconnected(addr(S8), W9);
    assert!(sp.take_released());
    assert_eq!(
        sp.on_data_request(addr(S8), W11, &Req::pull(8, 1).view(), false),
        RequestPlan::Forward
    );
    sp.node_table(&nodes(1));
    assert!(sp.take_released());
    sp.server_registered(addr(S8));
    assert!(sp.take_released());
    assert!(!sp.take_released(), "reported once");
}

#[test]
fn the_splitter_says_until_when_a_request_waits_with_fabricated_time() {
    let t0 = std::time::Instant::now();
    let hold = CONFIG.hold;
    let ms = std::time::Duration::from_millis;
    // Rank 0's first init, while a worker has not connected: held until the hold ends.
    let mut sp = Splitter::new(CONFIG);
    sp.server_registered(addr(S8));
    sp.node_table(&nodes(1));
    sp.on_command(addr(S8), 3, b"");
    sp.worker_connected(addr(S8), W9);
    let init = Req::push(4, values(800, 0), 1, false, 0);
    for now in [t0, t0 + hold - ms(1)] {
        assert_eq!(
            sp.on_data_request_at(addr(S8), W9, &init.view(), t0, now),
            (RequestPlan::Hold, Some(t0 + hold))
        );
    }
    let (plan, by) = sp.on_data_request_at(addr(S8), W9, &init.view(), t0, t0 + hold);
    assert_eq!(
        (plan, by),
        (RequestPlan::Forward, None),
        "then it goes, whole"
    );
    assert_eq!(
        events(&mut sp),
        vec![SplitEvent::Refused {
            server: addr(S8),
            key: 4,
            reason: Refusal::WorkerNotProxied
        }]
    );
    // A request for a key never initialized: until the same deadline, from its own
    // first ask.
    let mut sp = ready(1, None);
    sp.responses_opened(8, W9);
    sp.responses_opened(8, W11);
    let pull = Req::pull(8, 1);
    let t1 = t0 + ms(250);
    assert_eq!(
        sp.on_data_request_at(addr(S8), W11, &pull.view(), t1, t1 + ms(5)),
        (
            RequestPlan::Behind(HoldReason::NotInitialized),
            Some(t1 + hold)
        )
    );
    assert_eq!(
        sp.on_data_request_at(addr(S8), W11, &pull.view(), t1, t1 + hold),
        (RequestPlan::Forward, None)
    );
    // Behind an earlier pull only the answer ends the wait: no time is given.
    let mut sp = ready(1, None);
    sp.responses_opened(8, W9);
    initialized(&mut sp, 1, 1);
    sp.on_data_request(addr(S8), W9, &Req::pull(1, 2).view(), false);
    let pp = Req::push(1, values(8, 2), 3, true, 0);
    assert_eq!(
        sp.on_data_request_at(addr(S8), W9, &pp.view(), t0, t0 + 2 * hold),
        (RequestPlan::Behind(HoldReason::EarlierPull), None)
    );
}

#[test]
fn slices_grow_with_the_key_where_a_worker_shares_the_servers_host() {
    // cost 10000: a 40000-byte key is cut into 20000-byte slices, a 1,000,000-byte
    // key into 100000-byte slices; a key of at most 10000 bytes stays whole.
    let sizing = Sizing {
        min_slice: 400,
        cost_bytes: 0,
        shared_cost_bytes: 10_000,
        max_requests: u64::MAX,
    };
    for (worker_host, slice) in [("10.0.0.2:5000", 400), ("10.0.0.1:5000", 20_000)] {
        let mut sp = Splitter::new(SplitConfig { sizing, ..CONFIG });
        sp.server_registered(addr(S8));
        let mut table = nodes(1);
        table[1].addr = Some(addr(worker_host));
        sp.node_table(&table);
        sp.worker_connected(addr(S8), W9);
        sp.worker_connected(addr(S8), W11);
        sp.on_command(addr(S8), 3, b"");
        let init = Req::push(3, values(40_000, 1), 1, false, 0);
        let slices = split(sp.on_data_request(addr(S8), W9, &init.view(), false));
        assert_eq!(
            slices.len() as u64,
            40_000 / slice,
            "worker on {worker_host}"
        );
        assert!(slices
            .iter()
            .all(|s| s.vals().unwrap().len() as u64 == slice));
        let small = Req::push(5, values(8_000, 2), 2, false, 0);
        let plan = sp.on_data_request(addr(S8), W9, &small.view(), false);
        if slice == 400 {
            assert_eq!(split(plan).len(), 20);
        } else {
            assert_eq!(
                plan,
                RequestPlan::Forward,
                "below the cost: not worth a slice"
            );
            assert!(!events(&mut sp)
                .iter()
                .any(|e| matches!(e, SplitEvent::Refused { .. })));
        }
    }
}

#[test]
fn a_spent_slice_budget_coarsens_then_keeps_keys_whole() {
    // 2 workers, 24 slice requests per iteration: 12 slice keys for the server.
    let mut sp = ready_with(SplitConfig {
        sizing: Sizing {
            max_requests: 24,
            ..Sizing::uniform(400)
        },
        ..CONFIG
    });
    let first = Req::push(3, values(4_000, 1), 1, false, 0);
    assert_eq!(
        split(sp.on_data_request(addr(S8), W9, &first.view(), false)).len(),
        10
    );
    // 10 slices of 400 would pass the budget: 2 slices of 2000 instead.
    let second = Req::push(5, values(4_000, 2), 2, false, 0);
    let slices = split(sp.on_data_request(addr(S8), W9, &second.view(), false));
    let lens: Vec<usize> = slices.iter().map(|s| s.vals().unwrap().len()).collect();
    assert_eq!(lens, vec![2_000, 2_000]);
    let third = Req::push(7, values(4_000, 3), 3, false, 0);
    assert_eq!(
        sp.on_data_request(addr(S8), W9, &third.view(), false),
        RequestPlan::Forward
    );
    let refused: Vec<_> = events(&mut sp)
        .into_iter()
        .filter_map(|e| match e {
            SplitEvent::Refused { key, reason, .. } => Some((key, reason)),
            _ => None,
        })
        .collect();
    assert_eq!(refused, vec![(7, Refusal::Budget)]);
    assert_eq!(sp.split_keys(), 2);
}
