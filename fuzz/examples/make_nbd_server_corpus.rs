//! Writes the seeds of `corpus/nbd_server_replay/` (whole client sessions,
//! [`qedstream_fuzz::nbd_sessions::seeds`]), `corpus/nbd_server_options/` and
//! `corpus/nbd_server_requests/` (one phase each, [`qedstream_fuzz::nbd_phases`]). Run:
//! `cargo run -p qedstream-fuzz --example make_nbd_server_corpus`.

use std::path::Path;

fn write(target: &str, seeds: Vec<(&str, Vec<u8>)>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

fn main() {
    write("nbd_server_replay", qedstream_fuzz::nbd_sessions::seeds());
    write(
        "nbd_server_options",
        qedstream_fuzz::nbd_phases::option_seeds(),
    );
    write(
        "nbd_server_requests",
        qedstream_fuzz::nbd_phases::request_seeds(),
    );
}
