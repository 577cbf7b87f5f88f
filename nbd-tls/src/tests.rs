//! The verification rules, end to end over an in-memory pipe: certificates made by rcgen at test
//! time (the `certtool` layout is proven against QEMU and nbdkit in the interop tests).

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::creds::{CA_CERT, CLIENT_CERT, CLIENT_KEY, PSK_KEYS, SERVER_CERT, SERVER_KEY};
use crate::{ClientTls, Error, ServerTls};

/// A CA that signs leaf certificates into a directory.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    fn write_ca(&self, dir: &Path) {
        std::fs::write(dir.join(CA_CERT), self.cert.pem()).unwrap();
    }

    /// Signs a leaf for `names` with the given purpose, valid `from..until` (years).
    fn leaf(
        &self,
        dir: &Path,
        (cert_file, key_file): (&str, &str),
        names: &[&str],
        purpose: ExtendedKeyUsagePurpose,
        years: (i32, i32),
    ) {
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![purpose];
        params.not_before = rcgen::date_time_ymd(years.0, 1, 1);
        params.not_after = rcgen::date_time_ymd(years.1, 1, 1);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        std::fs::write(dir.join(cert_file), cert.pem()).unwrap();
        std::fs::write(dir.join(key_file), key.serialize_pem()).unwrap();
    }
}

const VALID: (i32, i32) = (2020, 2090);
const SERVER: (&str, &str) = (SERVER_CERT, SERVER_KEY);
const CLIENT: (&str, &str) = (CLIENT_CERT, CLIENT_KEY);

/// A server and a client directory from one CA: the server certificate names `server_names`.
fn dirs(server_names: &[&str], client_cert: bool) -> (tempfile::TempDir, tempfile::TempDir) {
    // Each CA its own name, so that a certificate of another CA has an unknown issuer.
    static CAS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = CAS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ca = Ca::new(&format!("test CA {n}"));
    let server = tempfile::tempdir().unwrap();
    let client = tempfile::tempdir().unwrap();
    ca.write_ca(server.path());
    ca.write_ca(client.path());
    ca.leaf(
        server.path(),
        SERVER,
        server_names,
        ExtendedKeyUsagePurpose::ServerAuth,
        VALID,
    );
    if client_cert {
        ca.leaf(
            client.path(),
            CLIENT,
            &["client"],
            ExtendedKeyUsagePurpose::ClientAuth,
            VALID,
        );
    }
    (server, client)
}

/// Runs both handshakes over a pipe and a byte each way; the client's and the server's results.
fn handshake(server: &ServerTls, client: &ClientTls) -> (std::io::Result<()>, std::io::Result<()>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (a, b) = tokio::io::duplex(1 << 16);
        let server_side = async {
            let mut tls = server.accept(b).await?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await?;
            tls.write_all(&[byte[0] + 1]).await?;
            tls.flush().await
        };
        let client_side = async {
            let mut tls = client.connect(a).await?;
            tls.write_all(&[41]).await?;
            tls.flush().await?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await?;
            assert_eq!(byte[0], 42);
            Ok(())
        };
        let guard = std::time::Duration::from_secs(20);
        let (c, s) = tokio::time::timeout(guard, async { tokio::join!(client_side, server_side) })
            .await
            .expect("handshake hung");
        (c, s)
    })
}

/// The server of `server_dir` (verifying clients or not) and the client of `client_dir`
/// (checking `host` or no name) talk; the client's and the server's results.
fn talk(
    server_dir: &Path,
    verify_peer: bool,
    client_dir: &Path,
    host: Option<&str>,
) -> (std::io::Result<()>, std::io::Result<()>) {
    let server = ServerTls::from_dir(server_dir, verify_peer).unwrap();
    let client = ClientTls::from_dir(client_dir, host).unwrap();
    handshake(&server, &client)
}

/// Asserts that `result` is a refusal whose message holds one of `needles`.
fn refused(result: std::io::Result<()>, needles: &[&str]) {
    let text = result
        .expect_err("the handshake should have been refused")
        .to_string();
    assert!(needles.iter().any(|n| text.contains(n)), "{text}");
}

#[test]
fn good_credentials_with_the_name_checked_talk() {
    let (s, c) = dirs(&["localhost"], true);
    let (cr, sr) = talk(s.path(), true, c.path(), Some("localhost"));
    cr.unwrap();
    sr.unwrap();
}

