//! The job model around a stream: what a job does when a range fails ([`OnError`]), the state
//! of its I/O ([`IoStatus`]), and the events it reports ([`JobEvent`], received through
//! [`JobEvents`]).
//!
//! The vocabulary is QEMU's block-job vocabulary (`qapi/block-core.json`, `qapi/job.json`):
//! `on-error` is `report`, `stop` or `ignore`, `io-status` is `ok`, `failed` or `nospace`, and
//! every error a policy handles is reported as one [`JobEvent::Error`] (QEMU's
//! `BLOCK_JOB_ERROR`). The QMP layer ([`crate::control`]) only translates these into JSON.
//!
//! Events are a subscription on the job's handle ([`crate::stream::StreamHandle::subscribe`]):
//! every subscriber sees every event sent after it subscribed. A subscriber that falls more
//! than [`EVENT_BACKLOG`] events behind loses the oldest ones (and is told how many), so a
//! slow reader never holds up the job or grows memory without bound.

use serde::Serialize;
use tokio::sync::broadcast;

use crate::stream::{JobState, Progress};

/// Events a subscriber may fall behind by before it loses the oldest.
pub const EVENT_BACKLOG: usize = 1024;

/// What a job does when copying a range fails for good (after the retries that ride out a
/// short backing outage), as block-stream's `on-error`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// The job fails with the error; the backing link stays (the default).
    #[default]
    Report,
    /// The job pauses (I/O status `nospace` when the image's file system is full, `failed`
    /// otherwise); a resume retries the range.
    Stop,
    /// The range is skipped and reported; the job goes on, and at the end keeps the backing
    /// link (the skipped ranges still come from it).
    Ignore,
}

impl OnError {
    /// QEMU's name: `report`, `stop` or `ignore`.
    pub fn as_str(self) -> &'static str {
        match self {
            OnError::Report => "report",
            OnError::Stop => "stop",
            OnError::Ignore => "ignore",
        }
    }
}

impl std::str::FromStr for OnError {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<OnError, UnknownPolicy> {
        match s {
            "report" => Ok(OnError::Report),
            "stop" => Ok(OnError::Stop),
            "ignore" => Ok(OnError::Ignore),
            other => Err(UnknownPolicy(other.to_string())),
        }
    }
}

/// An `on-error` value that is not `report`, `stop` or `ignore`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("on-error {0:?} is not one of report, stop, ignore")]
pub struct UnknownPolicy(pub String);

/// The state of a job's I/O, as QEMU's `io-status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IoStatus {
    /// No error (or the last one was retried).
    #[default]
    Ok,
    /// A range failed and the job stopped on it.
    Failed,
    /// A range failed for lack of space and the job stopped on it.
    Nospace,
}

impl IoStatus {
    /// QEMU's name: `ok`, `failed` or `nospace`.
    pub fn as_str(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::Nospace => "nospace",
        }
    }
}

/// A range whose copy failed, and what the job did about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RangeError {
    /// First byte of the range.
    pub offset: u64,
    /// Its length.
    pub length: u64,
    /// What the job did (the job's [`OnError`]).
    pub action: OnError,
    /// Whether the failure was the backing's (a read) rather than the image's (a write); QEMU's
    /// `operation`. A copy reads the backing and writes the image; we cannot always tell which
    /// side failed, so a failure is a read unless it was a local write.
    pub operation: Operation,
    /// Why, in a sentence.
    pub reason: String,
    /// The image ran out of space.
    pub nospace: bool,
}

/// The side of a copy that failed, QEMU's `IoOperationType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Reading the backing.
    Read,
    /// Writing the image.
    Write,
}

impl Operation {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Write => "write",
        }
    }
}

/// What a job reports, in the order it happens.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum JobEvent {
    /// The job's state changed (running, paused, ...).
    State(JobState),
    /// A range failed for good and the job's [`OnError`] policy acted on it.
    Error(RangeError),
    /// Everything is local; the link was dropped unless kept or ranges were ignored.
    Completed {
        /// The last progress.
        progress: Progress,
        /// Whether the backing link was dropped.
        unlinked: bool,
        /// Ranges skipped under [`OnError::Ignore`].
        ignored: Vec<(u64, u64)>,
    },
    /// The job was cancelled; the link stays.
    Cancelled {
        /// The last progress.
        progress: Progress,
    },
    /// The job failed; the link stays.
    Failed {
        /// The last progress.
        progress: Progress,
        /// Why.
        error: String,
    },
}

impl JobEvent {
    /// Whether this is the job's last event.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            JobEvent::Completed { .. } | JobEvent::Cancelled { .. } | JobEvent::Failed { .. }
        )
    }
}

/// A subscription to a job's events (see the module documentation).
#[derive(Debug)]
pub struct JobEvents {
    rx: broadcast::Receiver<JobEvent>,
}

/// What [`JobEvents::recv`] got.
#[derive(Clone, Debug, PartialEq)]
pub enum Received {
    /// The next event.
    Event(JobEvent),
    /// This many events were lost (the subscriber fell behind); the next ones follow.
    Lost(u64),
    /// The job is gone and every event was received.
    End,
}

impl JobEvents {
    pub(crate) fn new(rx: broadcast::Receiver<JobEvent>) -> JobEvents {
        JobEvents { rx }
    }

    /// Waits for the next event.
    pub async fn recv(&mut self) -> Received {
        match self.rx.recv().await {
            Ok(e) => Received::Event(e),
            Err(broadcast::error::RecvError::Lagged(n)) => Received::Lost(n),
            Err(broadcast::error::RecvError::Closed) => Received::End,
        }
    }

    /// The next event if one is waiting, without waiting.
    pub fn try_recv(&mut self) -> Option<Received> {
        match self.rx.try_recv() {
            Ok(e) => Some(Received::Event(e)),
            Err(broadcast::error::TryRecvError::Lagged(n)) => Some(Received::Lost(n)),
            Err(broadcast::error::TryRecvError::Closed) => Some(Received::End),
            Err(broadcast::error::TryRecvError::Empty) => None,
        }
    }
}

/// The sending side, kept by the job.
#[derive(Debug)]
pub(crate) struct EventSender {
    tx: broadcast::Sender<JobEvent>,
}

impl EventSender {
    pub(crate) fn new() -> EventSender {
        EventSender {
            tx: broadcast::channel(EVENT_BACKLOG).0,
        }
    }

    pub(crate) fn send(&self, e: JobEvent) {
        // No subscriber is fine: nobody is listening.
        let _ = self.tx.send(e);
    }

    pub(crate) fn subscribe(&self) -> JobEvents {
        JobEvents::new(self.tx.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_by_qemu_name() {
        for p in [OnError::Report, OnError::Stop, OnError::Ignore] {
            assert_eq!(p.as_str().parse::<OnError>(), Ok(p));
        }
        assert_eq!(
            "enospc".parse::<OnError>().unwrap_err().to_string(),
            "on-error \"enospc\" is not one of report, stop, ignore"
        );
    }
}
