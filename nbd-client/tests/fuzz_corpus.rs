//! The seed corpus of the `nbd_client_replay` fuzz target (fuzz/corpus/nbd_client_replay/) runs
//! here as an ordinary test, and the realistic seeds must actually work. Regenerate the seeds
//! with `cargo test -p nbd-client --test fuzz_corpus -- --ignored write_seed_corpus`.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::scripted::*;
use nbd_client::fuzzing::{replay_server_bytes_blocking, ReplayOutcome, REPLAY_LIMIT};

const MIB: u64 = 1 << 20;
/// HAS_FLAGS | SEND_FLUSH | SEND_TRIM | SEND_WRITE_ZEROES | SEND_DF | SEND_CACHE
const RW_FLAGS: u16 = 1 | 4 | 32 | 64 | 128 | 1024;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/nbd_client_replay")
}

/// Replies for the replay's command sequence (cookies 1..=9), in structured mode.
fn structured_session(ctx: u32) -> Vec<u8> {
    let mut v = handshake_transcript(Mode::Structured, MIB, RW_FLAGS, Some(ctx));
    v.extend(data(DONE, 1, 0, &pattern(0, 4096)));
    v.extend(block_status(DONE, 2, ctx, &[(8192, 0), (57344, 3)]));
    // qemu-nbd style: a read split into data and a hole.
    v.extend(data(0, 3, 4096, &pattern(4096, 32768)));
    v.extend(hole(DONE, 3, 4096 + 32768, 32768));
    v.extend(data(DONE, 4, 4096 + 65536, &pattern(4096 + 65536, 65536)));
    for cookie in 5..=9 {
        v.extend(simple(cookie, 0));
    }
    v
}

fn extended_session() -> Vec<u8> {
    let mut v = handshake_transcript(Mode::Extended, MIB, RW_FLAGS, Some(0));
    v.extend(ext_chunk(
        DONE,
        1,
        1,
        0,
        &data_payload(0, &pattern(0, 4096)),
    ));
    let mut bs = 0u32.to_be_bytes().to_vec();
    bs.extend_from_slice(&1u32.to_be_bytes());
    bs.extend_from_slice(&65536u64.to_be_bytes());
    bs.extend_from_slice(&0u64.to_be_bytes());
    v.extend(ext_chunk(DONE, 6, 2, 0, &bs));
    v.extend(ext_chunk(
        DONE,
        1,
        3,
        4096,
        &data_payload(4096, &pattern(4096, 65536)),
    ));
    v.extend(ext_chunk(
        DONE,
        1,
        4,
        4096 + 65536,
        &data_payload(4096 + 65536, &pattern(4096 + 65536, 65536)),
    ));
    let offsets = [0u64, 0, 0, 0, 0];
    for (i, o) in offsets.iter().enumerate() {
        v.extend(ext_chunk(DONE, 0, 5 + i as u64, *o, &[]));
    }
    v
}

fn simple_session() -> Vec<u8> {
    let mut v = handshake_transcript(Mode::Simple, MIB, RW_FLAGS, None);
    v.extend(simple(1, 0));
    v.extend(pattern(0, 4096));
    v.extend(simple(2, 0));
    v.extend(pattern(4096, 65536));
    v.extend(simple(3, 0));
    v.extend(pattern(4096 + 65536, 65536));
    for cookie in 4..=8 {
        v.extend(simple(cookie, 0));
    }
    v
}

