//! Writes the seeds of `corpus/vhost_blk_chain/`: well-formed requests of every type and a
//! few malformed chains, in `vhost_user_blk::fuzzing`'s input layout
//! (`cargo run -p qedstream-fuzz --example make_vhost_corpus`).

use vhost_user_blk::fuzzing::{encode_input, DATA_AT, REGION1};

const NEXT: u16 = 1;
const WRITE: u16 = 2;

/// A request header (type, sector) followed by `extra` bytes, as guest memory at `DATA_AT`.
fn memory(kind: u32, sector: u64, extra: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&kind.to_le_bytes());
    m.extend_from_slice(&[0; 4]);
    m.extend_from_slice(&sector.to_le_bytes());
    m.extend_from_slice(extra);
    m
}

fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/vhost_blk_chain");
    std::fs::create_dir_all(&dir).unwrap();
    let hdr = DATA_AT;
    let buf = DATA_AT + 0x100;
    let status = 0x8000;
    let mut range = Vec::new();
    range.extend_from_slice(&8u64.to_le_bytes());
    range.extend_from_slice(&4u32.to_le_bytes());
    range.extend_from_slice(&0u32.to_le_bytes());
    let three = |data_flags: u16, len: u32| {
        vec![
            (hdr, 16, NEXT, 1),
            (buf, len, data_flags | NEXT, 2),
            (status, 1, WRITE, 0),
        ]
    };
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        (
            "read",
            encode_input(0, &three(WRITE, 1024), &memory(0, 2, &[])),
        ),
        (
            "write",
            encode_input(0, &three(0, 512), &memory(1, 3, &[0x5a; 0x200])),
        ),
        (
            "flush",
            encode_input(
                0,
                &[(hdr, 16, NEXT, 1), (status, 1, WRITE, 0)],
                &memory(4, 0, &[]),
            ),
        ),
        (
            "get-id",
            encode_input(0, &three(WRITE, 20), &memory(8, 0, &[])),
        ),
        (
            "write-zeroes",
            encode_input(
                0,
                &three(0, 16),
                &memory(13, 0, &{
                    let mut m = vec![0u8; 0x100 - 16];
                    m.extend_from_slice(&range);
                    m
                }),
            ),
        ),
        (
            "read-second-region",
            encode_input(
                0,
                &[
                    (hdr, 16, NEXT, 1),
                    (REGION1, 4096, WRITE | NEXT, 2),
                    (status, 1, WRITE, 0),
                ],
                &memory(0, 0, &[]),
            ),
        ),
        (
            "loop",
            encode_input(
                0,
                &[
                    (hdr, 16, NEXT, 1),
                    (buf, 512, WRITE | NEXT, 2),
                    (status, 1, WRITE | NEXT, 1),
                ],
                &memory(0, 0, &[]),
            ),
        ),
        (
            "wrong-direction",
            encode_input(0, &three(0, 512), &memory(0, 0, &[])),
        ),
        (
            "past-the-end",
            encode_input(0, &three(WRITE, 512), &memory(0, 1 << 11, &[])),
        ),
        (
            "unknown-type",
            encode_input(0, &three(WRITE, 512), &memory(77, 0, &[])),
        ),
    ];
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
