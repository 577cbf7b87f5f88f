//! `qedstream demo --vm`: the quick start with a real guest. The overlay is served by
//! `qedstream serve --stream` (this binary, a child process) over NBD on a private unix
//! socket; a small Linux guest boots under `qemu-system-x86_64` (TCG) from it and hashes its
//! whole disk while the stream runs under a rate limit. The demo shows the stream's progress
//! (over the control socket, QMP), then the guest's checksum next to the base's, raises the
//! speed to finish the stream and asks `serve` to quit, which closes the image clean.
//!
//! The guest is the tests' kit (`guest/build-kit.sh`: Debian's kernel and a busybox
//! initramfs whose `/init` hashes `/dev/vda`): the folder `$QEDSTREAM_GUEST_KIT` names, or
//! the one the script builds (and caches) when the source tree is where this binary was built.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::child::{die_with_us, Helper, SignalExit};
use crate::error::{Error, Result};
use crate::job::Qmp;
use crate::out::outln;

/// The emulator the guest runs in.
pub const QEMU_SYSTEM: &str = "qemu-system-x86_64";

/// Names a folder holding a built guest kit (`vmlinux`, `initramfs.cpio.gz`).
pub const KIT_ENV: &str = "QEDSTREAM_GUEST_KIT";

/// The script that builds the kit, in the source tree this binary was built from.
const BUILD_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../guest/build-kit.sh");

/// How long the guest may run before it counts as hung (a boot takes seconds under TCG).
const BOOT_DEADLINE: Duration = Duration::from_secs(300);

/// How long `serve` may take to say ready, complete the stream after the speed is raised, or
/// exit after `quit`.
const SERVE_DEADLINE: Duration = Duration::from_secs(120);

/// A built guest.
#[derive(Debug)]
pub struct Kit {
    vmlinux: PathBuf,
    initramfs: PathBuf,
}

fn missing(name: &str, what: String) -> Error {
    Error::Helper {
        name: name.to_string(),
        what,
    }
}

/// Checks for `qemu-system-x86_64` and finds (or builds) the guest kit; an error says what
/// is missing and how to get it.
pub fn find_kit() -> Result<Kit> {
    if !crate::demo::installed(QEMU_SYSTEM) {
        return Err(missing(
            QEMU_SYSTEM,
            "is not installed (not found on PATH), and `demo --vm` boots its guest in it: \
             install it (Debian: apt-get install qemu-system-x86) or run `qedstream demo` \
             without --vm"
                .into(),
        ));
    }
    let dir = match std::env::var_os(KIT_ENV) {
        Some(d) => PathBuf::from(d),
        None => build_kit()?,
    };
    let kit = Kit {
        vmlinux: dir.join("vmlinux"),
        initramfs: dir.join("initramfs.cpio.gz"),
    };
    for file in [&kit.vmlinux, &kit.initramfs] {
        if !file.is_file() {
            let what = format!(
                "lacks {} (build one with guest/build-kit.sh and set {KIT_ENV} to the folder \
                 it prints)",
                file.display()
            );
            return Err(missing("the guest kit", what));
        }
    }
    Ok(kit)
}

