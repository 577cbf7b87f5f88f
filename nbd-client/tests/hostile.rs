//! A scripted misbehaving server: what real servers never do must not break the client.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::scripted::{self, *};
use common::test_config;
use nbd_client::{Client, ConnectionState, Errno, Error, Refusal, Violation, ZeroFlags};

const MIB: u64 = 1 << 20;

async fn connect(s: &Scripted) -> Client {
    Client::connect(&s.uri, test_config())
        .await
        .expect("connect to scripted server")
}

fn protocol(e: Error) -> Violation {
    match e {
        Error::Protocol(v) => v,
        other => panic!("expected a protocol violation, got {other:?}"),
    }
}

#[test]
fn client_is_clone_send_sync() {
    fn assert_shareable<T: Clone + Send + Sync + 'static>() {}
    assert_shareable::<Client>();
    assert_shareable::<Error>();
}

#[tokio::test]
async fn well_behaved_script_reads_and_checks_the_option_order() {
    let s = serve(Script::new(Mode::Structured, MIB, |r| {
        Action::Send(good_read(r))
    }));
    let c = connect(&s).await;
    assert_eq!(c.read(4096, 8192).await.unwrap(), pattern(4096, 8192));
    // Trap: nothing between SET_META_CONTEXT and GO; EXTENDED_HEADERS first.
    assert_eq!(s.options(), vec![11, 8, 10, 7]);
    c.close().await;
    assert_eq!(c.state(), ConnectionState::Closed);
}

#[tokio::test]
async fn bad_magic_kills_the_connection() {
    let s = serve(Script::new(Mode::Structured, MIB, |r| {
        let mut b = good_read(r);
        b[0..4].copy_from_slice(&0x1256_0953u32.to_be_bytes());
        Action::Send(b)
    }));
    let c = connect(&s).await;
    let v = protocol(c.read(0, 4096).await.unwrap_err());
    assert!(
        matches!(
            v,
            Violation::BadMagic {
                found: 0x1256_0953,
                ..
            }
        ),
        "{v:?}"
    );
    assert_eq!(c.state(), ConnectionState::Failed);
    assert!(
        c.read(0, 4096).await.unwrap_err().is_protocol_violation(),
        "no reconnect after a violation"
    );
}

#[tokio::test]
async fn unknown_cookie_kills_the_connection() {
    let s = serve(Script::new(Mode::Structured, MIB, |r| {
        let mut r2 = r.clone();
        r2.cookie ^= 0xdead_0000;
        Action::Send(good_read(&r2))
    }));
    let c = connect(&s).await;
    assert!(matches!(
        protocol(c.read(0, 512).await.unwrap_err()),
        Violation::UnknownCookie(_)
    ));
}

#[tokio::test]
async fn oversize_data_chunk_is_rejected_before_reading_it() {
    let s = serve(Script::new(Mode::Structured, MIB, |r| {
        // Claims 4 GiB of payload for a 512-byte read.
        let mut b = chunk(DONE, 1, r.cookie, &[]);
        b[16..20].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        Action::Send(b)
    }));
    let c = connect(&s).await;
    assert!(matches!(
        protocol(c.read(0, 512).await.unwrap_err()),
        Violation::BadChunkLength { .. }
    ));
}

#[tokio::test]
async fn data_outside_the_request_is_rejected() {
    let s = serve(Script::new(Mode::Structured, MIB, |r| {
        Action::Send(data(DONE, r.cookie, r.offset + 512, &pattern(0, r.length)))
    }));
    let c = connect(&s).await;
    assert!(matches!(
        protocol(c.read(4096, 1024).await.unwrap_err()),
        Violation::ChunkOutOfRange { .. }
    ));
}

#[tokio::test]
async fn duplicated_half_with_missing_half_is_rejected() {
    // libnbd 1.14 and QEMU 10 both accept this (the byte count matches).
    let s = serve(Script::new(Mode::Structured, MIB, |r| {
        let half = r.length / 2;
        let mut b = data(0, r.cookie, r.offset, &pattern(r.offset, half));
        b.extend(data(DONE, r.cookie, r.offset, &pattern(r.offset, half)));
        Action::Send(b)
    }));
    let c = connect(&s).await;
    assert!(matches!(
        protocol(c.read(0, 4096).await.unwrap_err()),
        Violation::ChunkOverlap { .. }
    ));
}

