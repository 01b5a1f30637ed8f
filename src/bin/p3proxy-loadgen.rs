//! Load generator for the proxy-cost benchmark and the scheduling tests: a ps-lite
//! DEALER that streams push requests, a ROUTER that receives and counts them, and a
//! packet capture. Not part of the product.
//!
//!   p3proxy-loadgen recv --listen ADDR [--arrivals]
//!   p3proxy-loadgen send --to ADDR --size BYTES --count N [--identity ps9]
//!   p3proxy-loadgen preempt --to ADDR --big BYTES --small BYTES
//!   p3proxy-loadgen capture --iface IF --port PORT --seconds S
//!
//! Each prints JSON lines: bytes, messages and seconds; with `--arrivals`, each
//! message's key and arrival time (Unix seconds); `preempt` sends a big push of key 29
//! then a small push of key 0 and prints when the small one was handed over; `capture`
//! prints, per TCP connection to or from PORT, its packets, bytes and DSCP values.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use p3proxy::parsers::pslite::{Meta, PsMessage};
use p3proxy::parsers::zmtp::{Command, Greeting, Limits, StreamDecoder, StreamEvent};
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
    },
}

async fn handshake(
    s: &mut TcpStream,
    socket_type: &[u8],
    identity: &[u8],
) -> anyhow::Result<StreamDecoder> {
    s.write_all(&Greeting::null(identity.len()).encode())
        .await?;
    s.write_all(&Command::ready(&[("Socket-Type", socket_type), ("Identity", identity)]).encode())
        .await?;
    let mut dec = StreamDecoder::new(Limits::default());
    loop {
        if s.read_buf(dec.buffer_mut()).await? == 0 {
            anyhow::bail!("peer closed during the handshake");
        }
        while let Some(ev) = dec.next_event()? {
            if let StreamEvent::Command(_) = ev {
                return Ok(dec);
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Recv { listen, arrivals } => {
            let listener = TcpListener::bind(listen).await?;
            println!("{{\"listening\": \"{}\"}}", listener.local_addr()?);
            let (mut s, _) = listener.accept().await?;
            let mut dec = handshake(&mut s, b"ROUTER", b"").await?;
            let (mut bytes, mut messages) = (0u64, 0u64);
            let mut start = None;
            loop {
                while let Some(ev) = dec.next_event()? {
                    if let StreamEvent::Message(m) = ev {
                        messages += 1;
                        bytes += m.encoded_len() as u64;
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
                if s.read_buf(dec.buffer_mut()).await? == 0 {
                    break;
                }
                start.get_or_insert_with(Instant::now);
            }
            let secs = start.map_or(0.0, |t| t.elapsed().as_secs_f64());
            println!("{{\"bytes\": {bytes}, \"messages\": {messages}, \"secs\": {secs}}}");
        }
        Cmd::Send {
            to,
            size,
            count,
            identity,
        } => {
            let mut s = TcpStream::connect(to).await?;
            s.set_nodelay(true)?;
            handshake(&mut s, b"DEALER", identity.as_bytes()).await?;
            let vals = Bytes::from(vec![0x3fu8; size]);
            let start = Instant::now();
            let mut bytes = 0u64;
            for ts in 0..count {
                bytes += write_push(&mut s, ts as i32, ts % 64, vals.clone()).await?;
            }
            s.shutdown().await?;
            // Wait for the receiver's side to close: everything arrived.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            println!(
                "{{\"bytes\": {bytes}, \"messages\": {count}, \"secs\": {}}}",
                start.elapsed().as_secs_f64()
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
    }
    Ok(())
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

/// Writes one push request of key `key`; returns its wire length.
async fn write_push(s: &mut TcpStream, ts: i32, key: u64, vals: Bytes) -> anyhow::Result<u64> {
    let meta = Meta {
        head: Some(0),
        request: Some(true),
        push: Some(true),
        simple_app: Some(false),
        app_id: Some(0),
        timestamp: Some(ts),
        data_type: vec![8, 11, 3],
        customer_id: Some(0),
        pull: Some(false),
        priority: Some(0),
        ..Meta::default()
    };
    let lens = Bytes::copy_from_slice(&(vals.len() as i32).to_le_bytes());
    let keys = Bytes::copy_from_slice(&key.to_le_bytes());
    let msg = PsMessage::new(meta, vec![keys, vals, lens]).to_zmtp();
    // Headers and small frames copied, the value frame written as is.
    for piece in msg.wire_pieces() {
        s.write_all(&piece).await?;
    }
    Ok(msg.encoded_len() as u64)
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
