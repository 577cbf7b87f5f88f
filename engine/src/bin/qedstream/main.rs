//! `qedstream`: create, inspect, check, read, write and convert QED images, with `qemu-img`'s
//! spelling where the two overlap.
//!
//! Everything that only a command line needs lives here, not in the `engine` library: argument
//! parsing (clap), the stream's progress bar (indicatif) and JSON lines ([`progress`]), stdout
//! that reports its failures ([`out`]), helper processes and signal handling ([`child`]), the
//! demo ([`demo`]), and the command's error ([`error`]).

mod child;
mod demo;
mod demo_vm;
mod depth;
mod error;
mod job;
mod out;
mod progress;
mod serve;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Map, Value};

use engine::chain::{chain_info_json, info_json, Chain};
use engine::convert::{convert_with, Target};
use engine::size::parse_size;
use engine::source::{Source, SourceKind};
use qed::backing::resolve_backing_path;
use qed::{BackingFormat, CheckReport, CreateOptions, Image, OpenOptions, Repair};

use crate::error::{Error, Result};
use crate::out::outln;

#[derive(Parser, Debug)]
#[command(
    name = "qedstream",
    version,
    about = "Copy-on-read QED images, byte-compatible with QEMU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Human,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RepairArg {
    Leaks,
    All,
}

/// How every command that opens a chain opens it: the depth bound, and how NBD backings ride
/// out an outage.
#[derive(clap::Args, Debug, Clone)]
struct ChainArgs {
    /// The deepest backing chain opened (layers below the image).
    #[arg(long, value_name = "N", default_value_t = qed::backing::DEFAULT_MAX_DEPTH)]
    max_chain_depth: u32,
    /// Seconds a request waits for an NBD backing that went away (QEMU's reconnect-delay),
    /// counted from the request's first failure; after that, requests fail while reconnecting
    /// goes on in the background. 0: never reconnect.
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = parse_reconnect_delay)]
    reconnect_delay: std::time::Duration,
    /// How many times one NBD request is sent again after the connection was lost under it;
    /// then it fails (EIO), so a request the server dies on cannot loop.
    #[arg(long, value_name = "N", default_value_t = 3)]
    request_retries: u32,
    /// The host's page cache for image and raw files (QEMU's cache modes): writeback (through
    /// it) or none (O_DIRECT; flushes are still sent).
    #[arg(long, value_name = "MODE", default_value = "writeback")]
    cache: qed::CacheMode,
    /// The I/O backend (QEMU's aio=): threads (pread/pwrite, the default: the faster in our
    /// runners), io_uring, or auto (io_uring when the kernel allows it, else threads).
    #[arg(long, value_name = "BACKEND", value_parser = parse_aio)]
    aio: Option<qed::Aio>,
    /// X.509 credentials for NBD over TLS, a directory laid out as QEMU's tls-creds-x509
    /// (ca-cert.pem; client-cert.pem and client-key.pem if the server asks for them): used for
    /// nbds:// backings and sources. On `serve`, also the export's (server-cert.pem,
    /// server-key.pem), which then requires TLS.
    #[arg(long, value_name = "DIR")]
    tls_creds: Option<std::path::PathBuf>,
}

/// `--aio`: QEMU's two names, and `auto` (the run-time probe).
fn parse_aio(s: &str) -> std::result::Result<qed::Aio, String> {
    match s {
        "io_uring" => Ok(qed::Aio::IoUring),
        "threads" => Ok(qed::Aio::Threads),
        "auto" => Ok(qed::Aio::Auto),
        other => Err(format!("'{other}' is not io_uring, threads or auto")),
    }
}

impl ChainArgs {
    /// How files are read and written (`--cache`, `--aio`).
    fn io(&self) -> qed::IoConfig {
        qed::IoConfig {
            cache: self.cache,
            aio: self.aio.unwrap_or_default(),
        }
    }

    fn gate(&self) -> copy_on_read::Gate {
        self.shared(false).gate()
    }

    /// The bound, and whether images in use may be inspected (`-U`).
    fn shared(&self, force_share: bool) -> SharedChainArgs {
        SharedChainArgs {
            chain: self.clone(),
            force_share,
        }
    }
}

/// How an inspection command opens a chain: the chain options and `-U`.
#[derive(Debug, Clone)]
struct SharedChainArgs {
    chain: ChainArgs,
    force_share: bool,
}

impl SharedChainArgs {
    fn gate(&self) -> copy_on_read::Gate {
        let mut gate = copy_on_read::Gate {
            max_depth: self.chain.max_chain_depth,
            force_share: self.force_share,
            io: self.chain.io(),
            ..copy_on_read::Gate::default()
        };
        gate.nbd.reconnect_delay = self.chain.reconnect_delay;
        gate.nbd.max_resends = self.chain.request_retries;
        gate.nbd.connect_timeout = std::time::Duration::from_secs(10);
        gate.nbd.request_timeout = Some(std::time::Duration::from_secs(30));
        gate.nbd.tls_creds = self.chain.tls_creds.clone();
        gate
    }
}

/// The name to record in a header for the backing `name`: an NBD location that asks for TLS
/// (`nbds://`, `tls-certificates=`) becomes QEMU's `json:` form with the `tls-creds` object id
/// `tls_id` (unless the name carried one), the one form QEMU opens over TLS; anything else is
/// recorded as given.
fn recorded_backing_name(name: &str, tls_id: Option<&str>) -> Result<String> {
    if !engine::source::is_nbd_name(Path::new(name)) {
        return Ok(name.to_string());
    }
    let mut uri = nbd_client::Uri::parse(name).map_err(|source| {
        engine::Error::Device(copy_on_read::Error::Nbd {
            uri: name.to_string(),
            source,
        })
    })?;
    let Some(tls) = uri.tls.as_mut() else {
        return Ok(name.to_string());
    };
    if name.starts_with("json:") && tls_id.is_none() {
        return Ok(name.to_string());
    }
    if let Some(id) = tls_id {
        tls.creds_id = Some(id.to_string());
    }
    Ok(uri.to_qemu_string())
}

