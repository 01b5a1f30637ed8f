//! Load generator for the proxy-cost benchmark and the scheduling tests: a ps-lite
//! DEALER that streams push requests, a ROUTER that receives and counts them, and a
//! packet capture. Not part of the product.
//!
//!   p3proxy-loadgen recv --listen ADDR [--arrivals] [--no-checksum]
//!   p3proxy-loadgen send --to ADDR --size BYTES --count N [--identity ps9] [--rate GBITS] [--no-checksum]
//!   p3proxy-loadgen relay --listen ADDR --to ADDR [--splice]
//!   p3proxy-loadgen preempt --to ADDR --big BYTES --small BYTES
//!   p3proxy-loadgen capture --iface IF --port PORT --seconds S
//!   p3proxy-loadgen register --to SCHEDULER --host IP --port PORT
//!   p3proxy-loadgen tunnel --to PROXY:TUNNELPORT --target ADDR
//!
//! `send` and `recv` also print a checksum of every message's bytes, in order per key
//! (`send` varies the values from message to message; messages of different keys may
//! overtake each other through a scheduling proxy, those of one key may not), so a soak
//! test can prove that nothing was altered, lost or reordered; `register` sends one ADD_NODE registration as a new
//! server would (for the forged-registration tests).
//!
//! Each prints JSON lines: bytes, messages and seconds; with `--arrivals`, each
//! message's key and arrival time (Unix seconds); `preempt` sends a big push of key 29
//! then a small push of key 0 and prints when the small one was handed over; `capture`
//! prints, per TCP connection to or from PORT, its packets, bytes and DSCP values.
//! `relay` is the proxy-cost benchmark's floor: it relays one connection byte for byte,
//! with `read`/`write` or with `splice(2)` through a pipe, and nothing else.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use p3proxy::parsers::zmtp::{StreamDecoder, StreamEvent};
use p3proxy::testkit;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept one connection as a ps-lite ROUTER and count what arrives until EOF.
    Recv {
        #[arg(long)]
        listen: SocketAddr,
        /// Print each message's first key and arrival time.
        #[arg(long)]
        arrivals: bool,
        /// Skip the checksum (timed runs: it costs CPU the benchmark would count).
        #[arg(long)]
        no_checksum: bool,
    },
    /// Accept one connection and relay it to TO, both directions, until both end.
    Relay {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        to: SocketAddr,
        /// Move bytes with splice(2) through a pipe instead of read/write.
        #[arg(long)]
        splice: bool,
    },
    /// Send a big push of the last layer's key, then a small push of the first layer's.
    Preempt {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        big: usize,
        #[arg(long)]
        small: usize,
    },
    /// Capture TCP packets to or from PORT on IF for SECONDS; report DSCP per connection.
    Capture {
        #[arg(long)]
        iface: String,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        seconds: f64,
    },
    /// Connect as a ps-lite DEALER and send COUNT push requests of SIZE value bytes.
    Send {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        size: usize,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value = "ps9")]
        identity: String,
        /// Offered rate in Gbit/s (paced per message); unlimited without it.
        #[arg(long)]
        rate: Option<f64>,
        /// Skip the checksum (timed runs).
        #[arg(long)]
        no_checksum: bool,
    },
    /// Ask a proxy's tunnel port for TARGET, as a peer proxy would; print its answer.
    Tunnel {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        target: SocketAddr,
    },
    /// Send one ADD_NODE registration for HOST:PORT to a scheduler, as a new server.
    Register {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        host: String,
        #[arg(long)]
        port: i32,
    },
}

/// Checksums of messages, order-sensitive within each key (the first key of the message).
#[derive(Debug, Default)]
struct PerKey(std::collections::BTreeMap<u64, Checksum>);

impl PerKey {
    fn add(&mut self, msg: &p3proxy::parsers::zmtp::ZmtpMessage) {
        let key = msg
            .frames
            .get(1)
            .and_then(|f| f.body.get(..8))
            .map_or(u64::MAX, |b| {
                u64::from_le_bytes(b.try_into().expect("8 bytes"))
            });
        let sum = self.0.entry(key).or_insert_with(Checksum::new);
        for f in &msg.frames {
            sum.add(&f.body);
        }
    }

