//! Replays the fuzz input as everything an NBD server sends (as libnbd's fuzz wrapper does),
//! while `nbd-client` negotiates and issues a few commands; see
//! `nbd_client::fuzzing::replay_server_bytes`. Must never panic or hang.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = nbd_client::fuzzing::replay_server_bytes_blocking(data);
});
