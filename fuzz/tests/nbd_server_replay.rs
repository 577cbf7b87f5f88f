//! The `nbd_server_replay` target on stable: well-formed client sessions (structured,
//! extended, simple, EXPORT_NAME, LIST/ABORT) must be served without error, every prefix of
//! them must end cleanly (a client vanishing anywhere), and byte-flipped or random inputs
//! must neither panic nor hang.

use nbd_proto::*;
use nbd_server::fuzzing::{replay_client_bytes_blocking, ReplayOutcome};

fn request(
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

/// A session in `mode`: negotiation, then every command once, then DISC. Returns the bytes
/// and the number of requests before DISC.
fn session(mode: HeaderMode) -> (Vec<u8>, u64) {
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
    let mut n = 0;
    let mut push = |v: &mut Vec<u8>, c, f, o, l| {
        n += 1;
        v.extend(request(mode, c, f, n, o, l));
    };
    push(&mut v, Command::Read, 0, 0, 128 * 1024);
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