    fn total(&self) -> u64 {
        let mut all = Checksum::new();
        for (k, s) in &self.0 {
            all.add(&k.to_le_bytes());
            all.add(&s.0.to_le_bytes());
        }
        all.0
    }
}

/// An order-sensitive checksum of byte strings (FNV-style, eight bytes at a time).
#[derive(Debug, Clone, Copy)]
struct Checksum(u64);

impl Checksum {
    fn new() -> Checksum {
        Checksum(0xcbf2_9ce4_8422_2325)
    }
    fn add(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            self.0 = (self.0 ^ w)
                .wrapping_mul(0x0000_0100_0000_01b3)
                .rotate_left(23);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 ^= bytes.len() as u64;
    }
}

async fn handshake(
    s: &mut TcpStream,
    socket_type: &[u8],
    identity: &[u8],
) -> anyhow::Result<StreamDecoder> {
    match testkit::handshake(s, socket_type, identity).await {
        Ok((dec, _)) => Ok(dec),
        Err(_) => anyhow::bail!("peer closed during the handshake"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Relay { listen, to, splice } => relay(listen, to, splice)?,
        Cmd::Recv {
            listen,
            arrivals,
            no_checksum,
        } => {
            let listener = TcpListener::bind(listen).await?;
            println!("{{\"listening\": \"{}\"}}", listener.local_addr()?);
            let (mut s, _) = listener.accept().await?;
            let mut dec = handshake(&mut s, b"ROUTER", b"").await?;
            let (mut bytes, mut messages) = (0u64, 0u64);
            let mut sum = PerKey::default();
            let mut start = None;
            loop {
                while let Some(ev) = dec.next_event()? {
                    if let StreamEvent::Message(m) = ev {
                        messages += 1;
                        bytes += m.encoded_len() as u64;
                        if !no_checksum {
                            sum.add(&m);
                        }
                        if arrivals {
                            let key = m
                                .frames
                                .get(1)
                                .and_then(|f| f.body.get(..8))
                                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
                            println!(
                                "{{\"arrival\": {}, \"key\": {}, \"bytes\": {}}}",
                                unix_now(),
                                key.map_or("null".into(), |k| k.to_string()),
                                m.encoded_len()
                            );
                        }
                    }
                }
                if s.read_buf(dec.buffer_for_read()).await? == 0 {
                    break;
                }
                start.get_or_insert_with(Instant::now);
            }
            let secs = start.map_or(0.0, |t| t.elapsed().as_secs_f64());
            println!(
                "{{\"bytes\": {bytes}, \"messages\": {messages}, \"secs\": {secs}, \"checksum\": \"{:016x}\"}}",
                sum.total()
            );
        }
        Cmd::Send {
            to,
            size,
            count,
            identity,
            rate,
            no_checksum,
        } => {
            let mut s = TcpStream::connect(to).await?;
            s.set_nodelay(true)?;
            handshake(&mut s, b"DEALER", identity.as_bytes()).await?;
            // Values that differ from message to message: windows of a pseudo-random block.
            let mut state = 0x9e37_79b9_7f4a_7c15u64;
            let block: Vec<u8> = (0..size + 4096)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let block = Bytes::from(block);
            let start = Instant::now();
            let mut bytes = 0u64;
            let mut sum = PerKey::default();
            for ts in 0..count {
                let at = (ts as usize * 7) % 4096;
                let vals = block.slice(at..at + size);
                let msg = push(ts as i32, ts % 64, vals);
                if !no_checksum {
                    sum.add(&msg);
                }
                if let Some(gbits) = rate {
                    let due = start
                        + std::time::Duration::from_secs_f64(bytes as f64 * 8.0 / (gbits * 1e9));
                    tokio::time::sleep_until(due.into()).await;
                }
                bytes += write_message(&mut s, &msg).await?;
            }
            if let Some(gbits) = rate {
                // The last message takes its time on the wire too.
                let due =
                    start + std::time::Duration::from_secs_f64(bytes as f64 * 8.0 / (gbits * 1e9));
                tokio::time::sleep_until(due.into()).await;
            }
            s.shutdown().await?;
            // Wait for the receiver's side to close: everything arrived.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            println!(
                "{{\"bytes\": {bytes}, \"messages\": {count}, \"secs\": {}, \"checksum\": \"{:016x}\"}}",
                start.elapsed().as_secs_f64(),
                sum.total()
            );
        }
        Cmd::Preempt { to, big, small } => {
            let mut s = TcpStream::connect(to).await?;
            s.set_nodelay(true)?;
            handshake(&mut s, b"DEALER", b"ps9").await?;
            write_push(&mut s, 1, 29, Bytes::from(vec![0x3fu8; big])).await?;
            write_push(&mut s, 2, 0, Bytes::from(vec![0x3fu8; small])).await?;
            println!("{{\"small_sent\": {}}}", unix_now());
            s.shutdown().await?;
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        }
        Cmd::Capture {
            iface,
            port,
            seconds,
        } => capture(&iface, port, seconds)?,
        Cmd::Tunnel { to, target } => {
            use p3proxy::core::preamble::{parse_answer, Preamble};
            let mut s = TcpStream::connect(to).await?;
            let preamble = Preamble {
                class: 0,
                sliced: false,
                session: 1,
                target,
                socket_type: Bytes::from_static(b"DEALER"),
                identity: Bytes::from_static(b"ps9"),
            };
            s.write_all(&preamble.encode()).await?;
            let mut buf = Vec::new();
            let outcome = loop {
                match tokio::time::timeout(std::time::Duration::from_secs(10), s.read_buf(&mut buf))
                    .await
                {
                    Ok(Ok(0)) | Ok(Err(_)) => break "closed".to_string(),
                    Err(_) => break "no answer".to_string(),
                    Ok(Ok(_)) => {}
                }
                if let Ok((_, a)) = parse_answer(&buf) {
                    break format!("{:?}", a.outcome);
                }
            };
            println!("{{\"target\": \"{target}\", \"outcome\": \"{outcome}\"}}");
        }
        Cmd::Register { to, host, port } => {
            let mut s = TcpStream::connect(to).await?;
            handshake(&mut s, b"DEALER", b"").await?;
            s.write_all(&testkit::server_registration(&host, port).encode())
                .await?;
            s.shutdown().await?;
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            println!("{{\"registered\": \"{host}:{port}\"}}");
        }
    }
    Ok(())
}

