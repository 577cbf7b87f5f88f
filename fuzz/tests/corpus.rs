//! Runs every file of the seed corpus (and every saved crash) through the fuzz target, so the
//! corpus is a regression suite on stable without cargo-fuzz.

use std::path::Path;

fn run_dir(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_file() {
            let data = std::fs::read(&path).unwrap();
            eprintln!("{}", path.display());
            qedstream_fuzz::fuzz_qed_image(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn every_seed_and_crash_runs_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let seeds = run_dir(&root.join("corpus/qed_image"));
    assert!(seeds >= 10, "the seed corpus is missing ({seeds} files)");
    run_dir(&root.join("artifacts/qed_image"));
}
