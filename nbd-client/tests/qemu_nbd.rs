//! Interop with qemu-nbd 10 (extended headers, structured replies, base:allocation).

mod common;

use common::{
    as_map, full_map, merge_map, nbdinfo_map, qemu_nbd, sparse_image, tempdir, test_config, Listen,
};
use nbd_client::{list_exports, Client, ClientConfig, Error, HeaderMode, Refusal, Uri, ZeroFlags};

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn reads_match_the_file_over_a_unix_socket() {
    let dir = tempdir();
    let img = dir.path().join("src.raw");
    let content = sparse_image(&img, 16 * MIB, 1);
    let srv = qemu_nbd(&img, Listen::Unix(dir.path().join("s.sock")), &["-r"]);
    let c = Client::connect(&srv.uri, test_config()).await.unwrap();
    assert_eq!(
        c.export().mode,
        HeaderMode::Extended,
        "qemu-nbd 10 offers extended headers"
    );
    assert!(c.has_block_status());
    assert!(!c.can_write());
    assert_eq!(c.size(), 16 * MIB);
    // Whole export in one call (split into 256 KiB pieces issued concurrently).
    assert!(
        c.read(0, 16 * MIB).await.unwrap() == content,
        "whole-export read differs"
    );
    // Unaligned small reads.
    assert_eq!(
        c.read(12345, 777).await.unwrap(),
        &content[12345..12345 + 777]
    );
    let mut buf = vec![0u8; 300_001];
    c.read_into(5 * MIB + 3, &mut buf).await.unwrap();
    assert!(buf == content[(5 * MIB + 3) as usize..][..300_001]);
    c.close().await;
}

#[tokio::test]
async fn block_status_matches_nbdinfo_map() {
    let dir = tempdir();
    let img = dir.path().join("src.raw");
    let content = sparse_image(&img, 32 * MIB, 2);
    // -e 4: our two multi-conn connections plus nbdinfo.
    let srv = qemu_nbd(
        &img,
        Listen::Unix(dir.path().join("s.sock")),
        &["-r", "-e", "4"],
    );
    let c = Client::connect(&srv.uri, test_config()).await.unwrap();
    let ours = as_map(&full_map(&c, 8 * MIB).await);
    let theirs = merge_map(&nbdinfo_map(&srv.uri_string()));
    assert_eq!(ours, theirs);
    // Extents never claim data is zero when it is not.
    for (o, l, t) in ours {
        if t & 2 != 0 {
            assert!(content[o as usize..(o + l) as usize]
                .iter()
                .all(|&b| b == 0));
        }
    }
    // A request in the middle is clamped to it.
    let e = c.block_status(MIB + 512, 3 * MIB).await.unwrap();
    assert_eq!(e[0].offset, MIB + 512);
    let end = e.last().map(|x| x.offset + x.length).unwrap();
    assert!(end <= 4 * MIB + 512);
    c.close().await;
}

#[tokio::test]
async fn writable_export_over_tcp() {
    let dir = tempdir();
    let img = dir.path().join("rw.raw");
    let _ = sparse_image(&img, 8 * MIB, 3);
    let srv = qemu_nbd(&img, Listen::Tcp(common::free_port()), &[]);
    let c = Client::connect(&srv.uri, test_config()).await.unwrap();
    assert!(c.can_write() && c.can_flush() && c.can_trim() && c.can_zero() && c.can_cache());
    let data: Vec<u8> = (0..MIB).map(|i| (i * 7 % 256) as u8).collect();
    c.write(MIB, &data).await.unwrap();
    c.flush().await.unwrap();
    assert!(c.read(MIB, MIB).await.unwrap() == data);
    c.write_zeroes(MIB, 65536, ZeroFlags::default())
        .await
        .unwrap();
    c.write_zeroes(
        MIB + 65536,
        65536,
        ZeroFlags {
            fast: c.can_fast_zero(),
            no_hole: true,
        },
    )
    .await
    .unwrap();
    c.trim(2 * MIB - 65536, 65536).await.unwrap();
    c.cache(0, 4 * MIB).await.unwrap();
    let back = c.read(MIB, MIB).await.unwrap();
    assert!(back[..131072].iter().all(|&b| b == 0));
    assert_eq!(
        &back[131072..MIB as usize - 65536],
        &data[131072..MIB as usize - 65536]
    );
    // qemu-nbd refuses a read past its maximum with EINVAL; ours never sends one, but a
    // server-reported error must come back as an error: writing past the end is refused locally.
    assert!(matches!(
        c.write(8 * MIB - 512, &[0; 1024]).await,
        Err(Error::Refused(Refusal::OutOfBounds { .. }))
    ));
    c.close().await;
    drop(srv);
    let f = std::fs::read(&img).unwrap();
    assert!(f[(MIB + 131072) as usize..(MIB + 196608) as usize] == data[131072..196608]);
}

