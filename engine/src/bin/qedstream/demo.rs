//! `qedstream demo`: the README's quick start, end to end on this machine.
//!
//! It builds a sample base image (data with holes), serves it over NBD (with `qemu-nbd` when
//! installed; a local raw file otherwise), creates a QED overlay on it, reads through
//! copy-on-read, streams the overlay local with a progress bar, checks the result against the
//! base, and prints what happened at each step.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use copy_on_read::BlockDevice;
use qed::{BackingFormat, CreateOptions, Image, Repair, Storage};

use crate::child::{die_with_us, Helper, SignalExit};
use crate::error::{Error, Result};
use crate::out::outln;
use crate::progress::{open_device, StreamCommand};

/// The files the demo creates in its folder.
const BASE: &str = "base.raw";
const OVERLAY: &str = "vm.qed";

pub(crate) fn say(step: usize, text: &str) -> Result<()> {
    outln!("[{step}] {text}")
}

/// Creates `path`, which must not exist: `O_CREAT | O_EXCL`, so a file or a symlink (even a
/// dangling one) planted there is an error, never followed.
fn create_new(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::Exists(path.to_path_buf()),
            _ => Error::open(path, e),
        })
}

/// Writes the sample base: a pattern in every other MiB, a hole in the rest, and a tail.
fn build_base(path: &Path, size: u64) -> Result<u64> {
    let file = create_new(path)?;
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

/// Whether `tool --version` runs.
pub fn installed(tool: &str) -> bool {
    die_with_us(Command::new(tool).arg("--version"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Serves `base` with qemu-nbd on a socket in `sock_dir` (a folder only we can write to).
fn serve(signals: &SignalExit, sock_dir: &Path, base: &Path) -> Result<Option<(Helper, String)>> {
    if !installed("qemu-nbd") {
        return Ok(None);
    }
    let sock = sock_dir.join("nbd.sock");
    let server = signals.spawn(
        "qemu-nbd",
        Command::new("qemu-nbd")
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
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if let Some(status) = server.try_wait()? {
            return Err(Error::Helper {
                name: server.name().into(),
                what: format!("exited ({status}) before serving {}", base.display()),
            });
        }
        if Instant::now() > deadline {
            return Err(Error::Helper {
                name: server.name().into(),
                what: "did not start within 10 s".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Some((
        server,
        format!("nbd+unix:///base?socket={}", sock.display()),
    )))
}

/// Mode 0700: a folder only we can list, enter or write to.
fn private() -> std::fs::Permissions {
    std::fs::Permissions::from_mode(0o700)
}

/// The current user, who must own a `--dir` that already exists.
fn euid() -> u32 {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// Makes `dir` ready for the demo: created (mode 0700) when missing; when it exists, it must be
/// a real folder (not a symlink), ours, writable by nobody else (unless sticky, as /tmp), and
/// free of the demo's files. The files are still created with `O_EXCL` afterwards, so a race
/// with someone planting them ends in an error too.
fn prepare_dir(dir: &Path) -> Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::open(parent, e))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::open(dir, e)),
    }
    let refuse = |why| {
        Err(Error::UnsafeDir {
            path: dir.to_path_buf(),
            why,
        })
    };
    let meta = std::fs::symlink_metadata(dir).map_err(|e| Error::open(dir, e))?;
    if meta.file_type().is_symlink() {
        return refuse("is a symbolic link; pass the folder itself");
    }
    if !meta.is_dir() {
        return refuse("is not a folder");
    }
    if meta.uid() != euid() {
        return refuse("belongs to another user; pass a folder of your own");
    }
    if meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0 {
        return refuse("can be written by other users; pass a folder only you can write to");
    }
    for name in [BASE, OVERLAY] {
        let path = dir.join(name);
        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Ok(_) => return Err(Error::Exists(path)),
            Err(e) => return Err(Error::open(&path, e)),
        }
    }
    Ok(())
}

/// The demo's folder and, with `--dir`, a private folder for the NBD socket: the socket goes
/// in a folder only we can enter (mode 0700): the demo's own when it makes it; with --dir, a
/// private one under the temp dir, removed when the demo ends.
fn demo_dirs(dir: Option<PathBuf>) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    match dir {
        Some(d) => {
            prepare_dir(&d)?;
            let sock_dir = tempfile::Builder::new()
                .prefix("qedstream-demo-nbd-")
                .permissions(private())
                .tempdir()
                .map_err(Error::io("creating a private folder for the NBD socket"))?;
            Ok((d, Some(sock_dir)))
        }
        None => {
            let d = tempfile::Builder::new()
                .prefix("qedstream-demo-")
                .permissions(private())
                .tempdir()
                .map_err(Error::io("creating the demo's folder"))?
                .keep();
            Ok((d, None))
        }
    }
}

/// Step 2: serves the base over NBD when qemu-nbd is installed; the backing name the overlay
/// records, and the server.
fn serve_base(
    signals: &SignalExit,
    sock_dir: &Path,
    base: &Path,
) -> Result<(String, Option<(Helper, String)>)> {
    let served = serve(signals, sock_dir, base)?;
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
            BASE.to_string()
        }
    };
    Ok((backing_name, served))
}

