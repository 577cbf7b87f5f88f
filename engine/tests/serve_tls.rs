//! `qedstream serve --tls-creds DIR`: the NBD export requires TLS, and real clients prove it.
//! QEMU (`qemu-img info/compare`, `qemu-io` with `--object tls-creds-x509` and
//! `--image-opts driver=nbd,...,tls-creds=tls0`) reads and writes through it over a unix socket
//! and over TCP on 127.0.0.1 (the certificate names 127.0.0.1 and localhost); libnbd's
//! `nbdinfo` and `nbdcopy` read it from an `nbds+unix://...&tls-certificates=DIR` URI, and so
//! does our own client (`qedstream convert --tls-creds`) from the ready line's URI. Every
//! refusal gives the client an error and the server a line on stderr: a plain-text client
//! (qemu-img, nbdinfo), no client certificate (then served with `--tls-verify-peer no`), a
//! certificate from another CA, an expired certificate, and a scripted downgrade (GO, LIST,
//! EXPORT_NAME before STARTTLS: refusals or a closed connection, never export data). Bad
//! credentials end `serve` at start with one line, before anything listens. Credentials are
//! made by `certtool` at test time.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nbd_proto::*;
use qedstream_tests::served::Served;
use qedstream_tests::tls::{convert_args, Pki, Validity};
use qedstream_tests::tools::{ok, run_command, run_with_deadline};

/// The longest a log line may take to appear: only a hang guard.
const DEADLINE: Duration = Duration::from_secs(60);

/// Credentials for one test: a server and clients of our CA, and a client of another CA.
struct Creds {
    server: PathBuf,
    client: PathBuf,
    anonymous: PathBuf,
    expired: PathBuf,
    foreign: PathBuf,
}

fn creds(dir: &Path) -> Creds {
    let ours = Pki::new(&dir.join("pki"), "qedstream test CA");
    let theirs = Pki::new(&dir.join("other-pki"), "another CA");
    // A client that trusts our server, with a certificate another CA signed.
    let foreign = theirs.client("foreign", true, Validity::Current);
    std::fs::copy(ours.ca_cert(), foreign.join("ca-cert.pem")).unwrap();
    Creds {
        server: ours.server("server", &["localhost", "127.0.0.1"], Validity::Current),
        client: ours.client("client", true, Validity::Current),
        anonymous: ours.client("anonymous", false, Validity::Current),
        expired: ours.client("expired", true, Validity::Expired),
        foreign,
    }
}

/// An 8 MiB raw base with data and holes, a QED overlay `top.qed` on it with data of its own,
/// and `expected.raw`: what the overlay reads as.
fn images(dir: &Path) {
    ok(dir, "qemu-img", &["create", "-f", "raw", "base.raw", "8M"]);
    ok(
        dir,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 2M",
            "-c",
            "write -P 0x11 6M 1M",
            "base.raw",
        ],
    );
    ok(
        dir,
        "qemu-img",
        &[
            "create", "-f", "qed", "-b", "base.raw", "-F", "raw", "top.qed",
        ],
    );
    ok(
        dir,
        "qemu-io",
        &["-f", "qed", "-c", "write -P 0xaa 1M 64k", "top.qed"],
    );
    ok(
        dir,
        "qemu-img",
        &[
            "convert",
            "-f",
            "qed",
            "-O",
            "raw",
            "top.qed",
            "expected.raw",
        ],
    );
}

/// A test directory with its credentials ([`creds`]) and images ([`images`]).
fn setup() -> (tempfile::TempDir, Creds) {
    let dir = qedstream_tests::tempdir();
    let c = creds(dir.path());
    images(dir.path());
    (dir, c)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 test paths")
}

/// `qedstream serve --output=json --tls-creds SERVER ARGS... top.qed`, stderr in `serve.log`.
fn serve_tls(dir: &Path, server: &Path, args: &[&str]) -> Served {
    let mut all = vec!["--tls-creds", s(server)];
    all.extend_from_slice(args);
    all.push("top.qed");
    let program = Path::new(env!("CARGO_BIN_EXE_qedstream"));
    Served::start_logged(program, dir, &all, &dir.join("serve.log"))
}

/// [`serve_tls`] exporting over NBD on the unix socket `dir/nbd.sock`, with `extra`
/// arguments: the server and the socket.
fn serve_on_unix(dir: &Path, server: &Path, extra: &[&str]) -> (Served, PathBuf) {
    let sock = dir.join("nbd.sock");
    let mut args = vec!["--nbd", s(&sock)];
    args.extend_from_slice(extra);
    let served = serve_tls(dir, server, &args);
    (served, sock)
}