/// The gate of the demo's own steps: a short reconnect window (its server is local).
fn demo_gate() -> copy_on_read::Gate {
    let mut gate = copy_on_read::Gate::default();
    gate.nbd.reconnect_delay = std::time::Duration::from_secs(5);
    gate
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a QED image (size defaults to the backing's size).
    Create {
        #[command(flatten)]
        chain: ChainArgs,
        /// Backing file (path, relative to the image's folder, or absolute).
        #[arg(short = 'b', long = "backing")]
        backing: Option<String>,
        /// Backing format: raw, qed or qcow2 (probed when omitted; only raw is recorded).
        #[arg(short = 'F', long = "backing-format")]
        backing_format: Option<String>,
        /// Image format (only qed).
        #[arg(short = 'f', default_value = "qed")]
        format: String,
        /// Options: cluster_size=N,table_size=N.
        #[arg(short = 'o')]
        options: Option<String>,
        /// The id of the QEMU tls-creds object an nbds:// backing is recorded with (QEMU's
        /// json: form; default tls0): QEMU then opens the image given
        /// --object tls-creds-x509,id=ID,dir=DIR,endpoint=client.
        #[arg(long, value_name = "ID")]
        tls_creds_id: Option<String>,
        /// The image to create.
        image: PathBuf,
        /// Virtual size (K/M/G/T suffixes).
        size: Option<String>,
    },
    /// Show what an image is (and, with --backing-chain, every layer below it).
    Info {
        #[command(flatten)]
        chain: ChainArgs,
        /// human or json.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Also open and show every backing layer, top first.
        #[arg(long)]
        backing_chain: bool,
        /// Also name the I/O backend (io_uring or threads) and cache mode the files were
        /// opened with.
        #[arg(short = 'v', long)]
        verbose: bool,
        /// Inspect an image that another process may be using (take only the "read" image
        /// lock, as qemu-img -U); what is read may be inconsistent while a writer runs.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,

        /// Image format (qed, qcow2 or raw; probed when omitted).
        #[arg(short = 'f')]
        format: Option<String>,
        /// The image.
        image: PathBuf,
    },
    /// Check an image's consistency (exit 0 clean, 1 error, 2 corruptions, 3 leaks).
    Check {
        /// Repair: leaks (reclaim leaked clusters) or all (also zero invalid entries).
        #[arg(short = 'r', value_enum, conflicts_with = "force_share")]
        repair: Option<RepairArg>,
        /// Inspect an image that another process may be using (take only the "read" image
        /// lock, as qemu-img -U); what is read may be inconsistent while a writer runs.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,

        /// human or json.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// The image.
        image: PathBuf,
    },
    /// Show where each range of the virtual disk comes from.
    Map {
        #[command(flatten)]
        chain: ChainArgs,
        /// human or json.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Inspect an image that another process may be using (take only the "read" image
        /// lock, as qemu-img -U); what is read may be inconsistent while a writer runs.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,

        /// The image.
        image: PathBuf,
    },
    /// Write bytes of the virtual disk to stdout.
    Read {
        #[command(flatten)]
        chain: ChainArgs,
        /// Inspect an image that another process may be using (take only the "read" image
        /// lock, as qemu-img -U); what is read may be inconsistent while a writer runs.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// The image.
        image: PathBuf,
        /// Offset in bytes (suffixes allowed).
        offset: String,
        /// Length in bytes (suffixes allowed).
        length: String,
    },
    /// Write FILE (stdin by default), or zeros, into the virtual disk.
    Write {
        #[command(flatten)]
        chain: ChainArgs,
        /// Write LENGTH zero bytes instead of data.
        #[arg(long = "zero", short = 'z', value_name = "LENGTH")]
        zero: Option<String>,
        /// The image.
        image: PathBuf,
        /// Offset in bytes (suffixes allowed).
        offset: String,
        /// The data (stdin when omitted).
        file: Option<PathBuf>,
    },
    /// Copy a virtual disk into a raw file or a new QED image.
    Convert {
        #[command(flatten)]
        chain: ChainArgs,
        /// Source format: qed, qcow2 or raw (probed when omitted).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Output format: raw or qed.
        #[arg(short = 'O', default_value = "raw")]
        output_format: String,
        /// Output options for qed: cluster_size=N,table_size=N.
        #[arg(short = 'o')]
        options: Option<String>,
        /// Inspect an image that another process may be using (take only the "read" image
        /// lock, as qemu-img -U); what is read may be inconsistent while a writer runs.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Source.
        src: PathBuf,
        /// Destination.
        dst: PathBuf,
    },
    /// Grow the virtual disk (SIZE, or +SIZE to add).
    Resize {
        /// The image.
        image: PathBuf,
        /// New size, or +DELTA.
        size: String,
    },
    /// Point an image at another backing without copying (as qemu-img rebase -u).
    Rebase {
        /// Only rewrite the header (the only mode; required for clarity).
        #[arg(short = 'u', required = true)]
        unsafe_mode: bool,
        /// The new backing ('' for none).
        #[arg(short = 'b')]
        backing: String,
        /// The new backing's format: raw, qed or qcow2 (only raw is recorded).
        #[arg(short = 'F')]
        backing_format: Option<String>,
        /// The id of the QEMU tls-creds object an nbds:// backing is recorded with (as for
        /// create; default tls0).
        #[arg(long, value_name = "ID")]
        tls_creds_id: Option<String>,
        /// The image.
        image: PathBuf,
    },
    /// Make an image local: copy what it lacks from its backing chain, then drop the link.
    Stream(StreamArgs),
    /// Serve an image as a copy-on-read block node: over NBD to a VM, streamed, and driven
    /// over a QMP control socket (QEMU's block-job commands).
    Serve(ServeArgs),
    /// Drive the stream job of a `qedstream serve` over its control socket (QMP).
    Job(JobArgs),
    /// The quick start: build a base image, serve it over NBD, read through copy-on-read,
    /// stream it local, check the result.
    Demo {
        /// Where to put the demo's files (a new temporary folder by default; kept).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Size of the sample base image.
        #[arg(long, default_value = "64M")]
        size: String,
        /// Boot a small Linux guest (qemu-system-x86_64, TCG) on the overlay, served by
        /// `qedstream serve` while it streams, and compare the guest's checksum of its disk
        /// with the base's. The guest kit: $QEDSTREAM_GUEST_KIT, or guest/build-kit.sh.
        #[arg(long)]
        vm: bool,
    },
}

// The arguments of `qedstream stream`.
#[derive(clap::Args, Debug)]
struct StreamArgs {
    #[command(flatten)]
    chain: ChainArgs,
    /// Rate limit in bytes per second (suffixes allowed: 10M).
    #[arg(long, value_name = "BYTES_PER_S")]
    rate: Option<String>,
    /// Keep the backing link at the end.
    #[arg(long)]
    keep_backing: bool,
    /// human (a progress bar on a terminal) or json (one object per line).
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Copy one unit and print the offset to continue from (or `done`).
    #[arg(long)]
    step: bool,
    /// With --step: where to start (default 0).
    #[arg(long, requires = "step")]
    offset: Option<String>,
    /// With --step: the unit's length (default 1M).
    #[arg(long, requires = "step")]
    length: Option<String>,
    /// Copy requests in flight (1 to 64). Memory stays within the stream's 16 MiB of
    /// recycled copy buffers whatever this says.
    #[arg(long, default_value = "16")]
    in_flight: usize,
    /// What the stream does when a range fails: report (fail; run again to resume) or
    /// ignore (skip it, finish the rest, keep the link). `stop` needs a resume, so only
    /// `serve --control` takes it.
    #[arg(
        long,
        default_value = "report",
        value_name = "POLICY",
        conflicts_with = "step"
    )]
    on_error: String,
    /// The image.
    image: PathBuf,
}

