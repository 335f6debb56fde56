//! Connections: the accept loop, the cap on open connections, and the timeouts that keep a
//! connection from being held open by a client that sends nothing, or sends slowly.
//!
//! `axum::serve` runs hyper without a timer, so no header, body or idle timeout applies and
//! every accepted socket stays open as long as its client likes. Here each connection is served
//! by hyper's HTTP/1 connection driver beside a watchdog that knows what the connection is doing:
//!
//! ```text
//! accepted ──bytes──▶ reading a head ──head complete──▶ busy (requests in the handlers)
//!    ▲ idle              │ > header timeout: closed         │ response produced
//!    └───────────────────┴──────────────────────────────────┘
//!    idle > idle timeout: closed
//! ```
//!
//! * **Idle** (just accepted, or between keep-alive requests): closed after `idle_timeout`.
//! * **Reading a head** (bytes arrived, no complete request yet): closed `header_timeout` after
//!   the first byte, however slowly the rest comes.
//! * **Busy**: a request is in the handlers. Its body must arrive within `body_timeout` (408,
//!   [`super::body`]) and its inference ends by the request deadline, so busy is bounded too.
//!
//! At most `max_connections` are open. While new connections wait beyond that, in the kernel's
//! listen backlog (`--listen-backlog`), room is made:
//!
//! * a connection idle for [`EVICT_IDLE_AFTER`] or more (or that long in its head) is closed
//!   at once (`OpenConnections::make_room`): a keep-alive client, a browser or a load
//!   balancer reopens it when it needs it;
//! * and connections rotate: one answer every [`ROTATE_EVERY`] carries `Connection: close`,
//!   and its connection closes once the answer is written. That client loses nothing, never
//!   sees a reset, and reconnects at the back of the backlog.
//!
//! A connection idle only a moment is never closed under its client, who may be sending its
//! next request that very moment. So neither idle sockets nor a storm of busy keep-alive
//! clients can lock out a health probe: it waits for the connections ahead of it in the
//! backlog to be let in, about 4,000 a second, not for clients to leave; and the rotation is
//! slow enough that the clients with a connection keep it for most of their requests.
//!
//! On shutdown ([`Connections::shut_down`]) the listener stops accepting and every connection
//! closes as soon as its current response is written (hyper's graceful shutdown); responses sent
//! while draining also carry `Connection: close` ([`super::routes`]).

use std::{
    collections::HashMap,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::Body,
    extract::Request,
    http::{header, HeaderValue},
    Router,
};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{watch, Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError},
    time::Instant,
};
use tower::ServiceExt;

/// How long a connection must have been idle (or in its head) to be closed to make room.
pub const EVICT_IDLE_AFTER: Duration = Duration::from_secs(1);

/// While connections wait at the cap, one answer this often closes its connection.
pub const ROTATE_EVERY: Duration = Duration::from_micros(250);

/// How often the accept loop, waiting at the cap, looks again for a connection idle long
/// enough to close.
const ROOM_RETRY: Duration = Duration::from_millis(100);

/// The connection limits (from [`super::ServeConfig`]).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Longest time from a request's first byte to the end of its headers.
    pub header_timeout: Duration,
    /// Longest time a connection may sit with no request under way.
    pub idle_timeout: Duration,
}

impl Limits {
    /// How long a connection must have been idle to be closed to make room: a second, or the
    /// idle timeout if that is shorter.
    fn evict_after(&self) -> Duration {
        self.idle_timeout.min(EVICT_IDLE_AFTER)
    }
}

/// The serving side of the listener: what [`serve`] returns, to shut it down and to count what
/// is still open.
pub struct Connections {
    stop: watch::Sender<bool>,
    slots: Arc<Semaphore>,
    max: usize,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl Connections {
    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// Stops accepting and asks every connection to close once its current response is
    /// written; resolves when all are closed.
    pub async fn shut_down(&self) {
        let _ = self.stop.send(true);
        self.accept_loop.abort();
        let all = u32::try_from(self.max).unwrap_or(u32::MAX);
        // Every slot back means every connection closed.
        let _ = self.slots.acquire_many(all).await;
    }
}

/// Listens on `host:port` (the first address it resolves to that binds) with room for
/// `backlog` connections not yet accepted: the ones waiting at the cap. (The standard
/// library's `bind` asks for 128, which a storm of clients overflows: their SYNs are dropped
/// and they stall for seconds of retransmission.)
pub async fn bind(host: &str, port: u16, backlog: u32) -> io::Result<TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // As the standard library does: a restarted server can bind while old connections
        // linger in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        match socket.bind(addr).and_then(|()| socket.listen(backlog)) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the host resolves to no address",
        )
    }))
}

