//! Interop with nbdkit 1.32 (structured replies, no extended headers): plugins memory,
//! sparse-random, data, file; filters error and delay; reconnect across a server restart.

mod common;

use std::time::Duration;

use common::{
    as_map, full_map, merge_map, nbdinfo_map, nbdkit, sparse_image, tempdir, test_config, Listen,
};
use nbd_client::{Client, ClientConfig, ConnectionState, Errno, Error, HeaderMode, ZeroFlags};

const MIB: u64 = 1 << 20;

fn sock(dir: &tempfile::TempDir) -> Listen {
    Listen::Unix(dir.path().join("s.sock"))
}

#[tokio::test]
async fn memory_plugin_write_read_zero_trim_over_tcp() {
    let srv = nbdkit(Listen::Tcp(common::free_port()), &["memory", "64M"]);
    let c = Client::connect(&srv.uri, test_config()).await.unwrap();
    assert_eq!(
        c.export().mode,
        HeaderMode::Structured,
        "nbdkit 1.32 has no extended headers"
    );
    assert!(c.can_multi_conn() && c.can_write() && c.can_fast_zero());
    assert_eq!(c.connection_count(), 2);
    let data: Vec<u8> = (0..3 * MIB).map(|i| (i % 253) as u8).collect();
    c.write(MIB, &data).await.unwrap();
    c.flush().await.unwrap();
    assert!(c.read(MIB, 3 * MIB).await.unwrap() == data);
    c.write_zeroes(
        MIB,
        MIB,
        ZeroFlags {
            fast: true,
            no_hole: false,
        },
    )
    .await
    .unwrap();
    c.trim(2 * MIB, MIB).await.unwrap();
    let back = c.read(MIB, 3 * MIB).await.unwrap();
    assert!(back[..2 * MIB as usize].iter().all(|&b| b == 0));
    assert!(back[2 * MIB as usize..] == data[2 * MIB as usize..]);
    let e = c.block_status(0, 64 * MIB).await.unwrap();
    assert_eq!(e[0].offset, 0);
    assert!(
        e.iter().any(|x| !x.zero),
        "written data is reported as data"
    );
    // Drain and disconnect cleanly (nbdkit 1.32 may abort when multi-conn clients vanish).
    c.close().await;
}

#[tokio::test]
async fn sparse_random_block_status_matches_nbdinfo_and_zero_extents_read_as_zero() {
    let dir = tempdir();
    let srv = nbdkit(sock(&dir), &["sparse-random", "256M", "seed=7"]);
    let cfg = ClientConfig {
        connections: 1,
        ..test_config()
    };
    let c = Client::connect(&srv.uri, cfg).await.unwrap();
    let ours = full_map(&c, 64 * MIB).await;
    assert_eq!(as_map(&ours), merge_map(&nbdinfo_map(&srv.uri_string())));
    // Read a data extent and a zero extent.
    let data = ours.iter().find(|e| !e.zero).expect("some data");
    let len = data.length.min(MIB);
    let d = c.read(data.offset, len).await.unwrap();
    assert!(d.iter().any(|&b| b != 0));
    if let Some(z) = ours.iter().find(|e| e.zero) {
        let len = z.length.min(MIB);
        assert!(c.read(z.offset, len).await.unwrap().iter().all(|&b| b == 0));
    }
    c.close().await;
}

#[tokio::test]
async fn data_plugin_contents() {
    let dir = tempdir();
    let srv = nbdkit(
        sock(&dir),
        &["data", "data=1 2 3 @0x10000 0xff @0x1ffff 9", "size=1M"],
    );
    let c = Client::connect(&srv.uri, test_config()).await.unwrap();
    let d = c.read(0, MIB).await.unwrap();
    assert_eq!(&d[..4], &[1, 2, 3, 0]);
    assert_eq!(d[0x10000], 0xff);
    assert_eq!(d[0x1ffff], 9);
    assert_eq!(d.iter().filter(|&&b| b != 0).count(), 5);
    c.close().await;
}

#[tokio::test]
async fn file_plugin_reads_match_the_file() {
    let dir = tempdir();
    let img = dir.path().join("f.raw");
    let content = sparse_image(&img, 16 * MIB, 11);
    let img_s = img.display().to_string();
    let srv = nbdkit(sock(&dir), &["file", &img_s]);
    let c = Client::connect(&srv.uri, test_config()).await.unwrap();
    assert!(c.read(0, 16 * MIB).await.unwrap() == content);
    let ours = full_map(&c, 16 * MIB).await;
    for e in ours.iter().filter(|e| e.zero) {
        assert!(content[e.offset as usize..(e.offset + e.length) as usize]
            .iter()
            .all(|&b| b == 0));
    }
    c.close().await;
}

