//! The QMP commands a [`Control`] answers, and the shapes of its greeting, replies and events
//! (QEMU's, from `qapi/block-core.json`, `qapi/job.json` and `docs/interop/qmp-spec.rst`).

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use copy_on_read::LinkState;

use super::{Control, ControlError, StreamRequest};
use crate::job::OnError;
use crate::stream::{step, JobState, StreamHandle};

/// Every command, in `query-commands` order.
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "query-block",
    "query-named-block-nodes",
    "query-block-jobs",
    "block-stream",
    "block-job-set-speed",
    "block-job-pause",
    "block-job-resume",
    "block-job-cancel",
    "quit",
    "x-block-stream-step",
    "x-backing-state",
    "x-backing-repoint",
];

/// The default unit of `x-block-stream-step`.
pub const STEP_UNIT: u64 = 1 << 20;

/// Our version, in QMP's `VersionInfo` shape.
fn version() -> Value {
    let mut parts = env!("CARGO_PKG_VERSION")
        .split('.')
        .map(|p| p.parse::<u64>().unwrap_or(0));
    json!({
        "qemu": {
            "major": parts.next().unwrap_or(0),
            "minor": parts.next().unwrap_or(0),
            "micro": parts.next().unwrap_or(0),
        },
        "package": concat!("qedstream ", env!("CARGO_PKG_VERSION")),
    })
}

/// The greeting a client gets on connecting.
pub fn greeting() -> Value {
    json!({"QMP": {"version": version(), "capabilities": []}})
}

/// QMP's `timestamp`: seconds and microseconds since the epoch.
fn timestamp() -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()})
}

/// An event in QMP's shape.
pub fn event(name: &str, data: Value) -> Value {
    json!({"event": name, "data": data, "timestamp": timestamp()})
}

/// The arguments of a command, checked against the names it takes.
struct Args<'a> {
    map: &'a Map<String, Value>,
}

impl<'a> Args<'a> {
    fn new(map: &'a Map<String, Value>, allowed: &[&str]) -> Result<Args<'a>, ControlError> {
        if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(ControlError::generic(format!(
                "Parameter '{k}' is unexpected"
            )));
        }
        Ok(Args { map })
    }

    fn str(&self, name: &str) -> Result<Option<&'a str>, ControlError> {
        match self.map.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ControlError::generic(format!(
                "Invalid parameter type for '{name}', expected: string"
            ))),
        }
    }

    fn required_str(&self, name: &str) -> Result<&'a str, ControlError> {
        self.str(name)?
            .ok_or_else(|| ControlError::generic(format!("Parameter '{name}' is missing")))
    }

    fn u64(&self, name: &str) -> Result<Option<u64>, ControlError> {
        match self.map.get(name) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => Ok(Some(n)),
                None if v.as_i64().is_some() => Err(ControlError::generic(format!(
                    "Parameter '{name}' expects a non-negative value"
                ))),
                None => Err(ControlError::generic(format!(
                    "Invalid parameter type for '{name}', expected: integer"
                ))),
            },
        }
    }

    fn bool(&self, name: &str) -> Result<Option<bool>, ControlError> {
        match self.map.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(ControlError::generic(format!(
                "Invalid parameter type for '{name}', expected: boolean"
            ))),
        }
    }
}

/// QEMU's job status of a job in `state`.
fn job_status(state: JobState) -> &'static str {
    match state {
        JobState::Running | JobState::WaitingForBacking => "running",
        JobState::Paused => "paused",
        JobState::Completed | JobState::Cancelled | JobState::Failed => "concluded",
    }
}

/// One `query-block-jobs` entry.
fn job_info(id: &str, handle: &StreamHandle) -> Value {
    let p = handle.progress();
    let paused = handle.is_paused();
    json!({
        "type": "stream",
        "device": id,
        "len": p.total,
        "offset": p.offset,
        "busy": !paused,
        "paused": paused,
        "speed": p.rate_limit,
        "io-status": p.io_status.as_str(),
        "ready": false,
        "status": job_status(p.state),
        "auto-finalize": true,
        "auto-dismiss": true,
    })
}

