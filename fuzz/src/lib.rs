//! # qedstream-fuzz: fuzz targets for the qedstream crates
//!
//! Each target is a plain function here, so the seed corpus can also run as an ordinary test
//! (`cargo test -p qedstream-fuzz`) on stable, and every crash becomes a named regression test.
//!
//! - [`fuzz_qed_image`]: any byte string, opened as a QED image in memory (read-only and
//!   read-write, backing detached), read, mapped, checked, repaired and written to. Errors are
//!   fine; panics, hangs and unbounded allocations are the bugs. It returns what the checks
//!   found ([`Exercised`]), so a regression test asserts on the verdict, not only on the
//!   absence of a panic.
//!
//! ```
//! let seen = qedstream_fuzz::fuzz_qed_image(b"QED\0 not really an image");
//! assert_eq!(seen.check, None, "refused: not an image");
//! ```
//!
//! Run it with cargo-fuzz: `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run qed_image`.
//!
//! - [`qcow2::fuzz_qcow2_image`]: any byte string, opened as a qcow2 image as the gate opens
//!   a backing (our header checks, then `imago`), mapped, read and block-statused
//!   (`cargo fuzz run qcow2_image`).
//!
//! The other targets' logic lives in the crates they exercise: `nbd_client_replay` in
//! `nbd_client::fuzzing`; `nbd_server_replay`, `nbd_server_options` and `nbd_server_requests`
//! in `nbd_server::fuzzing`; `control_json` in `engine::control::fuzzing` (feature
//! `fuzzing`). Their seeds are built here: [`nbd_sessions`] (whole NBD client sessions),
//! [`nbd_phases`] (one phase each, behind a selector byte) and [`qmp_sessions`] (QMP sessions
//! of every command); `cargo run -p qedstream-fuzz --example make_nbd_server_corpus` and
//! `--example make_control_corpus` write them into `corpus/`.

use qed::{CheckReport, Image, MemStorage, OpenOptions, Repair};

pub mod qcow2;

/// The most a fuzzed image's storage may grow past its input: allocations beyond fail with
/// ENOSPC, so a header promising huge tables cannot make the fuzzer allocate gigabytes.
const GROWTH_LIMIT: u64 = 8 << 20;

/// What [`fuzz_qed_image`] saw of an input: the verdicts of its checks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exercised {
    /// `check` without repair on the read-only open; `None` when the input was refused (on
    /// open, or by the check itself).
    pub check: Option<CheckReport>,
    /// `check -r all` on the read-write open (what it found and fixed); `None` when refused.
    pub repair: Option<CheckReport>,
}

/// Opens `data` as a QED image in memory, read-only and then read-write (with the backing
/// detached), and exercises reads, `map`, `mapping_at`, `check` (no repair, then repair all),
/// a few small writes and zero writes, a flush and a close. Never panics on any input; every
/// failure must be a `qed::Error`. Returns the checks' verdicts.
pub fn fuzz_qed_image(data: &[u8]) -> Exercised {
    let mut seen = Exercised::default();
    for read_only in [true, false] {
        let limit = data.len() as u64 + GROWTH_LIMIT;
        let storage = MemStorage::with_limit(data.to_vec(), limit);
        let options = OpenOptions {
            read_only,
            l2_cache_tables: 4,
            ..OpenOptions::default()
        };
        let Ok(image) = Image::open(Box::new(storage), options) else {
            continue;
        };
        let report = exercise(&image, read_only);
        if read_only {
            seen.check = report;
        } else {
            seen.repair = report;
        }
        let _ = image.close();
    }
    seen
}

/// Exercises `image`; the report of its first check (no repair read-only, repair all
/// read-write).
fn exercise(image: &Image, read_only: bool) -> Option<CheckReport> {
    let size = image.size();
    let cluster = image.geometry().cluster_size();
    let mut buf = vec![0u8; 8192];
    // Reads at the start, across the first cluster boundary, and at the end.
    for (offset, len) in [
        (0, 4096),
        (cluster.saturating_sub(100), 200),
        (size.saturating_sub(8192), 8192),
    ] {
        let len = len.min(size.saturating_sub(offset)) as usize;
        let _ = image.read_at(&mut buf[..len], qed::GuestOffset(offset));
    }
    // A read past the end must be refused, not served.
    assert!(
        image
            .read_at(&mut buf[..1], qed::GuestOffset(size))
            .is_err(),
        "read past the disk's end succeeded"
    );
    let _ = image.map(qed::GuestOffset(0), size);
    if size > 0 {
        let _ = image.mapping_at(qed::GuestOffset(size / 2), size);
    }
    let checked = image.check(Repair::None).ok();
    if read_only {
        assert!(
            image.write_at(&[1], qed::GuestOffset(0)).is_err(),
            "write to a read-only image succeeded"
        );
        return checked;
    }
    let repaired = image.check(Repair::All).ok();
    if size > 0 {
        let _ = image.write_at(
            &[0x5a; 700],
            qed::GuestOffset(size.saturating_sub(700).min(cluster - 1)),
        );
        let _ = image.write_zeroes(qed::GuestOffset(0), cluster.min(size));
        let _ = image.write_at(&[0xa5; 3], qed::GuestOffset(size.saturating_sub(3)));
        let _ = image.read_at(&mut buf[..size.min(4096) as usize], qed::GuestOffset(0));
    }
    let _ = image.resize(size.saturating_add(512));
    let _ = image.flush();
    let _ = image.check(Repair::None);
    repaired
}