#[tokio::test]
async fn error_filter_fails_requests_not_the_connection() {
    let dir = tempdir();
    let srv = nbdkit(
        sock(&dir),
        &[
            "--filter=error",
            "memory",
            "16M",
            "error-pread=EIO",
            "error-pread-rate=1",
        ],
    );
    let c = Client::connect(&srv.uri, test_config()).await.unwrap();
    let e = c.read(0, 65536).await.unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EIO), "{e:?}");
    assert!(!e.is_retryable());
    // The connection is still usable for other commands.
    c.write(0, &[7u8; 4096]).await.unwrap();
    assert!(!c.block_status(0, MIB).await.unwrap().is_empty());
    assert_eq!(c.state(), ConnectionState::Connected);
    c.close().await;
}

#[tokio::test]
async fn delay_filter_request_timeout() {
    let dir = tempdir();
    let srv = nbdkit(sock(&dir), &["--filter=delay", "memory", "16M", "rdelay=2"]);
    let cfg = ClientConfig {
        request_timeout: Some(Duration::from_millis(300)),
        connections: 1,
        ..test_config()
    };
    let c = Client::connect(&srv.uri, cfg).await.unwrap();
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
    assert_eq!(
        c.state(),
        ConnectionState::Failed,
        "reconnect disabled here"
    );
}

#[tokio::test]
async fn reconnects_when_the_server_is_killed_and_restarted_mid_read() {
    reconnect_mid_read(1).await;
}

#[tokio::test]
async fn reconnects_a_multi_conn_pool_mid_read() {
    reconnect_mid_read(2).await;
}

async fn reconnect_mid_read(connections: usize) {
    let dir = tempdir();
    let img = dir.path().join("r.raw");
    let content = sparse_image(&img, 24 * MIB, 12);
    let img_s = img.display().to_string();
    // 25 ms per read request: a 24 MiB read in 256 KiB pieces, 16 in flight, takes >= 150 ms.
    let mut srv = nbdkit(
        sock(&dir),
        &["--filter=delay", "file", &img_s, "rdelay=25ms"],
    );
    let cfg = ClientConfig {
        reconnect_delay: Duration::from_secs(10),
        connections,
        ..test_config()
    };
    let c = Client::connect(&srv.uri, cfg).await.unwrap();
    assert_eq!(c.connection_count(), connections);
    let mut states = c.subscribe_state();
    let reader = {
        let c = c.clone();
        tokio::spawn(async move { c.read(0, 24 * MIB).await })
    };
    tokio::time::sleep(Duration::from_millis(40)).await;
    srv.kill();
    tokio::time::timeout(
        Duration::from_secs(5),
        states.wait_for(|s| *s == ConnectionState::Reconnecting),
    )
    .await
    .expect("client noticed the loss")
    .unwrap();
    assert!(!reader.is_finished(), "the read waits instead of failing");
    tokio::time::sleep(Duration::from_millis(500)).await;
    srv.start();
    let data = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("read finished")
        .unwrap()
        .unwrap();
    assert!(data == content, "data read across the reconnect differs");
    assert_eq!(c.state(), ConnectionState::Connected);
    assert_eq!(c.connection_count(), connections);
    c.close().await;
}

/// Past the reconnect window, requests fail at once with a clear error, and the client is
/// Offline, not Failed: it goes on reconnecting in the background, and a server that comes back
/// later serves requests again, with no new client.
#[tokio::test]
async fn after_the_window_requests_fail_and_a_server_back_later_is_used_again() {
    let dir = tempdir();
    let mut srv = nbdkit(
        sock(&dir),
        &["--filter=delay", "memory", "16M", "rdelay=100ms"],
    );
    let cfg = ClientConfig {
        reconnect_delay: Duration::from_millis(700),
        reconnect_backoff_max: Duration::from_millis(400),
        connections: 1,
        ..test_config()
    };
    let c = Client::connect(&srv.uri, cfg).await.unwrap();
    c.write(0, &[7; 4096]).await.unwrap();
    let reader = {
        let c = c.clone();
        tokio::spawn(async move { c.read(0, 8 * MIB).await })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    srv.kill();
    let e = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("gave up in time")
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, Error::ReconnectFailed { .. }), "{e:?}");
    assert!(e.to_string().contains("reconnect window"), "{e}");
    let mut states = c.subscribe_state();
    tokio::time::timeout(
        Duration::from_secs(5),
        states.wait_for(|s| *s == ConnectionState::Offline),
    )
    .await
    .expect("offline in time")
    .unwrap();
    let e = c.read(0, 4096).await.unwrap_err();
    assert!(matches!(e, Error::ReconnectFailed { .. }), "{e:?}");
    // Well past the window, the server comes back (an empty memory disk: a new server).
    tokio::time::sleep(Duration::from_secs(1)).await;
    srv.start();
    tokio::time::timeout(
        Duration::from_secs(20),
        states.wait_for(|s| *s == ConnectionState::Connected),
    )
    .await
    .expect("reconnected in the background")
    .unwrap();
    assert_eq!(c.failure().map(|e| e.to_string()), None);
    assert_eq!(c.read(0, 4096).await.unwrap(), vec![0; 4096]);
    c.close().await;
    assert_eq!(c.state(), ConnectionState::Closed);
}