// The arguments of `qedstream serve`.
#[derive(clap::Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    chain: ChainArgs,
    /// Serve NBD here: unix:PATH, tcp:HOST:PORT, or a socket path (repeatable).
    #[arg(long, value_name = "ADDR")]
    nbd: Vec<String>,
    /// Serve the disk over vhost-user-blk on this unix socket (QEMU's vhost-user-blk-pci,
    /// cloud-hypervisor, crosvm); one front end at a time, again after it disconnects.
    #[arg(long, value_name = "PATH")]
    vhost_user_blk: Option<PathBuf>,
    /// The vhost-user-blk device's request queues (1 to 64), one worker thread each.
    #[arg(
        long,
        value_name = "N",
        default_value = "1",
        requires = "vhost_user_blk"
    )]
    num_queues: u16,
    /// The NBD export name.
    #[arg(long, default_value = "")]
    export: String,
    /// The node name QMP commands use (`device` of block-stream).
    #[arg(long, default_value = "disk")]
    node_name: String,
    /// Never write the image (no copy-on-read, no stream, read-only exports).
    #[arg(long)]
    read_only: bool,
    /// Start the stream at once.
    #[arg(long)]
    stream: bool,
    /// The stream's rate limit in bytes per second (suffixes allowed: 10M).
    #[arg(long, value_name = "BYTES_PER_S")]
    rate: Option<String>,
    /// What the stream does when a range fails: report (fail), stop (pause), ignore (skip).
    #[arg(long, default_value = "report", value_name = "POLICY")]
    on_error: String,
    /// The QMP control socket to create.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Write the process id here once every socket accepts.
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
    /// human, or json (a "ready" line, then one line per job event).
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// The stream's copy requests in flight (1 to 64). Fewer than `stream`'s 16: a guest's
    /// reads share the disk and the CPUs with them (see the README's performance figures).
    #[arg(long, default_value = "1")]
    in_flight: usize,
    /// The stream's largest copy request (rounded to clusters; suffixes allowed: 1M).
    #[arg(long, value_name = "BYTES", default_value = "2M")]
    request_size: String,
    /// With --tls-creds: whether NBD clients must present a certificate signed by the CA
    /// (ca-cert.pem), as QEMU's verify-peer (yes by default for servers); no: any client that
    /// speaks TLS is served.
    #[arg(long, value_name = "yes|no", default_value = "yes", value_parser = parse_yes_no,
          action = clap::ArgAction::Set,
          requires = "tls_creds")]
    tls_verify_peer: bool,
    /// The image (QED, or raw).
    image: PathBuf,
}

/// `yes` or `no` (QEMU's `on` and `off` too).
fn parse_yes_no(s: &str) -> std::result::Result<bool, String> {
    match s {
        "yes" | "on" => Ok(true),
        "no" | "off" => Ok(false),
        other => Err(format!("'{other}' is not yes or no")),
    }
}

// The arguments of `qedstream job`.
#[derive(clap::Args, Debug)]
struct JobArgs {
    /// The control socket.
    socket: PathBuf,
    /// The job to act on (default: the only one).
    #[arg(long, global = true)]
    job: Option<String>,
    /// human or json.
    #[arg(long, value_enum, default_value = "human", global = true)]
    output: Output,
    #[command(subcommand)]
    action: JobArg,
}

