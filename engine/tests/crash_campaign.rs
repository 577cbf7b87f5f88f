//! A crash campaign on the served disk (issue 10): `qedstream serve --stream` is killed with
//! SIGKILL at random moments while an NBD client writes (FUA, plain writes later flushed,
//! WRITE_ZEROES) and reads (which copies clusters in); after every kill QEMU grades what is
//! left.
//!
//! What it proves, after every kill:
//! - `qemu-img check` finds no corruption. Leaks are allowed (exit 3): a killed allocating
//!   write leaves its data clusters, or a new L2 table, appended but unreferenced, as QEMU's
//!   own QED driver does (it sets no NEED_CHECK over a backing file, and neither do we);
//! - the whole disk, read back by `qemu-img convert` through the image's backing (a raw file,
//!   or qemu-nbd serving it), holds in every 512-byte sector what the NBD rules allow
//!   ([`qedstream_tests::crash::CrashModel`]): every write acknowledged with FUA, or
//!   acknowledged before a FLUSH that was acknowledged, is there; a write in flight at the kill
//!   has landed or not, per sector; nothing else (a sector torn, moved, or from the base where
//!   a durable write was) is;
//! - a restarted `serve --stream` serves the disk and goes on streaming;
//!
//! - a kill that left new leaks (counted by `qedstream check`) in an image without a backing
//!   left it marked NEED_CHECK, so that the next read-write open repairs it;
//!
//! and while it runs, every READ returns exactly the latest acknowledged write of each sector
//! (reads and writes in flight never overlap). Each epoch starts a fresh overlay, in turn over
//! a raw file, over qemu-nbd and over nothing, with 64K clusters (one L2 table) or 4K
//! clusters and tables of two (sixteen L2 tables), and ends with a stream run to completion
//! under the client's I/O: the backing link is dropped on disk (`qemu-img info`), NEED_CHECK
//! is clear after SIGTERM, `qemu-img check` finds no corruption (the leaks the kills left
//! stay, as in QEMU) and the image equals the model exactly.
//!
//! Rounds are stream rate-limited (`--rate` 2M to 8M of a 64 MiB disk, so kills land
//! mid-stream) or, late in an epoch, at full speed. One round in eight kills serve within
//! 60 ms of its start instead (opening the image, repairing one marked NEED_CHECK, starting
//! the stream), before any client connects; one in eight of the others sends SIGTERM first
//! and kills up to 15 ms later, while serve stops. The seed is printed;
//! `QEDSTREAM_CRASH_SEED=N` replays its choices (epochs, rates, kill delays, and the
//! requests as far as the threads' timing allows: a busy range makes a task draw again),
//! `QEDSTREAM_CRASH_ROUNDS=N` sets the number of kills (default 12).
//!
//! The long campaign, `QEDSTREAM_CRASH_ROUNDS=200 cargo test --release -p engine --test
//! crash_campaign -- --nocapture`, on the 2-core development machine (2026-11-29), five runs
//! as the campaign grew, all passing:
//!
//! | run | kills: mid-stream / start-up / after SIGTERM | writes acked (FUA + plain + zeroes) | in flight at kills (sectors landed) | reads checked | most leaks after a kill | time |
//! |---|---|---|---|---|---|---|
//! | 64K clusters, raw file / qemu-nbd | 104 / 23 / - | 16,789 + 16,974 + 4,103 | 510 (11,131 of 81,707) | 7,955 | 15 | 205 s |
//! | + 4K clusters | 140 / 17 / - | 15,875 + 16,055 + 4,053 | 530 (9,366 of 61,090) | 7,755 | 122 | 250 s |
//! | + SIGTERM then SIGKILL | 133 / 34 / 26 | 13,331 + 13,165 + 3,320 | 472 (7,933 of 45,237) | 6,751 | 522 | 269 s |
//! | + no backing | 92 / 34 / 20 | 14,463 + 14,499 + 3,526 | 474 (9,615 of 45,913) | 7,448 | 612 | 233 s |
//! | final (start-up kills up to 60 ms) | 78 / 24 / 21 | 18,508 + 18,461 + 4,690 | 501 (6,792 of 44,734) | 8,778 | 79 | 223 s |
//!
//! In every run no acknowledged write, flushed or not, was missing after a kill (SIGKILL
//! keeps the page cache, and serve writes before it acknowledges). The checks after 120 to
//! 181 of the 200 kills found leaks (over a backing they stay from kill to kill): a 4K-cluster
//! stream request of 2 MiB killed between its data and its L2 update leaks 512 clusters.
//! Kills of an image without a backing left new leaks once in the last two runs (the ones
//! that assert it), and NEED_CHECK marked it: its allocations do not flush between data and
//! table, so the window is two `pwrite`s wide. From the fourth run on, a third of the epochs
//! have no backing, so fewer kills land mid-stream.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd_client::{Client, ClientConfig, ZeroFlags};
use parking_lot::Mutex;
use qedstream_tests::crash::{Contents, CrashModel, Version, SECTOR};
use qedstream_tests::nbd_server::NbdServer;
use qedstream_tests::served::{Served, DEADLINE};
use qedstream_tests::{tempdir, tools, XorShift};
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// The virtual disk.
const DISK: u64 = 64 * MIB;
/// QEMU's default QED cluster, which `qemu-img create` gives the overlay.
const CLUSTER: u64 = 64 << 10;
/// The small clusters of half the epochs ([`EPOCHS`]): 4 KiB, with tables of 2 clusters (an
/// L2 table maps 4 MiB, so the disk has 16 of them and kills land in their creation too).
/// QEMU's check reports a spurious leak or a few on such a file past 16 MiB (its
/// `qed_bytes_to_clusters` divides by the cluster size minus one): leaks are allowed,
/// corruption never.
const SMALL_CLUSTER: u64 = 4 << 10;
/// The base's holes are whole 64 KiB runs.
const CLUSTER_SECTORS: u64 = CLUSTER / SECTOR;
const SECTORS: u64 = DISK / SECTOR;
/// The longest request: the client's default piece, so that every request is one NBD command.
const MAX_REQUEST_SECTORS: u64 = (256 << 10) / SECTOR;
/// Kills in a run unless `QEDSTREAM_CRASH_ROUNDS` says otherwise.
const DEFAULT_KILLS: u64 = 12;
/// Kills on one overlay, in a long campaign, before its stream is run to completion.
const KILLS_PER_EPOCH: u64 = 10;
/// Writer tasks of the client.
const WRITERS: usize = 3;
/// The longest pause between two operations of a writer, and of the reader: paced so that
/// writes and copy-on-read do not make the whole disk local before the stream does.
const WRITER_PAUSE: Duration = Duration::from_millis(10);
const READER_PAUSE: Duration = Duration::from_millis(25);
/// Operations each task runs in an epoch's last, unkilled round.
const FINAL_OPS: u64 = 40;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_qedstream"))
}

