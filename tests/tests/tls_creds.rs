//! The credentials directories `certtool` makes (PKCS#1 RSA keys, the layout QEMU documents)
//! load into our TLS layer and talk to each other, and what must be refused is: an expired
//! server certificate, a server or a client certificate from another CA, a client without a
//! certificate at a verifying server, a server whose certificate names another host.

use nbd_tls::{ClientTls, ServerTls};
use qedstream_tests::tls::{Pki, Validity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Both handshakes over a pipe, then one byte each way: the client's and the server's results.
fn talk(server: &ServerTls, client: &ClientTls) -> (Result<(), String>, Result<(), String>) {
    qedstream_tests::runtime::two_workers().block_on(async {
        let (a, b) = tokio::io::duplex(1 << 16);
        let server_side = async {
            let mut tls = server.accept(b).await?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await?;
            tls.write_all(&byte).await?;
            tls.flush().await
        };
        let client_side = async {
            let mut tls = client.connect(a).await?;
            tls.write_all(b"q").await?;
            tls.flush().await?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await?;
            Ok::<_, std::io::Error>(())
        };
        let both = async { tokio::join!(client_side, server_side) };
        let (c, s) = tokio::time::timeout(std::time::Duration::from_secs(30), both)
            .await
            .expect("the TLS handshake hung");
        (c.map_err(|e| e.to_string()), s.map_err(|e| e.to_string()))
    })
}

#[test]
fn certtool_credentials_talk_and_bad_ones_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let pki = Pki::new(&root.path().join("one"), "qedstream test CA one");
    let other = Pki::new(&root.path().join("two"), "qedstream test CA two");
    let server_dir = pki.server("server", &["localhost", "127.0.0.1"], Validity::Current);
    let client_dir = pki.client("client", true, Validity::Current);
    let key = std::fs::read_to_string(client_dir.join("client-key.pem")).unwrap();
    assert!(
        key.contains("BEGIN RSA PRIVATE KEY"),
        "certtool wrote {key}"
    );

    let server = ServerTls::from_dir(&server_dir, true).unwrap();
    let client = ClientTls::from_dir(&client_dir, Some("127.0.0.1")).unwrap();
    let (c, s) = talk(&server, &client);
    c.unwrap();
    s.unwrap();

    // An expired server certificate.
    let expired = pki.server("expired", &["localhost"], Validity::Expired);
    let expired = ServerTls::from_dir(&expired, false).unwrap();
    let (c, _) = talk(&expired, &client);
    assert!(c.unwrap_err().contains("expired"));

    // A server certificate from another CA.
    let foreign = other.server("foreign", &["localhost"], Validity::Current);
    let foreign = ServerTls::from_dir(&foreign, false).unwrap();
    let (c, _) = talk(&foreign, &ClientTls::from_dir(&client_dir, None).unwrap());
    let e = c.unwrap_err();
    assert!(e.contains("invalid peer certificate"), "{e}");

    // A client certificate from another CA, and no client certificate, at a verifying server.
    let stranger = other.client("stranger", true, Validity::Current);
    std::fs::copy(pki.ca_cert(), stranger.join("ca-cert.pem")).unwrap();
    let (_, s) = talk(&server, &ClientTls::from_dir(&stranger, None).unwrap());
    let e = s.unwrap_err();
    assert!(e.contains("invalid peer certificate"), "{e}");
    let anonymous = pki.client("anonymous", false, Validity::Current);
    let (_, s) = talk(&server, &ClientTls::from_dir(&anonymous, None).unwrap());
    assert!(s.is_err());

    // The name checked: a host the certificate does not name.
    let (c, _) = talk(
        &server,
        &ClientTls::from_dir(&client_dir, Some("images.example")).unwrap(),
    );
    let e = c.unwrap_err();
    assert!(e.contains("not valid for name"), "{e}");
}
