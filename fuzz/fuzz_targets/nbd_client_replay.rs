//! Replays the fuzz input as everything an NBD server sends (as libnbd's fuzz wrapper does),
//! while `nbd-client` negotiates and issues a few commands; see
//! `nbd_client::fuzzing::replay_server_bytes`. Must never panic, hang, or end in an error the
//! input cannot explain (a hang or such an error is turned into a panic, which the fuzzer reports).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(failure) = nbd_client::fuzzing::replay_server_bytes_blocking(data) {
        panic!("{failure}");
    }
});