#[tokio::test]
async fn gap_in_a_read_is_rejected() {
    let s = serve(Script::new(Mode::Structured, MIB, |r| {
        let mut b = data(0, r.cookie, r.offset, &pattern(r.offset, r.length / 2));
        b.extend(none_done(r.cookie));
        Action::Send(b)
    }));
    let c = connect(&s).await;
    let v = protocol(c.read(0, 4096).await.unwrap_err());
    assert_eq!(
        v,
        Violation::ReadIncomplete {
            req_offset: 0,
            req_length: 4096,
            received: 2048
        }
    );
}

#[tokio::test]
async fn holes_and_out_of_order_chunks_assemble() {
    let s = serve(Script::new(Mode::Structured, MIB, |r| {
        let half = r.length / 2;
        let mut b = data(
            0,
            r.cookie,
            r.offset + half,
            &pattern(r.offset + half, half),
        );
        b.extend(hole(DONE, r.cookie, r.offset, half as u32));
        Action::Send(b)
    }));
    let c = connect(&s).await;
    // Reuse a dirty buffer: the hole must be zeroed, not left stale.
    let buf = c.read_buf(0, vec![0xee; 4096]).await.unwrap();
    assert!(buf[..2048].iter().all(|&b| b == 0));
    assert_eq!(&buf[2048..], &pattern(2048, 2048)[..]);
}

#[tokio::test]
async fn truncated_reply_is_a_lost_connection() {
    let s = serve(Script::new(Mode::Structured, MIB, |r| {
        let mut b = good_read(r);
        b.truncate(b.len() - 100);
        Action::SendClose(b)
    }));
    let c = connect(&s).await;
    let e = c.read(0, 4096).await.unwrap_err();
    assert!(matches!(e, Error::ConnectionLost(_)), "{e:?}");
    assert!(e.is_retryable());
    assert_eq!(
        c.state(),
        ConnectionState::Failed,
        "reconnect disabled in this config"
    );
}

#[tokio::test]
async fn absurd_option_reply_length_is_refused() {
    let mut script = Script::new(Mode::Structured, MIB, |_| Action::Nothing);
    script.on_option = Some(Box::new(|opt| {
        (opt == 7).then(|| {
            let mut v = option_reply(7, 3, &[]);
            v[16..20].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
            v
        })
    }));
    let s = serve(script);
    let e = Client::connect(&s.uri, test_config()).await.unwrap_err();
    assert!(matches!(
        protocol(e),
        Violation::OptionReplyTooLong {
            option: 7,
            length: 0xffff_fff0
        }
    ));
}

#[tokio::test]
async fn reply_never_marked_done_times_out() {
    let s = serve(Script::new(Mode::Structured, MIB, |r| {
        Action::Send(data(0, r.cookie, r.offset, &pattern(r.offset, r.length)))
    }));
    let mut cfg = test_config();
    cfg.request_timeout = Some(Duration::from_millis(300));
    let c = Client::connect(&s.uri, cfg).await.unwrap();
    let e = c.read(0, 4096).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Timeout {
                what: "request",
                ..
            }
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn server_that_stops_answering_times_out_then_reconnects() {
    let s = serve(Script::new(Mode::Structured, MIB, |_| Action::Nothing));
    let mut cfg = test_config();
    cfg.request_timeout = Some(Duration::from_millis(200));
    cfg.reconnect_delay = Duration::from_secs(5);
    let c = Client::connect(&s.uri, cfg).await.unwrap();
    let mut states = c.subscribe_state();
    let e = c.read(0, 4096).await.unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(e.is_retryable());
    // The timeout dropped the connection and the client reconnected (the server still
    // accepts and negotiates; it just never answers requests).
    tokio::time::timeout(
        Duration::from_secs(5),
        states.wait_for(|s| *s == ConnectionState::Connected),
    )
    .await
    .expect("reconnected in time")
    .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(s.log.lock().unwrap().connections, 2);
    assert!(matches!(
        c.read(0, 4096).await.unwrap_err(),
        Error::Timeout { .. }
    ));
}

#[tokio::test]
async fn server_error_fails_only_that_request() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let s = serve(Script::new(Mode::Structured, MIB, move |r| {
        if n2.fetch_add(1, Ordering::SeqCst) == 0 {
            Action::Send(error(DONE, r.cookie, 5, "injected"))
        } else {
            Action::Send(good_read(r))
        }
    }));
    let c = connect(&s).await;
    let e = c.read(0, 4096).await.unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EIO));
    assert!(e.to_string().contains("injected"));
    assert_eq!(c.read(0, 4096).await.unwrap(), pattern(0, 4096));
    assert_eq!(c.state(), ConnectionState::Connected);
}