/// Relays one accepted connection to `to`, both directions on their own threads.
fn relay(listen: SocketAddr, to: SocketAddr, splice: bool) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(listen)?;
    println!("{{\"listening\": \"{}\"}}", listener.local_addr()?);
    let (a, _) = listener.accept()?;
    let b = std::net::TcpStream::connect(to)?;
    a.set_nodelay(true)?;
    b.set_nodelay(true)?;
    let (a2, b2) = (a.try_clone()?, b.try_clone()?);
    let back = std::thread::spawn(move || copy_stream(b2, a2, splice));
    let sent = copy_stream(a, b, splice)?;
    let returned = back.join().expect("relay thread")?;
    println!("{{\"relayed\": {sent}, \"returned\": {returned}}}");
    Ok(())
}

/// Copies `from` to `to` until EOF, then shuts `to`'s write side.
fn copy_stream(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    splice: bool,
) -> std::io::Result<u64> {
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let mut total = 0u64;
    if splice {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two descriptors; closed below.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a pipe this process owns.
        unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 1 << 20) };
        let result = loop {
            // SAFETY: valid descriptors, no offsets (sockets and pipes).
            let n = unsafe {
                libc::splice(
                    from.as_raw_fd(),
                    std::ptr::null_mut(),
                    fds[1],
                    std::ptr::null_mut(),
                    1 << 20,
                    libc::SPLICE_F_MOVE,
                )
            };
            if n < 0 {
                break Err(std::io::Error::last_os_error());
            }
            if n == 0 {
                break Ok(total);
            }
            let mut left = n as usize;
            while left > 0 {
                // SAFETY: as above.
                let m = unsafe {
                    libc::splice(
                        fds[0],
                        std::ptr::null_mut(),
                        to.as_raw_fd(),
                        std::ptr::null_mut(),
                        left,
                        libc::SPLICE_F_MOVE,
                    )
                };
                if m <= 0 {
                    return Err(std::io::Error::last_os_error());
                }
                left -= m as usize;
            }
            total += n as u64;
        };
        // SAFETY: closing the pipe made above.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        result?;
    } else {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = from.read(&mut buf)?;
            if n == 0 {
                break;
            }
            to.write_all(&buf[..n])?;
            total += n as u64;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
    Ok(total)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

/// Writes one push request of key `key`; returns its wire length.
async fn write_push(s: &mut TcpStream, ts: i32, key: u64, vals: Bytes) -> anyhow::Result<u64> {
    write_message(s, &push(ts, key, vals)).await
}

/// Writes a message (headers and small frames copied, the value frame as is).
async fn write_message(
    s: &mut TcpStream,
    msg: &p3proxy::parsers::zmtp::ZmtpMessage,
) -> anyhow::Result<u64> {
    Ok(testkit::write_message(s, msg).await?)
}

/// A push request of key `key`.
fn push(ts: i32, key: u64, vals: Bytes) -> p3proxy::parsers::zmtp::ZmtpMessage {
    testkit::push_request(ts, key, vals)
}

/// Per TCP connection (by its two endpoints) seen on `iface` to or from `port`: packets,
/// bytes and the DSCP values its packets carried.
fn capture(iface: &str, port: u16, seconds: f64) -> anyhow::Result<()> {
    use pnet_datalink::Channel;
    use pnet_packet::ethernet::{EtherTypes, EthernetPacket};
    use pnet_packet::ipv4::Ipv4Packet;
    use pnet_packet::tcp::TcpPacket;
    use pnet_packet::Packet;
    use std::collections::{BTreeMap, BTreeSet};

    let interface = pnet_datalink::interfaces()
        .into_iter()
        .find(|i| i.name == iface)
        .ok_or_else(|| anyhow::anyhow!("no interface {iface}"))?;
    let config = pnet_datalink::Config {
        read_timeout: Some(std::time::Duration::from_millis(100)),
        ..Default::default()
    };
    let Channel::Ethernet(_, mut rx) = pnet_datalink::channel(&interface, config)? else {
        anyhow::bail!("{iface}: not an Ethernet channel");
    };
    println!("{{\"capturing\": \"{iface}\"}}");
    type Conn = (String, u16, String, u16);
    let mut seen: BTreeMap<Conn, (u64, u64, BTreeSet<u8>)> = BTreeMap::new();
    let deadline = Instant::now() + std::time::Duration::from_secs_f64(seconds);
    while Instant::now() < deadline {
        let frame = match rx.next() {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(e) => return Err(e.into()),
        };
        let Some(eth) = EthernetPacket::new(frame) else {
            continue;
        };
        if eth.get_ethertype() != EtherTypes::Ipv4 {
            continue;
        }
        let Some(ip) = Ipv4Packet::new(eth.payload()) else {
            continue;
        };
        let Some(tcp) = TcpPacket::new(ip.payload()) else {
            continue;
        };
        if tcp.get_source() != port && tcp.get_destination() != port {
            continue;
        }
        let key = (
            ip.get_source().to_string(),
            tcp.get_source(),
            ip.get_destination().to_string(),
            tcp.get_destination(),
        );
        let e = seen.entry(key).or_default();
        e.0 += 1;
        e.1 += u64::from(ip.get_total_length());
        e.2.insert(ip.get_dscp());
    }
    for ((src, sport, dst, dport), (packets, bytes, dscp)) in seen {
        let dscp: Vec<String> = dscp.iter().map(u8::to_string).collect();
        println!(
            "{{\"src\": \"{src}\", \"sport\": {sport}, \"dst\": \"{dst}\", \"dport\": {dport}, \"packets\": {packets}, \"bytes\": {bytes}, \"dscp\": [{}]}}",
            dscp.join(", ")
        );
    }
    Ok(())
}