#[test]
fn an_ip_host_is_checked_against_the_ip_names() {
    let (s, c) = dirs(&["127.0.0.1"], true);
    talk(s.path(), true, c.path(), Some("127.0.0.1")).0.unwrap();
    let (cr, _) = talk(s.path(), true, c.path(), Some("127.0.0.2"));
    refused(cr, &["not valid for name"]);
}

#[test]
fn a_wrong_name_is_refused_but_no_name_checks_only_the_chain() {
    let (s, c) = dirs(&["images.example"], true);
    let (cr, _) = talk(s.path(), true, c.path(), Some("localhost"));
    refused(cr, &["not valid for name"]);
    let (cr, sr) = talk(s.path(), true, c.path(), None);
    cr.unwrap();
    sr.unwrap();
}

#[test]
fn a_server_from_another_ca_is_refused_even_without_a_name() {
    let (s, _) = dirs(&["localhost"], false);
    let (_, c) = dirs(&["localhost"], false);
    let (cr, _) = talk(s.path(), false, c.path(), None);
    refused(cr, &["UnknownIssuer", "unknown issuer"]);
}

#[test]
fn an_expired_server_certificate_is_refused() {
    let ca = Ca::new("test CA");
    let s = tempfile::tempdir().unwrap();
    let c = tempfile::tempdir().unwrap();
    ca.write_ca(c.path());
    let purpose = ExtendedKeyUsagePurpose::ServerAuth;
    ca.leaf(s.path(), SERVER, &["localhost"], purpose, (2019, 2021));
    let (cr, _) = talk(s.path(), false, c.path(), Some("localhost"));
    refused(cr, &["certificate expired"]);
}

#[test]
fn a_verifying_server_refuses_a_client_without_a_certificate() {
    let (s, c) = dirs(&["localhost"], false);
    let (_, sr) = talk(s.path(), true, c.path(), Some("localhost"));
    refused(sr, &["certificate", "Certificate"]);
    let (cr, sr) = talk(s.path(), false, c.path(), Some("localhost"));
    cr.unwrap();
    sr.unwrap();
}

#[test]
fn a_verifying_server_refuses_a_client_certificate_from_another_ca() {
    let (s, _) = dirs(&["localhost"], false);
    let (_, c) = dirs(&["localhost"], true);
    // The client trusts the server's CA, but its own certificate is from another CA.
    std::fs::copy(s.path().join(CA_CERT), c.path().join(CA_CERT)).unwrap();
    let (_, sr) = talk(s.path(), true, c.path(), Some("localhost"));
    refused(sr, &["UnknownIssuer", "unknown issuer"]);
}

#[test]
fn directories_are_checked_file_by_file() {
    let empty = tempfile::tempdir().unwrap();
    let e = ClientTls::from_dir(empty.path(), None).unwrap_err();
    assert!(matches!(e, Error::Missing { .. }), "{e}");
    assert!(e.to_string().contains("ca-cert.pem"), "{e}");
    let e = ServerTls::from_dir(empty.path(), false).unwrap_err();
    assert!(e.to_string().contains("server-cert.pem"), "{e}");

    let e = ClientTls::from_dir(&empty.path().join("nope"), None).unwrap_err();
    assert!(matches!(e, Error::Directory { .. }), "{e}");

    std::fs::write(empty.path().join(PSK_KEYS), "alice:0123456789abcdef\n").unwrap();
    let e = ClientTls::from_dir(empty.path(), None).unwrap_err();
    assert!(matches!(e, Error::PskUnsupported { .. }), "{e}");
    assert!(e.to_string().contains("TLS-PSK"), "{e}");

    let (_, c) = dirs(&["localhost"], true);
    std::fs::remove_file(c.path().join(CLIENT_KEY)).unwrap();
    let e = ClientTls::from_dir(c.path(), None).unwrap_err();
    assert!(matches!(e, Error::HalfPair { .. }), "{e}");

    std::fs::write(c.path().join(CA_CERT), "not a certificate\n").unwrap();
    let e = ClientTls::from_dir(c.path(), None).unwrap_err();
    assert!(matches!(e, Error::Pem { .. }), "{e}");
}

#[test]
fn a_key_that_does_not_match_its_certificate_is_refused_at_load() {
    let (s, _) = dirs(&["localhost"], false);
    let (other, _) = dirs(&["localhost"], false);
    std::fs::copy(other.path().join(SERVER_KEY), s.path().join(SERVER_KEY)).unwrap();
    let e = ServerTls::from_dir(s.path(), false).unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e}");
}
