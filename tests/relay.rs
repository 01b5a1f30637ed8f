//! In-process relay and tunnel tests with hand-made ZMTP peers on port 0.
//! Two "hosts" share loopback: 127.0.0.1 and 127.0.0.2, each proxy told (through
//! its `Env`) which address is its own.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use p3proxy::config::Config;
use p3proxy::io::{run, Bound, Env, Shared};
use p3proxy::parsers::pslite::{Meta, PsMessage};
use p3proxy::parsers::zmtp::{Command, Greeting, Limits, StreamDecoder, StreamEvent, ZmtpMessage};
use p3proxy::testkit;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(5);

/// Metrics of every proxy in this process; tests run one at a time so that the
/// counters they read are theirs (each snapshot resets them).
static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    let guard = SERIAL.lock().await;
    SNAPSHOTTER
        .get_or_init(|| {
            let recorder = DebuggingRecorder::new();
            let snapshotter = recorder.snapshotter();
            recorder.install().expect("first recorder");
            snapshotter
        })
        .snapshot();
    guard
}

/// Counter values since the test began, as `name{label=value}`.
fn counters() -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for (key, _, _, value) in SNAPSHOTTER.get().unwrap().snapshot().into_vec() {
        if let DebugValue::Counter(v) = value {
            let key = key.key();
            let labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            let name = if labels.is_empty() {
                key.name().to_string()
            } else {
                format!("{}{{{}}}", key.name(), labels.join(","))
            };
            out.insert(name, v);
        }
    }
    out
}

fn count(c: &HashMap<String, u64>, name: &str) -> u64 {
    c.get(name).copied().unwrap_or(0)
}

fn host(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

/// A proxy on "host" `me`: destinations on `me` are local, 127.0.0.1 is loopback.
async fn proxy(
    me: u8,
    tunnel: bool,
    peer_tunnel_port: u16,
    orig_dst: SocketAddr,
    tweak: impl FnOnce(&mut Config),
) -> (SocketAddr, Option<SocketAddr>) {
    let mut config = Config {
        listen: SocketAddr::new(host(me), 0),
        tunnel: tunnel.then(|| SocketAddr::new(host(me), 0)),
        metrics: None,
        peer_tunnel_port,
        cluster_cidr: vec!["127.0.0.0/8".parse().unwrap()],
        probe_timeout_ms: 300,
        handshake_timeout_ms: 2000,
        detect_timeout_ms: 300,
        journal: None,
        ..Config::default()
    };
    config.exempt = p3proxy::config::Exempt::by_uid(0); // no SO_MARK needed on loopback
    tweak(&mut config);
    let bound = Bound::bind(&config).await.unwrap();
    let addrs = bound.addrs();
    let env = Env {
        orig_dst: Arc::new(move |_| Ok(orig_dst)),
        is_local: Arc::new(move |ip| ip == host(me)),
        is_listening: Arc::new(|_| true),
        is_loopback: Arc::new(|ip| ip == host(1)),
    };
    let shared = Shared::new(config, env, &bound).expect("no journal");
    tokio::spawn(run(bound, shared, std::future::pending::<()>()));
    (addrs[0], addrs.get(1).copied())
}

/// What a hand-made ROUTER saw on one connection.
#[derive(Debug)]
struct Seen {
    identity: Bytes,
    socket_type: Bytes,
    /// Raw bytes after the handshake.
    bytes: Vec<u8>,
}

/// A ROUTER on `ip`: greets, reads READY, records everything after it.
/// `drop_first`: close the first N connections in the middle of the handshake.
async fn router(ip: IpAddr, drop_first: usize) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            n += 1;
            if n <= drop_first {
                let mut b = [0u8; 10];
                let _ = s.read_exact(&mut b).await;
                continue; // dropped mid-handshake
            }
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok((mut dec, ready)) = testkit::handshake(&mut s, b"ROUTER", b"").await else {
                    return;
                };
                let mut bytes = dec.take_buffered().to_vec();
                let _ = s.read_to_end(&mut bytes).await;
                let _ = tx.send(Seen {
                    identity: ready.identity().unwrap().clone(),
                    socket_type: ready.socket_type().unwrap().clone(),
                    bytes,
                });
            });
        }
    });
    (addr, rx)
}

/// A DEALER: greeting and READY at once, then reads the peer's greeting and READY.
/// Returns the stream and the peer's READY, or what it received before EOF.
async fn dealer(proxy: SocketAddr, identity: &[u8]) -> Result<(TcpStream, Command), Vec<u8>> {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let (_, ready) = timeout(T, testkit::handshake(&mut s, b"DEALER", identity))
        .await
        .expect("no hang")?;
    Ok((s, ready))
}

fn data_message(ts: i32, vals: usize) -> Vec<u8> {
    keyed_message(ts, 3, vals)
}

/// A push request of `vals` value bytes for one MXNet key (one server).
fn keyed_message(ts: i32, key: u64, vals: usize) -> Vec<u8> {
    let vals: Vec<u8> = (0..vals).map(|i| (i * 7 + ts as usize) as u8).collect();
    testkit::push_request(ts, key, Bytes::from(vals)).encode()
}

