//! A running `qedstream serve --output=json` for tests: its JSON lines read on a thread, its
//! first ("ready") line checked and kept, signals sent by pid, killed (SIGKILL) on drop. The
//! binary's path is the caller's (`env!("CARGO_BIN_EXE_qedstream")` expands only in the
//! engine's own tests).
//!
//! ```no_run
//! use qedstream_tests::served::Served;
//! let dir = qedstream_tests::tempdir();
//! let sock = dir.path().join("nbd.sock");
//! let mut served = Served::start(
//!     "target/debug/qedstream".as_ref(),
//!     dir.path(),
//!     &["--nbd", sock.to_str().unwrap(), "--stream", "top.qed"],
//! );
//! let uri = served.uri();
//! served.wait_for("completed");
//! assert_eq!(served.terminate(), 0);
//! # let _ = uri;
//! ```

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A hang is a failure: the longest any awaited line or exit may take.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A running `qedstream serve --output=json`, killed on drop.
#[derive(Debug)]
pub struct Served {
    child: Option<Child>,
    lines: mpsc::Receiver<Value>,
    /// The first line, `{"event":"ready",...}`.
    pub ready: Value,
}

impl Served {
    /// Starts `program serve --output=json ARGS...` in `dir` and waits for its ready line.
    pub fn start(program: &Path, dir: &Path, args: &[&str]) -> Served {
        Served::start_with_stderr(program, dir, args, Stdio::inherit())
    }

    /// [`Served::start`] with stderr sent to the file `log` (created or truncated), for tests
    /// that read what the server logs.
    pub fn start_logged(program: &Path, dir: &Path, args: &[&str], log: &Path) -> Served {
        let file = std::fs::File::create(log)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        Served::start_with_stderr(program, dir, args, Stdio::from(file))
    }

    fn start_with_stderr(program: &Path, dir: &Path, args: &[&str], stderr: Stdio) -> Served {
        let mut cmd = Command::new(program);
        cmd.current_dir(dir)
            .arg("serve")
            .arg("--output=json")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = crate::tools::spawn(&mut cmd)
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                    panic!("serve printed a line that is not JSON: {line:?}: {e}")
                });
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        let mut served = Served {
            child: Some(child),
            lines,
            ready: Value::Null,
        };
        served.ready = served.next_line();
        assert_eq!(
            served.ready["event"], "ready",
            "first line: {}",
            served.ready
        );
        served
    }

    /// The first NBD URI of the ready line.
    pub fn uri(&self) -> String {
        self.ready["uris"][0]
            .as_str()
            .unwrap_or_else(|| panic!("no NBD URI in the ready line: {}", self.ready))
            .to_string()
    }

    /// The next line of stdout (a hang of [`DEADLINE`] fails the test).
    pub fn next_line(&mut self) -> Value {
        self.lines
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|e| panic!("no line from qedstream serve within 60 s: {e}"))
    }

    /// The lines printed so far and not yet read, without waiting.
    pub fn pending(&mut self) -> Vec<Value> {
        self.lines.try_iter().collect()
    }

    /// Reads lines until one whose `event` is `name`; returns it.
    pub fn wait_for(&mut self, name: &str) -> Value {
        loop {
            let v = self.next_line();
            if v["event"] == name {
                return v;
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: i32) {
        let pid = i32::try_from(self.pid()).expect("pid");
        // SAFETY: kill() only sends a signal to our own child, whose pid we hold unreaped.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill failed");
    }

    /// Waits for the process to exit (a hang of [`DEADLINE`] fails the test); its exit code
    /// (-1 when killed by a signal).
    pub fn wait(&mut self) -> i32 {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().expect("waiting") {
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "qedstream serve did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().expect("waiting").is_none())
    }

    /// SIGTERM, then [`Served::wait`].
    pub fn terminate(&mut self) -> i32 {
        self.signal(libc::SIGTERM);
        self.wait()
    }

    /// SIGKILL, and reaped.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.kill();
    }
}
