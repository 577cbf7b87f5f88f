//! `qedstream serve`: one image as a copy-on-read block node, served to a VM over NBD,
//! streamed, and driven over a QMP control socket ([`engine::control`]).
//!
//! The flow: open the image (a QED overlay with any backing, a standalone QED image, or a raw
//! file; read-only with `--read-only`, when the file is never written, copy-on-read
//! included), bind the control socket and the NBD listeners, write the pid file, say "ready",
//! start the stream if asked, then report job events until `quit`, SIGTERM or SIGINT. Then
//! stop accepting, cancel a running job (the image stays valid and linked), close the image
//! (flushed, NEED_CHECK clear) and exit 0. A stream that completes drops the backing link on
//! disk at once and the process keeps serving the now standalone image.
//!
//! The vhost-user-blk device is the `vhost-user-blk` crate's, started in [`start_vhost_user`].
//! The NBD export is the `nbd-server` crate's, started in [`start_nbd`]; over a QED backing
//! chain its `qemu:allocation-depth` is [`ChainDepth`]'s, exact at every depth. With
//! `--tls-creds` the export requires TLS ([`export_tls`] loads the credentials before anything
//! listens), and each client it turns away gets a line on stderr ([`log_refusals`]).

use std::io::Write;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::signal::unix::{signal, SignalKind};

use copy_on_read::{BlockDevice, CorDevice, CorOptions, Gate, Populate, RawFile};
use engine::control::{Control, ControlEvent, ControlEvents, ControlSocket, Node, StreamRequest};
use engine::job::{JobEvent, OnError};
use engine::stream::StreamOptions;
use nbd_server::{AllocationDepth, Export, ListenAddr, Server, ServerConfig};

use crate::depth::ChainDepth;
use crate::error::{Error, Result};
use crate::out::outln;

/// Parses an `--nbd` address: `unix:PATH`, `tcp:HOST:PORT`, or a bare path (a unix socket,
/// the default kind: TCP binds only where told).
pub fn parse_listen(text: &str) -> std::result::Result<ListenAddr, String> {
    // A scheme other than ours is a mistake, not a socket file named `vsock:3:10809`.
    let scheme = text
        .split_once(':')
        .map(|(s, _)| s)
        .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric()));
    match scheme {
        Some("unix" | "tcp") => text.parse().map_err(|e: nbd_server::Error| e.to_string()),
        Some(other) => Err(format!(
            "--nbd {text:?}: {other}: is not a listener kind; expected unix:PATH or tcp:HOST:PORT"
        )),
        None if text.is_empty() => {
            Err("--nbd needs unix:PATH, tcp:HOST:PORT or a socket path".into())
        }
        None => Ok(ListenAddr::Unix(PathBuf::from(text))),
    }
}

/// The NBD export's TLS credentials: from `--tls-creds DIR` when the image is served over NBD
/// (the directory then needs server-cert.pem and server-key.pem, and ca-cert.pem when
/// `verify_peer`), else none (the flag is then only for an nbds:// backing). Errors in the
/// directory end the command here, before anything listens.
pub fn export_tls(
    nbd: &[ListenAddr],
    creds: Option<&Path>,
    verify_peer: bool,
) -> Result<Option<nbd_tls::ServerTls>> {
    match creds {
        Some(dir) if !nbd.is_empty() => nbd_tls::ServerTls::from_dir(dir, verify_peer)
            .map(Some)
            .map_err(Error::ExportTls),
        _ => Ok(None),
    }
}

/// Writes one line on stderr for each NBD client the TLS-only export turns away, until the
/// server is gone.
async fn log_refusals(mut refusals: tokio::sync::broadcast::Receiver<nbd_server::Refused>) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let line = match refusals.recv().await {
            Ok(r) => r.to_string(),
            Err(RecvError::Lagged(n)) => format!("{n} more NBD clients refused (not logged)"),
            Err(RecvError::Closed) => return,
        };
        let _ = writeln!(std::io::stderr().lock(), "qedstream serve: {line}");
    }
}

