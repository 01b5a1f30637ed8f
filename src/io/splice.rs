//! Moving a message body from one socket to another without bringing it into the
//! process: `splice(2)` from the source socket into a pipe and from the pipe into the
//! destination socket, the kernel moving page references where it can instead of two
//! copies through a user buffer. Used where the proxy only passes bytes on (a frame
//! body nothing needs to see, `StreamDecoder::take_pass`). Where the kernel refuses
//! (no pipe, `EINVAL` for a socket type) the same body goes through a user buffer.

use std::io::{Error, ErrorKind};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::metrics;

/// What the pipe between the sockets holds at most (the kernel may give less).
const PIPE_BYTES: usize = 1 << 20;
/// The user buffer of the fallback.
const COPY_BYTES: usize = 256 * 1024;

/// A failed pass: which side it failed on.
#[derive(Debug)]
pub(crate) enum PassError {
    /// Reading the source (or it ended inside the body).
    Read(Error),
    /// Writing the destination.
    Write(Error),
}

/// The pipe of one direction, made on its first use.
#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes in it now.
    held: usize,
    /// What it holds at most.
    size: usize,
}

impl Pipe {
    fn new() -> std::io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two new descriptors into `fds`, owned right below.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(Error::last_os_error());
        }
        // SAFETY: fresh descriptors of this process, owned once.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a descriptor this process owns; a refusal keeps the default size.
        let size = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_BYTES as libc::c_int,
            )
        };
        let size = if size > 0 { size as usize } else { 64 * 1024 };
        Ok(Pipe {
            read,
            write,
            held: 0,
            size,
        })
    }
}

/// Moves bodies of one direction: spliced, or through a buffer when splicing is off
/// or the kernel refuses it.
#[derive(Debug)]
pub(crate) struct BodyMover {
    pipe: Option<Pipe>,
    /// Splicing is off (configured, or refused once by the kernel).
    buffered: bool,
    buf: Vec<u8>,
}

fn splice(from: RawFd, to: RawFd, len: usize) -> std::io::Result<usize> {
    // SAFETY: valid descriptors, no offsets (sockets and pipes); non-blocking.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The kernel cannot splice these descriptors: go through a buffer.
fn unsupported(e: &Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    )
}

impl BodyMover {
    /// A mover that splices (`splice`), or always goes through a buffer.
    pub(crate) fn new(splice: bool) -> BodyMover {
        BodyMover {
            pipe: None,
            buffered: !splice,
            buf: Vec::new(),
        }
    }

    /// Moves exactly `n` bytes from `from` to `to`; says how (a `PASS_HOW` label).
    pub(crate) async fn pass(
        &mut self,
        from: &TcpStream,
        to: &TcpStream,
        n: u64,
    ) -> Result<&'static str, PassError> {
        let mut left = n;
        if !self.buffered {
            if self.pipe.is_none() {
                match Pipe::new() {
                    Ok(p) => self.pipe = Some(p),
                    Err(e) => {
                        tracing::warn!(error = %e, "no pipe for splice: bodies go through a buffer");
                        self.buffered = true;
                    }
                }
            }
            if let Some(pipe) = &mut self.pipe {
                match spliced(pipe, from, to, &mut left).await {
                    // Only before a byte moved: what is in the pipe cannot be taken back.
                    Err(PassError::Read(e) | PassError::Write(e))
                        if unsupported(&e) && left == n && pipe.held == 0 =>
                    {
                        tracing::warn!(error = %e, "splice refused: bodies go through a buffer");
                        self.buffered = true;
                        self.pipe = None;
                    }
                    other => return other.map(|()| metrics::PASS_HOW[0]),
                }
            }
        }
        if self.buf.is_empty() {
            self.buf = vec![0; COPY_BYTES];
        }
        copied(&mut self.buf, from, to, left).await?;
        Ok(metrics::PASS_HOW[1])
    }
}

