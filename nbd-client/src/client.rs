//! [`Client`]: the public handle. Validates and splits requests, spreads them over the connection
//! pool, and drives reconnection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::connection::{Body, Completion, Connection, DeathHook, Limits};
use crate::error::{Error, Refusal};
use crate::handshake::{self, ExportEntry, ExportInfo, TransmissionFlags};
use crate::protocol::*;
use crate::uri::{Address, Uri};

/// Tunables of a [`Client`]. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Limit for establishing the socket connection (default 30 s).
    pub connect_timeout: Duration,
    /// Limit for the whole handshake (default 30 s).
    pub handshake_timeout: Duration,
    /// Limit for each request; `None` waits forever (default 30 s). A request that times out
    /// fails with [`Error::Timeout`] and its connection is dropped (and reconnected, if enabled).
    pub request_timeout: Option<Duration>,
    /// How long requests wait for a reconnect after a socket error or EOF, like QEMU's
    /// `reconnect-delay`; zero disables reconnecting (default 30 s). When it passes without a
    /// working connection the client goes [`ConnectionState::Offline`]: requests fail at once
    /// while it goes on trying in the background (see [`ClientConfig::reconnect_backoff_max`]).
    /// A request that a lost connection failed waits at most this long, counted from its own
    /// first failure, whatever reconnects happen in between.
    pub reconnect_delay: Duration,
    /// How many times one request is sent again after the connection it was on was lost
    /// (default 3). A request whose every send ends in a lost connection (a server that dies on
    /// it, or keeps dying) then fails with [`Error::ResendsExhausted`] instead of looping.
    pub max_resends: u32,
    /// The longest pause between two background reconnect attempts once the reconnect window
    /// has passed (attempts start 20 ms apart and double up to this; default 8 s). Zero stops
    /// trying when the window closes: the client is then [`ConnectionState::Failed`] for good.
    pub reconnect_backoff_max: Duration,
    /// Largest READ/WRITE sent (default 256 KiB); always capped by the server's maximum and 32 MiB.
    pub max_request_bytes: u32,
    /// Connections to open when the server advertises CAN_MULTI_CONN, 1 to 4 (default 2).
    pub connections: usize,
    /// Requests in flight per connection (default 16).
    pub max_in_flight: usize,
    /// Payload bytes in flight per connection (default 64 MiB).
    pub max_bytes_in_flight: usize,
    /// Whether writes (WRITE, WRITE_ZEROES, TRIM) in flight are re-sent after a reconnect. Safe
    /// only when nothing else writes the same export (default false: they fail with
    /// [`Error::ConnectionLost`] and the caller decides).
    pub resend_writes: bool,
    /// Like QEMU's `open-timeout`: keep retrying the first connection (after socket errors,
    /// EOF or timeouts) for this long; zero means a single attempt (default zero).
    pub open_timeout: Duration,
    /// The TLS credentials directory (QEMU's `tls-creds-x509` layout) for locations that ask
    /// for TLS ([`Uri::tls`]) without naming their own (`tls-certificates=`); default none. It
    /// does not make a plain location use TLS: the location decides.
    pub tls_creds: Option<std::path::PathBuf>,
}

impl ClientConfig {
    /// Apply the options a QEMU `json:` backing string carried (`reconnect-delay`,
    /// `open-timeout`), keeping the defaults for those it did not.
    pub fn with_uri_options(mut self, uri: &Uri) -> ClientConfig {
        if let Some(d) = uri.reconnect_delay {
            self.reconnect_delay = d;
        }
        if let Some(t) = uri.open_timeout {
            self.open_timeout = t;
        }
        self
    }
}

impl Default for ClientConfig {
    fn default() -> ClientConfig {
        ClientConfig {
            connect_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(30),
            request_timeout: Some(Duration::from_secs(30)),
            reconnect_delay: Duration::from_secs(30),
            max_resends: 3,
            reconnect_backoff_max: Duration::from_secs(8),
            max_request_bytes: 256 * 1024,
            connections: 2,
            max_in_flight: 16,
            max_bytes_in_flight: 64 * 1024 * 1024,
            resend_writes: false,
            open_timeout: Duration::ZERO,
            tls_creds: None,
        }
    }
}

/// The state of the client's connection(s), for an embedder that wants to pause a guest rather
/// than feed it errors while the server is away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectionState {
    /// Requests are being served.
    Connected,
    /// The connection was lost; requests wait while the client reconnects.
    Reconnecting,
    /// The reconnect window passed without a connection: requests fail at once (with
    /// [`Error::ReconnectFailed`]) while the client goes on reconnecting in the background, with
    /// backoff; a working connection brings it back to `Connected`, as QEMU's NBD client does.
    Offline,
    /// The connection is gone for good (protocol violation, export changed, or the reconnect
    /// window closed with background reconnecting disabled); every request fails. See
    /// [`Client::failure`].
    Failed,
    /// [`Client::close`] was called.
    Closed,
}

/// Flags of [`Client::write_zeroes`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// NBD_CMD_FLAG_FAST_ZERO: fail (ENOTSUP) rather than zero slowly. Needs
    /// [`Client::can_fast_zero`].
    pub fast: bool,
    /// NBD_CMD_FLAG_NO_HOLE: allocate rather than punch a hole.
    pub no_hole: bool,
}

/// One extent of block status (`base:allocation`), clamped to the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// Start, in bytes from the start of the export.
    pub offset: u64,
    /// Length in bytes (never zero).
    pub length: u64,
    /// NBD_STATE_HOLE: unallocated.
    pub hole: bool,
    /// NBD_STATE_ZERO: reads as zeroes.
    pub zero: bool,
}

