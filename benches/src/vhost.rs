//! The vhost-user-blk servers the runners compare: `qedstream serve --vhost-user-blk` (the
//! binary, as users run it) and qemu-storage-daemon's `--export type=vhost-user-blk`, started
//! and stopped as processes, with their CPU time and their block jobs asked over QMP.

use std::path::Path;
use std::process::{Child, Stdio};

use qedstream_tests::qmp::Qmp;
use qedstream_tests::tools;
use serde_json::json;

use crate::{qsd_with_qed_nodes, serve_command, start_until_ready, terminate, wait_for_server};

/// A server process, SIGTERM then SIGKILL when stopped.
#[derive(Debug)]
pub struct Server {
    child: Child,
}

impl Server {
    /// User + system CPU seconds the server has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("the server's /proc/PID/stat");
        // Fields after the command name (which is in parentheses and may hold spaces).
        let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        // SAFETY: sysconf only reads a system constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        ticks / hz
    }

    /// Stops the server: SIGTERM, SIGKILL after 10 s ([`terminate`]).
    pub fn stop(mut self) {
        terminate(&mut self.child);
    }
}

/// Waits until `sock` exists ([`wait_for_server`]; a vhost-user socket is not probed by
/// connecting, which would open a vhost-user session).
pub fn wait_for_socket(sock: &Path, child: &mut Child) {
    wait_for_server(child, || sock.exists());
}

/// `qedstream serve --output=json --vhost-user-blk SOCK [--read-only] IMAGE`, waited for.
pub fn start_ours(image: &Path, sock: &Path, read_only: bool) -> Server {
    start_ours_with(image, sock, read_only, &[])
}

/// [`start_ours`] with more arguments to `serve`.
pub fn start_ours_with(image: &Path, sock: &Path, read_only: bool, extra: &[&str]) -> Server {
    let _ = std::fs::remove_file(sock);
    let mut cmd = serve_command();
    cmd.arg("--vhost-user-blk").arg(sock).args(extra);
    if read_only {
        cmd.arg("--read-only");
    }
    cmd.arg(image);
    let (child, lines) = start_until_ready(&mut cmd);
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
    Server { child }
}

/// qemu-storage-daemon exporting `image` over vhost-user-blk: a read-only qed node, or
/// (`cor`) a writable qed over its backing under a copy-on-read filter.
pub fn start_qsd(image: &Path, sock: &Path, cor: bool) -> Server {
    let _ = std::fs::remove_file(sock);
    let (mut cmd, node) = qsd_with_qed_nodes(image, cor, cor, false);
    cmd.arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name={node},addr.type=unix,addr.path={},writable={},num-queues=1",
            sock.display(),
            if cor { "on" } else { "off" }
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut child =
        tools::spawn(&mut cmd).expect("cannot run qemu-storage-daemon (is it installed?)");
    wait_for_socket(sock, &mut child);
    Server { child }
}

/// qemu-storage-daemon exporting a writable qed `image` over vhost-user-blk, with a QMP
/// monitor on `qmp` (for block-stream).
pub fn start_qsd_streamable(image: &Path, sock: &Path, qmp: &Path) -> Server {
    let _ = std::fs::remove_file(sock);
    let _ = std::fs::remove_file(qmp);
    let (mut cmd, _) = qsd_with_qed_nodes(image, true, false, false);
    cmd.arg("--chardev")
        .arg(format!("socket,id=m,path={},server=on,wait=off", qmp.display()))
        .arg("--monitor")
        .arg("chardev=m")
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on,num-queues=1",
            sock.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut child =
        tools::spawn(&mut cmd).expect("cannot run qemu-storage-daemon (is it installed?)");
    wait_for_socket(sock, &mut child);
    wait_for_socket(qmp, &mut child);
    Server { child }
}

/// Whether the server behind the QMP socket `qmp` still has a block job.
pub fn job_running(qmp: &Path) -> bool {
    let mut monitor = Qmp::negotiated(qmp);
    let reply = monitor.execute(json!({"execute": "query-block-jobs"}), &mut Vec::new());
    let jobs = reply["return"]
        .as_array()
        .expect("query-block-jobs answers a list");
    jobs.iter()
        .any(|job| !matches!(job["status"].as_str(), Some("concluded" | "null")))
}

/// Starts `name` ("ours" or "QSD") serving the overlay `image` on `sock` with its stream job
/// running at `rate` bytes per second, its QMP socket at `qmp` (ours: `serve --stream --rate
/// --control`; QSD: `block-stream` with `speed`, whose copy-on-read filter the export then
/// reads through).
pub fn start_streaming(name: &str, image: &Path, sock: &Path, qmp: &Path, rate: u64) -> Server {
    let _ = std::fs::remove_file(qmp);
    if name == "ours" {
        let rate = rate.to_string();
        let control = qmp.to_str().expect("UTF-8 scratch path");
        let args = ["--stream", "--rate", &rate, "--control", control];
        return start_ours_with(image, sock, false, &args);
    }
    let server = start_qsd_streamable(image, sock, qmp);
    let mut monitor = Qmp::negotiated(qmp);
    let command = json!({"execute": "block-stream",
        "arguments": {"job-id": "s", "device": "d0", "speed": rate}});
    let reply = monitor.execute(command, &mut Vec::new());
    assert!(reply.get("return").is_some(), "block-stream: {reply}");
    server
}
