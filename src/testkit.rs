//! Fake ps-lite peers, shared by the in-process tests and the load generator
//! (`p3proxy-loadgen`): the ZMTP handshake a DEALER or ROUTER makes, MXNet-shaped push
//! requests, and the ADD_NODE registration a new server sends its scheduler. Not used by
//! the proxy itself.

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::parsers::pslite::{Control, Meta, Node, PsMessage, K_EMPTY};
use crate::parsers::zmtp::{Command, Greeting, Limits, StreamDecoder, StreamEvent, ZmtpMessage};

/// Greets and sends READY at once (as libzmq does), then reads until the peer's READY.
/// Returns the decoder (holding whatever followed the peer's READY) and that READY, or,
/// if the peer closed or the connection failed first, the bytes it sent before.
pub async fn handshake(
    s: &mut TcpStream,
    socket_type: &[u8],
    identity: &[u8],
) -> Result<(StreamDecoder, Command), Vec<u8>> {
    let hello = [
        Greeting::null(identity.len()).encode().to_vec(),
        Command::ready(&[("Socket-Type", socket_type), ("Identity", identity)]).encode(),
    ]
    .concat();
    if s.write_all(&hello).await.is_err() {
        return Err(Vec::new());
    }
    let mut dec = StreamDecoder::new(Limits::default());
    let mut got = Vec::new();
    loop {
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            return Err(got);
        }
        got.extend_from_slice(&buf[..n]);
        dec.push(&buf[..n]);
        loop {
            match dec.next_event() {
                Ok(Some(StreamEvent::Command(c))) => return Ok((dec, c)),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return Err(got),
            }
        }
    }
}

/// A push request as MXNet's `KVWorker` sends it (float32, dense, one key): meta, the
/// key, the values and their length.
pub fn push_request(timestamp: i32, key: u64, vals: Bytes) -> ZmtpMessage {
    let meta = Meta {
        head: Some(0),
        request: Some(true),
        push: Some(true),
        simple_app: Some(false),
        app_id: Some(0),
        timestamp: Some(timestamp),
        data_type: vec![8, 11, 3],
        customer_id: Some(0),
        pull: Some(false),
        priority: Some(0),
        ..Meta::default()
    };
    let lens = Bytes::copy_from_slice(&(vals.len() as i32).to_le_bytes());
    let keys = Bytes::copy_from_slice(&key.to_le_bytes());
    PsMessage::new(meta, vec![keys, vals, lens]).to_zmtp()
}

/// The ADD_NODE a new server at `host:port` sends its scheduler.
pub fn server_registration(host: &str, port: i32) -> ZmtpMessage {
    let meta = Meta {
        head: Some(K_EMPTY),
        control: Some(Control {
            cmd: Some(2),
            node: vec![Node {
                role: Some(0),
                id: Some(K_EMPTY),
                hostname: Some(Bytes::from(host.to_string())),
                port: Some(port),
                is_recovery: Some(false),
                customer_id: Some(0),
                ..Node::default()
            }],
            ..Control::default()
        }),
        request: Some(false),
        timestamp: Some(0),
        customer_id: Some(K_EMPTY),
        ..Meta::default()
    };
    PsMessage::new(meta, vec![]).to_zmtp()
}

/// Writes a message (headers and small frames copied, each value frame as it is);
/// returns its wire length.
pub async fn write_message(s: &mut TcpStream, msg: &ZmtpMessage) -> std::io::Result<u64> {
    for piece in msg.wire_pieces() {
        s.write_all(&piece).await?;
    }
    Ok(msg.encoded_len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parsers::pslite::{ControlCommand, MessageKind};

    #[test]
    fn the_fakes_are_what_the_parsers_read_as_mxnet_sends_them() {
        let push = PsMessage::from_zmtp(push_request(7, 3, Bytes::from(vec![1u8; 8]))).unwrap();
        assert!(matches!(
            push.kind(),
            MessageKind::Data { request: true, .. }
        ));
        assert_eq!(push.meta.timestamp, Some(7));
        assert_eq!(push.data[0].body.as_ref(), &3u64.to_le_bytes());
        assert_eq!(push.data[2].body.as_ref(), &8i32.to_le_bytes());
        let reg = PsMessage::from_zmtp(server_registration("10.0.0.2", 9000)).unwrap();
        assert_eq!(reg.kind(), MessageKind::Control(ControlCommand::AddNode));
    }

    #[tokio::test]
    async fn two_fakes_shake_hands_and_keep_what_follows() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let (mut dec, ready) = handshake(&mut s, b"ROUTER", b"").await.unwrap();
            let mut got = dec.take_buffered().to_vec();
            s.read_to_end(&mut got).await.unwrap();
            (ready, got)
        });
        let mut s = TcpStream::connect(addr).await.unwrap();
        let (_, ready) = handshake(&mut s, b"DEALER", b"ps9").await.unwrap();
        assert_eq!(ready.socket_type().unwrap().as_ref(), b"ROUTER");
        let msg = push_request(1, 3, Bytes::from_static(b"abcd"));
        assert_eq!(
            write_message(&mut s, &msg).await.unwrap(),
            msg.encoded_len() as u64
        );
        drop(s);
        let (ready, got) = router.await.unwrap();
        assert_eq!(ready.identity().unwrap().as_ref(), b"ps9");
        assert_eq!(got, msg.encode());
    }
}