#[derive(Debug)]
struct Pool {
    generation: u64,
    conns: Vec<Arc<Connection>>,
}

#[derive(Debug)]
struct Inner {
    uri: Option<Uri>,
    config: ClientConfig,
    export: Arc<ExportInfo>,
    pool: RwLock<Pool>,
    state: watch::Sender<ConnectionState>,
    failure: Mutex<Option<Error>>,
    next: AtomicUsize,
}

/// An NBD client: one export, one or more connections, cheap to clone and share between tasks.
///
/// There is no async drop: call [`Client::close`] to drain and disconnect cleanly. Dropping the
/// last handle still sends NBD_CMD_DISC after the requests already queued.
#[derive(Debug, Clone)]
#[must_use = "call close() to disconnect cleanly"]
pub struct Client {
    inner: Arc<Inner>,
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

async fn open_stream(address: &Address, config: &ClientConfig) -> Result<Stream, Error> {
    let fut = async {
        match address {
            Address::Unix(p) => UnixStream::connect(p).await.map(Stream::Unix),
            Address::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port)).await?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        }
    };
    match tokio::time::timeout(config.connect_timeout, fut).await {
        Ok(r) => r.map_err(|e| Error::CannotConnect {
            address: match address {
                Address::Unix(p) => p.display().to_string(),
                Address::Tcp { host, port } => format!("{host}:{port}"),
            },
            source: Arc::new(e),
        }),
        Err(_) => Err(Error::Timeout {
            what: "connect",
            after: config.connect_timeout,
        }),
    }
}

async fn with_handshake_timeout<T>(
    config: &ClientConfig,
    f: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(config.handshake_timeout, f).await {
        // A socket error or EOF before the handshake completed: the connection never existed.
        Ok(Err(Error::ConnectionLost(e))) => Err(Error::HandshakeFailed(e)),
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            what: "handshake",
            after: config.handshake_timeout,
        }),
    }
}

/// The handshake, refusing an export larger than [`crate::MAX_EXPORT_SIZE`] (as QEMU does:
/// "File too large"), which no QED image could have as a backing and no request could cover.
async fn negotiate<S>(stream: &mut S, export: &str) -> Result<ExportInfo, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    check_export_size(handshake::negotiate(stream, export).await?)
}

/// Refuses an export larger than [`crate::MAX_EXPORT_SIZE`].
fn check_export_size(info: ExportInfo) -> Result<ExportInfo, Error> {
    if info.size > crate::MAX_EXPORT_SIZE {
        return Err(Error::ExportTooLarge {
            size: info.size,
            limit: crate::MAX_EXPORT_SIZE,
        });
    }
    Ok(info)
}

/// The TLS configuration for `uri` when it asks for TLS: its own `tls-certificates`, else
/// [`ClientConfig::tls_creds`], checked against the name [`Uri::tls_server_name`] gives. Loaded
/// at every (re)connection, so renewed certificates are picked up.
fn client_tls(uri: &Uri, config: &ClientConfig) -> Result<Option<nbd_tls::ClientTls>, Error> {
    let Some(tls) = &uri.tls else {
        return Ok(None);
    };
    let Some(dir) = tls.certificates.as_ref().or(config.tls_creds.as_ref()) else {
        let qemu_hint = match &tls.creds_id {
            Some(id) => format!(
                "; QEMU opens it with --object tls-creds-x509,id={id},dir=DIR,endpoint=client"
            ),
            None => String::new(),
        };
        return Err(Error::TlsCredsMissing {
            uri: uri.to_string(),
            qemu_hint,
        });
    };
    nbd_tls::ClientTls::from_dir(dir, uri.tls_server_name())
        .map(Some)
        .map_err(|e| Error::TlsCreds(Arc::new(e)))
}

/// Whether an I/O error inside TLS negotiation is the server refusing the session: a
/// certificate rustls refused or an alert (`InvalidData`), or a server that hung up or reset
/// the connection in the middle of it (GnuTLS servers do so for a missing client certificate).
/// A hang-up shows as whichever call meets it first: a read (`UnexpectedEof`, or
/// `ConnectionReset`) or a write (`BrokenPipe`: under TLS 1.3 the client's handshake ends
/// before the server checks its certificate, so the server may close before the client's
/// first NBD option is written).
fn refused_by_tls(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, InvalidData, UnexpectedEof};
    matches!(
        e.kind(),
        InvalidData | UnexpectedEof | ConnectionReset | BrokenPipe
    )
}

/// A failed TLS handshake: a refused session is [`Error::TlsHandshake`]; any other socket
/// failure under it is a lost connection (retryable).
fn tls_handshake_error(e: std::io::Error) -> Error {
    if refused_by_tls(&e) {
        Error::TlsHandshake(Arc::new(e))
    } else {
        Error::io(e)
    }
}

/// A TLS session the server ended during negotiation, with an alert or by closing without
/// `close_notify` (a client certificate missing or refused: in TLS 1.3 the client learns it
/// only then; QEMU's GnuTLS just closes), is [`Error::TlsHandshake`].
fn tls_session_error(e: Error) -> Error {
    match e {
        Error::ConnectionLost(io) if refused_by_tls(&io) => Error::TlsHandshake(io),
        other => other,
    }
}

/// STARTTLS on the plain `stream`, the TLS handshake, then `inside` on the TLS stream; the
/// whole within the handshake timeout.
async fn over_tls<S, T, F>(
    mut stream: S,
    tls: &nbd_tls::ClientTls,
    config: &ClientConfig,
    inside: F,
) -> Result<T, Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: AsyncFnOnce(tokio_rustls::client::TlsStream<S>, bool) -> Result<T, Error>,
{
    let work = async {
        let no_zeroes = handshake::start_tls(&mut stream).await?;
        let secured = tls.connect(stream).await.map_err(tls_handshake_error)?;
        inside(secured, no_zeroes).await.map_err(tls_session_error)
    };
    with_handshake_timeout(config, work).await
}

