//! The vhost-user back end: [`BlkBackend`] (the rust-vmm `VhostUserBackend` of the device
//! model) and [`VhostUserBlkServer`], the daemon loop that serves one front end after another
//! on a unix socket.
//!
//! Threads: `vhost-user-backend` runs one epoll thread per entry of
//! [`VhostUserBackend::queues_per_thread`]; this back end asks for one per queue. A kick makes
//! that queue's thread take every available chain, parse each ([`crate::request::parse`]) and
//! run them all at once, putting each in the used ring as soon as it ends and starting the
//! chains the driver adds meanwhile, until none is running. READs first try
//! [`copy_on_read::BlockDevice::read_blocking`] (a local range read straight into guest
//! memory): a READ alone in its batch on the queue's thread itself, with no hop; several on the
//! runtime's blocking pool, one hop each, still at once. The rest, and reads the backing must
//! fill, run as tasks on the caller's tokio runtime (the device is async); with EVENT_IDX it re-arms notifications and goes again while chains keep
//! coming. The socket's own thread (the daemon's) handles the vhost-user messages.

use std::io;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use copy_on_read::BlockDevice;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{DeviceConfig, QUEUE_SIZE};
use crate::error::{Error, Result};
use crate::execute::{complete, execute, read_now, rejected, GuestRam};
use crate::request::{parse, Limits, Operation, Rejection, Request};

/// What a served device looks like.
#[derive(Clone, Debug)]
pub struct BlkOptions {
    /// Request queues (1 to [`crate::MAX_QUEUES`]).
    pub num_queues: u16,
    /// Refuse writes (feature RO) even where the device could write.
    pub read_only: bool,
    /// The GET_ID answer (up to 20 bytes are used).
    pub serial: String,
}

impl Default for BlkOptions {
    fn default() -> BlkOptions {
        BlkOptions {
            num_queues: 1,
            read_only: false,
            serial: "qedstream".into(),
        }
    }
}

/// The virtio-blk device model as a vhost-user back end. Cheap to clone (one shared state).
#[derive(Clone, Debug)]
pub struct BlkBackend {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    device: Arc<dyn BlockDevice>,
    runtime: tokio::runtime::Handle,
    config: DeviceConfig,
    limits: Limits,
    serial: Vec<u8>,
    event_idx: AtomicBool,
    memory: RwLock<Option<GuestMemoryAtomic<GuestRam>>>,
    /// One entry per queue.
    counters: Vec<QueueCounters>,
    /// Front ends accepted (the shutdown's own wake-up connection is not counted).
    front_ends: AtomicU64,
}

/// What one queue has served since the back end was made.
#[derive(Debug, Default)]
struct QueueCounters {
    requests: AtomicU64,
    rejected: AtomicU64,
}

/// What one request queue has served, as [`BlkBackend::queue_stats`] reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Well-formed requests executed (whatever their status).
    pub requests: u64,
    /// Malformed chains answered IOERR or UNSUPP without reaching the device.
    pub rejected: u64,
}

impl BlkBackend {
    /// A back end serving `device`, whose requests run on `runtime`.
    pub fn new(
        device: Arc<dyn BlockDevice>,
        runtime: tokio::runtime::Handle,
        options: &BlkOptions,
    ) -> Result<BlkBackend> {
        let n = usize::from(options.num_queues);
        if n == 0 || n > crate::MAX_QUEUES {
            return Err(Error::QueueCount(n));
        }
        let caps = device.capabilities();
        let read_only = options.read_only || !caps.writable;
        let config = DeviceConfig {
            size: device.size(),
            block_size: 512,
            num_queues: options.num_queues,
            read_only,
            discard: caps.discard && !read_only,
        };
        let limits = Limits {
            capacity_sectors: config.capacity_sectors(),
            read_only,
            discard: config.discard,
        };
        Ok(BlkBackend {
            shared: Arc::new(Shared {
                device,
                runtime,
                config,
                limits,
                serial: options.serial.as_bytes().to_vec(),
                event_idx: AtomicBool::new(false),
                memory: RwLock::new(None),
                counters: (0..n).map(|_| QueueCounters::default()).collect(),
                front_ends: AtomicU64::new(0),
            }),
        })
    }

    /// The device's configuration as the driver sees it.
    pub fn config(&self) -> DeviceConfig {
        self.shared.config
    }

