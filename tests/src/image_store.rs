//! A central image store for tests: files served over HTTP with byte ranges ([`HttpStore`]:
//! `tests/scripts/range_http_server.py` under `python3`, on 127.0.0.1 and a free port), and
//! nbdkit's curl plugin exporting one of them over NBD ([`curl_export`]: an [`NbdServer`],
//! killed on drop, restartable on the same socket).
//!
//! `python3 -m http.server` is not enough: it ignores the Range header, and nbdkit's curl
//! plugin refuses a server without byte ranges. A missing `python3`, nbdkit, curl plugin or
//! filter **fails the test** with a message naming it.
//!
//! ```no_run
//! use qedstream_tests::image_store::{curl_export, HttpStore};
//! let dir = qedstream_tests::tempdir();
//! std::fs::write(dir.path().join("base.raw"), vec![7u8; 1 << 20]).unwrap();
//! let store = HttpStore::start(dir.path(), None);
//! let export = curl_export(&store.url("base.raw"), &dir.path().join("store.sock"));
//! println!("{} serves {}", export.uri(), store.url("base.raw"));
//! ```

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::nbd_server::NbdServer;

/// The HTTP server script, in the source tree.
pub const RANGE_HTTP_SERVER: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/range_http_server.py");

/// The nbdkit filters [`curl_export`] stacks on the curl plugin, top (client side) first:
/// `retry-request` retries a failed HTTP request (2 more times, 2 s apart), `cache` keeps
/// what was read (with `cache-on-read=true`) so that overlays streaming the same base fetch
/// each block from the store once per nbdkit.
pub const CURL_FILTERS: [&str; 2] = ["retry-request", "cache"];

/// How long the HTTP server may take to say where it listens.
const START_LIMIT: Duration = Duration::from_secs(10);

/// A running HTTP server of a directory (byte ranges, keep-alive), killed on drop; it can be
/// killed and started again on the same port ([`HttpStore::kill`], [`HttpStore::restart`]).
#[derive(Debug)]
pub struct HttpStore {
    child: Option<Child>,
    dir: PathBuf,
    base_url: String,
    /// The server's stderr, over every start: one line per request (an unlinked file, read
    /// with `pread`).
    log: File,
}

impl HttpStore {
    /// Serves `dir` on 127.0.0.1 and a free port, sending at most `rate` bytes a second over
    /// all requests together (`None`: unlimited), and waits until it listens.
    pub fn start(dir: &Path, rate: Option<u64>) -> HttpStore {
        let log = tempfile::tempfile().expect("a temporary file for the HTTP log");
        let (child, base_url) = spawn_server(dir, rate, 0, &log);
        HttpStore {
            child: Some(child),
            dir: dir.to_path_buf(),
            base_url,
            log,
        }
    }

    /// Kills the server (SIGKILL): the store is down, connections are reset.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server if it runs and starts it again on the same port, with `rate`.
    pub fn restart(&mut self, rate: Option<u64>) {
        self.kill();
        let port = self
            .base_url
            .trim_end_matches('/')
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .expect("the base URL names its port");
        let (child, base_url) = spawn_server(&self.dir, rate, port, &self.log);
        assert_eq!(base_url, self.base_url, "the store moved");
        self.child = Some(child);
    }

    /// The URL of `file` in the served directory.
    pub fn url(&self, file: &str) -> String {
        format!("{}{file}", self.base_url)
    }

    /// The server's log so far: one `GET /PATH STATUS start=S sent=N` line per request
    /// answered (and Python's own lines for errors).
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    /// Body bytes sent so far by requests that have ended (`sent=` summed over the log).
    pub fn bytes_sent(&self) -> u64 {
        self.log()
            .lines()
            .filter_map(|l| l.rsplit_once(" sent="))
            .map(|(_, n)| {
                n.parse::<u64>()
                    .unwrap_or_else(|e| panic!("a bad log line ({n:?}): {e}"))
            })
            .sum()
    }

