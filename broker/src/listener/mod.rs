//! Connection limits shared by the gRPC and webhook listeners: a cap on open
//! connections per listener, a deadline for a new connection's first bytes,
//! an idle timeout, and accept-error logging that cannot flood. Without them
//! idle (unauthenticated) connections pile up until the process runs out of
//! file descriptors and real callers fail. An accept error that means the
//! listening socket itself is gone breaks the gate: its server then fails
//! (and the broker stops, naming it) instead of retrying forever.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};

/// Limits on one listener's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Most open connections; more are closed at once.
    pub max: usize,
    /// Time a new connection has to send its first bytes and finish the TLS
    /// handshake.
    pub handshake_timeout: Duration,
    /// Time a connection may go without sending a byte. Live HTTP/2 clients
    /// answer the server's keepalive pings, so only dead or idle ones hit it.
    pub idle_timeout: Duration,
    /// Age at which a gRPC connection is asked to go away (HTTP/2 GOAWAY),
    /// then closed after [`MAX_AGE_GRACE`]: clients reconnect, possibly to
    /// another replica, and the transport buffers of the old connection,
    /// which may hold credentials it carried, are freed and cleared.
    pub max_age: Duration,
}

/// How long a connection past its maximum age has before it is closed.
pub const MAX_AGE_GRACE: Duration = Duration::from_secs(5);

/// How often the broker pings each HTTP/2 connection.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most concurrent RPCs (streams) on one HTTP/2 connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max: 4096,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_age: Duration::from_secs(30 * 60),
        }
    }
}

impl ConnectionLimits {
    /// `max`, lowered to half the process's open-file limit so that connections
    /// alone can never use up the descriptors Vault calls and files need.
    pub fn effective_max(&self) -> usize {
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        match soft.and_then(|n| usize::try_from(n).ok()) {
            Some(files) => self.max.min((files / 2).max(1)),
            None => self.max,
        }
    }
}

/// Admits connections to one listener within its [`ConnectionLimits`].
#[derive(Clone)]
pub struct Gate {
    name: &'static str,
    limits: ConnectionLimits,
    permits: Arc<Semaphore>,
    refused: Arc<Throttled>,
    broken: Broken,
}

impl Gate {
    /// A gate for the listener `name` (`grpc`, `webhook`).
    pub fn new(name: &'static str, limits: ConnectionLimits) -> Self {
        let max = limits.effective_max();
        tracing::info!(listener = name, max_connections = max, handshake_timeout = ?limits.handshake_timeout, idle_timeout = ?limits.idle_timeout, "connection limits");
        Self {
            name,
            limits,
            permits: Arc::new(Semaphore::new(max)),
            refused: Arc::new(Throttled::new(Duration::from_secs(10))),
            broken: Broken::default(),
        }
    }

    /// The limits this gate admits connections within.
    pub fn limits(&self) -> ConnectionLimits {
        self.limits
    }

    /// Wraps a new connection, or `None` (and a throttled warning) when the
    /// listener is at its cap: the caller drops the connection.
    pub fn admit<S>(&self, stream: S) -> Option<Guarded<S>> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Some(Guarded::new(stream, permit, self.limits)),
            Err(_) => {
                let name = self.name;
                self.refused.warn(|suppressed| {
                    tracing::warn!(listener = name, suppressed, "connection limit reached; closing new connections (raise connections.max or find the idle clients)");
                });
                None
            }
        }
    }

    /// Logs an accept error, at most once per interval; one that means the
    /// listening socket is gone breaks the gate instead (see [`Gate::broken`]).
    pub fn accept_failed(&self, error: &io::Error) {
        if self.broken.is_broken() || self.broken.break_on(error) {
            return;
        }
        self.connection_failed(error);
    }

    /// Logs a failure to set up one accepted connection (its TLS handshake),
    /// at most once per interval.
    pub fn connection_failed(&self, error: &io::Error) {
        let name = self.name;
        self.refused.warn(|suppressed| {
            tracing::warn!(listener = name, %error, suppressed, "accept failed");
        });
    }

    /// Whether the listening socket is gone: accepting again cannot work.
    pub fn is_broken(&self) -> bool {
        self.broken.is_broken()
    }

    /// Resolves, with the accept error, once the listening socket is gone;
    /// a server selects on it and fails with the error.
    pub async fn broken(&self) -> io::Error {
        self.broken.wait().await
    }
}

/// Set once when a listening socket is found gone (EINVAL, EBADF, ENOTSOCK
/// from `accept`: the socket was shut down or closed under the server), as
/// opposed to a passing shortage (EMFILE, ENOBUFS, a peer that reset first)
/// that backing off cures.
#[derive(Clone, Default)]
struct Broken {
    error: Arc<Mutex<Option<String>>>,
    signal: tokio_util::sync::CancellationToken,
}

impl Broken {
    fn break_on(&self, error: &io::Error) -> bool {
        let gone = [
            rustix::io::Errno::INVAL,
            rustix::io::Errno::BADF,
            rustix::io::Errno::NOTSOCK,
        ]
        .iter()
        .any(|errno| error.raw_os_error() == Some(errno.raw_os_error()));
        if gone {
            *self.error.lock().unwrap_or_else(PoisonError::into_inner) = Some(error.to_string());
            self.signal.cancel();
        }
        gone
    }

