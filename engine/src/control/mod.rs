//! The control plane of a served image: one block node, the stream job on it, and a QMP server
//! that drives both in QEMU's block-job vocabulary.
//!
//! [`Control`] owns the [`Node`] (the copy-on-read device, its node name and export name) and
//! at most one stream job on it (QEMU allows one job per node too). Jobs are started with
//! [`Control::start_stream`] (or QMP `block-stream`), and every job event is both offered to
//! the embedder ([`Control::subscribe`]) and sent, in QEMU's shape, to every QMP client.
//! Finished jobs are dismissed at once, as QEMU's default `auto-dismiss: true` does.
//!
//! [`Control::listen`] serves QMP on a unix socket ([`socket`]); several clients may be
//! connected at once (qemu-storage-daemon allows one). Each gets the greeting
//! `{"QMP": {"version": {...}, "capabilities": []}}` and must send `qmp_capabilities` before
//! anything else (other commands fail with `CommandNotFound`, as in QEMU).
//!
//! Commands ([`commands`]): `qmp_capabilities`, `query-version`, `query-commands`,
//! `query-block`, `query-named-block-nodes`, `query-block-jobs`, `block-stream` (`device` is
//! the node name or the export name; `job-id`, `speed`, `on-error`), `block-job-set-speed`
//! (`speed: 0` is unlimited), `block-job-pause`, `block-job-resume`, `block-job-cancel` (a
//! paused job cancels without `force`), `quit`. Events: `JOB_STATUS_CHANGE`,
//! `BLOCK_JOB_ERROR` (with `nospace`, as QEMU's `BLOCK_IO_ERROR` has it: QEMU's
//! `BLOCK_JOB_ERROR` carries only `device`, `operation` and `action`, and tells a full disk
//! only by the job's `io-status: nospace`), `BLOCK_JOB_COMPLETED` (with `error` when the job
//! failed) and
//! `BLOCK_JOB_CANCELLED`, and `SHUTDOWN` after `quit`, each with QEMU's `timestamp`.
//!
//! Extensions, named with QEMU's `x-` prefix for things QEMU does not have:
//!
//! - `x-block-stream-step` `{"device", "offset"?, "length"?}` → `{"next": N}` or
//!   `{"done": true}`: copies one unit (default 1 MiB) from the first range at or after
//!   `offset` that still needs it, as `qedstream stream --step` does (the seed's "sector
//!   mode"); works with or without a running job.
//! - `x-backing-state` `{"device"?}` → `{"state": "connected"|"reconnecting"|"failed"|"none",
//!   "uri": ...}`: the link to an NBD backing.
//! - `x-backing-repoint` `{"device"?, "uri"}` → `{}`: points the NBD backing at another server
//!   exporting the same data (same size, else an error and nothing changed); works on a paused
//!   job, and requests waiting on the old server go to the new one. The image header is not
//!   rewritten (see `copy_on_read::nbd`).
//! - `BLOCK_JOB_COMPLETED` carries `x-ignored`: the `[offset, length]` ranges skipped under
//!   `on-error: ignore` (the link stays when there are any).
//!
//! Errors are `{"error": {"class": "GenericError", "desc": ...}}` (`CommandNotFound` and
//! `DeviceNotActive` where QEMU uses them), and a command's `id` is echoed. Input is bounded:
//! an object larger than [`socket::MAX_INPUT`] gets an error and the client is disconnected;
//! text that is not JSON gets an error and is discarded.

pub mod commands;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod socket;

use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

use copy_on_read::{BlockDevice, Populate, Reconnect};

use crate::job::{JobEvent, JobEvents, OnError, Received};
use crate::stream::{JobState, StreamHandle, StreamJob, StreamOptions};

pub use socket::ControlSocket;

/// The block node a [`Control`] drives.
#[derive(Clone, Debug)]
pub struct Node {
    /// The node name (`query-named-block-nodes`' `node-name`).
    pub node_name: String,
    /// The NBD export name it is served as (may be empty).
    pub export_name: String,
    /// The image file.
    pub file: String,
    /// Its format: `qed` or `raw`.
    pub format: String,
    /// Opened read-only.
    pub read_only: bool,
    /// The device.
    pub device: Arc<dyn BlockDevice>,
    /// The same device, if it can be streamed (a QED image; not a raw file).
    pub populate: Option<Arc<dyn Populate>>,
}

impl Node {
    /// Whether `name` names this node (its node name, or its export name).
    pub fn is_named(&self, name: &str) -> bool {
        name == self.node_name || name == self.export_name
    }

    /// The link to an NBD backing, if the node has one.
    pub fn backing_link(&self) -> Option<Arc<dyn Reconnect>> {
        self.device.reconnect()
    }
}

