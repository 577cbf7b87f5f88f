//! `qedstream`: create, inspect, check, read, write and convert QED images, with `qemu-img`'s
//! spelling where the two overlap.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Map, Value};

use engine::chain::{info_json, Chain};
use engine::convert::{convert, Target};
use engine::error::{Error, Result};
use engine::outln;
use engine::size::parse_size;
use engine::source::{Source, SourceKind};
use qed::backing::resolve_backing_path;
use qed::{
    BackingFormat, BackingPolicy, CheckReport, CreateOptions, FileGate, Image, OpenOptions, Repair,
};

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

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a QED image (size defaults to the backing's size).
    Create {
        /// Backing file (path, relative to the image's folder, or absolute).
        #[arg(short = 'b', long = "backing")]
        backing: Option<String>,
        /// Backing format: raw or qed (probed when omitted).
        #[arg(short = 'F', long = "backing-format")]
        backing_format: Option<String>,
        /// Image format (only qed).
        #[arg(short = 'f', default_value = "qed")]
        format: String,
        /// Options: cluster_size=N,table_size=N.
        #[arg(short = 'o')]
        options: Option<String>,
        /// The image to create.
        image: PathBuf,
        /// Virtual size (K/M/G/T suffixes).
        size: Option<String>,
    },
    /// Show what an image is, with its backing chain.
    Info {
        /// human or json.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Image format (qed or raw; probed when omitted).
        #[arg(short = 'f')]
        format: Option<String>,
        /// The image.
        image: PathBuf,
    },
    /// Check an image's consistency (exit 0 clean, 1 error, 2 corruptions, 3 leaks).
    Check {
        /// Repair: leaks (reclaim leaked clusters) or all (also zero invalid entries).
        #[arg(short = 'r', value_enum)]
        repair: Option<RepairArg>,
        /// human or json.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// The image.
        image: PathBuf,
    },
    /// Show where each range of the virtual disk comes from.
    Map {
        /// human or json.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// The image.
        image: PathBuf,
    },
    /// Write bytes of the virtual disk to stdout.
    Read {
        /// The image.
        image: PathBuf,
        /// Offset in bytes (suffixes allowed).
        offset: String,
        /// Length in bytes (suffixes allowed).
        length: String,
    },
    /// Write FILE (stdin by default), or zeros, into the virtual disk.
    Write {
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
        /// Source format: qed or raw (probed when omitted).
        #[arg(short = 'f')]
        format: Option<String>,
        /// Output format: raw or qed.
        #[arg(short = 'O', default_value = "raw")]
        output_format: String,
        /// Output options for qed: cluster_size=N,table_size=N.
        #[arg(short = 'o')]
        options: Option<String>,
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
        /// The new backing's format: raw or qed.
        #[arg(short = 'F')]
        backing_format: Option<String>,
        /// The image.
        image: PathBuf,
    },
    /// Make an image local: copy what it lacks from its backing chain, then drop the link.
    Stream {
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
        /// Seconds an NBD backing may be away before the stream fails.
        #[arg(long, value_name = "SECONDS", default_value = "30")]
        reconnect_delay: f64,
        /// Copy requests in flight.
        #[arg(long, default_value = "4")]
        in_flight: usize,
        /// The image.
        image: PathBuf,
    },
    /// The quick start: build a base image, serve it over NBD, read through copy-on-read,
    /// stream it local, check the result.
    Demo {
        /// Where to put the demo's files (a new temporary folder by default; kept).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Size of the sample base image.
        #[arg(long, default_value = "64M")]
        size: String,
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
                .and_then(|()| engine::out::flush())
            {
                Ok(()) => ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1)),
                Err(e) => report(e),
            };
        }
        Err(e) => e.exit(),
    };
    // Whatever the command printed is on stdout before it counts as done.
    match run(cli).and_then(|code| engine::out::flush().map(|()| code)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => report(e),
    }
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
    let _ = writeln!(std::io::stderr().lock(), "qedstream: {msg}");
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
            backing,
            backing_format,
            format,
            options,
            image,
            size,
        } => cmd_create(backing, backing_format, &format, options, &image, size),
        Command::Info {
            output,
            format,
            image,
        } => cmd_info(output, format.as_deref(), &image),
        Command::Check {
            repair,
            output,
            image,
        } => cmd_check(repair, output, &image),
        Command::Map { output, image } => cmd_map(output, &image),
        Command::Read {
            image,
            offset,
            length,
        } => cmd_read(&image, parse_size(&offset)?, parse_size(&length)?),
        Command::Write {
            zero,
            image,
            offset,
            file,
        } => cmd_write(&image, parse_size(&offset)?, zero, file),
        Command::Convert {
            format,
            output_format,
            options,
            src,
            dst,
        } => cmd_convert(format.as_deref(), &output_format, options, &src, &dst),
        Command::Resize { image, size } => cmd_resize(&image, &size),
        Command::Rebase {
            unsafe_mode: _,
            backing,
            backing_format,
            image,
        } => cmd_rebase(&image, &backing, backing_format.as_deref()),
        Command::Stream {
            rate,
            keep_backing,
            output,
            step,
            offset,
            length,
            reconnect_delay,
            in_flight,
            image,
        } => cmd_stream(
            image,
            rate,
            keep_backing,
            output,
            step.then_some((offset, length)),
            reconnect_delay,
            in_flight,
        ),
        Command::Demo { dir, size } => engine::demo::run(dir, parse_size(&size)?),
    }
}