/// A number from the environment, or `default`.
fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")),
        Err(_) => default,
    }
}

/// A seed from the clock, when none is given.
fn fresh_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    t.as_nanos() as u64 ^ u64::from(std::process::id())
}

/// Counters of the whole campaign, shared by the client tasks.
#[derive(Debug, Default)]
struct Counts {
    fua: AtomicU64,
    plain: AtomicU64,
    zeroes: AtomicU64,
    flushes: AtomicU64,
    reads: AtomicU64,
    /// Writes (and WRITE_ZEROES) whose answer the kill cut off.
    in_flight_at_kill: AtomicU64,
}

impl Counts {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// What the client tasks share.
#[derive(Clone)]
struct Workload {
    client: Client,
    model: Arc<Mutex<CrashModel>>,
    contents: Arc<Contents>,
    /// Set just before the server is killed: from then on a lost connection is expected.
    killed: Arc<AtomicBool>,
    counts: Arc<Counts>,
    /// Sectors per cluster of the image.
    cluster_sectors: u64,
}

/// How long a client task runs.
#[derive(Clone, Copy, Debug)]
enum Until {
    /// Until the server is killed under it.
    Killed,
    /// This many operations.
    Ops(u64),
}

impl Until {
    fn more(self, done: u64) -> bool {
        match self {
            Until::Killed => true,
            Until::Ops(n) => done < n,
        }
    }
}

/// What a failed request means: the end of the task when the server was killed (or told
/// to stop: ESHUTDOWN) and the connection is gone; a failure of the test otherwise (any
/// other error the server reported, a timeout: a hang).
fn after_error(w: &Workload, what: &str, e: &nbd_client::Error) -> Result<(), String> {
    let lost = matches!(
        e,
        nbd_client::Error::ConnectionLost(_)
            | nbd_client::Error::Closed
            | nbd_client::Error::ReconnectFailed { .. }
    ) || e.server_errno() == Some(nbd_client::Errno::ESHUTDOWN);
    if lost && w.killed.load(Ordering::SeqCst) {
        Ok(())
    } else {
        Err(format!("{what} failed while the server was up: {e}"))
    }
}

/// Write ranges, in sectors, for clusters of `cs` sectors: inside one cluster.
fn partial_cluster(rng: &mut XorShift, cs: u64) -> (u64, u64) {
    let cluster = rng.below(SECTORS / cs);
    let start = rng.below(cs);
    let count = 1 + rng.below((cs - start).min(64));
    (cluster * cs + start, count)
}

/// From the second half of one cluster into the next or the one after.
fn straddling(rng: &mut XorShift, cs: u64) -> (u64, u64) {
    let cluster = rng.below(SECTORS / cs - 2);
    let start = cs / 2 + rng.below(cs / 2);
    let count = (cs - start) + 1 + rng.below(cs + cs / 2);
    (cluster * cs + start, count.min(MAX_REQUEST_SECTORS))
}

/// Whole clusters.
fn whole_clusters(rng: &mut XorShift, cs: u64) -> (u64, u64) {
    let most = (MAX_REQUEST_SECTORS / cs).min(4);
    let n = 1 + rng.below(most);
    let cluster = rng.below(SECTORS / cs - n + 1);
    (cluster * cs, n * cs)
}

/// Anywhere.
fn any_range(rng: &mut XorShift) -> (u64, u64) {
    let count = 1 + rng.below(MAX_REQUEST_SECTORS);
    (rng.below(SECTORS - count + 1), count)
}

/// A write range of one of the kinds above.
fn pick_range(rng: &mut XorShift, cs: u64) -> (u64, u64) {
    match rng.below(8) {
        0..=2 => partial_cluster(rng, cs),
        3..=4 => straddling(rng, cs),
        5..=6 => whole_clusters(rng, cs),
        _ => any_range(rng),
    }
}

/// What a writer sends.
#[derive(Clone, Copy, Debug)]
enum WriteKind {
    Fua,
    Plain,
    Zeroes,
}

/// FUA 4 in 9, plain 4 in 9, zeroes 1 in 9.
fn pick_kind(rng: &mut XorShift) -> WriteKind {
    match rng.below(9) {
        0..=3 => WriteKind::Fua,
        4..=7 => WriteKind::Plain,
        _ => WriteKind::Zeroes,
    }
}

/// Claims some range `pick` draws (drawing again while the ranges it gets are busy).
async fn claim(
    w: &Workload,
    rng: &mut XorShift,
    pick: impl Fn(&mut XorShift) -> (u64, u64),
) -> (u64, u64) {
    loop {
        for _ in 0..16 {
            let (first, count) = pick(rng);
            if w.model.lock().try_claim(first, count) {
                return (first, count);
            }
        }
        tokio::task::yield_now().await;
    }
}

/// Writes, zeroes and flushes until the server dies (or `until` ops are done).
async fn writer(w: Workload, mut rng: XorShift, until: Until) -> Result<(), String> {
    let mut done = 0;
    while until.more(done) {
        done += 1;
        let kind = pick_kind(&mut rng);
        let cs = w.cluster_sectors;
        let (first, count) = claim(&w, &mut rng, |r| pick_range(r, cs)).await;
        let offset = first * SECTOR;
        let what = format!("{kind:?} write of sectors {first}+{count}");
        let (result, version) = match kind {
            WriteKind::Zeroes => {
                let v = w.model.lock().begin_zeroes(first, count);
                let r = w
                    .client
                    .write_zeroes(offset, count * SECTOR, ZeroFlags::default())
                    .await;
                (r, v)
            }
            WriteKind::Fua | WriteKind::Plain => {
                let v = w.model.lock().begin_write(first, count);
                let data = w.contents.run(v, first, count);
                let r = if matches!(kind, WriteKind::Fua) {
                    w.client.write_fua(offset, &data).await
                } else {
                    w.client.write(offset, &data).await
                };
                (r, v)
            }
        };
        if let Err(e) = result {
            Counts::bump(&w.counts.in_flight_at_kill);
            return after_error(&w, &what, &e);
        }
        let fua = matches!(kind, WriteKind::Fua);
        {
            let mut model = w.model.lock();
            model.acknowledged(first, count, version, fua);
            model.release(first, count);
        }
        Counts::bump(match kind {
            WriteKind::Fua => &w.counts.fua,
            WriteKind::Plain => &w.counts.plain,
            WriteKind::Zeroes => &w.counts.zeroes,
        });
        if rng.one_in(4) {
            let mark = w.model.lock().flush_sent();
            if let Err(e) = w.client.flush().await {
                return after_error(&w, "FLUSH", &e);
            }
            w.model.lock().flush_acknowledged(mark);
            Counts::bump(&w.counts.flushes);
        }
        pause(&mut rng, WRITER_PAUSE).await;
    }
    Ok(())
}

/// Reads random ranges (copying clusters in) until the server dies (or `until` ops are
/// done); each sector must be its latest acknowledged write.
async fn reader(w: Workload, mut rng: XorShift, until: Until) -> Result<(), String> {
    let mut done = 0;
    while until.more(done) {
        done += 1;
        let (first, count) = claim(&w, &mut rng, any_range).await;
        let data = match w.client.read(first * SECTOR, count * SECTOR).await {
            Ok(d) => d,
            Err(e) => return after_error(&w, &format!("READ of sectors {first}+{count}"), &e),
        };
        check_read(&w, first, count, &data)?;
        Counts::bump(&w.counts.reads);
        pause(&mut rng, READER_PAUSE).await;
    }
    Ok(())
}

/// A READ of `count` sectors from `first` returned `data`: each sector must be its latest
/// acknowledged write. Releases the claim.
fn check_read(w: &Workload, first: u64, count: u64, data: &[u8]) -> Result<(), String> {
    let mut model = w.model.lock();
    for (i, bytes) in data.chunks(SECTOR as usize).enumerate() {
        let sector = first + i as u64;
        let expected = model.latest(sector);
        let found = w.contents.identify(sector, bytes);
        if !found.is_some_and(|f| w.contents.same(f, expected, sector)) {
            return Err(format!(
                "READ of sectors {first}+{count}: sector {sector} holds {found:?}, \
                 its latest acknowledged write is {expected:?}"
            ));
        }
    }
    model.release(first, count);
    Ok(())
}

/// Sleeps up to `longest`.
async fn pause(rng: &mut XorShift, longest: Duration) {
    let micros = rng.below(longest.as_micros() as u64);
    tokio::time::sleep(Duration::from_micros(micros)).await;
}

/// Runs the client tasks until they end; a task's failure fails the test.
async fn join_tasks(tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>, seed: u64) {
    let all = futures_join(tasks);
    let results = tokio::time::timeout(DEADLINE, all)
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: the client tasks hung (60 s)"));
    for r in results {
        let r = r.unwrap_or_else(|e| panic!("seed {seed}: a client task panicked: {e}"));
        if let Err(e) = r {
            panic!("seed {seed}: {e}");
        }
    }
}

async fn futures_join(
    tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>,
) -> Vec<Result<Result<(), String>, tokio::task::JoinError>> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await);
    }
    out
}