#[tokio::test]
async fn unknown_error_chunk_type_fails_the_request_only() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let s = serve(Script::new(Mode::Structured, MIB, move |r| {
        if n2.fetch_add(1, Ordering::SeqCst) == 0 {
            Action::Send(chunk(DONE, 0x802a, r.cookie, &error_payload(22, "odd")))
        } else {
            Action::Send(good_read(r))
        }
    }));
    let c = connect(&s).await;
    assert_eq!(
        c.read(0, 512).await.unwrap_err().server_errno(),
        Some(Errno::EINVAL)
    );
    assert!(c.read(0, 512).await.is_ok());
}

#[tokio::test]
async fn simple_replies_to_non_reads_after_structured_are_accepted() {
    // qemu-nbd answers successful WRITE/TRIM/FLUSH/CACHE with simple replies.
    let s = serve(Script::new(Mode::Structured, MIB, |r| {
        Action::Send(simple(r.cookie, 0))
    }));
    let c = connect(&s).await;
    c.write(0, &[1u8; 4096]).await.unwrap();
    c.trim(0, 4096).await.unwrap();
    c.write_zeroes(0, 4096, ZeroFlags::default()).await.unwrap();
    c.cache(0, 4096).await.unwrap();
    c.flush().await.unwrap();
    let reqs = s.requests();
    assert_eq!(
        reqs.iter().map(|r| r.typ).collect::<Vec<_>>(),
        vec![1, 4, 6, 5, 3]
    );
    assert_eq!(reqs[0].payload, vec![1u8; 4096]);
}

#[tokio::test]
async fn simple_reply_to_a_read_after_structured_is_a_violation() {
    let s = serve(Script::new(Mode::Structured, MIB, |r| {
        Action::Send(simple(r.cookie, 0))
    }));
    let c = connect(&s).await;
    assert_eq!(
        protocol(c.read(0, 512).await.unwrap_err()),
        Violation::SimpleReplyToRead
    );
}

#[tokio::test]
async fn context_id_zero_is_valid_and_extents_are_clamped() {
    let s = serve(Script::new(Mode::Structured, MIB, |r| {
        // 64 KiB data, then a zero extent running far past the request and the export.
        Action::Send(block_status(
            DONE,
            r.cookie,
            0,
            &[(65536, 0), (0x4000_0000, 3)],
        ))
    }));
    let c = connect(&s).await;
    assert!(c.has_block_status());
    let e = c.block_status(0, 256 * 1024).await.unwrap();
    assert_eq!(common::as_map(&e), vec![(0, 65536, 0), (65536, 196608, 3)]);
}

#[tokio::test]
async fn zero_length_extent_is_a_violation() {
    let s = serve(Script::new(Mode::Structured, MIB, |r| {
        Action::Send(block_status(DONE, r.cookie, 0, &[(0, 0)]))
    }));
    let c = connect(&s).await;
    assert_eq!(
        protocol(c.block_status(0, 4096).await.unwrap_err()),
        Violation::ZeroLengthExtent
    );
}

#[tokio::test]
async fn duplicate_block_status_chunk_is_a_violation() {
    let s = serve(Script::new(Mode::Structured, MIB, |r| {
        let mut b = block_status(0, r.cookie, 0, &[(4096, 0)]);
        b.extend(block_status(DONE, r.cookie, 0, &[(4096, 0)]));
        Action::Send(b)
    }));
    let c = connect(&s).await;
    assert_eq!(
        protocol(c.block_status(0, 4096).await.unwrap_err()),
        Violation::DuplicateBlockStatus
    );
}

