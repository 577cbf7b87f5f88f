//! Feeds the fuzz input (a piece-size byte, then a client's bytes) to the QMP control socket's
//! client loop as one session, against a control of a copy-on-read device in memory; see
//! `engine::control::fuzzing`. A panic, a hang, a line that is not QMP, or an image that no
//! longer checks clean is reported.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(failure) = engine::control::fuzzing::replay_qmp_bytes(data) {
        panic!("{failure}");
    }
});