/// The export on `sock` in plain text (no TLS).
fn plain_uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", s(sock))
}

/// The export on `sock` over TLS in libnbd's spelling, with the client credentials `creds`.
fn libnbd_uri(sock: &Path, creds: &Path) -> String {
    format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        s(sock),
        s(creds)
    )
}

/// `qemu-img info` of the export on `sock` in plain text, which must fail; its stderr.
#[track_caller]
fn qemu_img_info_plain(dir: &Path, sock: &Path) -> String {
    let plain = plain_uri(sock);
    let out = run_command(
        Command::new("qemu-img")
            .current_dir(dir)
            .args(["info", &plain]),
    );
    failed(out, "qemu-img info without TLS")
}

/// QEMU's client credentials object for `dir`.
fn tls_object(dir: &Path) -> String {
    format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", s(dir))
}

/// The `--image-opts` of our export on the unix socket `sock`, with TLS (QEMU 10 wants a name
/// to check even over a unix socket: `tls-hostname`).
fn unix_opts(sock: &Path) -> String {
    format!(
        "driver=nbd,path={},tls-creds=tls0,tls-hostname=localhost",
        s(sock)
    )
}

/// `qemu-img SUBCOMMAND ARGS...` or `qemu-io ARGS...` with the client credentials of `creds`
/// (qemu-img takes `--object` after its subcommand).
fn qemu_tls(dir: &Path, tool: &str, creds: &Path, args: &[&str]) -> std::process::Output {
    let object = tls_object(creds);
    let mut cmd = Command::new(tool);
    cmd.current_dir(dir);
    match (tool, args.split_first()) {
        ("qemu-img", Some((sub, rest))) => cmd.arg(sub).args(["--object", &object]).args(rest),
        _ => cmd.args(["--object", &object]).args(args),
    };
    run_command(&mut cmd)
}

