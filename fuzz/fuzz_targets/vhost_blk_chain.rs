//! Fuzzes the virtio-blk descriptor-chain parser and executor: an arbitrary descriptor table,
//! head and guest memory contents in a fake guest memory, run against an in-memory disk (see
//! `vhost_user_blk::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = vhost_user_blk::fuzzing::run_input(data);
});