/// What `qedstream serve` was asked to do.
#[derive(Clone, Debug)]
pub struct ServeCommand {
    /// The NBD export's TLS credentials: TLS is required when set.
    pub tls: Option<nbd_tls::ServerTls>,
    /// The image.
    pub image: PathBuf,
    /// NBD listeners.
    pub nbd: Vec<ListenAddr>,
    /// The vhost-user-blk socket.
    pub vhost_user_blk: Option<PathBuf>,
    /// Its request queues.
    pub num_queues: u16,
    /// The export name.
    pub export: String,
    /// The node name.
    pub node_name: String,
    /// Never write the file.
    pub read_only: bool,
    /// Start the stream at once.
    pub stream: bool,
    /// Its rate limit.
    pub rate: Option<NonZeroU64>,
    /// Its error policy.
    pub on_error: OnError,
    /// The QMP socket.
    pub control: Option<PathBuf>,
    /// The pid file.
    pub pid_file: Option<PathBuf>,
    /// JSON lines on stdout.
    pub json: bool,
    /// How the chain is opened (depth bound, NBD reconnect and retry policy).
    pub gate: Gate,
    /// The stream's copy requests in flight.
    pub in_flight: usize,
    /// The stream's largest copy request.
    pub request_bytes: u64,
}

/// The NBD side of a served node: the server and where it listens.
#[derive(Debug, Default)]
struct NbdService {
    server: Option<Arc<Server>>,
    /// The bound addresses (a `tcp:HOST:0` with the port it got).
    bound: Vec<ListenAddr>,
}

impl NbdService {
    /// Stops accepting, lets connections finish their requests, flushes a writable export.
    async fn shutdown(self) -> Result<()> {
        match self.server {
            Some(s) => s.shutdown().await.map_err(Error::Nbd),
            None => Ok(()),
        }
    }
}

/// Serves `node.device` (its copy-on-read layers through `node.populate`, for CACHE and
/// `qemu:allocation-depth`, which `depth` answers instead when given) as export
/// `node.export_name`, read-only when `node.read_only`, on every address in `listen`, bound
/// and accepting when this returns.
async fn start_nbd(
    listen: &[ListenAddr],
    tls: Option<nbd_tls::ServerTls>,
    node: &Node,
    depth: Option<Arc<dyn AllocationDepth>>,
) -> Result<NbdService> {
    if listen.is_empty() {
        return Ok(NbdService::default());
    }
    let mut export = Export::new(node.export_name.clone(), node.device.clone())
        .with_description(format!("qedstream {}", node.file))
        .read_only(node.read_only);
    if let Some(layers) = &node.populate {
        export = export.with_layers(layers.clone());
    }
    if let Some(depth) = depth {
        export = export.with_allocation_depth(depth);
    }
    let config = ServerConfig {
        tls,
        ..ServerConfig::default()
    };
    let server = Server::new(vec![export], config);
    tokio::spawn(log_refusals(server.refusals()));
    let mut bound = Vec::with_capacity(listen.len());
    for addr in listen {
        match server.bind(addr).await {
            Ok(l) => bound.push(l.addr().clone()),
            Err(e) => {
                let _ = server.shutdown().await;
                return Err(Error::Nbd(e));
            }
        }
    }
    Ok(NbdService {
        server: Some(server),
        bound,
    })
}

/// Serves `node.device` over vhost-user-blk on `path`, accepting when this returns; its
/// requests run on the current runtime.
fn start_vhost_user(
    path: Option<&Path>,
    num_queues: u16,
    node: &Node,
) -> Result<Option<vhost_user_blk::VhostUserBlkServer>> {
    let Some(path) = path else {
        return Ok(None);
    };
    let options = vhost_user_blk::BlkOptions {
        num_queues,
        read_only: node.read_only,
        serial: node.node_name.clone(),
    };
    let backend = vhost_user_blk::BlkBackend::new(
        node.device.clone(),
        tokio::runtime::Handle::current(),
        &options,
    )?;
    Ok(Some(vhost_user_blk::VhostUserBlkServer::start(
        path, backend,
    )?))
}

