//! Reading packet captures and reassembling their TCP streams.
//!
//! Used by the capture tests and by `p3proxy inspect --pcap`. Reassembly is
//! streaming (data is handed out as soon as it is contiguous) with a bound on
//! out-of-order bytes held per direction, so a long capture needs bounded memory.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use pcap_parser::pcapng::Block;
use pcap_parser::{Linktype, PcapBlockOwned, PcapError};

/// Why a capture could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The capture file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not pcap or pcapng (after gzip, if it was gzipped).
    #[error("{path} is not a pcap or pcapng capture: {reason}")]
    Format {
        /// The capture file.
        path: String,
        /// What the pcap reader said.
        reason: String,
    },
    /// A link type this reader does not decode.
    #[error("{path}: unsupported link type {linktype}")]
    Linktype {
        /// The capture file.
        path: String,
        /// The link type number.
        linktype: i32,
    },
}

/// One captured packet.
#[derive(Debug, Clone)]
pub struct Packet {
    /// Capture time, seconds since the epoch.
    pub ts: f64,
    /// Link type of `data`.
    pub linktype: Linktype,
    /// The captured bytes from the link header on.
    pub data: Vec<u8>,
}

/// Reads every packet of a pcap or pcapng file (gzipped if its name ends `.gz`).
pub fn read_packets(path: &Path) -> Result<Vec<Packet>, CaptureError> {
    PacketReader::open(path)?.collect()
}

/// The packets of a pcap or pcapng file, one at a time (a long capture is never held
/// in memory).
pub struct PacketReader {
    name: String,
    pcap: Box<dyn pcap_parser::traits::PcapReaderIterator + Send>,
    linktypes: Vec<Linktype>,
    legacy_linktype: Linktype,
    done: bool,
}

impl std::fmt::Debug for PacketReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketReader")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl PacketReader {
    /// Opens a pcap or pcapng file (gzipped if its name ends `.gz`).
    pub fn open(path: &Path) -> Result<PacketReader, CaptureError> {
        let name = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| CaptureError::Io {
            path: name.clone(),
            source,
        })?;
        let reader: Box<dyn Read + Send> = if name.ends_with(".gz") {
            Box::new(flate2::read::MultiGzDecoder::new(std::io::BufReader::new(
                file,
            )))
        } else {
            Box::new(std::io::BufReader::new(file))
        };
        let pcap =
            pcap_parser::create_reader(1 << 20, reader).map_err(|e| CaptureError::Format {
                path: name.clone(),
                reason: e.to_string(),
            })?;
        Ok(PacketReader {
            name,
            pcap,
            linktypes: Vec::new(),
            legacy_linktype: Linktype::ETHERNET,
            done: false,
        })
    }

    fn format_err(&self, reason: String) -> CaptureError {
        CaptureError::Format {
            path: self.name.clone(),
            reason,
        }
    }

    fn next_packet(&mut self) -> Result<Option<Packet>, CaptureError> {
        loop {
            let packet = match self.pcap.next() {
                Ok((offset, block)) => {
                    let packet = match block {
                        PcapBlockOwned::LegacyHeader(h) => {
                            self.legacy_linktype = h.network;
                            None
                        }
                        PcapBlockOwned::Legacy(b) => Some(Packet {
                            ts: f64::from(b.ts_sec) + f64::from(b.ts_usec) * 1e-6,
                            linktype: self.legacy_linktype,
                            data: b.data.to_vec(),
                        }),
                        PcapBlockOwned::NG(Block::InterfaceDescription(idb)) => {
                            self.linktypes.push(idb.linktype);
                            None
                        }
                        PcapBlockOwned::NG(Block::EnhancedPacket(epb)) => {
                            let ts = ((u64::from(epb.ts_high) << 32) | u64::from(epb.ts_low))
                                as f64
                                * 1e-6;
                            let linktype = self
                                .linktypes
                                .get(epb.if_id as usize)
                                .copied()
                                .unwrap_or(Linktype::ETHERNET);
                            let len = (epb.caplen as usize).min(epb.data.len());
                            Some(Packet {
                                ts,
                                linktype,
                                data: epb.data[..len].to_vec(),
                            })
                        }
                        PcapBlockOwned::NG(_) => None,
                    };
                    self.pcap.consume(offset);
                    packet
                }
                Err(PcapError::Eof) => return Ok(None),
                Err(PcapError::Incomplete(_)) => {
                    if let Err(e) = self.pcap.refill() {
                        let reason = e.to_string();
                        return Err(self.format_err(reason));
                    }
                    None
                }
                Err(e) => {
                    let reason = e.to_string();
                    return Err(self.format_err(reason));
                }
            };
            if let Some(p) = packet {
                if !supported(p.linktype) {
                    return Err(CaptureError::Linktype {
                        path: self.name.clone(),
                        linktype: p.linktype.0,
                    });
                }
                return Ok(Some(p));
            }
        }
    }
}

