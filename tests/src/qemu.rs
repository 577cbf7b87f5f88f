//! Running QEMU's tools as the oracle. Every helper panics with the command line, exit status
//! and stderr when something goes wrong, and with an explicit "install QEMU" message when the
//! tool is missing: an interop test must never pass by skipping.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

use crate::{path_str, Op};

fn spawn(program: &str, args: &[&str]) -> Output {
    require_qed_support();
    run_raw(program, args)
}

fn run_raw(program: &str, args: &[&str]) -> Output {
    crate::tools::output(Command::new(program).args(args)).unwrap_or_else(|e| {
        panic!(
            "cannot run `{program}` ({e}). The QED interop tests need QEMU's tools \
             (qemu-img and qemu-io, e.g. Debian's qemu-utils package) on PATH; \
             they fail rather than skip when the oracle is missing."
        )
    })
}

/// Panics unless `qemu-img` runs and lists `qed` among its formats (QED can be compiled out).
pub fn require_qed_support() {
    static SUPPORTED: OnceLock<()> = OnceLock::new();
    SUPPORTED.get_or_init(|| {
        let out = run_raw("qemu-img", &["--help"]);
        let text = String::from_utf8_lossy(&out.stdout);
        // "Supported formats:" (older) or "Supported image formats:" (newer), then the names,
        // on the same line and/or on the indented lines that follow.
        let mut lines = text
            .lines()
            .skip_while(|l| !(l.contains("Supported") && l.contains("formats:")));
        let first = lines
            .next()
            .unwrap_or_else(|| panic!("`qemu-img --help` lists no supported formats:\n{text}"));
        let mut formats: Vec<&str> = first
            .split(':')
            .nth(1)
            .unwrap_or("")
            .split_whitespace()
            .collect();
        formats.extend(
            lines
                .skip_while(|l| l.trim().is_empty())
                .take_while(|l| l.starts_with(' ') && !l.trim().is_empty())
                .flat_map(str::split_whitespace),
        );
        assert!(
            formats.contains(&"qed"),
            "this qemu-img was built without QED support ({formats:?}); the interop tests need it"
        );
        let _ = run_raw("qemu-io", &["--version"]);
    });
}

fn describe(program: &str, args: &[&str], out: &Output) -> String {
    format!(
        "`{program} {}` exited with {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `qemu-img` with `args`, panics unless it exits 0; returns stdout.
pub fn img(args: &[&str]) -> String {
    let out = spawn("qemu-img", args);
    assert!(out.status.success(), "{}", describe("qemu-img", args, &out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img create -f qed OPTIONS... PATH SIZE`, where OPTIONS are e.g. `-o
/// cluster_size=4096` or `-b NAME -F FORMAT`; panics unless it succeeds.
pub fn create_qed(path: &Path, size: &str, options: &[&str]) {
    let mut args = vec!["create", "-f", "qed"];
    args.extend_from_slice(options);
    args.extend([path_str(path), size]);
    img(&args);
}

/// Runs `qemu-img` with `args` and returns its exit code and output, whatever they are.
pub fn img_status(args: &[&str]) -> (i32, String, String) {
    let out = spawn("qemu-img", args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Applies `ops` to the image at `path` with one `qemu-io` run; panics if any command fails.
pub fn io(format: &str, path: &Path, ops: &[Op]) {
    let commands: Vec<String> = ops.iter().map(Op::qemu_io_command).collect();
    io_commands(format, path, &commands);
}

/// Runs `qemu-io -f format` with one `-c` per command; panics if any command fails.
pub fn io_commands(format: &str, path: &Path, commands: &[String]) -> String {
    if commands.is_empty() {
        return String::new();
    }
    let mut args: Vec<&str> = vec!["-f", format];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    args.push(path_str(path));
    let out = spawn("qemu-io", &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let failed = !out.status.success()
        || stdout.contains("failed")
        || stderr.contains("failed")
        || stderr.contains("error");
    assert!(!failed, "{}", describe("qemu-io", &args, &out));
    stdout.into_owned()
}

/// The image's content as QEMU reads it (`qemu-img convert -O raw`).
pub fn convert_to_raw(path: &Path) -> Vec<u8> {
    let dir = crate::tempdir();
    let raw = dir.path().join("flat.raw");
    img(&[
        "convert",
        "-U",
        "-f",
        "qed",
        "-O",
        "raw",
        path_str(path),
        path_str(&raw),
    ]);
    std::fs::read(&raw).expect("reading qemu-img convert output")
}

/// `qemu-img check --output=json`: the exit code and the JSON (`Value::Null` if it printed
/// none, e.g. when the image cannot be opened).
pub fn check_json(path: &Path) -> (i32, Value) {
    let (code, stdout, stderr) =
        img_status(&["check", "-f", "qed", "--output=json", path_str(path)]);
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    if json.is_null() && code != 1 {
        panic!("qemu-img check exited {code} without JSON:\n{stdout}\n{stderr}");
    }
    (code, json)
}

/// Panics unless `qemu-img check` finds the image clean (exit 0, no leaks or corruptions).
#[track_caller]
pub fn assert_check_clean(path: &Path) {
    let (code, json) = check_json(path);
    assert_eq!(
        code,
        0,
        "qemu-img check of {} is not clean: {json:#}",
        path.display()
    );
    for key in ["leaks", "corruptions", "corruptions-fixed"] {
        assert!(
            json.get(key).is_none(),
            "qemu-img check reports {key}: {json:#}"
        );
    }
    assert_eq!(json["check-errors"], 0, "{json:#}");
}

/// A numeric field of `qemu-img check` JSON (absent means 0).
pub fn json_count(json: &Value, key: &str) -> u64 {
    json.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// `qemu-img map --output=json` of the image (with its backing chain).
pub fn map_json(path: &Path) -> Vec<Value> {
    let out = img(&["map", "-U", "-f", "qed", "--output=json", path_str(path)]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("qemu-img map JSON: {e}\n{out}"))
}

/// `qemu-img compare` of a QED image with a raw file: panics unless they are identical.
pub fn assert_compare_raw(qed: &Path, raw: &Path) {
    img(&[
        "compare",
        "-U",
        "-f",
        "qed",
        "-F",
        "raw",
        path_str(qed),
        path_str(raw),
    ]);
}