/// The campaign's figures.
#[derive(Debug, Default)]
struct Totals {
    epochs: u64,
    kills: u64,
    kills_mid_stream: u64,
    /// Kills while serve was starting.
    startup_kills: u64,
    /// Kills after a SIGTERM, while serve was stopping.
    shutdown_kills: u64,
    /// Of those, the ones serve had already exited from (0) by.
    stopped_before_kill: u64,
    /// Kills that left new leaks in a standalone image, marked NEED_CHECK.
    marked_new_leaks: u64,
    in_flight_sectors: u64,
    in_flight_landed: u64,
    acknowledged_not_found: u64,
    checks_with_leaks: u64,
    /// The most leaked clusters one check after a kill found.
    most_leaks: u64,
    /// Leaks `qemu-img check` finds after each epoch's clean stop (left by its kills).
    final_leaks: u64,
}

/// What an epoch's overlay is backed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backing {
    /// `base.raw`.
    RawFile,
    /// qemu-nbd serving `base.raw`.
    QemuNbd,
    /// Nothing: a standalone image from the start, marked NEED_CHECK while it allocates.
    None,
}

/// The epochs' overlays, in turn: each backing with each cluster size.
const EPOCHS: [(Backing, u64); 6] = [
    (Backing::RawFile, CLUSTER),
    (Backing::QemuNbd, SMALL_CLUSTER),
    (Backing::None, SMALL_CLUSTER),
    (Backing::RawFile, SMALL_CLUSTER),
    (Backing::QemuNbd, CLUSTER),
    (Backing::None, CLUSTER),
];

