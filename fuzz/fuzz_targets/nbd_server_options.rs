//! Feeds the fuzz input (a selector byte, then a client's bytes) to `nbd-server`'s option
//! haggling alone, on in-memory streams, and checks every reply against the protocol; see
//! `nbd_server::fuzzing::options`. A panic, a stall or a wrong reply is reported.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(failure) = nbd_server::fuzzing::negotiate_client_bytes(data) {
        panic!("{failure}");
    }
});
