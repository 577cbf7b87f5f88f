//! What the real-VM tests of `qedstream serve` share: the NBD export (`engine/tests/serve_vm.rs`)
//! and the vhost-user-blk device (`engine/tests/serve_vhost.rs`) boot the same guest over a
//! served overlay whose stream runs under a rate limit, and grade the result the same way: the
//! stream job through `qedstream job ctl.sock` (the control socket is `ctl.sock` in the test's
//! directory), the guest's report, and the image left behind (`qemu-img` check, info, convert).
//!
//! The binary's path is the caller's (`env!("CARGO_BIN_EXE_qedstream")` expands only in the
//! engine's own tests).

use std::path::Path;
use std::process::Output;

use serde_json::Value;

use crate::guest::{host_sha256, GuestAction, GuestDisk, GuestKit, GuestReport};
use crate::served::Served;
use crate::{assert_same_bytes, tools, XorShift};

/// `size` random bytes (seeded) in `dir/base.raw`; returns them.
pub fn random_base(dir: &Path, size: u64, seed: u64) -> Vec<u8> {
    let len = usize::try_from(size).expect("a test disk fits in memory");
    let mut bytes = vec![0u8; len];
    XorShift::new(seed).fill(&mut bytes);
    std::fs::write(dir.join("base.raw"), &bytes).unwrap();
    bytes
}

/// sha256 of `bytes`, as the host computes it (through `dir/expected.raw`).
pub fn sha256_of_bytes(dir: &Path, bytes: &[u8]) -> String {
    let path = dir.join("expected.raw");
    std::fs::write(&path, bytes).unwrap();
    host_sha256(&path)
}

/// `BIN job ctl.sock ARGS...` in `dir`.
pub fn job(bin: &Path, dir: &Path, args: &[&str]) -> Output {
    let mut cmd = tools::command_in(bin, dir, &["job", "ctl.sock"]);
    cmd.args(args);
    tools::run_command(&mut cmd)
}

/// `job info --output=json`, parsed.
pub fn job_info(bin: &Path, dir: &Path) -> Value {
    let out = job(bin, dir, &["info", "--output=json"]);
    assert!(out.status.success(), "job info: {out:?}");
    serde_json::from_slice(&out.stdout).expect("job info is JSON")
}

/// The stream job is running and has not reached `size`; returns its info.
pub fn assert_streaming(bin: &Path, dir: &Path, size: u64) -> Value {
    let info = job_info(bin, dir);
    assert_eq!(info["status"], "running", "{info}");
    assert!(info["offset"].as_u64().unwrap() < size, "{info}");
    info
}

/// Raises the stream's speed to unlimited (unless it ended already: a guest that read the
/// whole disk leaves the stream little to copy) and waits for it to complete at `size` and
/// drop the backing link.
pub fn finish_stream(bin: &Path, served: &mut Served, dir: &Path, size: u64) {
    let mut done = served
        .pending()
        .into_iter()
        .find(|v| v["event"] == "completed");
    if done.is_none() {
        let out = job(bin, dir, &["speed", "0"]);
        if !out.status.success() {
            // It may have completed between the look and the command; nothing else is
            // acceptable.
            let stderr = String::from_utf8_lossy(&out.stderr);
            eprintln!("job speed 0 refused ({stderr}); the stream must have completed");
        }
        done = Some(served.wait_for("completed"));
    }
    let done = done.unwrap();
    assert_eq!(done["unlinked"], true, "{done}");
    assert_eq!(done["offset"], size, "{done}");
}

/// Boots the guest kit on `disk`, which must be `size` bytes; logs the guest's time.
pub fn boot(disk: GuestDisk, size: u64, action: GuestAction, what: &str) -> GuestReport {
    let report = GuestKit::get().boot(disk, action);
    eprintln!("{what}: guest elapsed {:?}", report.elapsed);
    assert_eq!(report.size, size, "{}", report.console);
    report
}

/// The backing file name `qemu-img info` reads in `dir/image`.
pub fn backing_of(dir: &Path, image: &str) -> Option<String> {
    let out = tools::ok(dir, "qemu-img", &["info", "-U", "--output=json", image]);
    let info: Value = serde_json::from_str(&out).expect("qemu-img info JSON");
    info["backing-filename"].as_str().map(str::to_string)
}

/// `dir/image` is clean for `qemu-img check`, NEED_CHECK is clear, and it reads as
/// `expected` (through its backing, if it still has one).
pub fn assert_clean_with(dir: &Path, image: &str, expected: &[u8], what: &str) {
    assert_eq!(tools::qemu_check(dir, image), 0, "qemu-img check: {what}");
    let features = crate::features_on_disk(&dir.join(image));
    assert_eq!(features & 2, 0, "NEED_CHECK set ({features:#x}): {what}");
    assert_same_bytes(&tools::flatten(dir, image, "qed"), expected, what);
}

/// `dir/image` has no backing, is clean and reads as `expected`.
pub fn assert_standalone(dir: &Path, image: &str, expected: &[u8], what: &str) {
    assert_eq!(
        backing_of(dir, image),
        None,
        "{what}: the backing link remains"
    );
    assert_clean_with(dir, image, expected, what);
}