/// What `qedstream job` does.
#[derive(Subcommand, Debug)]
enum JobArg {
    /// Show the job: offset, length, speed, status.
    Info,
    /// Set the rate limit in bytes per second (0: unlimited; suffixes allowed).
    Speed {
        /// Bytes per second.
        speed: String,
    },
    /// Pause the job.
    Pause,
    /// Resume the job (after a pause, or after it stopped on an error).
    Resume,
    /// Cancel the job (the image stays valid and linked).
    Cancel,
    /// Copy one unit and print the offset to continue from, or `done`.
    Step {
        /// Where to start.
        #[arg(long)]
        offset: Option<String>,
        /// The unit's length (default 1M).
        #[arg(long)]
        length: Option<String>,
    },
    /// Show the NBD backing's state, or repoint it at URI (an export of the same size).
    Backing {
        /// The new NBD URI.
        uri: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version go to stdout, which may fail like any other output.
        Err(e) if !e.use_stderr() => {
            return match e
                .print()
                .map_err(Error::Stdout)
                .and_then(|()| crate::out::flush())
            {
                Ok(()) => ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1)),
                Err(e) => report(e),
            };
        }
        Err(e) => e.exit(),
    };
    // Opening and reading a backing chain recurses once per layer: run on a stack that holds a
    // chain as deep as `--max-chain-depth` allows by default. Whatever the command printed is
    // on stdout before it counts as done.
    let result = std::thread::Builder::new()
        .name("qedstream".into())
        .stack_size(engine::STACK_SIZE)
        .spawn(move || run(cli).and_then(|code| crate::out::flush().map(|()| code)))
        .map_err(Error::io("starting the main thread"))
        .and_then(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => report(e),
    }
}

/// `s` with control characters escaped (`\x1b`, `\u{85}`): names from image headers (backing
/// names, paths built from them) are untrusted and must not drive the terminal.
fn escape_controls(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            if (c as u32) < 0x80 {
                let _ = write!(out, "\\x{:02x}", c as u32);
            } else {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Says why the command failed, in one line on stderr; exit code 1.
fn report(e: Error) -> ExitCode {
    // stdout's reader went away (`| head`): end quietly, but not with success.
    if e.is_broken_pipe() {
        return ExitCode::from(1);
    }
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let s = s.to_string();
        if !msg.contains(&s) {
            msg.push_str(": ");
            msg.push_str(&s);
        }
        source = s_next(source);
    }
    // Nothing more can be done when stderr fails too; the exit code still says it.
    let _ = writeln!(
        std::io::stderr().lock(),
        "qedstream: {}",
        escape_controls(&msg)
    );
    ExitCode::from(1)
}

fn s_next<'a>(
    e: Option<&'a (dyn std::error::Error + 'static)>,
) -> Option<&'a (dyn std::error::Error + 'static)> {
    e.and_then(|e| e.source())
}

fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Create {
            chain,
            backing,
            backing_format,
            format,
            options,
            tls_creds_id,
            image,
            size,
        } => cmd_create(
            chain,
            (backing, backing_format, tls_creds_id.as_deref()),
            &format,
            options,
            &image,
            size,
        ),
        Command::Info {
            chain,
            output,
            backing_chain,
            verbose,
            force_share,
            format,
            image,
        } => cmd_info(
            chain,
            output,
            (backing_chain, verbose),
            force_share,
            format.as_deref(),
            &image,
        ),
        Command::Check {
            repair,
            force_share,
            output,
            image,
        } => cmd_check(repair, force_share, output, &image),
        Command::Map {
            chain,
            output,
            force_share,
            image,
        } => cmd_map(chain, output, force_share, &image),
        Command::Read {
            chain,
            force_share,
            image,
            offset,
            length,
        } => cmd_read(
            chain.shared(force_share),
            &image,
            parse_size(&offset)?,
            parse_size(&length)?,
        ),
        Command::Write {
            chain,
            zero,
            image,
            offset,
            file,
        } => cmd_write(chain, &image, parse_size(&offset)?, zero, file),
        Command::Convert {
            chain,
            format,
            output_format,
            options,
            force_share,
            src,
            dst,
        } => cmd_convert(
            chain.shared(force_share),
            format.as_deref(),
            &output_format,
            options,
            &src,
            &dst,
        ),
        Command::Resize { image, size } => cmd_resize(&image, &size),
        Command::Rebase {
            unsafe_mode: _,
            backing,
            backing_format,
            tls_creds_id,
            image,
        } => {
            let backing = match backing.as_str() {
                "" => backing,
                name => recorded_backing_name(name, tls_creds_id.as_deref())?,
            };
            cmd_rebase(&image, &backing, backing_format.as_deref())
        }
        Command::Stream(args) => cmd_stream(args),
        Command::Serve(args) => cmd_serve(args),
        Command::Job(args) => cmd_job(args),
        Command::Demo { dir, size, vm } => crate::demo::run(dir, parse_size(&size)?, vm),
    }
}

fn cmd_stream(args: StreamArgs) -> Result<u8> {
    let StreamArgs {
        chain,
        rate,
        keep_backing,
        output,
        step,
        offset,
        length,
        in_flight,
        on_error,
        image,
    } = args;
    let on_error = stream_policy(&on_error)?;
    let step = step.then_some((offset, length));
    let rate = parse_rate(rate.as_deref())?;
    check_in_flight(in_flight)?;
    let step = match step {
        Some((offset, length)) => {
            let length = length
                .as_deref()
                .map(parse_size)
                .transpose()?
                .unwrap_or(crate::progress::STEP_UNIT);
            if length == 0 {
                return Err(Error::invalid(
                    "--length",
                    "--length must be at least 1 byte (a step copies at least one cluster)",
                ));
            }
            Some((
                offset.as_deref().map(parse_size).transpose()?.unwrap_or(0),
                length,
            ))
        }
        None => None,
    };
    crate::progress::run(crate::progress::StreamCommand {
        image,
        rate,
        keep_backing,
        json: output == Output::Json,
        step,
        gate: chain.gate(),
        in_flight,
        on_error,
        cancel_on_sigint: true,
    })
}

