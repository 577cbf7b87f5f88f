//! Replays the fuzz input as everything an NBD client sends (then EOF) to `nbd-server`
//! exporting a disk in memory; see `nbd_server::fuzzing::replay_client_bytes`. Must never
//! panic or hang (a hang is turned into a panic, which the fuzzer reports).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(failure) = nbd_server::fuzzing::replay_client_bytes_blocking(data) {
        panic!("{failure}");
    }
});