/// The seeds: name, bytes, and the outcome the replay must reach (None: anything but a panic).
fn seeds() -> Vec<(&'static str, Vec<u8>, Option<ReplayOutcome>)> {
    let mut out = vec![
        (
            "structured-session",
            structured_session(1),
            Some(ReplayOutcome {
                connected: true,
                succeeded: 9,
            }),
        ),
        (
            "structured-session-ctx0",
            structured_session(0),
            Some(ReplayOutcome {
                connected: true,
                succeeded: 9,
            }),
        ),
        (
            "extended-session",
            extended_session(),
            Some(ReplayOutcome {
                connected: true,
                succeeded: 9,
            }),
        ),
        (
            "simple-session",
            simple_session(),
            Some(ReplayOutcome {
                connected: true,
                succeeded: 8,
            }),
        ),
    ];
    // Hostile variants.
    let mut bad_magic = handshake_transcript(Mode::Structured, MIB, RW_FLAGS, Some(1));
    let mut c = data(DONE, 1, 0, &pattern(0, 4096));
    c[0] ^= 0xff;
    bad_magic.extend(c);
    out.push((
        "bad-reply-magic",
        bad_magic,
        Some(ReplayOutcome {
            connected: true,
            succeeded: 0,
        }),
    ));

    let mut overlap = handshake_transcript(Mode::Structured, MIB, RW_FLAGS, Some(1));
    overlap.extend(data(0, 1, 0, &pattern(0, 2048)));
    overlap.extend(data(DONE, 1, 0, &pattern(0, 2048)));
    out.push((
        "overlapping-halves",
        overlap,
        Some(ReplayOutcome {
            connected: true,
            succeeded: 0,
        }),
    ));

    let mut huge = handshake_transcript(Mode::Structured, MIB, RW_FLAGS, Some(1));
    let mut c = chunk(DONE, 1, 1, &[]);
    c[16..20].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
    huge.extend(c);
    out.push((
        "oversize-chunk",
        huge,
        Some(ReplayOutcome {
            connected: true,
            succeeded: 0,
        }),
    ));

    let mut absurd = handshake_transcript(Mode::Structured, MIB, RW_FLAGS, Some(1));
    let n = absurd.len();
    // Make the final GO ACK announce 4 GiB of payload.
    absurd[n - 4..].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
    out.push((
        "absurd-option-length",
        absurd,
        Some(ReplayOutcome {
            connected: false,
            succeeded: 0,
        }),
    ));

    let mut old = 0x4e42_444d_4147_4943u64.to_be_bytes().to_vec();
    old.extend_from_slice(&0x0000_4202_8186_1253u64.to_be_bytes());
    old.extend_from_slice(&MIB.to_be_bytes());
    old.extend_from_slice(&[0u8; 128]);
    out.push((
        "oldstyle",
        old,
        Some(ReplayOutcome {
            connected: false,
            succeeded: 0,
        }),
    ));

    let mut unknown_cookie = handshake_transcript(Mode::Structured, MIB, RW_FLAGS, Some(1));
    unknown_cookie.extend(data(DONE, 77, 0, &pattern(0, 4096)));
    out.push((
        "unknown-cookie",
        unknown_cookie,
        Some(ReplayOutcome {
            connected: true,
            succeeded: 0,
        }),
    ));

    let mut never_done = handshake_transcript(Mode::Structured, MIB, RW_FLAGS, Some(1));
    never_done.extend(data(0, 1, 0, &pattern(0, 4096)));
    out.push((
        "never-done",
        never_done,
        Some(ReplayOutcome {
            connected: true,
            succeeded: 0,
        }),
    ));

    let mut errors = handshake_transcript(Mode::Structured, MIB, RW_FLAGS, Some(1));
    errors.extend(error(DONE, 1, 5, "injected EIO"));
    let mut eo = error_payload(22, "bad offset");
    eo.extend_from_slice(&0u64.to_be_bytes());
    errors.extend(chunk(DONE, 0x8002, 2, &eo));
    errors.extend(data(DONE, 3, 4096, &pattern(4096, 65536)));
    errors.extend(chunk(DONE, 0x802a, 4, &error_payload(95, "odd")));
    for cookie in 5..=9 {
        errors.extend(simple(cookie, if cookie % 2 == 0 { 5 } else { 0 }));
    }
    out.push((
        "server-errors",
        errors,
        Some(ReplayOutcome {
            connected: true,
            succeeded: 4,
        }),
    ));
    out
}

/// Replays `bytes` on a thread of its own and waits a bounded real time for it: a replay that
/// hangs (even one that spins and never lets its own timeout fire) or ends in an error the
/// transcript cannot explain fails the test.
fn replay(name: &str, bytes: &[u8]) -> ReplayOutcome {
    let (tx, rx) = std::sync::mpsc::channel();
    let bytes = bytes.to_vec();
    std::thread::spawn(move || {
        let _ = tx.send(replay_server_bytes_blocking(&bytes));
    });
    match rx.recv_timeout(REPLAY_LIMIT + Duration::from_secs(20)) {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(failure)) => panic!("{name}: {failure}"),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{name}: the replay hung"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            panic!("{name}: the replay panicked")
        }
    }
}

#[test]
fn generated_seeds_reach_their_expected_outcome() {
    for (name, bytes, expected) in seeds() {
        let got = replay(name, &bytes);
        if let Some(e) = expected {
            assert_eq!(got, e, "seed {name}");
        }
    }
}

/// Every file of the corpus ends (no hang) in a success or an error its transcript explains,
/// and each seed the corpus shares with [`seeds`] reaches the outcome written there.
#[test]
fn seed_corpus_replays_to_an_explained_end() {
    let dir = corpus_dir();
    let expected: std::collections::HashMap<_, _> = seeds()
        .into_iter()
        .filter_map(|(name, _, outcome)| Some((name, outcome?)))
        .collect();
    let mut n = 0;
    let mut named = 0;
    for entry in std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seed corpus {} missing: {e}", dir.display()))
    {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        let got = replay(&name, &bytes);
        if let Some(want) = expected.get(name.as_str()) {
            assert_eq!(&got, want, "corpus file {name}");
            named += 1;
        }
        n += 1;
    }
    assert!(
        n >= seeds().len() && named == expected.len(),
        "seed corpus has {n} files, {named} of the {} named seeds; regenerate it",
        expected.len()
    );
}

#[test]
#[ignore = "writes the seed corpus into fuzz/corpus/nbd_client_replay"]
fn write_seed_corpus() {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes, _) in seeds() {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
