//! From reassembled TCP streams to ps-lite messages, sans-IO: direct ZMTP connections
//! (DEALER -> ROUTER) and p3proxy tunnels (their preamble, then slice frames or ZMTP
//! frames), each message with when its first and last bytes were seen.

use std::collections::HashMap;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};

use p3proxy_parsers::pslite::{parse_meta, Meta, PsMessage};
use p3proxy_parsers::zmtp::{Limits, StreamDecoder, StreamEvent, ZmtpMessage};

use super::skim::{SkimFrame, SkimmedMessage, Skimmer};
use crate::capture::{Direction, TcpEvent};
use crate::core::preamble::{parse_preamble, PREAMBLE_MAGIC};
use crate::core::slice::{take_frame, Part, SliceFrame};

/// What kind of stream a connection carries (client to server).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamKind {
    /// Not known yet (no byte from the client).
    Unknown,
    /// ZMTP between two apps (or an app and its proxy).
    Zmtp,
    /// A p3proxy tunnel connection.
    Tunnel,
    /// Anything else.
    Other,
}

/// One connection, summarized.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnSummary {
    /// Number in order of appearance.
    pub conn: usize,
    /// Connecting side.
    pub client: SocketAddr,
    /// Listening side.
    pub server: SocketAddr,
    /// What it carries.
    pub kind: StreamKind,
    /// The sending app's DEALER identity (`ps9`), from READY or a tunnel preamble.
    pub identity: String,
    /// Where its messages go: the listening side, or a tunnel's original destination.
    pub target: Option<SocketAddr>,
    /// Tunnel class (0: main stream), for tunnels.
    pub class: Option<u8>,
    /// Messages decoded.
    pub messages: u64,
    /// Client-to-server bytes.
    pub bytes_to_server: u64,
    /// Server-to-client bytes.
    pub bytes_to_client: u64,
    /// Why the stream could not be followed to its end, if it could not.
    pub error: Option<String>,
}

/// What a message was.
#[derive(Debug, Clone)]
pub enum Content {
    /// A ps-lite message.
    Ps(Box<PsSummary>),
    /// A well-framed message that is not ps-lite.
    NotPslite,
}

/// A ps-lite message, skimmed: its meta, keys and the size of its values.
#[derive(Debug, Clone)]
pub struct PsSummary {
    /// The meta.
    pub meta: Meta,
    /// Keys (empty if none, or too many to keep).
    pub keys: Vec<u64>,
    /// Bytes of values.
    pub vals_bytes: u64,
    /// The whole message, when every frame was small enough to keep (control messages).
    pub message: Option<PsMessage>,
}

/// A message seen on the wire.
#[derive(Debug, Clone)]
pub struct ObservedMessage {
    /// Its connection (for tunnels: the one that carried its last byte).
    pub conn: usize,
    /// The sender's DEALER identity.
    pub identity: Bytes,
    /// The ROUTER it goes to.
    pub dst: SocketAddr,
    /// The connecting host (the sender's host, or its proxy's).
    pub client: SocketAddr,
    /// Carried by a p3proxy tunnel.
    pub tunnel: bool,
    /// The first message of its connection (or tunnel session).
    pub first_on_connection: bool,
    /// Bytes of the ZMTP message.
    pub wire_bytes: u64,
    /// When its first byte was seen.
    pub first_ts: f64,
    /// When its last byte was seen.
    pub last_ts: f64,
    /// What it was.
    pub content: Content,
    /// The priority a p3proxy announced for it (lower is more urgent), through a tunnel.
    pub priority: Option<u32>,
    /// Which part of a split key's response it is (a slice-key response the worker's
    /// proxy merges), through a tunnel.
    pub part: Option<Part>,
}

#[derive(Debug)]
enum Half {
    /// Waiting for the first bytes.
    Detect(Vec<u8>),
    /// ZMTP greeting and READY.
    Handshake(Box<StreamDecoder>),
    /// ZMTP messages.
    Traffic(Skimmer),
    /// A tunnel's preamble.
    Preamble(Vec<u8>),
    /// Slice frames of a tunnel session, and when the first buffered byte came.
    Sliced(BytesMut, f64),
    /// Bytes not followed.
    Ignored,
}