/// `stream --on-error`: `report` or `ignore`. `stop` pauses the job until a resume, and a
/// `stream` has no control socket to take one: it is refused, naming the command that has.
fn stream_policy(policy: &str) -> Result<engine::job::OnError> {
    let on_error = policy
        .parse()
        .map_err(|e: engine::job::UnknownPolicy| Error::invalid("--on-error", e.to_string()))?;
    if on_error == engine::job::OnError::Stop {
        return Err(Error::invalid(
            "--on-error",
            "--on-error stop pauses the stream until a resume, and `qedstream stream` has no \
             control socket to resume it: use `qedstream serve --stream --on-error stop \
             --control SOCKET IMAGE` and `qedstream job SOCKET resume`, or report (the default) \
             and run the stream again",
        ));
    }
    Ok(on_error)
}

/// `--rate`: at least one byte per second, or none.
fn parse_rate(rate: Option<&str>) -> Result<Option<std::num::NonZeroU64>> {
    match rate {
        Some(r) => Ok(Some(std::num::NonZeroU64::new(parse_size(r)?).ok_or_else(
            || Error::invalid("--rate", "--rate must be at least 1 byte per second"),
        )?)),
        None => Ok(None),
    }
}

fn check_in_flight(in_flight: usize) -> Result<()> {
    if (1..=64).contains(&in_flight) {
        Ok(())
    } else {
        Err(Error::invalid(
            "--in-flight",
            format!("--in-flight must be between 1 and 64, not {in_flight}"),
        ))
    }
}

/// `--reconnect-delay`: seconds, 0 to 86400.
fn parse_reconnect_delay(text: &str) -> std::result::Result<std::time::Duration, String> {
    match text.parse::<f64>() {
        Ok(s) if (0.0..=86400.0).contains(&s) => Ok(std::time::Duration::from_secs_f64(s)),
        _ => Err(format!(
            "{text:?} is not a number of seconds between 0 and 86400"
        )),
    }
}

fn cmd_serve(args: ServeArgs) -> Result<u8> {
    check_in_flight(args.in_flight)?;
    let request_bytes = parse_size(&args.request_size)?;
    if !(64 << 10..=64 << 20).contains(&request_bytes) {
        return Err(Error::invalid(
            "--request-size",
            format!("--request-size must be between 64K and 64M, not {request_bytes}"),
        ));
    }
    let nbd = args
        .nbd
        .iter()
        .map(|a| crate::serve::parse_listen(a).map_err(|e| Error::invalid("--nbd", e)))
        .collect::<Result<Vec<_>>>()?;
    let on_error = args
        .on_error
        .parse()
        .map_err(|e: engine::job::UnknownPolicy| Error::invalid("--on-error", e.to_string()))?;
    if args.read_only && args.stream {
        return Err(Error::invalid(
            "--stream",
            "--stream writes the image; it cannot go with --read-only",
        ));
    }
    let tls =
        crate::serve::export_tls(&nbd, args.chain.tls_creds.as_deref(), args.tls_verify_peer)?;
    crate::serve::run(crate::serve::ServeCommand {
        tls,
        image: args.image,
        nbd,
        vhost_user_blk: args.vhost_user_blk,
        num_queues: args.num_queues,
        export: args.export,
        node_name: args.node_name,
        read_only: args.read_only,
        stream: args.stream,
        rate: parse_rate(args.rate.as_deref())?,
        on_error,
        control: args.control,
        pid_file: args.pid_file,
        json: args.output == Output::Json,
        gate: args.chain.gate(),
        in_flight: args.in_flight,
        request_bytes,
    })
}

fn cmd_job(args: JobArgs) -> Result<u8> {
    use crate::job::JobAction;
    let action = match args.action {
        JobArg::Info => JobAction::Info,
        JobArg::Speed { speed } => JobAction::Speed(parse_size(&speed)?),
        JobArg::Pause => JobAction::Pause,
        JobArg::Resume => JobAction::Resume,
        JobArg::Cancel => JobAction::Cancel,
        JobArg::Step { offset, length } => JobAction::Step {
            offset: offset.as_deref().map(parse_size).transpose()?.unwrap_or(0),
            length: length
                .as_deref()
                .map(parse_size)
                .transpose()?
                .unwrap_or(crate::progress::STEP_UNIT),
        },
        JobArg::Backing { uri } => JobAction::Backing(uri),
    };
    crate::job::run(
        &args.socket,
        args.job.as_deref(),
        action,
        args.output == Output::Json,
    )
}

/// Parses `cluster_size=64K,table_size=4`.
fn parse_qed_options(options: Option<&str>) -> Result<(u32, u32)> {
    let mut cluster_size = qed::layout::DEFAULT_CLUSTER_SIZE;
    let mut table_size = qed::layout::DEFAULT_TABLE_SIZE;
    for item in options.unwrap_or("").split(',').filter(|s| !s.is_empty()) {
        let (key, value) = item.split_once('=').ok_or_else(|| {
            Error::invalid("-o", format!("option {item:?} needs a value (key=value)"))
        })?;
        let value = parse_size(value)?;
        let value = u32::try_from(value)
            .map_err(|_| Error::invalid("-o", format!("option {key} is too large: {value}")))?;
        match key {
            "cluster_size" => cluster_size = value,
            "table_size" => table_size = value,
            other => {
                return Err(Error::invalid(
                    "-o",
                    format!("unknown option {other:?} (qed takes cluster_size and table_size)"),
                ))
            }
        }
    }
    Ok((cluster_size, table_size))
}