/// Timestamps of the messages in a relayed stream (-1: not ps-lite).
fn timestamps(bytes: &[u8]) -> Vec<i32> {
    let mut dec = StreamDecoder::after_handshake(Limits::default());
    dec.push(bytes);
    let mut out = Vec::new();
    while let Some(ev) = dec.next_event().unwrap() {
        if let StreamEvent::Message(m) = ev {
            out.push(
                PsMessage::from_zmtp(m)
                    .ok()
                    .and_then(|p| p.meta.timestamp)
                    .unwrap_or(-1),
            );
        }
    }
    out
}

async fn send_and_close(mut s: TcpStream, bytes: &[u8]) {
    s.write_all(bytes).await.unwrap();
    s.shutdown().await.unwrap();
    // Wait for the proxy to close its side: everything was relayed by then.
    let mut rest = Vec::new();
    let _ = timeout(T, s.read_to_end(&mut rest)).await;
}

fn payload() -> Vec<u8> {
    let mut wire = data_message(1, 10);
    wire.extend(data_message(2, 300_000));
    // A message that is not ps-lite: forwarded unchanged as a fence.
    wire.extend(ZmtpMessage::from_bodies([Bytes::from_static(b"\xff\xfe not a meta")]).encode());
    wire.extend(data_message(3, 0));
    wire
}

#[tokio::test]
async fn same_host_relay_is_byte_exact() {
    let _serial = serial().await;
    let (server, mut seen) = router(host(1), 0).await;
    let (redirect, _) = proxy(1, false, 1, server, |_| {}).await;
    let (s, ready) = dealer(redirect, b"ps9")
        .await
        .expect("READY from the proxy");
    assert_eq!(ready.socket_type().unwrap(), &b"ROUTER"[..]);
    let wire = payload();
    send_and_close(s, &wire).await;
    let got = timeout(T, seen.recv()).await.unwrap().unwrap();
    assert_eq!(
        got.identity,
        &b"ps9"[..],
        "the app's identity reaches the destination"
    );
    assert_eq!(got.socket_type, &b"DEALER"[..]);
    assert_eq!(got.bytes, wire, "every byte after the handshake unchanged");
    let c = counters();
    assert_eq!(count(&c, "p3proxy_connections_total{route=same_host}"), 1);
    assert_eq!(
        count(&c, "p3proxy_forwarded_messages_total{direction=outbound}"),
        4
    );
    assert_eq!(
        count(&c, "p3proxy_forwarded_bytes_total{direction=outbound}"),
        wire.len() as u64
    );
    assert_eq!(count(&c, "p3proxy_not_pslite_messages_total"), 1);
}

/// Every shape a relay sees, big bodies among them: MXNet pushes small and big (the
/// big ones' values go from socket to socket when splicing is on), a big body in a
/// message that is not ps-lite and one in a ps-lite message not in MXNet's shape (both
/// read whole: no rule may miss them), and small messages between.
fn shapes_payload() -> (Vec<u8>, u64) {
    let mut wire = data_message(1, 10);
    wire.extend(data_message(2, 4_000_000));
    wire.extend(data_message(3, 100));
    wire.extend(
        ZmtpMessage::from_bodies([
            Bytes::from_static(b"\xff\xfe not a meta"),
            Bytes::from(vec![0x5a; 1_000_000]),
        ])
        .encode(),
    );
    // The meta of a push (three data frames declared), then keys and a 1 MB frame only.
    let meta = testkit::push_request(4, 3, Bytes::from(vec![0; 8])).frames[0]
        .body
        .clone();
    let keys = Bytes::from(3u64.to_le_bytes().to_vec());
    wire.extend(
        ZmtpMessage::from_bodies([meta, keys, Bytes::from(vec![0x11; 1_000_000])]).encode(),
    );
    wire.extend(data_message(5, 1_500_000));
    wire.extend(data_message(6, 0));
    (wire, 7)
}

async fn relay_shapes(splice: bool) -> HashMap<String, u64> {
    let (server, mut seen) = router(host(1), 0).await;
    let (redirect, _) = proxy(1, false, 1, server, |c| c.splice = splice).await;
    let (s, _) = dealer(redirect, b"ps9").await.expect("READY");
    let (wire, messages) = shapes_payload();
    send_and_close(s, &wire).await;
    let got = timeout(T, seen.recv()).await.unwrap().unwrap();
    assert!(
        got.bytes == wire,
        "splice {splice}: the relayed bytes differ"
    );
    let c = counters();
    assert_eq!(
        count(&c, "p3proxy_forwarded_messages_total{direction=outbound}"),
        messages
    );
    assert_eq!(
        count(&c, "p3proxy_forwarded_bytes_total{direction=outbound}"),
        wire.len() as u64
    );
    c
}

#[tokio::test]
async fn same_host_relay_passes_big_bodies_byte_exact_with_splice_on_and_off() {
    let _serial = serial().await;
    let on = relay_shapes(true).await;
    // The 4 MB and 1.5 MB pushes' values (less what came with their heads); not the two odd ones.
    assert_eq!(
        count(&on, "p3proxy_passed_bodies_total{how=splice}"),
        2,
        "{on:?}"
    );
    assert!(count(&on, "p3proxy_passed_bytes_total{how=splice}") > 5_000_000);
    let off = relay_shapes(false).await;
    assert_eq!(count(&off, "p3proxy_passed_bodies_total{how=splice}"), 0);
    assert_eq!(count(&off, "p3proxy_passed_bytes_total{how=splice}"), 0);
}