fn cmd_stream(
    image: PathBuf,
    rate: Option<String>,
    keep_backing: bool,
    output: Output,
    step: Option<(Option<String>, Option<String>)>,
    reconnect_delay: f64,
    in_flight: usize,
) -> Result<u8> {
    let rate = match rate {
        Some(r) => Some(
            std::num::NonZeroU64::new(parse_size(&r)?)
                .ok_or_else(|| Error::Usage("--rate must be at least 1 byte per second".into()))?,
        ),
        None => None,
    };
    if !(0.0..=86400.0).contains(&reconnect_delay) {
        return Err(Error::Usage(
            "--reconnect-delay must be between 0 and 86400 seconds".into(),
        ));
    }
    let step = match step {
        Some((offset, length)) => Some((
            offset.as_deref().map(parse_size).transpose()?.unwrap_or(0),
            length
                .as_deref()
                .map(parse_size)
                .transpose()?
                .unwrap_or(engine::progress::STEP_UNIT),
        )),
        None => None,
    };
    engine::progress::run(engine::progress::StreamCommand {
        image,
        rate,
        keep_backing,
        json: output == Output::Json,
        step,
        reconnect_delay: std::time::Duration::from_secs_f64(reconnect_delay),
        in_flight,
        cancel_on_sigint: true,
    })
}

/// Parses `cluster_size=64K,table_size=4`.
fn parse_qed_options(options: Option<&str>) -> Result<(u32, u32)> {
    let mut cluster_size = qed::layout::DEFAULT_CLUSTER_SIZE;
    let mut table_size = qed::layout::DEFAULT_TABLE_SIZE;
    for item in options.unwrap_or("").split(',').filter(|s| !s.is_empty()) {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| Error::Usage(format!("option {item:?} needs a value (key=value)")))?;
        let value = parse_size(value)?;
        let value = u32::try_from(value)
            .map_err(|_| Error::Usage(format!("option {key} is too large: {value}")))?;
        match key {
            "cluster_size" => cluster_size = value,
            "table_size" => table_size = value,
            other => {
                return Err(Error::Usage(format!(
                    "unknown option {other:?} (qed takes cluster_size and table_size)"
                )))
            }
        }
    }
    Ok((cluster_size, table_size))
}

fn parse_backing_format(f: Option<&str>) -> Result<Option<BackingFormat>> {
    match f {
        None => Ok(None),
        Some("raw") => Ok(Some(BackingFormat::Raw)),
        Some("qed") => Ok(Some(BackingFormat::Probe)),
        Some(other) => Err(Error::Usage(format!(
            "backing format {other:?} is not supported (raw or qed)"
        ))),
    }
}

