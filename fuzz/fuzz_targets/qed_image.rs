//! Fuzzes opening, reading, mapping, checking, repairing and writing an arbitrary byte string
//! as a QED image (see `qedstream_fuzz::fuzz_qed_image`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    qedstream_fuzz::fuzz_qed_image(data);
});