/// A ROUTER on host 2 behind its proxy (admitting it as the scheduler's port), and host
/// 1's proxy tunnelling to it; returns host 1's redirect listener.
async fn tunnel_pair() -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let (server, seen) = router(host(2), 0).await;
    let (_, tunnel) = proxy(2, true, 1, server, |c| {
        c.scheduler_port = Some(server.port())
    })
    .await;
    let (redirect, _) = proxy(1, false, tunnel.unwrap().port(), server, |_| {}).await;
    (redirect, seen)
}

#[tokio::test]
async fn tunnel_admitted_end_to_end() {
    let _serial = serial().await;
    let (redirect, mut seen) = tunnel_pair().await;
    let (s, ready) = dealer(redirect, b"ps11")
        .await
        .expect("READY only after the far handshake");
    assert_eq!(ready.socket_type().unwrap(), &b"ROUTER"[..]);
    let wire = payload();
    send_and_close(s, &wire).await;
    let got = timeout(T, seen.recv()).await.unwrap().unwrap();
    assert_eq!(got.identity, &b"ps11"[..]);
    assert_eq!(got.bytes, wire);
    let c = counters();
    assert_eq!(
        count(&c, "p3proxy_connections_total{route=tunnel}"),
        1,
        "{c:?}"
    );
    assert_eq!(count(&c, "p3proxy_connections_total{route=tunnel_in}"), 1);
    assert_eq!(
        count(&c, "p3proxy_tunnel_answers_total{outcome=admitted}"),
        1
    );
    // Host 1 sent 4 messages out, host 2 delivered 4 to its app.
    assert_eq!(
        count(&c, "p3proxy_forwarded_messages_total{direction=outbound}"),
        4
    );
    assert_eq!(
        count(&c, "p3proxy_forwarded_messages_total{direction=inbound}"),
        4
    );
    // Scheduling is on by default: the session got its class connections, and the
    // 300 KB message went as two slices, every other message as one.
    assert_eq!(
        count(&c, "p3proxy_connections_total{route=tunnel_class_in}"),
        3
    );
    assert_eq!(count(&c, "p3proxy_slices_sent_total"), 5, "{c:?}");
    assert_eq!(count(&c, "p3proxy_slices_reassembled_total"), 5);
}

#[tokio::test]
async fn urgent_message_overtakes_a_big_one_through_the_tunnel() {
    let _serial = serial().await;
    let (redirect, mut seen) = tunnel_pair().await;
    let (s, _) = dealer(redirect, b"ps9").await.expect("READY");
    // A 40 MB push of the last layer's key, then a small push of the first layer's.
    let big = keyed_message(1, 29, 40_000_000);
    let small = keyed_message(2, 0, 1000);
    let mut wire = big.clone();
    wire.extend(&small);
    send_and_close(s, &wire).await;
    let got = timeout(Duration::from_secs(30), seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.bytes.len(), wire.len());
    assert!(
        got.bytes[..small.len()] == small[..] && got.bytes[small.len()..] == big[..],
        "the first layer's push reaches the app before the 40 MB one (keys disjoint)"
    );
    let c = counters();
    assert!(count(&c, "p3proxy_class_bytes_total{class=1}") >= small.len() as u64);
    assert_eq!(
        count(&c, "p3proxy_class_bytes_total{class=3}"),
        big.len() as u64,
        "{c:?}"
    );
    assert!(count(&c, "p3proxy_slices_sent_total") >= 40_000_000 / 160_000);
}

#[tokio::test]
async fn same_key_and_fences_keep_their_order_through_the_tunnel() {
    let _serial = serial().await;
    let (redirect, mut seen) = tunnel_pair().await;
    let (s, _) = dealer(redirect, b"ps9").await.expect("READY");
    // Same key twice (big then small): never reordered. Then a fence, then an urgent key.
    let mut wire = keyed_message(1, 29, 4_000_000);
    wire.extend(keyed_message(2, 0, 10));
    wire.extend(keyed_message(3, 0, 4_000_000));
    wire.extend(keyed_message(4, 0, 10));
    wire.extend(ZmtpMessage::from_bodies([Bytes::from_static(b"\xff not a meta")]).encode());
    wire.extend(keyed_message(5, 1, 10));
    send_and_close(s, &wire).await;
    let got = timeout(Duration::from_secs(30), seen.recv())
        .await
        .unwrap()
        .unwrap();
    // Key 0's messages may overtake key 29's, never each other; nothing passes the fence.
    let order = timestamps(&got.bytes);
    assert_eq!(order.len(), 6, "{order:?}");
    let pos = |ts: i32| order.iter().position(|&t| t == ts).unwrap();
    assert!(pos(2) < pos(3) && pos(3) < pos(4), "{order:?}");
    assert_eq!(&order[4..], &[-1, 5], "the fence, then what followed it");
    assert_eq!(got.bytes.len(), wire.len());
}