fn parse_backing_format(f: Option<&str>) -> Result<Option<BackingFormat>> {
    match f {
        None => Ok(None),
        Some("raw") => Ok(Some(BackingFormat::Raw)),
        // QED records only "raw, never probe": any other format is probed at every open.
        Some("qed") | Some("qcow2") => Ok(Some(BackingFormat::Probe)),
        Some(other) => Err(engine::Error::UnsupportedFormat {
            path: None,
            format: other.to_string(),
            supported: "a backing is raw, qed or qcow2",
        }
        .into()),
    }
}

fn cmd_create(
    chain: ChainArgs,
    (backing, backing_format, tls_creds_id): (Option<String>, Option<String>, Option<&str>),
    format: &str,
    options: Option<String>,
    image: &Path,
    size: Option<String>,
) -> Result<u8> {
    if format != "qed" {
        return Err(engine::Error::UnsupportedFormat {
            path: None,
            format: format.to_string(),
            supported: "only qed images are created",
        }
        .into());
    }
    let (cluster_size, table_size) = parse_qed_options(options.as_deref())?;
    let mut recorded = None;
    let mut backing_size = None;
    let mut inputs = Vec::new();
    if let Some(name) = &backing {
        let path = if engine::source::is_nbd_name(Path::new(name)) {
            PathBuf::from(name)
        } else {
            resolve_backing_path(name, Some(image))
        };
        // `-F` is checked against the backing here, and recorded only when it is raw.
        let fmt = parse_backing_format(backing_format.as_deref())?;
        let source = Source::open_with(&path, backing_format.as_deref(), chain.gate())?;
        backing_size = Some(source.size());
        inputs = source.files();
        let fmt = fmt.unwrap_or(match source.kind() {
            SourceKind::Qed | SourceKind::Qcow2 => BackingFormat::Probe,
            SourceKind::Raw | SourceKind::Nbd => BackingFormat::Raw,
        });
        source.close()?;
        recorded = Some((recorded_backing_name(name, tls_creds_id)?, fmt));
    }
    let size = match (size, backing_size) {
        (Some(s), _) => parse_size(&s)?,
        (None, Some(b)) => b,
        (None, None) => {
            return Err(Error::invalid(
                "SIZE",
                "a size is needed when there is no backing file",
            ))
        }
    };
    let options = CreateOptions {
        size,
        cluster_size,
        table_size,
        backing: recorded,
    };
    // Validates every option before the file is touched; refuses the backing itself (by
    // device and inode) and a file another process holds.
    Image::create_file_with(image, &options, &inputs, chain.io())
        .map_err(|e| Error::image(image, e))?;
    Ok(0)
}

fn cmd_info(
    chain: ChainArgs,
    output: Output,
    (backing_chain, verbose): (bool, bool),
    force_share: bool,
    format: Option<&str>,
    image: &Path,
) -> Result<u8> {
    let gate = chain.shared(force_share).gate();
    let (info, layers) = if backing_chain {
        let chain = Chain::open(image, format, &gate)?;
        let layers = (0..chain.layers.len())
            .map(|i| info_json(&chain, i))
            .collect::<Vec<_>>();
        (chain_info_json(&chain), layers)
    } else {
        let chain = Chain::open_top(image, format, &gate)?;
        let top = info_json(&chain, 0);
        (top.clone(), vec![top])
    };
    match output {
        Output::Json => outln!(
            "{}",
            serde_json::to_string_pretty(&info).unwrap_or_default()
        )?,
        Output::Human => print_info_human(&layers)?,
    }
    if verbose {
        print_io(gate.io)?;
    }
    Ok(0)
}

/// `info --verbose`: the backend the files were opened with and the cache mode.
fn print_io(io: qed::IoConfig) -> Result<()> {
    let backend = io
        .backend()
        .map_err(engine::Error::io("choosing the I/O backend"))?;
    outln!("aio: {}", backend.name())?;
    outln!("cache: {}", io.cache.name())?;
    Ok(())
}

fn print_info_human(layers: &[Value]) -> Result<()> {
    let mut first = true;
    for v in layers {
        if !first {
            outln!()?;
        }
        first = false;
        let get = |k: &str| v.get(k).cloned().unwrap_or(Value::Null);
        // Names come from untrusted headers: control characters are escaped.
        outln!(
            "image: {}",
            escape_controls(get("filename").as_str().unwrap_or(""))
        )?;
        outln!("file format: {}", get("format").as_str().unwrap_or(""))?;
        let vs = get("virtual-size").as_u64().unwrap_or(0);
        outln!("virtual size: {} ({vs} bytes)", human_size(vs))?;
        outln!(
            "disk size: {}",
            human_size(get("actual-size").as_u64().unwrap_or(0))
        )?;
        if let Some(cs) = get("cluster-size").as_u64() {
            outln!("cluster_size: {cs}")?;
        }
        if let Some(b) = get("backing-filename").as_str() {
            outln!("backing file: {}", escape_controls(b))?;
        }
        if let Some(f) = get("backing-filename-format").as_str() {
            outln!("backing file format: {f}")?;
        }
        if let Some(d) = get("dirty-flag").as_bool() {
            if d {
                outln!("dirty: needs check")?;
            }
        }
    }
    Ok(())
}

fn human_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v.fract() == 0.0 {
        format!("{v} {}", UNITS[u])
    } else {
        format!("{v:.3} {}", UNITS[u])
    }
}

fn check_json(report: &CheckReport, image: &Path) -> Value {
    let mut m = Map::new();
    m.insert("filename".into(), json!(image.display().to_string()));
    m.insert("format".into(), json!("qed"));
    m.insert("check-errors".into(), json!(report.check_errors));
    m.insert("total-clusters".into(), json!(report.total_clusters));
    m.insert(
        "allocated-clusters".into(),
        json!(report.allocated_clusters),
    );
    for (k, v) in [
        ("leaks", report.leaks),
        ("leaks-fixed", report.leaks_fixed),
        ("corruptions", report.corruptions),
        ("corruptions-fixed", report.corruptions_fixed),
        ("fragmented-clusters", report.fragmented_clusters),
    ] {
        if v > 0 {
            m.insert(k.into(), json!(v));
        }
    }
    Value::Object(m)
}

