//! The NBD client over TLS, against real servers: `qemu-nbd --tls-creds` (unix socket and
//! 127.0.0.1 TCP, verifying client certificates) and `nbdkit --tls=require`, with credentials
//! that `certtool` makes at test time. It proves that `create -b nbds://...` records QEMU's
//! `json:` form with a `tls-creds` id that QEMU itself opens (`qemu-img compare`, `qemu-io`,
//! `qemu-img map` with `--object tls-creds-x509`), that `convert`, `info`, `map` and `stream`
//! read through TLS and the streamed image equals the base and stands alone (also under
//! `serve --stream`), that NBD_OPT_LIST runs inside TLS, that a stream
//! survives qemu-nbd being killed and restarted (the reconnection runs TLS again), and that
//! every way TLS can fail is refused with a clear error and never falls back to plain text: a
//! wrong CA, an expired server certificate, a certificate that does not name the host, no
//! client certificate for a server that verifies peers, a plain-text server (newstyle or
//! oldstyle), a scripted server
//! that answers STARTTLS with an error (a downgrade attempt), missing credentials, and PSK.
//!
//! A missing qemu-nbd, nbdkit, qemu-img or certtool fails the test loudly.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use qedstream_tests::tempdir;
use qedstream_tests::tls::{convert_args, create_args, Pki, Validity};
use qedstream_tests::tools::{ok, qemu_check, run};
use serde_json::Value;

fn qedstream(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qedstream"));
    c.current_dir(dir).args(args);
    c
}

/// Runs `qedstream args...` in `dir` (a hang of 120 s fails the test).
fn ours(dir: &Path, args: &[&str]) -> Output {
    qedstream_tests::tools::run_with_deadline(&mut qedstream(dir, args))
}