/// Asserts success; stdout.
#[track_caller]
fn succeeded(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts failure; stderr.
#[track_caller]
fn failed(out: std::process::Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{what} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

/// How many lines `serve.log` has now.
fn log_lines(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("serve.log"))
        .unwrap_or_default()
        .lines()
        .count()
}

/// Waits until `serve.log` has a line containing every one of `words`; returns it.
#[track_caller]
fn logged(dir: &Path, words: &[&str]) -> String {
    logged_after(dir, 0, words)
}

/// Waits until `serve.log` has, after its first `skip` lines, a line containing every one of
/// `words`; returns it.
#[track_caller]
fn logged_after(dir: &Path, skip: usize, words: &[&str]) -> String {
    let start = Instant::now();
    loop {
        let log = std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default();
        let mut lines = log.lines().skip(skip);
        if let Some(line) = lines.find(|l| words.iter().all(|w| l.contains(w))) {
            return line.to_string();
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no line with {words:?} in the server's log within 60 s:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// After the server stopped: the image reads as `expected.raw` with the qemu-io command
/// `write` applied (done to `expected.raw` too), and is clean.
fn assert_image_is_expected_after(dir: &Path, write: &str) {
    ok(dir, "qemu-io", &["-f", "raw", "-c", write, "expected.raw"]);
    assert_image_is(dir, "expected.raw");
}

/// After the server stopped: the image is clean for qemu-img check and reads as `raw`.
fn assert_image_is(dir: &Path, raw: &str) {
    ok(dir, "qemu-img", &["check", "top.qed"]);
    ok(
        dir,
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qed", raw, "top.qed"],
    );
}

#[test]
fn qemu_reads_and_writes_through_the_tls_export_on_a_unix_socket() {
    let (dir, c) = setup();
    let d = dir.path();
    let (mut served, sock) = serve_on_unix(d, &c.server, &[]);
    assert_eq!(served.ready["tls"], true, "{}", served.ready);
    assert_eq!(served.ready["tls-verify-peer"], true, "{}", served.ready);
    let uri = served.uri();
    assert!(uri.starts_with("nbds+unix:///?socket="), "{uri}");

    let opts = unix_opts(&sock);
    let info = succeeded(
        qemu_tls(
            d,
            "qemu-img",
            &c.client,
            &["info", "--output=json", "--image-opts", &opts],
        ),
        "qemu-img info",
    );
    let info: serde_json::Value = serde_json::from_str(&info).expect("qemu-img info JSON");
    assert_eq!(info["virtual-size"], 8 << 20, "{info}");
    let expected = "driver=raw,file.driver=file,file.filename=expected.raw";
    succeeded(
        qemu_tls(
            d,
            "qemu-img",
            &c.client,
            &["compare", "--image-opts", &opts, expected],
        ),
        "qemu-img compare before the write",
    );
    succeeded(
        qemu_tls(
            d,
            "qemu-io",
            &c.client,
            &["-c", "write -P 0x77 3M 256k", "--image-opts", &opts],
        ),
        "qemu-io write",
    );
    succeeded(
        qemu_tls(
            d,
            "qemu-io",
            &c.client,
            &[
                "-c",
                "read -P 0x77 3M 256k",
                "-c",
                "read -P 0xaa 1M 64k",
                "--image-opts",
                &opts,
            ],
        ),
        "qemu-io read back",
    );
    assert_eq!(served.terminate(), 0);
    assert_image_is_expected_after(d, "write -P 0x77 3M 256k");
}

#[test]
fn qemu_reads_and_writes_over_tcp_checking_the_server_name() {
    let (dir, c) = setup();
    let d = dir.path();
    let mut served = serve_tls(d, &c.server, &["--nbd", "tcp:127.0.0.1:0"]);
    let addr = served.ready["nbd"][0]
        .as_str()
        .expect("nbd address")
        .to_string();
    let port = addr.rsplit(':').next().expect("a port").to_string();
    assert_eq!(served.uri(), format!("nbds://127.0.0.1:{port}/"));
    // The host QEMU checks is the address it connects to; both names are in the certificate.
    for host in ["127.0.0.1", "localhost"] {
        let opts = format!("driver=nbd,host={host},port={port},tls-creds=tls0");
        succeeded(
            qemu_tls(
                d,
                "qemu-io",
                &c.client,
                &[
                    "-c",
                    "write -P 0x66 5M 128k",
                    "-c",
                    "read -P 0x66 5M 128k",
                    "--image-opts",
                    &opts,
                ],
            ),
            &format!("qemu-io over tcp to {host}"),
        );
    }
    // A name the certificate does not carry is refused by QEMU, the client.
    let opts =
        format!("driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0,tls-hostname=elsewhere");
    let err = failed(
        qemu_tls(d, "qemu-img", &c.client, &["info", "--image-opts", &opts]),
        "qemu-img info with a wrong tls-hostname",
    );
    assert!(err.contains("does not match"), "{err}");
    assert_eq!(served.terminate(), 0);
    assert_image_is_expected_after(d, "write -P 0x66 5M 128k");
}

#[test]
fn nbdinfo_and_nbdcopy_read_the_export_with_tls_certificates() {
    let (dir, c) = setup();
    let d = dir.path();
    let (mut served, sock) = serve_on_unix(d, &c.server, &["--read-only"]);
    let uri = libnbd_uri(&sock, &c.client);
    let info = ok(d, "nbdinfo", &["--json", &uri]);
    let info: serde_json::Value = serde_json::from_str(&info).expect("nbdinfo JSON");
    assert_eq!(info["exports"][0]["export-size"], 8 << 20, "{info}");
    assert_eq!(info["exports"][0]["is_read_only"], true, "{info}");
    ok(d, "nbdcopy", &[&uri, "copy.raw"]);
    assert_eq!(
        std::fs::read(d.join("copy.raw")).unwrap(),
        std::fs::read(d.join("expected.raw")).unwrap(),
        "nbdcopy over TLS copied other bytes"
    );
    assert_eq!(served.terminate(), 0);
}

#[test]
fn our_own_client_reads_the_export_over_tls_and_not_in_plain_text() {
    let (dir, c) = setup();
    let d = dir.path();
    let (mut served, sock) = serve_on_unix(d, &c.server, &["--read-only"]);
    let ours = env!("CARGO_BIN_EXE_qedstream");
    let uri = served.uri();
    ok(d, ours, &convert_args(s(&c.client), &uri, "ours.raw"));
    assert_eq!(
        std::fs::read(d.join("ours.raw")).unwrap(),
        std::fs::read(d.join("expected.raw")).unwrap(),
        "convert over TLS copied other bytes"
    );
    // The same export as plain nbd+unix://: refused, and told what to use.
    let plain = plain_uri(&sock);
    let out = run_command(Command::new(ours).current_dir(d).args(["info", &plain]));
    let err = failed(out, "qedstream info without TLS");
    assert!(err.contains("nbds://"), "{err}");
    logged(d, &["refused", "plain-text client"]);
    assert_eq!(served.terminate(), 0);
}

#[test]
fn plain_text_clients_are_refused_and_logged() {
    let (dir, c) = setup();
    let d = dir.path();
    let (mut served, sock) = serve_on_unix(d, &c.server, &[]);
    let err = qemu_img_info_plain(d, &sock);
    assert!(err.contains("TLS"), "qemu-img does not say TLS: {err}");
    logged(d, &["refused", "plain-text client", "before STARTTLS"]);

    let lines_before = log_lines(d);
    // libnbd 1.14 says only "Operation not supported" for TLS_REQD; its debug output shows
    // the server's message.
    let out = run_command(
        Command::new("nbdinfo")
            .current_dir(d)
            .env("LIBNBD_DEBUG", "1")
            .arg(plain_uri(&sock)),
    );
    let err = failed(out, "nbdinfo without TLS");
    assert!(
        err.contains("server error message: TLS is required"),
        "nbdinfo does not show the server's reason: {err}"
    );
    // A second log line, for this client (libnbd asks for structured replies first).
    logged_after(
        d,
        lines_before,
        &["NBD_OPT_STRUCTURED_REPLY before STARTTLS"],
    );
    assert_eq!(served.terminate(), 0);
    assert_image_is(d, "expected.raw");
}

#[test]
fn clients_without_a_valid_certificate_are_refused_and_logged() {
    let (dir, c) = setup();
    let d = dir.path();
    let (mut served, sock) = serve_on_unix(d, &c.server, &[]);
    let opts = unix_opts(&sock);
    // Each client fails, and the server logs why it refused the connection. GnuTLS (QEMU's,
    // libnbd's) sends only a certificate whose issuer the server's request names, so one from
    // another CA is withheld and the server sees none; QEMU even refuses to load its own
    // certificate when it is expired or from another CA than the one it trusts, so those two
    // reach the server through nbdinfo.
    // A client of another PKI altogether (its own CA, which QEMU finds our server not in).
    let other_pki = Pki::new(&d.join("third-pki"), "a third CA").client(
        "third-client",
        true,
        Validity::Current,
    );
    let qemu = |creds: &Path| qemu_tls(d, "qemu-img", creds, &["info", "--image-opts", &opts]);
    let nbdinfo = |creds: &Path| {
        run_command(
            Command::new("nbdinfo")
                .current_dir(d)
                .arg(libnbd_uri(&sock, creds)),
        )
    };
    type Client<'a> = &'a dyn Fn(&Path) -> std::process::Output;
    let cases: [(&str, Client<'_>, &Path, &str); 4] = [
        (
            "qemu-img, no certificate",
            &qemu,
            &c.anonymous,
            "peer sent no certificates",
        ),
        (
            "qemu-img, another CA's PKI",
            &qemu,
            &other_pki,
            "peer sent no certificates",
        ),
        (
            "nbdinfo, another CA",
            &nbdinfo,
            &c.foreign,
            "peer sent no certificates",
        ),
        (
            "nbdinfo, expired",
            &nbdinfo,
            &c.expired,
            "invalid peer certificate: certificate expired",
        ),
    ];
    for (who, client, creds, reason) in cases {
        let lines_before = log_lines(d);
        let err = failed(client(creds), who);
        assert!(!err.trim().is_empty(), "{who}: the client says nothing");
        let line = logged_after(d, lines_before, &["TLS handshake failed", reason]);
        assert!(line.contains("unix socket (pid "), "{line}");
    }
    // QEMU's own refusals of such credentials, before connecting.
    let err = failed(qemu(&c.expired), "qemu-img with an expired certificate");
    assert!(err.contains("has expired"), "{err}");
    let err = failed(qemu(&c.foreign), "qemu-img with another CA's certificate");
    assert!(err.contains("failed validation"), "{err}");
    assert_eq!(served.terminate(), 0);
    assert_image_is(d, "expected.raw");
}

#[test]
fn verify_peer_no_serves_a_client_without_a_certificate() {
    let (dir, c) = setup();
    let d = dir.path();
    let (mut served, sock) = serve_on_unix(d, &c.server, &["--tls-verify-peer", "no"]);
    assert_eq!(served.ready["tls-verify-peer"], false, "{}", served.ready);
    let expected = "driver=raw,file.driver=file,file.filename=expected.raw";
    succeeded(
        qemu_tls(
            d,
            "qemu-img",
            &c.anonymous,
            &["compare", "--image-opts", &unix_opts(&sock), expected],
        ),
        "qemu-img compare without a client certificate",
    );
    // Still TLS only.
    qemu_img_info_plain(d, &sock);
    assert_eq!(served.terminate(), 0);
}

/// A scripted client: greeting read, client flags sent.
fn raw_client(sock: &Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&CLIENT_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
    s
}

/// One option's single reply: its type and how many bytes of data came with it.
fn option_reply(s: &mut UnixStream, option: u32, data: &[u8]) -> (u32, usize) {
    s.write_all(&encode_option(option, data)).unwrap();
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("an option reply (30 s bound)");
    let h = decode_option_reply_header(&h, option).expect("a well-formed reply");
    let mut rest = vec![0u8; h.length as usize];
    s.read_exact(&mut rest).unwrap();
    (h.reply_type, rest.len())
}

#[test]
fn a_downgrade_attempt_gets_refusals_and_no_export_data() {
    let (dir, c) = setup();
    let d = dir.path();
    let (mut served, sock) = serve_on_unix(d, &c.server, &[]);
    let mut r = raw_client(&sock);
    let go = encode_go_data("", &[INFO_BLOCK_SIZE]);
    for (option, data) in [(OPT_GO, &go[..]), (OPT_LIST, &[][..]), (OPT_INFO, &go[..])] {
        assert_eq!(
            option_reply(&mut r, option, data).0,
            REP_ERR_TLS_REQD,
            "option {option} before STARTTLS"
        );
    }
    logged(d, &["plain-text client", "NBD_OPT_GO before STARTTLS"]);
    let mut r = raw_client(&sock);
    r.write_all(&encode_option(OPT_EXPORT_NAME, b"")).unwrap();
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{} bytes answered EXPORT_NAME", rest.len());
    logged(
        d,
        &["NBD_OPT_EXPORT_NAME before STARTTLS", "connection closed"],
    );
    assert_eq!(served.terminate(), 0);
}

#[test]
fn bad_credentials_end_serve_before_anything_listens() {
    let (dir, c) = setup();
    let d = dir.path();
    let program = env!("CARGO_BIN_EXE_qedstream");
    let serve = |creds: &Path, extra: &[&str]| {
        let mut cmd = Command::new(program);
        cmd.current_dir(d)
            .args(["serve", "--nbd", "unix:nbd.sock", "--control", "qmp.sock"])
            .args(["--tls-creds", s(creds)])
            .args(extra)
            .arg("top.qed");
        cmd
    };
    // A serve that starts anyway would serve until killed: the deadline fails the test.
    let refused = |cmd: &mut Command| {
        let out = run_with_deadline(cmd);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{cmd:?} succeeded");
        assert_eq!(err.trim_end().lines().count(), 1, "{cmd:?}: {err}");
        err
    };
    // A client directory: no server certificate.
    let err = refused(&mut serve(&c.client, &[]));
    assert!(err.contains("server-cert.pem: missing"), "{err}");
    // TLS-PSK is not in rustls.
    let psk = d.join("psk");
    std::fs::create_dir(&psk).unwrap();
    std::fs::write(psk.join("keys.psk"), "alice:0123456789abcdef\n").unwrap();
    let err = refused(&mut serve(&psk, &[]));
    assert!(
        err.contains("TLS-PSK credentials are not supported"),
        "{err}"
    );
    // Verifying peers needs the CA.
    let no_ca = d.join("no-ca");
    std::fs::create_dir(&no_ca).unwrap();
    for f in ["server-cert.pem", "server-key.pem"] {
        std::fs::copy(c.server.join(f), no_ca.join(f)).unwrap();
    }
    let err = refused(&mut serve(&no_ca, &[]));
    assert!(err.contains("ca-cert.pem: missing"), "{err}");
    for sock in ["nbd.sock", "qmp.sock"] {
        assert!(!d.join(sock).exists(), "{sock} was created");
    }
    // ... and without verification it does not.
    let mut served = serve_tls(d, &no_ca, &["--nbd", "nbd.sock", "--tls-verify-peer", "no"]);
    assert_eq!(served.ready["tls"], true, "{}", served.ready);
    assert_eq!(served.terminate(), 0);
    // Without --nbd the flag is only for an nbds:// backing: a client directory serves the
    // vhost-user-blk device, which TLS does not concern.
    let mut served = serve_tls(d, &c.client, &["--vhost-user-blk", "vhost.sock"]);
    assert_eq!(served.ready["tls"], false, "{}", served.ready);
    assert_eq!(
        served.ready["vhost-user-blk"], "vhost.sock",
        "{}",
        served.ready
    );
    assert!(
        d.join("vhost.sock").exists(),
        "the vhost-user-blk socket is missing"
    );
    assert_eq!(served.terminate(), 0);
}