#[tokio::test]
async fn dropped_request_future_does_not_desynchronise() {
    // The first read is answered (in two chunks) only when the next request arrives, after
    // its future was dropped: its chunks must be consumed and discarded.
    let held: Arc<std::sync::Mutex<Option<scripted::Req>>> = Arc::default();
    let h2 = held.clone();
    let two_chunks = |r: &scripted::Req| {
        let half = r.length / 2;
        let mut b = data(0, r.cookie, r.offset, &pattern(r.offset, half));
        b.extend(data(
            DONE,
            r.cookie,
            r.offset + half,
            &pattern(r.offset + half, half),
        ));
        b
    };
    let s = serve(Script::new(Mode::Structured, MIB, move |r| {
        let mut held = h2.lock().unwrap();
        if r.offset == 0 && r.length == 65536 {
            *held = Some(r.clone());
            return Action::Nothing;
        }
        let mut out = held
            .take()
            .map(|first| two_chunks(&first))
            .unwrap_or_default();
        out.extend(two_chunks(r));
        Action::Send(out)
    }));
    let c = connect(&s).await;
    let slow = c.read(0, 65536);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), slow)
            .await
            .is_err(),
        "dropped"
    );
    assert_eq!(c.read(65536, 65536).await.unwrap(), pattern(65536, 65536));
    assert_eq!(c.read(0, 4096).await.unwrap(), pattern(0, 4096));
    assert_eq!(c.state(), ConnectionState::Connected);
    assert!(
        held.lock().unwrap().is_none(),
        "the abandoned read was answered"
    );
}

#[tokio::test]
async fn oldstyle_and_non_fixed_newstyle_are_refused() {
    let mut old = 0x4e42_444d_4147_4943u64.to_be_bytes().to_vec();
    old.extend_from_slice(&0x0000_4202_8186_1253u64.to_be_bytes());
    old.extend_from_slice(&(1u64 << 20).to_be_bytes());
    old.extend_from_slice(&[0u8; 128]);
    let mut script = Script::new(Mode::Structured, MIB, |_| Action::Nothing);
    script.greeting = Some(old);
    let s = serve(script);
    let e = Client::connect(&s.uri, test_config()).await.unwrap_err();
    assert!(
        matches!(e, Error::UnsupportedServer(m) if m.contains("oldstyle")),
        "{e:?}"
    );

    let mut plain = 0x4e42_444d_4147_4943u64.to_be_bytes().to_vec();
    plain.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
    plain.extend_from_slice(&0u16.to_be_bytes());
    let mut script = Script::new(Mode::Structured, MIB, |_| Action::Nothing);
    script.greeting = Some(plain);
    let s = serve(script);
    let e = Client::connect(&s.uri, test_config()).await.unwrap_err();
    assert!(
        matches!(e, Error::UnsupportedServer(m) if m.contains("non-fixed")),
        "{e:?}"
    );
}

#[tokio::test]
async fn go_unsupported_falls_back_to_export_name() {
    let mut script = Script::new(Mode::Structured, MIB, |r| Action::Send(good_read(r)));
    script.go_unsupported = true;
    let s = serve(script);
    let c = connect(&s).await;
    assert!(c.export().used_export_name);
    assert_eq!(c.size(), MIB);
    assert_eq!(c.read(0, 512).await.unwrap(), pattern(0, 512));
    assert_eq!(s.options(), vec![11, 8, 10, 7, 1]);
}

#[tokio::test]
async fn simple_mode_reads_work() {
    let s = serve(Script::new(Mode::Simple, MIB, |r| {
        let mut b = simple(r.cookie, 0);
        b.extend(pattern(r.offset, r.length));
        Action::Send(b)
    }));
    let c = connect(&s).await;
    assert!(!c.has_block_status());
    assert_eq!(c.read(512, 8192).await.unwrap(), pattern(512, 8192));
    assert!(matches!(
        c.block_status(0, 4096).await,
        Err(Error::Refused(Refusal::Unsupported(_)))
    ));
    assert_eq!(
        s.options(),
        vec![11, 8, 7],
        "no SET_META_CONTEXT without structured replies"
    );
}