fn cmd_create(
    backing: Option<String>,
    backing_format: Option<String>,
    format: &str,
    options: Option<String>,
    image: &Path,
    size: Option<String>,
) -> Result<u8> {
    if format != "qed" {
        return Err(Error::Usage(format!(
            "can only create qed images, not {format:?}"
        )));
    }
    let (cluster_size, table_size) = parse_qed_options(options.as_deref())?;
    let mut recorded = None;
    let mut backing_size = None;
    if let Some(name) = &backing {
        let path = if engine::source::is_nbd_name(Path::new(name)) {
            PathBuf::from(name)
        } else {
            resolve_backing_path(name, Some(image))
        };
        let fmt = parse_backing_format(backing_format.as_deref())?;
        let src_format = match fmt {
            Some(BackingFormat::Raw) => Some("raw"),
            Some(BackingFormat::Probe) => Some("qed"),
            None => None,
        };
        let source = Source::open(&path, src_format)?;
        backing_size = Some(source.size());
        let fmt = fmt.unwrap_or(match source.kind() {
            SourceKind::Qed => BackingFormat::Probe,
            SourceKind::Raw | SourceKind::Nbd => BackingFormat::Raw,
        });
        source.close()?;
        recorded = Some((name.clone(), fmt));
    }
    let size = match (size, backing_size) {
        (Some(s), _) => parse_size(&s)?,
        (None, Some(b)) => b,
        (None, None) => {
            return Err(Error::Usage(
                "a size is needed when there is no backing file".into(),
            ))
        }
    };
    let options = CreateOptions {
        size,
        cluster_size,
        table_size,
        backing: recorded,
    };
    Image::create_path(image, &options).map_err(|e| Error::image(image, e))?;
    Ok(0)
}

fn cmd_info(output: Output, format: Option<&str>, image: &Path) -> Result<u8> {
    let chain = Chain::open(image, format, &FileGate::default())?;
    let info = info_json(&chain, 0);
    match output {
        Output::Json => outln!(
            "{}",
            serde_json::to_string_pretty(&info).unwrap_or_default()
        )?,
        Output::Human => print_info_human(&info)?,
    }
    Ok(0)
}

fn print_info_human(info: &Value) -> Result<()> {
    let mut layer = Some(info);
    let mut first = true;
    while let Some(v) = layer {
        if !first {
            outln!()?;
        }
        first = false;
        let get = |k: &str| v.get(k).cloned().unwrap_or(Value::Null);
        outln!("image: {}", get("filename").as_str().unwrap_or(""))?;
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
            outln!("backing file: {b}")?;
        }
        if let Some(f) = get("backing-filename-format").as_str() {
            outln!("backing file format: {f}")?;
        }
        if let Some(d) = get("dirty-flag").as_bool() {
            if d {
                outln!("dirty: needs check")?;
            }
        }
        layer = v.get("backing-image");
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

fn cmd_check(repair: Option<RepairArg>, output: Output, path: &Path) -> Result<u8> {
    let options = OpenOptions {
        read_only: repair.is_none(),
        backing: BackingPolicy::Detached,
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

fn cmd_map(output: Output, image: &Path) -> Result<u8> {
    let chain = Chain::open(image, None, &FileGate::default())?;
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
                    file.display()
                )?;
            }
        }
    }
    Ok(0)
}

fn cmd_read(image: &Path, offset: u64, length: u64) -> Result<u8> {
    let source = Source::open(image, None)?;
    let size = source.size();
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(Error::Usage(format!(
            "range {offset}+{length} is outside the virtual disk ({size} bytes)"
        )));
    }
    let mut buf = vec![0u8; length.min(4 << 20) as usize];
    let mut done = 0;
    while done < length {
        let n = (length - done).min(buf.len() as u64) as usize;
        source.read_at(&mut buf[..n], offset + done)?;
        engine::out::write_all(&buf[..n])?;
        done += n as u64;
    }
    Ok(0)
}

