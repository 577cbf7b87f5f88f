//! The `nbd_server_replay` target on stable: well-formed client sessions (structured,
//! extended, simple, EXPORT_NAME, LIST/ABORT) must be served without error, every prefix of
//! them must end cleanly (a client vanishing anywhere), and byte-flipped or random inputs
//! must neither panic nor hang.

use nbd_proto::*;
use nbd_server::fuzzing::{replay_client_bytes_blocking, ReplayOutcome};
use qedstream_fuzz::nbd_sessions::{request, session};

fn replay(data: &[u8]) -> ReplayOutcome {
    replay_client_bytes_blocking(data).unwrap_or_else(|f| panic!("{f} on {data:02x?}"))
}

#[test]
fn well_formed_sessions_are_served_without_errors() {
    for mode in [
        HeaderMode::Simple,
        HeaderMode::Structured,
        HeaderMode::Extended,
    ] {
        let (bytes, requests) = session(mode);
        let seen = replay(&bytes);
        assert_eq!(seen.stats.requests, requests + 1, "{mode:?}: {seen:?}");
        assert_eq!(seen.stats.errors, 0, "{mode:?}: {seen:?}");
        assert!(
            seen.sent > 64 * 1024,
            "{mode:?}: the read's data is missing"
        );
    }
    // EXPORT_NAME then a read.
    let mut v = CLIENT_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    v.extend(encode_option(OPT_EXPORT_NAME, b""));
    v.extend(request(HeaderMode::Simple, Command::Read, 0, 1, 0, 4096));
    let seen = replay(&v);
    assert_eq!((seen.stats.requests, seen.stats.errors), (1, 0));
    assert_eq!(seen.sent, 18 + 8 + 2 + 124 + 16 + 4096);
}

#[test]
fn every_seed_of_the_corpus_runs_clean() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/nbd_server_replay");
    let mut seeds = 0;
    for entry in std::fs::read_dir(&dir).expect("the nbd_server_replay corpus") {
        let path = entry.unwrap().path();
        let seen = replay(&std::fs::read(&path).unwrap());
        let name = path.file_name().unwrap().to_string_lossy();
        // A campaign's units (named by their SHA-1) need only run clean; the named seeds are
        // well-formed sessions.
        if !(name.len() == 40 && name.bytes().all(|b| b.is_ascii_hexdigit())) {
            assert_eq!(seen.stats.errors, 0, "{path:?}: {seen:?}");
        }
        seeds += 1;
    }
    assert!(seeds >= 4, "the seed corpus is missing ({seeds} files)");
}

#[test]
fn every_prefix_of_a_session_ends_cleanly() {
    for mode in [HeaderMode::Structured, HeaderMode::Extended] {
        let (bytes, _) = session(mode);
        for end in 0..bytes.len() {
            replay(&bytes[..end]);
        }
    }
}

#[test]
fn flipped_and_random_bytes_neither_panic_nor_hang() {
    let (bytes, _) = session(HeaderMode::Extended);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..300 {
        let mut v = bytes.clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % v.len();
            v[at] ^= 1 << (next() % 8);
        }
        replay(&v);
    }
    for _ in 0..100 {
        let len = (next() % 512) as usize;
        let v: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        replay(&v);
    }
}