#[tokio::test]
async fn extended_headers_and_offset_echo() {
    let s = serve(Script::new(Mode::Extended, MIB, |r| match r.typ {
        0 => Action::Send(ext_chunk(
            DONE,
            1,
            r.cookie,
            r.offset,
            &data_payload(r.offset, &pattern(r.offset, r.length)),
        )),
        7 => {
            let mut p = 0u32.to_be_bytes().to_vec();
            p.extend_from_slice(&1u32.to_be_bytes());
            p.extend_from_slice(&(r.length).to_be_bytes());
            p.extend_from_slice(&2u64.to_be_bytes());
            Action::Send(ext_chunk(DONE, 6, r.cookie, r.offset, &p))
        }
        _ => Action::Send(ext_chunk(DONE, 0, r.cookie, r.offset + 1, &[])),
    }));
    let c = connect(&s).await;
    assert_eq!(c.export().mode, nbd_client::HeaderMode::Extended);
    assert_eq!(c.read(8192, 4096).await.unwrap(), pattern(8192, 4096));
    let e = c.block_status(4096, 8192).await.unwrap();
    assert_eq!(common::as_map(&e), vec![(4096, 8192, 2)]);
    // The chunk for the flush does not echo the request offset.
    assert!(matches!(
        protocol(c.flush().await.unwrap_err()),
        Violation::OffsetNotEchoed { .. }
    ));
}