/// Runs `guest/build-kit.sh` (a download of Debian's kernel and busybox the first time,
/// cached after); the folder it prints last.
fn build_kit() -> Result<PathBuf> {
    let script = Path::new(BUILD_SCRIPT);
    if !script.is_file() {
        let what = format!(
            "was not found: set {KIT_ENV} to a folder built by guest/build-kit.sh (the \
             source tree's {} is not here)",
            script.display()
        );
        return Err(missing("the guest kit", what));
    }
    outln!(
        "building the guest kit with {} (cached after the first time)",
        script.display()
    )?;
    crate::out::flush()?;
    let out = die_with_us(Command::new("bash").arg(script))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(Error::io("running bash for guest/build-kit.sh"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().last() {
        Some(dir) if out.status.success() => Ok(PathBuf::from(dir.trim())),
        _ => Err(missing(
            "guest/build-kit.sh",
            format!("failed ({})", out.status),
        )),
    }
}

/// A value for QEMU's `key=value,...` option syntax, where a comma is written twice.
fn escape_option_value(value: &str) -> String {
    value.replace(',', ",,")
}

/// The QEMU command line of the tests (`tests/src/guest.rs`), on the NBD export `uri`.
fn qemu_command(kit: &Kit, uri: &str, console: &Path) -> Command {
    let mut cmd = Command::new(QEMU_SYSTEM);
    cmd.args(["-accel", "tcg", "-nodefaults", "-no-user-config"])
        .args([
            "-display",
            "none",
            "-no-reboot",
            "-net",
            "none",
            "-m",
            "256",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&kit.vmlinux)
        .arg("-initrd")
        .arg(&kit.initramfs)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,cache=none",
            escape_option_value(uri)
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// A running `qedstream serve --output=json`: its JSON lines arrive on a channel.
struct Served {
    helper: Helper,
    lines: mpsc::Receiver<Value>,
    control: PathBuf,
}

impl Served {
    /// The next line whose `event` is `name` (an error when `serve` ends or is silent
    /// for [`SERVE_DEADLINE`]).
    fn wait_for(&self, name: &str) -> Result<Value> {
        let deadline = Instant::now() + SERVE_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if v["event"] == name => return Ok(v),
                Ok(_) => {}
                Err(_) => {
                    let what = format!("ended or went silent before reporting {name:?}");
                    return Err(missing(self.helper.name(), what));
                }
            }
        }
    }

    /// The stream job as `query-block-jobs` shows it; `None` once it has ended.
    fn job(&self) -> Result<Option<Value>> {
        let jobs = Qmp::connect(&self.control)?.execute("query-block-jobs", json!({}))?;
        Ok(jobs.as_array().and_then(|a| a.first()).cloned())
    }
}

/// Starts `qedstream serve --stream --rate RATE` on `overlay`, its NBD and control sockets
/// in `sock_dir`; waits for its ready line.
fn start_serve(signals: &SignalExit, overlay: &Path, sock_dir: &Path, rate: u64) -> Result<Served> {
    let exe = std::env::current_exe().map_err(Error::io("finding the qedstream binary"))?;
    let control = sock_dir.join("control.sock");
    let helper = signals.spawn(
        "qedstream serve",
        Command::new(exe)
            .args(["serve", "--output=json", "--stream", "--rate"])
            .arg(rate.to_string())
            .arg("--nbd")
            .arg(format!("unix:{}", sock_dir.join("vm.sock").display()))
            .arg("--control")
            .arg(&control)
            .arg(overlay)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    )?;
    let stdout = helper
        .take_stdout()
        .ok_or_else(|| missing("qedstream serve", "has no stdout".into()))?;
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(v) = line.map(|l| serde_json::from_str::<Value>(&l)) else {
                return;
            };
            if tx.send(v.unwrap_or(Value::Null)).is_err() {
                return;
            }
        }
    });
    Ok(Served {
        helper,
        lines,
        control,
    })
}

