//! Helpers for the copy-on-read tests: QEMU tools as the oracle (a missing tool fails the test
//! loudly, never skips), fixtures, and a seeded RNG.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs a tool in `dir`; a missing tool fails the test with a clear message.
pub fn run(dir: &Path, program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} (is it installed? .ci/run installs it): {e}")
        })
}

/// Runs a tool and asserts success; returns stdout.
pub fn ok(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = run(dir, program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-io -f FORMAT -c CMD... IMAGE`.
pub fn qemu_io(dir: &Path, format: &str, image: &str, cmds: &[&str]) {
    let mut args = vec!["-f", format];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(image);
    ok(dir, "qemu-io", &args);
}

/// `qemu-img check` exit code.
pub fn qemu_check(dir: &Path, image: &str) -> i32 {
    let out = run(dir, "qemu-img", &["check", image]);
    out.status.code().unwrap_or(-1)
}

/// The flattened contents of an image chain, as `qemu-img convert -O raw` makes them.
pub fn flatten(dir: &Path, image: &str, format: &str) -> Vec<u8> {
    let out = format!("{image}.flat.raw");
    ok(
        dir,
        "qemu-img",
        &["convert", "-f", format, "-O", "raw", image, &out],
    );
    std::fs::read(dir.join(&out)).unwrap()
}

/// A raw base (8 MiB: data, holes, a partial tail block) and a QED overlay `top.qed` (12 MiB)
/// with its own data, a partial write and a zero cluster (recipe A of qed-format.md).
pub fn raw_fixture(dir: &Path) {
    ok(dir, "qemu-img", &["create", "-f", "raw", "base.raw", "8M"]);
    qemu_io(
        dir,
        "raw",
        "base.raw",
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 2M 1M",
            "write -P 0x33 3M 100k",
            "write -P 0x44 7M 1M",
        ],
    );
    ok(
        dir,
        "qemu-img",
        &[
            "create", "-f", "qed", "-b", "base.raw", "-F", "raw", "top.qed", "12M",
        ],
    );
    qemu_io(
        dir,
        "qed",
        "top.qed",
        &[
            "write -P 0xaa 512k 64k",
            "write -P 0xcd 100k 4k",
            "write -z 2M 64k",
        ],
    );
}

/// A tiny seeded RNG (xorshift64*), so every failure replays.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