fn print_check_human(report: &CheckReport) -> Result<()> {
    if report.corruptions == 0 && report.leaks == 0 && report.check_errors == 0 {
        outln!("No errors were found on the image.")?;
    }
    if report.corruptions > 0 {
        outln!(
            "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
            report.corruptions
        )?;
    }
    if report.leaks > 0 {
        outln!(
            "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
            report.leaks
        )?;
    }
    if report.check_errors > 0 {
        outln!(
            "\n{} internal errors have occurred during the check.",
            report.check_errors
        )?;
    }
    if report.total_clusters > 0 {
        let pct = |n: u64| n as f64 * 100.0 / report.total_clusters as f64;
        outln!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, 0.00% compressed clusters",
            report.allocated_clusters,
            report.total_clusters,
            pct(report.allocated_clusters),
            pct(report.fragmented_clusters)
        )?;
    }
    Ok(())
}

fn cmd_check(
    repair: Option<RepairArg>,
    force_share: bool,
    output: Output,
    path: &Path,
) -> Result<u8> {
    let options = OpenOptions {
        read_only: repair.is_none(),
        force_share,
        repair_on_open: false,
        ..OpenOptions::default()
    };
    let image = Image::open_path(path, options).map_err(|e| Error::image(path, e))?;
    let mode = match repair {
        None => Repair::None,
        Some(RepairArg::Leaks) => Repair::Leaks,
        Some(RepairArg::All) => Repair::All,
    };
    let mut report = image.check(mode).map_err(|e| Error::image(path, e))?;
    if mode != Repair::None {
        let fixed = (report.leaks_fixed, report.corruptions_fixed);
        // Reported after the image is closed, so a failing stdout never leaves it open.
        let said = if output == Output::Human && (fixed.0 > 0 || fixed.1 > 0) {
            outln!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
                fixed.0, fixed.1
            )
        } else {
            Ok(())
        };
        report = CheckReport {
            leaks_fixed: fixed.0,
            corruptions_fixed: fixed.1,
            ..image
                .check(Repair::None)
                .map_err(|e| Error::image(path, e))?
        };
        image.close().map_err(|e| Error::image(path, e))?;
        said?;
    } else {
        image.close().map_err(|e| Error::image(path, e))?;
    }
    match output {
        Output::Json => outln!(
            "{}",
            serde_json::to_string_pretty(&check_json(&report, path)).unwrap_or_default()
        )?,
        Output::Human => print_check_human(&report)?,
    }
    Ok(report.exit_code() as u8)
}

fn cmd_map(chain: ChainArgs, output: Output, force_share: bool, image: &Path) -> Result<u8> {
    let chain = Chain::open(image, None, &chain.shared(force_share).gate())?;
    let extents = chain.map()?;
    match output {
        Output::Json => {
            let lines: Vec<String> = extents.iter().map(|e| e.to_qemu_json_line()).collect();
            outln!("[{}]", lines.join(",\n"))?;
        }
        Output::Human => {
            outln!("{:<20}{:<20}{:<20}File", "Offset", "Length", "Mapped to")?;
            for e in extents.iter().filter(|e| e.data) {
                let file = &chain.layers[e.depth as usize].path;
                outln!(
                    "{:<#20x}{:<#20x}{:<#20x}{}",
                    e.start,
                    e.length,
                    e.offset.unwrap_or(0),
                    escape_controls(&file.display().to_string())
                )?;
            }
        }
    }
    Ok(0)
}

fn cmd_read(chain: SharedChainArgs, image: &Path, offset: u64, length: u64) -> Result<u8> {
    let source = Source::open_with(image, None, chain.gate())?;
    let size = source.size();
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(Error::OutOfRange {
            offset,
            length,
            size,
            written_nothing: false,
        });
    }
    let mut buf = vec![0u8; length.min(4 << 20) as usize];
    let mut done = 0;
    while done < length {
        let n = (length - done).min(buf.len() as u64) as usize;
        source.read_at(&mut buf[..n], offset + done)?;
        crate::out::write_all(&buf[..n])?;
        done += n as u64;
    }
    Ok(0)
}

/// Opens an image read-write without its backing (for header-only changes).
fn open_detached(path: &Path) -> Result<Image> {
    let options = OpenOptions {
        ..OpenOptions::default()
    };
    Image::open_path(path, options).map_err(|e| Error::image(path, e))
}