    fn is_broken(&self) -> bool {
        self.signal.is_cancelled()
    }

    async fn wait(&self) -> io::Error {
        self.signal.cancelled().await;
        let error = self
            .error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        io::Error::other(format!(
            "the listening socket is gone ({}); restarting the broker opens a new one",
            error.unwrap_or_default()
        ))
    }
}

/// A warning logged at most once per interval, with how many were suppressed.
struct Throttled {
    every: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl Throttled {
    fn new(every: Duration) -> Self {
        Self {
            every,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    fn warn(&self, log: impl FnOnce(u64)) {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|at| now.duration_since(at) < self.every) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(now);
        drop(last);
        log(self.suppressed.swap(0, Ordering::Relaxed));
    }
}

/// A connection holding its place under the cap, closed (reads fail with
/// `TimedOut`) when its peer sends nothing within the deadline.
pub struct Guarded<S> {
    inner: S,
    _permit: OwnedSemaphorePermit,
    deadline: Pin<Box<Sleep>>,
    idle_timeout: Duration,
}

impl<S> Guarded<S> {
    fn new(inner: S, permit: OwnedSemaphorePermit, limits: ConnectionLimits) -> Self {
        Self {
            inner,
            _permit: permit,
            deadline: Box::pin(tokio::time::sleep(limits.handshake_timeout)),
            idle_timeout: limits.idle_timeout,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    let next = tokio::time::Instant::now() + self.idle_timeout;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(result)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer sent nothing before the deadline",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

/// Writes pass straight through a connection wrapper (`$wrapper<S>` with an
/// `inner: S`): the wrappers only watch what is read.
macro_rules! write_through {
    ($wrapper:ident) => {
        impl<S: AsyncWrite + Unpin> AsyncWrite for $wrapper<S> {
            fn poll_write(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.inner).poll_write(cx, buf)
            }

            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.inner).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<io::Result<()>> {
                Pin::new(&mut self.inner).poll_shutdown(cx)
            }

            fn poll_write_vectored(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }
        }
    };
}

write_through!(Guarded);

impl tonic::transport::server::Connected for Guarded<TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// A TLS connection that must send its first HTTP/2 request (a HEADERS
/// frame, after the preface and settings) before a deadline. Without it, a
/// peer that finishes the handshake and then says nothing, or only the
/// preface, holds a place under the cap for the whole idle timeout, and
/// enough of them refuse every sidecar. Once a request came, only the idle
/// timeout of the TCP [`Guarded`] below applies.
pub struct FirstRequest<S> {
    inner: S,
    /// `None` once the first request has arrived.
    deadline: Option<Pin<Box<Sleep>>>,
    frames: FrameScan,
}

impl<S> FirstRequest<S> {
    /// Wraps a connection whose handshake just finished.
    pub fn new(inner: S, timeout: Duration) -> Self {
        Self {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(timeout))),
            frames: FrameScan::default(),
        }
    }
}

/// Reads HTTP/2 frame headers from a client's byte stream (RFC 9113 §3.4,
/// §4.1) until it finds a HEADERS frame, skipping every payload.
struct FrameScan {
    preface_left: usize,
    header: [u8; 9],
    have: usize,
    skip: usize,
}

impl Default for FrameScan {
    fn default() -> Self {
        Self {
            preface_left: 24,
            header: [0; 9],
            have: 0,
            skip: 0,
        }
    }
}

impl FrameScan {
    /// Feeds what the client sent; true once a HEADERS frame has begun.
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        const HEADERS: u8 = 0x1;
        let take = |bytes: &mut &[u8], n: usize| {
            let n = n.min(bytes.len());
            *bytes = &bytes[n..];
            n
        };
        self.preface_left -= take(&mut bytes, self.preface_left);
        while !bytes.is_empty() {
            if self.skip > 0 {
                self.skip -= take(&mut bytes, self.skip);
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 9 {
                if self.header[3] == HEADERS {
                    return true;
                }
                let [a, b, c, ..] = self.header;
                self.skip = u32::from_be_bytes([0, a, b, c]) as usize;
                self.have = 0;
            }
        }
        false
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstRequest<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if this.deadline.is_some() && this.frames.feed(&buf.filled()[before..]) {
                    this.deadline = None;
                }
                Poll::Ready(result)
            }
            Poll::Pending => match this.deadline.as_mut().map(|d| d.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request arrived before the deadline",
                ))),
                _ => Poll::Pending,
            },
        }
    }
}

write_through!(FirstRequest);

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for FirstRequest<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The webhook's acceptor: applies the [`Gate`] before TLS.
#[derive(Clone)]
pub struct GateAcceptor(pub Gate);

impl<S: Send + 'static> axum_server::accept::Accept<TcpStream, S> for GateAcceptor {
    type Stream = Guarded<TcpStream>;
    type Service = S;
    type Future = std::future::Ready<io::Result<(Self::Stream, S)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let _ = stream.set_nodelay(true);
        std::future::ready(match self.0.admit(stream) {
            Some(guarded) => Ok((guarded, service)),
            None => Err(io::Error::other("connection limit reached")),
        })
    }
}

#[cfg(test)]
mod tests;