fn link_name(state: LinkState) -> &'static str {
    match state {
        LinkState::Connected => "connected",
        LinkState::Reconnecting => "reconnecting",
        LinkState::Offline => "offline",
        LinkState::Failed => "failed",
    }
}

impl Control {
    /// Runs one command (`execute` with its `arguments`) and returns what goes in `return`.
    /// `qmp_capabilities` is the connection's business and is not handled here.
    pub async fn execute(
        &self,
        command: &str,
        arguments: &Map<String, Value>,
    ) -> Result<Value, ControlError> {
        let no_args = |a: &Map<String, Value>| Args::new(a, &[]).map(drop);
        match command {
            "query-version" => no_args(arguments).map(|()| version()),
            "query-commands" => no_args(arguments).map(|()| {
                json!(COMMANDS
                    .iter()
                    .map(|c| json!({"name": c}))
                    .collect::<Vec<_>>())
            }),
            "query-block" => no_args(arguments).map(|()| self.query_block()),
            "query-named-block-nodes" => {
                Args::new(arguments, &["flat"])?;
                Ok(json!([self.node_info()]))
            }
            "query-block-jobs" => no_args(arguments).map(|()| {
                json!(self
                    .job()
                    .map(|(id, h)| vec![job_info(&id, &h)])
                    .unwrap_or_default())
            }),
            "block-stream" => self.block_stream(arguments),
            "block-job-set-speed" => {
                let a = Args::new(arguments, &["device", "speed"])?;
                let h = self.job_named(a.required_str("device")?)?;
                let speed = a
                    .u64("speed")?
                    .ok_or_else(|| ControlError::generic("Parameter 'speed' is missing"))?;
                h.set_rate(std::num::NonZeroU64::new(speed));
                Ok(json!({}))
            }
            "block-job-pause" => {
                let a = Args::new(arguments, &["device"])?;
                let h = self.job_named(a.required_str("device")?)?;
                if h.is_paused() {
                    return Err(ControlError::generic("The block job is already paused"));
                }
                h.pause();
                Ok(json!({}))
            }
            "block-job-resume" => {
                let a = Args::new(arguments, &["device"])?;
                let h = self.job_named(a.required_str("device")?)?;
                if !h.is_paused() {
                    return Err(ControlError::generic(
                        "Can't resume a job that was not paused",
                    ));
                }
                h.resume();
                Ok(json!({}))
            }
            "block-job-cancel" => {
                let a = Args::new(arguments, &["device", "force"])?;
                let h = self.job_named(a.required_str("device")?)?;
                a.bool("force")?;
                h.cancel();
                Ok(json!({}))
            }
            "quit" => no_args(arguments).map(|()| json!({})),
            "x-block-stream-step" => self.stream_step(arguments).await,
            "x-backing-state" => {
                let a = Args::new(arguments, &["device"])?;
                self.check_device(a.str("device")?)?;
                Ok(match self.node().backing_link() {
                    Some(link) => json!({"state": link_name(link.state()), "uri": link.address()}),
                    None => json!({"state": "none"}),
                })
            }
            "x-backing-repoint" => {
                let a = Args::new(arguments, &["device", "uri"])?;
                self.check_device(a.str("device")?)?;
                let uri = a.required_str("uri")?;
                let Some(link) = self.node().backing_link() else {
                    return Err(ControlError::generic(
                        "the node has no NBD backing to repoint",
                    ));
                };
                link.repoint(uri)
                    .await
                    .map_err(|e| ControlError::generic(e.to_string()))?;
                Ok(json!({}))
            }
            other => Err(ControlError {
                class: "CommandNotFound",
                desc: format!("The command {other} has not been found"),
            }),
        }
    }

    /// Fails unless `device` (when given) names the node.
    fn check_device(&self, device: Option<&str>) -> Result<(), ControlError> {
        match device {
            Some(d) if !self.node().is_named(d) => Err(ControlError::generic(format!(
                "Cannot find device='{d}' nor node-name='{d}'"
            ))),
            _ => Ok(()),
        }
    }

