//! qemu-storage-daemon's block-stream, driven over QMP: the oracle (and the competitor) of
//! the stream job.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends one QMP command; returns its reply (skipping events).
fn qmp(stream: &mut UnixStream, reader: &mut BufReader<UnixStream>, cmd: &str) -> Value {
    stream.write_all(format!("{cmd}\n").as_bytes()).unwrap();
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "QMP closed");
        let v: Value = serde_json::from_str(&line).unwrap();
        if v.get("return").is_some() || v.get("error").is_some() {
            return v;
        }
    }
}

/// Streams the QED image `image` (a name in `dir`) with qemu-storage-daemon's block-stream
/// and waits for the job to complete without error; returns the job's wall time (from the
/// block-stream command to BLOCK_JOB_COMPLETED). A missing daemon fails loudly.
pub fn block_stream(dir: &Path, image: &str) -> Duration {
    let sock = dir.join("qmp.sock");
    let _ = std::fs::remove_file(&sock);
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.current_dir(dir)
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
        .stderr(Stdio::null());
    let child = crate::tools::spawn(&mut cmd).unwrap_or_else(|e| {
        panic!("cannot run qemu-storage-daemon (is it installed? .ci/run installs it): {e}")
    });
    let mut daemon = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("QMP socket: {e}"),
        }
    };
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut greeting = String::new();
    reader.read_line(&mut greeting).unwrap();
    let r = qmp(
        &mut stream,
        &mut reader,
        r#"{"execute":"qmp_capabilities"}"#,
    );
    assert!(r.get("return").is_some(), "{r}");
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
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["event"] == "BLOCK_JOB_COMPLETED" {
            assert!(v["data"].get("error").is_none(), "{v}");
            break;
        }
    }
    let elapsed = t.elapsed();
    // The daemon may close the socket as soon as it has parsed `quit`: no reply is awaited.
    let _ = stream.write_all(b"{\"execute\":\"quit\"}\n");
    let _ = daemon.0.wait();
    elapsed
}