/// Why a control request was refused. `class` is QMP's error class.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct ControlError {
    /// QMP's error class: `GenericError`, `CommandNotFound` or `DeviceNotActive`.
    pub class: &'static str,
    /// What is wrong, in a sentence.
    pub desc: String,
}

impl ControlError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> ControlError {
        ControlError {
            class: "GenericError",
            desc: desc.into(),
        }
    }

    /// No job named `id`.
    fn no_job(id: &str) -> ControlError {
        ControlError {
            class: "DeviceNotActive",
            desc: format!("Block job '{id}' not found"),
        }
    }

    /// The QMP error object.
    pub fn to_json(&self) -> Value {
        json!({"class": self.class, "desc": self.desc})
    }
}

/// A job event, with the job it belongs to.
#[derive(Clone, Debug, PartialEq)]
pub struct ControlEvent {
    /// The job id.
    pub job_id: String,
    /// What happened.
    pub event: JobEvent,
}

/// What starts a stream.
#[derive(Clone, Debug, Default)]
pub struct StreamRequest {
    /// The job id (default: the node name).
    pub job_id: Option<String>,
    /// Bytes per second (0: unlimited).
    pub speed: u64,
    /// The error policy.
    pub on_error: OnError,
}

/// The job on the node.
#[derive(Debug, Clone)]
struct ActiveJob {
    id: String,
    handle: StreamHandle,
}

#[derive(Debug)]
struct Inner {
    node: Node,
    defaults: StreamOptions,
    job: Mutex<Option<ActiveJob>>,
    /// Job events, to the embedder.
    events: broadcast::Sender<ControlEvent>,
    /// QMP events, to every client.
    qmp_events: broadcast::Sender<Value>,
    quit: watch::Sender<bool>,
}

/// The control plane of one node (see the module documentation); cheap to clone.
#[derive(Debug, Clone)]
pub struct Control {
    inner: Arc<Inner>,
}

/// A subscription to a [`Control`]'s job events.
#[derive(Debug)]
pub struct ControlEvents {
    rx: broadcast::Receiver<ControlEvent>,
}

