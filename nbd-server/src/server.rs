//! The server: its configuration, listeners, connections, statistics and shutdown.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nbd_proto::{REP_ERR_POLICY, REP_ERR_SHUTDOWN};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{broadcast, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::addr::ListenAddr;
use crate::error::{Disconnect, Error, Result};
use crate::export::Export;
use crate::handshake::{greet, haggle, Haggling, Negotiated, Offer, Outcome};
use crate::refusal::{HandshakeFailure, Refused, TlsRefusal};
use crate::transmission::{serve, Limits};

/// How a server behaves and what it bounds.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections served at once; more are answered "too many connections" (an option
    /// error to GO / INFO) and closed.
    pub max_connections: usize,
    /// The longest a client may take from connecting to the start of transmission.
    pub handshake_timeout: Duration,
    /// The largest READ or WRITE (NBD_INFO_BLOCK_SIZE maximum).
    pub max_request_bytes: u32,
    /// Requests in flight per connection.
    pub max_in_flight: usize,
    /// Bytes of payloads and read data held per connection (at least `max_request_bytes`).
    pub max_buffered_bytes: usize,
    /// Options a client may send before GO.
    pub max_options: usize,
    /// How long [`Server::shutdown`] waits for requests in flight before dropping their
    /// connections.
    pub shutdown_grace: Duration,
    /// TLS credentials: when set, TLS is required on every connection (the spec's FORCEDTLS
    /// mode: no option but STARTTLS and ABORT is served in clear text, LIST included), and the
    /// handshake timeout covers the TLS handshake. Clients the server turns away are reported
    /// by [`Server::refusals`].
    pub tls: Option<nbd_tls::ServerTls>,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            max_connections: 16,
            handshake_timeout: Duration::from_secs(10),
            max_request_bytes: 32 * 1024 * 1024,
            max_in_flight: 64,
            max_buffered_bytes: 64 * 1024 * 1024,
            max_options: 128,
            shutdown_grace: Duration::from_secs(10),
            tls: None,
        }
    }
}

/// What a server has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// Connections accepted and served.
    pub connections: u64,
    /// Connections being served now.
    pub active_connections: u64,
    /// Connections turned away (over `max_connections`, or during shutdown).
    pub refused_connections: u64,
    /// Requests received.
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Bytes served by READs.
    pub bytes_read: u64,
    /// Bytes stored by WRITEs.
    pub bytes_written: u64,
}

/// The live counters behind [`ServerStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    connections: AtomicU64,
    active: AtomicU64,
    refused: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

impl Counters {
    pub(crate) fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn read(&self, n: u64) {
        self.bytes_read.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn written(&self, n: u64) {
        self.bytes_written.fetch_add(n, Ordering::Relaxed);
    }
    /// The counters now.
    pub(crate) fn snapshot(&self) -> ServerStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServerStats {
            connections: get(&self.connections),
            active_connections: get(&self.active),
            refused_connections: get(&self.refused),
            requests: get(&self.requests),
            errors: get(&self.errors),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
        }
    }
}

/// Counts a connection as active while it lives (also when its task is aborted).
struct Active<'a>(&'a Counters);