/// With background reconnecting off (`reconnect_backoff_max` zero), the window closing fails
/// the client for good, as before QEMU-style background retries.
#[tokio::test]
async fn without_background_reconnect_the_window_fails_the_client() {
    let dir = tempdir();
    let mut srv = nbdkit(sock(&dir), &["memory", "16M"]);
    let cfg = ClientConfig {
        reconnect_delay: Duration::from_millis(500),
        reconnect_backoff_max: Duration::ZERO,
        connections: 1,
        ..test_config()
    };
    let c = Client::connect(&srv.uri, cfg).await.unwrap();
    let mut states = c.subscribe_state();
    srv.kill();
    assert!(c.read(0, 4096).await.is_err());
    tokio::time::timeout(
        Duration::from_secs(5),
        states.wait_for(|s| *s == ConnectionState::Failed),
    )
    .await
    .expect("failed in time")
    .unwrap();
    srv.start();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        c.state(),
        ConnectionState::Failed,
        "no background reconnect"
    );
    assert!(matches!(c.failure(), Some(Error::ReconnectFailed { .. })));
}

#[tokio::test]
async fn export_changed_across_reconnect_is_fatal() {
    let dir = tempdir();
    let mut srv = nbdkit(sock(&dir), &["memory", "16M"]);
    let cfg = ClientConfig {
        reconnect_delay: Duration::from_secs(5),
        connections: 1,
        ..test_config()
    };
    let c = Client::connect(&srv.uri, cfg).await.unwrap();
    let mut states = c.subscribe_state();
    srv.kill();
    let mut other = nbdkit(sock(&dir), &["memory", "32M"]);
    tokio::time::timeout(
        Duration::from_secs(5),
        states.wait_for(|s| *s == ConnectionState::Failed),
    )
    .await
    .expect("failed in time")
    .unwrap();
    assert!(
        matches!(c.failure(), Some(Error::ExportChanged(_))),
        "{:?}",
        c.failure()
    );
    other.kill();
}

#[tokio::test]
async fn oldstyle_nbdkit_is_refused() {
    let dir = tempdir();
    let srv = nbdkit(sock(&dir), &["-o", "memory", "1M"]);
    let e = Client::connect(&srv.uri, test_config()).await.unwrap_err();
    assert!(matches!(e, Error::UnsupportedServer(_)), "{e:?}");
}

#[tokio::test]
async fn open_timeout_waits_for_a_server_that_starts_late() {
    let dir = tempdir();
    let path = dir.path().join("late.sock");
    let uri = nbd_client::Uri::unix(&path, "");
    // Single attempt by default: fails at once.
    let e = Client::connect(&uri, test_config()).await.unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    let json = format!(
        r#"json:{{"driver":"nbd","server":{{"type":"unix","path":"{}"}},"open-timeout":5}}"#,
        path.display()
    );
    let uri = nbd_client::Uri::parse(&json).unwrap();
    let cfg = test_config().with_uri_options(&uri);
    assert_eq!(cfg.open_timeout, Duration::from_secs(5));
    // Started from this thread: nbdkit's --exit-with-parent follows the thread that spawned it.
    let late = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        nbdkit(Listen::Unix(path), &["memory", "1M"])
    };
    let (c, srv) = tokio::join!(
        Client::connect(
            &uri,
            ClientConfig {
                connections: 1,
                ..cfg
            }
        ),
        late
    );
    let c = c.unwrap();
    assert_eq!(c.size(), MIB);
    c.close().await;
    drop(srv);
}