impl ControlEvents {
    /// The next event; `None` once the control is gone. Events a slow subscriber missed are
    /// skipped (with a warning in the log).
    pub async fn recv(&mut self) -> Option<ControlEvent> {
        loop {
            match self.rx.recv().await {
                Ok(e) => return Some(e),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(lost = n, "a control subscriber fell behind");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl Control {
    /// A control plane for `node`; jobs take `defaults` for what a request does not say.
    pub fn new(node: Node, defaults: StreamOptions) -> Control {
        Control {
            inner: Arc::new(Inner {
                node,
                defaults,
                job: Mutex::new(None),
                events: broadcast::channel(crate::job::EVENT_BACKLOG).0,
                qmp_events: broadcast::channel(crate::job::EVENT_BACKLOG).0,
                quit: watch::channel(false).0,
            }),
        }
    }

    /// The node.
    pub fn node(&self) -> &Node {
        &self.inner.node
    }

    /// Job events from now on.
    pub fn subscribe(&self) -> ControlEvents {
        ControlEvents {
            rx: self.inner.events.subscribe(),
        }
    }

    fn subscribe_qmp(&self) -> broadcast::Receiver<Value> {
        self.inner.qmp_events.subscribe()
    }

    /// Serves QMP on a new unix socket at `path` (see [`socket`]).
    pub async fn listen(&self, path: &std::path::Path) -> crate::Result<ControlSocket> {
        ControlSocket::bind(self.clone(), path).await
    }

    /// Asks whoever runs the control to end (QMP `quit`; clients hear QEMU's `SHUTDOWN`).
    pub fn request_quit(&self) {
        self.emit(
            "SHUTDOWN",
            json!({"guest": false, "reason": "host-qmp-quit"}),
        );
        self.inner.quit.send_replace(true);
    }

    /// Resolves once [`Control::request_quit`] was called.
    pub async fn quit_requested(&self) {
        let mut rx = self.inner.quit.subscribe();
        // The sender lives in `self`, so `wait_for` ends only on a quit.
        let _ = rx.wait_for(|q| *q).await;
    }

    /// The running job, if any.
    pub fn job(&self) -> Option<(String, StreamHandle)> {
        self.inner
            .job
            .lock()
            .as_ref()
            .map(|j| (j.id.clone(), j.handle.clone()))
    }

    /// The job named `id`.
    fn job_named(&self, id: &str) -> Result<StreamHandle, ControlError> {
        match &*self.inner.job.lock() {
            Some(j) if j.id == id => Ok(j.handle.clone()),
            _ => Err(ControlError::no_job(id)),
        }
    }

    /// Starts streaming the node (on the current tokio runtime); returns the job id.
    pub fn start_stream(&self, request: StreamRequest) -> Result<String, ControlError> {
        let node = &self.inner.node;
        let Some(dev) = node.populate.clone() else {
            return Err(ControlError::generic(format!(
                "'{}' is a {} image: it has no backing to stream from",
                node.node_name, node.format
            )));
        };
        if node.read_only {
            return Err(ControlError::generic(format!(
                "'{}' is opened read-only: streaming writes the image",
                node.node_name
            )));
        }
        let id = request.job_id.unwrap_or_else(|| node.node_name.clone());
        if id.is_empty() || id.len() > 128 || id.chars().any(char::is_control) {
            return Err(ControlError::generic(
                "Invalid job ID: it must be 1 to 128 printable characters",
            ));
        }
        let mut slot = self.inner.job.lock();
        if let Some(j) = &*slot {
            return Err(ControlError::generic(format!(
                "Node '{}' is busy: block device is in use by block job: {}",
                node.node_name, j.id
            )));
        }
        let options = StreamOptions {
            rate: std::num::NonZeroU64::new(request.speed),
            on_error: request.on_error,
            ..self.inner.defaults.clone()
        };
        let (job, events) = StreamJob::start_watched(dev, options);
        let handle = job.handle();
        *slot = Some(ActiveJob {
            id: id.clone(),
            handle: handle.clone(),
        });
        self.emit_status(&id, "created");
        self.emit_status(&id, "running");
        tokio::spawn(self.clone().follow(id.clone(), events, job));
        Ok(id)
    }

    /// Forwards a job's events until it ends, then dismisses it.
    async fn follow(self, id: String, mut events: JobEvents, job: StreamJob) {
        loop {
            let event = match events.recv().await {
                Received::Event(e) => e,
                Received::Lost(n) => {
                    tracing::warn!(lost = n, "job events lost");
                    continue;
                }
                Received::End => break,
            };
            let last = event.is_final();
            if last {
                // Dismissed before anyone hears of the end: a client that reacts to the event
                // can start the next job at once.
                let mut slot = self.inner.job.lock();
                if slot.as_ref().is_some_and(|j| j.id == id) {
                    *slot = None;
                }
            }
            self.emit_job_event(&id, &event);
            let _ = self.inner.events.send(ControlEvent {
                job_id: id.clone(),
                event,
            });
            if last {
                break;
            }
        }
        // The outcome was reported through the events.
        let _ = job.wait().await;
    }

    /// Sends a QMP event to every client.
    fn emit(&self, name: &str, data: Value) {
        let _ = self.inner.qmp_events.send(commands::event(name, data));
    }

    fn emit_status(&self, id: &str, status: &str) {
        self.emit("JOB_STATUS_CHANGE", json!({"id": id, "status": status}));
    }

    /// The QMP events for one job event.
    fn emit_job_event(&self, id: &str, event: &JobEvent) {
        let job_data = |p: &crate::stream::Progress| {
            json!({
                "type": "stream",
                "device": id,
                "len": p.total,
                "offset": p.offset,
                "speed": p.rate_limit,
            })
        };
        match event {
            JobEvent::State(JobState::Paused) => self.emit_status(id, "paused"),
            JobEvent::State(JobState::Running) => self.emit_status(id, "running"),
            JobEvent::State(_) => {}
            JobEvent::Error(e) => self.emit(
                "BLOCK_JOB_ERROR",
                json!({"device": id, "operation": e.operation.as_str(),
                    "action": e.action.as_str(), "nospace": e.nospace}),
            ),
            JobEvent::Completed {
                progress, ignored, ..
            } => {
                for s in ["waiting", "pending", "concluded", "null"] {
                    self.emit_status(id, s);
                }
                let mut data = job_data(progress);
                data["x-ignored"] = json!(ignored.iter().map(|r| [r.0, r.1]).collect::<Vec<_>>());
                self.emit("BLOCK_JOB_COMPLETED", data);
            }
            JobEvent::Failed { progress, error } => {
                for s in ["aborting", "concluded", "null"] {
                    self.emit_status(id, s);
                }
                let mut data = job_data(progress);
                data["error"] = json!(error);
                self.emit("BLOCK_JOB_COMPLETED", data);
            }
            JobEvent::Cancelled { progress } => {
                for s in ["aborting", "concluded", "null"] {
                    self.emit_status(id, s);
                }
                self.emit("BLOCK_JOB_CANCELLED", job_data(progress));
            }
        }
    }
}
