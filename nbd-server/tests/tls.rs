//! A TLS-only server (`ServerConfig::tls`, the spec's FORCEDTLS mode), driven byte by byte by a
//! scripted client over a real unix socket, with credentials made by `certtool`: before
//! STARTTLS every option but ABORT is refused with `NBD_REP_ERR_TLS_REQD` (LIST, INFO and GO
//! included, so nothing about the export is said in clear text) and EXPORT_NAME closes the
//! connection without export data; after STARTTLS and a TLS handshake (rustls on the client
//! side too) the haggling and the transmission run inside TLS, and a second STARTTLS is
//! invalid; a client that goes silent after STARTTLS is closed by the handshake timeout; each
//! client turned away is reported once by `Server::refusals`.
//!
//! Real clients (QEMU, libnbd) against `qedstream serve --tls-creds` are in
//! `engine/tests/serve_tls.rs`. Every wait has a 30 s bound that only turns a hang into a
//! failure.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use copy_on_read::RawFile;
use nbd_proto::*;
use nbd_server::{HandshakeFailure, Refused, ServerConfig, TlsRefusal};
use qedstream_tests::tls::{Pki, Validity};
use rustls::{CertificateError, Error as TlsError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::broadcast;

/// The bound on every wait: a hang fails the test.
const HANG: Duration = Duration::from_secs(30);

/// A 1 MiB disk of 0x5a, served TLS-only (client certificates verified) on `dir/nbd.sock`.
/// A temporary directory, a CA in it, and [`served_tls`] there: what every test starts with.
fn served_in_tempdir(handshake_timeout: Duration) -> (tempfile::TempDir, Pki, Served) {
    let dir = qedstream_tests::tempdir();
    let pki = Pki::new(&dir.path().join("pki"), "test CA");
    let s = served_tls(dir.path(), &pki, handshake_timeout);
    (dir, pki, s)
}

fn served_tls(dir: &Path, pki: &Pki, handshake_timeout: Duration) -> Served {
    let server_dir = pki.server("server", &["localhost"], Validity::Current);
    let tls = nbd_tls::ServerTls::from_dir(&server_dir, true).expect("server credentials");
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0x5au8; 1 << 20]).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let device = Arc::new(RawFile::open(&disk, true).expect("opening the disk"));
    let config = ServerConfig {
        tls: Some(tls),
        handshake_timeout,
        ..ServerConfig::default()
    };
    serve_device(runtime, dir, device, None, false, config)
}

/// Runs `f` on a client runtime of its own, under the hang bound.
fn client<F: std::future::Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(HANG, f)
            .await
            .expect("the server hung (no answer within 30 s)")
    })
}

/// Connects, checks the greeting, sends the fixed-newstyle client flags.
async fn connect(sock: &Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).await.expect("connect");
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.expect("greeting");
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&CLIENT_FIXED_NEWSTYLE.to_be_bytes())
        .await
        .unwrap();
    s
}

/// Sends one option.
async fn option<S: AsyncWrite + Unpin>(s: &mut S, option: u32, data: &[u8]) {
    s.write_all(&encode_option(option, data)).await.unwrap();
    s.flush().await.unwrap();
}

/// Reads one option reply: its type and data.
async fn reply<S: AsyncRead + Unpin>(s: &mut S, option: u32) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await.expect("an option reply");
    let h = decode_option_reply_header(&h, option).expect("a well-formed option reply");
    let mut data = vec![0u8; h.length as usize];
    s.read_exact(&mut data).await.expect("option reply data");
    (h.reply_type, data)
}

/// Whether the server closed the connection (EOF before any byte).
async fn closed<S: AsyncRead + Unpin>(s: &mut S) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b).await, Ok(0) | Err(_))
}

/// The next refusal the server reports.
fn refusal(rx: &mut broadcast::Receiver<Refused>) -> Refused {
    client(async { rx.recv().await.expect("a refusal") })
}

