//! Runs every file of the `qed_image` corpus (and every saved crash) through the fuzz target,
//! so the corpus is a regression suite on stable without cargo-fuzz, and checks each named
//! seed's verdict by what its name says it is (the units a campaign kept, named by their
//! SHA-1, must only run clean). The other targets' corpora run in their own test files.

use std::path::Path;

use qedstream_fuzz::{fuzz_qed_image, Exercised};

fn run_dir(dir: &Path) -> Vec<(String, Exercised)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_file() {
            let data = std::fs::read(&path).unwrap();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            out.push((name, fuzz_qed_image(&data)));
        }
    }
    out
}

#[test]
fn every_seed_and_crash_runs_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let seeds = run_dir(&root.join("corpus/qed_image"));
    assert!(
        seeds.len() >= 10,
        "the seed corpus is missing ({} files)",
        seeds.len()
    );
    let mut damaged = 0;
    for (name, seen) in &seeds {
        let verdict = seen.check.as_ref().map(|r| r.exit_code());
        if name.starts_with("qemu-") || name.starts_with("ours-") {
            // Made by QEMU or by us: opens and checks clean.
            assert_eq!(verdict, Some(0), "{name}: {seen:?}");
        } else if name == "damaged-need-check" {
            // Only the "needs check" flag is set on a consistent image.
            assert_eq!(verdict, Some(0), "{name}: {seen:?}");
        } else if name.starts_with("damaged-") || name.starts_with("regression-") {
            // Refused on open, or the check finds the damage (corruptions or leaks).
            assert!(
                verdict.is_none_or(|code| code != 0),
                "{name}: damage not seen: {seen:?}"
            );
            damaged += 1;
        } else if name.len() == 40 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
            // Kept by a campaign (named by its SHA-1): it must only run clean.
        } else {
            panic!("{name}: a seed whose name says neither how it was made nor what it holds");
        }
    }
    assert!(damaged >= 10, "only {damaged} damaged seeds");
    // Crashes saved by cargo-fuzz (none are kept once they are named tests): no panic.
    run_dir(&root.join("artifacts/qed_image"));
}