/// Well-formed NBD client sessions, to seed `nbd_server_replay` and to test the server with.
pub mod nbd_sessions {
    use nbd_proto::*;

    /// One request header in `mode`, as a client encodes it.
    pub fn request(
        mode: HeaderMode,
        command: Command,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u64,
    ) -> Vec<u8> {
        let h = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        let mut b = [0u8; 32];
        let n = encode_request(&h, mode, &mut b);
        b[..n].to_vec()
    }

    /// The option haggling of a session in `mode`, from the client's flags to GO.
    pub fn negotiation(mode: HeaderMode) -> Vec<u8> {
        let mut v = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        v.extend(encode_option(OPT_LIST, &[]));
        match mode {
            HeaderMode::Extended => v.extend(encode_option(OPT_EXTENDED_HEADERS, &[])),
            HeaderMode::Structured => v.extend(encode_option(OPT_STRUCTURED_REPLY, &[])),
            HeaderMode::Simple => {}
        }
        if mode.structured() {
            let q = encode_meta_context_data("", &[BASE_ALLOCATION]);
            v.extend(encode_option(OPT_SET_META_CONTEXT, &q));
        }
        v.extend(encode_option(
            OPT_INFO,
            &encode_go_data("ro", &[INFO_NAME, INFO_DESCRIPTION]),
        ));
        v.extend(encode_option(
            OPT_GO,
            &encode_go_data("", &[INFO_BLOCK_SIZE]),
        ));
        v
    }

    /// The requests of a session in `mode`: every command once, then DISC. Returns the
    /// bytes and the number of requests before DISC.
    pub fn requests(mode: HeaderMode) -> (Vec<u8>, u64) {
        let mut v = Vec::new();
        let mut n = 0;
        let mut push = |v: &mut Vec<u8>, c, f, o, l| {
            n += 1;
            v.extend(request(mode, c, f, n, o, l));
        };
        push(&mut v, Command::Read, 0, 0, 64 * 1024);
        push(&mut v, Command::Write, CMD_FLAG_FUA, 4096, 512);
        v.extend([0xab; 512]);
        push(&mut v, Command::WriteZeroes, 0, 8192, 4096);
        push(&mut v, Command::Trim, 0, 16384, 4096);
        push(&mut v, Command::Cache, 0, 0, 65536);
        push(&mut v, Command::Flush, 0, 0, 0);
        if mode.structured() {
            push(&mut v, Command::Read, CMD_FLAG_DF, 0, 8192);
            push(&mut v, Command::BlockStatus, 0, 0, 1 << 20);
            push(&mut v, Command::BlockStatus, CMD_FLAG_REQ_ONE, 0, 1 << 20);
        }
        v.extend(request(mode, Command::Disconnect, 0, 99, 0, 0));
        (v, n)
    }

    /// A session in `mode`: negotiation, then every command once, then DISC. Returns the bytes
    /// and the number of requests before DISC.
    pub fn session(mode: HeaderMode) -> (Vec<u8>, u64) {
        let mut v = negotiation(mode);
        let (r, n) = requests(mode);
        v.extend(r);
        (v, n)
    }

    /// Every seed: a session in each header mode, and the EXPORT_NAME way in.
    pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
        let mut v = vec![
            ("simple-session", session(HeaderMode::Simple).0),
            ("structured-session", session(HeaderMode::Structured).0),
            ("extended-session", session(HeaderMode::Extended).0),
        ];
        let mut e = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        e.extend(encode_option(OPT_EXPORT_NAME, b""));
        e.extend(request(HeaderMode::Simple, Command::Read, 0, 1, 0, 4096));
        v.push(("export-name-read", e));
        v
    }
}

/// Seeds of `nbd_server_options` and `nbd_server_requests`: a selector byte (see
/// `nbd_server::fuzzing::options` and `::requests`), then the client's bytes of one phase.
pub mod nbd_phases {
    use nbd_proto::*;

