//! Runs the `vhost_blk_chain` corpus through the fuzz target's logic on stable, and checks
//! each seed's verdict: the well-formed requests succeed (status OK), the malformed ones are
//! rejected with the status the parser owes them; the units campaigns kept run without a
//! panic.

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
    // The units campaigns kept beside the seeds have no verdict of their own: each runs
    // through without a panic.
    let mut kept = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if expected.iter().all(|(seed, _, _)| *seed != name) {
            let _ = run_input(&std::fs::read(&path).unwrap());
            kept += 1;
        }
    }
    eprintln!("{kept} kept units ran");
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