fn ours_ok(dir: &Path, args: &[&str]) -> String {
    let out = ours(dir, args);
    assert!(
        out.status.success(),
        "qedstream {args:?} failed ({:?}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `qedstream args...`, which must fail with one line on stderr; returns that line.
fn ours_refused(dir: &Path, args: &[&str]) -> String {
    let out = ours(dir, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "qedstream {args:?} succeeded");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    err
}

/// Where a test server listens.
#[derive(Debug, Clone)]
enum Listen {
    Unix(PathBuf),
    Tcp(u16),
}

impl Listen {
    fn accepts(&self) -> bool {
        match self {
            Listen::Unix(p) => UnixStream::connect(p).is_ok(),
            Listen::Tcp(port) => std::net::TcpStream::connect(("127.0.0.1", *port)).is_ok(),
        }
    }
}

/// A qemu-nbd or nbdkit process, waited for until it accepts, killed (SIGKILL) on drop. Its
/// stderr goes to `PROGRAM.log` in the test directory.
#[derive(Debug)]
struct Server {
    program: &'static str,
    args: Vec<String>,
    listen: Listen,
    log: PathBuf,
    child: Option<Child>,
}

impl Server {
    fn start(dir: &Path, program: &'static str, args: Vec<String>, listen: Listen) -> Server {
        let mut s = Server {
            program,
            args,
            listen,
            log: dir.join(format!("{program}.log")),
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        if let Listen::Unix(p) = &self.listen {
            let _ = std::fs::remove_file(p);
        }
        let log = std::fs::File::create(&self.log).unwrap();
        let child = qedstream_tests::tools::spawn(
            Command::new(self.program)
                .args(&self.args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
        )
        .unwrap_or_else(|e| panic!("cannot run {} (is it installed?): {e}", self.program));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.listen.accepts() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("{} exited early ({status}): {log}", self.program);
            }
            assert!(Instant::now() < deadline, "{} did not start", self.program);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn listen_args(program: &str, listen: &Listen) -> Vec<String> {
    match (program, listen) {
        ("qemu-nbd", Listen::Unix(p)) => vec!["-k".into(), p.display().to_string()],
        ("qemu-nbd", Listen::Tcp(port)) => {
            vec![
                "-b".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
            ]
        }
        (_, Listen::Unix(p)) => vec!["-U".into(), p.display().to_string()],
        (_, Listen::Tcp(port)) => {
            vec![
                "-i".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
            ]
        }
    }
}

/// qemu-nbd serving `dir/base.raw` read-only as `exp`, with TLS from `creds` (verifying
/// client certificates when `verify_peer`), or in plain text when `creds` is `None`.
fn qemu_nbd(dir: &Path, creds: Option<&Path>, verify_peer: bool, listen: Listen) -> Server {
    let mut args: Vec<String> = Vec::new();
    if let Some(creds) = creds {
        let verify = if verify_peer { "on" } else { "off" };
        args.push("--object".into());
        args.push(format!(
            "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer={verify}",
            creds.display()
        ));
        args.extend(["--tls-creds".into(), "tls0".into()]);
    }
    args.extend(["-r", "-f", "raw", "-x", "exp", "--persistent", "--shared=8"].map(String::from));
    args.extend(listen_args("qemu-nbd", &listen));
    args.push(dir.join("base.raw").display().to_string());
    Server::start(dir, "qemu-nbd", args, listen)
}

/// A free TCP port on 127.0.0.1.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// [`qemu_nbd`] over TLS with the `server` credentials on the unix socket `dir/tls.sock`:
/// the server and the socket.
fn qemu_nbd_unix(dir: &Path, server: &Path, verify_peer: bool) -> (Server, PathBuf) {
    let sock = dir.join("tls.sock");
    let listen = Listen::Unix(sock.clone());
    (qemu_nbd(dir, Some(server), verify_peer, listen), sock)
}

/// [`qemu_nbd`] over TLS with the `server` credentials, verifying peers, on a free TCP port
/// of 127.0.0.1: the server and its `nbds://` URI.
fn qemu_nbd_tcp(dir: &Path, server: &Path) -> (Server, String) {
    let port = free_port();
    let server = qemu_nbd(dir, Some(server), true, Listen::Tcp(port));
    (server, format!("nbds://127.0.0.1:{port}/exp"))
}

/// The `nbds+unix://` URI of the export `exp` on `sock`.
fn nbds_unix(sock: &Path) -> String {
    format!("nbds+unix:///exp?socket={}", sock.display())
}

/// nbdkit's file plugin serving `dir/base.raw` read-only as `exp`, `--tls=require` with
/// `creds` (and `--tls-verify-peer` when asked), or in plain text when `creds` is `None`.
fn nbdkit(dir: &Path, creds: Option<&Path>, verify_peer: bool, listen: Listen) -> Server {
    let mut args: Vec<String> = ["-f", "-r", "-e", "exp"].map(String::from).to_vec();
    if let Some(creds) = creds {
        args.push("--tls=require".into());
        args.push(format!("--tls-certificates={}", creds.display()));
        if verify_peer {
            args.push("--tls-verify-peer".into());
        }
    }
    args.extend(listen_args("nbdkit", &listen));
    args.push("file".into());
    args.push(dir.join("base.raw").display().to_string());
    Server::start(dir, "nbdkit", args, listen)
}

/// `dir/base.raw`: `mib` MiB of data that differs per 4 KiB block, with a 1 MiB hole at 2 MiB
/// (so that block status has something to say).
fn base(dir: &Path, mib: u64) {
    let mut f = std::fs::File::create(dir.join("base.raw")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for m in 0..mib {
        if m == 2 {
            buf.fill(0);
        } else {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((m * 131 + i as u64 / 4096 * 7) % 251) as u8 + 1;
            }
        }
        f.write_all(&buf).unwrap();
    }
    drop(f);
    // Punch the zero MiB into a real hole.
    ok(
        dir,
        "fallocate",
        &["--punch-hole", "-o", "2MiB", "-l", "1MiB", "base.raw"],
    );
}

/// The credentials: a CA, a server directory naming `hosts`, a client directory with a
/// certificate (`client`) and one without (`anonymous`).
struct Creds {
    pki: Pki,
    server: PathBuf,
    client: PathBuf,
}

fn creds(dir: &Path, hosts: &[&str]) -> Creds {
    let pki = Pki::new(&dir.join("pki"), "qedstream test CA");
    let server = pki.server("server", hosts, Validity::Current);
    let client = pki.client("client", true, Validity::Current);
    Creds {
        pki,
        server,
        client,
    }
}

/// A test directory holding `base.raw` of `mib` MiB ([`base`]) and credentials whose server
/// certificate names `hosts` ([`creds`]).
fn setup(mib: u64, hosts: &[&str]) -> (tempfile::TempDir, Creds) {
    let d = tempdir();
    base(d.path(), mib);
    let c = creds(d.path(), hosts);
    (d, c)
}

/// `create --tls-creds CREDS -b URI -F raw ov.qed`, which must succeed.
fn create_overlay(dir: &Path, creds: &str, uri: &str) {
    ours_ok(dir, &create_args(creds, uri, "ov.qed"));
}

/// A runtime on this thread for the tests that drive the client library directly.
fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn object(client: &Path) -> String {
    format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        client.display()
    )
}

/// `qemu-img compare` of `image` (qed, opened by QEMU with our client credentials as object
/// `tls0`) against `expect` (raw): they must be equal.
fn qemu_compare(dir: &Path, client: &Path, image: &str, expect: &str) {
    let obj = object(client);
    let out = run(
        dir,
        "qemu-img",
        &[
            "compare", "--object", &obj, "-f", "qed", "-F", "raw", image, expect,
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img compare {image} {expect}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_info(dir: &Path, image: &str) -> Value {
    serde_json::from_str(&ok(
        dir,
        "qemu-img",
        &["info", "-U", "--output=json", image],
    ))
    .unwrap()
}

/// The image equals the base, QEMU finds it clean, and it has no backing left.
fn assert_streamed(dir: &Path, image: &str) {
    let out = run(
        dir,
        "qemu-img",
        &["compare", "-f", "qed", "-F", "raw", image, "base.raw"],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(qemu_check(dir, image), 0, "qemu-img check {image}");
    let i = qemu_info(dir, image);
    assert!(i.get("backing-filename").is_none(), "still linked: {i}");
}

/// The backing name QEMU reads in `image`'s header.
fn recorded_backing(dir: &Path, image: &str) -> String {
    qemu_info(dir, image)["backing-filename"]
        .as_str()
        .unwrap_or_else(|| panic!("{image} has no backing"))
        .to_string()
}

/// create over `uri` with `--tls-creds client`, QEMU opens the record with the credentials
/// object, our info/map read through TLS, and stream makes the image whole and standalone.
fn create_check_and_stream(dir: &Path, client: &Path, uri: &str) {
    let creds = client.to_str().unwrap();
    create_overlay(dir, creds, uri);
    let backing = recorded_backing(dir, "ov.qed");
    assert!(backing.starts_with("json:"), "{backing}");
    assert!(backing.contains(r#""tls-creds":"tls0""#), "{backing}");
    qemu_compare(dir, client, "ov.qed", "base.raw");
    let obj = object(client);
    ok(
        dir,
        "qemu-io",
        &[
            "--object",
            &obj,
            "-f",
            "qed",
            "-r",
            "-c",
            "read -P 1 0 4k",
            "ov.qed",
        ],
    );
    let chain = ours_ok(
        dir,
        &[
            "info",
            "--tls-creds",
            creds,
            "--backing-chain",
            "--output=json",
            "ov.qed",
        ],
    );
    let chain: Value = serde_json::from_str(&chain).unwrap();
    assert_eq!(chain.as_array().map(Vec::len), Some(2), "{chain}");
    let ours_map = ours_ok(
        dir,
        &["map", "--tls-creds", creds, "--output=json", "ov.qed"],
    );
    let qemu_map = ok(
        dir,
        "qemu-img",
        &["map", "--object", &obj, "--output=json", "ov.qed"],
    );
    let parse = |s: &str| serde_json::from_str::<Value>(s).unwrap();
    assert_eq!(parse(&ours_map), parse(&qemu_map), "map over TLS");
    ours_ok(dir, &["stream", "--tls-creds", creds, "ov.qed"]);
    assert_streamed(dir, "ov.qed");
}

#[test]
fn qemu_nbd_over_unix_verifying_peers_create_info_map_stream() {
    let (d, c) = setup(8, &["localhost"]);
    let dir = d.path();
    let (_server, sock) = qemu_nbd_unix(dir, &c.server, true);
    // QEMU checks a name over a unix socket only with tls-hostname (and insists on one).
    let uri = format!("{}&tls-hostname=localhost", nbds_unix(&sock));
    create_check_and_stream(dir, &c.client, &uri);
}

#[test]
fn qemu_nbd_over_tcp_convert_and_stream() {
    let (d, c) = setup(8, &["127.0.0.1"]);
    let dir = d.path();
    let (_server, uri) = qemu_nbd_tcp(dir, &c.server);
    let creds = c.client.to_str().unwrap();
    ours_ok(dir, &convert_args(creds, &uri, "out.raw"));
    assert_eq!(
        std::fs::read(dir.join("out.raw")).unwrap(),
        std::fs::read(dir.join("base.raw")).unwrap()
    );
    create_check_and_stream(dir, &c.client, &uri);
}

#[test]
fn nbdkit_tls_require_with_libnbd_uri_query() {
    let (d, c) = setup(8, &["localhost"]);
    let dir = d.path();
    let sock = dir.join("kit.sock");
    let _server = nbdkit(dir, Some(&c.server), true, Listen::Unix(sock.clone()));
    // libnbd's spelling: the credentials in the URI, no --tls-creds.
    let uri = format!(
        "{}&tls-certificates={}",
        nbds_unix(&sock),
        c.client.display()
    );
    ours_ok(dir, &["convert", "-f", "raw", "-O", "qed", &uri, "out.qed"]);
    assert_streamed(dir, "out.qed");
    // The header keeps no directory: later commands need --tls-creds, as in QEMU.
    ours_ok(dir, &["create", "-b", &uri, "-F", "raw", "ov.qed"]);
    let err = ours_refused(dir, &["stream", "ov.qed"]);
    assert!(err.contains("--tls-creds"), "{err}");
    assert!(
        err.contains("--object tls-creds-x509,id=tls0,dir=DIR,endpoint=client"),
        "{err}"
    );
    ours_ok(
        dir,
        &[
            "stream",
            "--tls-creds",
            c.client.to_str().unwrap(),
            "ov.qed",
        ],
    );
    assert_streamed(dir, "ov.qed");
}

/// `convert` from `uri` with `--tls-creds creds` must fail with one line containing every
/// word of `expect`.
fn convert_refused(dir: &Path, creds: &Path, uri: &str, expect: &[&str]) -> String {
    let err = ours_refused(dir, &convert_args(creds.to_str().unwrap(), uri, "out.raw"));
    for e in expect {
        assert!(err.contains(e), "expected {e:?} in: {err}");
    }
    err
}

#[test]
fn a_server_signed_by_another_ca_is_refused() {
    let (d, c) = setup(4, &["localhost"]);
    let dir = d.path();
    let other = Pki::new(&dir.join("other"), "another CA");
    let stranger = other.client("stranger", true, Validity::Current);
    let (_server, sock) = qemu_nbd_unix(dir, &c.server, false);
    convert_refused(dir, &stranger, &nbds_unix(&sock), &["not signed by the CA"]);
}

#[test]
fn an_expired_server_certificate_is_refused() {
    let (d, c) = setup(4, &["localhost"]);
    let dir = d.path();
    // qemu-nbd refuses to start with an expired certificate; nbdkit serves it.
    let expired = c.pki.server("expired", &["localhost"], Validity::Expired);
    let sock = dir.join("kit.sock");
    let _server = nbdkit(dir, Some(&expired), false, Listen::Unix(sock.clone()));
    convert_refused(
        dir,
        &c.client,
        &nbds_unix(&sock),
        &["outside its validity period"],
    );
}

#[test]
fn a_certificate_that_does_not_name_the_tcp_host_is_refused() {
    let (d, c) = setup(4, &["images.example"]);
    let dir = d.path();
    let (_server, uri) = qemu_nbd_tcp(dir, &c.server);
    convert_refused(dir, &c.client, &uri, &["does not name the host"]);
    // tls-hostname names what the certificate carries: then it is accepted.
    let named = format!("{uri}?tls-hostname=images.example");
    ours_ok(
        dir,
        &convert_args(c.client.to_str().unwrap(), &named, "out.raw"),
    );
}

#[test]
fn no_client_certificate_for_a_server_that_verifies_peers_is_refused() {
    let (d, c) = setup(4, &["localhost"]);
    let dir = d.path();
    let anonymous = c.pki.client("anonymous", false, Validity::Current);
    for program in ["qemu-nbd", "nbdkit"] {
        let sock = dir.join(format!("{program}.sock"));
        let listen = Listen::Unix(sock.clone());
        let _server = match program {
            "qemu-nbd" => qemu_nbd(dir, Some(&c.server), true, listen),
            _ => nbdkit(dir, Some(&c.server), true, listen),
        };
        let uri = nbds_unix(&sock);
        convert_refused(dir, &anonymous, &uri, &["TLS", "client certificate"]);
    }
}

#[test]
fn a_plain_text_server_is_never_used_when_tls_was_asked() {
    let (d, c) = setup(4, &["localhost"]);
    let dir = d.path();
    for program in ["qemu-nbd", "nbdkit", "nbdkit --oldstyle"] {
        let sock = dir.join(format!("{}.sock", program.replace(' ', "")));
        let listen = Listen::Unix(sock.clone());
        let _server = match program {
            "qemu-nbd" => qemu_nbd(dir, None, false, listen),
            "nbdkit" => nbdkit(dir, None, false, listen),
            _ => {
                let mut args = vec!["-f".to_string(), "-r".into(), "--oldstyle".into()];
                args.extend(listen_args("nbdkit", &listen));
                args.extend(["file".into(), dir.join("base.raw").display().to_string()]);
                Server::start(dir, "nbdkit", args, listen)
            }
        };
        convert_refused(
            dir,
            &c.client,
            &nbds_unix(&sock),
            &["TLS was required", "not falling back to plain text"],
        );
    }
}

#[test]
fn a_tls_server_asked_in_plain_text_says_to_use_nbds() {
    let (d, c) = setup(4, &["localhost"]);
    let dir = d.path();
    let (_server, sock) = qemu_nbd_unix(dir, &c.server, true);
    let uri = format!("nbd+unix:///exp?socket={}", sock.display());
    convert_refused(
        dir,
        &c.client,
        &uri,
        &["requires TLS", "nbds://", "--tls-creds"],
    );
}

#[test]
fn missing_or_psk_credentials_are_refused_clearly() {
    let (d, c) = setup(4, &["localhost"]);
    let dir = d.path();
    let (_server, sock) = qemu_nbd_unix(dir, &c.server, true);
    let uri = nbds_unix(&sock);
    let err = ours_refused(dir, &["create", "-b", &uri, "-F", "raw", "ov.qed"]);
    assert!(
        err.contains("no credentials were given: pass --tls-creds DIR"),
        "{err}"
    );
    assert!(!dir.join("ov.qed").exists());
    let json = format!(
        r#"json:{{"driver":"nbd","server":{{"type":"unix","path":"{}"}},"export":"exp","tls-creds":"sec7"}}"#,
        sock.display()
    );
    let err = ours_refused(dir, &["convert", "-f", "raw", "-O", "raw", &json, "o.raw"]);
    assert!(
        err.contains("--object tls-creds-x509,id=sec7,dir=DIR,endpoint=client"),
        "{err}"
    );
    let psk = format!("{uri}&tls-psk-file=/etc/keys.psk");
    convert_refused(
        dir,
        &c.client,
        &psk,
        &["TLS-PSK credentials are not supported"],
    );
    let psk_dir = dir.join("psk");
    std::fs::create_dir(&psk_dir).unwrap();
    std::fs::write(psk_dir.join("keys.psk"), "alice:0123456789abcdef\n").unwrap();
    convert_refused(
        dir,
        &psk_dir,
        &uri,
        &["TLS-PSK credentials are not supported"],
    );
}

/// A scripted server that offers fixed newstyle, answers NBD_OPT_STARTTLS with ERR_UNSUP (as a
/// plain-text server would, or a man in the middle stripping TLS), ACKs an ABORT, and records
/// every option the client sends. Returns the options, in order.
fn downgrading_server(listener: std::os::unix::net::UnixListener) -> Vec<u32> {
    const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = b"NBDMAGIC".to_vec();
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&3u16.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    s.write_all(&greeting).unwrap();
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags).unwrap();
    let mut options = Vec::new();
    loop {
        let mut h = [0u8; 16];
        if s.read_exact(&mut h).is_err() {
            return options;
        }
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len.min(1 << 16)];
        if s.read_exact(&mut data).is_err() {
            return options;
        }
        options.push(option);
        let reply = match option {
            nbd_client::protocol::OPT_STARTTLS => nbd_client::protocol::REP_ERR_UNSUP,
            nbd_client::protocol::OPT_ABORT => nbd_client::protocol::REP_ACK,
            // Anything else would be negotiation in plain text: answer it as a plain
            // server would start to, so that a client that went on would be seen going on.
            _ => nbd_client::protocol::REP_ERR_UNSUP,
        };
        let mut r = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
        r.extend_from_slice(&option.to_be_bytes());
        r.extend_from_slice(&reply.to_be_bytes());
        r.extend_from_slice(&0u32.to_be_bytes());
        if s.write_all(&r).is_err() || option == nbd_client::protocol::OPT_ABORT {
            return options;
        }
    }
}

#[test]
fn a_server_answering_starttls_with_an_error_is_not_followed_into_plain_text() {
    let d = tempdir();
    let dir = d.path();
    let c = creds(dir, &["localhost"]);
    let sock = dir.join("fake.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || downgrading_server(listener));
    let uri = nbd_client::Uri::unix(&sock, "exp").with_tls();
    let config = nbd_client::ClientConfig {
        tls_creds: Some(c.client.clone()),
        connect_timeout: Duration::from_secs(10),
        handshake_timeout: Duration::from_secs(10),
        ..nbd_client::ClientConfig::default()
    };
    let rt = current_thread();
    let result = rt.block_on(nbd_client::Client::connect(&uri, config));
    let err = match result {
        Ok(_) => panic!("connected in plain text after STARTTLS was refused"),
        Err(e) => e,
    };
    assert!(
        matches!(
            err,
            nbd_client::Error::TlsRefused {
                reply: "ERR_UNSUP",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("not falling back to plain text"),
        "{err}"
    );
    let options = server.join().unwrap();
    assert_eq!(
        options,
        [
            nbd_client::protocol::OPT_STARTTLS,
            nbd_client::protocol::OPT_ABORT
        ],
        "the client sent more than STARTTLS and ABORT in plain text"
    );
}

/// Waits until the JSON progress of `child` reports `copied >= bytes`; fails after 60 s.
fn wait_copied(child: &mut Child, bytes: u64) -> std::process::ChildStdout {
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut line = String::new();
    while Instant::now() < deadline {
        line.clear();
        if lines.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        let v: Value = serde_json::from_str(&line).unwrap();
        let copied = v["copied"].as_u64().unwrap_or(0);
        if copied >= bytes {
            assert!(copied < v["total"].as_u64().unwrap(), "already done: {v}");
            return lines.into_inner();
        }
    }
    panic!("the stream did not copy {bytes} bytes within 60 s");
}

#[test]
fn qemu_nbd_killed_mid_stream_and_restarted_the_stream_completes_over_tls() {
    let (d, c) = setup(24, &["localhost"]);
    let dir = d.path();
    let (mut server, sock) = qemu_nbd_unix(dir, &c.server, true);
    let uri = nbds_unix(&sock);
    let creds = c.client.to_str().unwrap();
    create_overlay(dir, creds, &uri);
    let mut child = qedstream(
        dir,
        &[
            "stream",
            "--tls-creds",
            creds,
            "--output=json",
            "--rate",
            "8M",
            "ov.qed",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn qedstream");
    let mut rest = wait_copied(&mut child, 2 << 20);
    server.kill();
    std::thread::sleep(Duration::from_secs(2));
    server.restart();
    let mut tail = String::new();
    rest.read_to_string(&mut tail).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(tail.contains(r#""event":"completed""#), "{tail}");
    drop(server);
    assert_streamed(dir, "ov.qed");
}

/// One directory with the client's and the server's credentials (`serve --tls-creds` reads
/// its backing's client side from it, and its own export's server side).
fn both_sides(c: &Creds, dir: &Path) -> PathBuf {
    let both = dir.join("both");
    std::fs::create_dir(&both).unwrap();
    for (from, name) in [
        (&c.client, "ca-cert.pem"),
        (&c.client, "client-cert.pem"),
        (&c.client, "client-key.pem"),
        (&c.server, "server-cert.pem"),
        (&c.server, "server-key.pem"),
    ] {
        std::fs::copy(from.join(name), both.join(name)).unwrap();
    }
    both
}

#[test]
fn serve_streams_its_backing_over_tls() {
    let (d, c) = setup(8, &["localhost"]);
    let dir = d.path();
    let (_server, sock) = qemu_nbd_unix(dir, &c.server, true);
    let uri = nbds_unix(&sock);
    let both = both_sides(&c, dir);
    let creds = both.to_str().unwrap();
    create_overlay(dir, creds, &uri);
    let mut served = qedstream_tests::served::Served::start(
        Path::new(env!("CARGO_BIN_EXE_qedstream")),
        dir,
        &[
            "--tls-creds",
            creds,
            "--control",
            "ctl.sock",
            "--stream",
            "ov.qed",
        ],
    );
    let done = served.wait_for("completed");
    assert_eq!(done["unlinked"], true, "{done}");
    served.signal(libc::SIGTERM);
    assert_eq!(served.wait(), 0);
    assert_streamed(dir, "ov.qed");
}

#[test]
fn list_exports_runs_inside_tls() {
    let (d, c) = setup(4, &["localhost"]);
    let dir = d.path();
    let (_server, sock) = qemu_nbd_unix(dir, &c.server, true);
    let uri = nbd_client::Uri::unix(&sock, "").with_tls();
    let config = nbd_client::ClientConfig {
        tls_creds: Some(c.client.clone()),
        ..nbd_client::ClientConfig::default()
    };
    let rt = current_thread();
    let exports = rt
        .block_on(nbd_client::list_exports(&uri, &config))
        .unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = exports.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["exp"]);
}

#[test]
fn rebase_records_qemus_json_form_with_the_chosen_object_id() {
    let (d, c) = setup(4, &["localhost"]);
    let dir = d.path();
    let (_server, sock) = qemu_nbd_unix(dir, &c.server, true);
    ok(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "qed", "ov.qed", "4M"],
    );
    let uri = format!("{}&tls-hostname=localhost", nbds_unix(&sock));
    ours_ok(
        dir,
        &[
            "rebase",
            "-u",
            "-b",
            &uri,
            "-F",
            "raw",
            "--tls-creds-id",
            "sec1",
            "ov.qed",
        ],
    );
    let backing = recorded_backing(dir, "ov.qed");
    assert!(backing.contains(r#""tls-creds":"sec1""#), "{backing}");
    let obj = format!(
        "tls-creds-x509,id=sec1,dir={},endpoint=client",
        c.client.display()
    );
    let out = run(
        dir,
        "qemu-img",
        &[
            "compare", "--object", &obj, "-f", "qed", "-F", "raw", "ov.qed", "base.raw",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}
