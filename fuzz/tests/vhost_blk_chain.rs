//! Runs the `vhost_blk_chain` seed corpus through the fuzz target's logic on stable, and
//! checks each seed's verdict: the well-formed requests succeed (status OK), the malformed
//! ones are rejected with the status the parser owes them, and nothing panics.

use std::path::Path;

use vhost_user_blk::fuzzing::{run_input, ChainOutcome};

const OK: Option<u8> = Some(0);
const IOERR: Option<u8> = Some(1);
const UNSUPP: Option<u8> = Some(2);

#[test]
fn every_vhost_blk_chain_seed_runs_with_its_verdict() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/vhost_blk_chain");
    let expected: &[(&str, Option<u8>, u32)] = &[
        ("read", OK, 1025),
        ("write", OK, 1),
        ("flush", OK, 1),
        ("get-id", OK, 21),
        ("write-zeroes", OK, 1),
        ("read-second-region", OK, 4097),
        ("loop", None, 0),
        ("wrong-direction", IOERR, 1),
        ("past-the-end", IOERR, 1),
        ("unknown-type", UNSUPP, 1),
    ];
    for (name, status, used) in expected {
        let data = std::fs::read(dir.join(name))
            .unwrap_or_else(|e| panic!("seed {name} missing ({e}): run make_vhost_corpus"));
        let seen = run_input(&data).unwrap_or_else(|| panic!("seed {name} too short"));
        assert_eq!(
            seen,
            ChainOutcome {
                status: *status,
                used: *used
            },
            "seed {name}"
        );
    }
    let count = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(count, expected.len(), "every seed has a verdict here");
}

#[test]
fn short_and_empty_inputs_are_refused_quietly() {
    assert_eq!(run_input(&[]), None);
    assert_eq!(run_input(&[0; 100]), None);
    // An all-zero table: descriptor 0 is a 0-byte readable buffer at 0 without NEXT.
    let seen = run_input(&[0; 1 + 256]).unwrap();
    assert_eq!(
        seen,
        ChainOutcome {
            status: None,
            used: 0
        }
    );
}