    use super::nbd_sessions::{negotiation, request, requests};

    /// The selector byte of `nbd_server_requests` for `mode`, with `base:allocation` and
    /// `qemu:allocation-depth` selected where the mode allows, on the writable export.
    pub fn request_selector(mode: HeaderMode) -> u8 {
        match mode {
            HeaderMode::Simple => 0,
            HeaderMode::Structured => 1 | 4 | 8,
            HeaderMode::Extended => 2 | 4 | 8,
        }
    }

    fn with_selector(selector: u8, bytes: Vec<u8>) -> Vec<u8> {
        let mut v = vec![selector];
        v.extend(bytes);
        v
    }

    fn flags() -> Vec<u8> {
        (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
            .to_be_bytes()
            .to_vec()
    }

    /// Every seed of `nbd_server_options`: the haggling of each session, and the options a
    /// session does not use (LIST_META_CONTEXT, an unknown export, an unsupported option,
    /// SET_META_CONTEXT before structured replies, ABORT, EXPORT_NAME with and without
    /// NO_ZEROES, GO while the server shuts down).
    pub fn option_seeds() -> Vec<(&'static str, Vec<u8>)> {
        let mut v = vec![
            (
                "simple-go",
                with_selector(0, negotiation(HeaderMode::Simple)),
            ),
            (
                "structured-go",
                with_selector(0, negotiation(HeaderMode::Structured)),
            ),
            (
                "extended-go",
                with_selector(0, negotiation(HeaderMode::Extended)),
            ),
            (
                "shutting-down-go",
                with_selector(1, negotiation(HeaderMode::Extended)),
            ),
        ];
        let mut o = flags();
        o.extend(encode_option(OPT_STRUCTURED_REPLY, &[]));
        let q = encode_meta_context_data("", &["base:", "qemu:allocation-depth"]);
        o.extend(encode_option(OPT_LIST_META_CONTEXT, &q));
        o.extend(encode_option(
            OPT_LIST_META_CONTEXT,
            &encode_meta_context_data("", &[]),
        ));
        let q = encode_meta_context_data("", &[BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH]);
        o.extend(encode_option(OPT_SET_META_CONTEXT, &q));
        o.extend(encode_option(OPT_INFO, &encode_go_data("nope", &[])));
        o.extend(encode_option(OPT_STARTTLS, &[]));
        o.extend(encode_option(OPT_ABORT, &[]));
        v.push(("contexts-abort", with_selector(0, o)));
        let mut o = flags();
        let q = encode_meta_context_data("", &[BASE_ALLOCATION]);
        o.extend(encode_option(OPT_SET_META_CONTEXT, &q));
        o.extend(encode_option(OPT_LIST, &[0]));
        o.extend(encode_option(OPT_EXPORT_NAME, b"ro"));
        v.push(("refusals-export-name", with_selector(6, o)));
        let mut o = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        o.extend(encode_option(OPT_EXPORT_NAME, b""));
        v.push(("export-name-zeroes", with_selector(12, o)));
        // TLS required (selector bit 4): options before STARTTLS are refused, STARTTLS with
        // data is invalid, STARTTLS is acknowledged; EXPORT_NAME before TLS closes.
        let mut o = flags();
        o.extend(encode_option(OPT_LIST, &[]));
        o.extend(encode_option(OPT_STRUCTURED_REPLY, &[]));
        o.extend(encode_option(OPT_GO, &encode_go_data("", &[INFO_NAME])));
        o.extend(encode_option(OPT_STARTTLS, &[0]));
        o.extend(encode_option(OPT_STARTTLS, &[]));
        v.push(("tls-required-starttls", with_selector(0x10, o)));
        let mut o = flags();
        o.extend(encode_option(OPT_INFO, &encode_go_data("", &[])));
        o.extend(encode_option(OPT_EXPORT_NAME, b""));
        v.push(("tls-required-export-name", with_selector(0x10, o)));
        v
    }

    /// Every seed of `nbd_server_requests`: each mode's requests, and requests the server
    /// refuses (a write to the read-only export, unknown flags and command, past the end, a
    /// payload over the maximum, block status without a context, DISC with a flag).
    pub fn request_seeds() -> Vec<(&'static str, Vec<u8>)> {
        let mut v = Vec::new();
        for (name, mode) in [
            ("simple-requests", HeaderMode::Simple),
            ("structured-requests", HeaderMode::Structured),
            ("extended-requests", HeaderMode::Extended),
        ] {
            v.push((
                name,
                with_selector(request_selector(mode), requests(mode).0),
            ));
        }
        let mode = HeaderMode::Structured;
        let mut r = request(mode, Command::Write, 0, 1, 0, 4);
        r.extend([1, 2, 3, 4]);
        v.push(("read-only-write", with_selector(1 | 16, r)));
        let mut r = request(mode, Command::Read, 0x80, 1, 0, 512);
        r.extend(request(mode, Command::Read, 0, 2, 1 << 20, 512));
        r.extend(request(mode, Command::Write, 0, 3, 0, 65_537));
        r.extend(vec![0x11; 65_537]);
        r.extend(request(mode, Command::BlockStatus, 0, 4, 0, 4096));
        r.extend(request(
            mode,
            Command::Disconnect,
            CMD_FLAG_FUA << 1,
            5,
            0,
            0,
        ));
        v.push(("refusals", with_selector(1 | (3 << 5), r)));
        v
    }
}

/// Well-formed QMP sessions of every command, the seeds of `control_json`: a piece-size byte
/// (see `engine::control::fuzzing`), then what the client sends.
pub mod qmp_sessions {
    /// The selector byte that hands the client's bytes over whole.
    pub const WHOLE: u8 = 7;