#[derive(Debug)]
struct Conn {
    summary: ConnSummary,
    up: Half,
    session: Option<u64>,
    messages_seen: u64,
}

#[derive(Debug)]
struct SessionMessage {
    skim: Skimmer,
    first_ts: f64,
}

#[derive(Debug)]
struct Session {
    target: SocketAddr,
    identity: Bytes,
    client: SocketAddr,
    messages: HashMap<u64, SessionMessage>,
    /// Announcements of messages not complete yet: priority and part.
    announced: HashMap<u64, (u32, Option<Part>)>,
    delivered: u64,
}

/// Most messages of one tunnel session followed at once (a session has a few dozen in
/// flight; more means the capture lost a connection).
const MAX_SESSION_MESSAGES: usize = 4096;

/// Follows every connection of a capture.
#[derive(Debug, Default)]
pub struct StreamTracker {
    conns: HashMap<usize, Conn>,
    done: Vec<ConnSummary>,
    sessions: HashMap<u64, Session>,
}

impl StreamTracker {
    /// Handles one reassembly event; messages it completes go to `out`.
    pub fn on_event(&mut self, ev: TcpEvent<'_>, out: &mut Vec<ObservedMessage>) {
        match ev {
            TcpEvent::Open {
                conn,
                client,
                server,
                ..
            } => {
                self.conns.insert(
                    conn,
                    Conn {
                        summary: ConnSummary {
                            conn,
                            client,
                            server,
                            kind: StreamKind::Unknown,
                            identity: String::new(),
                            target: None,
                            class: None,
                            messages: 0,
                            bytes_to_server: 0,
                            bytes_to_client: 0,
                            error: None,
                        },
                        up: Half::Detect(Vec::new()),
                        session: None,
                        messages_seen: 0,
                    },
                );
            }
            TcpEvent::Data {
                conn,
                dir,
                bytes,
                ts,
            } => {
                let Some(c) = self.conns.get_mut(&conn) else {
                    return;
                };
                if dir == Direction::ServerToClient {
                    c.summary.bytes_to_client += bytes.len() as u64;
                    return;
                }
                c.summary.bytes_to_server += bytes.len() as u64;
                feed(c, &mut self.sessions, bytes, ts, out);
            }
            TcpEvent::Gap { conn, dir } => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    if dir == Direction::ClientToServer {
                        fail(c, "bytes missing from the capture".into());
                    }
                }
            }
            TcpEvent::Close { conn, .. } => {
                if let Some(c) = self.conns.remove(&conn) {
                    self.done.push(c.summary);
                }
            }
        }
    }

    /// Every connection seen so far, in order of appearance.
    pub fn connections(&self) -> Vec<ConnSummary> {
        let mut all: Vec<ConnSummary> = self
            .done
            .iter()
            .cloned()
            .chain(self.conns.values().map(|c| c.summary.clone()))
            .collect();
        all.sort_by_key(|c| c.conn);
        all
    }
}

fn fail(c: &mut Conn, why: String) {
    if c.summary.error.is_none() {
        c.summary.error = Some(why);
    }
    c.up = Half::Ignored;
}

