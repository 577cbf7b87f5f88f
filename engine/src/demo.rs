//! `qedstream demo`: the README's quick start, end to end on this machine.
//!
//! It builds a sample base image (data with holes), serves it over NBD (with `qemu-nbd` when
//! installed; a local raw file otherwise), creates a QED overlay on it, reads through
//! copy-on-read, streams the overlay local with a progress bar, checks the result against the
//! base, and prints what happened at each step.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use copy_on_read::BlockDevice;
use qed::{BackingFormat, CreateOptions, Image, OpenOptions, Repair, Storage};

use crate::error::{Error, Result};
use crate::outln;
use crate::progress::{open_device, StreamCommand};

/// A server process killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn say(step: usize, text: &str) -> Result<()> {
    outln!("[{step}] {text}")
}

/// Writes the sample base: a pattern in every other MiB, a hole in the rest, and a tail.
fn build_base(path: &Path, size: u64) -> Result<u64> {
    let file = std::fs::File::create(path).map_err(|e| Error::open(path, e))?;
    file.set_len(size).map_err(|e| Error::open(path, e))?;
    let mut data_bytes = 0;
    let mib = 1u64 << 20;
    let mut at = 0;
    while at < size {
        if (at / mib) % 2 == 0 {
            let n = mib.min(size - at);
            let buf: Vec<u8> = (0..n).map(|i| ((at + i) / 4096 % 251) as u8 + 1).collect();
            Storage::write_at(&file, &buf, at).map_err(|e| Error::open(path, e))?;
            data_bytes += n;
        }
        at += mib;
    }
    file.sync_all().map_err(|e| Error::open(path, e))?;
    Ok(data_bytes)
}

fn which(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn serve(dir: &Path, base: &Path) -> Result<Option<(Server, String)>> {
    if !which("qemu-nbd") {
        return Ok(None);
    }
    let sock = dir.join("nbd.sock");
    let _ = std::fs::remove_file(&sock);
    let child = Command::new("qemu-nbd")
        .args([
            "-r",
            "-f",
            "raw",
            "-x",
            "base",
            "--persistent",
            "--shared=8",
            "-k",
        ])
        .arg(&sock)
        .arg(base)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(Error::io("starting qemu-nbd"))?;
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if Instant::now() > deadline {
            return Err(Error::Usage("qemu-nbd did not start within 10 s".into()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Some((
        server,
        format!("nbd+unix:///base?socket={}", sock.display()),
    )))
}

/// Runs the demo in `dir` (a new folder under the temp dir by default) with a base of `size`.
pub fn run(dir: Option<PathBuf>, size: u64) -> Result<u8> {
    let size = size.max(4 << 20) / (1 << 20) * (1 << 20);
    let dir = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d).map_err(|e| Error::open(&d, e))?;
            d
        }
        None => {
            let d = std::env::temp_dir().join(format!("qedstream-demo-{}", std::process::id()));
            std::fs::create_dir_all(&d).map_err(|e| Error::open(&d, e))?;
            d
        }
    };
    let base = dir.join("base.raw");
    let overlay = dir.join("vm.qed");
    let data = build_base(&base, size)?;
    say(
        1,
        &format!(
            "built {} ({} MiB, {} MiB of data, the rest holes)",
            base.display(),
            size >> 20,
            data >> 20
        ),
    )?;

    let served = serve(&dir, &base)?;
    let backing_name = match &served {
        Some((_, uri)) => {
            say(2, &format!("serving it over NBD with qemu-nbd at {uri}"))?;
            uri.clone()
        }
        None => {
            say(
                2,
                "qemu-nbd is not installed: using the base as a local raw file instead",
            )?;
            "base.raw".to_string()
        }
    };

    let options = CreateOptions {
        backing: Some((backing_name.clone(), BackingFormat::Raw)),
        ..CreateOptions::new(size)
    };
    Image::create_path(&overlay, &options).map_err(|e| Error::image(&overlay, e))?;
    say(
        3,
        &format!(
            "created {} (QED) on backing {backing_name} (raw)",
            overlay.display()
        ),
    )?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(Error::io("starting the runtime"))?;
    let (stats, first) = rt.block_on(async {
        let dev = Arc::new(open_device(&overlay, Duration::from_secs(5)).await?);
        let buf = dev
            .read_at(0, vec![0u8; 1 << 20])
            .await
            .map_err(Error::device)?;
        let stats = dev.stats();
        dev.close().await.map_err(Error::device)?;
        Ok::<_, Error>((stats, buf[0]))
    })?;
    say(
        4,
        &format!(
            "read 1 MiB at offset 0 through copy-on-read: first byte {first:#04x}; {} KiB fetched from the backing and stored in the overlay",
            stats.cor_bytes >> 10
        ),
    )?;
    rt.shutdown_timeout(Duration::from_secs(1));

    say(5, "streaming the rest:")?;
    crate::progress::run(StreamCommand {
        image: overlay.clone(),
        rate: None,
        keep_backing: false,
        json: false,
        step: None,
        reconnect_delay: Duration::from_secs(5),
        in_flight: 4,
    })?;
    drop(served);

    let image = Image::open_path(
        &overlay,
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .map_err(|e| Error::image(&overlay, e))?;
    let report = image
        .check(Repair::None)
        .map_err(|e| Error::image(&overlay, e))?;
    let base_file = std::fs::File::open(&base).map_err(|e| Error::open(&base, e))?;
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    let mut same = true;
    let mut at = 0;
    while at < size {
        image
            .read_at(&mut a, at)
            .map_err(|e| Error::image(&overlay, e))?;
        Storage::read_at(&base_file, &mut b, at).map_err(|e| Error::open(&base, e))?;
        same &= a == b;
        at += 1 << 20;
    }
    let unlinked = image.backing_name().is_none();
    say(
        6,
        &format!(
            "checked {}: content {} the base, check {}, backing link {}",
            overlay.display(),
            if same { "equals" } else { "DIFFERS FROM" },
            if report.exit_code() == 0 {
                "clean".to_string()
            } else {
                format!("exit {}", report.exit_code())
            },
            if unlinked { "dropped" } else { "still there" }
        ),
    )?;
    if same && report.exit_code() == 0 && unlinked {
        say(
            7,
            &format!(
                "done: {} is self-contained; try `qemu-img info {}`",
                overlay.display(),
                overlay.display()
            ),
        )?;
        Ok(0)
    } else {
        Ok(1)
    }
}
