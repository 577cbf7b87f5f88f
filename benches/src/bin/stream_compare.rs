//! The stream job against QEMU's block-stream (qemu-storage-daemon, driven over QMP), on the
//! same image, in one run: a 1 GiB base with 60% random data in 64 KiB..8 MiB extents, the rest
//! holes, under an empty QED overlay, backed (a) by the raw file and (b) by qemu-nbd on a unix
//! socket. Times are job wall times (ours in-process: open, stream, unlink, close; QEMU's from
//! the block-stream command to BLOCK_JOB_COMPLETED). Prints medians and QEMU time / our time.
//! Each result is checked with `qemu-img compare` against the base.
//!
//! `cargo run --release -p qedstream-benches --bin stream-compare [-- --quick]`

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use copy_on_read::{CorDevice, CorOptions};
use engine::stream::{StreamJob, StreamOptions};
use qedstream_benches::sparse_random_file;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("qemu-utils is required");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qmp(
    stream: &mut UnixStream,
    reader: &mut BufReader<UnixStream>,
    cmd: &str,
) -> serde_json::Value {
    stream.write_all(cmd.as_bytes()).unwrap();
    stream.write_all(b"\n").unwrap();
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "QMP closed");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v.get("return").is_some() || v.get("error").is_some() {
            return v;
        }
    }
}

/// QEMU's block-stream of `image` (in `dir`); returns the job's wall time.
fn qemu_stream(dir: &Path, image: &str) -> Duration {
    let sock = dir.join("qmp.sock");
    let _ = std::fs::remove_file(&sock);
    let daemon = Killed(
        Command::new("qemu-storage-daemon")
            .current_dir(dir)
            .args([
                "--blockdev",
                &format!("driver=file,node-name=f,filename={image}"),
                "--blockdev",
                "driver=qed,node-name=top,file=f",
                "--chardev",
                &format!("socket,id=m,path={},server=on,wait=off", sock.display()),
                "--monitor",
                "chardev=m",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon is required"),
    );
    let mut stream = loop {
        if let Ok(s) = UnixStream::connect(&sock) {
            break s;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut greeting = String::new();
    reader.read_line(&mut greeting).unwrap();
    qmp(
        &mut stream,
        &mut reader,
        r#"{"execute":"qmp_capabilities"}"#,
    );
    let t = Instant::now();
    let r = qmp(
        &mut stream,
        &mut reader,
        r#"{"execute":"block-stream","arguments":{"job-id":"s","device":"top"}}"#,
    );
    assert!(r.get("return").is_some(), "{r}");
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "QMP closed");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["event"] == "BLOCK_JOB_COMPLETED" {
            assert!(v["data"].get("error").is_none(), "{v}");
            break;
        }
    }
    let elapsed = t.elapsed();
    let _ = qmp(&mut stream, &mut reader, r#"{"execute":"quit"}"#);
    let mut daemon = daemon;
    let _ = daemon.0.wait();
    elapsed
}

fn our_stream(rt: &tokio::runtime::Runtime, image: &Path) -> Duration {
    rt.block_on(async {
        let t = Instant::now();
        let dev = Arc::new(CorDevice::open(image, CorOptions::default()).await.unwrap());
        let outcome = StreamJob::start(dev.clone(), StreamOptions::default())
            .wait()
            .await
            .unwrap();
        assert!(outcome.unlinked);
        copy_on_read::BlockDevice::close(&*dev).await.unwrap();
        t.elapsed()
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let runs = if quick { 1 } else { 3 };
    let size: u64 = if quick { 256 << 20 } else { 1 << 30 };
    let dir =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .unwrap();
    let d = dir.path();
    let data = sparse_random_file(&d.join("base.raw"), size, 60, 11);
    println!(
        "base: {} MiB, {} MiB of data ({:.0}%)",
        size >> 20,
        data >> 20,
        data as f64 * 100.0 / size as f64
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sock = d.join("nbd.sock");
    let _nbd = Killed(
        Command::new("qemu-nbd")
            .args(["-r", "-t", "-e", "8", "-f", "raw", "-k"])
            .arg(&sock)
            .arg(d.join("base.raw"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-nbd is required"),
    );
    while !sock.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    for (name, backing) in [
        ("raw file", "base.raw".to_string()),
        ("qemu-nbd (unix socket)", uri),
    ] {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            for img in ["ours.qed", "qemu.qed"] {
                let _ = std::fs::remove_file(d.join(img));
                run(Command::new("qemu-img")
                    .current_dir(d)
                    .args(["create", "-f", "qed", "-b", &backing, "-F", "raw", img]));
            }
            ours.push(our_stream(&rt, &d.join("ours.qed")));
            theirs.push(qemu_stream(d, "qemu.qed"));
            for img in ["ours.qed", "qemu.qed"] {
                run(Command::new("qemu-img")
                    .current_dir(d)
                    .args(["compare", "-f", "qed", "-F", "raw", img, "base.raw"]));
            }
        }
        let (o, q) = (median(ours), median(theirs));
        let mbs = |t: Duration| data as f64 / t.as_secs_f64() / 1e6;
        println!(
            "stream over {name:<24} ours {:>7.3}s ({:>6.0} MB/s of data)   qemu block-stream {:>7.3}s ({:>6.0} MB/s)   qemu/ours {:>5.2}x",
            o.as_secs_f64(),
            mbs(o),
            q.as_secs_f64(),
            mbs(q),
            q.as_secs_f64() / o.as_secs_f64()
        );
    }
}