fn feed(
    c: &mut Conn,
    sessions: &mut HashMap<u64, Session>,
    bytes: &[u8],
    ts: f64,
    out: &mut Vec<ObservedMessage>,
) {
    let mut input: Vec<u8>;
    let mut bytes = bytes;
    loop {
        match &mut c.up {
            Half::Ignored => return,
            Half::Detect(first) => {
                first.extend_from_slice(bytes);
                if first[0] == 0xFF {
                    c.summary.kind = StreamKind::Zmtp;
                    c.summary.target = Some(c.summary.server);
                    let mut dec = StreamDecoder::new(Limits::default());
                    dec.push(first);
                    c.up = Half::Handshake(Box::new(dec));
                    bytes = &[];
                } else if first.len() >= PREAMBLE_MAGIC.len() || !PREAMBLE_MAGIC.starts_with(first)
                {
                    if first.starts_with(PREAMBLE_MAGIC) {
                        c.summary.kind = StreamKind::Tunnel;
                        input = std::mem::take(first);
                        c.up = Half::Preamble(Vec::new());
                        bytes = &input;
                        continue;
                    }
                    c.summary.kind = StreamKind::Other;
                    c.up = Half::Ignored;
                    return;
                } else {
                    return;
                }
            }
            Half::Handshake(dec) => {
                dec.push(bytes);
                loop {
                    match dec.next_event() {
                        Ok(Some(StreamEvent::Command(cmd))) => {
                            if let Some(id) = cmd.identity() {
                                c.summary.identity = String::from_utf8_lossy(id).into_owned();
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => return fail(c, format!("ZMTP handshake: {e}")),
                    }
                    if dec.is_ready() {
                        break;
                    }
                }
                if !dec.is_ready() {
                    return;
                }
                input = dec.take_buffered().to_vec();
                bytes = &input;
                c.up = Half::Traffic(Skimmer::default());
            }
            Half::Traffic(skim) => {
                let mut done = Vec::new();
                if let Err(e) = skim.push(bytes, ts, &mut done) {
                    return fail(c, format!("ZMTP framing: {e}"));
                }
                if done.is_empty() {
                    return; // Most segments complete no message: nothing to build.
                }
                let target = c.summary.target.unwrap_or(c.summary.server);
                let identity = Bytes::from(c.summary.identity.clone().into_bytes());
                let tunnel = c.summary.kind == StreamKind::Tunnel;
                for m in done {
                    let first = c.messages_seen == 0;
                    c.messages_seen += 1;
                    c.summary.messages += 1;
                    out.push(observed(
                        c.summary.conn,
                        identity.clone(),
                        target,
                        c.summary.client,
                        tunnel,
                        first,
                        m,
                    ));
                }
                return;
            }
            Half::Preamble(buf) => {
                buf.extend_from_slice(bytes);
                match parse_preamble(buf) {
                    Ok((rest, p)) => {
                        c.summary.identity = String::from_utf8_lossy(&p.identity).into_owned();
                        c.summary.target = Some(p.target);
                        c.summary.class = Some(p.class);
                        c.session = Some(p.session);
                        let rest = rest.to_vec();
                        if p.sliced {
                            sessions.entry(p.session).or_insert_with(|| Session {
                                target: p.target,
                                identity: p.identity.clone(),
                                client: c.summary.client,
                                messages: HashMap::new(),
                                announced: HashMap::new(),
                                delivered: 0,
                            });
                            c.up = Half::Sliced(BytesMut::new(), ts);
                        } else {
                            c.up = Half::Traffic(Skimmer::default());
                        }
                        input = rest;
                        bytes = &input;
                    }
                    Err(nom::Err::Incomplete(_)) => return,
                    Err(nom::Err::Error(e) | nom::Err::Failure(e)) => {
                        return fail(c, format!("tunnel preamble: {e}"))
                    }
                }
            }
            Half::Sliced(buf, frame_ts) => {
                if buf.is_empty() {
                    *frame_ts = ts;
                }
                buf.extend_from_slice(bytes);
                let session_id = c.session.expect("set with the preamble");
                loop {
                    let frame = match take_frame(buf) {
                        Ok(Some(f)) => f,
                        Ok(None) => return,
                        Err(e) => return fail(c, format!("tunnel frame: {e}")),
                    };
                    // The frame began with the first buffered byte; the next one, here.
                    let began = std::mem::replace(frame_ts, ts);
                    let Some(s) = sessions.get_mut(&session_id) else {
                        continue;
                    };
                    let (seq, payload) = match frame {
                        SliceFrame::Announce(a) => {
                            if s.announced.len() < MAX_SESSION_MESSAGES {
                                s.announced.insert(a.seq, (a.priority, a.part));
                            }
                            continue;
                        }
                        SliceFrame::Slice { seq, payload, .. } => (seq, payload),
                        // The job's order: no message of the session.
                        SliceFrame::Order(_) => continue,
                    };
                    if !s.messages.contains_key(&seq) && s.messages.len() >= MAX_SESSION_MESSAGES {
                        return fail(c, "too many unfinished tunnel messages".into());
                    }
                    let m = s.messages.entry(seq).or_insert_with(|| SessionMessage {
                        skim: Skimmer::default(),
                        first_ts: began,
                    });
                    let mut done = Vec::new();
                    if let Err(e) = m.skim.push(&payload, ts, &mut done) {
                        return fail(c, format!("ZMTP framing in a slice: {e}"));
                    }
                    if let Some(mut msg) = done.pop() {
                        msg.first_ts = m.first_ts;
                        s.messages.remove(&seq);
                        let first = s.delivered == 0;
                        s.delivered += 1;
                        c.summary.messages += 1;
                        let mut o = observed(
                            c.summary.conn,
                            s.identity.clone(),
                            s.target,
                            s.client,
                            true,
                            first,
                            msg,
                        );
                        if let Some((priority, part)) = s.announced.remove(&seq) {
                            o.priority = Some(priority);
                            o.part = part;
                        }
                        out.push(o);
                    }
                }
            }
        }
    }
}

fn observed(
    conn: usize,
    identity: Bytes,
    dst: SocketAddr,
    client: SocketAddr,
    tunnel: bool,
    first_on_connection: bool,
    m: SkimmedMessage,
) -> ObservedMessage {
    ObservedMessage {
        conn,
        identity,
        dst,
        client,
        tunnel,
        first_on_connection,
        wire_bytes: m.wire_bytes,
        first_ts: m.first_ts,
        last_ts: m.last_ts,
        content: summarize(m.frames),
        priority: None,
        part: None,
    }
}

/// Reads the skimmed frames as ps-lite.
fn summarize(frames: Vec<SkimFrame>) -> Content {
    let Some(Ok(meta)) = frames.first().and_then(SkimFrame::body).map(parse_meta) else {
        return Content::NotPslite;
    };
    if meta.data_type.len() + 1 != frames.len() {
        return Content::NotPslite;
    }
    let keys = frames
        .get(1)
        .and_then(SkimFrame::body)
        .map(|b| {
            b.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect()
        })
        .unwrap_or_default();
    let vals_bytes = frames.get(2).map(SkimFrame::body_len).unwrap_or(0);
    let message = frames
        .iter()
        .map(|f| f.body().cloned())
        .collect::<Option<Vec<Bytes>>>()
        .and_then(|bodies| PsMessage::from_zmtp(ZmtpMessage::from_bodies(bodies)).ok());
    Content::Ps(Box::new(PsSummary {
        meta,
        keys,
        vals_bytes,
        message,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::preamble::Preamble;
    use crate::core::slice::{Announce, SliceFrame};
    use p3proxy_parsers::pslite::PsMessage;

    fn push_request(key: u64, vals: usize) -> Vec<u8> {
        let meta = Meta {
            head: Some(0),
            request: Some(true),
            push: Some(true),
            pull: Some(true),
            timestamp: Some(5),
            customer_id: Some(0),
            data_type: vec![8, 11, 3],
            ..Default::default()
        };
        let msg = PsMessage::new(
            meta,
            vec![
                Bytes::copy_from_slice(&key.to_le_bytes()),
                Bytes::from(vec![1u8; vals]),
                Bytes::copy_from_slice(&(vals as i32).to_le_bytes()),
            ],
        );
        let mut out = Vec::new();
        msg.to_zmtp().encode_into(&mut out);
        out
    }

    fn open(t: &mut StreamTracker, conn: usize, client: &str, server: &str) {
        t.on_event(
            TcpEvent::Open {
                conn,
                client: client.parse().unwrap(),
                server: server.parse().unwrap(),
                ts: 0.0,
            },
            &mut Vec::new(),
        );
    }

    fn send(t: &mut StreamTracker, conn: usize, bytes: &[u8], ts: f64) -> Vec<ObservedMessage> {
        let mut out = Vec::new();
        t.on_event(
            TcpEvent::Data {
                conn,
                dir: Direction::ClientToServer,
                bytes,
                ts,
            },
            &mut out,
        );
        out
    }

    #[test]
    fn a_sliced_tunnel_session_gives_back_the_apps_messages() {
        let target: SocketAddr = "10.0.0.2:4000".parse().unwrap();
        let preamble = |class| Preamble {
            class,
            sliced: true,
            session: 77,
            target,
            socket_type: Bytes::from_static(b"DEALER"),
            identity: Bytes::from_static(b"ps9"),
        };
        let mut t = StreamTracker::default();
        open(&mut t, 0, "10.0.0.1:50000", "10.0.0.2:15302");
        open(&mut t, 1, "10.0.0.1:50001", "10.0.0.2:15302");
        assert!(send(&mut t, 0, &preamble(0).encode(), 0.0).is_empty());
        assert!(send(&mut t, 1, &preamble(2).encode(), 0.0).is_empty());
        // Message 0 (key 9, 300 KB of values) in three slices on the class connection,
        // its announcement on the main one after its first slice.
        let big = push_request(9, 300_000);
        let slices: Vec<Vec<u8>> = [(0, 100_000), (100_000, 250_000), (250_000, big.len())]
            .iter()
            .map(|&(a, b)| {
                SliceFrame::Slice {
                    seq: 0,
                    offset: a as u64,
                    payload: Bytes::copy_from_slice(&big[a..b]),
                }
                .encode()
            })
            .collect();
        assert!(send(&mut t, 1, &slices[0], 1.0).is_empty());
        let announce = SliceFrame::Announce(Announce {
            seq: 0,
            total: big.len() as u64,
            priority: 3,
            fence: false,
            keys: vec![9],
            part: None,
        })
        .encode();
        assert!(send(&mut t, 0, &announce, 1.1).is_empty());
        // Message 1 (key 2, small) overtakes it on the main connection.
        let small = push_request(2, 16);
        let mut main = SliceFrame::Slice {
            seq: 1,
            offset: 0,
            payload: Bytes::from(small.clone()),
        }
        .encode();
        let (a, b) = main.split_at_mut(5); // and arrives in two pieces
        let mut got = send(&mut t, 0, a, 1.2);
        got.extend(send(&mut t, 0, b, 1.3));
        got.extend(send(&mut t, 1, &slices[1], 2.0));
        got.extend(send(&mut t, 1, &slices[2], 3.0));
        let seen: Vec<(Vec<u64>, u64, f64, f64)> = got
            .iter()
            .map(|m| match &m.content {
                Content::Ps(ps) => (ps.keys.clone(), ps.vals_bytes, m.first_ts, m.last_ts),
                Content::NotPslite => panic!("not ps-lite"),
            })
            .collect();
        assert_eq!(
            seen,
            vec![(vec![2], 16, 1.2, 1.3), (vec![9], 300_000, 1.0, 3.0)]
        );
        assert!(got
            .iter()
            .all(|m| m.tunnel && m.dst == target && &m.identity[..] == b"ps9"));
        assert_eq!(got[0].wire_bytes, small.len() as u64);
        assert_eq!(got[1].wire_bytes, big.len() as u64);
        let conns = t.connections();
        assert_eq!(conns[1].kind, StreamKind::Tunnel);
        assert_eq!((conns[1].class, conns[1].target), (Some(2), Some(target)));
    }

    #[test]
    fn garbage_after_the_tunnel_magic_is_reported_not_followed() {
        let mut t = StreamTracker::default();
        open(&mut t, 0, "10.0.0.1:50000", "10.0.0.2:15302");
        let mut bytes = PREAMBLE_MAGIC.to_vec();
        bytes.extend([99u8; 40]);
        assert!(send(&mut t, 0, &bytes, 0.0).is_empty());
        let c = &t.connections()[0];
        assert_eq!(c.kind, StreamKind::Tunnel);
        assert!(
            c.error.as_deref().unwrap().starts_with("tunnel preamble"),
            "{c:?}"
        );
        // Other protocols are counted, not parsed.
        open(&mut t, 1, "10.0.0.1:50001", "10.0.0.2:22");
        assert!(send(&mut t, 1, b"SSH-2.0-OpenSSH\r\n", 0.0).is_empty());
        assert_eq!(t.connections()[1].kind, StreamKind::Other);
    }
}