/// Serves `app` on `listener` within `limits` until [`Connections::shut_down`].
pub fn serve(listener: TcpListener, app: Router, limits: Limits) -> Connections {
    let (stop, stopped) = watch::channel(false);
    let max = limits.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(max));
    let accept_loop = tokio::spawn(accept_loop(listener, app, limits, slots.clone(), stopped));
    Connections {
        stop,
        slots,
        max,
        accept_loop,
    }
}

async fn accept_loop(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    slots: Arc<Semaphore>,
    stopped: watch::Receiver<bool>,
) {
    let open = Arc::new(OpenConnections::default());
    loop {
        let slot = loop {
            match slots.clone().try_acquire_owned() {
                Ok(slot) => break slot,
                Err(TryAcquireError::Closed) => return,
                Err(TryAcquireError::NoPermits) => {}
            }
            // Full: rotate connections (`rotate_now`) until a slot frees, and close a long-idle
            // connection if there is one (looking again now and then).
            open.waiting.store(true, Ordering::Relaxed);
            open.make_room(limits.evict_after());
            if let Ok(slot) = tokio::time::timeout(ROOM_RETRY, slots.clone().acquire_owned()).await
            {
                open.waiting.store(false, Ordering::Relaxed);
                match slot {
                    Ok(slot) => break slot,
                    Err(_) => return,
                }
            }
        };
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, or a connection reset before it was accepted: wait a
                // little rather than spin, then go on.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let watch = open.add();
        tokio::spawn(connection(
            stream,
            app.clone(),
            limits,
            watch,
            open.clone(),
            slot,
            stopped.clone(),
        ));
    }
}