#[tokio::test]
async fn tunnel_to_a_registered_node() {
    let _serial = serial().await;
    // A node on host 2 registers (ADD_NODE through host 2's proxy); then host 1
    // may tunnel to the address it registered.
    let (node, mut node_seen) = router(host(2), 0).await;
    let (scheduler, mut sched_seen) = router(host(2), 0).await;
    let (redirect2, tunnel) = proxy(2, true, 1, scheduler, |_| {}).await;
    let reg_wire =
        testkit::server_registration(&host(2).to_string(), i32::from(node.port())).encode();
    let (s, _) = dealer(redirect2, b"").await.unwrap();
    send_and_close(s, &reg_wire).await;
    assert_eq!(
        timeout(T, sched_seen.recv()).await.unwrap().unwrap().bytes,
        reg_wire
    );

    let (redirect1, _) = proxy(1, false, tunnel.unwrap().port(), node, |_| {}).await;
    let (s, _) = dealer(redirect1, b"ps9").await.expect("admitted");
    let wire = payload();
    send_and_close(s, &wire).await;
    let got = timeout(T, node_seen.recv()).await.unwrap().unwrap();
    assert_eq!(
        (got.identity, got.bytes),
        (Bytes::from_static(b"ps9"), wire)
    );
    let c = counters();
    assert_eq!(
        count(&c, "p3proxy_tunnel_answers_total{outcome=admitted}"),
        1,
        "{c:?}"
    );
    // The registration went to the scheduler on host 2 itself: same host.
    assert_eq!(count(&c, "p3proxy_connections_total{route=same_host}"), 1);
}

#[tokio::test]
async fn tunnel_refused_by_policy_goes_direct() {
    let _serial = serial().await;
    let (server, mut seen) = router(host(2), 0).await;
    // Host 2's proxy knows nothing of this port: refused by policy.
    let (_, tunnel) = proxy(2, true, 1, server, |_| {}).await;
    let (redirect, _) = proxy(1, false, tunnel.unwrap().port(), server, |_| {}).await;
    let (s, _) = dealer(redirect, b"ps9")
        .await
        .expect("direct after the refusal");
    let wire = payload();
    send_and_close(s, &wire).await;
    assert_eq!(timeout(T, seen.recv()).await.unwrap().unwrap().bytes, wire);
    let c = counters();
    assert_eq!(
        count(
            &c,
            "p3proxy_tunnel_answers_total{outcome=refused_by_policy}"
        ),
        1,
        "{c:?}"
    );
    assert_eq!(
        count(
            &c,
            "p3proxy_connections_refused_total{reason=unregistered_target}"
        ),
        1
    );
    assert_eq!(count(&c, "p3proxy_connections_total{route=direct}"), 1);
}

#[tokio::test]
async fn tunnel_unreachable_closes_without_ready() {
    let _serial = serial().await;
    // Admitted port, but nothing listens there.
    let dead = TcpListener::bind((host(2), 0))
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let (_, tunnel) = proxy(2, true, 1, dead, |c| c.scheduler_port = Some(dead.port())).await;
    let (redirect, _) = proxy(1, false, tunnel.unwrap().port(), dead, |_| {}).await;
    let got = dealer(redirect, b"ps9").await.expect_err("no READY");
    assert!(
        got.len() <= 64,
        "at most our greeting, never a READY: {} bytes",
        got.len()
    );
    let c = counters();
    assert_eq!(
        count(&c, "p3proxy_tunnel_answers_total{outcome=unreachable}"),
        1,
        "{c:?}"
    );
}

#[tokio::test]
async fn host_without_proxy_gets_direct_connections() {
    let _serial = serial().await;
    let (server, mut seen) = router(host(2), 0).await;
    // Nothing listens on the peer tunnel port: no proxy on host 2.
    let closed = TcpListener::bind((host(2), 0))
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (redirect, _) = proxy(1, false, closed, server, |_| {}).await;
    let (s, _) = dealer(redirect, b"ps9").await.expect("direct");
    let wire = payload();
    send_and_close(s, &wire).await;
    assert_eq!(timeout(T, seen.recv()).await.unwrap().unwrap().bytes, wire);
    let c = counters();
    assert_eq!(
        count(&c, "p3proxy_connections_total{route=direct}"),
        1,
        "{c:?}"
    );
    assert_eq!(count(&c, "p3proxy_connections_total{route=tunnel}"), 0);
}

#[tokio::test]
async fn upstream_refusing_means_no_byte_to_the_app_then_delivery_after_reconnect() {
    let _serial = serial().await;
    // Reserve a port, then free it: the first attempt finds nothing listening.
    let probe = TcpListener::bind((host(1), 0)).await.unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let (redirect, _) = proxy(1, false, 1, addr, |_| {}).await;
    let got = dealer(redirect, b"ps9").await.expect_err("closed");
    assert!(
        got.is_empty(),
        "not a single byte before the upstream exists"
    );
    // Now the destination comes up; libzmq would reconnect like this.
    let listener = TcpListener::bind(addr).await.unwrap();
    drop(listener);
    let (server, mut seen) = router(host(1), 0).await;
    let (redirect, _) = proxy(1, false, 1, server, |_| {}).await;
    let (s, _) = dealer(redirect, b"ps9").await.unwrap();
    let wire = data_message(5, 100);
    send_and_close(s, &wire).await;
    assert_eq!(timeout(T, seen.recv()).await.unwrap().unwrap().bytes, wire);
}

#[tokio::test]
async fn upstream_dying_in_its_handshake_means_no_ready_then_delivery_after_reconnect() {
    let _serial = serial().await;
    let (server, mut seen) = router(host(1), 1).await;
    let (redirect, _) = proxy(1, false, 1, server, |_| {}).await;
    let got = dealer(redirect, b"ps9")
        .await
        .expect_err("upstream died: no READY");
    assert!(got.len() <= 64, "greeting at most, {} bytes", got.len());
    let (s, _) = dealer(redirect, b"ps9").await.expect("second attempt");
    let wire = data_message(7, 1000);
    send_and_close(s, &wire).await;
    assert_eq!(timeout(T, seen.recv()).await.unwrap().unwrap().bytes, wire);
}