/// Negotiates `uri`'s export inside TLS on `stream` and starts the connection's tasks on the
/// TLS stream.
async fn open_tls_connection<S>(
    stream: S,
    tls: &nbd_tls::ClientTls,
    uri: &Uri,
    config: &ClientConfig,
    hook: DeathHook,
) -> Result<Connection, Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let export = uri.export.as_str();
    let (secured, info) = over_tls(stream, tls, config, async |mut t, no_zeroes| {
        let info = handshake::negotiate_after_greeting(&mut t, export, no_zeroes).await?;
        Ok((t, check_export_size(info)?))
    })
    .await?;
    let (r, w) = tokio::io::split(secured);
    Ok(Connection::start(
        r,
        w,
        Arc::new(info),
        limits(config),
        hook,
    ))
}

fn limits(config: &ClientConfig) -> Limits {
    Limits {
        max_in_flight: config.max_in_flight.max(1),
        max_bytes_in_flight: config.max_bytes_in_flight,
        request_timeout: config.request_timeout,
    }
}

/// Connect and negotiate one connection to `uri`.
async fn open_connection(
    uri: &Uri,
    config: &ClientConfig,
    hook: DeathHook,
) -> Result<Connection, Error> {
    let tls = client_tls(uri, config)?;
    let stream = open_stream(&uri.address, config).await?;
    if let Some(tls) = tls {
        return match stream {
            Stream::Unix(s) => open_tls_connection(s, &tls, uri, config, hook).await,
            Stream::Tcp(s) => open_tls_connection(s, &tls, uri, config, hook).await,
        };
    }
    // The two arms differ only in type: each splits into owned halves (`into_split`), which,
    // unlike `tokio::io::split`, need no lock between the reader and writer tasks.
    match stream {
        Stream::Unix(mut s) => {
            let export = with_handshake_timeout(config, negotiate(&mut s, &uri.export)).await?;
            let (r, w) = s.into_split();
            Ok(Connection::start(
                r,
                w,
                Arc::new(export),
                limits(config),
                hook,
            ))
        }
        Stream::Tcp(mut s) => {
            let export = with_handshake_timeout(config, negotiate(&mut s, &uri.export)).await?;
            let (r, w) = s.into_split();
            Ok(Connection::start(
                r,
                w,
                Arc::new(export),
                limits(config),
                hook,
            ))
        }
    }
}

/// Open the whole pool: one connection, plus more when the server allows multi-conn.
async fn open_pool(
    uri: &Uri,
    config: &ClientConfig,
    hook: DeathHook,
) -> Result<Vec<Arc<Connection>>, Error> {
    let first = Arc::new(open_connection(uri, config, hook.clone()).await?);
    let mut conns = vec![first.clone()];
    let wanted = config.connections.clamp(1, 4);
    if wanted > 1 && first.export().flags.multi_conn() {
        let mut set = JoinSet::new();
        for _ in 1..wanted {
            let (uri, config, hook) = (uri.clone(), config.clone(), hook.clone());
            set.spawn(async move { open_connection(&uri, &config, hook).await });
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(c)) if same_export(first.export(), c.export()).is_ok() => {
                    conns.push(Arc::new(c))
                }
                Ok(Ok(c)) => c.close().await,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "extra multi-conn connection failed; continuing with fewer")
                }
                Err(e) => tracing::debug!(error = %e, "extra connection task failed"),
            }
        }
    }
    Ok(conns)
}

/// After a reconnect the export must be the one we had.
fn same_export(a: &ExportInfo, b: &ExportInfo) -> Result<(), Error> {
    if a.size != b.size {
        return Err(Error::ExportChanged(format!(
            "size {} became {}",
            a.size, b.size
        )));
    }
    if a.flags != b.flags {
        return Err(Error::ExportChanged(format!(
            "flags {:#x} became {:#x}",
            a.flags.0, b.flags.0
        )));
    }
    if a.mode != b.mode || a.base_allocation.is_some() != b.base_allocation.is_some() {
        return Err(Error::ExportChanged(
            "negotiated reply mode or meta contexts differ".into(),
        ));
    }
    if a.block_size != b.block_size {
        return Err(Error::ExportChanged("block size constraints differ".into()));
    }
    Ok(())
}

fn death_hook(weak: Weak<Inner>, generation: u64) -> DeathHook {
    Arc::new(move |err: &Error| {
        if let Some(inner) = weak.upgrade() {
            Inner::on_death(&inner, generation, err);
        }
    })
}

/// A hook for connections opened before the client exists; replaced logic: the client checks
/// the pool itself in that window.
fn pending_hook(slot: Arc<Mutex<Option<Weak<Inner>>>>, generation: u64) -> DeathHook {
    Arc::new(move |err: &Error| {
        let weak = slot.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(inner) = weak.and_then(|w| w.upgrade()) {
            Inner::on_death(&inner, generation, err);
        }
    })
}

