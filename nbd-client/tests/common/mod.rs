//! Shared test helpers: real servers (qemu-nbd, nbdkit) on unix sockets or 127.0.0.1 with ports
//! the test picks, one per test, killed on drop; fixture images; `nbdinfo --map`; and a scripted
//! misbehaving server.
#![allow(dead_code)]

pub mod scripted;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbd_client::{ClientConfig, Extent, Uri};

/// Panic loudly if a tool is missing: these tests must not skip silently.
pub fn require_tool(name: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "required tool `{name}` is not installed (apt-get install -y nbdkit libnbd-bin qemu-utils)"
    );
}

/// A free TCP port on 127.0.0.1 (bind port 0, read it, release it).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// Where a server listens.
#[derive(Debug, Clone)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(u16),
}

/// A running server process, killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Server {
    child: Option<Child>,
    pub listen: Listen,
    pub uri: Uri,
    program: String,
    args: Vec<String>,
    pid_file: PathBuf,
}

impl Server {
    fn spawn(
        program: &str,
        args: Vec<String>,
        listen: Listen,
        export: &str,
        pid_file: PathBuf,
    ) -> Server {
        require_tool(program);
        let uri = match &listen {
            Listen::Unix(p) => Uri::unix(p, export),
            Listen::Tcp(port) => Uri::tcp("127.0.0.1", *port, export),
        };
        let mut s = Server {
            child: None,
            listen,
            uri,
            program: program.into(),
            args,
            pid_file,
        };
        s.start();
        s
    }

    /// (Re)start the process with the same arguments and wait until it accepts connections.
    pub fn start(&mut self) {
        if let Listen::Unix(p) = &self.listen {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_file(&self.pid_file);
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.program));
        self.child = Some(child);
        self.wait_ready();
    }

    /// Ready when the server wrote its pid file (qemu-nbd and nbdkit write it after binding the
    /// socket). Probing with a connection would count against qemu-nbd's client limit (`-e`).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if self.pid_file.exists()
                && std::fs::metadata(&self.pid_file)
                    .map(|m| m.len() > 0)
                    .unwrap_or(false)
            {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("{} {:?} exited early: {status}", self.program, self.args);
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} did not start listening",
                self.program
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kill the process now (SIGKILL) and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.pid_file);
    }

    /// The URI as a string for external tools.
    pub fn uri_string(&self) -> String {
        self.uri.to_qemu_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A temporary directory per test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("nbd-client-test")
        .tempdir()
        .expect("tempdir")
}

fn pid_file_for(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".qemu-nbd.pid");
    PathBuf::from(p)
}

/// Start `qemu-nbd` on `image` (raw) with extra args (e.g. `-r`, `-e 4`), persistent.
pub fn qemu_nbd(image: &Path, listen: Listen, extra: &[&str]) -> Server {
    let pid_file = pid_file_for(image);
    let mut args: Vec<String> = vec![
        "-t".into(),
        "-f".into(),
        "raw".into(),
        format!("--pid-file={}", pid_file.display()),
    ];
    match &listen {
        Listen::Unix(p) => args.extend(["-k".into(), p.display().to_string()]),
        Listen::Tcp(port) => args.extend([
            "-b".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ]),
    }
    let mut export = String::new();
    let mut it = extra.iter();
    while let Some(a) = it.next() {
        args.push(a.to_string());
        if *a == "-x" {
            let name = it.next().expect("-x NAME");
            export = name.to_string();
            args.push(name.to_string());
        }
    }
    args.push(image.display().to_string());
    Server::spawn("qemu-nbd", args, listen, &export, pid_file)
}

/// Start `nbdkit -f` with the given plugin/filter arguments.
pub fn nbdkit(listen: Listen, args: &[&str]) -> Server {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let pid_file = std::env::temp_dir().join(format!(
        "nbdkit-test-{}-{}.pid",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    let mut a: Vec<String> = vec![
        "-f".into(),
        "--exit-with-parent".into(),
        "-P".into(),
        pid_file.display().to_string(),
    ];
    match &listen {
        Listen::Unix(p) => a.extend(["-U".into(), p.display().to_string()]),
        Listen::Tcp(port) => a.extend([
            "-i".into(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
        ]),
    }
    a.extend(args.iter().map(|s| s.to_string()));
    Server::spawn("nbdkit", a, listen, "", pid_file)
}

/// A deterministic pseudo-random generator (xorshift) for fixture data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Write a sparse raw image: alternating data extents (random bytes) and holes, 64 KiB-aligned.
/// Returns the image contents for comparison.
pub fn sparse_image(path: &Path, size: u64, seed: u64) -> Vec<u8> {
    use std::io::{Seek, SeekFrom, Write};
    let mut rng = Rng::new(seed);
    let mut content = vec![0u8; size as usize];
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).unwrap();
    let mut f = f;
    let unit = 64 * 1024u64;
    let mut at = 0u64;
    while at < size {
        let len = ((rng.next() % 8 + 1) * unit).min(size - at);
        if rng.next() % 10 < 6 {
            let buf = &mut content[at as usize..(at + len) as usize];
            rng.fill(buf);
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(buf).unwrap();
        }
        at += len;
    }
    f.sync_all().unwrap();
    content
}

/// `nbdinfo --map` parsed into extents (offset, length, type bits).
pub fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, u32)> {
    require_tool("nbdinfo");
    let out = Command::new("nbdinfo")
        .arg("--map")
        .arg(uri)
        .output()
        .expect("run nbdinfo");
    assert!(
        out.status.success(),
        "nbdinfo --map failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
            ))
        })
        .collect()
}

/// Our extents as (offset, length, type bits), merged like nbdinfo prints them.
pub fn as_map(extents: &[Extent]) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for e in extents {
        let t = u32::from(e.hole) | (u32::from(e.zero) << 1);
        match out.last_mut() {
            Some(last) if last.2 == t && last.0 + last.1 == e.offset => last.1 += e.length,
            _ => out.push((e.offset, e.length, t)),
        }
    }
    out
}

/// Merge adjacent entries of a map with equal type.
pub fn merge_map(m: &[(u64, u64, u32)]) -> Vec<(u64, u64, u32)> {
    let mut out: Vec<(u64, u64, u32)> = Vec::new();
    for &(o, l, t) in m {
        match out.last_mut() {
            Some(last) if last.2 == t && last.0 + last.1 == o => last.1 += l,
            _ => out.push((o, l, t)),
        }
    }
    out
}

/// A config for tests: short timeouts so failures are quick.
pub fn test_config() -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_secs(5),
        handshake_timeout: Duration::from_secs(5),
        request_timeout: Some(Duration::from_secs(10)),
        reconnect_delay: Duration::ZERO,
        ..ClientConfig::default()
    }
}

/// Block status over the whole export, window by window.
pub async fn full_map(client: &nbd_client::Client, window: u64) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < client.size() {
        let e = client
            .block_status(at, window.min(client.size() - at))
            .await
            .expect("block status");
        assert!(!e.is_empty());
        assert_eq!(e[0].offset, at);
        at = e.last().map(|x| x.offset + x.length).unwrap();
        out.extend(e);
    }
    out
}