/// One campaign: its directory, base, backing server and figures.
struct Campaign {
    dir: tempfile::TempDir,
    seed: u64,
    rng: XorShift,
    /// The contents of this epoch: `raw_based` or `zero_based`.
    contents: Arc<Contents>,
    /// Contents over `base.raw`.
    raw_based: Arc<Contents>,
    /// Contents over no backing: the same writes, zeros elsewhere.
    zero_based: Arc<Contents>,
    /// qemu-nbd serving the base, for the epochs whose backing is NBD.
    base_server: NbdServer,
    rt: tokio::runtime::Runtime,
    counts: Arc<Counts>,
    totals: Totals,
    /// Sectors per cluster of the current overlay.
    cluster_sectors: u64,
    /// Whether the overlay's stream is known to have completed (its backing link dropped).
    standalone: bool,
    /// Leaks `qedstream check` found after the last kill.
    leaks_before: u64,
}

impl Campaign {
    fn new(seed: u64) -> Campaign {
        let dir = tempdir();
        // Holes in the base: 2 MiB at 8M, 512K at 24M, and the last 64K.
        let holes = vec![
            (8 * MIB / SECTOR, 10 * MIB / SECTOR),
            (24 * MIB / SECTOR, (24 * MIB + 512 * 1024) / SECTOR),
            (SECTORS - CLUSTER_SECTORS, SECTORS),
        ];
        let contents = Arc::new(Contents::new(seed, holes));
        write_base(&dir.path().join("base.raw"), &contents);
        let zero_based = Arc::new(Contents::new(seed, vec![(0, SECTORS)]));
        let base_server =
            NbdServer::qemu_nbd(&dir.path().join("base.raw"), &dir.path().join("base.sock"));
        Campaign {
            dir,
            seed,
            rng: XorShift::new(seed),
            contents: Arc::clone(&contents),
            raw_based: contents,
            zero_based,
            base_server,
            rt: qedstream_tests::runtime::two_workers(),
            counts: Arc::new(Counts::default()),
            totals: Totals::default(),
            cluster_sectors: CLUSTER_SECTORS,
            standalone: false,
            leaks_before: 0,
        }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A fresh `top.qed` with clusters of `cluster` bytes over `backing`.
    fn new_overlay(&mut self, backing: Backing, cluster: u64) {
        let _ = std::fs::remove_file(self.dir().join("top.qed"));
        let tables = if cluster == CLUSTER { 4 } else { 2 };
        let options = format!("cluster_size={cluster},table_size={tables}");
        let mut args = vec!["create", "-f", "qed", "-o", &options];
        let uri = self.base_server.uri();
        match backing {
            Backing::RawFile => args.extend(["-b", "base.raw", "-F", "raw", "top.qed"]),
            Backing::QemuNbd => args.extend(["-b", &uri, "-F", "raw", "top.qed"]),
            Backing::None => args.extend(["top.qed", "64M"]),
        }
        tools::ok(self.dir(), "qemu-img", &args);
        self.cluster_sectors = cluster / SECTOR;
        self.standalone = backing == Backing::None;
        self.contents = if self.standalone {
            Arc::clone(&self.zero_based)
        } else {
            Arc::clone(&self.raw_based)
        };
        self.leaks_before = 0;
        eprintln!(
            "epoch {}: {}K clusters over {backing:?}",
            self.totals.epochs + 1,
            cluster >> 10,
        );
    }

    /// `qedstream serve --stream [--rate RATE]` of `top.qed` on `nbd.sock`.
    fn serve(&self, rate: Option<&str>) -> Served {
        let nbd = format!("unix:{}", self.dir().join("nbd.sock").display());
        let mut args = vec!["--nbd", &nbd, "--stream"];
        if let Some(r) = rate {
            args.extend(["--rate", r]);
        }
        args.push("top.qed");
        Served::start(bin(), self.dir(), &args)
    }

    fn workload(&self, client: Client, model: &Arc<Mutex<CrashModel>>) -> Workload {
        Workload {
            client,
            model: Arc::clone(model),
            contents: Arc::clone(&self.contents),
            killed: Arc::new(AtomicBool::new(false)),
            counts: Arc::clone(&self.counts),
            cluster_sectors: self.cluster_sectors,
        }
    }

    /// Starts the writers and the reader on `uri`.
    fn spawn_tasks(
        &mut self,
        w: &Workload,
        until: Until,
    ) -> Vec<tokio::task::JoinHandle<Result<(), String>>> {
        let mut tasks = Vec::new();
        for _ in 0..WRITERS {
            let rng = XorShift::new(self.rng.next_u64());
            tasks.push(self.rt.spawn(writer(w.clone(), rng, until)));
        }
        let rng = XorShift::new(self.rng.next_u64());
        tasks.push(self.rt.spawn(reader(w.clone(), rng, until)));
        tasks
    }

    fn connect(&self, uri: &str) -> Client {
        let config = ClientConfig {
            // The server is killed: requests in flight must fail, never be sent again.
            reconnect_delay: Duration::ZERO,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Some(DEADLINE),
            ..ClientConfig::default()
        };
        let client = self
            .rt
            .block_on(Client::connect_str(uri, config))
            .unwrap_or_else(|e| panic!("seed {}: connecting to serve: {e}", self.seed));
        assert!(client.can_fua() && client.can_flush() && client.can_zero());
        client
    }

    /// One round: serve, write and read, SIGKILL at a random moment, then grade the image.
    /// Full speed only `late` in an epoch: a stream run to its end early would leave the
    /// epoch's other kills nothing to land in.
    fn crash_round(&mut self, model: &Arc<Mutex<CrashModel>>, late: bool) {
        if self.rng.one_in(8) {
            return self.startup_kill(model);
        }
        let rate = match self.rng.below(8) {
            0 if late => None,
            0..=2 => Some("2M"),
            3..=5 => Some("4M"),
            _ => Some("8M"),
        };
        let kill_after = Duration::from_millis(20 + self.rng.below(1200));
        let mut served = self.serve(rate);
        let w = self.workload(self.connect(&served.uri()), model);
        let tasks = self.spawn_tasks(&w, Until::Killed);
        std::thread::sleep(kill_after);
        w.killed.store(true, Ordering::SeqCst);
        let in_shutdown = self.rng.one_in(8);
        if in_shutdown {
            // SIGTERM, and SIGKILL while it stops (cancelling the stream, draining the
            // connections, flushing, closing the image).
            served.signal(libc::SIGTERM);
            std::thread::sleep(Duration::from_micros(self.rng.below(15_000)));
            self.totals.shutdown_kills += 1;
            if !served.running() {
                self.totals.stopped_before_kill += 1;
                assert_eq!(
                    served.wait(),
                    0,
                    "seed {}: serve's exit on SIGTERM",
                    self.seed
                );
                let features = qedstream_tests::features_on_disk(&self.dir().join("top.qed"));
                assert_eq!(
                    features & 2,
                    0,
                    "seed {}: NEED_CHECK after SIGTERM",
                    self.seed
                );
            }
        }
        served.kill();
        let seed = self.seed;
        self.rt.block_on(join_tasks(tasks, seed));
        let lines = served.pending();
        assert_no_job_failure(&lines, seed);
        self.totals.kills += 1;
        let mid_stream = !lines.iter().any(|l| l["event"] == "completed");
        self.totals.kills_mid_stream += u64::from(mid_stream);
        let leaks = self.grade_after_kill(model);
        self.standalone |= !mid_stream;
        eprintln!(
            "kill {}: rate {}, after {kill_after:?}{}, {}, leaks {leaks}",
            self.totals.kills,
            rate.unwrap_or("unlimited"),
            if in_shutdown { " and a SIGTERM" } else { "" },
            if mid_stream {
                "mid-stream"
            } else {
                "stream done"
            },
        );
    }

    /// A kill while serve starts (opening the image, repairing it when NEED_CHECK is set,
    /// starting the stream): up to 60 ms after it is started (it says ready after ~30 ms),
    /// then the image is graded.
    fn startup_kill(&mut self, model: &Arc<Mutex<CrashModel>>) {
        let after = Duration::from_micros(self.rng.below(60_000));
        let nbd = format!("unix:{}", self.dir().join("nbd.sock").display());
        let args = ["serve", "--nbd", &nbd, "--stream", "top.qed"];
        let mut cmd = tools::command_in(bin(), self.dir(), &args);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = tools::spawn(&mut cmd).expect("starting qedstream serve");
        std::thread::sleep(after);
        let early = child.try_wait().expect("waiting for serve");
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(early, None, "seed {}: serve exited by itself", self.seed);
        self.totals.kills += 1;
        self.totals.startup_kills += 1;
        let leaks = self.grade_after_kill(model);
        eprintln!(
            "kill {}: at start-up, after {after:?}, leaks {leaks}",
            self.totals.kills
        );
    }

    /// `qemu-img check` (no corruption), then the whole disk against the model; the leaks
    /// the check found.
    fn grade_after_kill(&mut self, model: &Arc<Mutex<CrashModel>>) -> u64 {
        let leaks = self.check_no_corruption();
        if leaks > 0 {
            self.totals.checks_with_leaks += 1;
            self.totals.most_leaks = self.totals.most_leaks.max(leaks);
        }
        self.check_new_leaks_are_marked();
        let image = self.read_back();
        let mut model = model.lock();
        let report = model.verify(&self.contents, &image);
        if !report.mismatches.is_empty() {
            let first: Vec<_> = report.mismatches.iter().take(8).collect();
            panic!(
                "seed {}, kill {}: {} sectors hold what they may not (QEDSTREAM_CRASH_SEED={} \
                 replays); the first: {first:#?}",
                self.seed,
                self.totals.kills,
                report.mismatches.len(),
                self.seed
            );
        }
        self.totals.in_flight_sectors += report.in_flight_sectors;
        self.totals.in_flight_landed += report.in_flight_landed;
        self.totals.acknowledged_not_found += report.acknowledged_not_found;
        model.restart_from(&report.found);
        leaks
    }

    /// A kill that left new leaks in an image that had no backing when the round started
    /// must have left it marked NEED_CHECK, so that the next read-write open repairs it
    /// (with a backing, neither QEMU nor we set the bit: leaks are then allowed unmarked).
    /// Leaks are counted by `qedstream check`, which counts clusters exactly (QEMU's check
    /// reports spurious leaks on 4K-cluster files past 16 MiB).
    fn check_new_leaks_are_marked(&mut self) {
        let out = tools::run_with_deadline(&mut tools::command_in(
            bin(),
            self.dir(),
            &["check", "--output=json", "top.qed"],
        ));
        let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("qedstream check printed no JSON ({e}): {out:?}");
        });
        let leaks = json.get("leaks").and_then(Value::as_u64).unwrap_or(0);
        let need_check = qedstream_tests::features_on_disk(&self.dir().join("top.qed")) & 2 != 0;
        if self.standalone && leaks > self.leaks_before {
            assert!(
                need_check,
                "seed {}, kill {}: {} new leaked clusters in an image without a backing, and \
                 NEED_CHECK is clear: {json}",
                self.seed,
                self.totals.kills,
                leaks - self.leaks_before
            );
            self.totals.marked_new_leaks += 1;
        }
        self.leaks_before = leaks;
    }

    /// `qemu-img check -f qed top.qed`: exit 0, or 3 with leaks only; returns the leaks.
    fn check_no_corruption(&self) -> u64 {
        let out = tools::run_with_deadline(&mut tools::command_in(
            "qemu-img",
            self.dir(),
            &["check", "-f", "qed", "--output=json", "top.qed"],
        ));
        let code = out.status.code().unwrap_or(-1);
        let json: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let count = |k: &str| json.get(k).and_then(Value::as_u64).unwrap_or(0);
        assert!(
            (code == 0 || code == 3) && count("corruptions") == 0 && count("check-errors") == 0,
            "seed {}, after kill {}: qemu-img check exited {code}: {json:#} {}",
            self.seed,
            self.totals.kills,
            String::from_utf8_lossy(&out.stderr)
        );
        count("leaks")
    }

    /// The whole disk as QEMU reads it through the backing (`qemu-img convert -O raw`).
    fn read_back(&self) -> Vec<u8> {
        let flat = self.dir().join("flat.raw");
        let _ = std::fs::remove_file(&flat);
        let out = tools::run_with_deadline(&mut tools::command_in(
            "qemu-img",
            self.dir(),
            &["convert", "-f", "qed", "-O", "raw", "top.qed", "flat.raw"],
        ));
        assert!(
            out.status.success(),
            "seed {}: qemu-img convert: {}",
            self.seed,
            String::from_utf8_lossy(&out.stderr)
        );
        let bytes = std::fs::read(&flat).expect("reading qemu-img convert's output");
        assert_eq!(bytes.len() as u64, DISK);
        bytes
    }

    /// The epoch's last round: the stream runs to completion under the client's writes and
    /// reads, SIGTERM stops the server clean, and the image stands alone, equal to the model.
    fn finish_epoch(&mut self, model: &Arc<Mutex<CrashModel>>) {
        let mut served = self.serve(None);
        let w = self.workload(self.connect(&served.uri()), model);
        let tasks = self.spawn_tasks(&w, Until::Ops(FINAL_OPS));
        let seed = self.seed;
        self.rt.block_on(join_tasks(tasks, seed));
        wait_for_completion(&mut served, seed);
        assert_eq!(
            served.terminate(),
            0,
            "seed {seed}: serve's exit after SIGTERM"
        );
        let info = tools::ok(
            self.dir(),
            "qemu-img",
            &["info", "--output=json", "top.qed"],
        );
        let info: Value = serde_json::from_str(&info).expect("qemu-img info JSON");
        assert!(
            info.get("backing-filename").is_none(),
            "seed {seed}: the stream completed but the backing link is still there: {info:#}"
        );
        let features = qedstream_tests::features_on_disk(&self.dir().join("top.qed"));
        assert_eq!(
            features & 2,
            0,
            "seed {seed}: NEED_CHECK left set after SIGTERM"
        );
        self.totals.final_leaks += self.check_no_corruption();
        let image = self.read_back();
        let expected = model.lock().expected_image(&self.contents);
        assert_same_disk(&image, &expected, &self.contents, seed);
        self.totals.epochs += 1;
    }
}

