//! The library without its command line: `engine` with `default-features = false` (how a
//! hypervisor embeds the stream job) depends on neither clap nor indicatif. The build of that
//! configuration runs in CI (`.ci/run`: `cargo build -p engine --no-default-features --lib`).

use std::process::Command;

/// `cargo tree -p engine -e normal` with `features`: every package in the library's graph.
fn tree(features: &[&str]) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_string());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let out = Command::new(cargo)
        .args(["tree", "--offline", "--manifest-path", manifest])
        .args(["-p", "engine", "-e", "normal", "--prefix", "none"])
        .args(features)
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("cargo tree prints UTF-8")
}

fn has(tree: &str, package: &str) -> bool {
    tree.lines()
        .any(|l| l.split_whitespace().next() == Some(package))
}

#[test]
fn the_library_alone_pulls_in_no_command_line_crates() {
    let lib = tree(&["--no-default-features"]);
    assert!(has(&lib, "engine"), "{lib}");
    for cli_only in ["clap", "indicatif", "tempfile"] {
        assert!(
            !has(&lib, cli_only),
            "{cli_only} in the library's tree:\n{lib}"
        );
    }
    // The same question of the command's tree says yes: the check can see them.
    let cli = tree(&[]);
    for cli_only in ["clap", "indicatif", "tempfile"] {
        assert!(
            has(&cli, cli_only),
            "{cli_only} missing from the command's tree:\n{cli}"
        );
    }
}