#[tokio::test]
async fn read_only_export_refuses_writes_locally() {
    let dir = tempdir();
    let img = dir.path().join("ro.raw");
    let _ = sparse_image(&img, 4 * MIB, 4);
    let srv = qemu_nbd(&img, Listen::Unix(dir.path().join("s.sock")), &["-r"]);
    let c = Client::connect(&srv.uri, test_config()).await.unwrap();
    assert!(matches!(
        c.write(0, &[1; 512]).await,
        Err(Error::Refused(Refusal::ReadOnly))
    ));
    assert!(matches!(
        c.trim(0, 512).await,
        Err(Error::Refused(Refusal::ReadOnly))
    ));
    c.close().await;
}

#[tokio::test]
async fn named_export_list_and_missing_export() {
    let dir = tempdir();
    let img = dir.path().join("n.raw");
    let _ = sparse_image(&img, MIB, 5);
    let srv = qemu_nbd(
        &img,
        Listen::Unix(dir.path().join("s.sock")),
        &["-r", "-x", "vda", "-D", "the disk"],
    );
    let list = list_exports(&srv.uri, &test_config()).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "vda");
    assert_eq!(list[0].description.as_deref(), Some("the disk"));
    let c = Client::connect(&srv.uri, test_config()).await.unwrap();
    assert_eq!(c.export().name, "vda");
    c.close().await;
    let mut missing = srv.uri.clone();
    missing.export = "nosuch".into();
    let e = Client::connect(&missing, test_config()).await.unwrap_err();
    assert!(
        matches!(
            &e,
            Error::OptionRefused {
                reply: "ERR_UNKNOWN",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("nosuch"), "{e}");
}

#[tokio::test]
async fn multi_conn_pool_and_qemu_json_backing_string() {
    let dir = tempdir();
    let img = dir.path().join("m.raw");
    let content = sparse_image(&img, 8 * MIB, 6);
    let sock = dir.path().join("s.sock");
    let srv = qemu_nbd(&img, Listen::Unix(sock.clone()), &["-r", "-e", "4"]);
    let json = format!(
        r#"json:{{"driver":"raw","file":{{"driver":"nbd","server":{{"type":"unix","path":"{}"}},"reconnect-delay":15}}}}"#,
        sock.display()
    );
    let uri = Uri::parse(&json).unwrap();
    assert_eq!(uri.to_qemu_string(), srv.uri_string());
    let cfg = ClientConfig {
        connections: 3,
        ..test_config()
    };
    let c = Client::connect(&uri, cfg).await.unwrap();
    assert!(c.can_multi_conn());
    assert_eq!(c.connection_count(), 3);
    assert!(c.read(0, 8 * MIB).await.unwrap() == content);
    c.close().await;
    // Without multi-conn, one connection whatever the config says.
    drop(srv);
    let srv = qemu_nbd(&img, Listen::Unix(sock), &["-r"]);
    let c = Client::connect(
        &srv.uri,
        ClientConfig {
            connections: 4,
            ..test_config()
        },
    )
    .await
    .unwrap();
    assert_eq!(c.connection_count(), 1);
    c.close().await;
}