#[tokio::test]
async fn loops_are_refused() {
    let _serial = serial().await;
    let listener = TcpListener::bind((host(1), 0)).await.unwrap();
    let own = listener.local_addr().unwrap();
    drop(listener);
    // The original destination is the proxy's own redirect listener.
    let (redirect, _) = proxy(1, false, 1, own, |c| c.listen = own).await;
    assert_eq!(redirect, own);
    let got = dealer(redirect, b"ps9").await.expect_err("refused");
    assert!(got.is_empty());
    assert_eq!(
        count(
            &counters(),
            "p3proxy_connections_refused_total{reason=loop}"
        ),
        1
    );
}

#[tokio::test]
async fn a_sliced_session_whose_class_connections_never_came_ends_with_its_main_stream() {
    // The origin's class connections failed after the main stream was admitted: when it
    // closes the main stream, the destination's connection must close too (a stale one
    // would keep the app's Identity at the ROUTER, which ignores the next connection).
    let _serial = serial().await;
    let (server, mut seen) = router(host(2), 0).await;
    let (_, tunnel) = proxy(2, true, 1, server, |c| {
        c.scheduler_port = Some(server.port())
    })
    .await;
    let preamble = p3proxy::core::preamble::Preamble {
        class: 0,
        sliced: true,
        session: 7,
        target: server,
        socket_type: Bytes::from_static(b"DEALER"),
        identity: Bytes::from_static(b"ps9"),
    };
    let mut s = TcpStream::connect(tunnel.unwrap()).await.unwrap();
    s.write_all(&preamble.encode()).await.unwrap();
    // Read the whole answer (unread bytes would turn our close into a reset), then close
    // our side cleanly, as an origin does.
    let mut buf = Vec::new();
    loop {
        s.read_buf(&mut buf).await.unwrap();
        if let Ok((rest, a)) = p3proxy::core::preamble::parse_answer(&buf) {
            assert_eq!(a.outcome, p3proxy::core::preamble::Outcome::Admitted);
            assert!(rest.is_empty());
            break;
        }
    }
    s.shutdown().await.unwrap();
    let got = timeout(T, seen.recv())
        .await
        .expect("the destination's connection closed")
        .unwrap();
    assert!(got.bytes.is_empty());
}

async fn tunnel_answer(tunnel: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(tunnel).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = timeout(T, s.read_to_end(&mut out))
        .await
        .expect("closed by the proxy");
    out
}

#[tokio::test]
async fn bad_input_at_the_tunnel_port_is_refused_and_others_keep_working() {
    let _serial = serial().await;
    use p3proxy::core::preamble::{parse_answer, Outcome, Preamble};
    let (server, mut seen) = router(host(2), 0).await;
    let (_, tunnel) = proxy(2, true, 1, server, |c| {
        c.scheduler_port = Some(server.port())
    })
    .await;
    let tunnel = tunnel.unwrap();
    // A session that stays open across the bad input.
    let (redirect, _) = proxy(1, false, tunnel.port(), server, |_| {}).await;
    let (mut good, _) = dealer(redirect, b"ps9").await.unwrap();
    good.write_all(&data_message(1, 64)).await.unwrap();

    assert_eq!(
        tunnel_answer(tunnel, b"GET / HTTP/1.1\r\n\r\n").await,
        b"",
        "garbage: closed"
    );
    assert_eq!(
        tunnel_answer(tunnel, &Greeting::null(0).encode()[..20]).await,
        b"",
        "a greeting is not a preamble"
    );
    let ask = |target: SocketAddr| Preamble {
        class: 0,
        sliced: false,
        session: 1,
        target,
        socket_type: Bytes::from_static(b"DEALER"),
        identity: Bytes::from_static(b"ps9"),
    };
    for target in [
        SocketAddr::new(host(2), 1),             // unregistered
        tunnel,                                  // the proxy's own port
        SocketAddr::new(host(1), server.port()), // loopback
    ] {
        let answer = tunnel_answer(tunnel, &ask(target).encode()).await;
        assert_eq!(
            parse_answer(&answer).unwrap().1.outcome,
            Outcome::RefusedByPolicy,
            "{target}"
        );
    }
    let truncated = ask(server).encode();
    assert_eq!(
        tunnel_answer(tunnel, &truncated[..truncated.len() - 2]).await,
        b"",
        "truncated preamble times out"
    );

    let more = data_message(2, 64);
    good.write_all(&more).await.unwrap();
    send_and_close(good, &[]).await;
    let got = timeout(T, seen.recv()).await.unwrap().unwrap();
    let mut want = data_message(1, 64);
    want.extend(more);
    assert_eq!(got.bytes, want, "the good session was untouched");
    let c = counters();
    assert_eq!(
        count(&c, "p3proxy_connections_refused_total{reason=bad_preamble}"),
        3,
        "{c:?}"
    );
    assert_eq!(
        count(
            &c,
            "p3proxy_connections_refused_total{reason=unregistered_target}"
        ),
        1
    );
    assert_eq!(
        count(&c, "p3proxy_connections_refused_total{reason=own_port}"),
        1
    );
    assert_eq!(
        count(
            &c,
            "p3proxy_connections_refused_total{reason=loopback_target}"
        ),
        1
    );
}

