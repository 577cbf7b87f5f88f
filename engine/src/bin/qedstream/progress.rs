//! How `qedstream stream` shows a job: a progress bar on a terminal, or one JSON object per
//! line (`--output=json`), and the command's whole flow (open, stream or step, SIGINT, close).

use std::io::{IsTerminal, Write};
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use copy_on_read::{BlockDevice, CorDevice, CorOptions, Gate, Populate};
use serde_json::{json, Value};

use engine::job::{JobEvent, JobEvents, OnError, Received};
use engine::stream::{step, JobState, Progress, StreamJob, StreamOptions};

use crate::error::{Error, Result};
use crate::out::outln;

/// What `qedstream stream` was asked to do.
#[derive(Clone, Debug)]
pub struct StreamCommand {
    /// The QED image.
    pub image: PathBuf,
    /// Rate limit in bytes per second.
    pub rate: Option<NonZeroU64>,
    /// Keep the backing link at the end.
    pub keep_backing: bool,
    /// One JSON object per line instead of a bar.
    pub json: bool,
    /// Single-step mode: `(offset, length)`.
    pub step: Option<(u64, u64)>,
    /// How the chain is opened (depth bound, NBD reconnect and retry policy).
    pub gate: Gate,
    /// Requests in flight.
    pub in_flight: usize,
    /// What the job does with a range that fails: report or ignore (never stop: nothing
    /// could resume it).
    pub on_error: OnError,
    /// Cancel the stream on SIGINT (a caller that handles signals itself says no).
    pub cancel_on_sigint: bool,
}

/// The default unit of a step.
pub const STEP_UNIT: u64 = 1 << 20;

pub fn progress_json(event: &str, p: &Progress) -> Value {
    json!({
        "event": event,
        "image": p.image,
        "offset": p.offset,
        "total": p.total,
        "copied": p.copied,
        "skipped": p.skipped,
        "local": p.local,
        "rate": p.rate,
        "rate_limit": p.rate_limit,
        "state": p.state,
    })
}

/// The progress of a stream that had nothing to do.
fn idle_progress(dev: &CorDevice) -> Progress {
    Progress {
        image: dev.name().to_string(),
        offset: dev.size(),
        total: dev.size(),
        copied: 0,
        skipped: 0,
        local: 0,
        rate: 0,
        rate_limit: 0,
        state: JobState::Completed,
        io_status: engine::job::IoStatus::Ok,
    }
}

/// One JSON event on a line of its own, written out at once (a reader acts on each).
fn print_line(v: &Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{v}")
        .and_then(|()| out.flush())
        .map_err(Error::Stdout)
}

/// Opens the image with copy-on-read through `gate`.
pub async fn open_device(image: &std::path::Path, gate: Gate) -> Result<CorDevice> {
    let options = CorOptions {
        gate,
        ..CorOptions::default()
    };
    CorDevice::open(image, options).await.map_err(Error::device)
}

async fn close(dev: &CorDevice) -> Result<()> {
    dev.close().await.map_err(Error::device)
}

/// Runs `qedstream stream` on a fresh runtime; returns the exit code.
pub fn run(cmd: StreamCommand) -> Result<u8> {
    let rt = engine::io_runtime()?;
    let r = rt.block_on(run_async(cmd));
    // Never wait on a task stuck on a dead peer when leaving.
    rt.shutdown_timeout(Duration::from_secs(1));
    r
}

async fn run_async(cmd: StreamCommand) -> Result<u8> {
    let dev = Arc::new(open_device(&cmd.image, cmd.gate.clone()).await?);
    if let Some((offset, length)) = cmd.step {
        return run_step(&dev, offset, length).await;
    }
    if dev.backing().is_none() {
        return report_standalone(&dev, cmd.json).await;
    }
    let options = StreamOptions {
        rate: cmd.rate,
        keep_backing: cmd.keep_backing,
        in_flight: cmd.in_flight.max(1),
        on_error: cmd.on_error,
        ..StreamOptions::default()
    };
    let (job, mut events) =
        StreamJob::start_watched(Arc::clone(&dev) as Arc<dyn Populate>, options);
    let handle = job.handle();
    let h = handle.clone();
    let cancel_on_sigint = cmd.cancel_on_sigint;
    let sigint = tokio::spawn(async move {
        if cancel_on_sigint && tokio::signal::ctrl_c().await.is_ok() {
            h.cancel();
        }
    });
    let bar = progress_bar(&dev, cmd.json);
    let (result, report_failed) = follow(job, &handle, bar.as_ref(), cmd.json).await;
    sigint.abort();
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let closed = close(&dev).await;
    let p = handle.progress();
    let result = match (result, report_failed) {
        // Cancelled for the failed report, or finished before the cancel landed: either way
        // the image is consistent; the report is what failed.
        (Ok(_) | Err(engine::Error::Cancelled { .. }), Some(report)) => {
            closed?;
            return Err(report);
        }
        (result, _) => result,
    };
    match result {
        Ok(outcome) => {
            closed?;
            report_completed(&outcome, cmd.json)?;
            if outcome.ignored.is_empty() {
                return Ok(0);
            }
            Err(Error::RangesSkipped {
                image: outcome.progress.image,
                ranges: outcome.ignored,
                nospace: any_nospace(&mut events),
            })
        }
        Err(e) => Err(report_failure(e, &p, cmd.json)),
    }
}