/// Step 4: reads 1 MiB at offset 0 through copy-on-read; the device's counters and the first
/// byte.
fn read_through(overlay: &Path) -> Result<(copy_on_read::CorStats, u8)> {
    let rt = engine::io_runtime()?;
    let r = rt.block_on(async {
        let dev = Arc::new(open_device(overlay, crate::demo_gate()).await?);
        let buf = dev
            .read_at(0, vec![0u8; 1 << 20])
            .await
            .map_err(Error::device)?;
        let stats = dev.stats();
        dev.close().await.map_err(Error::device)?;
        Ok::<_, Error>((stats, buf[0]))
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    r
}

/// What step 6 found: the overlay's content equals the base, `qemu-img check`'s exit code
/// for it, and whether its backing link is gone.
struct Verdict {
    same: bool,
    check: i32,
    unlinked: bool,
}

/// Step 6: reads the overlay through a chain reader (where it still lacks clusters, they are
/// the backing's: the image itself never reads its backing) and compares it with the base.
fn verify(overlay: &Path, base: &Path, size: u64) -> Result<Verdict> {
    // Read through the copy-on-read device (copy-on-read off): where the overlay still
    // lacks clusters, they are the backing's (the image itself never reads its backing).
    let options = copy_on_read::CorOptions {
        read_only: true,
        copy_on_read: false,
        ..copy_on_read::CorOptions::default()
    };
    let image = copy_on_read::SyncDevice::open(overlay, options).map_err(Error::device)?;
    let report = image
        .image()
        .check(Repair::None)
        .map_err(|e| Error::image(overlay, e))?;
    let base_file = std::fs::File::open(base).map_err(|e| Error::open(base, e))?;
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    let mut same = true;
    let mut at = 0;
    while at < size {
        image.read_at(&mut a, at).map_err(Error::device)?;
        Storage::read_at(&base_file, &mut b, at).map_err(|e| Error::open(base, e))?;
        same &= a == b;
        at += 1 << 20;
    }
    Ok(Verdict {
        same,
        check: report.exit_code(),
        unlinked: image.image().backing_name().is_none(),
    })
}

/// Step 6 and 7: says what was found; the exit code.
fn report(overlay: &Path, v: &Verdict) -> Result<u8> {
    say(
        6,
        &format!(
            "checked {}: content {} the base, check {}, backing link {}",
            overlay.display(),
            if v.same { "equals" } else { "DIFFERS FROM" },
            if v.check == 0 {
                "clean".to_string()
            } else {
                format!("exit {}", v.check)
            },
            if v.unlinked { "dropped" } else { "still there" }
        ),
    )?;
    if v.same && v.check == 0 && v.unlinked {
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

/// Runs the demo in `dir` (a new private folder under the temp dir by default, kept) with a
/// base of `size`; with `vm`, a guest boots on the overlay while `qedstream serve` streams it
/// ([`crate::demo_vm`]).
pub fn run(dir: Option<PathBuf>, size: u64, vm: bool) -> Result<u8> {
    let size = size.max(4 << 20) / (1 << 20) * (1 << 20);
    // Before anything is built: what a guest needs, or why there can be none.
    let kit = if vm {
        Some(crate::demo_vm::find_kit()?)
    } else {
        None
    };
    let (dir, sock_dir) = demo_dirs(dir)?;
    let signals = SignalExit::install("demo", &format!("the files are kept in {}", dir.display()))?;
    let base = dir.join(BASE);
    let overlay = dir.join(OVERLAY);
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
    let (backing_name, served) = serve_base(
        &signals,
        sock_dir.as_ref().map_or(&dir, |d| d.path()),
        &base,
    )?;

    let options = CreateOptions {
        backing: Some((backing_name.clone(), BackingFormat::Raw)),
        ..CreateOptions::new(size)
    };
    Image::create(&create_new(&overlay)?, &options).map_err(|e| Error::image(&overlay, e))?;
    say(
        3,
        &format!(
            "created {} (QED) on backing {backing_name} (raw)",
            overlay.display()
        ),
    )?;

    if let Some(kit) = kit {
        let sock_path = sock_dir.as_ref().map_or(dir.as_path(), |d| d.path());
        let same =
            crate::demo_vm::boot_while_streaming(&kit, &signals, &overlay, &base, sock_path, size)?;
        drop(served);
        drop(sock_dir);
        let code = report(&overlay, &verify(&overlay, &base, size)?)?;
        return Ok(if same { code } else { 1 });
    }
    let (stats, first) = read_through(&overlay)?;
    say(
        4,
        &format!(
            "read 1 MiB at offset 0 through copy-on-read: first byte {first:#04x}; {} KiB fetched from the backing and stored in the overlay",
            stats.cor_bytes >> 10
        ),
    )?;

    say(5, "streaming the rest:")?;
    crate::progress::run(StreamCommand {
        image: overlay.clone(),
        rate: None,
        keep_backing: false,
        json: false,
        step: None,
        gate: crate::demo_gate(),
        in_flight: 4,
        on_error: engine::job::OnError::Report,
        // SIGINT ends the demo through `signals`, as SIGTERM does.
        cancel_on_sigint: false,
    })?;
    drop(served);
    drop(sock_dir);
    report(&overlay, &verify(&overlay, &base, size)?)
}