impl Inner {
    fn set_failed(&self, err: Error) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        // The first reason stands; an Offline client's "unreachable" gives way to the reason
        // it stopped trying.
        if f.is_none() || *self.state.borrow() == ConnectionState::Offline {
            *f = Some(err);
        }
        drop(f);
        self.state.send_if_modified(|s| {
            if *s == ConnectionState::Closed || *s == ConnectionState::Failed {
                false
            } else {
                *s = ConnectionState::Failed;
                true
            }
        });
    }

    /// The window passed: requests fail with `err` at once while reconnecting goes on.
    fn set_offline(&self, err: Error) {
        tracing::warn!(error = %err, "NBD server still unreachable; failing requests while retrying in the background");
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(err);
        self.state.send_if_modified(|s| {
            if *s == ConnectionState::Reconnecting {
                *s = ConnectionState::Offline;
                true
            } else {
                false
            }
        });
    }

    fn on_death(this: &Arc<Inner>, generation: u64, err: &Error) {
        if matches!(err, Error::Closed) {
            return;
        }
        let current = this
            .pool
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .generation;
        if current != generation || *this.state.borrow() != ConnectionState::Connected {
            return;
        }
        let can_reconnect =
            this.uri.is_some() && !this.config.reconnect_delay.is_zero() && err.is_retryable();
        if !can_reconnect {
            this.set_failed(err.clone());
            let conns =
                std::mem::take(&mut this.pool.write().unwrap_or_else(|p| p.into_inner()).conns);
            for c in conns {
                c.kill(err.clone());
            }
            return;
        }
        let changed = this.state.send_if_modified(|s| {
            if *s == ConnectionState::Connected {
                *s = ConnectionState::Reconnecting;
                true
            } else {
                false
            }
        });
        if changed {
            tracing::warn!(error = %err, "NBD connection lost; reconnecting");
            tokio::spawn(Inner::reconnect(this.clone(), err.clone()));
        }
    }

    /// Reconnects after `first` killed the pool: within the window, attempts 20 ms apart and
    /// doubling up to 500 ms while requests wait; after it, [`ConnectionState::Offline`] and
    /// attempts doubling up to [`ClientConfig::reconnect_backoff_max`] until one works, the
    /// client is closed, or the last handle is dropped (the task holds the client only weakly
    /// between attempts).
    async fn reconnect(this: Arc<Inner>, first: Error) {
        let Some(uri) = this.uri.clone() else { return };
        let window = this.config.reconnect_delay;
        let deadline = tokio::time::Instant::now() + window;
        let (generation, old) = {
            let mut pool = this.pool.write().unwrap_or_else(|p| p.into_inner());
            pool.generation += 1;
            (pool.generation, std::mem::take(&mut pool.conns))
        };
        // Outside the lock: killing runs the death hook, which reads the pool.
        for c in old {
            c.kill(first.clone());
        }
        let weak = Arc::downgrade(&this);
        drop(this);
        let mut last = first;
        let mut backoff = Duration::from_millis(20);
        loop {
            let Some(this) = weak.upgrade() else { return };
            if *this.state.borrow() == ConnectionState::Closed {
                return;
            }
            let now = tokio::time::Instant::now();
            let in_window = now < deadline;
            if !in_window && *this.state.borrow() == ConnectionState::Reconnecting {
                let err = Error::ReconnectFailed {
                    window,
                    last: Box::new(last.clone()),
                };
                if this.config.reconnect_backoff_max.is_zero() {
                    this.set_failed(err);
                    return;
                }
                this.set_offline(err);
            }
            let hook = death_hook(weak.clone(), generation);
            let attempt = open_pool(&uri, &this.config, hook);
            let outcome = if in_window {
                tokio::time::timeout(deadline - now, attempt).await.ok()
            } else {
                Some(attempt.await)
            };
            match outcome {
                Some(Ok(conns)) => {
                    Inner::install(&this, conns).await;
                    return;
                }
                Some(Err(e)) if e.is_retryable() || matches!(e, Error::OptionRefused { .. }) => {
                    last = e
                }
                Some(Err(e)) => {
                    this.set_failed(e);
                    return;
                }
                None => {}
            }
            let pause = if in_window {
                let pause = backoff.min(deadline.saturating_duration_since(now));
                backoff = (backoff * 2).min(Duration::from_millis(500));
                pause
            } else {
                let pause = backoff.min(this.config.reconnect_backoff_max);
                backoff = (backoff * 2).min(this.config.reconnect_backoff_max);
                pause
            };
            drop(this);
            tokio::time::sleep(pause).await;
        }
    }

    /// Puts a reopened pool in place (unless the client was closed meanwhile, or the export
    /// changed, which fails the client for good) and marks it connected.
    async fn install(this: &Arc<Inner>, conns: Vec<Arc<Connection>>) {
        if *this.state.borrow() == ConnectionState::Closed {
            for c in conns {
                c.close().await;
            }
            return;
        }
        if let Err(e) = same_export(&this.export, conns[0].export()) {
            for c in conns {
                c.close().await;
            }
            this.set_failed(e);
            return;
        }
        this.pool.write().unwrap_or_else(|p| p.into_inner()).conns = conns;
        let back = this.state.send_if_modified(|s| {
            if matches!(s, ConnectionState::Reconnecting | ConnectionState::Offline) {
                *this.failure.lock().unwrap_or_else(|p| p.into_inner()) = None;
                *s = ConnectionState::Connected;
                true
            } else {
                false
            }
        });
        if back {
            tracing::info!("NBD connection re-established");
        }
    }
}

fn resendable(command: Command, config: &ClientConfig) -> bool {
    match command {
        Command::Read | Command::BlockStatus | Command::Cache => true,
        Command::Write | Command::WriteZeroes | Command::Trim => config.resend_writes,
        // A FLUSH cannot vouch for writes acknowledged on a connection that is gone.
        Command::Flush | Command::Disconnect => false,
    }
}