/// Runs `qedstream serve` on a fresh runtime; returns the exit code.
pub fn run(cmd: ServeCommand) -> Result<u8> {
    let rt = engine::io_runtime()?;
    let r = rt.block_on(run_async(cmd));
    rt.shutdown_timeout(Duration::from_secs(1));
    r
}

/// A served node and, over a QED backing chain, its exact `qemu:allocation-depth`.
type Opened = (Node, Option<Arc<dyn AllocationDepth>>);

/// Opens the image as a block node: QED through the copy-on-read device, raw as a file.
async fn open_node(cmd: &ServeCommand) -> Result<Opened> {
    let gate = cmd.gate.clone();
    let access = if cmd.read_only {
        qed::Access::ReadOnly
    } else {
        qed::Access::ReadWrite
    };
    let path = &cmd.image;
    let file = qed::file::open(path, access).map_err(|e| Error::image(path, e))?;
    let format = qed::backing::probe_storage(&file).map_err(|e| Error::open(path, e))?;
    let mut depth: Option<Arc<dyn AllocationDepth>> = None;
    let (device, populate): (Arc<dyn BlockDevice>, Option<Arc<dyn Populate>>) = match format {
        "qed" => {
            let options = CorOptions {
                gate: gate.clone(),
                read_only: cmd.read_only,
                ..CorOptions::default()
            };
            let dev = Arc::new(
                CorDevice::open_file(file, path, options)
                    .await
                    .map_err(Error::device)?,
            );
            let layers: Arc<dyn Populate> = dev.clone();
            if let Some(d) = ChainDepth::open(layers, dev.image(), path, &gate).await? {
                depth = Some(Arc::new(d));
            }
            (dev.clone(), Some(dev))
        }
        _ => {
            let raw = RawFile::from_file_with(file, path.clone(), !cmd.read_only, gate.io)
                .map_err(Error::device)?;
            (Arc::new(raw), None)
        }
    };
    let node = Node {
        node_name: cmd.node_name.clone(),
        export_name: cmd.export.clone(),
        file: path.display().to_string(),
        format: if populate.is_some() { "qed" } else { "raw" }.to_string(),
        read_only: cmd.read_only,
        device,
        populate,
    };
    Ok((node, depth))
}

/// One JSON line on stdout, written out at once.
fn print_json(v: &Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{v}")
        .and_then(|()| out.flush())
        .map_err(Error::Stdout)
}

/// Writes the pid file.
fn write_pid_file(path: &Path) -> Result<()> {
    std::fs::write(path, format!("{}\n", std::process::id())).map_err(Error::io(format!(
        "writing the pid file {}",
        path.display()
    )))
}

/// The NBD URI of the export at `addr`: `nbds://` and `nbds+unix://` when TLS is required.
fn export_uri(cmd: &ServeCommand, addr: &ListenAddr, export: &str) -> String {
    let uri = addr.uri(export);
    match (&cmd.tls, uri.strip_prefix("nbd")) {
        (Some(_), Some(rest)) => format!("nbds{rest}"),
        _ => uri,
    }
}

/// The "ready" report: every socket that accepts.
fn say_ready(cmd: &ServeCommand, node: &Node, nbd: &[ListenAddr]) -> Result<()> {
    let uris: Vec<String> = nbd
        .iter()
        .map(|a| export_uri(cmd, a, &node.export_name))
        .collect();
    if cmd.json {
        print_json(&json!({
            "event": "ready",
            "image": node.file,
            "format": node.format,
            "node-name": node.node_name,
            "export": node.export_name,
            "read_only": node.read_only,
            "control": cmd.control.as_ref().map(|p| p.display().to_string()),
            "nbd": nbd.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "uris": uris,
            "tls": cmd.tls.is_some(),
            "tls-verify-peer": cmd.tls.as_ref().map(nbd_tls::ServerTls::verify_peer),
            "vhost-user-blk": cmd.vhost_user_blk.as_ref().map(|p| p.display().to_string()),
            "pid": std::process::id(),
        }))
    } else {
        let mut sockets = uris;
        if let Some(v) = &cmd.vhost_user_blk {
            sockets.push(format!("vhost-user-blk {}", v.display()));
        }
        if let Some(c) = &cmd.control {
            sockets.push(format!("control {}", c.display()));
        }
        outln!(
            "serving {} ({}) as node {:?}{}",
            node.file,
            node.format,
            node.node_name,
            if sockets.is_empty() {
                String::new()
            } else {
                format!(" on {}", sockets.join(", "))
            }
        )
        .and_then(|()| crate::out::flush())
    }
}

