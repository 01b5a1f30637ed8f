//! Load generator for the proxy-cost benchmark: a ps-lite DEALER that streams push
//! requests, and a ROUTER that receives and counts them. Not part of the product.
//!
//!   p3proxy-loadgen recv --listen ADDR
//!   p3proxy-loadgen send --to ADDR --size BYTES --count N [--identity ps9]
//!
//! Both print one JSON line: bytes, messages and seconds.

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
        Cmd::Recv { listen } => {
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
                let meta = Meta {
                    head: Some(0),
                    request: Some(true),
                    push: Some(true),
                    simple_app: Some(false),
                    app_id: Some(0),
                    timestamp: Some(ts as i32),
                    data_type: vec![8, 11, 3],
                    customer_id: Some(0),
                    pull: Some(false),
                    priority: Some(0),
                    ..Meta::default()
                };
                let keys = Bytes::copy_from_slice(&(ts % 64).to_le_bytes());
                let lens = Bytes::copy_from_slice(&(size as i32).to_le_bytes());
                let msg = PsMessage::new(meta, vec![keys, vals.clone(), lens]).to_zmtp();
                // Headers and small frames copied, the value frame written as is.
                for piece in msg.wire_pieces() {
                    s.write_all(&piece).await?;
                }
                bytes += msg.encoded_len() as u64;
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
    }
    Ok(())
}
