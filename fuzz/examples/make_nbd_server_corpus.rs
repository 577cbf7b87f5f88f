//! Writes the seeds of `corpus/nbd_server_replay/`: well-formed client sessions
//! ([`qedstream_fuzz::nbd_sessions::seeds`]). Run: `cargo run -p qedstream-fuzz --example
//! make_nbd_server_corpus`.

fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/nbd_server_replay");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in qedstream_fuzz::nbd_sessions::seeds() {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