impl Iterator for PacketReader {
    type Item = Result<Packet, CaptureError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_packet() {
            Ok(Some(p)) => Some(Ok(p)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

fn supported(linktype: Linktype) -> bool {
    [
        Linktype::ETHERNET,
        Linktype::LINUX_SLL,
        Linktype::RAW,
        Linktype::IPV4,
        Linktype::IPV6,
    ]
    .contains(&linktype)
}

/// A TCP segment cut out of a packet.
#[derive(Debug, Clone, Copy)]
pub struct TcpSegment<'a> {
    /// Sender.
    pub src: SocketAddr,
    /// Receiver.
    pub dst: SocketAddr,
    /// Sequence number of the first payload byte (or of the SYN/FIN).
    pub seq: u32,
    /// SYN flag.
    pub syn: bool,
    /// ACK flag.
    pub ack: bool,
    /// FIN flag.
    pub fin: bool,
    /// RST flag.
    pub rst: bool,
    /// Payload bytes.
    pub payload: &'a [u8],
}

/// The TCP segment in a packet, if it carries one.
pub fn tcp_segment(packet: &Packet) -> Option<TcpSegment<'_>> {
    let sliced = match packet.linktype {
        Linktype::ETHERNET => SlicedPacket::from_ethernet(&packet.data),
        Linktype::LINUX_SLL => SlicedPacket::from_linux_sll(&packet.data),
        _ => SlicedPacket::from_ip(&packet.data),
    }
    .ok()?;
    let (src_ip, dst_ip) = match sliced.net? {
        NetSlice::Ipv4(ip) => (
            IpAddr::V4(ip.header().source_addr()),
            IpAddr::V4(ip.header().destination_addr()),
        ),
        NetSlice::Ipv6(ip) => (
            IpAddr::V6(ip.header().source_addr()),
            IpAddr::V6(ip.header().destination_addr()),
        ),
        NetSlice::Arp(_) => return None,
    };
    let TransportSlice::Tcp(tcp) = sliced.transport? else {
        return None;
    };
    Some(TcpSegment {
        src: SocketAddr::new(src_ip, tcp.source_port()),
        dst: SocketAddr::new(dst_ip, tcp.destination_port()),
        seq: tcp.sequence_number(),
        syn: tcp.syn(),
        ack: tcp.ack(),
        fin: tcp.fin(),
        rst: tcp.rst(),
        payload: tcp.payload(),
    })
}

/// Direction of bytes within a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the side that connected (sent the SYN) to the listening side.
    ClientToServer,
    /// From the listening side back to the client.
    ServerToClient,
}

/// What reassembly reports, in capture order.
#[derive(Debug, Clone, Copy)]
pub enum TcpEvent<'a> {
    /// A new connection (its SYN, or its first segment if the capture began mid-stream).
    Open {
        /// Connection number, in order of appearance.
        conn: usize,
        /// The connecting side.
        client: SocketAddr,
        /// The listening side.
        server: SocketAddr,
        /// Capture time.
        ts: f64,
    },
    /// Bytes that continue one direction of a connection, in order, each once.
    Data {
        /// Connection number.
        conn: usize,
        /// Which direction.
        dir: Direction,
        /// The bytes.
        bytes: &'a [u8],
        /// Capture time of the segment that completed them.
        ts: f64,
    },
    /// Out-of-order bytes beyond the bound were dropped: this direction has a
    /// hole and cannot be parsed further.
    Gap {
        /// Connection number.
        conn: usize,
        /// Which direction.
        dir: Direction,
    },
    /// The connection ended (FIN both ways, or RST).
    Close {
        /// Connection number.
        conn: usize,
        /// Capture time.
        ts: f64,
    },
}

/// Default bound on out-of-order bytes held per direction.
pub const DEFAULT_MAX_OUT_OF_ORDER: usize = 16 << 20;

#[derive(Debug, Default)]
struct HalfStream {
    /// Sequence number of the next byte to deliver, once known.
    next_seq: Option<u32>,
    /// Segments that arrived ahead of `next_seq`, by sequence distance from it at arrival.
    pending: BTreeMap<u64, Vec<u8>>,
    /// Stream offset of `next_seq` (bytes delivered so far).
    delivered: u64,
    pending_bytes: usize,
    fin: bool,
    broken: bool,
}

