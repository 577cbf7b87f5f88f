//! The `nbd_server_options` and `nbd_server_requests` targets on stable: their seeds (built
//! by `qedstream_fuzz::nbd_phases`, as in `corpus/`) end as each seed is meant to (the
//! export and mode agreed, every request answered, the refusals refused), every prefix of
//! them and byte-flipped or random inputs pass the targets' own reply checks, and the seed
//! files in the corpus run clean.

use nbd_proto::*;
use nbd_server::fuzzing::{
    negotiate_client_bytes, serve_request_bytes, Negotiation, NegotiationEnd, Transmission,
};
use qedstream_fuzz::nbd_phases::{option_seeds, request_seeds};

fn negotiate(data: &[u8]) -> Negotiation {
    negotiate_client_bytes(data).unwrap_or_else(|f| panic!("{f} on {data:02x?}"))
}

fn serve(data: &[u8]) -> Transmission {
    serve_request_bytes(data).unwrap_or_else(|f| panic!("{f} on {data:02x?}"))
}

fn seed(seeds: &[(&'static str, Vec<u8>)], name: &str) -> Vec<u8> {
    seeds.iter().find(|s| s.0 == name).expect(name).1.clone()
}

fn transmission(export: &str, mode: HeaderMode, base: bool) -> NegotiationEnd {
    NegotiationEnd::Transmission {
        export: export.into(),
        mode,
        base_allocation: base,
        allocation_depth: false,
    }
}

#[test]
fn option_seeds_end_as_meant() {
    let seeds = option_seeds();
    let go = |name| negotiate(&seed(&seeds, name));
    let simple = go("simple-go");
    assert_eq!(simple.end, transmission("", HeaderMode::Simple, false));
    assert_eq!(simple.options, 3, "{simple:?}");
    let structured = go("structured-go");
    assert_eq!(
        structured.end,
        transmission("", HeaderMode::Structured, true)
    );
    let extended = go("extended-go");
    assert_eq!(extended.end, transmission("", HeaderMode::Extended, true));
    assert_eq!(extended.options, 5, "{extended:?}");
    // Refused GO: the client gets an error and its bytes end, so the server sees EOF.
    let refused = go("shutting-down-go");
    assert_eq!(refused.end, NegotiationEnd::Closed, "{refused:?}");
    assert_eq!(refused.options, 5, "{refused:?}");
    let aborted = go("contexts-abort");
    assert_eq!(aborted.end, NegotiationEnd::Closed, "{aborted:?}");
    assert_eq!(aborted.options, 7, "{aborted:?}");
    let named = go("refusals-export-name");
    assert_eq!(named.end, transmission("ro", HeaderMode::Simple, false));
    assert_eq!(named.options, 3, "{named:?}");
    let zeroes = go("export-name-zeroes");
    assert_eq!(zeroes.sent, 18 + 134, "{zeroes:?}");
    // TLS required: four refusals, then STARTTLS's ACK ends the clear-text haggling.
    let tls = go("tls-required-starttls");
    assert_eq!(tls.end, NegotiationEnd::StartTls, "{tls:?}");
    assert_eq!(tls.options, 5, "{tls:?}");
    let named = go("tls-required-export-name");
    assert_eq!(named.end, NegotiationEnd::Closed, "{named:?}");
    assert_eq!(named.options, 1, "{named:?}");
}

#[test]
fn request_seeds_are_all_answered() {
    let seeds = request_seeds();
    for (name, requests) in [
        ("simple-requests", 6),
        ("structured-requests", 9),
        ("extended-requests", 9),
    ] {
        let seen = serve(&seed(&seeds, name));
        assert_eq!(seen.replies, requests, "{name}: {seen:?}");
        assert_eq!(seen.stats.errors, 0, "{name}: {seen:?}");
        assert_eq!(seen.stats.requests, requests as u64 + 1, "{name}: {seen:?}");
    }
    let seen = serve(&seed(&seeds, "read-only-write"));
    assert_eq!((seen.replies, seen.stats.errors), (1, 1), "{seen:?}");
    // Unknown flags, past the end, a payload over the maximum, block status without a
    // context, and DISC with a flag: five refusals, then EOF.
    let seen = serve(&seed(&seeds, "refusals"));
    assert_eq!((seen.replies, seen.stats.errors), (5, 5), "{seen:?}");
}

#[test]
fn prefixes_and_mutations_pass_the_reply_checks() {
    let all: Vec<Vec<u8>> = option_seeds()
        .into_iter()
        .chain(request_seeds())
        .map(|s| s.1)
        .collect();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for bytes in &all {
        for end in (0..bytes.len().min(700)).step_by(3) {
            negotiate(&bytes[..end]);
            serve(&bytes[..end]);
        }
        for _ in 0..100 {
            let mut v = bytes.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % v.len();
                v[at] ^= 1 << (next() % 8);
            }
            negotiate(&v);
            serve(&v);
        }
    }
}

#[test]
fn every_seed_file_of_the_corpus_runs_clean() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, minimum) in [("nbd_server_options", 7), ("nbd_server_requests", 5)] {
        let mut files = 0;
        for entry in std::fs::read_dir(root.join(target)).expect(target) {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            negotiate(&data);
            serve(&data);
            files += 1;
        }
        assert!(files >= minimum, "{target}: only {files} files");
    }
}
