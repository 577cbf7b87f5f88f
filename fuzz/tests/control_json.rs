//! The `control_json` target on stable: its seeds (every QMP command, a job's whole life, the
//! refusals; built by `qedstream_fuzz::qmp_sessions`, as in `corpus/`) get the replies they
//! should, every prefix and byte-flipped or random sessions pass the target's checks (no
//! panic or hang, QMP lines only, the image checks clean), and the seed files run clean.

use engine::control::fuzzing::{replay_qmp_bytes, Session};
use qedstream_fuzz::qmp_sessions::seeds;

fn replay(data: &[u8]) -> Session {
    replay_qmp_bytes(data).unwrap_or_else(|f| panic!("{f} on {:?}", String::from_utf8_lossy(data)))
}

fn seed(name: &str) -> Vec<u8> {
    seeds().into_iter().find(|s| s.0 == name).expect(name).1
}

#[test]
fn seeds_get_the_replies_they_should() {
    let queries = replay(&seed("queries"));
    assert_eq!((queries.returns, queries.errors), (8, 0), "{queries:?}");
    let stream = replay(&seed("stream"));
    assert_eq!((stream.returns, stream.errors), (3, 0), "{stream:?}");
    let job = replay(&seed("job-control"));
    assert_eq!((job.returns, job.errors), (7, 0), "{job:?}");
    let step = replay(&seed("step"));
    assert_eq!((step.returns, step.errors), (3, 1), "{step:?}");
    // Everything but the one qmp_capabilities is refused.
    let refusals = replay(&seed("refusals"));
    assert_eq!((refusals.returns, refusals.errors), (1, 13), "{refusals:?}");
    let pieces = replay(&seed("one-byte-pieces"));
    assert_eq!((pieces.returns, pieces.errors), (3, 0), "{pieces:?}");
}

#[test]
fn prefixes_and_mutations_pass_the_checks() {
    let mut x: u64 = 0x853c_49e6_748f_ea9b;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for (_, bytes) in seeds() {
        for end in (0..bytes.len()).step_by(7) {
            replay(&bytes[..end]);
        }
        for _ in 0..40 {
            let mut v = bytes.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % v.len();
                v[at] = next() as u8;
            }
            replay(&v);
        }
    }
}

#[test]
fn every_seed_file_of_the_corpus_runs_clean() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/control_json");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("the control_json corpus") {
        replay(&std::fs::read(entry.unwrap().path()).unwrap());
        files += 1;
    }
    assert!(files >= 6, "the seed corpus is missing ({files} files)");
}