/// Whether any range the ended job handled failed for lack of space (its events, all sent
/// by now; the oldest are lost past the backlog).
fn any_nospace(events: &mut JobEvents) -> bool {
    let mut nospace = false;
    while let Some(r) = events.try_recv() {
        match r {
            Received::Event(JobEvent::Error(e)) => nospace |= e.nospace,
            Received::End => break,
            _ => {}
        }
    }
    nospace
}

/// Single-step mode: copies one unit and prints where to continue (or `done`).
async fn run_step(dev: &CorDevice, offset: u64, length: u64) -> Result<u8> {
    let r = step(dev, offset, length).await;
    close(dev).await?;
    match r?.next {
        Some(n) => outln!("{n}")?,
        None => outln!("done")?,
    }
    Ok(0)
}

/// A standalone image: there is no link to drop and nothing to copy.
async fn report_standalone(dev: &CorDevice, json: bool) -> Result<u8> {
    close(dev).await?;
    if json {
        let mut v = progress_json("completed", &idle_progress(dev));
        v["unlinked"] = json!(false);
        v["nothing_to_stream"] = json!(true);
        print_line(&v)?;
    } else {
        outln!("{}: no backing file, nothing to stream", dev.name())?;
    }
    Ok(0)
}

/// A progress bar on a terminal (stderr), unless the output is JSON.
fn progress_bar(dev: &CorDevice, json: bool) -> Option<indicatif::ProgressBar> {
    (!json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(dev.size());
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar
    })
}

/// Shows the job's progress every half second until it ends: its result, and the error of a
/// progress report that failed (the job is cancelled then).
async fn follow(
    job: StreamJob,
    handle: &engine::stream::StreamHandle,
    bar: Option<&indicatif::ProgressBar>,
    json: bool,
) -> (engine::Result<engine::stream::StreamOutcome>, Option<Error>) {
    let mut job = std::pin::pin!(job.wait());
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    // A stream nobody can follow any more (stdout full or its reader gone) is cancelled: it
    // stops at a unit boundary with the image valid and still linked, and the command fails.
    let mut report_failed = None;
    let result = loop {
        tokio::select! {
            r = &mut job => break r,
            _ = tick.tick() => {
                let p = handle.progress();
                if json && report_failed.is_none() {
                    if let Err(e) = print_line(&progress_json("progress", &p)) {
                        handle.cancel();
                        report_failed = Some(e);
                    }
                }
                if let Some(bar) = bar {
                    bar.set_position(p.offset);
                    bar.set_message(format!("{:?}", p.state).to_lowercase());
                }
            }
        }
    };
    (result, report_failed)
}

/// Reports a completed stream.
fn report_completed(outcome: &engine::stream::StreamOutcome, json: bool) -> Result<()> {
    if json {
        let mut v = progress_json("completed", &outcome.progress);
        v["unlinked"] = json!(outcome.unlinked);
        v["elapsed"] = json!(outcome.elapsed.as_secs_f64());
        let ignored = outcome.ignored.iter().map(|r| [r.0, r.1]);
        v["ignored"] = json!(ignored.collect::<Vec<_>>());
        print_line(&v)
    } else {
        outln!(
            "{}: streamed {} bytes, skipped {}, {} already local, in {:.1} s; {}",
            outcome.progress.image,
            outcome.progress.copied,
            outcome.progress.skipped,
            outcome.progress.local,
            outcome.elapsed.as_secs_f64(),
            if outcome.unlinked {
                "backing link dropped"
            } else {
                "backing link kept"
            }
        )
    }
}

/// The command's error for a stream that failed or was cancelled (reported as a JSON line
/// too, with `--output=json`).
fn report_failure(e: engine::Error, p: &Progress, json: bool) -> Error {
    let e = match e {
        engine::Error::BackingUnavailable(_) => Error::StreamInterrupted(e),
        // A read the NBD server failed (nbdkit's curl plugin answers EIO while its web server
        // is down): the image is as intact, and a rerun resumes, as after a lost connection.
        engine::Error::Device(copy_on_read::Error::Nbd { .. }) => Error::StreamInterrupted(e),
        e if e.is_nospace() => Error::DiskFull(e),
        other => Error::Engine(other),
    };
    if json {
        let event = if matches!(e, Error::Engine(engine::Error::Cancelled { .. })) {
            "cancelled"
        } else {
            "failed"
        };
        let mut v = progress_json(event, p);
        v["error"] = json!(e.to_string());
        // The stream's own error is the one to report (on stderr); a stdout that
        // fails as well cannot add to it.
        let _ = print_line(&v);
    }
    e
}
