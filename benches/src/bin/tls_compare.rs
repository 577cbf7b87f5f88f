//! `tls-compare`: what TLS costs an NBD export. `nbdcopy URI null:` reads the same fully
//! local QED image from four servers on a unix socket, interleaved run by run:
//!
//! 1. `qedstream serve --read-only` in plain text (`nbd+unix://`);
//! 2. the same with `--tls-creds DIR` (client certificates verified; `nbds+unix://` with
//!    libnbd's `tls-certificates=DIR`);
//! 3. `qemu-nbd -r -f qed` in plain text;
//! 4. `qemu-nbd -r -f qed --tls-creds` (a `tls-creds-x509` object, `verify-peer=on`).
//!
//! It prints the median wall time of each, the median per-run ratios (our TLS / our plain: the
//! cost of TLS; qemu-nbd TLS / our TLS), and each server's CPU seconds per GiB read (from the
//! rusage of the reaped server). Credentials are made by `certtool` (as in the tests).
//!
//! ```text
//! cargo build --release -p engine --bin qedstream
//! cargo run --release -p qedstream-benches --bin tls-compare [-- --quick] [--runs N]
//! ```
//! `--quick`: 256 MiB, one run; otherwise 1 GiB, 3 runs. The `qedstream` binary is the one
//! beside the runner (same profile) or `$QEDSTREAM`; scratch files go under `$BENCH_DIR`
//! (default /var/tmp). Needs qemu-img, qemu-nbd, nbdcopy and certtool.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qedstream_benches::{children_cpu_seconds, median, qedstream_binary};
use qedstream_tests::tls::{Pki, Validity};
use qedstream_tests::tools;

/// The servers compared, in the order of each run.
const SERVERS: [&str; 4] = ["ours plain", "ours TLS", "qemu-nbd plain", "qemu-nbd TLS"];

/// A server process, stopped with SIGTERM and reaped for its CPU time.
struct Server(Child);

impl Server {
    /// Waits until `sock` accepts (30 s at most: a server that never listens fails the run).
    fn wait_for(mut self, sock: &Path) -> Server {
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(sock).is_err() {
            if let Ok(Some(status)) = self.0.try_wait() {
                panic!("the server exited early: {status}");
            }
            assert!(Instant::now() < deadline, "the server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        self
    }

    /// SIGTERM, reaped; its CPU seconds over its life.
    fn stop(mut self) -> f64 {
        let cpu0 = children_cpu_seconds();
        // SAFETY: kill(2) on the pid of our own child, not yet reaped (wait below).
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
        children_cpu_seconds() - cpu0
    }
}

/// Starts server `which` of [`SERVERS`] on `sock`; the URI nbdcopy reads.
fn start(
    which: usize,
    image: &Path,
    sock: &Path,
    server: &Path,
    client: &Path,
) -> (Server, String) {
    let _ = std::fs::remove_file(sock);
    let tls = which % 2 == 1;
    let mut cmd = if which < 2 {
        let mut c = Command::new(qedstream_binary());
        c.args(["serve", "--read-only", "--nbd"]).arg(sock);
        if tls {
            c.arg("--tls-creds").arg(server);
        }
        c
    } else {
        let mut c = Command::new("qemu-nbd");
        if tls {
            let object = format!(
                "tls-creds-x509,id=tls0,endpoint=server,verify-peer=on,dir={}",
                server.display()
            );
            c.args(["--object", &object, "--tls-creds", "tls0"]);
        }
        c.args(["-r", "-f", "qed", "--persistent", "--shared=8", "-k"])
            .arg(sock);
        c
    };
    cmd.arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let child = tools::spawn(&mut cmd).expect("starting a server (is qemu-nbd installed?)");
    let uri = if tls {
        format!(
            "nbds+unix:///?socket={}&tls-certificates={}",
            sock.display(),
            client.display()
        )
    } else {
        format!("nbd+unix:///?socket={}", sock.display())
    };
    (Server(child).wait_for(sock), uri)
}

/// `nbdcopy URI null:`: its wall time.
fn nbdcopy(dir: &Path, uri: &str) -> f64 {
    let t = Instant::now();
    tools::ok(dir, "nbdcopy", &[uri, "null:"]);
    t.elapsed().as_secs_f64()
}

/// A fully local QED image of `size` bytes of seeded random data.
fn image(dir: &Path, size: u64) -> PathBuf {
    let raw = dir.join("data.raw");
    qedstream_benches::sparse_random_file(&raw, size, 100, 11);
    let qed = dir.join("image.qed");
    tools::ok(
        dir,
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qed", "data.raw", "image.qed"],
    );
    std::fs::remove_file(raw).expect("removing the raw source");
    qed
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .map_or(if quick { 1 } else { 3 }, |n| n.parse().expect("--runs N"));
    let size: u64 = if quick { 256 << 20 } else { 1 << 30 };
    let base =
        std::env::var_os("BENCH_DIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
    let dir = tempfile::Builder::new()
        .prefix("tls-compare-")
        .tempdir_in(base)
        .expect("scratch dir");
    let d = dir.path();
    let pki = Pki::new(&d.join("pki"), "tls-compare CA");
    let server = pki.server("server", &["localhost"], Validity::Current);
    let client = pki.client("client", true, Validity::Current);
    let image = image(d, size);
    let sock = d.join("nbd.sock");
    println!(
        "tls-compare: nbdcopy of a {} MiB local QED image to null:, {runs} run(s), unix socket",
        size >> 20
    );
    let mut walls = vec![Vec::new(); SERVERS.len()];
    let mut cpus = vec![Vec::new(); SERVERS.len()];
    for _ in 0..runs {
        for (i, wall) in walls.iter_mut().enumerate() {
            let (s, uri) = start(i, &image, &sock, &server, &client);
            wall.push(nbdcopy(d, &uri));
            cpus[i].push(s.stop() / (size as f64 / f64::from(1u32 << 30)));
        }
    }
    for (i, name) in SERVERS.iter().enumerate() {
        let wall = median(&walls[i]);
        println!(
            "{name:>15}: {wall:.3} s ({:.0} MiB/s), server CPU {:.2} s/GiB",
            (size >> 20) as f64 / wall,
            median(&cpus[i])
        );
    }
    let ratio = |a: usize, b: usize| {
        let r: Vec<f64> = walls[a].iter().zip(&walls[b]).map(|(x, y)| x / y).collect();
        median(&r)
    };
    println!(
        "ours TLS / ours plain: {:.2}x wall   qemu-nbd TLS / qemu-nbd plain: {:.2}x   qemu-nbd TLS / ours TLS: {:.2}x",
        ratio(1, 0),
        ratio(3, 2),
        ratio(3, 1)
    );
}