/// What the guest reported: the sha256 of its disk.
fn guest_sha256(console: &str) -> Option<String> {
    console.lines().find_map(|line| {
        let start = line.find("QEDSTREAM-SHA256 ")?;
        let hash = line[start..].split_whitespace().nth(1)?;
        (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then(|| hash.into())
    })
}

/// The host's sha256 of `path` (coreutils' `sha256sum`).
fn host_sha256(path: &Path) -> Result<String> {
    let out = die_with_us(Command::new("sha256sum").arg(path))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(Error::io("running sha256sum"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.split_whitespace().next() {
        Some(h) if out.status.success() => Ok(h.to_string()),
        _ => Err(missing(
            "sha256sum",
            format!("failed on {}", path.display()),
        )),
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// Runs the guest to its end, printing the stream's progress once a second.
fn boot_guest(
    kit: &Kit,
    served: &Served,
    uri: &str,
    signals: &SignalExit,
    dir: &Path,
) -> Result<String> {
    let console = dir.join("guest-console.log");
    let guest = signals.spawn(QEMU_SYSTEM, &mut qemu_command(kit, uri, &console))?;
    let started = Instant::now();
    let mut shown = Duration::ZERO;
    let status = loop {
        if let Some(status) = guest.try_wait()? {
            break status;
        }
        if started.elapsed() > BOOT_DEADLINE {
            guest.stop();
            return Err(missing(
                QEMU_SYSTEM,
                format!(
                    "was still running after {BOOT_DEADLINE:?}; the console is in {}",
                    console.display()
                ),
            ));
        }
        if started.elapsed() >= shown {
            shown += Duration::from_secs(1);
            let line = match served.job()? {
                Some(j) => format!(
                    "    {:5.1} s  guest running; stream {:.1} of {:.1} MiB",
                    started.elapsed().as_secs_f64(),
                    mib(j["offset"].as_u64().unwrap_or(0)),
                    mib(j["len"].as_u64().unwrap_or(0))
                ),
                None => format!(
                    "    {:5.1} s  guest running; stream done",
                    started.elapsed().as_secs_f64()
                ),
            };
            outln!("{line}")?;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    match guest_sha256(&text) {
        Some(h) if status.success() => {
            let secs = started.elapsed().as_secs_f64();
            outln!("    the guest read its whole disk in {secs:.1} s (boot included)")?;
            Ok(h)
        }
        _ => Err(missing(
            QEMU_SYSTEM,
            format!(
                "ended ({status}) without the guest's checksum; the console is in {}",
                console.display()
            ),
        )),
    }
}

/// Steps 4 and 5 of `demo --vm`: serves `overlay` while it streams, boots the guest on it,
/// shows its checksum next to the base's, finishes the stream and stops `serve` cleanly.
/// Whether the checksums agree.
pub fn boot_while_streaming(
    kit: &Kit,
    signals: &SignalExit,
    overlay: &Path,
    base: &Path,
    sock_dir: &Path,
    size: u64,
) -> Result<bool> {
    // The whole disk in ~16 s: the stream is still running while the guest boots.
    let rate = (size / 16).max(1 << 20);
    let served = start_serve(signals, overlay, sock_dir, rate)?;
    let ready = served.wait_for("ready")?;
    let uri = ready["uris"][0].as_str().unwrap_or_default().to_string();
    crate::demo::say(
        4,
        &format!(
            "serving {} with `qedstream serve --stream --rate {rate}` at {uri}",
            overlay.display()
        ),
    )?;
    crate::demo::say(
        5,
        &format!("booting a Linux guest ({QEMU_SYSTEM}, TCG) from it; it hashes its whole disk:"),
    )?;
    let dir = overlay.parent().unwrap_or(Path::new("."));
    let guest = boot_guest(kit, &served, &uri, signals, dir)?;
    let expected = host_sha256(base)?;
    let same = guest == expected;
    outln!("    guest sha256 {guest}")?;
    outln!(
        "    base  sha256 {expected} ({})",
        if same { "equal" } else { "DIFFERENT" }
    )?;
    if let Some(job) = served.job()? {
        let mut qmp = Qmp::connect(&served.control)?;
        // The job may complete between the look and the command: then there is no job, and
        // the wait below sees it complete.
        let speed = json!({"device": job["device"], "speed": 0});
        let _ = qmp.execute("block-job-set-speed", speed);
    }
    let done = served.wait_for("completed")?;
    outln!(
        "    stream completed: {:.1} MiB (backing link dropped: {})",
        mib(done["offset"].as_u64().unwrap_or(0)),
        done["unlinked"]
    )?;
    Qmp::connect(&served.control)?.execute("quit", json!({}))?;
    let deadline = Instant::now() + SERVE_DEADLINE;
    loop {
        match served.helper.try_wait()? {
            Some(status) if status.success() => return Ok(same),
            Some(status) => {
                return Err(missing("qedstream serve", format!("exited with {status}")));
            }
            None if Instant::now() > deadline => {
                return Err(missing("qedstream serve", "did not exit after quit".into()));
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