#[tokio::test]
async fn local_refusals_send_nothing() {
    let mut script = Script::new(Mode::Structured, MIB, |r| Action::Send(simple(r.cookie, 0)));
    script.flags = 1 | 2; // HAS_FLAGS | READ_ONLY, nothing else
    let s = serve(script);
    let c = connect(&s).await;
    let refused = |r: Result<(), Error>| match r {
        Err(Error::Refused(x)) => x,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(refused(c.write(0, &[0; 512]).await), Refusal::ReadOnly);
    assert_eq!(refused(c.trim(0, 512).await), Refusal::ReadOnly);
    assert_eq!(
        refused(c.write_zeroes(0, 512, ZeroFlags::default()).await),
        Refusal::ReadOnly
    );
    assert_eq!(refused(c.flush().await), Refusal::Unsupported("FLUSH"));
    assert_eq!(
        refused(c.cache(0, 512).await),
        Refusal::Unsupported("CACHE")
    );
    assert!(matches!(
        c.read(MIB - 512, 1024).await,
        Err(Error::Refused(Refusal::OutOfBounds { .. }))
    ));
    assert!(matches!(
        c.read(0, 0).await,
        Err(Error::Refused(Refusal::ZeroLength))
    ));
    assert!(s.requests().is_empty(), "nothing may reach the server");

    let mut script = Script::new(Mode::Structured, MIB, |r| Action::Send(simple(r.cookie, 0)));
    script.flags = 1 | 64; // writable, WRITE_ZEROES but no FAST_ZERO
    let s = serve(script);
    let c = connect(&s).await;
    let fast = ZeroFlags {
        fast: true,
        no_hole: false,
    };
    assert_eq!(
        refused(c.write_zeroes(0, 512, fast).await),
        Refusal::Unsupported("FAST_ZERO")
    );
    assert!(s.requests().is_empty());
}

#[tokio::test]
async fn many_requests_in_flight_answered_in_reverse_order() {
    // Collect 8 reads, then answer them last-first.
    let pending: Arc<std::sync::Mutex<Vec<scripted::Req>>> = Arc::default();
    let p2 = pending.clone();
    let s = serve(Script::new(Mode::Structured, 16 * MIB, move |r| {
        let mut p = p2.lock().unwrap();
        p.push(r.clone());
        if p.len() < 8 {
            return Action::Nothing;
        }
        let mut out = Vec::new();
        for r in p.drain(..).rev() {
            out.extend(good_read(&r));
        }
        Action::Send(out)
    }));
    let mut cfg = test_config();
    cfg.max_request_bytes = 64 * 1024;
    let c = Client::connect(&s.uri, cfg).await.unwrap();
    assert_eq!(c.read(0, 512 * 1024).await.unwrap(), pattern(0, 512 * 1024));
    assert_eq!(s.requests().len(), 8);
    assert!(s.requests().iter().all(|r| r.length == 64 * 1024));
}

/// The first WRITE kills the connection (EOF mid-request); later ones succeed.
fn write_once_drops_connection() -> Scripted {
    let n = Arc::new(AtomicUsize::new(0));
    serve(Script::new(Mode::Structured, MIB, move |r| match r.typ {
        1 if n.fetch_add(1, Ordering::SeqCst) == 0 => Action::SendClose(Vec::new()),
        0 => Action::Send(good_read(r)),
        _ => Action::Send(simple(r.cookie, 0)),
    }))
}

#[tokio::test]
async fn writes_in_flight_are_not_resent_unless_configured() {
    let s = write_once_drops_connection();
    let cfg = nbd_client::ClientConfig {
        reconnect_delay: Duration::from_secs(5),
        ..test_config()
    };
    let c = Client::connect(&s.uri, cfg).await.unwrap();
    let e = c.write(0, &[1; 4096]).await.unwrap_err();
    assert!(matches!(e, Error::ConnectionLost(_)), "{e:?}");
    // Reads wait for the reconnect and succeed.
    assert_eq!(c.read(0, 4096).await.unwrap(), pattern(0, 4096));
    assert_eq!(c.state(), ConnectionState::Connected);
    c.close().await;

    let s = write_once_drops_connection();
    let cfg = nbd_client::ClientConfig {
        reconnect_delay: Duration::from_secs(5),
        resend_writes: true,
        ..test_config()
    };
    let c = Client::connect(&s.uri, cfg).await.unwrap();
    c.write(0, &[1; 4096]).await.unwrap();
    let writes: Vec<_> = s.requests().into_iter().filter(|r| r.typ == 1).collect();
    assert_eq!(
        writes.len(),
        2,
        "sent once, re-sent once after the reconnect"
    );
    assert_eq!(writes[1].payload, vec![1; 4096]);
    c.close().await;
}

/// The server answers a read at 1 MiB with the reply header and half its data, then closes the
/// connection (after `pause`); every other request is answered well.
fn half_reply_then_close(pause: Duration) -> Scripted {
    serve(Script::new(Mode::Structured, 2 * MIB, move |r| {
        if r.typ == 0 && r.offset == MIB {
            let mut b = good_read(r);
            b.truncate(b.len() - r.length as usize / 2);
            return Action::DelayClose(pause, b);
        }
        Action::Send(good_read(r))
    }))
}

/// A poison request: the server dies on it (half a reply, then EOF) every time, and comes back
/// every time. The client re-sends it `max_resends` (3) times, then fails it with
/// `ResendsExhausted`, whatever the handshakes in between did; the connection stays usable.
#[tokio::test]
async fn a_request_the_server_dies_on_fails_after_the_resend_limit() {
    let s = half_reply_then_close(Duration::ZERO);
    let cfg = nbd_client::ClientConfig {
        reconnect_delay: Duration::from_secs(30),
        ..test_config()
    };
    assert_eq!(cfg.max_resends, 3, "the documented default");
    let c = Client::connect(&s.uri, cfg).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(60), c.read(MIB, 4096))
        .await
        .expect("the poison read looped for 60 s")
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::ResendsExhausted {
                sends: 4,
                offset: MIB,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(!e.is_retryable(), "a poison request is not retried above");
    let poison = s.requests().iter().filter(|r| r.offset == MIB).count();
    assert_eq!(poison, 4, "sent once and re-sent 3 times");
    // Other requests still work on the reconnected client.
    assert_eq!(c.read(0, 4096).await.unwrap(), pattern(0, 4096));
    assert_eq!(c.state(), ConnectionState::Connected);
    c.close().await;
}

/// The window of a request is counted from its own first failure: a server that takes 300 ms
/// to die on the request, with a 1 s window and no practical resend limit, fails it with
/// `ReconnectFailed` after a handful of sends although every reconnect succeeded.
#[tokio::test]
async fn a_request_waits_at_most_the_window_from_its_first_failure() {
    let s = half_reply_then_close(Duration::from_millis(300));
    let cfg = nbd_client::ClientConfig {
        reconnect_delay: Duration::from_secs(1),
        max_resends: 1000,
        ..test_config()
    };
    let c = Client::connect(&s.uri, cfg).await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(60), c.read(MIB, 4096))
        .await
        .expect("the poison read looped for 60 s")
        .unwrap_err();
    assert!(matches!(e, Error::ReconnectFailed { .. }), "{e:?}");
    let sends = s.requests().iter().filter(|r| r.offset == MIB).count();
    // At least 300 ms per send: a 1 s window after the first failure leaves room for at most
    // four more (fewer when reconnecting is slow); far below the resend limit.
    assert!((1..=6).contains(&sends), "{sends} sends");
    c.close().await;
}
