//! # qedstream-benches: measurements, not assertions
//!
//! - `cargo bench -p qedstream-benches --bench qed`: criterion benches of the `qed` crate
//!   (mapping lookups, sequential allocating writes, random writes).
//! - `cargo run --release -p qedstream-benches --bin qed-compare`: the same workloads run side
//!   by side with `qemu-io` and `qemu-img convert -O qed` in one run, printed as ratios.
//!
//! Helpers shared by the runners live here (server processes: [`serve_command`] and
//! [`start_until_ready`], [`qsd_with_qed_nodes`], [`wait_for_server`], [`terminate`]); [`vhost`]: the vhost-user-blk servers compared.

pub mod vhost;

/// A small, fast, seeded generator (xorshift64*), so runs are repeatable; shared with the
/// tests.
pub use qedstream_tests::XorShift;

/// Writes a sparse file of `size` bytes: extents of 64 KiB to 8 MiB, each random data with
/// probability `data_percent`/100, the rest holes. Returns the data bytes written.
pub fn sparse_random_file(path: &std::path::Path, size: u64, data_percent: u64, seed: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create sparse file");
    f.set_len(size).expect("size sparse file");
    let mut rng = XorShift::new(seed);
    let mut buf = vec![0u8; 8 << 20];
    let (mut pos, mut data) = (0u64, 0u64);
    while pos < size {
        let len = (65536u64 << (rng.next_u64() % 8)).min(size - pos);
        if rng.next_u64() % 100 < data_percent {
            rng.fill(&mut buf[..len as usize]);
            f.write_all_at(&buf[..len as usize], pos)
                .expect("write sparse file");
            data += len;
        }
        pos += len;
    }
    f.sync_all().expect("sync sparse file");
    data
}

/// Writes a sparse file of `size` bytes in 1 MiB extents, each random data with probability
/// `data_percent`/100, the rest holes (the convert benchmark's source). Returns the data bytes.
pub fn sparse_mib_extents(path: &std::path::Path, size: u64, data_percent: u64, seed: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    const MIB: u64 = 1 << 20;
    let f = std::fs::File::create(path).expect("create sparse file");
    f.set_len(size).expect("size sparse file");
    let mut rng = XorShift::new(seed);
    let mut buf = vec![0u8; MIB as usize];
    let mut data = 0u64;
    for pos in (0..size).step_by(MIB as usize) {
        if rng.next_u64() % 100 < data_percent {
            let len = MIB.min(size - pos) as usize;
            rng.fill(&mut buf[..len]);
            f.write_all_at(&buf[..len], pos).expect("write sparse file");
            data += len as u64;
        }
    }
    f.sync_all().expect("sync sparse file");
    data
}

/// CPU seconds (user + system) of every child process reaped so far: the difference across
/// the wait of one child is that child's own CPU time.
pub fn children_cpu_seconds() -> f64 {
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one `rusage` into the valid, exclusively borrowed `usage`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Runs `cmd` to completion (it must succeed); its wall time and CPU seconds.
pub fn run_measured(cmd: &mut std::process::Command) -> (f64, f64) {
    let cpu0 = children_cpu_seconds();
    let t = std::time::Instant::now();
    let out = cmd.output().expect("spawning a measured command");
    let wall = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (wall, children_cpu_seconds() - cpu0)
}

/// The median of `v` (which must not be empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The `qedstream` binary the runners time: `$QEDSTREAM`, or the one beside the runner (built
/// with the same profile). Fails loudly when it is missing.
pub fn qedstream_binary() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("QEDSTREAM") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("the runner's own path");
    let p = exe.with_file_name("qedstream");
    assert!(
        p.exists(),
        "{} is missing: build it with the same profile (cargo build -p engine --bin qedstream) or set $QEDSTREAM",
        p.display()
    );
    p
}

/// `qedstream serve --output=json` ([`qedstream_binary`]), to which the caller adds its
/// arguments; started with [`start_until_ready`].
pub fn serve_command() -> std::process::Command {
    let mut cmd = std::process::Command::new(qedstream_binary());
    cmd.arg("serve").arg("--output=json");
    cmd
}

/// The JSON lines a `qedstream serve --output=json` prints after its ready line.
pub type ServeLines = std::io::Lines<std::io::BufReader<std::process::ChildStdout>>;

/// Starts `cmd` (a [`serve_command`]; stdout piped, stderr inherited) and waits for its
/// `ready` line: the process, and the lines it prints after that.
pub fn start_until_ready(cmd: &mut std::process::Command) -> (std::process::Child, ServeLines) {
    use std::io::BufRead;
    use std::process::Stdio;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = qedstream_tests::tools::spawn(cmd).expect("starting qedstream serve");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let first = lines.next().expect("ready line").expect("stdout");
    let ready: serde_json::Value = serde_json::from_str(&first).expect("JSON ready line");
    assert_eq!(ready["event"], "ready", "{ready}");
    (child, lines)
}

/// A `qemu-storage-daemon` command holding `image`'s block nodes and no export yet: a file
/// node `f0` and a qed node `d0` over it, both read-only unless `writable`, with O_DIRECT
/// (`cache.direct=on`, which the backing the qed node opens inherits) when `direct`, and with
/// `copy_on_read` a copy-on-read filter `c0` over `d0`. Returns the command and the node to
/// export (`c0` or `d0`); the caller adds the export (vhost-user-blk, NBD, ...).
pub fn qsd_with_qed_nodes(
    image: &std::path::Path,
    writable: bool,
    copy_on_read: bool,
    direct: bool,
) -> (std::process::Command, &'static str) {
    let ro = if writable { "off" } else { "on" };
    let cache = if direct { "on" } else { "off" };
    let img = image.display();
    let mut cmd = std::process::Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,filename={img},node-name=f0,read-only={ro},cache.direct={cache}"
        ))
        .arg("--blockdev")
        .arg(format!(
            "driver=qed,file=f0,node-name=d0,read-only={ro},cache.direct={cache}"
        ));
    if !copy_on_read {
        return (cmd, "d0");
    }
    cmd.arg("--blockdev")
        .arg("driver=copy-on-read,file=d0,node-name=c0");
    (cmd, "c0")
}

/// Waits until `ready()` holds (a socket exists, or accepts): 30 s at most, polled every
/// 10 ms. Panics when `child` (the server) exits first or the time runs out.
pub fn wait_for_server(child: &mut std::process::Child, ready: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !ready() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("server exited early: {status}");
        }
        assert!(std::time::Instant::now() < deadline, "server did not start");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Stops a server process: SIGTERM, then SIGKILL when it has not exited 10 s later; reaped
/// either way.
pub fn terminate(child: &mut std::process::Child) {
    // SAFETY: kill(2) on the pid of our own child, not yet reaped (reaped below).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}
