//! Support for the cargo-fuzz target `control_json` (feature `fuzzing`; not part of the
//! stable API): any bytes, played as one QMP client's whole session against a [`Control`]
//! of a copy-on-read device on an in-memory QED image (1 MiB, 4 KiB clusters, tables of 2) over an
//! in-memory backing, so `block-stream`, the job commands and `x-block-stream-step` really
//! run. The first byte picks the size of each read (the client's bytes arrive in pieces);
//! the rest is what the client sends, then EOF.
//!
//! After the session, a job still running is cancelled and awaited, and then every line
//! the server sent must be one JSON object (the greeting first, then replies and events)
//! and the image must check clean: whatever a client says, the image stays consistent.

use std::sync::Arc;
use std::time::Duration;

use copy_on_read::{BlockDevice, CorDevice, Populate};
use nbd_server::fuzzing::script::{Duplex, Script, Sink};
use nbd_server::fuzzing::MemDevice;
use qed::{BackingFormat, CreateOptions, Image, MemStorage, OpenOptions, Repair};
use serde_json::Value;

use super::{socket::serve_client, Control, Node};
use crate::stream::StreamOptions;

/// How long a session (and the end of its job) may take before it counts as hung: the
/// client's bytes are in memory and end in EOF, and the device is in memory. This catches a
/// session that waits forever; one that spins without ever waiting never lets the timer run,
/// and is caught by the fuzzer's own `-timeout` (or a test's guard on another thread).
pub const SESSION_LIMIT: Duration = Duration::from_secs(10);
/// Read sizes the first byte picks from.
const PIECES: [usize; 8] = [1, 2, 3, 7, 16, 64, 4096, usize::MAX];
/// The most of the server's output kept for the check (more is only counted).
const KEPT: usize = 8 << 20;

/// What no session may end in besides a panic.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SessionFailure {
    /// The session, or the end of its job, did not finish within [`SESSION_LIMIT`].
    #[error("the session hung: no end within {0:?}")]
    Hung(Duration),
    /// The server sent something that is not a QMP message.
    #[error("the server sent a bad line: {0}")]
    BadOutput(String),
    /// The image did not check clean afterwards.
    #[error("the image is damaged after the session: {0}")]
    ImageDamaged(String),
}

/// What a session did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Session {
    /// `return` replies.
    pub returns: usize,
    /// `error` replies.
    pub errors: usize,
    /// Events.
    pub events: usize,
    /// Bytes the server sent.
    pub sent: usize,
}

/// A control of a copy-on-read device on an in-memory image over a [`MemDevice`].
fn memory_node() -> (Control, Arc<CorDevice>) {
    let storage = MemStorage::new();
    let options = CreateOptions {
        cluster_size: 4096,
        table_size: 2,
        backing: Some(("memory".into(), BackingFormat::Raw)),
        ..CreateOptions::new(1 << 20)
    };
    Image::create(&storage, &options).expect("creating an image in memory");
    let image =
        Image::open(Box::new(storage), OpenOptions::default()).expect("opening an image in memory");
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::default());
    let dev = Arc::new(CorDevice::new(image, "memory.qed".into(), Some(backing)));
    let node = Node {
        node_name: "disk".into(),
        export_name: "export".into(),
        file: "memory.qed".into(),
        format: "qed".into(),
        read_only: false,
        device: Arc::clone(&dev) as Arc<dyn BlockDevice>,
        populate: Some(Arc::clone(&dev) as Arc<dyn Populate>),
    };
    (Control::new(node, StreamOptions::default()), dev)
}

/// Serves one QMP client on `stream` against a fresh control of an in-memory device (the
/// target's), until the client hangs up or is disconnected; a job left running is then
/// cancelled and awaited. For tests that need a stream of their own (an endless one).
pub async fn serve_memory_client<S>(stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (control, dev) = memory_node();
    let (_open, closing) = tokio::sync::watch::channel(false);
    serve_client(control.clone(), stream, closing).await;
    end_job(&control).await;
    dev.settle_copy_ins().await;
}

/// Plays `input` (piece-size byte, then the client's bytes) as one QMP session and checks
/// what the server sent and the image. Never panics; `Err` is a bug the fuzzer reports.
pub fn replay_qmp_bytes(input: &[u8]) -> Result<Session, SessionFailure> {
    let (&selector, client) = input.split_first().unwrap_or((&0, &[]));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let (control, dev) = rt.block_on(async { memory_node() });
    let sink = Sink::new(KEPT);
    let stream = Duplex {
        script: Script::new(client, PIECES[usize::from(selector & 7)]),
        sink: sink.clone(),
    };
    let (_open, closing) = tokio::sync::watch::channel(false);
    let session = async {
        serve_client(control.clone(), stream, closing).await;
        end_job(&control).await;
        dev.settle_copy_ins().await;
    };
    rt.block_on(async { tokio::time::timeout(SESSION_LIMIT, session).await })
        .map_err(|_| SessionFailure::Hung(SESSION_LIMIT))?;
    let sent = sink.take();
    let mut seen = check_output(&sent.bytes).map_err(SessionFailure::BadOutput)?;
    seen.sent = sent.total;
    let report = dev
        .image()
        .check(Repair::None)
        .map_err(|e| SessionFailure::ImageDamaged(e.to_string()))?;
    if report.corruptions != 0 || report.leaks != 0 {
        return Err(SessionFailure::ImageDamaged(format!("{report:?}")));
    }
    Ok(seen)
}

/// Cancels the job left running, if any, and waits until it is gone.
async fn end_job(control: &Control) {
    if let Some((_, job)) = control.job() {
        job.cancel();
    }
    while control.job().is_some() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Every line one JSON object: the greeting, then replies and events. A last line cut short
/// (the output was bounded) is not checked.
fn check_output(sent: &[u8]) -> Result<Session, String> {
    let mut seen = Session::default();
    let lines: Vec<&[u8]> = sent.split(|&b| b == b'\n').collect();
    let complete = &lines[..lines.len() - 1];
    for (i, line) in complete.iter().enumerate() {
        let text = line.strip_suffix(b"\r").ok_or("a line without CR LF")?;
        let v: Value = serde_json::from_slice(text).map_err(|e| format!("line {i}: {e}"))?;
        let key = v
            .as_object()
            .filter(|o| o.len() <= 3)
            .and_then(|o| {
                o.keys()
                    .find(|k| *k != "id" && *k != "timestamp" && *k != "data")
            })
            .ok_or_else(|| format!("line {i}: not a QMP message: {v}"))?;
        match (i, key.as_str()) {
            (0, "QMP") => {}
            (0, _) | (_, "QMP") => return Err(format!("line {i}: greeting out of place: {v}")),
            (_, "return") => seen.returns += 1,
            (_, "error") => seen.errors += 1,
            (_, "event") => seen.events += 1,
            _ => return Err(format!("line {i}: not a QMP message: {v}")),
        }
    }
    if sent.len() < KEPT && lines.last().is_some_and(|l| !l.is_empty()) {
        return Err("output ends inside a line".into());
    }
    Ok(seen)
}