/// A job event that says the stream failed fails the test.
fn assert_no_job_failure(lines: &[Value], seed: u64) {
    for l in lines {
        assert!(
            l["event"] != "failed" && l["event"] != "error",
            "seed {seed}: the stream reported {l}"
        );
    }
}

/// Reads serve's lines up to the stream's completion (a failure fails the test).
fn wait_for_completion(served: &mut Served, seed: u64) {
    loop {
        let l = served.next_line();
        assert_no_job_failure(std::slice::from_ref(&l), seed);
        if l["event"] == "completed" {
            assert_eq!(l["unlinked"], true, "seed {seed}: {l}");
            return;
        }
    }
}

/// The disk equals the expected bytes, sector for sector (the first difference named by
/// the versions it holds and should hold).
fn assert_same_disk(image: &[u8], expected: &[u8], contents: &Contents, seed: u64) {
    assert_eq!(image.len(), expected.len());
    let s = SECTOR as usize;
    let differing = image
        .chunks(s)
        .zip(expected.chunks(s))
        .position(|(a, b)| a != b);
    if let Some(i) = differing {
        let n = image
            .chunks(s)
            .zip(expected.chunks(s))
            .filter(|(a, b)| a != b)
            .count();
        let sector = i as u64;
        panic!(
            "seed {seed}: after a clean stop {n} sectors differ from the model; the first, \
             sector {sector}, holds {:?} instead of {:?}",
            contents.identify(sector, &image[i * s..][..s]),
            contents.identify(sector, &expected[i * s..][..s]),
        );
    }
}

