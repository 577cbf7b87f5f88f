//! Feeds the fuzz input (a selector byte, then a client's requests) to `nbd-server`'s
//! transmission phase alone, in the mode the selector picks, and checks that every request
//! gets exactly one well-framed reply; see `nbd_server::fuzzing::requests`. A panic, a hang
//! or a wrong reply is reported.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(failure) = nbd_server::fuzzing::serve_request_bytes(data) {
        panic!("{failure}");
    }
});