impl Client {
    /// Connect to the export `uri` names and negotiate (see the crate documentation for what).
    pub async fn connect(uri: &Uri, config: ClientConfig) -> Result<Client, Error> {
        let slot = Arc::new(Mutex::new(None));
        let deadline = tokio::time::Instant::now() + config.open_timeout;
        let mut backoff = Duration::from_millis(50);
        let conns = loop {
            match open_pool(uri, &config, pending_hook(slot.clone(), 0)).await {
                Ok(c) => break c,
                Err(e) if e.is_retryable() && tokio::time::Instant::now() + backoff < deadline => {
                    tracing::debug!(error = %e, "NBD connect failed; retrying within open_timeout");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        };
        let export = Arc::new(conns[0].export().clone());
        Ok(Client::assemble(
            Some(uri.clone()),
            config,
            export,
            conns,
            &slot,
        ))
    }

    /// Builds the client around freshly opened connections and arms their death hooks (the
    /// `slot` the connections' pending hooks look in).
    fn assemble(
        uri: Option<Uri>,
        config: ClientConfig,
        export: Arc<ExportInfo>,
        conns: Vec<Arc<Connection>>,
        slot: &Mutex<Option<Weak<Inner>>>,
    ) -> Client {
        let inner = Arc::new(Inner {
            uri,
            config,
            export,
            pool: RwLock::new(Pool {
                generation: 0,
                conns,
            }),
            state: watch::channel(ConnectionState::Connected).0,
            failure: Mutex::new(None),
            next: AtomicUsize::new(0),
        });
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::downgrade(&inner));
        // A connection that died before the hook was armed.
        let dead = inner
            .pool
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .conns
            .iter()
            .any(|c| c.is_dead());
        if dead {
            Inner::on_death(&inner, 0, &Error::eof());
        }
        Client { inner }
    }

    /// Parse `uri` and connect.
    pub async fn connect_str(uri: &str, config: ClientConfig) -> Result<Client, Error> {
        Client::connect(&Uri::parse(uri)?, config).await
    }

    /// Negotiate over an already connected stream (a single connection; no reconnect, since the
    /// client cannot reopen it). Used by tests and the fuzz target, or for custom transports.
    pub async fn from_stream<S>(
        mut stream: S,
        export: &str,
        config: ClientConfig,
    ) -> Result<Client, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let info = with_handshake_timeout(&config, negotiate(&mut stream, export)).await?;
        let (r, w) = tokio::io::split(stream);
        let slot = Arc::new(Mutex::new(None));
        let info = Arc::new(info);
        let conn = Connection::start(
            r,
            w,
            info.clone(),
            limits(&config),
            pending_hook(slot.clone(), 0),
        );
        Ok(Client::assemble(
            None,
            config,
            info,
            vec![Arc::new(conn)],
            &slot,
        ))
    }

    /// What the handshake established.
    pub fn export(&self) -> &ExportInfo {
        &self.inner.export
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.export.size
    }

    /// Transmission flags.
    pub fn flags(&self) -> TransmissionFlags {
        self.inner.export.flags
    }

    /// Whether the export is writable.
    pub fn can_write(&self) -> bool {
        !self.flags().read_only()
    }

    /// Whether writes may carry FUA (and the export is writable).
    pub fn can_fua(&self) -> bool {
        self.flags().fua() && self.can_write()
    }

    /// Whether FLUSH is supported.
    pub fn can_flush(&self) -> bool {
        self.flags().flush()
    }

    /// Whether TRIM is supported (and the export writable).
    pub fn can_trim(&self) -> bool {
        self.flags().trim() && self.can_write()
    }

    /// Whether WRITE_ZEROES is supported (and the export writable).
    pub fn can_zero(&self) -> bool {
        self.flags().write_zeroes() && self.can_write()
    }

    /// Whether WRITE_ZEROES accepts FAST_ZERO.
    pub fn can_fast_zero(&self) -> bool {
        self.can_zero() && self.flags().fast_zero()
    }

    /// Whether CACHE is supported.
    pub fn can_cache(&self) -> bool {
        self.flags().cache()
    }

    /// Whether the server allows several connections to one export.
    pub fn can_multi_conn(&self) -> bool {
        self.flags().multi_conn()
    }

    /// Whether `base:allocation` block status was negotiated.
    pub fn has_block_status(&self) -> bool {
        self.inner.export.base_allocation.is_some() && self.inner.export.mode.structured()
    }

    /// Number of connections currently in the pool.
    pub fn connection_count(&self) -> usize {
        self.inner
            .pool
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .conns
            .len()
    }

    /// The largest READ/WRITE this client sends.
    pub fn max_request_bytes(&self) -> u32 {
        let e = &self.inner.export;
        let min = e.block_size.minimum.max(1);
        let m = self
            .inner
            .config
            .max_request_bytes
            .min(e.block_size.maximum)
            .min(MAX_REQUEST_PAYLOAD);
        (m / min * min).max(min)
    }

    /// The current connection state.
    pub fn state(&self) -> ConnectionState {
        *self.inner.state.borrow()
    }

    /// Subscribe to state changes.
    pub fn subscribe_state(&self) -> watch::Receiver<ConnectionState> {
        self.inner.state.subscribe()
    }

