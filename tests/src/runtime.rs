//! The tokio runtime the async tests drive devices on: two workers (the machine the tests
//! run on may have two cores), timers and sockets enabled.

/// A multi-threaded runtime with two workers.
pub fn two_workers() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("starting a tokio runtime")
}