/// Reports one job event: a JSON line, or a line of text.
fn report_event(json: bool, e: &ControlEvent) -> Result<()> {
    let (name, progress) = match &e.event {
        JobEvent::State(s) => {
            let v = json!({"event": "state", "job": e.job_id, "state": s});
            return if json { print_json(&v) } else { Ok(()) };
        }
        JobEvent::Error(r) => {
            let v = json!({"event": "error", "job": e.job_id, "offset": r.offset,
                "length": r.length, "action": r.action, "operation": r.operation.as_str(),
                "nospace": r.nospace, "error": r.reason});
            return if json {
                print_json(&v)
            } else {
                outln!(
                    "job {}: range {}+{} failed ({}): {}",
                    e.job_id,
                    r.offset,
                    r.length,
                    r.action.as_str(),
                    r.reason
                )
            };
        }
        JobEvent::Completed { progress, .. } => ("completed", progress),
        JobEvent::Cancelled { progress } => ("cancelled", progress),
        JobEvent::Failed { progress, .. } => ("failed", progress),
        _ => return Ok(()),
    };
    let mut v = crate::progress::progress_json(name, progress);
    v["job"] = json!(e.job_id);
    match &e.event {
        JobEvent::Completed {
            unlinked, ignored, ..
        } => {
            v["unlinked"] = json!(unlinked);
            v["ignored"] = json!(ignored.iter().map(|r| [r.0, r.1]).collect::<Vec<_>>());
        }
        JobEvent::Failed { error, .. } => v["error"] = json!(error),
        _ => {}
    }
    if json {
        print_json(&v)
    } else {
        outln!(
            "job {}: {name} at offset {} of {}",
            e.job_id,
            progress.offset,
            progress.total
        )
    }
}

/// Why the command ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Quit,
    Signal(&'static str),
}

/// SIGTERM and SIGINT, caught (they no longer end the process by themselves).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        let listen = |kind| signal(kind).map_err(Error::io("installing signal handlers"));
        Ok(Signals {
            term: listen(SignalKind::terminate())?,
            int: listen(SignalKind::interrupt())?,
        })
    }
}

/// Reports job events until `quit` or a signal.
async fn serve_until_stopped(
    cmd: &ServeCommand,
    control: &Control,
    events: &mut ControlEvents,
    signals: &mut Signals,
) -> Result<Stop> {
    let Signals { term, int } = signals;
    loop {
        tokio::select! {
            e = events.recv() => match e {
                Some(e) => report_event(cmd.json, &e)?,
                None => return Ok(Stop::Quit),
            },
            () = control.quit_requested() => return Ok(Stop::Quit),
            _ = term.recv() => return Ok(Stop::Signal("SIGTERM")),
            _ = int.recv() => return Ok(Stop::Signal("SIGINT")),
        }
    }
}

/// Cancels a running job and reports its events up to its end.
async fn end_job(cmd: &ServeCommand, control: &Control, events: &mut ControlEvents) -> Result<()> {
    let Some((id, handle)) = control.job() else {
        return Ok(());
    };
    handle.cancel();
    while let Some(e) = events.recv().await {
        report_event(cmd.json, &e)?;
        if e.job_id == id && e.event.is_final() {
            break;
        }
    }
    Ok(())
}