#[tokio::test]
async fn non_zmtp_is_relayed_opaquely() {
    let _serial = serial().await;
    let listener = TcpListener::bind((host(1), 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(b"echo:").await.unwrap();
        s.write_all(&buf).await.unwrap();
    });
    let (redirect, _) = proxy(1, false, 1, addr, |_| {}).await;
    let mut s = TcpStream::connect(redirect).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    let mut out = Vec::new();
    timeout(T, s.read_to_end(&mut out)).await.unwrap().unwrap();
    assert_eq!(out, b"echo:hello");
}

#[tokio::test]
async fn server_speaks_first_protocols_are_relayed_after_the_detect_timeout() {
    let _serial = serial().await;
    let listener = TcpListener::bind((host(1), 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"220 banner\r\n").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(&buf).await.unwrap();
    });
    let (redirect, _) = proxy(1, false, 1, addr, |_| {}).await;
    let mut s = TcpStream::connect(redirect).await.unwrap();
    let mut banner = [0u8; 12];
    timeout(T, s.read_exact(&mut banner))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&banner, b"220 banner\r\n");
    s.write_all(b"QUIT").await.unwrap();
    let mut out = Vec::new();
    timeout(T, s.read_to_end(&mut out)).await.unwrap().unwrap();
    assert_eq!(out, b"QUIT");
}

#[tokio::test]
async fn opaque_ports_are_relayed_at_once_without_waiting_for_a_first_byte() {
    let _serial = serial().await;
    let listener = TcpListener::bind((host(1), 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"SSH-2.0-x\r\n").await.unwrap();
    });
    // Detection would wait 10 s for a first byte; the port is declared opaque.
    let (redirect, _) = proxy(1, false, 1, addr, |c| {
        c.detect_timeout_ms = 10_000;
        c.opaque_ports = vec![addr.port()];
    })
    .await;
    let started = std::time::Instant::now();
    let mut s = TcpStream::connect(redirect).await.unwrap();
    let mut banner = [0u8; 11];
    timeout(T, s.read_exact(&mut banner))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&banner, b"SSH-2.0-x\r\n");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        count(&counters(), "p3proxy_connections_total{route=opaque}"),
        1
    );
}

#[tokio::test]
async fn bad_input_at_the_redirect_listener_is_refused_and_others_keep_working() {
    let _serial = serial().await;
    let (server, mut seen) = router(host(1), 0).await;
    let (redirect, _) = proxy(1, false, 1, server, |_| {}).await;
    let (mut good, _) = dealer(redirect, b"ps9").await.unwrap();
    good.write_all(&data_message(1, 64)).await.unwrap();

    // A truncated greeting: our greeting comes back, then the connection is closed
    // at the handshake deadline, without READY.
    let mut s = TcpStream::connect(redirect).await.unwrap();
    s.write_all(&Greeting::null(3).encode()[..30])
        .await
        .unwrap();
    let mut got = Vec::new();
    timeout(T, s.read_to_end(&mut got))
        .await
        .expect("closed at the deadline")
        .unwrap();
    assert_eq!(
        got,
        Greeting::null(0).encode(),
        "our greeting, never a READY"
    );
    // A greeting followed by garbage instead of READY.
    let mut s = TcpStream::connect(redirect).await.unwrap();
    let mut bad = Greeting::null(3).encode().to_vec();
    bad.extend([0x08, 0x01, 0x00]);
    s.write_all(&bad).await.unwrap();
    let mut got = Vec::new();
    timeout(T, s.read_to_end(&mut got)).await.unwrap().unwrap();
    assert_eq!(got.len(), 64, "closed after the greeting");

    let more = data_message(2, 64);
    good.write_all(&more).await.unwrap();
    send_and_close(good, &[]).await;
    let mut want = data_message(1, 64);
    want.extend(more);
    assert_eq!(
        timeout(T, seen.recv()).await.unwrap().unwrap().bytes,
        want,
        "the good session was untouched"
    );
    let c = counters();
    assert_eq!(
        count(
            &c,
            "p3proxy_connections_refused_total{reason=handshake_timeout}"
        ),
        1,
        "{c:?}"
    );
    assert_eq!(
        count(
            &c,
            "p3proxy_connections_refused_total{reason=downstream_handshake}"
        ),
        1
    );
    assert_eq!(
        count(&c, "p3proxy_parse_errors_total{kind=zmtp_handshake}"),
        1
    );
}

// Hostile peers (issue 17): each attack closes its own connection pair with a clear
// metric, never forwards a partial message, and leaves another session untouched.

/// Reads until the proxy closes the connection (a reset counts as closed).
async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = timeout(T, s.read_to_end(&mut got))
        .await
        .expect("closed by the proxy");
    got
}

/// A session that stays open across an attack, and the check that it was untouched.
async fn good_session(redirect: SocketAddr) -> TcpStream {
    let (mut good, _) = dealer(redirect, b"ps9").await.unwrap();
    good.write_all(&data_message(1, 64)).await.unwrap();
    good
}

async fn good_session_untouched(good: TcpStream, seen: &mut mpsc::UnboundedReceiver<Seen>) {
    let more = data_message(2, 64);
    send_and_close(good, &more).await;
    let mut want = data_message(1, 64);
    want.extend(more);
    loop {
        let got = timeout(T, seen.recv()).await.unwrap().unwrap();
        if got.identity == Bytes::from_static(b"ps9") {
            assert_eq!(got.bytes, want, "the good session was untouched");
            return;
        }
        assert!(
            got.bytes.is_empty(),
            "an attacker's partial message was forwarded"
        );
    }
}

