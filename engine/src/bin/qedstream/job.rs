//! `qedstream job SOCKET ACTION`: drives the stream job of a `qedstream serve` (or any QMP
//! server with block jobs) over its control socket, in QMP.
//!
//! Actions: `info` (the job's offset, length, speed, status), `speed N` (0: unlimited),
//! `pause`, `resume`, `cancel`, `step [--offset N] [--length N]` (copies one unit; prints the
//! offset to continue from, or `done`), `backing [URI]` (the NBD backing's state, or repoint it
//! at URI). A QMP error ends the command with its description and exit 1.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::out::outln;

/// The longest a reply may take: a repoint connects to a new server (10 s), a step copies a
/// unit from a slow backing.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest line read from the server.
const MAX_LINE: u64 = 1 << 20;

/// What `qedstream job` does.
#[derive(Clone, Debug)]
pub enum JobAction {
    /// Show the job.
    Info,
    /// Set the rate limit (0: none).
    Speed(u64),
    /// Pause.
    Pause,
    /// Resume.
    Resume,
    /// Cancel.
    Cancel,
    /// Copy one unit.
    Step {
        /// Where to start.
        offset: u64,
        /// The unit's length.
        length: u64,
    },
    /// Show the backing link, or repoint it.
    Backing(Option<String>),
}

/// A QMP connection, negotiated.
pub(crate) struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    socket: String,
}

impl Qmp {
    /// Connects to `socket` and negotiates capabilities.
    pub(crate) fn connect(socket: &Path) -> Result<Qmp> {
        let name = socket.display().to_string();
        let stream =
            UnixStream::connect(socket).map_err(Error::io(format!("connecting to {name}")))?;
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(Error::io(format!("connecting to {name}")))?;
        let writer = stream
            .try_clone()
            .map_err(Error::io(format!("connecting to {name}")))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            socket: name,
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(qmp.protocol("no QMP greeting"));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn protocol(&self, what: &str) -> Error {
        Error::Qmp {
            socket: self.socket.clone(),
            desc: what.to_string(),
        }
    }

    /// The next JSON object from the server.
    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_line(&mut line)
            .map_err(Error::io(format!("reading from {}", self.socket)))?;
        if n == 0 {
            return Err(self.protocol("the server closed the connection"));
        }
        serde_json::from_str(&line)
            .map_err(|e| self.protocol(&format!("not JSON from the server: {e}")))
    }

    /// Runs `command` and returns its `return`; a QMP error is an [`Error::Qmp`]. Events in
    /// between are skipped.
    pub(crate) fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let request = json!({"execute": command, "arguments": arguments, "id": command});
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(Error::io(format!("writing to {}", self.socket)))?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(Error::Qmp {
                    socket: self.socket.clone(),
                    desc: e["desc"]
                        .as_str()
                        .unwrap_or("an error without a description")
                        .to_string(),
                });
            }
        }
    }

    /// The job to act on: the one named, or the only one.
    fn job(&mut self, id: Option<&str>) -> Result<Value> {
        let jobs = self.execute("query-block-jobs", json!({}))?;
        let jobs = jobs.as_array().cloned().unwrap_or_default();
        let found = match id {
            Some(id) => jobs.into_iter().find(|j| j["device"] == id),
            None => jobs.into_iter().next(),
        };
        found.ok_or_else(|| Error::Qmp {
            socket: self.socket.clone(),
            desc: match id {
                Some(id) => format!("no block job {id:?}"),
                None => "no block job is running".to_string(),
            },
        })
    }
}

/// Runs `qedstream job`; returns the exit code.
pub fn run(
    socket: &Path,
    job_id: Option<&str>,
    action: JobAction,
    json_output: bool,
) -> Result<u8> {
    let mut qmp = Qmp::connect(socket)?;
    let device = |qmp: &mut Qmp| -> Result<String> {
        Ok(qmp.job(job_id)?["device"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    };
    match action {
        JobAction::Info => {
            let job = qmp.job(job_id)?;
            if json_output {
                outln!("{job}")?;
            } else {
                outln!(
                    "{} {}: {} of {} bytes, speed {}, io-status {}",
                    job["device"].as_str().unwrap_or_default(),
                    job["status"].as_str().unwrap_or_default(),
                    job["offset"],
                    job["len"],
                    job["speed"],
                    job["io-status"].as_str().unwrap_or_default()
                )?;
            }
        }
        JobAction::Speed(speed) => {
            let d = device(&mut qmp)?;
            qmp.execute("block-job-set-speed", json!({"device": d, "speed": speed}))?;
        }
        JobAction::Pause => {
            let d = device(&mut qmp)?;
            qmp.execute("block-job-pause", json!({"device": d}))?;
        }
        JobAction::Resume => {
            let d = device(&mut qmp)?;
            qmp.execute("block-job-resume", json!({"device": d}))?;
        }
        JobAction::Cancel => {
            let d = device(&mut qmp)?;
            qmp.execute("block-job-cancel", json!({"device": d}))?;
        }
        JobAction::Step { offset, length } => {
            let r = qmp.execute(
                "x-block-stream-step",
                json!({"offset": offset, "length": length}),
            )?;
            let next = r.get("next").and_then(Value::as_u64);
            match (json_output, next) {
                (true, _) => outln!("{r}")?,
                (false, Some(n)) => outln!("{n}")?,
                (false, None) => outln!("done")?,
            }
        }
        JobAction::Backing(None) => {
            let r = qmp.execute("x-backing-state", json!({}))?;
            if json_output {
                outln!("{r}")?;
            } else {
                outln!(
                    "{}{}",
                    r["state"].as_str().unwrap_or_default(),
                    r["uri"]
                        .as_str()
                        .map(|u| format!(" {u}"))
                        .unwrap_or_default()
                )?;
            }
        }
        JobAction::Backing(Some(uri)) => {
            qmp.execute("x-backing-repoint", json!({"uri": uri}))?;
        }
    }
    Ok(0)
}