async fn run_async(cmd: ServeCommand) -> Result<u8> {
    // Caught from here on: a signal during start-up ends the command as cleanly as later.
    let mut signals = Signals::install()?;
    let (node, depth) = open_node(&cmd).await?;
    let defaults = StreamOptions {
        on_error: cmd.on_error,
        in_flight: cmd.in_flight,
        request_bytes: cmd.request_bytes,
        ..StreamOptions::default()
    };
    let control = Control::new(node, defaults);
    let mut events = control.subscribe();
    let served = start_sockets(&cmd, &control, depth).await;
    let result = match served {
        Ok((socket, nbd, vhost)) => {
            let r = serve(&cmd, &control, &nbd.bound, &mut events, &mut signals).await;
            // Stop accepting first, then finish what runs.
            if let Some(s) = socket {
                s.close().await;
            }
            let mut said = Ok(());
            if let Some(v) = vhost {
                let backend = v.backend().clone();
                let _ = tokio::task::spawn_blocking(move || v.shutdown()).await;
                said = say_vhost_stats(&cmd, &backend);
            }
            let drained = nbd.shutdown().await;
            let ended = end_job(&cmd, &control, &mut events).await;
            r.and_then(|stop| drained.and(ended).and(said).map(|()| stop))
        }
        Err(e) => Err(e),
    };
    let closed = control.node().device.close().await.map_err(Error::device);
    if let Some(p) = &cmd.pid_file {
        let _ = std::fs::remove_file(p);
    }
    let stop = result?;
    closed?;
    if let Stop::Signal(name) = stop {
        tracing::info!(signal = name, "stopped by a signal; image closed");
    }
    Ok(0)
}

/// What the vhost-user-blk device served, once it stopped: front ends accepted, and each
/// queue's requests (so a multi-queue guest shows that every queue carried requests).
fn say_vhost_stats(cmd: &ServeCommand, backend: &vhost_user_blk::BlkBackend) -> Result<()> {
    let queues = backend.queue_stats();
    if cmd.json {
        print_json(&json!({
            "event": "vhost-user-blk",
            "front-ends": backend.front_ends(),
            "queues": queues
                .iter()
                .map(|q| json!({"requests": q.requests, "rejected": q.rejected}))
                .collect::<Vec<_>>(),
        }))?;
    } else {
        let requests: Vec<u64> = queues.iter().map(|q| q.requests).collect();
        tracing::info!(
            front_ends = backend.front_ends(),
            ?requests,
            "vhost-user-blk stopped"
        );
    }
    Ok(())
}

/// Binds the control socket and the NBD listeners, then writes the pid file.
async fn start_sockets(
    cmd: &ServeCommand,
    control: &Control,
    depth: Option<Arc<dyn AllocationDepth>>,
) -> Result<Sockets> {
    let socket = match &cmd.control {
        Some(p) => Some(control.listen(p).await?),
        None => None,
    };
    let nbd = match start_nbd(&cmd.nbd, cmd.tls.clone(), control.node(), depth).await {
        Ok(n) => n,
        Err(e) => {
            if let Some(s) = socket {
                s.close().await;
            }
            return Err(e);
        }
    };
    let vhost = match start_vhost_user(
        cmd.vhost_user_blk.as_deref(),
        cmd.num_queues,
        control.node(),
    ) {
        Ok(v) => v,
        Err(e) => {
            if let Some(s) = socket {
                s.close().await;
            }
            let _ = nbd.shutdown().await;
            return Err(e);
        }
    };
    if let Some(p) = &cmd.pid_file {
        write_pid_file(p)?;
    }
    Ok((socket, nbd, vhost))
}

/// The sockets a serve listens on: control, NBD, vhost-user-blk.
type Sockets = (
    Option<ControlSocket>,
    NbdService,
    Option<vhost_user_blk::VhostUserBlkServer>,
);

/// Says ready, starts the stream if asked, and serves until stopped.
async fn serve(
    cmd: &ServeCommand,
    control: &Control,
    nbd: &[ListenAddr],
    events: &mut ControlEvents,
    signals: &mut Signals,
) -> Result<Stop> {
    say_ready(cmd, control.node(), nbd)?;
    if cmd.stream {
        control
            .start_stream(StreamRequest {
                job_id: None,
                speed: cmd.rate.map_or(0, NonZeroU64::get),
                on_error: cmd.on_error,
            })
            .map_err(|e| Error::invalid("--stream", e.desc))?;
    }
    serve_until_stopped(cmd, control, events, signals).await
}
