//! `p3proxy inspect`: a passive analyzer of ps-lite traffic. It follows the TCP streams
//! of a capture file or a live interface (no proxy in the path), decodes them with the
//! proxy's own parsers (direct ZMTP, and p3proxy tunnels with their slices), and shows
//! where each iteration's time goes, so that an operator can see whether p3proxy would
//! help a job, and what it does once installed.
//!
//! Sans-IO pieces: [`skim`] (frames with bounded memory), [`streams`] (TCP streams to
//! messages), [`analysis`] (messages to iterations); [`render`] formats the report;
//! this module reads packets.

pub mod analysis;
pub mod render;
pub mod skim;
pub mod streams;

use std::path::Path;
use std::time::{Duration, Instant};

use crate::capture::{tcp_segment, CaptureError, Packet, PacketReader, Reassembler};
use analysis::{Analysis, Options, Report, TraceEvent};
use streams::{ConnSummary, ObservedMessage, StreamTracker};

/// Why an inspection could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InspectError {
    /// The capture file could not be read.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// The interface could not be opened for capture.
    #[error("cannot capture on {iface}: {reason}")]
    Interface {
        /// The interface.
        iface: String,
        /// Why.
        reason: String,
    },
}

/// What was read.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CaptureStats {
    /// Packets read.
    pub packets: u64,
    /// TCP segments among them.
    pub tcp_segments: u64,
    /// ps-lite (or other ZMTP) messages decoded.
    pub messages: u64,
    /// Seconds from the first packet to the last.
    pub duration_s: f64,
}

/// The result of an inspection.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Inspection {
    /// What was read.
    pub capture: CaptureStats,
    /// Every TCP connection seen.
    pub connections: Vec<ConnSummary>,
    /// The analysis.
    pub report: Report,
    /// Chrome-trace events (not in the JSON report: `--trace` writes them).
    #[serde(skip)]
    pub trace: Vec<TraceEvent>,
}

/// Packets in, an inspection out.
#[derive(Debug)]
pub struct Inspector {
    reassembler: Reassembler,
    tracker: StreamTracker,
    analysis: Analysis,
    stats: CaptureStats,
    first_ts: Option<f64>,
    last_ts: f64,
    messages: Vec<ObservedMessage>,
}

impl Inspector {
    /// A new inspection.
    pub fn new(options: Options) -> Inspector {
        Inspector {
            reassembler: Reassembler::default(),
            tracker: StreamTracker::default(),
            analysis: Analysis::new(options),
            stats: CaptureStats::default(),
            first_ts: None,
            last_ts: 0.0,
            messages: Vec::new(),
        }
    }

    /// Takes one packet.
    pub fn packet(&mut self, p: &Packet) {
        self.stats.packets += 1;
        self.first_ts.get_or_insert(p.ts);
        self.analysis.start_at(p.ts);
        self.last_ts = self.last_ts.max(p.ts);
        let Some(seg) = tcp_segment(p) else {
            return;
        };
        self.stats.tcp_segments += 1;
        let (tracker, messages) = (&mut self.tracker, &mut self.messages);
        self.reassembler
            .push(&seg, p.ts, |ev| tracker.on_event(ev, messages));
        self.drain();
    }

    fn drain(&mut self) {
        for m in self.messages.drain(..) {
            self.stats.messages += 1;
            self.analysis.on_message(&m);
        }
    }

    /// What was read so far.
    pub fn stats(&self) -> &CaptureStats {
        &self.stats
    }

    /// Ends the inspection.
    pub fn finish(mut self) -> Inspection {
        let (tracker, messages) = (&mut self.tracker, &mut self.messages);
        self.reassembler
            .finish(self.last_ts, |ev| tracker.on_event(ev, messages));
        self.drain();
        self.stats.duration_s = self.first_ts.map_or(0.0, |f| self.last_ts - f);
        let report = self.analysis.finish();
        Inspection {
            capture: self.stats,
            connections: self.tracker.connections(),
            trace: self.analysis.trace().to_vec(),
            report,
        }
    }
}

/// Inspects a pcap or pcapng file (gzipped if its name ends `.gz`); `progress` is
/// called every few seconds on a long one.
pub fn inspect_pcap(
    path: &Path,
    options: Options,
    mut progress: impl FnMut(&CaptureStats),
) -> Result<Inspection, InspectError> {
    let mut inspector = Inspector::new(options);
    let mut last = Instant::now();
    for p in PacketReader::open(path)? {
        inspector.packet(&p?);
        if last.elapsed() > Duration::from_secs(2) {
            progress(inspector.stats());
            last = Instant::now();
        }
    }
    Ok(inspector.finish())
}

/// Inspects live traffic on `iface` for `seconds`, or until `stop` is set (as root: a
/// raw socket).
pub fn inspect_iface(
    iface: &str,
    seconds: f64,
    stop: &std::sync::atomic::AtomicBool,
    options: Options,
    mut progress: impl FnMut(&CaptureStats),
) -> Result<Inspection, InspectError> {
    use pnet_datalink::Channel;
    let err = |reason: String| InspectError::Interface {
        iface: iface.to_string(),
        reason,
    };
    let interface = pnet_datalink::interfaces()
        .into_iter()
        .find(|i| i.name == iface)
        .ok_or_else(|| err("no such interface".into()))?;
    let config = pnet_datalink::Config {
        read_timeout: Some(Duration::from_millis(100)),
        read_buffer_size: 1 << 20,
        socket_fd: Some(capture_socket().map_err(|e| err(e.to_string()))?),
        ..Default::default()
    };
    let mut rx = match pnet_datalink::channel(&interface, config) {
        Ok(Channel::Ethernet(_, rx)) => rx,
        Ok(_) => return Err(err("not an Ethernet channel".into())),
        Err(e) => return Err(err(e.to_string())),
    };
    let mut inspector = Inspector::new(options);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let mut last = Instant::now();
    while Instant::now() < deadline && !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let frame = match rx.next() {
            Ok(f) => f,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return Err(err(e.to_string())),
        };
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        inspector.packet(&Packet {
            ts,
            linktype: pcap_parser::Linktype::ETHERNET,
            data: frame.to_vec(),
        });
        if last.elapsed() > Duration::from_secs(2) {
            progress(inspector.stats());
            last = Instant::now();
        }
    }
    Ok(inspector.finish())
}

/// Kernel buffer of the capture socket: a second of a 1 Gbit/s link, so that a burst of
/// large segments is not dropped while the analyzer works through the previous one.
const CAPTURE_SOCKET_BUFFER: i32 = 128 << 20;

/// A raw packet socket with a large receive buffer (`SO_RCVBUFFORCE`, as root; else as
/// large as `net.core.rmem_max` allows), for pnet to bind to the interface.
fn capture_socket() -> std::io::Result<i32> {
    use std::os::fd::IntoRawFd;
    let protocol = (libc::ETH_P_ALL as u16).to_be() as i32;
    let socket = socket2::Socket::new(
        socket2::Domain::PACKET,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(protocol)),
    )?;
    let size = CAPTURE_SOCKET_BUFFER;
    // SAFETY: a valid socket, a pointer to an int and its size.
    let forced = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if forced != 0 {
        socket.set_recv_buffer_size(size as usize)?;
    }
    Ok(socket.into_raw_fd())
}