#[tokio::test]
async fn hostile_framing_closes_only_its_own_connection_pair() {
    let _serial = serial().await;
    let (server, mut seen) = router(host(1), 0).await;
    let (redirect, _) = proxy(1, false, 1, server, |_| {}).await;
    let good = good_session(redirect).await;
    let before = count(&counters(), "p3proxy_parse_errors_total{kind=zmtp_framing}");

    // A frame length near 2^64: refused from its header, nothing allocated.
    let mut huge = vec![0x03];
    huge.extend((u64::MAX - 1).to_be_bytes());
    // A meta that claims 5000 data frames, and sends them.
    let meta = Meta {
        head: Some(0),
        request: Some(true),
        push: Some(true),
        data_type: vec![3; 5000],
        ..Default::default()
    };
    let mut claims = ZmtpMessage::from_bodies([Bytes::from(meta.encode())]).encode();
    claims[0] |= 0x01; // MORE: its data frames follow
    for _ in 0..5000 {
        claims.extend([0x01, 0x04, 1, 0, 0, 0]);
    }
    // An endless MORE chain of empty frames.
    let endless: Vec<u8> = std::iter::repeat_n([0x01u8, 0x00], 100_000)
        .flatten()
        .collect();
    for (what, attack) in [
        ("huge frame", huge),
        ("5000 frames", claims),
        ("endless MORE", endless),
    ] {
        let (mut s, _) = dealer(redirect, b"ps11").await.unwrap();
        let _ = s.write_all(&attack).await;
        until_closed(&mut s).await;
        let got = timeout(T, seen.recv()).await.expect(what).unwrap();
        assert_eq!(got.identity, Bytes::from_static(b"ps11"));
        assert!(got.bytes.is_empty(), "{what}: nothing forwarded");
    }
    assert_eq!(
        count(&counters(), "p3proxy_parse_errors_total{kind=zmtp_framing}") - before,
        3
    );
    good_session_untouched(good, &mut seen).await;
}

#[tokio::test]
async fn a_slowloris_handshake_is_cut_at_the_deadline() {
    let _serial = serial().await;
    let (server, mut seen) = router(host(1), 0).await;
    let (redirect, _) = proxy(1, false, 1, server, |_| {}).await;
    let good = good_session(redirect).await;
    let before = count(
        &counters(),
        "p3proxy_connections_refused_total{reason=handshake_timeout}",
    );
    let mut s = TcpStream::connect(redirect).await.unwrap();
    let greeting = Greeting::null(3).encode();
    let started = std::time::Instant::now();
    // One byte every 100 ms: the whole greeting and READY would take 10 s.
    let mut closed = false;
    for b in greeting.iter().chain(&[0u8; 40]) {
        if s.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        if let Ok(Ok(0)) = timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            closed = true;
            break;
        }
    }
    assert!(closed, "closed before the trickle ended");
    // The handshake deadline of these tests is 2 s.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        count(
            &counters(),
            "p3proxy_connections_refused_total{reason=handshake_timeout}"
        ) - before,
        1
    );
    good_session_untouched(good, &mut seen).await;
}

