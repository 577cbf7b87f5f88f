//! Helper processes that die with us: a server a command starts (`qemu-nbd` for `demo`) never
//! outlives the command, however the command ends.
//!
//! Three layers, each covering what the one before cannot:
//!
//! - [`Helper`] kills and reaps its process when dropped: a normal return or an error.
//! - [`die_with_us`] has the kernel send SIGKILL to the process when we die
//!   (`PR_SET_PDEATHSIG`): SIGKILL, a crash, an abort, where no code of ours runs.
//! - [`SignalExit`] turns SIGTERM, SIGHUP and SIGINT into an orderly end: every helper it
//!   started is killed and reaped, one line goes to stderr, and the process exits with
//!   128 + the signal's number.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that spawned the helper ends, not the process:
//! spawn helpers from a thread that lives as long as they should (the main thread), never from
//! a worker of a runtime's blocking pool.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::error::{Error, Result};

/// Makes the process `cmd` starts receive SIGKILL when the spawning thread (and so the
/// process) dies; a process whose parent is already gone by then does not start at all.
pub fn die_with_us(cmd: &mut Command) -> &mut Command {
    let parent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed. `die_with_parent` makes two system calls
    // (prctl, getppid), both async-signal-safe, and builds its error from an errno without
    // allocating; it takes no lock and touches no state shared with other threads.
    unsafe {
        cmd.pre_exec(move || die_with_parent(parent));
    }
    cmd
}

/// In the child before exec: ask for SIGKILL on the parent's death, then make sure the
/// parent did not die before that request (nobody would send the signal then).
fn die_with_parent(parent: u32) -> std::io::Result<()> {
    let signal = libc::SIGKILL as libc::c_ulong;
    let unused: libc::c_ulong = 0;
    // SAFETY: prctl(PR_SET_PDEATHSIG, sig) reads its integer arguments only; the unused ones
    // are passed as zeros as the manual asks.
    let r = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal, unused, unused, unused) };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: getppid takes no arguments and cannot fail.
    let now = unsafe { libc::getppid() };
    if u32::try_from(now).ok() != Some(parent) {
        // Reparented: the parent died before prctl, so no signal will ever come.
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(())
}

type Slot = Arc<Mutex<Option<Child>>>;

/// A helper process, killed and reaped when dropped (or by [`Helper::stop`]).
#[derive(Debug)]
pub struct Helper {
    name: String,
    child: Slot,
}

impl Helper {
    /// Starts `cmd` (under [`die_with_us`]) as the helper `name`.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Helper> {
        let child = die_with_us(cmd)
            .spawn()
            .map_err(Error::io(format!("starting {name}")))?;
        Ok(Helper {
            name: name.to_string(),
            child: Arc::new(Mutex::new(Some(child))),
        })
    }

    /// The helper's name, as given to [`Helper::spawn`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The helper's exit status if it has ended (it is reaped then), `None` while it runs.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        match self.child.lock().as_mut() {
            Some(child) => child
                .try_wait()
                .map_err(Error::io(format!("waiting for {}", self.name))),
            None => Err(Error::Helper {
                name: self.name.clone(),
                what: "was already stopped".into(),
            }),
        }
    }

    /// The helper's stdout, when it was piped and not taken before.
    pub fn take_stdout(&self) -> Option<std::process::ChildStdout> {
        self.child.lock().as_mut().and_then(|c| c.stdout.take())
    }

    /// Kills and reaps the helper (once; later calls do nothing).
    pub fn stop(&self) {
        stop_slot(&self.child);
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Kills and reaps the slot's process; whether there was one.
fn stop_slot(slot: &Slot) -> bool {
    match slot.lock().take() {
        Some(mut child) => {
            // It may have ended on its own already: then kill fails and wait reaps it.
            let _ = child.kill();
            let _ = child.wait();
            true
        }
        None => false,
    }
}

/// SIGTERM, SIGHUP and SIGINT, caught for as long as the process lives: the helpers started
/// with [`SignalExit::spawn`] are killed and reaped, one line goes to stderr
/// (`qedstream: WHAT stopped by SIGTERM (qemu-nbd stopped); NOTE`), and the process exits with
/// 128 + the signal's number.
///
/// Once installed, the three signals no longer end the process by themselves (tokio keeps its
/// handler until the process exits), so a command using this must not also cancel work on
/// SIGINT.
#[derive(Debug)]
pub struct SignalExit {
    helpers: Arc<Mutex<Vec<(String, Slot)>>>,
}

impl SignalExit {
    /// Installs the handlers (they are in place when this returns) and the thread that acts
    /// on them.
    pub fn install(what: &str, note: &str) -> Result<SignalExit> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(Error::io("starting the signal watcher"))?;
        let listen = |kind: SignalKind| -> Result<Signal> {
            let _entered = runtime.enter();
            signal(kind).map_err(Error::io("installing signal handlers"))
        };
        let mut term = listen(SignalKind::terminate())?;
        let mut hup = listen(SignalKind::hangup())?;
        let mut int = listen(SignalKind::interrupt())?;
        let helpers: Arc<Mutex<Vec<(String, Slot)>>> = Arc::default();
        let watched = Arc::clone(&helpers);
        let (what, note) = (what.to_string(), note.to_string());
        std::thread::Builder::new()
            .name("qedstream-signals".into())
            .spawn(move || {
                let caught = runtime.block_on(async {
                    tokio::select! {
                        Some(()) = term.recv() => Some((libc::SIGTERM, "SIGTERM")),
                        Some(()) = hup.recv() => Some((libc::SIGHUP, "SIGHUP")),
                        Some(()) = int.recv() => Some((libc::SIGINT, "SIGINT")),
                        else => None,
                    }
                });
                let Some((number, name)) = caught else {
                    return;
                };
                // Held to the end: no helper can be started past this point.
                let helpers = watched.lock();
                let stopped: Vec<&str> = helpers
                    .iter()
                    .filter(|(_, slot)| stop_slot(slot))
                    .map(|(helper, _)| helper.as_str())
                    .collect();
                let mut line = format!("qedstream: {what} stopped by {name}");
                if !stopped.is_empty() {
                    line += &format!(" ({} stopped)", stopped.join(", "));
                }
                if !note.is_empty() {
                    line += &format!("; {note}");
                }
                let _ = writeln!(std::io::stderr().lock(), "{line}");
                std::process::exit(128 + number);
            })
            .map_err(Error::io("starting the signal watcher"))?;
        Ok(SignalExit { helpers })
    }

    /// [`Helper::spawn`], and the helper is stopped when a signal ends the process.
    pub fn spawn(&self, name: &str, cmd: &mut Command) -> Result<Helper> {
        // Spawned under the lock: a signal either finds the helper listed or stops the
        // process before it starts.
        let mut helpers = self.helpers.lock();
        let helper = Helper::spawn(name, cmd)?;
        helpers.retain(|(_, slot)| slot.lock().is_some());
        helpers.push((name.to_string(), Arc::clone(&helper.child)));
        Ok(helper)
    }
}
