//! Writes the seeds of `corpus/control_json/`: well-formed QMP sessions of every command
//! ([`qedstream_fuzz::qmp_sessions::seeds`]). Run: `cargo run -p qedstream-fuzz --example
//! make_control_corpus`.

fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/control_json");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in qedstream_fuzz::qmp_sessions::seeds() {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
