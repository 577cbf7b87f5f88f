//! A real Linux guest, booted under `qemu-system-x86_64` (TCG) from a disk served over NBD or
//! vhost-user-blk: it reads (and optionally writes) the whole disk and reports the sha256 of
//! what it read, so a test can compare the guest's view of an export with the host's view of
//! the image.
//!
//! The guest is a [`GuestKit`]: Debian's kernel as an uncompressed `vmlinux` (booted through
//! PVH) and a busybox initramfs whose `/init` (`guest/init` in the repository) hashes
//! `/dev/vda`. `guest/build-kit.sh` builds it once and caches it outside the tree; every test
//! process reuses it. A missing `qemu-system-x86_64`, a failed download or a guest that does
//! not report **fails the test** with the reason and the guest's console: nothing skips.
//!
//! ```no_run
//! use qedstream_tests::guest::{GuestAction, GuestDisk, GuestKit};
//! let report = GuestKit::get().boot(
//!     GuestDisk::Nbd { uri: "nbd+unix:///exp?socket=/tmp/nbd.sock".into(), read_only: true },
//!     GuestAction::Hash,
//! );
//! println!("{} in {:?}", report.sha256, report.elapsed);
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The script that builds (or finds cached) the kit and prints its directory.
pub const BUILD_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../guest/build-kit.sh");

/// The emulator the guest runs in.
pub const QEMU_SYSTEM: &str = "qemu-system-x86_64";

/// How long a kit build may take (a download of ~70 MB, unpacking, compression) before it
/// counts as hung.
const BUILD_DEADLINE: Duration = Duration::from_secs(900);

/// How long a boot may take before the guest counts as hung. A boot takes seconds; this is
/// generous because TCG shares the machine with compilers and other tests.
pub const BOOT_DEADLINE: Duration = Duration::from_secs(300);

/// The guest's memory, in MiB (a vhost-user disk will need it as a shared memory backend).
const GUEST_MEMORY_MIB: u32 = 256;

/// A built guest: the directory holding `vmlinux` and `initramfs.cpio.gz`.
#[derive(Clone, Debug)]
pub struct GuestKit {
    dir: PathBuf,
    kernel_version: String,
}

/// The disk the guest sees as `/dev/vda`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestDisk {
    /// An NBD export, e.g. `nbd+unix:///exp?socket=/path/to.sock`, attached as virtio-blk.
    /// `read_only` gives QEMU `readonly=on`, which a read-only export requires.
    Nbd {
        /// The export's URI.
        uri: String,
        /// Attach the disk read-only.
        read_only: bool,
    },
    /// A vhost-user-blk server listening on a unix socket: the server, not QEMU, runs the
    /// virtqueue, in the guest's memory (shared with it through a memfd backend). Whether the
    /// disk is read-only is the server's to say.
    VhostUserBlk {
        /// The server's socket.
        socket: PathBuf,
        /// The request queues QEMU asks for (`num-queues`; the server must offer as many).
        queues: u16,
    },
}

/// What the guest does with its disk before powering off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestAction {
    /// Hash the whole disk.
    Hash,
    /// Write `len` bytes of value `byte` at `offset` (flushed to the disk), then hash the
    /// whole disk as read back from the device.
    Write {
        /// Byte offset on the disk.
        offset: u64,
        /// Bytes to write.
        len: u64,
        /// The value of every byte written.
        byte: u8,
    },
}

/// What a guest that ran to the end reported.
#[derive(Clone, Debug)]
pub struct GuestReport {
    /// sha256 of the whole disk as the guest read it, lower-case hex.
    pub sha256: String,
    /// The disk's size as the guest saw it, in bytes.
    pub size: u64,
    /// The serial console, the kernel's messages included.
    pub console: String,
    /// Wall time from starting QEMU to its exit.
    pub elapsed: Duration,
    /// Seconds the guest's own hash of the disk took, by its clock (`dd` of the whole disk).
    pub hash_seconds: Option<f64>,
}