    fn block_stream(&self, arguments: &Map<String, Value>) -> Result<Value, ControlError> {
        let a = Args::new(
            arguments,
            &[
                "device",
                "job-id",
                "speed",
                "on-error",
                "auto-finalize",
                "auto-dismiss",
            ],
        )?;
        let device = a.required_str("device")?;
        self.check_device(Some(device))?;
        for flag in ["auto-finalize", "auto-dismiss"] {
            if a.bool(flag)? == Some(false) {
                return Err(ControlError::generic(format!(
                    "'{flag}': false is not supported (jobs finalize and dismiss themselves)"
                )));
            }
        }
        let on_error = match a.str("on-error")? {
            None => OnError::Report,
            Some(s) => s
                .parse()
                .map_err(|e: crate::job::UnknownPolicy| ControlError::generic(e.to_string()))?,
        };
        self.start_stream(StreamRequest {
            job_id: Some(a.str("job-id")?.unwrap_or(device).to_string()),
            speed: a.u64("speed")?.unwrap_or(0),
            on_error,
        })?;
        Ok(json!({}))
    }

    async fn stream_step(&self, arguments: &Map<String, Value>) -> Result<Value, ControlError> {
        let a = Args::new(arguments, &["device", "offset", "length"])?;
        self.check_device(a.str("device")?)?;
        let Some(dev) = self.node().populate.clone() else {
            return Err(ControlError::generic(
                "the node has no backing to step through",
            ));
        };
        if self.node().read_only {
            return Err(ControlError::generic(
                "the node is opened read-only: a step writes the image",
            ));
        }
        let offset = a.u64("offset")?.unwrap_or(0);
        let length = a.u64("length")?.unwrap_or(STEP_UNIT);
        if length == 0 {
            return Err(ControlError::generic(
                "Parameter 'length' must be at least 1 (a step copies at least one cluster)",
            ));
        }
        let out = step(&*dev, offset, length)
            .await
            .map_err(|e| ControlError::generic(e.to_string()))?;
        Ok(match out.next {
            Some(n) => json!({"next": n, "copied": out.copied}),
            None => json!({"done": true, "copied": out.copied}),
        })
    }

    /// `query-named-block-nodes`' entry for the node (`BlockDeviceInfo`, the fields we know).
    fn node_info(&self) -> Value {
        let n = self.node();
        let backing = n.populate.as_ref().and_then(|p| p.backing());
        let mut image = json!({
            "filename": n.file,
            "format": n.format,
            "virtual-size": n.device.size(),
        });
        let mut info = json!({
            "node-name": n.node_name,
            "file": n.file,
            "ro": n.read_only,
            "drv": n.format,
            "encrypted": false,
            "detect_zeroes": "off",
            "backing_file_depth": u32::from(backing.is_some()),
            "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
            "write_threshold": 0,
            "cache": {"writeback": true, "direct": false, "no-flush": false},
        });
        if let Some(b) = backing {
            info["backing_file"] = json!(b.describe());
            image["backing-filename"] = json!(b.describe());
            image["backing-image"] = backing_image(&*b);
        }
        info["image"] = image;
        info
    }

    /// `query-block`: the export as a device with the node inserted.
    fn query_block(&self) -> Value {
        json!([{
            "device": self.node().export_name,
            "qdev": "",
            "locked": false,
            "removable": false,
            "type": "unknown",
            "io-status": "ok",
            "inserted": self.node_info(),
        }])
    }
}

/// QEMU's nested `backing-image` of `query-block`: the backing's format (`qed`, `qcow2`,
/// `raw`; an NBD export reads as raw), name and size, as its device describes itself.
fn backing_image(b: &dyn copy_on_read::BlockDevice) -> Value {
    let describe = b.describe();
    let (format, name) = describe
        .split_once(' ')
        .unwrap_or(("raw", describe.as_str()));
    let format = if format == "nbd" { "raw" } else { format };
    json!({"filename": name, "format": format, "virtual-size": b.size()})
}