    fn session(selector: u8, commands: &[&str]) -> Vec<u8> {
        let mut v = vec![selector];
        for c in commands {
            v.extend_from_slice(c.as_bytes());
            v.extend_from_slice(b"\r\n");
        }
        v
    }

    const CAPS: &str = r#"{"execute": "qmp_capabilities"}"#;

    /// Every seed, by name: each command at least once, the job's life, and the refusals.
    pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            (
                "queries",
                session(
                    WHOLE,
                    &[
                        CAPS,
                        r#"{"execute": "query-version", "id": 1}"#,
                        r#"{"execute": "query-commands"}"#,
                        r#"{"execute": "query-block"}"#,
                        r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}}"#,
                        r#"{"execute": "query-block-jobs"}"#,
                        r#"{"execute": "x-backing-state", "arguments": {"device": "disk"}}"#,
                        r#"{"execute": "quit", "id": "bye"}"#,
                    ],
                ),
            ),
            (
                "stream",
                session(
                    WHOLE,
                    &[
                        CAPS,
                        r#"{"execute": "block-stream", "arguments": {"device": "disk"}}"#,
                        r#"{"execute": "query-block-jobs"}"#,
                    ],
                ),
            ),
            (
                "job-control",
                session(
                    WHOLE,
                    &[
                        CAPS,
                        r#"{"execute": "block-stream", "arguments": {"device": "export", "job-id": "j", "speed": 4096, "on-error": "stop", "auto-finalize": true, "auto-dismiss": true}}"#,
                        r#"{"execute": "block-job-pause", "arguments": {"device": "j"}}"#,
                        r#"{"execute": "query-block-jobs"}"#,
                        r#"{"execute": "block-job-set-speed", "arguments": {"device": "j", "speed": 0}}"#,
                        r#"{"execute": "block-job-resume", "arguments": {"device": "j"}}"#,
                        r#"{"execute": "block-job-cancel", "arguments": {"device": "j", "force": true}}"#,
                    ],
                ),
            ),
            (
                "step",
                session(
                    WHOLE,
                    &[
                        CAPS,
                        r#"{"execute": "x-block-stream-step", "arguments": {"device": "disk", "offset": 0, "length": 65536}}"#,
                        r#"{"execute": "x-block-stream-step", "arguments": {"offset": 1048576}}"#,
                        r#"{"execute": "x-backing-repoint", "arguments": {"uri": "nbd+unix:///x?socket=/nonexistent"}}"#,
                    ],
                ),
            ),
            (
                "refusals",
                session(
                    WHOLE,
                    &[
                        r#"{"execute": "query-version"}"#,
                        CAPS,
                        CAPS,
                        "not json",
                        "[1, 2]",
                        r#"{"execute": "query-block", "extra": 1}"#,
                        r#"{"execute": "query-block", "arguments": []}"#,
                        r#"{"execute": "no-such-command"}"#,
                        r#"{"execute": "block-stream", "arguments": {"device": "nope"}}"#,
                        r#"{"execute": "block-stream", "arguments": {"device": "disk", "speed": -1}}"#,
                        r#"{"execute": "block-stream", "arguments": {"device": "disk", "auto-dismiss": false}}"#,
                        r#"{"execute": "block-stream", "arguments": {"device": "disk", "on-error": "explode"}}"#,
                        r#"{"execute": "block-job-pause", "arguments": {"device": "none"}}"#,
                        r#"{"execute": "x-block-stream-step", "arguments": {"length": 0}}"#,
                    ],
                ),
            ),
            (
                "one-byte-pieces",
                session(
                    0,
                    &[
                        CAPS,
                        r#"{"execute":"query-block-jobs"}{"execute":"query-version"}"#,
                    ],
                ),
            ),
        ]
    }
}