    /// GET requests answered so far.
    pub fn gets(&self) -> usize {
        self.log().lines().filter(|l| l.starts_with("GET ")).count()
    }
}

impl Drop for HttpStore {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts the server script on `dir` (127.0.0.1, `port`, 0 for a free one) with its stderr
/// appended to `log`, and waits for its URL.
fn spawn_server(dir: &Path, rate: Option<u64>, port: u16, log: &File) -> (Child, String) {
    let mut cmd = Command::new("python3");
    cmd.arg(RANGE_HTTP_SERVER)
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--directory",
        ])
        .arg(dir)
        .args(["--rate", &rate.unwrap_or(0).to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log.try_clone().expect("duplicating the log's descriptor"));
    crate::tools::die_with_this_thread(&mut cmd);
    let mut child = crate::tools::spawn(&mut cmd).unwrap_or_else(|e| {
        panic!("cannot run python3 (is it installed? the image store's HTTP server needs it): {e}")
    });
    match first_line_within(&mut child, START_LIMIT) {
        Some(url) if url.starts_with("http://") => (child, url),
        other => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{RANGE_HTTP_SERVER} did not start (first line {other:?}): {}",
                read_log(log)
            );
        }
    }
}

/// The whole of an unlinked log file, read at offsets (its descriptor's offset is the
/// writer's).
fn read_log(log: &File) -> String {
    let len = log.metadata().map_or(0, |m| m.len());
    let mut buf = vec![0u8; usize::try_from(len).expect("a log of test size")];
    let mut done = 0;
    while done < buf.len() {
        match log.read_at(&mut buf[done..], done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) => panic!("reading the HTTP log: {e}"),
        }
    }
    buf.truncate(done);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The first line `child` prints on stdout, or `None` when none came within `limit`.
fn first_line_within(child: &mut Child, limit: Duration) -> Option<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line.trim_end().to_string());
    });
    rx.recv_timeout(limit).ok()
}

/// Fails the test, naming what is missing, unless nbdkit has the curl plugin and the
/// [`CURL_FILTERS`] (Debian's `nbdkit` package has them all).
pub fn require_nbdkit_curl() {
    let mut cmd = Command::new("nbdkit");
    cmd.args(CURL_FILTERS.map(|f| format!("--filter={f}")))
        .args(["curl", "--dump-plugin"]);
    let out = crate::tools::output(&mut cmd).unwrap_or_else(|e| {
        panic!("cannot run nbdkit (is it installed? .ci/run installs it): {e}")
    });
    assert!(
        out.status.success(),
        "nbdkit lacks the curl plugin or one of the filters {CURL_FILTERS:?} (Debian's nbdkit \
         package has them; .ci/run installs it): {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// `nbdkit -f -r --exit-with-parent -U SOCK --filter=retry-request --filter=cache curl URL
/// cache-on-read=true`: the README's recipe, on a unix socket, as export `""` (nbdkit's
/// only export). Kill it with [`NbdServer::kill`]; [`NbdServer::restart`] starts it again
/// on the same socket, with an empty cache.
pub fn curl_export(url: &str, sock: &Path) -> NbdServer {
    require_nbdkit_curl();
    let mut args: Vec<OsString> = ["-f", "-r", "--exit-with-parent", "-U"]
        .map(OsString::from)
        .to_vec();
    args.push(sock.into());
    args.extend(CURL_FILTERS.map(|f| OsString::from(format!("--filter={f}"))));
    args.extend(["curl".into(), url.into(), "cache-on-read=true".into()]);
    NbdServer::start("nbdkit", args, sock)
}

/// `nbd+unix:///?socket=SOCK`: the URI of [`curl_export`]'s export (nbdkit's default
/// export name is empty; [`NbdServer::uri`] names `exp`, which nbdkit also accepts).
pub fn export_uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}