#[derive(Debug)]
struct Conn {
    id: usize,
    client: SocketAddr,
    halves: [HalfStream; 2],
}

/// Streaming TCP reassembly over many connections.
#[derive(Debug)]
pub struct Reassembler {
    conns: HashMap<(SocketAddr, SocketAddr), Conn>,
    next_id: usize,
    max_out_of_order: usize,
}

impl Default for Reassembler {
    fn default() -> Self {
        Reassembler::new(DEFAULT_MAX_OUT_OF_ORDER)
    }
}

impl Reassembler {
    /// Reassembly holding at most `max_out_of_order` early bytes per direction.
    pub fn new(max_out_of_order: usize) -> Reassembler {
        Reassembler {
            conns: HashMap::new(),
            next_id: 0,
            max_out_of_order,
        }
    }

    /// Feeds one segment; `on_event` sees what it completes.
    pub fn push(&mut self, seg: &TcpSegment<'_>, ts: f64, mut on_event: impl FnMut(TcpEvent<'_>)) {
        let key = if seg.src <= seg.dst {
            (seg.src, seg.dst)
        } else {
            (seg.dst, seg.src)
        };
        let fresh_syn = seg.syn && !seg.ack;
        if fresh_syn {
            // A SYN on a tuple we still track starts a new connection unless it
            // is a retransmission of the one we have.
            if let Some(c) = self.conns.get(&key) {
                let h = &c.halves[0];
                let retransmit = c.client == seg.src
                    && h.delivered == 0
                    && h.next_seq == Some(seg.seq.wrapping_add(1));
                if !retransmit {
                    let id = c.id;
                    self.conns.remove(&key);
                    on_event(TcpEvent::Close { conn: id, ts });
                }
            }
        }
        if !self.conns.contains_key(&key) {
            if seg.rst || (seg.payload.is_empty() && !seg.syn) {
                return; // Nothing to follow: a stray RST or ACK of a connection we never saw.
            }
            let id = self.next_id;
            self.next_id += 1;
            // The SYN sender is the client; without a SYN (SYN-ACK or mid-stream) guess from the flags.
            let client = if seg.syn && seg.ack { seg.dst } else { seg.src };
            let server = if client == seg.src { seg.dst } else { seg.src };
            self.conns.insert(
                key,
                Conn {
                    id,
                    client,
                    halves: Default::default(),
                },
            );
            on_event(TcpEvent::Open {
                conn: id,
                client,
                server,
                ts,
            });
        }
        let conn = self.conns.get_mut(&key).expect("inserted above");
        let id = conn.id;
        if seg.rst {
            self.conns.remove(&key);
            on_event(TcpEvent::Close { conn: id, ts });
            return;
        }
        let dir = if seg.src == conn.client {
            Direction::ClientToServer
        } else {
            Direction::ServerToClient
        };
        let half = &mut conn.halves[dir as usize];
        let max_ooo = self.max_out_of_order;
        let data_seq = if seg.syn {
            seg.seq.wrapping_add(1)
        } else {
            seg.seq
        };
        if half.next_seq.is_none() {
            half.next_seq = Some(data_seq);
        }
        if !half.broken {
            half.accept(data_seq, seg.payload, max_ooo, |bytes| {
                on_event(TcpEvent::Data {
                    conn: id,
                    dir,
                    bytes,
                    ts,
                })
            });
            if half.broken {
                on_event(TcpEvent::Gap { conn: id, dir });
            }
        }
        if seg.fin {
            half.fin = true;
        }
        if conn.halves.iter().all(|h| h.fin) {
            self.conns.remove(&key);
            on_event(TcpEvent::Close { conn: id, ts });
        }
    }

    /// Ends every open connection (at the end of a capture).
    pub fn finish(&mut self, ts: f64, mut on_event: impl FnMut(TcpEvent<'_>)) {
        let mut ids: Vec<usize> = self.conns.drain().map(|(_, c)| c.id).collect();
        ids.sort_unstable();
        for conn in ids {
            on_event(TcpEvent::Close { conn, ts });
        }
    }
}

