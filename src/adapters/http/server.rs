//! The HTTP server loop: accepts connections, bounds how many are open at once and how long
//! a client may take to send a request's headers, and serves the router on each (HTTP/1.1).
//! `axum::serve` bounds neither: a client that opened connections and sent nothing, or
//! trickled headers a byte at a time, could hold connections until the process ran out of
//! file descriptors, and the IP allowlist only looks at a request once its headers are in.
//! A client that stops reading its replies is bounded too: a reply write that makes no
//! progress for [`WRITE_STALL_TIMEOUT`] closes the connection.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Semaphore};
use tokio::time::Sleep;
use tower::ServiceExt;

/// Connections open at once; past it the server stops accepting and new connections wait
/// in the kernel's accept backlog. Twice the request bound: every host and GM client may
/// keep a connection open (W1 polls from 1,000 hosts), with room for reconnects. Each open
/// connection costs a file descriptor and a few KiB of buffers.
pub const MAX_CONNECTIONS: usize = 8192;

/// A request's headers must be in within this, counted from when the connection starts
/// waiting for them; so a keep-alive connection idle this long is closed too (clients
/// reconnect; polls come every second or so; nginx's upstream keep-alive is set below it).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A reply write that makes no progress for this long closes the connection: the client
/// has stopped reading (the kernel's send buffer, hundreds of KiB, is full). Without it
/// such a client would hold its connection slot and its request's concurrency slot until
/// shutdown. A client that reads at all, however slowly, keeps its connection; the
/// request timeout does not cover the reply's body.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause after an accept error other than a client giving up: most likely the process is
/// out of file descriptors, which only closing connections cures, and retrying at once
/// would spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(200);

/// The server's bounds; [`ServerLimits::default`] is what the relay uses.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub write_stall_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: MAX_CONNECTIONS,
            header_read_timeout: HEADER_READ_TIMEOUT,
            write_stall_timeout: WRITE_STALL_TIMEOUT,
        }
    }
}