/// Writes the base: the contents' base version everywhere but its holes, which stay holes.
fn write_base(path: &Path, contents: &Contents) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::create(path).expect("creating base.raw");
    file.set_len(DISK).expect("sizing base.raw");
    for first in (0..SECTORS).step_by(CLUSTER_SECTORS as usize) {
        // The holes are whole clusters.
        if contents.base_is_hole(first) {
            continue;
        }
        let bytes = contents.run(Version::Base, first, CLUSTER_SECTORS);
        file.write_all_at(&bytes, first * SECTOR)
            .expect("writing base.raw");
    }
}

/// The campaign: `QEDSTREAM_CRASH_ROUNDS` kills (default 12) in epochs of four (ten in long runs), over
/// each backing in turn; one summary line at the end.
#[test]
fn served_disk_survives_sigkill_at_random_moments() {
    let started = Instant::now();
    let seed = std::env::var("QEDSTREAM_CRASH_SEED")
        .map(|_| env_number("QEDSTREAM_CRASH_SEED", 0))
        .unwrap_or_else(|_| fresh_seed());
    let kills = env_number("QEDSTREAM_CRASH_ROUNDS", DEFAULT_KILLS);
    eprintln!("crash campaign: seed {seed} (QEDSTREAM_CRASH_SEED={seed} replays), {kills} kills");
    // Short runs: epochs of four kills, so that the default run covers three of the kinds.
    let per_epoch = if kills >= 3 * KILLS_PER_EPOCH {
        KILLS_PER_EPOCH
    } else {
        4
    };
    let mut c = Campaign::new(seed);
    let mut left = kills;
    let mut epoch = 0;
    while left > 0 || epoch == 0 {
        let (backing, cluster) = EPOCHS[epoch % EPOCHS.len()];
        c.new_overlay(backing, cluster);
        let model = Arc::new(Mutex::new(CrashModel::new(SECTORS)));
        let rounds = per_epoch.min(left);
        for round in 0..rounds {
            c.crash_round(&model, round >= rounds / 2);
        }
        left -= rounds;
        c.finish_epoch(&model);
        epoch += 1;
    }
    let t = &c.totals;
    let n = &c.counts;
    println!(
        "crash campaign: seed {seed}, {} epochs, {} kills ({} mid-stream, {} at start-up, {} \
         after a SIGTERM of which {} once serve had exited), writes acknowledged {} FUA + {} \
         plain + {} zeroes, {} flushes, {} reads checked, {} writes in flight at kills ({} of \
         their {} sectors landed), {} acknowledged unflushed sectors not found, leaks in {} \
         of {} checks after kills (at most {} clusters; {} left at the epochs' ends; {} kills \
         leaking anew in a standalone image, each marked NEED_CHECK), {:.1} s",
        t.epochs,
        t.kills,
        t.kills_mid_stream,
        t.startup_kills,
        t.shutdown_kills,
        t.stopped_before_kill,
        Counts::get(&n.fua),
        Counts::get(&n.plain),
        Counts::get(&n.zeroes),
        Counts::get(&n.flushes),
        Counts::get(&n.reads),
        Counts::get(&n.in_flight_at_kill),
        t.in_flight_landed,
        t.in_flight_sectors,
        t.acknowledged_not_found,
        t.checks_with_leaks,
        t.kills,
        t.most_leaks,
        t.final_leaks,
        t.marked_new_leaks,
        started.elapsed().as_secs_f64()
    );
}