impl HalfStream {
    fn accept(&mut self, seq: u32, payload: &[u8], max_ooo: usize, mut deliver: impl FnMut(&[u8])) {
        if payload.is_empty() {
            return;
        }
        let next = self.next_seq.expect("set before accept");
        // Signed distance handles sequence wrap-around within a 2 GiB window.
        let ahead = seq.wrapping_sub(next) as i32;
        let payload = if ahead < 0 {
            let overlap = ahead.unsigned_abs() as usize;
            if overlap >= payload.len() {
                return; // A retransmission of bytes already delivered.
            }
            &payload[overlap..]
        } else {
            payload
        };
        if ahead > 0 {
            let at = ahead as u64 + self.delivered;
            if self.pending_bytes + payload.len() > max_ooo {
                self.broken = true;
                self.pending.clear();
                return;
            }
            self.pending_bytes += payload.len();
            self.pending.entry(at).or_insert_with(|| payload.to_vec());
            return;
        }
        self.advance(payload, &mut deliver);
        // Drain what became contiguous.
        while let Some(entry) = self.pending.first_entry() {
            let at = *entry.key();
            if at > self.delivered {
                break;
            }
            let bytes = entry.remove();
            self.pending_bytes -= bytes.len();
            let skip = (self.delivered - at) as usize;
            if skip < bytes.len() {
                self.advance(&bytes[skip..], &mut deliver);
            }
        }
    }

    fn advance(&mut self, bytes: &[u8], deliver: &mut impl FnMut(&[u8])) {
        deliver(bytes);
        self.delivered += bytes.len() as u64;
        self.next_seq = Some(self.next_seq.expect("set").wrapping_add(bytes.len() as u32));
    }
}

/// A whole connection's bytes, collected (for tests and small captures).
#[derive(Debug, Clone)]
pub struct CollectedConnection {
    /// Connection number, in order of appearance.
    pub conn: usize,
    /// Connecting side.
    pub client: SocketAddr,
    /// Listening side.
    pub server: SocketAddr,
    /// Time of the first segment.
    pub ts: f64,
    /// Client-to-server bytes.
    pub to_server: Vec<u8>,
    /// Server-to-client bytes.
    pub to_client: Vec<u8>,
    /// A direction had a hole.
    pub gap: bool,
}

/// Reassembles every TCP connection of a capture into memory.
pub fn collect_connections(packets: &[Packet]) -> Vec<CollectedConnection> {
    let mut out: Vec<CollectedConnection> = Vec::new();
    let mut reassembler = Reassembler::default();
    let mut on_event = |ev: TcpEvent<'_>| match ev {
        TcpEvent::Open {
            conn,
            client,
            server,
            ts,
        } => out.push(CollectedConnection {
            conn,
            client,
            server,
            ts,
            to_server: Vec::new(),
            to_client: Vec::new(),
            gap: false,
        }),
        TcpEvent::Data {
            conn, dir, bytes, ..
        } => {
            let c = &mut out[conn];
            match dir {
                Direction::ClientToServer => c.to_server.extend_from_slice(bytes),
                Direction::ServerToClient => c.to_client.extend_from_slice(bytes),
            }
        }
        TcpEvent::Gap { conn, .. } => out[conn].gap = true,
        TcpEvent::Close { .. } => {}
    };
    let mut last_ts = 0.0;
    for p in packets {
        if let Some(seg) = tcp_segment(p) {
            reassembler.push(&seg, p.ts, &mut on_event);
            last_ts = p.ts;
        }
    }
    reassembler.finish(last_ts, &mut on_event);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(seq: u32, payload: &[u8]) -> TcpSegment<'_> {
        TcpSegment {
            src: "10.0.0.1:5000".parse().unwrap(),
            dst: "10.0.0.2:80".parse().unwrap(),
            seq,
            syn: false,
            ack: true,
            fin: false,
            rst: false,
            payload,
        }
    }

    fn run(segments: &[TcpSegment<'_>], max_ooo: usize) -> (Vec<u8>, bool) {
        let mut r = Reassembler::new(max_ooo);
        let mut out = Vec::new();
        let mut gap = false;
        for s in segments {
            r.push(s, 0.0, |ev| match ev {
                TcpEvent::Data { bytes, .. } => out.extend_from_slice(bytes),
                TcpEvent::Gap { .. } => gap = true,
                _ => {}
            });
        }
        (out, gap)
    }

    #[test]
    fn reorders_trims_overlaps_and_drops_retransmits() {
        let syn = TcpSegment {
            syn: true,
            ack: false,
            ..seg(u32::MAX - 2, b"")
        };
        let segs = [
            syn,
            seg(u32::MAX - 1, b"ab"),
            seg(3, b"fg"),
            seg(0, b"cdef"),
            seg(u32::MAX - 1, b"ab"),
            seg(5, b"h"),
        ];
        assert_eq!(run(&segs, 1024), (b"abcdefgh".to_vec(), false));
    }

    #[test]
    fn out_of_order_bound_reports_a_gap() {
        let segs = [seg(100, b"a"), seg(200, &[0; 64])];
        assert_eq!(run(&segs, 32), (b"a".to_vec(), true));
    }
}