#[test]
fn every_option_before_starttls_is_refused_with_tls_reqd() {
    let (_dir, _pki, s) = served_in_tempdir(Duration::from_secs(10));
    let mut refusals = s.server.refusals();
    client(async {
        let mut c = connect(&s.sock).await;
        let go = encode_go_data("", &[INFO_NAME, INFO_BLOCK_SIZE]);
        let meta = encode_meta_context_data("", &[BASE_ALLOCATION]);
        for (opt, data) in [
            (OPT_LIST, &[][..]),
            (OPT_INFO, &go[..]),
            (OPT_GO, &go[..]),
            (OPT_STRUCTURED_REPLY, &[][..]),
            (OPT_EXTENDED_HEADERS, &[][..]),
            (OPT_LIST_META_CONTEXT, &meta[..]),
            (OPT_SET_META_CONTEXT, &meta[..]),
            (999, &[][..]),
        ] {
            option(&mut c, opt, data).await;
            let (t, msg) = reply(&mut c, opt).await;
            // One reply, an error: no NBD_REP_SERVER, INFO or META_CONTEXT before it.
            assert_eq!(t, REP_ERR_TLS_REQD, "option {opt}: {msg:?}");
        }
        option(&mut c, OPT_STARTTLS, b"x").await;
        assert_eq!(reply(&mut c, OPT_STARTTLS).await.0, REP_ERR_INVALID);
        option(&mut c, OPT_ABORT, &[]).await;
        assert_eq!(reply(&mut c, OPT_ABORT).await.0, REP_ACK);
        assert!(closed(&mut c).await, "open after ABORT");
    });
    let r = refusal(&mut refusals);
    assert_eq!(r.reason, TlsRefusal::PlainOption { option: OPT_LIST });
    assert!(r.peer.starts_with("unix socket (pid "), "{r}");
    s.stop();
}

#[test]
fn export_name_before_starttls_closes_without_export_data() {
    let (_dir, _pki, s) = served_in_tempdir(Duration::from_secs(10));
    let mut refusals = s.server.refusals();
    client(async {
        let mut c = connect(&s.sock).await;
        option(&mut c, OPT_EXPORT_NAME, b"").await;
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest).await;
        assert!(rest.is_empty(), "{} bytes after EXPORT_NAME", rest.len());
    });
    assert_eq!(refusal(&mut refusals).reason, TlsRefusal::PlainExportName);
    s.stop();
}

#[test]
fn after_starttls_the_export_is_served_inside_tls() {
    let (_dir, pki, s) = served_in_tempdir(Duration::from_secs(10));
    let creds = pki.client("client", true, Validity::Current);
    let tls = nbd_tls::ClientTls::from_dir(&creds, None).expect("client credentials");
    client(async {
        let mut c = connect(&s.sock).await;
        option(&mut c, OPT_STARTTLS, &[]).await;
        assert_eq!(reply(&mut c, OPT_STARTTLS).await.0, REP_ACK);
        let mut t = tls.connect(c).await.expect("the TLS handshake");
        option(&mut t, OPT_STARTTLS, &[]).await;
        assert_eq!(
            reply(&mut t, OPT_STARTTLS).await.0,
            REP_ERR_INVALID,
            "a second STARTTLS"
        );
        option(&mut t, OPT_LIST, &[]).await;
        assert_eq!(reply(&mut t, OPT_LIST).await.0, REP_SERVER);
        assert_eq!(reply(&mut t, OPT_LIST).await.0, REP_ACK);
        option(&mut t, OPT_GO, &encode_go_data("", &[])).await;
        loop {
            match reply(&mut t, OPT_GO).await.0 {
                REP_INFO => {}
                t => {
                    assert_eq!(t, REP_ACK);
                    break;
                }
            }
        }
        let mut req = [0u8; 32];
        let header = RequestHeader {
            flags: 0,
            command: Command::Read,
            cookie: 7,
            offset: 4096,
            length: 512,
        };
        let n = encode_request(&header, HeaderMode::Simple, &mut req);
        t.write_all(&req[..n]).await.unwrap();
        t.flush().await.unwrap();
        let mut simple = [0u8; 16];
        t.read_exact(&mut simple).await.expect("the read's reply");
        assert_eq!(
            (be32(&simple, 4), be64(&simple, 8)),
            (0, 7),
            "errno, cookie"
        );
        let mut data = vec![0u8; 512];
        t.read_exact(&mut data).await.expect("the read's data");
        assert!(data.iter().all(|&b| b == 0x5a), "wrong data over TLS");
    });
    assert_eq!(s.server.stats().bytes_read, 512);
    s.stop();
}