/// Serves one connection until it closes, times out, is closed to make room, or shutdown.
async fn connection(
    stream: TcpStream,
    app: Router,
    limits: Limits,
    watch: Arc<Watch>,
    open: Arc<OpenConnections>,
    _slot: OwnedSemaphorePermit,
    mut stopped: watch::Receiver<bool>,
) {
    let io = TokioIo::new(Watched {
        inner: stream,
        watch: watch.clone(),
    });
    let service = {
        let (watch, open) = (watch.clone(), open.clone());
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let busy = Busy::begin(&watch);
            let (app, open) = (app.clone(), open.clone());
            async move {
                let mut response = app.oneshot(request.map(Body::new)).await;
                if open.rotate_now() {
                    // Connections wait for room: this answer is the connection's last, and says
                    // so (hyper then closes it once the answer is written).
                    if let Ok(response) = &mut response {
                        response
                            .headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                }
                drop(busy);
                response
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Our watchdog times headers (and idleness, which hyper's header timer would also cut).
    builder.header_read_timeout(None);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut shutting_down = *stopped.borrow();
    if shutting_down {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        let expiry = watch.expiry(limits);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break;
            }
            () = tokio::time::sleep_until(expiry) => {
                if let Some(why) = watch.expired(limits) {
                    tracing::debug!(why, "closing connection");
                    break;
                }
            }
            () = watch.close.notified() => {
                if watch.idle_for(limits.evict_after()) {
                    tracing::debug!("closing idle connection to make room");
                    break;
                }
                // Busy again since it was picked: it stays open (rotation may close it later).
            }
            changed = stopped.changed(), if !shutting_down => {
                if changed.is_err() || *stopped.borrow() {
                    shutting_down = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
    open.remove(watch.id);
}

/// What a connection is doing, as its watchdog sees it.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// No request under way, no byte of the next one: since when.
    Idle(Instant),
    /// Bytes of a request head arrived: since the first one.
    Head(Instant),
    /// Requests in the handlers.
    Busy(usize),
}

/// One connection's phase, shared by its socket, its service and its watchdog.
#[derive(Debug)]
struct Watch {
    id: u64,
    phase: Mutex<Phase>,
    /// Close now (sent only when the connection was idle long enough when picked).
    close: Notify,
}

impl Watch {
    fn phase(&self) -> Phase {
        *self
            .phase
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, f: impl FnOnce(Phase) -> Phase) {
        let mut phase = self
            .phase
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *phase = f(*phase);
    }

    /// When the current phase runs out (a busy connection is looked at again an idle timeout
    /// later).
    fn expiry(&self, limits: Limits) -> Instant {
        match self.phase() {
            Phase::Idle(since) => since + limits.idle_timeout,
            Phase::Head(since) => since + limits.header_timeout,
            Phase::Busy(_) => Instant::now() + limits.idle_timeout,
        }
    }

    /// Why the connection should close now, if it should.
    fn expired(&self, limits: Limits) -> Option<&'static str> {
        let now = Instant::now();
        match self.phase() {
            Phase::Idle(since) if now >= since + limits.idle_timeout => Some("idle timeout"),
            Phase::Head(since) if now >= since + limits.header_timeout => Some("header timeout"),
            _ => None,
        }
    }

    /// True when the connection has been idle, or in a head, for `at_least`: closing it then
    /// loses no request, and its client is most likely not sending one this very moment.
    fn idle_for(&self, at_least: Duration) -> bool {
        match self.phase() {
            Phase::Idle(since) | Phase::Head(since) => since.elapsed() >= at_least,
            Phase::Busy(_) => false,
        }
    }
}

/// Marks its connection busy while a request is in the handlers.
struct Busy(Arc<Watch>);

impl Busy {
    fn begin(watch: &Arc<Watch>) -> Self {
        watch.set(|p| match p {
            Phase::Busy(n) => Phase::Busy(n + 1),
            Phase::Idle(_) | Phase::Head(_) => Phase::Busy(1),
        });
        Self(watch.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.set(|p| match p {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle(Instant::now()),
        });
    }
}

/// The open connections' watches, to find the one idle the longest.
#[derive(Debug, Default)]
struct OpenConnections {
    next: AtomicU64,
    watches: Mutex<HashMap<u64, Arc<Watch>>>,
    /// True while connections wait at the cap.
    waiting: AtomicBool,
    /// When an answer last closed its connection to rotate, in ns since `epoch`.
    rotated: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

impl OpenConnections {
    fn add(&self) -> Arc<Watch> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let watch = Arc::new(Watch {
            id,
            phase: Mutex::new(Phase::Idle(Instant::now())),
            close: Notify::new(),
        });
        self.lock().insert(id, watch.clone());
        watch
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// True when the answer being sent should close its connection: connections wait at the
    /// cap, and none closed to rotate for [`ROTATE_EVERY`].
    fn rotate_now(&self) -> bool {
        if !self.waiting.load(Ordering::Relaxed) {
            return false;
        }
        let epoch = *self.epoch.get_or_init(Instant::now);
        let now = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let last = self.rotated.load(Ordering::Relaxed);
        let every = u64::try_from(ROTATE_EVERY.as_nanos()).unwrap_or(u64::MAX);
        // `last == 0`: never rotated yet.
        (last == 0 || now.saturating_sub(last) >= every)
            && self
                .rotated
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Closes the connection idle (or in its head) the longest, if that is `evict_after` or
    /// more.
    fn make_room(&self, evict_after: Duration) {
        let idlest = self
            .lock()
            .values()
            .filter_map(|w| match w.phase() {
                Phase::Idle(since) | Phase::Head(since) => Some((since, w)),
                Phase::Busy(_) => None,
            })
            .min_by_key(|(since, _)| *since)
            .filter(|(since, _)| since.elapsed() >= evict_after)
            .map(|(_, w)| w.clone());
        if let Some(watch) = idlest {
            watch.close.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Watch>>> {
        self.watches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A socket that tells its [`Watch`] when the bytes of a new request start arriving.
struct Watched {
    inner: TcpStream,
    watch: Arc<Watch>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.watch.set(|p| match p {
                Phase::Idle(_) => Phase::Head(Instant::now()),
                other => other,
            });
        }
        polled
    }
}

impl AsyncWrite for Watched {
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

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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