/// Opens an image read-write without its backing (for header-only changes).
fn open_detached(path: &Path) -> Result<Image> {
    let options = OpenOptions {
        backing: BackingPolicy::Detached,
        ..OpenOptions::default()
    };
    Image::open_path(path, options).map_err(|e| Error::image(path, e))
}

/// `write`: through the copy-on-read device, so a partial write into a cluster the image lacks
/// keeps the backing's bytes around it, whatever the backing is (file, QED chain, NBD).
fn cmd_write(path: &Path, offset: u64, zero: Option<String>, file: Option<PathBuf>) -> Result<u8> {
    use copy_on_read::{BlockDevice, CorDevice, CorOptions};
    if zero.is_some() && file.is_some() {
        return Err(Error::Usage("--zero takes no input file".into()));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(Error::io("starting the I/O runtime"))?;
    let options = CorOptions {
        copy_on_read: false,
        ..CorOptions::default()
    };
    let dev = runtime
        .block_on(CorDevice::open(path, options))
        .map_err(Error::device)?;
    let result = (|| -> Result<()> {
        if let Some(len) = zero {
            let len = parse_size(&len)?;
            return runtime
                .block_on(dev.write_zeroes(offset, len))
                .map_err(Error::device);
        }
        let mut input: Box<dyn Read> = match &file {
            Some(f) => Box::new(std::fs::File::open(f).map_err(|e| Error::open(f, e))?),
            None => Box::new(std::io::stdin()),
        };
        let mut pos = offset;
        loop {
            let mut buf = vec![0u8; 4 << 20];
            let mut filled = 0;
            while filled < buf.len() {
                let n = input
                    .read(&mut buf[filled..])
                    .map_err(Error::io("reading input"))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                return Ok(());
            }
            buf.truncate(filled);
            runtime
                .block_on(dev.write_at(pos, buf))
                .map_err(Error::device)?;
            pos += filled as u64;
            if filled < 4 << 20 {
                return Ok(());
            }
        }
    })();
    let closed = runtime.block_on(dev.close()).map_err(Error::device);
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result.and(closed)?;
    Ok(0)
}

fn cmd_convert(
    format: Option<&str>,
    output_format: &str,
    options: Option<String>,
    src: &Path,
    dst: &Path,
) -> Result<u8> {
    let target = match output_format {
        "raw" => {
            if options.is_some() {
                return Err(Error::Usage("-o options apply to -O qed only".into()));
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
            return Err(Error::Usage(format!(
                "output format {other:?} is not supported (raw or qed)"
            )))
        }
    };
    let source = Source::open(src, format)?;
    convert(&source, dst, &target)?;
    source.close()?;
    Ok(0)
}

fn cmd_resize(path: &Path, size: &str) -> Result<u8> {
    let image = open_detached(path)?;
    let new_size = match size.strip_prefix('+') {
        Some(delta) => image
            .size()
            .checked_add(parse_size(delta)?)
            .ok_or_else(|| Error::Usage("size overflows".into()))?,
        None => parse_size(size)?,
    };
    image.resize(new_size).map_err(|e| Error::image(path, e))?;
    image.close().map_err(|e| Error::image(path, e))?;
    Ok(0)
}

fn cmd_rebase(path: &Path, backing: &str, backing_format: Option<&str>) -> Result<u8> {
    let options = OpenOptions {
        backing: BackingPolicy::Detached,
        ..OpenOptions::default()
    };
    let image = Image::open_path(path, options).map_err(|e| Error::image(path, e))?;
    let new = if backing.is_empty() {
        None
    } else {
        let fmt = match parse_backing_format(backing_format)? {
            Some(f) => f,
            None => {
                return Err(Error::Usage(
                    "-F raw|qed is needed with -b (the format is recorded, not probed)".into(),
                ))
            }
        };
        Some((backing, fmt))
    };
    image
        .set_backing(new, None)
        .map_err(|e| Error::image(path, e))?;
    image.close().map_err(|e| Error::image(path, e))?;
    Ok(0)
}