    /// Why the client is [`ConnectionState::Failed`], if it is.
    pub fn failure(&self) -> Option<Error> {
        self.inner
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A live connection, waiting while reconnecting, but not past `deadline` (the end of
    /// the reconnect window of a request that already failed once): `None` when it passed.
    async fn connection(
        &self,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Option<Arc<Connection>>, Error> {
        let mut rx = self.inner.state.subscribe();
        loop {
            let state = *rx.borrow_and_update();
            match state {
                ConnectionState::Connected => {
                    {
                        let pool = self.inner.pool.read().unwrap_or_else(|p| p.into_inner());
                        let n = pool.conns.len();
                        if n > 0 {
                            let start = self.inner.next.fetch_add(1, Ordering::Relaxed);
                            for i in 0..n {
                                let c = &pool.conns[(start + i) % n];
                                if !c.is_dead() {
                                    return Ok(Some(c.clone()));
                                }
                            }
                        }
                    }
                    // Dead but not yet noticed by the state machine: wait a moment.
                    let _ = tokio::time::timeout(Duration::from_millis(5), rx.changed()).await;
                }
                ConnectionState::Reconnecting => {
                    let changed = match deadline {
                        Some(d) => match tokio::time::timeout_at(d, rx.changed()).await {
                            Ok(r) => r,
                            Err(_) => return Ok(None),
                        },
                        None => rx.changed().await,
                    };
                    if changed.is_err() {
                        return Err(Error::Closed);
                    }
                }
                ConnectionState::Offline | ConnectionState::Failed => {
                    return Err(self.failure().unwrap_or(Error::Closed))
                }
                ConnectionState::Closed => return Err(Error::Closed),
            }
        }
    }

    /// Send one (validated, fitting) request, re-sending it after a reconnect when that is
    /// safe, at most [`ClientConfig::max_resends`] times and within
    /// [`ClientConfig::reconnect_delay`] of its first failure.
    async fn request(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u64,
        mut body: Option<Body>,
    ) -> Result<Completion, Error> {
        let config = &self.inner.config;
        let may_resend = resendable(command, config)
            && self.inner.uri.is_some()
            && !config.reconnect_delay.is_zero();
        let mut resends = 0u32;
        let mut deadline = None;
        let mut lost = None;
        loop {
            let Some(conn) = self.connection(deadline).await? else {
                return Err(Error::ReconnectFailed {
                    window: config.reconnect_delay,
                    last: Box::new(lost.map_or_else(Error::eof, Error::ConnectionLost)),
                });
            };
            let b = match body.take() {
                Some(b) => b,
                None => match command {
                    Command::Read => Body::Read(vec![0u8; length as usize]),
                    Command::BlockStatus => Body::BlockStatus,
                    _ => Body::Empty,
                },
            };
            // Keep a copy of a write payload only if we may have to send it again.
            let retry_payload = match (&b, may_resend) {
                (Body::Write(p), true) => Some(p.clone()),
                _ => None,
            };
            match conn.submit(command, flags, offset, length, b).await {
                Err(Error::ConnectionLost(e)) if may_resend => {
                    if resends == config.max_resends {
                        tracing::warn!(%command, offset, length, sends = resends + 1, error = %e,
                            "giving up on a request whose every send lost the connection");
                        return Err(Error::ResendsExhausted {
                            command,
                            offset,
                            length,
                            sends: resends + 1,
                            last: e,
                        });
                    }
                    resends += 1;
                    let now = tokio::time::Instant::now();
                    let until = *deadline.get_or_insert(now + config.reconnect_delay);
                    if now >= until {
                        return Err(Error::ReconnectFailed {
                            window: config.reconnect_delay,
                            last: Box::new(Error::ConnectionLost(e)),
                        });
                    }
                    tracing::debug!(%command, offset, length, error = %e, "re-sending after reconnect");
                    lost = Some(e);
                    body = retry_payload.map(Body::Write);
                    // Let the state machine notice; `connection()` waits while reconnecting.
                    tokio::task::yield_now().await;
                }
                r => return r,
            }
        }
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<(), Error> {
        if length == 0 {
            return Err(Refusal::ZeroLength.into());
        }
        let size = self.size();
        if offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(Refusal::OutOfBounds {
                offset,
                length,
                size,
            }
            .into());
        }
        let align = self.inner.export.block_size.minimum.max(1);
        if offset % u64::from(align) != 0 || length % u64::from(align) != 0 {
            // The last block of an export whose size is not a multiple may be short.
            if !(offset % u64::from(align) == 0 && offset + length == size) {
                return Err(Refusal::Misaligned {
                    offset,
                    length,
                    alignment: align,
                }
                .into());
            }
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<(), Error> {
        if self.can_write() {
            Ok(())
        } else {
            Err(Refusal::ReadOnly.into())
        }
    }

    /// Pieces of at most `piece` bytes covering `[offset, offset+length)`.
    fn pieces(offset: u64, length: u64, piece: u64) -> impl Iterator<Item = (u64, u64)> {
        let end = offset + length;
        (0..length.div_ceil(piece)).map(move |i| {
            let o = offset + i * piece;
            (o, piece.min(end - o))
        })
    }

    /// Read `length` bytes at `offset`. Reads larger than [`Client::max_request_bytes`] are split
    /// and the pieces issued concurrently.
    pub async fn read(&self, offset: u64, length: u64) -> Result<Vec<u8>, Error> {
        self.check_range(offset, length)?;
        let piece = u64::from(self.max_request_bytes());
        if length <= piece {
            return match self.request(Command::Read, 0, offset, length, None).await? {
                Completion::Read(b) => Ok(b),
                _ => Err(Error::Closed),
            };
        }
        let len = usize::try_from(length).map_err(|_| Refusal::OutOfBounds {
            offset,
            length,
            size: self.size(),
        })?;
        let mut out = vec![0u8; len];
        let mut set = JoinSet::new();
        for (o, l) in Client::pieces(offset, length, piece) {
            let c = self.clone();
            set.spawn(async move { (o, c.request(Command::Read, 0, o, l, None).await) });
        }
        while let Some(j) = set.join_next().await {
            let (o, r) = j.map_err(|e| Error::io(std::io::Error::other(e)))?;
            if let Completion::Read(b) = r? {
                let at = (o - offset) as usize;
                out[at..at + b.len()].copy_from_slice(&b);
            }
        }
        Ok(out)
    }

    /// Read into `buf` (which must be at most [`Client::max_request_bytes`] long), reusing its
    /// allocation: the buffer is owned by the request until the reply is complete, so dropping
    /// this future is safe. Returns the filled buffer.
    pub async fn read_buf(&self, offset: u64, buf: Vec<u8>) -> Result<Vec<u8>, Error> {
        let length = buf.len() as u64;
        self.check_range(offset, length)?;
        if length > u64::from(self.max_request_bytes()) {
            let mut buf = buf;
            let data = self.read(offset, length).await?;
            buf.copy_from_slice(&data);
            return Ok(buf);
        }
        match self
            .request(Command::Read, 0, offset, length, Some(Body::Read(buf)))
            .await?
        {
            Completion::Read(b) => Ok(b),
            _ => Err(Error::Closed),
        }
    }

    /// Read into a borrowed slice (pieces are read concurrently, then copied).
    pub async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let data = self.read(offset, buf.len() as u64).await?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// Write `data` at `offset` (split into pieces issued concurrently).
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.write_flags(offset, data, 0).await
    }

    /// Write `data` at `offset` with force unit access: durable on the server when it
    /// completes. Needs [`Client::can_fua`]; without it, the write is followed by a FLUSH.
    pub async fn write_fua(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        if self.can_fua() {
            return self
                .write_flags(offset, data, crate::protocol::CMD_FLAG_FUA)
                .await;
        }
        self.write_flags(offset, data, 0).await?;
        if self.can_flush() {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_flags(&self, offset: u64, data: &[u8], flags: u16) -> Result<(), Error> {
        self.check_writable()?;
        let length = data.len() as u64;
        self.check_range(offset, length)?;
        let piece = u64::from(self.max_request_bytes());
        if length <= piece {
            return self
                .request(
                    Command::Write,
                    flags,
                    offset,
                    length,
                    Some(Body::Write(data.to_vec())),
                )
                .await
                .map(drop);
        }
        let mut set = JoinSet::new();
        for (o, l) in Client::pieces(offset, length, piece) {
            let at = (o - offset) as usize;
            let payload = data[at..at + l as usize].to_vec();
            let c = self.clone();
            set.spawn(async move {
                c.request(Command::Write, flags, o, l, Some(Body::Write(payload)))
                    .await
            });
        }
        join_all(set).await
    }

    /// The largest effect length for TRIM / WRITE_ZEROES / BLOCK_STATUS in one request.
    fn max_effect_length(&self) -> u64 {
        let align = u64::from(self.inner.export.block_size.minimum.max(1));
        let cap: u64 = 1 << 30;
        (cap / align * align).max(align)
    }

    /// The largest BLOCK_STATUS length asked for in one request: as much as the header format
    /// can carry (32 bits in compact mode, 64 with extended headers), so a sparse export is
    /// walked in few requests. The server may answer for less.
    ///
    /// The length stays a multiple of 1 MiB so that the next request starts aligned too
    /// (nbdkit 1.32 asserts on answers for an unaligned offset near 4 GiB).
    fn max_status_length(&self) -> u64 {
        let align = u64::from(self.inner.export.block_size.minimum.max(1)).max(1 << 20);
        let cap = match self.inner.export.mode {
            HeaderMode::Extended => crate::MAX_EXPORT_SIZE,
            _ => u64::from(u32::MAX),
        };
        (cap / align * align).max(align)
    }

    async fn effect_command(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u64,
    ) -> Result<(), Error> {
        self.check_range(offset, length)?;
        let piece = if command == Command::Cache {
            u64::from(self.max_request_bytes())
        } else {
            self.max_effect_length()
        };
        if length <= piece {
            return self
                .request(command, flags, offset, length, None)
                .await
                .map(drop);
        }
        let mut set = JoinSet::new();
        for (o, l) in Client::pieces(offset, length, piece) {
            let c = self.clone();
            set.spawn(async move { c.request(command, flags, o, l, None).await });
        }
        join_all(set).await
    }

    /// Write zeroes (NBD_CMD_WRITE_ZEROES).
    pub async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        flags: ZeroFlags,
    ) -> Result<(), Error> {
        self.check_writable()?;
        if !self.flags().write_zeroes() {
            return Err(Refusal::Unsupported("WRITE_ZEROES").into());
        }
        if flags.fast && !self.flags().fast_zero() {
            return Err(Refusal::Unsupported("FAST_ZERO").into());
        }
        let f = if flags.fast { CMD_FLAG_FAST_ZERO } else { 0 }
            | if flags.no_hole { CMD_FLAG_NO_HOLE } else { 0 };
        self.effect_command(Command::WriteZeroes, f, offset, length)
            .await
    }

    /// Discard (NBD_CMD_TRIM).
    pub async fn trim(&self, offset: u64, length: u64) -> Result<(), Error> {
        self.check_writable()?;
        if !self.flags().trim() {
            return Err(Refusal::Unsupported("TRIM").into());
        }
        self.effect_command(Command::Trim, 0, offset, length).await
    }

    /// Ask the server to prefetch (NBD_CMD_CACHE).
    pub async fn cache(&self, offset: u64, length: u64) -> Result<(), Error> {
        if !self.can_cache() {
            return Err(Refusal::Unsupported("CACHE").into());
        }
        self.effect_command(Command::Cache, 0, offset, length).await
    }

    /// Flush (NBD_CMD_FLUSH). With several connections, flushes each (CAN_MULTI_CONN makes one
    /// enough, but writes may still be in flight on the others).
    pub async fn flush(&self) -> Result<(), Error> {
        if !self.can_flush() {
            return Err(Refusal::Unsupported("FLUSH").into());
        }
        self.check_writable()?;
        match self.request(Command::Flush, 0, 0, 0, None).await? {
            Completion::Done => Ok(()),
            _ => Err(Error::Closed),
        }
    }

    /// Block status (`base:allocation`) for `[offset, offset+length)`, in one request of up to
    /// 1 GiB (larger windows are clamped). The extents are clamped to the request and the export,
    /// adjacent equal ones merged; they cover exactly the asked range or a prefix of it.
    pub async fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>, Error> {
        if !self.has_block_status() {
            return Err(Refusal::Unsupported("BLOCK_STATUS (no base:allocation context)").into());
        }
        if length == 0 {
            return Err(Refusal::ZeroLength.into());
        }
        let size = self.size();
        if offset >= size {
            return Err(Refusal::OutOfBounds {
                offset,
                length,
                size,
            }
            .into());
        }
        let length = length.min(size - offset).min(self.max_status_length());
        self.check_range(offset, length)?;
        let raw = match self
            .request(Command::BlockStatus, 0, offset, length, None)
            .await?
        {
            Completion::BlockStatus(e) => e,
            _ => return Err(Error::Closed),
        };
        Ok(clamp_extents(offset, length, &raw))
    }

    /// Drain requests in flight, send NBD_CMD_DISC on every connection and close them.
    pub async fn close(&self) {
        let conns = {
            let mut pool = self.inner.pool.write().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut pool.conns)
        };
        self.inner.state.send_replace(ConnectionState::Closed);
        for c in conns {
            c.close().await;
        }
    }
}

async fn join_all(mut set: JoinSet<Result<Completion, Error>>) -> Result<(), Error> {
    let mut first = None;
    while let Some(j) = set.join_next().await {
        let r = j.map_err(|e| Error::io(std::io::Error::other(e)))?;
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// Turn raw extents into clamped, merged [`Extent`]s covering a prefix of the request.
pub(crate) fn clamp_extents(offset: u64, length: u64, raw: &[RawExtent]) -> Vec<Extent> {
    let end = offset + length;
    let mut out: Vec<Extent> = Vec::new();
    let mut at = offset;
    for e in raw {
        if at >= end {
            break;
        }
        let l = e.length.min(end - at);
        let hole = e.flags & u64::from(STATE_HOLE) != 0;
        let zero = e.flags & u64::from(STATE_ZERO) != 0;
        match out.last_mut() {
            Some(last) if last.hole == hole && last.zero == zero => last.length += l,
            _ => out.push(Extent {
                offset: at,
                length: l,
                hole,
                zero,
            }),
        }
        at += l;
    }
    out
}

/// NBD_OPT_LIST: the exports a server offers (then NBD_OPT_ABORT).
pub async fn list_exports(uri: &Uri, config: &ClientConfig) -> Result<Vec<ExportEntry>, Error> {
    let tls = client_tls(uri, config)?;
    let stream = open_stream(&uri.address, config).await?;
    if let Some(tls) = tls {
        return match stream {
            Stream::Unix(s) => over_tls(s, &tls, config, list_inside).await,
            Stream::Tcp(s) => over_tls(s, &tls, config, list_inside).await,
        };
    }
    match stream {
        Stream::Unix(mut s) => with_handshake_timeout(config, handshake::list(&mut s)).await,
        Stream::Tcp(mut s) => with_handshake_timeout(config, handshake::list(&mut s)).await,
    }
}

/// NBD_OPT_LIST inside a TLS session.
async fn list_inside<S>(mut secured: S, _no_zeroes: bool) -> Result<Vec<ExportEntry>, Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    handshake::list_after_greeting(&mut secured).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that hangs up inside TLS negotiation refuses the session, whichever call meets
    /// the hang-up first: a read or a write (EPIPE when the server closed before our first
    /// option went out). Each says the server may want a client certificate.
    #[test]
    fn a_hang_up_inside_tls_negotiation_is_a_refused_session_read_or_write() {
        use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
        for kind in [UnexpectedEof, ConnectionReset, BrokenPipe] {
            let e = tls_session_error(Error::io(std::io::Error::from(kind)));
            assert!(matches!(e, Error::TlsHandshake(_)), "{kind:?}: {e:?}");
            let text = e.to_string();
            assert!(text.contains("client certificate"), "{kind:?}: {text}");
            assert!(!e.is_retryable(), "{kind:?}");
        }
        // Other failures keep their kind: a timeout is not a refusal.
        let lost = Error::io(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(matches!(tls_session_error(lost), Error::ConnectionLost(_)));
    }

    #[test]
    fn extents_are_clamped_and_merged() {
        let raw = [
            RawExtent {
                length: 100,
                flags: 0,
            },
            RawExtent {
                length: 50,
                flags: 0,
            },
            RawExtent {
                length: 1000,
                flags: 3,
            },
        ];
        let e = clamp_extents(10, 200, &raw);
        assert_eq!(
            e,
            vec![
                Extent {
                    offset: 10,
                    length: 150,
                    hole: false,
                    zero: false
                },
                Extent {
                    offset: 160,
                    length: 50,
                    hole: true,
                    zero: true
                },
            ]
        );
        let e = clamp_extents(0, 40, &raw[..1]);
        assert_eq!(
            e,
            vec![Extent {
                offset: 0,
                length: 40,
                hole: false,
                zero: false
            }]
        );
        let e = clamp_extents(0, 400, &raw[..1]);
        assert_eq!(e.iter().map(|e| e.length).sum::<u64>(), 100, "a prefix");
    }

    #[test]
    fn pieces_cover_the_range() {
        let p: Vec<_> = Client::pieces(10, 25, 10).collect();
        assert_eq!(p, vec![(10, 10), (20, 10), (30, 5)]);
    }
}