    /// What each request queue has served so far, queue 0 first (all front ends together).
    pub fn queue_stats(&self) -> Vec<QueueStats> {
        self.shared
            .counters
            .iter()
            .map(|c| QueueStats {
                requests: c.requests.load(Ordering::Relaxed),
                rejected: c.rejected.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// How many front ends have connected so far (one at a time; a reconnection counts again).
    pub fn front_ends(&self) -> u64 {
        self.shared.front_ends.load(Ordering::Relaxed)
    }

    /// The guest memory the front end gave last, as one snapshot.
    fn memory(&self) -> io::Result<Arc<GuestRam>> {
        let guard = self
            .shared
            .memory
            .read()
            .map_err(|_| io::Error::other("poisoned"))?;
        let atomic = guard
            .as_ref()
            .ok_or_else(|| io::Error::other("a kick before the memory table"))?;
        Ok(atomic.memory().into_inner())
    }

    /// Serves queue `index` (`vring`): every available chain, and those the driver adds while
    /// they run; true if there was any. Each request is put in the used ring as soon as it
    /// ends, so the driver can refill the queue while the others still run.
    fn serve_queue(&self, index: usize, vring: &VringRwLock) -> io::Result<bool> {
        let mem = self.memory()?;
        let parsed = self.take_chains(index, vring, &mem)?;
        if parsed.is_empty() {
            return Ok(false);
        }
        if let [(head, Ok(req))] = parsed.as_slice() {
            // One READ alone: a local one runs right here, with no hop at all.
            if let Some(out) = read_now(&*self.shared.device, &mem, req) {
                let len = complete(&mem, Some(req.status), out);
                publish(vring, *head, len)?;
                return Ok(true);
            }
        }
        self.shared
            .runtime
            .block_on(self.run_pipelined(index, vring, &mem, parsed))?;
        Ok(true)
    }

    /// Takes and parses every chain available on `vring` (and counts them).
    fn take_chains(
        &self,
        index: usize,
        vring: &VringRwLock,
        mem: &Arc<GuestRam>,
    ) -> io::Result<Chains> {
        let parsed: Chains = {
            let mut state = vring.get_mut();
            let chains = state
                .get_queue_mut()
                .iter(mem.as_ref())
                .map_err(|e| io::Error::other(e.to_string()))?;
            chains
                .map(|chain| {
                    let head = chain.head_index();
                    (head, parse(mem.as_ref(), chain, &self.shared.limits))
                })
                .collect()
        };
        if let Some(c) = self.shared.counters.get(index) {
            let bad = parsed.iter().filter(|(_, p)| p.is_err()).count() as u64;
            c.rejected.fetch_add(bad, Ordering::Relaxed);
            c.requests
                .fetch_add(parsed.len() as u64 - bad, Ordering::Relaxed);
        }
        Ok(parsed)
    }

    /// Runs `first` concurrently, publishing each request as it ends and starting the chains
    /// the driver adds meanwhile, until none is left running.
    async fn run_pipelined(
        &self,
        index: usize,
        vring: &VringRwLock,
        mem: &Arc<GuestRam>,
        first: Chains,
    ) -> io::Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        self.start_all(&mut tasks, vring, mem, first)?;
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok((head, len)) => publish(vring, head, len)?,
                // A request task cannot panic by design; should one, its chain is lost, the
                // others still complete.
                Err(e) => tracing::error!(error = %e, "a virtio-blk request task failed"),
            }
            let more = self.take_chains(index, vring, mem)?;
            self.start_all(&mut tasks, vring, mem, more)?;
        }
        Ok(())
    }

    /// Starts each parsed chain as a task (a malformed one is answered at once).
    fn start_all(
        &self,
        tasks: &mut tokio::task::JoinSet<(u16, u32)>,
        vring: &VringRwLock,
        mem: &Arc<GuestRam>,
        parsed: Chains,
    ) -> io::Result<()> {
        for (head, p) in parsed {
            match p {
                // Reads run on the blocking pool: a local one is one pread into guest memory
                // there (one hop, not the two of a task that then goes to the pool), and many
                // still run at once.
                Ok(req) if req.op == Operation::Read => {
                    let shared = self.shared.clone();
                    let mem = mem.clone();
                    tasks.spawn_blocking_on(
                        move || {
                            let device = &*shared.device;
                            let out = read_now(device, &mem, &req).unwrap_or_else(|| {
                                shared
                                    .runtime
                                    .block_on(execute(device, &mem, &req, &shared.serial))
                            });
                            (head, complete(&mem, Some(req.status), out))
                        },
                        &self.shared.runtime,
                    );
                }
                Ok(req) => {
                    let shared = self.shared.clone();
                    let mem = mem.clone();
                    tasks.spawn(async move {
                        let out = execute(&*shared.device, &mem, &req, &shared.serial).await;
                        (head, complete(&mem, Some(req.status), out))
                    });
                }
                Err(r) => {
                    tracing::debug!(reason = r.reason, "malformed virtio-blk chain");
                    publish(vring, head, complete(mem, r.status, rejected(&r)))?;
                }
            }
        }
        Ok(())
    }
}

/// Chains taken from a queue: each head and its parsed request (or why it was rejected).
type Chains = Vec<(u16, std::result::Result<Request, Rejection>)>;