/// STARTTLS, then a rustls handshake with the client credentials in `creds` (rustls sends its
/// certificate whatever CA the server names); then GO, which a refused client never gets
/// answered. The server's refusal.
fn refused_handshake(s: &Served, creds: &Path) -> Refused {
    let mut refusals = s.server.refusals();
    let tls = nbd_tls::ClientTls::from_dir(creds, None).expect("client credentials");
    client(async {
        let mut c = connect(&s.sock).await;
        option(&mut c, OPT_STARTTLS, &[]).await;
        assert_eq!(reply(&mut c, OPT_STARTTLS).await.0, REP_ACK);
        // TLS 1.3: the client's side of the handshake may complete before the server judges
        // its certificate; the refusal then shows on the first read, or already on the write
        // of GO when the server has closed by then (EPIPE).
        if let Ok(mut t) = tls.connect(c).await {
            let go = encode_option(OPT_GO, &encode_go_data("", &[]));
            let sent = match t.write_all(&go).await {
                Ok(()) => t.flush().await,
                Err(e) => Err(e),
            };
            assert!(
                sent.is_err() || closed(&mut t).await,
                "served with {}",
                creds.display()
            );
        }
    });
    refusal(&mut refusals)
}

#[test]
fn a_failed_tls_handshake_closes_and_is_reported() {
    let (dir, pki, s) = served_in_tempdir(Duration::from_secs(10));
    let anonymous = pki.client("anonymous", false, Validity::Current);
    let expired = pki.client("expired", true, Validity::Expired);
    // A certificate of another CA, in a directory that trusts our server.
    let foreign =
        Pki::new(&dir.path().join("other"), "other CA").client("foreign", true, Validity::Current);
    std::fs::copy(pki.ca_cert(), foreign.join("ca-cert.pem")).unwrap();
    let r = refused_handshake(&s, &anonymous);
    assert!(
        matches!(
            r.reason,
            TlsRefusal::Handshake {
                reason: HandshakeFailure::Rejected(TlsError::NoCertificatesPresented)
            }
        ),
        "{r}"
    );
    let r = refused_handshake(&s, &expired);
    assert!(
        matches!(
            r.reason,
            TlsRefusal::Handshake {
                reason: HandshakeFailure::Rejected(TlsError::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. }
                ))
            }
        ),
        "{r}"
    );
    let r = refused_handshake(&s, &foreign);
    assert!(
        matches!(
            r.reason,
            TlsRefusal::Handshake {
                reason: HandshakeFailure::Rejected(TlsError::InvalidCertificate(
                    CertificateError::UnknownIssuer
                ))
            }
        ),
        "{r}"
    );
    s.stop();
}

#[test]
fn a_client_silent_after_starttls_is_closed_by_the_handshake_timeout() {
    let (_dir, _pki, s) = served_in_tempdir(Duration::from_millis(300));
    client(async {
        let mut c = connect(&s.sock).await;
        option(&mut c, OPT_STARTTLS, &[]).await;
        assert_eq!(reply(&mut c, OPT_STARTTLS).await.0, REP_ACK);
        // No ClientHello: only the handshake timeout can end this.
        assert!(closed(&mut c).await, "still open");
    });
    s.stop();
}