impl<'a> Active<'a> {
    fn enter(counters: &'a Counters) -> Active<'a> {
        counters.active.fetch_add(1, Ordering::Relaxed);
        Active(counters)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An NBD server for a set of exports. Serve it with [`Server::bind`], stop it with
/// [`Server::shutdown`].
#[derive(Debug)]
pub struct Server {
    exports: Vec<Arc<Export>>,
    config: ServerConfig,
    counters: Arc<Counters>,
    /// Permits for connections being served.
    slots: Arc<Semaphore>,
    /// Permits for connections being turned away politely (beyond these: closed at once).
    refusals: Arc<Semaphore>,
    shutdown: watch::Sender<bool>,
    listeners: Mutex<Vec<JoinHandle<()>>>,
    /// Clients turned away by TLS, for whoever listens.
    refused: broadcast::Sender<Refused>,
}

/// How many refusals wait for a slow reader of [`Server::refusals`] before the oldest are
/// dropped (it is told how many).
const REFUSALS_QUEUED: usize = 64;

/// A bound listener: the address it listens on (with the port a `tcp:HOST:0` got).
#[derive(Debug, Clone)]
pub struct Listener {
    addr: ListenAddr,
}

impl Listener {
    /// Where it listens.
    pub fn addr(&self) -> &ListenAddr {
        &self.addr
    }
}

/// A socket accepted by a listener.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// Either kind of listening socket.
enum Socket {
    Unix {
        listener: UnixListener,
        /// Removed when the listener is dropped.
        _file: UnixSocketFile,
    },
    Tcp(TcpListener),
}

/// The socket file a unix listener created, removed when the listener stops if it is still
/// the same file.
struct UnixSocketFile {
    path: PathBuf,
    identity: (u64, u64),
}

impl Drop for UnixSocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.identity {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl Socket {
    /// The next connection, and who made it (for the log).
    async fn accept(&self) -> std::io::Result<(Box<dyn StreamBox>, String)> {
        match self {
            Socket::Unix { listener, .. } => {
                let (s, _) = listener.accept().await?;
                let peer = match s.peer_cred() {
                    Ok(c) => match c.pid() {
                        Some(pid) => format!("unix socket (pid {pid}, uid {})", c.uid()),
                        None => format!("unix socket (uid {})", c.uid()),
                    },
                    Err(_) => "unix socket".to_string(),
                };
                Ok((Box::new(s), peer))
            }
            Socket::Tcp(l) => {
                let (s, addr) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Box::new(s), format!("tcp:{addr}")))
            }
        }
    }
}

/// A boxed accepted socket.
pub(crate) trait StreamBox: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: Stream> StreamBox for T {}

/// Removes a stale socket file at `path` (nothing accepts on it), refusing a live one or a
/// file that is not a socket.
fn clear_stale_socket(path: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(Error::NotASocket(path.to_path_buf()));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(Error::SocketInUse(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .map_err(|source| Error::Bind {
                addr: format!("unix:{}", path.display()),
                source,
            }),
        Err(source) => Err(Error::Bind {
            addr: format!("unix:{}", path.display()),
            source,
        }),
    }
}

impl Server {
    /// A server for `exports` (names should be distinct: the first of a name is served).
    pub fn new(exports: Vec<Export>, config: ServerConfig) -> Arc<Server> {
        Arc::new(Server {
            exports: exports.into_iter().map(Arc::new).collect(),
            slots: Arc::new(Semaphore::new(config.max_connections)),
            refusals: Arc::new(Semaphore::new(8)),
            config,
            counters: Arc::default(),
            shutdown: watch::channel(false).0,
            listeners: Mutex::new(Vec::new()),
            refused: broadcast::channel(REFUSALS_QUEUED).0,
        })
    }

    /// The clients a TLS-only server turns away from now on, one [`Refused`] per connection:
    /// a plain-text client (an option or EXPORT_NAME before STARTTLS) or a failed TLS
    /// handshake (no client certificate, an unknown CA, an expired certificate). A reader that
    /// falls more than 64 behind is told how many it missed (`RecvError::Lagged`).
    pub fn refusals(&self) -> broadcast::Receiver<Refused> {
        self.refused.subscribe()
    }

    /// Listens on `addr` and accepts connections on the current tokio runtime. The socket
    /// is bound and accepting when this returns (a pid file may follow). A unix socket file
    /// left by a dead server is replaced; one a live server accepts on is refused.
    pub async fn bind(self: &Arc<Self>, addr: &ListenAddr) -> Result<Listener> {
        if *self.shutdown.borrow() {
            return Err(Error::ShutDown);
        }
        let bind_err = |source| Error::Bind {
            addr: addr.to_string(),
            source,
        };
        let (socket, bound) = match addr {
            ListenAddr::Unix(path) => {
                clear_stale_socket(path)?;
                let l = UnixListener::bind(path).map_err(bind_err)?;
                let m = std::fs::symlink_metadata(path).map_err(bind_err)?;
                let file = UnixSocketFile {
                    path: path.clone(),
                    identity: (m.dev(), m.ino()),
                };
                let socket = Socket::Unix {
                    listener: l,
                    _file: file,
                };
                (socket, addr.clone())
            }
            ListenAddr::Tcp(a) => {
                let l = TcpListener::bind(a).await.map_err(bind_err)?;
                let local = l.local_addr().map_err(bind_err)?;
                (Socket::Tcp(l), ListenAddr::Tcp(local))
            }
        };
        let task = tokio::spawn(Arc::clone(self).accept_loop(socket));
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
        Ok(Listener { addr: bound })
    }

    /// What the server has done so far.
    pub fn stats(&self) -> ServerStats {
        self.counters.snapshot()
    }

    /// Stops accepting (unix socket files are removed), lets every connection finish the
    /// requests it has in flight (up to [`ServerConfig::shutdown_grace`], then drops it) and
    /// flushes every writable export. Idempotent.
    pub async fn shutdown(&self) -> Result<()> {
        self.shutdown.send_replace(true);
        let tasks: Vec<_> =
            std::mem::take(&mut *self.listeners.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
        for e in &self.exports {
            if !e.is_read_only() {
                e.device.flush().await.map_err(|source| Error::Flush {
                    name: e.name.clone(),
                    source,
                })?;
            }
        }
        Ok(())
    }

    async fn accept_loop(self: Arc<Self>, socket: Socket) {
        let mut connections = JoinSet::new();
        let mut stop = self.shutdown.subscribe();
        loop {
            let accepted = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                a = socket.accept() => a,
            };
            while connections.try_join_next().is_some() {}
            let (stream, peer) = match accepted {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors or the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match Arc::clone(&self.slots).try_acquire_owned() {
                Ok(slot) => {
                    connections.spawn(Arc::clone(&self).connection(stream, peer, slot));
                }
                Err(_) => self.refuse(stream, peer, &mut connections),
            }
        }
        drop(socket); // Stop accepting, remove the socket file.
        let grace = self.config.shutdown_grace;
        let drained = tokio::time::timeout(grace, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            connections.abort_all();
            while connections.join_next().await.is_some() {}
        }
    }

    /// Turns a connection away: the handshake runs (LIST and ABORT work) but GO and INFO get
    /// an error; beyond a few such at once, the socket is just closed.
    fn refuse(self: &Arc<Self>, stream: Box<dyn StreamBox>, peer: String, set: &mut JoinSet<()>) {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = Arc::clone(&self.refusals).try_acquire_owned() else {
            return;
        };
        let server = Arc::clone(self);
        set.spawn(async move {
            let _permit = permit;
            let full = || Some((REP_ERR_POLICY, "too many connections"));
            let offer = server.offer(&full);
            let mut haggling = Haggling::new(offer.max_options);
            let ended = server.handshake(stream, &offer, &mut haggling).await;
            server.report_refusal(&peer, &haggling, ended.as_ref().err());
        });
    }

    fn offer<'a>(
        &'a self,
        refusal: &'a (dyn Fn() -> Option<(u32, &'static str)> + Send + Sync),
    ) -> Offer<'a> {
        Offer {
            exports: &self.exports,
            max_options: self.config.max_options,
            max_request_bytes: self.config.max_request_bytes,
            refusal,
            tls_required: self.config.tls.is_some(),
        }
    }

