//! An NBD server (qemu-nbd, nbdkit) on a unix socket for tests: started and waited for, killed
//! (SIGKILL) on drop. A missing server binary fails the test loudly.

use std::ffi::OsString;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running NBD server process, killed on drop.
#[derive(Debug)]
pub struct NbdServer {
    child: Option<Child>,
    program: &'static str,
    args: Vec<OsString>,
    sock: PathBuf,
}

impl NbdServer {
    /// Starts `program args...`, which must listen on the unix socket `sock`, and waits (up to
    /// 10 s) until the socket accepts connections. The server must accept more than one
    /// connection (qemu-nbd: `--persistent`), as the wait connects once.
    pub fn start<A: Into<OsString>>(
        program: &'static str,
        args: impl IntoIterator<Item = A>,
        sock: &Path,
    ) -> NbdServer {
        let mut server = NbdServer {
            child: None,
            program,
            args: args.into_iter().map(Into::into).collect(),
            sock: sock.to_path_buf(),
        };
        server.spawn();
        server
    }

    /// `qemu-nbd` serving `file` (raw, read-only) as export `exp` on `sock`.
    pub fn qemu_nbd(file: &Path, sock: &Path) -> NbdServer {
        let mut args: Vec<OsString> = [
            "-r",
            "-f",
            "raw",
            "-x",
            "exp",
            "--persistent",
            "--shared=8",
            "-k",
        ]
        .map(OsString::from)
        .to_vec();
        args.push(sock.into());
        args.push(file.into());
        NbdServer::start("qemu-nbd", args, sock)
    }

    /// `nbdkit`'s file plugin serving `file` (read-only) as export `exp` on `sock`.
    pub fn nbdkit_file(file: &Path, sock: &Path) -> NbdServer {
        let mut args: Vec<OsString> = ["-f", "-r", "-e", "exp", "-U"].map(OsString::from).to_vec();
        args.push(sock.into());
        args.push("file".into());
        args.push(file.into());
        NbdServer::start("nbdkit", args, sock)
    }

    /// Starts `kind` ("qemu-nbd" or "nbdkit") serving `file` as export `exp` on `sock`.
    pub fn serve_file(kind: &str, file: &Path, sock: &Path) -> NbdServer {
        match kind {
            "qemu-nbd" => NbdServer::qemu_nbd(file, sock),
            "nbdkit" => NbdServer::nbdkit_file(file, sock),
            other => panic!("unknown NBD server {other}"),
        }
    }

    fn spawn(&mut self) {
        let program = self.program;
        let _ = std::fs::remove_file(&self.sock);
        let child = crate::tools::spawn(
            Command::new(program)
                .args(&self.args)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .unwrap_or_else(|e| {
            panic!("cannot run {program} (is it installed? .ci/run installs it): {e}")
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&self.sock).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("{program} exited early: {status}");
            }
            assert!(Instant::now() < deadline, "{program} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The socket the server listens on.
    pub fn sock(&self) -> &Path {
        &self.sock
    }

    /// `nbd+unix:///exp?socket=SOCK`.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///exp?socket={}", self.sock.display())
    }

    /// Kills the server (SIGKILL) and removes its socket.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.sock);
    }

    /// Stops the server the way an operator would (SIGTERM), so that qemu-nbd and
    /// qemu-storage-daemon close their images cleanly, and waits for it to exit; one still
    /// running after 10 s is killed and fails the test. Returns its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let program = self.program;
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("{program} is not running"));
        let pid = libc::pid_t::try_from(child.id()).expect("a pid fits pid_t");
        // SAFETY: kill(2) takes no pointers; `pid` is our own child, not yet waited for, so
        // the id cannot have been reused by another process.
        let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(
            sent,
            0,
            "SIGTERM to {program}: {}",
            std::io::Error::last_os_error()
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().expect("waiting for the server") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{program} did not exit within 10 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = std::fs::remove_file(&self.sock);
        status
    }

    /// Kills the server, if running, and starts it again with the same arguments.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
