//! A backing server that dies on one request every time (and accepts every reconnect):
//! `qedstream convert` and `qedstream stream` end with a clear error after a bounded number of
//! sends, instead of reconnecting and re-sending forever (each successful handshake used to
//! start the reconnect window again). The server is [`PoisonServer`]: real servers do not do
//! this on demand. Every command runs under a 60 s hang guard that fails the test.

use std::path::Path;
use std::process::Command;

use qedstream_tests::poison::PoisonServer;
use qedstream_tests::tempdir;
use qedstream_tests::tools::{command_in, ok, qemu_check, run_with_deadline};

const MIB: u64 = 1 << 20;

fn ours(dir: &Path, args: &[&str]) -> Command {
    command_in(env!("CARGO_BIN_EXE_qedstream"), dir, args)
}

/// convert from the poison export: fails with the resend limit's error after the request was
/// sent 1 + `--request-retries` times.
#[test]
fn convert_fails_after_the_request_retries_instead_of_looping() {
    let dir = tempdir();
    let d = dir.path();
    let server = PoisonServer::start(&d.join("poison.sock"), 4 * MIB, 3 * MIB);
    for (retries, sends) in [("3", 4), ("0", 1)] {
        let before = server.poison_reads();
        let out = run_with_deadline(&mut ours(
            d,
            &[
                "convert",
                "--request-retries",
                retries,
                "-O",
                "raw",
                &server.uri(),
                "out.raw",
            ],
        ));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "convert succeeded: {stderr}");
        assert!(
            stderr.contains(&format!("each of the {sends} times it was sent")),
            "{stderr}"
        );
        assert_eq!(server.poison_reads() - before, sends, "{stderr}");
    }
}

/// stream of an overlay on the poison export: the client's error is not retryable (sending
/// the request again would do the same), so the stream's own retries do not multiply it: the
/// command fails after 4 sends, with the image checkable and still linked (a later run can
/// finish once the server is fixed).
#[test]
fn stream_fails_after_bounded_retries_and_leaves_the_image_linked() {
    let dir = tempdir();
    let d = dir.path();
    let server = PoisonServer::start(&d.join("poison.sock"), 4 * MIB, 3 * MIB);
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-f",
            "qed",
            "-b",
            &server.uri(),
            "-F",
            "raw",
            "top.qed",
        ],
    );
    let out = run_with_deadline(&mut ours(d, &["stream", "--output=json", "top.qed"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "stream succeeded: {stderr}");
    assert!(stderr.contains("times it was sent"), "{stderr}");
    assert_eq!(server.poison_reads(), 4, "{stderr}");
    assert_eq!(qemu_check(d, "top.qed"), 0);
    let info = ok(d, "qemu-img", &["info", "--output=json", "top.qed"]);
    assert!(info.contains("backing-filename"), "still linked: {info}");
}