/// `write`: through the copy-on-read device, so a partial write into a cluster the image lacks
/// keeps the backing's bytes around it, whatever the backing is (file, QED chain, NBD).
///
/// Nothing is written unless the whole range fits in the virtual disk: a file's length is taken
/// up front, and a pipe is read to its end first (at most the space left plus one byte, so an
/// input that would run past the end is refused before anything is written).
fn cmd_write(
    chain: ChainArgs,
    path: &Path,
    offset: u64,
    zero: Option<String>,
    file: Option<PathBuf>,
) -> Result<u8> {
    use copy_on_read::{BlockDevice, CorDevice, CorOptions};
    if zero.is_some() && file.is_some() {
        return Err(Error::invalid("--zero", "--zero takes no input file"));
    }
    let zero = zero.as_deref().map(parse_size).transpose()?;
    let runtime = engine::io_runtime()?;
    let options = CorOptions {
        copy_on_read: false,
        gate: chain.gate(),
        ..CorOptions::default()
    };
    let dev = runtime
        .block_on(CorDevice::open(path, options))
        .map_err(Error::device)?;
    let result = (|| -> Result<()> {
        let size = dev.size();
        let fits = |len: u64| -> Result<()> {
            if offset.checked_add(len).is_none_or(|end| end > size) {
                return Err(Error::OutOfRange {
                    offset,
                    length: len,
                    size,
                    written_nothing: true,
                });
            }
            Ok(())
        };
        if let Some(len) = zero {
            fits(len)?;
            return runtime
                .block_on(dev.write_zeroes(offset, len))
                .map_err(Error::device);
        }
        fits(0)?;
        let space = size - offset;
        let (mut input, len): (Box<dyn Read>, u64) = match &file {
            Some(f) => {
                let file = std::fs::File::open(f).map_err(|e| Error::open(f, e))?;
                let meta = file.metadata().map_err(|e| Error::open(f, e))?;
                let input = qed::FileId::of(&file).map_err(|e| Error::open(f, e))?;
                if dev.files().first() == Some(&input) {
                    return Err(Error::InputIsImage(f.clone()));
                }
                if meta.is_file() {
                    fits(meta.len())?;
                    // Read what was measured, even if the file grows meanwhile.
                    (Box::new(file.take(meta.len())), meta.len())
                } else {
                    spool_bounded(file, space, &f.display().to_string())?
                }
            }
            None => spool_bounded(std::io::stdin(), space, "stdin")?,
        };
        if len > space {
            fits(len)?;
        }
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(4 << 20) as usize;
            let mut buf = vec![0u8; n];
            input
                .read_exact(&mut buf)
                .map_err(Error::io("reading input"))?;
            runtime
                .block_on(dev.write_at(pos, buf))
                .map_err(Error::device)?;
            pos += n as u64;
        }
        Ok(())
    })();
    let closed = runtime.block_on(dev.close()).map_err(Error::device);
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result.and(closed)?;
    Ok(0)
}

/// Input kept in memory before it spills to a temporary file.
const SPOOL_IN_MEMORY: u64 = 64 << 20;

/// Reads `input` (a pipe: its length is unknown) to its end, refusing it (before anything is
/// written) once it holds more than `space` bytes. Up to 64 MiB stays in memory; the rest
/// goes to an unlinked temporary file, so memory stays bounded whatever the input's length.
fn spool_bounded(mut input: impl Read, space: u64, what: &str) -> Result<(Box<dyn Read>, u64)> {
    let too_long = || Error::InputTooLong {
        input: what.to_string(),
        space,
    };
    let mut head = Vec::new();
    (&mut input)
        .take(SPOOL_IN_MEMORY.min(space.saturating_add(1)))
        .read_to_end(&mut head)
        .map_err(Error::io("reading input"))?;
    if (head.len() as u64) < SPOOL_IN_MEMORY.min(space.saturating_add(1)) {
        // The input ended within the memory budget.
        let len = head.len() as u64;
        return if len > space {
            Err(too_long())
        } else {
            Ok((Box::new(std::io::Cursor::new(head)), len))
        };
    }
    let mut spool = tempfile::tempfile().map_err(Error::io("creating a temporary file"))?;
    spool
        .write_all(&head)
        .map_err(Error::io("spooling input"))?;
    let rest = std::io::copy(
        &mut input.take(space.saturating_add(1) - head.len() as u64),
        &mut spool,
    )
    .map_err(Error::io("spooling input"))?;
    let len = head.len() as u64 + rest;
    if len > space {
        return Err(too_long());
    }
    use std::io::Seek;
    spool.rewind().map_err(Error::io("spooling input"))?;
    Ok((Box::new(std::io::BufReader::new(spool)), len))
}

fn cmd_convert(
    chain: SharedChainArgs,
    format: Option<&str>,
    output_format: &str,
    options: Option<String>,
    src: &Path,
    dst: &Path,
) -> Result<u8> {
    let target = match output_format {
        "raw" => {
            if options.is_some() {
                return Err(Error::invalid("-o", "-o options apply to -O qed only"));
            }
            Target::Raw
        }
        "qed" => {
            let (cluster_size, table_size) = parse_qed_options(options.as_deref())?;
            Target::Qed {
                cluster_size,
                table_size,
            }
        }
        other => {
            return Err(engine::Error::UnsupportedFormat {
                path: None,
                format: other.to_string(),
                supported: "the output is raw or qed",
            }
            .into())
        }
    };
    let source = Source::open_with(src, format, chain.gate())?;
    convert_with(&source, dst, &target, chain.chain.io())?;
    source.close()?;
    Ok(0)
}

fn cmd_resize(path: &Path, size: &str) -> Result<u8> {
    let image = open_detached(path)?;
    let new_size = match size.strip_prefix('+') {
        Some(delta) => image
            .size()
            .checked_add(parse_size(delta)?)
            .ok_or_else(|| Error::invalid("SIZE", "size overflows"))?,
        None => parse_size(size)?,
    };
    image.resize(new_size).map_err(|e| Error::image(path, e))?;
    image.close().map_err(|e| Error::image(path, e))?;
    Ok(0)
}

fn cmd_rebase(path: &Path, backing: &str, backing_format: Option<&str>) -> Result<u8> {
    let options = OpenOptions {
        ..OpenOptions::default()
    };
    let image = Image::open_path(path, options).map_err(|e| Error::image(path, e))?;
    let new = if backing.is_empty() {
        None
    } else {
        let fmt = match parse_backing_format(backing_format)? {
            Some(f) => f,
            None => {
                return Err(Error::invalid(
                    "-F",
                    "-F raw|qed|qcow2 is needed with -b (raw is recorded as never probed; qed and qcow2 are probed at every open)",
                ))
            }
        };
        Some((backing, fmt))
    };
    image.set_backing(new).map_err(|e| Error::image(path, e))?;
    image.close().map_err(|e| Error::image(path, e))?;
    Ok(0)
}