/// Puts one finished chain in the used ring and notifies the driver if it wants to be.
fn publish(vring: &VringRwLock, head: u16, len: u32) -> io::Result<()> {
    vring
        .add_used(head, len)
        .map_err(|e| io::Error::other(e.to_string()))?;
    if vring
        .needs_notification()
        .map_err(|e| io::Error::other(e.to_string()))?
    {
        vring.signal_used_queue()?;
    }
    Ok(())
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.shared.config.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        self.shared.config.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.shared.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.shared.config.read(offset, size)
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestRam>) -> io::Result<()> {
        let mut slot = self
            .shared
            .memory
            .write()
            .map_err(|_| io::Error::other("poisoned"))?;
        *slot = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<EventFd> {
        EventFd::new(EFD_NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other("unexpected event set"));
        }
        // `vrings` are this thread's own, and `device_event` indexes them; with one queue per
        // thread (`queues_per_thread`), the queue's index on the device is the thread's.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Err(io::Error::other("event for an unknown queue"));
        };
        let index = thread_id;
        if !self.shared.event_idx.load(Ordering::Acquire) {
            self.serve_queue(index, vring)?;
            return Ok(());
        }
        loop {
            vring
                .disable_notification()
                .map_err(|e| io::Error::other(e.to_string()))?;
            self.serve_queue(index, vring)?;
            let more = vring
                .enable_notification()
                .map_err(|e| io::Error::other(e.to_string()))?;
            if !more {
                return Ok(());
            }
        }
    }
}

/// A vhost-user-blk socket being served: one front end at a time, again and again, until
/// [`VhostUserBlkServer::shutdown`].
#[derive(Debug)]
pub struct VhostUserBlkServer {
    path: PathBuf,
    backend: BlkBackend,
    stop: Arc<AtomicBool>,
    connected: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl VhostUserBlkServer {
    /// Binds `path` (a stale socket there is replaced; any other file is refused) and serves
    /// `backend` on it from a thread of its own. Accepting when this returns.
    pub fn start(path: &Path, backend: BlkBackend) -> Result<VhostUserBlkServer> {
        let listener = bind(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let connected = Arc::new(AtomicBool::new(false));
        let (s, c) = (stop.clone(), connected.clone());
        let served = backend.clone();
        let thread = std::thread::Builder::new()
            .name("vhost-user-blk".into())
            .spawn(move || serve_front_ends(&listener, &served, &s, &c))
            .map_err(|source| Error::Resource {
                what: "starting the vhost-user-blk thread",
                source,
            })?;
        Ok(VhostUserBlkServer {
            path: path.to_path_buf(),
            backend,
            stop,
            connected,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The back end served (for its [`BlkBackend::queue_stats`] and
    /// [`BlkBackend::front_ends`]).
    pub fn backend(&self) -> &BlkBackend {
        &self.backend
    }

    /// Stops accepting and removes the socket. A front end still connected is left to its
    /// thread (it cannot be interrupted in the vhost-user crates): once the device is closed,
    /// its requests fail with IOERR, and it ends with the process.
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = std::fs::remove_file(&self.path);
        if self.connected.load(Ordering::Acquire) {
            return;
        }
        // Wakes the thread out of accept(); it sees the stop flag and ends.
        match UnixStream::connect(&self.path) {
            Ok(poke) => drop(poke),
            Err(_) => return,
        }
        // A front end that connected in the meantime keeps the thread: wait a little, then
        // leave it (it ends with the process).
        if let Some(t) = self.thread.take() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// Binds the socket, replacing only a stale socket file.
fn bind(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    let err = |source| Error::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    UnixListener::bind(path).map_err(err)
}

/// Serves one front end after another until `stop`.
fn serve_front_ends(
    listener: &UnixListener,
    backend: &BlkBackend,
    stop: &AtomicBool,
    connected: &AtomicBool,
) {
    while !stop.load(Ordering::Acquire) {
        if let Err(e) = serve_one(listener, backend, stop, connected) {
            tracing::warn!(error = %e, "vhost-user-blk front end ended with an error");
            // A socket that fails at once every time must not spin a core.
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        connected.store(false, Ordering::Release);
    }
}

/// Accepts one front end and serves it until it disconnects.
fn serve_one(
    listener: &UnixListener,
    backend: &BlkBackend,
    stop: &AtomicBool,
    connected: &AtomicBool,
) -> Result<()> {
    let fd = dup(listener)?;
    // SAFETY: `fd` is a fresh duplicate of a listening unix socket that nothing else owns.
    let listener = unsafe { Listener::from_raw_fd(fd) };
    let memory = GuestMemoryAtomic::new(GuestRam::new());
    let mut daemon = VhostUserDaemon::new("vhost-user-blk".into(), backend.clone(), memory)
        .map_err(Error::Daemon)?;
    daemon.start(listener).map_err(Error::Daemon)?;
    connected.store(true, Ordering::Release);
    if !stop.load(Ordering::Acquire) {
        backend.shared.front_ends.fetch_add(1, Ordering::Relaxed);
    }
    let result = if stop.load(Ordering::Acquire) {
        Ok(())
    } else {
        daemon.wait()
    };
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    match result {
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        ))
        | Ok(()) => Ok(()),
        Err(e) => Err(Error::Daemon(e)),
    }
}

/// A duplicate of the listening socket's descriptor (the vhost crate's listener owns and
/// closes the one it is given).
fn dup(listener: &UnixListener) -> Result<std::os::fd::RawFd> {
    let copy = listener.try_clone().map_err(|source| Error::Resource {
        what: "duplicating the socket",
        source,
    })?;
    Ok(copy.into_raw_fd())
}
