//! Instruction counts of the lookup and read paths, for callgrind (the machine is shared, so
//! counts, not times): `lookup_instructions MODE N` (MODE `mapping_at` or `read_at`) sets up
//! an in-memory image with 16 data runs, then does N cached lookups or 4 KiB reads. Two runs,
//! N and 2N, give the cost of one iteration:
//!
//! ```sh
//! cargo build --release -p qedstream-benches --example lookup_instructions
//! for n in 100000 200000; do
//!   valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     target/release/examples/lookup_instructions mapping_at $n 2>&1 | grep Collected
//! done
//! ```
use qed::{CreateOptions, GuestOffset, Image, MemStorage, OpenOptions};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args[1].as_str();
    let n: u64 = args[2].parse().unwrap();
    let storage = MemStorage::new();
    Image::create(&storage, &CreateOptions::new(256 << 20)).unwrap();
    let image = Image::open(Box::new(storage), OpenOptions::default()).unwrap();
    let data = vec![7u8; 1 << 20];
    for i in 0..16u64 {
        image.write_at(&data, GuestOffset(i * (4 << 20))).unwrap();
    }
    let mut buf = vec![0u8; 4096];
    let mut sum = 0u64;
    for i in 0..n {
        let at = (i % 16) * (4 << 20) + (i * 4096) % (1 << 20);
        match mode {
            "mapping_at" => {
                let (m, len) = image.mapping_at(GuestOffset(at), 4096).unwrap();
                sum = sum.wrapping_add(len + matches!(m, qed::Mapping::Data(_)) as u64);
            }
            "read_at" => {
                image.read_at(&mut buf, GuestOffset(at)).unwrap();
                sum = sum.wrapping_add(buf[0] as u64);
            }
            _ => panic!("mode"),
        }
    }
    std::hint::black_box(sum);
    image.close().unwrap();
}
