//! Runs every seed of the `qcow2_image` corpus (made by `make-qcow2-corpus.sh` from qemu-img
//! images) through the fuzz target and checks each named seed's verdict: QEMU's readable
//! images open and read whole, zstd and the damaged headers are refused with a message naming
//! the cause, damaged tables never panic. Then the findings of the fuzzing campaign, as named
//! tests with their bytes.

use std::path::Path;

use qedstream_fuzz::qcow2::{fuzz_qcow2_image, Qcow2Seen};

fn seeds() -> Vec<(String, Qcow2Seen)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/qcow2_image");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("the qcow2_image corpus is missing") {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        out.push((name, fuzz_qcow2_image(&data)));
    }
    out
}

#[test]
fn every_seed_gets_the_verdict_its_name_says() {
    let seeds = seeds();
    assert!(seeds.len() >= 15, "only {} seeds", seeds.len());
    for (name, seen) in &seeds {
        let refused = seen.refused.as_deref().unwrap_or("");
        match name.as_str() {
            "qemu-zstd" => assert!(refused.contains("zstd"), "{name}: {seen:?}"),
            "damaged-encrypted" => assert!(refused.contains("encrypted"), "{name}: {seen:?}"),
            "damaged-huge-size" => assert!(refused.contains("L1 table"), "{name}: {seen:?}"),
            "damaged-huge-l1" => assert!(refused.contains("L1 table"), "{name}: {seen:?}"),
            "damaged-cluster-bits" => assert!(refused.contains("cluster size"), "{name}: {seen:?}"),
            "damaged-version" => assert!(refused.contains("version 4"), "{name}: {seen:?}"),
            "damaged-backing-name" => assert!(refused.contains("backing"), "{name}: {seen:?}"),
            "damaged-truncated-header" => {
                assert!(refused.contains("cut short"), "{name}: {seen:?}")
            }
            "damaged-header-length" => {
                assert!(refused.contains("header length"), "{name}: {seen:?}")
            }
            n if n.starts_with("qemu-") => {
                assert!(seen.opened, "{name}: {seen:?}");
                assert!(seen.read > 0 && seen.statused > 0, "{name}: {seen:?}");
            }
            // Damaged tables: refused or read, never a panic (reaching here is the test).
            n if n.starts_with("damaged-") || n.starts_with("regression-") => {}
            n if n.len() == 40 && n.bytes().all(|b| b.is_ascii_hexdigit()) => {}
            _ => panic!("{name}: a seed whose name says neither how it was made nor what it holds"),
        }
    }
}