#[tokio::test]
async fn a_peer_that_resets_mid_message_forwards_nothing_of_it() {
    let _serial = serial().await;
    let (server, mut seen) = router(host(1), 0).await;
    let (redirect, _) = proxy(1, false, 1, server, |_| {}).await;
    let good = good_session(redirect).await;
    let (s, _) = dealer(redirect, b"ps11").await.unwrap();
    let message = data_message(7, 100_000);
    let mut s = s;
    s.write_all(&message[..message.len() / 2]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Reset: close with a zero linger.
    let s = s.into_std().unwrap();
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
    let got = timeout(T, seen.recv())
        .await
        .expect("the server's connection closed too")
        .unwrap();
    assert_eq!(got.identity, Bytes::from_static(b"ps11"));
    assert!(got.bytes.is_empty(), "half a message was forwarded");
    good_session_untouched(good, &mut seen).await;
}

/// An admitted sliced tunnel session's main connection, straight to the tunnel port.
async fn sliced_session(tunnel: SocketAddr, target: SocketAddr, session: u64) -> TcpStream {
    sliced_connection(tunnel, target, session, 0).await
}

/// Connection `class` of a sliced tunnel session (0: its main stream), admitted.
async fn sliced_connection(
    tunnel: SocketAddr,
    target: SocketAddr,
    session: u64,
    class: u8,
) -> TcpStream {
    use p3proxy::core::preamble::{parse_answer, Outcome, Preamble};
    let preamble = Preamble {
        class,
        sliced: true,
        session,
        target,
        socket_type: Bytes::from_static(b"DEALER"),
        identity: Bytes::from_static(b"ps11"),
    };
    let mut s = TcpStream::connect(tunnel).await.unwrap();
    s.write_all(&preamble.encode()).await.unwrap();
    let mut buf = Vec::new();
    loop {
        assert!(s.read_buf(&mut buf).await.unwrap() > 0, "answered");
        if let Ok((_, a)) = parse_answer(&buf) {
            assert_eq!(a.outcome, Outcome::Admitted);
            return s;
        }
    }
}

#[tokio::test]
async fn hostile_tunnel_frames_close_their_session_only() {
    use p3proxy::core::slice::{Announce, SliceFrame};
    let _serial = serial().await;
    let (server, mut seen) = router(host(2), 0).await;
    let (_, tunnel) = proxy(2, true, 1, server, |c| {
        c.scheduler_port = Some(server.port());
        c.reassembly_bytes = 200_000;
    })
    .await;
    let tunnel = tunnel.unwrap();
    let (redirect, _) = proxy(1, false, tunnel.port(), server, |_| {}).await;
    let good = good_session(redirect).await;
    let before = count(
        &counters(),
        "p3proxy_parse_errors_total{kind=tunnel_reassembly}",
    );
    let announce = |seq, total| {
        SliceFrame::Announce(Announce {
            seq,
            total,
            priority: 1,
            fence: false,
            keys: vec![3],
            part: None,
        })
        .encode()
    };
    let slice = |seq, offset, len: usize| {
        SliceFrame::Slice {
            seq,
            offset,
            payload: Bytes::from(vec![0u8; len]),
        }
        .encode()
    };
    // A slice pointing past its message.
    let mut past = announce(0, 100);
    past.extend(slice(0, 90, 50));
    // Slices the receiver must hold beyond its reassembly bound (200 KB): a message
    // that cannot be delivered before an earlier one that never completes.
    let mut big = announce(0, 100);
    big.extend(announce(1, 10_000_000));
    for i in 0..4u64 {
        big.extend(slice(1, i * 100_000, 100_000));
    }
    for (session, (what, attack)) in [
        (101, ("slice past its message", past)),
        (102, ("over the memory bound", big)),
    ] {
        let mut s = sliced_session(tunnel, server, session).await;
        let _ = s.write_all(&attack).await;
        until_closed(&mut s).await;
        let got = timeout(T, seen.recv()).await.expect(what).unwrap();
        assert!(got.bytes.is_empty(), "{what}: nothing forwarded");
    }
    let c = counters();
    assert_eq!(
        count(&c, "p3proxy_parse_errors_total{kind=tunnel_reassembly}") - before,
        2
    );
    assert_eq!(
        count(&c, "p3proxy_reassembly_bytes"),
        0,
        "memory given back"
    );
    good_session_untouched(good, &mut seen).await;
}

#[tokio::test]
async fn an_order_record_passes_on_the_main_stream_and_closes_a_class_connection() {
    use p3proxy::core::job_order::OrderRecord;
    use p3proxy::core::slice::{Announce, SliceFrame};
    let _serial = serial().await;
    let (server, mut seen) = router(host(2), 0).await;
    let (_, tunnel) = proxy(2, true, 1, server, |c| {
        c.scheduler_port = Some(server.port());
    })
    .await;
    let tunnel = tunnel.unwrap();
    // Records taken since the last look (a snapshot drains the counters).
    let received = || {
        count(
            &counters(),
            "p3proxy_order_records_total{direction=received}",
        )
    };
    let _ = received();
    let order = SliceFrame::Order(OrderRecord {
        origin: 9,
        version: 1,
        keys: vec![(3 << 16, 1), (4 << 16, 2)],
    })
    .encode();
    let message = data_message(5, 300);
    let mut main = SliceFrame::Announce(Announce {
        seq: 0,
        total: message.len() as u64,
        priority: 1,
        fence: false,
        keys: vec![3],
        part: None,
    })
    .encode();
    // Between a message's announcement and its slice, as the egress may write it.
    main.extend(&order);
    main.extend(
        SliceFrame::Slice {
            seq: 0,
            offset: 0,
            payload: Bytes::from(message.clone()),
        }
        .encode(),
    );
    let mut s = sliced_session(tunnel, server, 201).await;
    s.write_all(&main).await.unwrap();
    s.shutdown().await.unwrap();
    let got = timeout(T, seen.recv()).await.expect("delivered").unwrap();
    assert_eq!(got.bytes, message, "the message around the order record");
    assert_eq!(received(), 1);

    // On a class connection it is refused: the session closes, nothing is delivered.
    let mut main = sliced_session(tunnel, server, 202).await;
    let mut class = sliced_connection(tunnel, server, 202, 1).await;
    class.write_all(&order).await.unwrap();
    until_closed(&mut main).await;
    let got = timeout(T, seen.recv()).await.expect("closed").unwrap();
    assert!(got.bytes.is_empty());
    assert_eq!(received(), 0, "not taken off the main stream");
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let _serial = serial().await;
    let (server, _seen) = router(host(1), 0).await;
    let (redirect, _) = proxy(1, false, 1, server, |c| c.max_connections = 2).await;
    let (first, _) = dealer(redirect, b"ps9").await.unwrap();
    let (_second, _) = dealer(redirect, b"ps11").await.unwrap();
    // The third is accepted by the kernel, not served by the proxy.
    let mut third = TcpStream::connect(redirect).await.unwrap();
    third.write_all(&Greeting::null(3).encode()).await.unwrap();
    let mut buf = [0u8; 64];
    assert!(
        timeout(Duration::from_millis(500), third.read_exact(&mut buf))
            .await
            .is_err(),
        "served beyond the limit"
    );
    drop(first);
    timeout(T, third.read_exact(&mut buf))
        .await
        .expect("served once a connection closed")
        .unwrap();
    assert_eq!(buf, Greeting::null(0).encode());
}