/// Why a kit could not be built or a guest did not report.
#[derive(Debug)]
pub enum GuestError {
    /// A program could not be started (not installed?).
    Tool {
        /// The program.
        program: String,
        /// Why it could not be started.
        source: std::io::Error,
    },
    /// `guest/build-kit.sh` failed.
    KitBuild {
        /// Its exit status (`None`: killed after the deadline).
        status: Option<ExitStatus>,
        /// Its standard error.
        stderr: String,
    },
    /// The kit directory lacks a file.
    KitIncomplete {
        /// The missing file.
        missing: PathBuf,
    },
    /// QEMU was still running at the deadline and was killed.
    Hung {
        /// The deadline.
        deadline: Duration,
        /// The console so far.
        console: String,
        /// The QEMU command line.
        command: String,
    },
    /// The guest (or QEMU) ended without a complete report.
    NoReport {
        /// What was wrong: the guest's own `QEDSTREAM-ERROR` line, or what was missing.
        problem: String,
        /// QEMU's exit status.
        status: ExitStatus,
        /// QEMU's standard error.
        stderr: String,
        /// The console.
        console: String,
        /// The QEMU command line.
        command: String,
    },
}

impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestError::Tool { program, source } => write!(
                f,
                "cannot run {program} ({source}); the guest tests need qemu-system-x86_64 \
                 (.ci/run installs it from bookworm-backports), apt-get and dpkg-deb"
            ),
            GuestError::KitBuild { status, stderr } => match status {
                Some(status) => write!(f, "{BUILD_SCRIPT} failed ({status}):\n{stderr}"),
                None => write!(f, "{BUILD_SCRIPT} hung (killed after {BUILD_DEADLINE:?})"),
            },
            GuestError::KitIncomplete { missing } => {
                write!(f, "the guest kit lacks {}", missing.display())
            }
            GuestError::Hung {
                deadline,
                console,
                command,
            } => write!(
                f,
                "the guest hung (QEMU killed after {deadline:?})\ncommand: {command}\n\
                 console:\n{console}"
            ),
            GuestError::NoReport {
                problem,
                status,
                stderr,
                console,
                command,
            } => write!(
                f,
                "the guest did not report: {problem}\nQEMU {status}, stderr:\n{stderr}\n\
                 command: {command}\nconsole:\n{console}"
            ),
        }
    }
}

impl std::error::Error for GuestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GuestError::Tool { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl GuestKit {
    /// The kit, built by `guest/build-kit.sh` on the first call in this process (or found in
    /// its cache). Panics with the reason when the kit cannot be built or
    /// `qemu-system-x86_64` is missing: a guest test never passes by skipping.
    pub fn get() -> &'static GuestKit {
        static KIT: OnceLock<GuestKit> = OnceLock::new();
        KIT.get_or_init(|| {
            let mut version = Command::new(QEMU_SYSTEM);
            version.arg("--version");
            if let Err(source) = crate::tools::output(&mut version) {
                let program = QEMU_SYSTEM.to_string();
                panic!("{}", GuestError::Tool { program, source });
            }
            GuestKit::build().unwrap_or_else(|e| panic!("{e}"))
        })
    }

    /// Runs `guest/build-kit.sh` and opens the kit directory it prints.
    pub fn build() -> Result<GuestKit, GuestError> {
        let mut cmd = Command::new("bash");
        cmd.arg(BUILD_SCRIPT);
        let out = crate::tools::output_within(&mut cmd, BUILD_DEADLINE)
            .map_err(|source| GuestError::Tool {
                program: "bash".into(),
                source,
            })?
            .ok_or(GuestError::KitBuild {
                status: None,
                stderr: String::new(),
            })?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        match stdout.lines().last() {
            Some(dir) if out.status.success() => GuestKit::open(Path::new(dir.trim())),
            _ => Err(GuestError::KitBuild {
                status: Some(out.status),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }),
        }
    }

    /// A kit already built in `dir`.
    pub fn open(dir: &Path) -> Result<GuestKit, GuestError> {
        for file in ["vmlinux", "initramfs.cpio.gz", "kernel-version"] {
            if !dir.join(file).is_file() {
                let missing = dir.join(file);
                return Err(GuestError::KitIncomplete { missing });
            }
        }
        let kernel_version = std::fs::read_to_string(dir.join("kernel-version"))
            .map_err(|_| GuestError::KitIncomplete {
                missing: dir.join("kernel-version"),
            })?
            .trim()
            .to_string();
        Ok(GuestKit {
            dir: dir.to_path_buf(),
            kernel_version,
        })
    }

    /// The kit's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The uncompressed kernel, for `-kernel`.
    pub fn vmlinux(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }

    /// The initramfs, for `-initrd`.
    pub fn initramfs(&self) -> PathBuf {
        self.dir.join("initramfs.cpio.gz")
    }

    /// The kernel's release, e.g. `6.1.0-57-amd64`.
    pub fn kernel_version(&self) -> &str {
        &self.kernel_version
    }

    /// The QEMU command that boots the guest on `disk` to do `action`, its serial console
    /// written to the file `console`.
    pub fn command(&self, disk: &GuestDisk, action: GuestAction, console: &Path) -> Command {
        let mut cmd = Command::new(QEMU_SYSTEM);
        cmd.args(["-accel", "tcg", "-nodefaults", "-no-user-config"])
            .args(["-display", "none", "-no-reboot", "-net", "none"])
            .args(["-m", &GUEST_MEMORY_MIB.to_string()])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(self.vmlinux())
            .arg("-initrd")
            .arg(self.initramfs())
            .args(["-append", &kernel_command_line(action)])
            .args(disk.qemu_args());
        cmd
    }

    /// Boots the guest on `disk`, lets it do `action` and returns its report, or why there is
    /// none (QEMU missing or failing, the guest's own error, no report before
    /// [`BOOT_DEADLINE`]).
    pub fn try_boot(
        &self,
        disk: GuestDisk,
        action: GuestAction,
    ) -> Result<GuestReport, GuestError> {
        let scratch = crate::tempdir();
        let console_path = scratch.path().join("console.log");
        let mut cmd = self.command(&disk, action, &console_path);
        let command = format!("{cmd:?}");
        die_with_this_thread(&mut cmd);
        let started = Instant::now();
        let out = crate::tools::output_within(&mut cmd, BOOT_DEADLINE).map_err(|source| {
            GuestError::Tool {
                program: QEMU_SYSTEM.into(),
                source,
            }
        })?;
        let elapsed = started.elapsed();
        let console = std::fs::read(&console_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default();
        let Some(out) = out else {
            let deadline = BOOT_DEADLINE;
            return Err(GuestError::Hung {
                deadline,
                console,
                command,
            });
        };
        let checked =
            ConsoleReport::parse(&console).and_then(|report| report.check(action).map(|()| report));
        match checked {
            Ok(report) if out.status.success() => Ok(GuestReport {
                sha256: report.sha256,
                size: report.size,
                console,
                elapsed,
                hash_seconds: report.hash_seconds,
            }),
            result => Err(GuestError::NoReport {
                problem: match (result, out.status.success()) {
                    (Err(problem), true) => problem,
                    (Err(problem), false) => format!("QEMU exited with {}: {problem}", out.status),
                    (Ok(_), _) => format!("QEMU exited with {} after the report", out.status),
                },
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                console,
                command,
            }),
        }
    }

    /// [`GuestKit::try_boot`], failing the test with the reason and the console when the
    /// guest does not report.
    pub fn boot(&self, disk: GuestDisk, action: GuestAction) -> GuestReport {
        self.try_boot(disk, action)
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

impl GuestDisk {
    /// The QEMU options that attach the disk as the guest's first virtio disk (with the
    /// shared guest memory a vhost-user disk needs).
    pub fn qemu_args(&self) -> Vec<String> {
        match self {
            GuestDisk::Nbd { uri, read_only } => {
                let file = escape_option_value(uri);
                let readonly = if *read_only { "on" } else { "off" };
                vec![
                    "-drive".into(),
                    format!("file={file},format=raw,if=virtio,readonly={readonly},cache=none"),
                ]
            }
            GuestDisk::VhostUserBlk { socket, queues } => {
                let path = escape_option_value(&socket.to_string_lossy());
                vec![
                    "-object".into(),
                    format!("memory-backend-memfd,id=mem,size={GUEST_MEMORY_MIB}M,share=on"),
                    "-machine".into(),
                    "memory-backend=mem".into(),
                    "-chardev".into(),
                    format!("socket,id=disk0,path={path}"),
                    "-device".into(),
                    format!("vhost-user-blk-pci,chardev=disk0,num-queues={queues}"),
                    // As many vCPUs as queues: the guest's blk-mq maps each vCPU to a queue,
                    // so with one vCPU every request would go to queue 0.
                    "-smp".into(),
                    queues.max(&1).to_string(),
                ]
            }
        }
    }
}

/// A value for QEMU's `key=value,...` option syntax, where a comma is written twice.
fn escape_option_value(value: &str) -> String {
    value.replace(',', ",,")
}

/// Makes the child get SIGKILL when the thread that starts it ends: a QEMU whose test was
/// killed must not run on (the thread that boots a guest waits for it, so this never cuts a
/// boot short).
fn die_with_this_thread(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    fn ask_for_sigkill_on_parent_death() -> std::io::Result<()> {
        // SAFETY: prctl(2) with PR_SET_PDEATHSIG takes a signal number and no pointers.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
    // SAFETY: the hook runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed: it makes one system call and neither allocates nor takes locks.
    unsafe {
        cmd.pre_exec(ask_for_sigkill_on_parent_death);
    }
}

/// The kernel command line: the serial console, power off instead of rebooting on a panic
/// (with `-no-reboot`), and what `/init` should do.
pub fn kernel_command_line(action: GuestAction) -> String {
    let mut line = String::from("console=ttyS0 quiet panic=-1");
    if let GuestAction::Write { offset, len, byte } = action {
        line.push_str(&format!(" qedstream.write={offset}:{len}:{byte}"));
    }
    line
}

/// The sha256 of the file at `path` as the host computes it (coreutils' `sha256sum`), in the
/// form [`GuestReport::sha256`] has: compare a flattened image with what the guest read.
pub fn host_sha256(path: &Path) -> String {
    let mut cmd = Command::new("sha256sum");
    cmd.arg(path);
    let out = crate::tools::ok_command(&mut cmd);
    out.split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("sha256sum printed nothing for {}", path.display()))
        .to_string()
}

/// The marker lines `/init` prints on the console.
#[derive(Clone, Debug, PartialEq)]
pub struct ConsoleReport {
    /// `QEDSTREAM-SHA256`.
    pub sha256: String,
    /// `QEDSTREAM-SIZE`.
    pub size: u64,
    /// `QEDSTREAM-WROTE offset len byte`, when the guest wrote.
    pub wrote: Option<(u64, u64, u8)>,
    /// Seconds the guest's hash of its disk took (`QEDSTREAM-HASH-TIME start end`, its own
    /// clock), when reported.
    pub hash_seconds: Option<f64>,
}

impl ConsoleReport {
    /// Reads the markers from a console. An error names the guest's own `QEDSTREAM-ERROR`
    /// line, or the marker that is missing or malformed.
    pub fn parse(console: &str) -> Result<ConsoleReport, String> {
        let mut sha256 = None;
        let mut size = None;
        let mut wrote = None;
        let mut hash_seconds = None;
        let mut done = false;
        for line in console.lines() {
            // A kernel message may share a line with ours: the marker starts it anywhere.
            let Some(start) = line.find("QEDSTREAM-") else {
                continue;
            };
            let mut words = line[start..].split_whitespace();
            match words.next() {
                Some("QEDSTREAM-ERROR") => {
                    let what: Vec<&str> = words.collect();
                    return Err(format!("the guest failed: {}", what.join(" ")));
                }
                Some("QEDSTREAM-SHA256") => sha256 = words.next().map(str::to_string),
                Some("QEDSTREAM-SIZE") => size = words.next().and_then(|w| w.parse().ok()),
                Some("QEDSTREAM-WROTE") => {
                    let mut number = || words.next().and_then(|w| w.parse::<u64>().ok());
                    let (offset, len, byte) = (number(), number(), number());
                    wrote = Some((offset, len, byte.and_then(|b| u8::try_from(b).ok())));
                }
                Some("QEDSTREAM-HASH-TIME") => {
                    let mut time = || words.next().and_then(|w| w.parse::<f64>().ok());
                    hash_seconds = match (time(), time()) {
                        (Some(start), Some(end)) if end >= start => Some(end - start),
                        _ => return Err("a malformed QEDSTREAM-HASH-TIME line".into()),
                    };
                }
                Some("QEDSTREAM-DONE") => done = true,
                _ => {}
            }
        }
        let sha256 = sha256
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or("no well-formed QEDSTREAM-SHA256 line")?;
        let size = size.ok_or("no well-formed QEDSTREAM-SIZE line")?;
        let wrote = match wrote {
            None => None,
            Some((Some(offset), Some(len), Some(byte))) => Some((offset, len, byte)),
            Some(_) => return Err("a malformed QEDSTREAM-WROTE line".into()),
        };
        if !done {
            return Err("no QEDSTREAM-DONE line".into());
        }
        Ok(ConsoleReport {
            sha256,
            size,
            wrote,
            hash_seconds,
        })
    }

    /// Checks that the guest did what `action` asked.
    pub fn check(&self, action: GuestAction) -> Result<(), String> {
        let asked = match action {
            GuestAction::Hash => None,
            GuestAction::Write { offset, len, byte } => Some((offset, len, byte)),
        };
        if self.wrote == asked {
            Ok(())
        } else {
            Err(format!(
                "asked to write {asked:?}, the guest wrote {:?}",
                self.wrote
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "3c518ec6490e0e4af797dc8acaf771ac62450f9c83a5ef60f5dcbf4a3e2c117d";

    fn console(lines: &[&str]) -> String {
        lines.join("\n")
    }

    #[test]
    fn a_complete_console_parses() {
        let c = console(&[
            "[    0.1] booting",
            "QEDSTREAM-SIZE 33554432",
            "QEDSTREAM-WROTE 1000 5000 171",
            &format!("QEDSTREAM-SHA256 {HEX}"),
            "QEDSTREAM-HASH-TIME 3.25 10.75",
            "[    4.2] virtio_blk: something QEDSTREAM-DONE",
        ]);
        let report = ConsoleReport::parse(&c).unwrap();
        assert_eq!(report.sha256, HEX);
        assert_eq!(report.hash_seconds, Some(7.5));
        assert_eq!(report.size, 33554432);
        assert_eq!(report.wrote, Some((1000, 5000, 171)));
        let write = GuestAction::Write {
            offset: 1000,
            len: 5000,
            byte: 171,
        };
        assert_eq!(report.check(write), Ok(()));
        assert!(report.check(GuestAction::Hash).is_err());
    }

    #[test]
    fn the_guests_error_is_reported() {
        let c = console(&["QEDSTREAM-SIZE 512", "QEDSTREAM-ERROR writing 5 bytes at 0"]);
        let e = ConsoleReport::parse(&c).unwrap_err();
        assert!(e.contains("writing 5 bytes at 0"), "{e}");
    }

    #[test]
    fn missing_or_malformed_markers_are_errors() {
        let sha = format!("QEDSTREAM-SHA256 {HEX}");
        let cases: [&[&str]; 7] = [
            &[],
            &["QEDSTREAM-SIZE 512", &sha],
            &[
                "QEDSTREAM-SIZE 512",
                "QEDSTREAM-SHA256 abc",
                "QEDSTREAM-DONE",
            ],
            &["QEDSTREAM-SIZE x", &sha, "QEDSTREAM-DONE"],
            &[&sha, "QEDSTREAM-DONE"],
            &[
                "QEDSTREAM-SIZE 512",
                "QEDSTREAM-WROTE 1 2 300",
                &sha,
                "QEDSTREAM-DONE",
            ],
            &[
                "QEDSTREAM-SIZE 512",
                &sha,
                "QEDSTREAM-HASH-TIME 9.5 2",
                "QEDSTREAM-DONE",
            ],
        ];
        for lines in cases {
            assert!(ConsoleReport::parse(&console(lines)).is_err(), "{lines:?}");
        }
    }

    #[test]
    fn a_vhost_user_disk_shares_the_guest_memory_and_escapes_its_path() {
        let disk = GuestDisk::VhostUserBlk {
            socket: "/tmp/a,b.sock".into(),
            queues: 2,
        };
        let args = disk.qemu_args();
        assert!(
            args.contains(&"socket,id=disk0,path=/tmp/a,,b.sock".to_string()),
            "{args:?}"
        );
        let memory = format!("memory-backend-memfd,id=mem,size={GUEST_MEMORY_MIB}M,share=on");
        assert!(args.contains(&memory), "{args:?}");
    }

    #[test]
    fn commas_in_the_uri_are_escaped_and_read_only_is_passed() {
        let disk = GuestDisk::Nbd {
            uri: "nbd+unix:///exp?socket=/tmp/a,b.sock".into(),
            read_only: true,
        };
        assert_eq!(
            disk.qemu_args()[1],
            "file=nbd+unix:///exp?socket=/tmp/a,,b.sock,format=raw,if=virtio,readonly=on,cache=none"
        );
    }
}