    /// Serves one already connected stream as a listener would (the fuzz target's way in).
    pub(crate) async fn serve_stream(self: Arc<Self>, stream: Box<dyn StreamBox>) {
        let peer = "memory".to_string();
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(slot) => self.connection(stream, peer, slot).await,
            Err(_) => {
                let mut set = JoinSet::new();
                self.refuse(stream, peer, &mut set);
                while set.join_next().await.is_some() {}
            }
        }
    }

    /// The handshake (the TLS handshake included), under its timeout, given up when the
    /// server shuts down; the stream to serve on (the TLS stream after STARTTLS). `haggling`
    /// says how far it went, however it ended.
    async fn handshake(
        &self,
        stream: Box<dyn StreamBox>,
        offer: &Offer<'_>,
        haggling: &mut Haggling,
    ) -> std::result::Result<Option<(Negotiated, Box<dyn StreamBox>)>, Disconnect> {
        let mut stop = self.shutdown.subscribe();
        let timeout = self.config.handshake_timeout;
        tokio::select! {
            r = tokio::time::timeout(timeout, self.negotiate(stream, offer, haggling)) => {
                r.unwrap_or(Err(Disconnect::Timeout))
            }
            _ = stop.wait_for(|s| *s) => Err(Disconnect::ShuttingDown),
        }
    }

    /// Greets, haggles, and after STARTTLS runs the TLS handshake and haggles on inside TLS.
    async fn negotiate(
        &self,
        mut stream: Box<dyn StreamBox>,
        offer: &Offer<'_>,
        haggling: &mut Haggling,
    ) -> std::result::Result<Option<(Negotiated, Box<dyn StreamBox>)>, Disconnect> {
        greet(&mut stream, haggling).await?;
        loop {
            match haggle(&mut stream, offer, haggling).await? {
                Outcome::Transmission(n) => return Ok(Some((n, stream))),
                Outcome::Closed => return Ok(None),
                Outcome::StartTls => {
                    // `haggle` says StartTls only when the offer requires TLS, which it does
                    // only when credentials are configured.
                    let Some(tls) = &self.config.tls else {
                        let e = std::io::Error::other("no TLS credentials configured");
                        return Err(Disconnect::Tls(e));
                    };
                    let secured = tls.accept(stream).await.map_err(Disconnect::Tls)?;
                    stream = Box::new(secured);
                    haggling.secured = true;
                }
            }
        }
    }

    /// Reports a connection a TLS-only server turned away (to [`Server::refusals`] and the
    /// log); nothing for one that got TLS, or that left without sending an option.
    fn report_refusal(&self, peer: &str, haggling: &Haggling, ended: Option<&Disconnect>) {
        if self.config.tls.is_none() || haggling.secured {
            return;
        }
        let reason = match (ended, haggling.plain_option) {
            (Some(Disconnect::Tls(e)), _) => TlsRefusal::Handshake {
                reason: HandshakeFailure::of(e),
            },
            (_, Some(nbd_proto::OPT_EXPORT_NAME)) => TlsRefusal::PlainExportName,
            (_, Some(option)) => TlsRefusal::PlainOption { option },
            (_, None) => return,
        };
        let refused = Refused {
            peer: peer.to_string(),
            reason,
        };
        tracing::warn!("{refused}");
        let _ = self.refused.send(refused);
    }

    /// Serves one connection: the handshake, then transmission.
    async fn connection(
        self: Arc<Self>,
        stream: Box<dyn StreamBox>,
        peer: String,
        _slot: OwnedSemaphorePermit,
    ) {
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        let _active = Active::enter(&self.counters);
        let stop = self.shutdown.subscribe();
        let stopping = {
            let stop = stop.clone();
            move || (*stop.borrow()).then_some((REP_ERR_SHUTDOWN, "the server is shutting down"))
        };
        let offer = self.offer(&stopping);
        let mut haggling = Haggling::new(offer.max_options);
        let negotiated = self.handshake(stream, &offer, &mut haggling).await;
        self.report_refusal(&peer, &haggling, negotiated.as_ref().err());
        let ended = match negotiated {
            Ok(Some((n, stream))) => {
                let limits = Limits {
                    max_request_bytes: self.config.max_request_bytes,
                    max_in_flight: self.config.max_in_flight,
                    max_buffered_bytes: self.config.max_buffered_bytes,
                };
                let (reader, writer) = tokio::io::split(stream);
                serve(n, limits, Arc::clone(&self.counters), reader, writer, stop).await
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = ended {
            tracing::debug!("NBD connection ended: {e}");
        }
    }
}
