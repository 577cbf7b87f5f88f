//! Fuzzes opening, mapping, reading and taking the block status of an arbitrary byte string
//! as a qcow2 image (see `qedstream_fuzz::qcow2::fuzz_qcow2_image`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    qedstream_fuzz::qcow2::fuzz_qcow2_image(data);
});