/// Serves `app` on `listener` until `stop` resolves; then stops accepting, lets requests in
/// flight finish (idle connections close at once) and returns when every connection is
/// closed. Handlers see the peer as `ConnectInfo<SocketAddr>`.
pub async fn serve(listener: TcpListener, app: Router, limits: ServerLimits, stop: impl Future<Output = ()>) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let mut stop = pin!(stop);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut stop => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        let (stream, peer) = match accepted {
            Ok(connection) => connection,
            Err(e) if is_client_gone(&e) => continue,
            Err(e) => {
                tracing::error!(error = %e, "cannot accept a connection; pausing");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let app = app.clone();
        let watch = WriteWatch::default();
        let stream = StallBounded::new(stream, limits.write_stall_timeout, watch.clone());
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            request.extensions_mut().insert(watch.clone());
            app.clone().oneshot(request.map(Body::new))
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                // A client that closed early or sent no headers in time; nothing to do.
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Tells a reply when its bytes are on the wire. hyper takes a reply's body into its write
/// buffer and lets the body go before it writes the buffer to the socket; a legacy poll
/// must ack what its reply holds only once the reply is written (a client that resets
/// mid-reply gets those events again), so it asks this, its connection's watch, which
/// every request carries as an extension. A flush of the connection that completes means
/// hyper's buffer, and with it every reply taken before, went to the socket (the kernel's
/// send buffer, or a buffering proxy in front, took the bytes; the client may read them
/// later). A reply that cannot wait longer for its write gives up the connection
/// ([`WriteWatch::abandon`]), so the client never reads a reply whose events come again.
#[derive(Clone, Default)]
pub struct WriteWatch(Arc<Watched>);

#[derive(Default)]
struct Watched {
    /// Read on every write: once set, the connection's writes fail.
    abandoned: AtomicBool,
    waiters: Mutex<Waiters>,
}

#[derive(Default)]
struct Waiters {
    /// At most one per request in flight on the connection: one, with HTTP/1.1.
    waiting: Vec<oneshot::Sender<()>>,
    closed: bool,
    /// The connection's writer while a write waits for room in the send buffer, so that
    /// giving the connection up wakes it rather than leaving it to the stall bound.
    blocked_writer: Option<Waker>,
}

impl WriteWatch {
    /// Resolves once everything the connection has taken so far is written; fails once
    /// the connection closes first.
    pub fn written(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut waiters = self.waiters();
        if !waiters.closed {
            waiters.waiting.push(tx);
        }
        rx
    }

    /// Gives the connection up: its next read, write or flush fails and the connection
    /// closes, so what it has not yet written (the rest of a reply that took too long)
    /// never reaches the client, which sees a cut reply. A write already under way may
    /// still complete; its flush then still resolves [`WriteWatch::written`] before it
    /// fails, so wait briefly on those receivers after calling this to learn the outcome.
    pub fn abandon(&self) {
        self.0.abandoned.store(true, Ordering::Release);
        let writer = self.waiters().blocked_writer.take();
        if let Some(writer) = writer {
            writer.wake();
        }
    }

    fn is_abandoned(&self) -> bool {
        self.0.abandoned.load(Ordering::Acquire)
    }

    fn waiters(&self) -> MutexGuard<'_, Waiters> {
        self.0.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn flushed(&self) {
        for tx in self.waiters().waiting.drain(..) {
            let _ = tx.send(());
        }
    }

    fn blocked(&self, writer: &Waker) {
        let mut waiters = self.waiters();
        match &mut waiters.blocked_writer {
            Some(known) if known.will_wake(writer) => {}
            slot => *slot = Some(writer.clone()),
        }
    }

    fn closed(&self) {
        let mut waiters = self.waiters();
        waiters.closed = true;
        waiters.waiting.clear();
        waiters.blocked_writer = None;
    }
}

/// A connection whose writes fail once one has been pending for `limit` without progress.
/// The timer is armed only when a write cannot proceed (the send buffer is full), so the
/// common path costs one branch. It also tells its [`WriteWatch`] of completed flushes.
struct StallBounded<S> {
    inner: S,
    limit: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
    watch: WriteWatch,
}

impl<S> StallBounded<S> {
    fn new(inner: S, limit: Duration, watch: WriteWatch) -> Self {
        StallBounded { inner, limit, stalled: None, watch }
    }

    /// Called with a write's outcome: progress disarms the timer, a pending write arms it
    /// (once) and fails when it fires.
    fn bound<T>(&mut self, cx: &mut Context<'_>, outcome: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if outcome.is_ready() {
            self.stalled = None;
            return outcome;
        }
        self.watch.blocked(cx.waker());
        if self.watch.is_abandoned() {
            return Poll::Ready(Err(given_up()));
        }
        let limit = self.limit;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client has not read its reply")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallBounded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // A connection given up just after its reply was written must not go on to take
        // the client's next request, whose reply it could not write.
        if self.watch.is_abandoned() {
            return Poll::Ready(Err(given_up()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallBounded<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.watch.is_abandoned() {
            return Poll::Ready(Err(given_up()));
        }
        let outcome = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.bound(cx, outcome)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.watch.is_abandoned() {
            return Poll::Ready(Err(given_up()));
        }
        let outcome = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.bound(cx, outcome)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let outcome = Pin::new(&mut self.inner).poll_flush(cx);
        let outcome = self.bound(cx, outcome);
        if matches!(outcome, Poll::Ready(Ok(()))) {
            // hyper flushes once its buffer is in the socket: written, even if the
            // connection was given up meanwhile (a write already under way completed).
            self.watch.flushed();
            if self.watch.is_abandoned() {
                return Poll::Ready(Err(given_up()));
            }
        }
        outcome
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let outcome = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.bound(cx, outcome)
    }
}

impl<S> Drop for StallBounded<S> {
    fn drop(&mut self) {
        // Whatever was not flushed by now never reaches the client.
        self.watch.closed();
    }
}

fn given_up() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the reply was not written in time; the connection is given up")
}

fn is_client_gone(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Instant;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// Bound on every wait here; the server's own bounds are far shorter.
    const DEADLINE: Duration = Duration::from_secs(10);

    /// The reply of `/big`: far more than loopback's socket buffers hold, so a client that
    /// does not read it leaves the server's write pending.
    const BIG_REPLY: usize = 64 << 20;

    async fn start(
        limits: ServerLimits,
    ) -> (SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
        let app = Router::new()
            .route(
                "/",
                get(
                    |ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { format!("from {}", peer.ip()) },
                ),
            )
            .route("/big", get(|| async { vec![b'x'; BIG_REPLY] }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, limits, async {
            let _ = stop_rx.await;
        }));
        (addr, stop_tx, server)
    }

    /// Sends one GET on `stream` and reads its reply.
    async fn request(stream: &mut TcpStream) -> String {
        stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        read_reply(stream).await
    }

    /// Reads until the body is in (the reply is small).
    async fn read_reply(stream: &mut TcpStream) -> String {
        let mut reply = Vec::new();
        let mut buf = [0u8; 1024];
        let started = Instant::now();
        while !String::from_utf8_lossy(&reply).contains("from ") {
            assert!(started.elapsed() < DEADLINE, "no reply: {}", String::from_utf8_lossy(&reply));
            let n = tokio::time::timeout(DEADLINE, stream.read(&mut buf))
                .await
                .expect("a reply in time")
                .unwrap();
            assert!(n > 0, "closed before replying");
            reply.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&reply).into_owned()
    }

    /// Reads until the server closes the connection; panics past [`DEADLINE`].
    async fn closes(stream: &mut TcpStream) {
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(_)) => {}
                Err(_) => panic!("the server kept the connection open past {DEADLINE:?}"),
            }
        }
    }

    #[tokio::test]
    async fn handlers_see_the_peer_address() {
        let (addr, _stop, _server) = start(ServerLimits::default()).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        assert!(request(&mut stream).await.ends_with("from 127.0.0.1"));
    }

    #[tokio::test]
    async fn a_client_that_sends_no_complete_headers_is_disconnected() {
        let limits =
            ServerLimits { header_read_timeout: Duration::from_millis(300), ..ServerLimits::default() };
        let (addr, _stop, _server) = start(limits).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut trickling = TcpStream::connect(addr).await.unwrap();
        trickling.write_all(b"GET / HTTP/1.1\r\nHost").await.unwrap();
        // Without the timeout the server would keep both open past the deadline.
        closes(&mut silent).await;
        closes(&mut trickling).await;
        // An idle keep-alive connection is closed the same way after its last reply.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        request(&mut idle).await;
        closes(&mut idle).await;
    }

    #[tokio::test]
    async fn past_the_connection_bound_new_connections_wait_until_one_closes() {
        let limits = ServerLimits { max_connections: 2, ..ServerLimits::default() };
        let (addr, _stop, _server) = start(limits).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        request(&mut first).await;
        request(&mut second).await;
        // The kernel completes the handshake; the server does not take the connection.
        let mut third = TcpStream::connect(addr).await.unwrap();
        third.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut buf)).await;
        assert!(early.is_err(), "answered past the bound: {early:?}");
        drop(first);
        assert!(read_reply(&mut third).await.ends_with("from 127.0.0.1"));
    }

    /// A connection with a small receive buffer that has asked for `/big`.
    async fn ask_for_big(addr: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
        stream.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        stream
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_its_reply_is_disconnected() {
        let limits = ServerLimits {
            max_connections: 1,
            write_stall_timeout: Duration::from_millis(300),
            ..ServerLimits::default()
        };
        let (addr, _stop, _server) = start(limits).await;
        let mut stalled = ask_for_big(addr).await;
        // The stalled client holds the only connection slot: without the bound the next
        // client would never be served.
        let mut next = TcpStream::connect(addr).await.unwrap();
        assert!(request(&mut next).await.ends_with("from 127.0.0.1"));
        let mut got = 0;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match tokio::time::timeout(DEADLINE, stalled.read(&mut buf)).await.expect("closed in time") {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        assert!(got < BIG_REPLY, "the whole reply arrived: {got} bytes");
    }

    /// Through a pipe that holds 1 KiB, so a write waits until the reader takes something.
    #[tokio::test]
    async fn a_write_fails_only_after_the_bound_without_progress() {
        const TOTAL: usize = 64 << 10;
        let limit = Duration::from_millis(300);
        let (near, mut far) = tokio::io::duplex(1024);
        let mut bounded = StallBounded::new(near, limit, WriteWatch::default());
        let writer = tokio::spawn(async move { bounded.write_all(&[b'x'; TOTAL]).await });
        // A reader that takes 1 KiB every third of the bound, for three bounds' time (the
        // pace of the client, not a wait for the writer): the write keeps waiting, never
        // the bound's length at once.
        let mut buf = [0u8; 1024];
        let mut got = 0;
        let slow_until = Instant::now() + 3 * limit;
        while Instant::now() < slow_until {
            tokio::time::sleep(limit / 3).await;
            got += tokio::time::timeout(DEADLINE, far.read(&mut buf)).await.expect("data in time").unwrap();
        }
        // 64 KiB cannot have gone at this pace: an ended write is a failed one.
        assert!(!writer.is_finished(), "the write ended while the reader was reading");
        // Then the reader stops: the write fails once the bound has passed.
        let failed = tokio::time::timeout(DEADLINE, writer).await.expect("the write ended").unwrap();
        let err = failed.expect_err("the write went on without a reader");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(got < TOTAL);
    }

    #[tokio::test]
    async fn an_abandoned_connection_fails_its_blocked_write_at_once() {
        let (near, mut far) = tokio::io::duplex(1024);
        let watch = WriteWatch::default();
        // A bound far beyond the test: only the abandon can end the write.
        let mut bounded = StallBounded::new(near, Duration::from_secs(3600), watch.clone());
        let written = watch.written();
        let writer = tokio::spawn(async move {
            bounded.write_all(&[b'x'; 64 << 10]).await?;
            bounded.flush().await
        });
        let mut buf = [0u8; 1024];
        tokio::time::timeout(DEADLINE, far.read_exact(&mut buf)).await.expect("the write began").unwrap();
        watch.abandon();
        let failed = tokio::time::timeout(DEADLINE, writer).await.expect("the write ended").unwrap();
        assert_eq!(failed.expect_err("an abandoned write went on").kind(), io::ErrorKind::TimedOut);
        assert!(written.await.is_err(), "an unwritten reply counted as written");
    }

    #[tokio::test]
    async fn a_flush_that_completes_counts_as_written_though_abandoned_meanwhile() {
        let (near, mut far) = tokio::io::duplex(64 << 10);
        let watch = WriteWatch::default();
        let mut bounded = StallBounded::new(near, Duration::from_secs(3600), watch.clone());
        let written = watch.written();
        bounded.write_all(b"a whole reply").await.unwrap();
        // Given up after the bytes went out, before the flush that reports them.
        watch.abandon();
        let flushed = bounded.flush().await;
        assert_eq!(flushed.expect_err("an abandoned connection stays open").kind(), io::ErrorKind::TimedOut);
        assert!(written.await.is_ok(), "a written reply counted as cut");
        let mut buf = [0u8; 64];
        assert!(bounded.read(&mut buf).await.is_err(), "an abandoned connection reads the next request");
        let n = far.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"a whole reply");
    }

    #[tokio::test]
    async fn stopping_closes_idle_connections_and_returns() {
        let (addr, stop, server) = start(ServerLimits::default()).await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        request(&mut idle).await;
        stop.send(()).unwrap();
        tokio::time::timeout(DEADLINE, server).await.expect("stopped in time").unwrap();
        closes(&mut idle).await;
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting after the stop");
    }
}