/// Splices until `left` is 0 and the pipe is empty.
async fn spliced(
    pipe: &mut Pipe,
    from: &TcpStream,
    to: &TcpStream,
    left: &mut u64,
) -> Result<(), PassError> {
    let (src, dst) = (from.as_raw_fd(), to.as_raw_fd());
    while *left > 0 || pipe.held > 0 {
        let room = pipe.size - pipe.held;
        let mut moved = false;
        if *left > 0 && room > 0 {
            let want = room.min(usize::try_from(*left).unwrap_or(usize::MAX));
            match from.try_io(Interest::READABLE, || {
                splice(src, pipe.write.as_raw_fd(), want)
            }) {
                Ok(0) => {
                    return Err(PassError::Read(Error::new(
                        ErrorKind::UnexpectedEof,
                        "the sender closed inside a message",
                    )))
                }
                Ok(k) => {
                    *left -= k as u64;
                    pipe.held += k;
                    moved = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(PassError::Read(e)),
            }
        }
        if pipe.held > 0 {
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), dst, pipe.held)
            }) {
                Ok(k) => {
                    pipe.held -= k;
                    moved |= k > 0;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(PassError::Write(e)),
            }
        }
        if moved {
            continue;
        }
        // Neither side could move: wait for whichever can.
        let can_read = *left > 0 && pipe.held < pipe.size;
        let can_write = pipe.held > 0;
        tokio::select! {
            r = from.readable(), if can_read => r.map_err(PassError::Read)?,
            w = to.writable(), if can_write => w.map_err(PassError::Write)?,
        }
    }
    Ok(())
}

/// Copies `left` bytes through `buf`.
async fn copied(
    buf: &mut [u8],
    from: &TcpStream,
    to: &TcpStream,
    mut left: u64,
) -> Result<(), PassError> {
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        from.readable().await.map_err(PassError::Read)?;
        let n = match from.try_read(&mut buf[..want]) {
            Ok(0) => {
                return Err(PassError::Read(Error::new(
                    ErrorKind::UnexpectedEof,
                    "the sender closed inside a message",
                )))
            }
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) => return Err(PassError::Read(e)),
        };
        let mut at = 0;
        while at < n {
            to.writable().await.map_err(PassError::Write)?;
            match to.try_write(&buf[at..n]) {
                Ok(k) => at += k,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(PassError::Write(e)),
            }
        }
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Two connected pairs: (sender, from) and (to, receiver).
    async fn pairs() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
        async fn pair() -> (TcpStream, TcpStream) {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            (a, l.accept().await.unwrap().0)
        }
        (pair().await, pair().await)
    }

    async fn pass_through(splice: bool, n: usize) -> (Vec<u8>, &'static str, Vec<u8>) {
        let ((mut sender, from), (to, mut receiver)) = pairs().await;
        let body: Vec<u8> = (0..n).map(|i| (i * 13 + i / 4099) as u8).collect();
        // The bytes after the body stay for whoever reads `from` next.
        let mut wire = body.clone();
        wire.extend_from_slice(b"after");
        let writer = tokio::spawn(async move {
            sender.write_all(&wire).await.unwrap();
            sender
        });
        let reader = tokio::spawn(async move {
            let mut got = vec![0; n];
            receiver.read_exact(&mut got).await.unwrap();
            got
        });
        let mut mover = BodyMover::new(splice);
        let how = mover.pass(&from, &to, n as u64).await.unwrap();
        let got = reader.await.unwrap();
        let _sender = writer.await.unwrap();
        let mut rest = [0u8; 5];
        let mut from = from;
        from.read_exact(&mut rest).await.unwrap();
        assert!(got == body, "splice {splice}: {n} bytes differ");
        (got, how, rest.to_vec())
    }

    #[tokio::test]
    async fn a_body_goes_by_byte_exact_spliced_and_through_the_buffer() {
        for n in [1, 300_000, 5_000_000] {
            let (_, how, rest) = pass_through(true, n).await;
            assert_eq!((how, &rest[..]), ("splice", &b"after"[..]));
            let (_, how, rest) = pass_through(false, n).await;
            assert_eq!((how, &rest[..]), ("copy", &b"after"[..]));
        }
    }

    #[tokio::test]
    async fn a_sender_that_closes_inside_the_body_is_a_read_error() {
        for splice in [true, false] {
            let ((mut sender, from), (to, _receiver)) = pairs().await;
            sender.write_all(&[1u8; 1000]).await.unwrap();
            drop(sender);
            let err = BodyMover::new(splice)
                .pass(&from, &to, 5000)
                .await
                .unwrap_err();
            assert!(
                matches!(&err, PassError::Read(e) if e.kind() == ErrorKind::UnexpectedEof),
                "splice {splice}: {err:?}"
            );
        }
    }
}
