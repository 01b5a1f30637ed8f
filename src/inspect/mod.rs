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
    let err = |reason: String| InspectError::Interface {
        iface: iface.to_string(),
        reason,
    };
    let interface = pnet_datalink::interfaces()
        .into_iter()
        .find(|i| i.name == iface)
        .ok_or_else(|| err("no such interface".into()))?;
    let mut rx = CaptureSocket::open(interface.index).map_err(|e| err(e.to_string()))?;
    let mut inspector = Inspector::new(options);
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let mut last = Instant::now();
    while Instant::now() < deadline && !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let (data, ts) = match rx.next() {
            Ok(f) => f,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return Err(err(e.to_string())),
        };
        inspector.packet(&Packet {
            ts,
            linktype: pcap_parser::Linktype::ETHERNET,
            data: data.to_vec(),
        });
        if last.elapsed() > Duration::from_secs(2) {
            progress(inspector.stats());
            last = Instant::now();
        }
    }
    Ok(inspector.finish())
}

/// A raw packet socket bound to one interface that reads each frame with the time the
/// kernel saw it (`SO_TIMESTAMPNS`): the analyzer may fall behind a busy link and read
/// a burst at once, and the time it reads them is not when they crossed the wire.
struct CaptureSocket {
    socket: socket2::Socket,
    buf: Vec<u8>,
}

impl CaptureSocket {
    /// Largest frame read whole (a GSO/GRO frame is up to 64 KiB; BIG TCP's larger).
    const FRAME: usize = 1 << 20;

    fn open(ifindex: u32) -> std::io::Result<CaptureSocket> {
        let socket = capture_socket()?;
        set_socket_int(&socket, libc::SO_TIMESTAMPNS, 1)?;
        // SAFETY: sockaddr_ll is plain data; zero is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: a valid socket and a sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(CaptureSocket {
            socket,
            buf: vec![0; Self::FRAME],
        })
    }

    /// The next frame and when the kernel saw it (seconds since the epoch).
    fn next(&mut self) -> std::io::Result<(&[u8], f64)> {
        // Room for one timespec control message, aligned.
        let mut control = [0u64; 8];
        let mut iov = libc::iovec {
            iov_base: self.buf.as_mut_ptr().cast(),
            iov_len: self.buf.len(),
        };
        // SAFETY: msghdr is plain data; zero is a valid start.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: the buffers msg points to live until the call returns.
        let n =
            unsafe { libc::recvmsg(std::os::fd::AsRawFd::as_raw_fd(&self.socket), &mut msg, 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut ts = None;
        // SAFETY: walking the control messages recvmsg wrote, with libc's macros.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET
                    && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
                {
                    let t: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                    ts = Some(t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9);
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        let ts = match ts {
            Some(t) => t,
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        };
        let len = (n as usize).min(self.buf.len());
        Ok((&self.buf[..len], ts))
    }
}

/// Kernel buffer of the capture socket: a second of a 1 Gbit/s link, so that a burst of
/// large segments is not dropped while the analyzer works through the previous one.
const CAPTURE_SOCKET_BUFFER: i32 = 128 << 20;

/// A raw packet socket with a large receive buffer (`SO_RCVBUFFORCE`, as root; else as
/// large as `net.core.rmem_max` allows). It receives nothing until bound (protocol 0),
/// so that no frame of another interface slips in before.
fn capture_socket() -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::PACKET,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(0)),
    )?;
    let size = CAPTURE_SOCKET_BUFFER;
    if set_socket_int(&socket, libc::SO_RCVBUFFORCE, size).is_err() {
        socket.set_recv_buffer_size(size as usize)?;
    }
    Ok(socket)
}

/// Sets an integer `SOL_SOCKET` option that socket2 does not offer.
fn set_socket_int(
    socket: &socket2::Socket,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: a valid socket, a pointer to an int and its size.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            libc::SOL_SOCKET,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
