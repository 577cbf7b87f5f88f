//! Misbehaving clients, scripted byte by byte over a raw socket (no real client misbehaves):
//! each gets the spec's answer, and the server keeps serving other connections.
//!
//! Every socket read has a 30 s timeout: it only turns a hang (a server that never answers
//! or never closes) into a failure, and no assertion depends on timing.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use copy_on_read::RawFile;
use nbd_proto::*;
use nbd_server::{Error, ListenAddr, Server, ServerConfig};
use qedstream_tests::tools::{self, ok};

/// A scripted client.
struct Raw {
    s: UnixStream,
    mode: HeaderMode,
}

/// One reply as it came.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Simple {
        errno: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

impl Raw {
    /// Connects and reads the greeting.
    fn connect(sock: &Path) -> Raw {
        let s = UnixStream::connect(sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut r = Raw {
            s,
            mode: HeaderMode::Simple,
        };
        let g = r.bytes(18);
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(be16(&g, 16), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        r
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("reading from the server");
        b
    }

    /// True once the server has closed the connection (EOF or reset), reading past anything
    /// it still sends.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(e) => panic!("the server neither answered nor closed: {e}"),
            }
        }
    }

    /// True when the server closes without sending anything more.
    fn eof(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        self.send(&encode_option(option, data));
    }

    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.bytes(20);
        assert_eq!(be64(&h, 0), OPTION_REPLY_MAGIC);
        let len = be32(&h, 16) as usize;
        (be32(&h, 8), be32(&h, 12), self.bytes(len))
    }

    /// Negotiates `mode` and GO on the default export.
    fn go(sock: &Path, mode: HeaderMode) -> Raw {
        let mut r = Raw::connect(sock);
        r.send(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes());
        let opt = match mode {
            HeaderMode::Simple => None,
            HeaderMode::Structured => Some(OPT_STRUCTURED_REPLY),
            HeaderMode::Extended => Some(OPT_EXTENDED_HEADERS),
        };
        if let Some(opt) = opt {
            r.option(opt, &[]);
            assert_eq!(r.option_reply().1, REP_ACK);
        }
        r.option(OPT_GO, &encode_go_data("", &[]));
        loop {
            let (_, t, _) = r.option_reply();
            if t == REP_ACK {
                break;
            }
            assert_eq!(t, REP_INFO);
        }
        r.mode = mode;
        r
    }

    fn request(&mut self, command: u16, flags: u16, cookie: u64, offset: u64, length: u64) {
        let mut b = [0u8; 32];
        let n = if self.mode == HeaderMode::Extended {
            b[0..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
            b[24..32].copy_from_slice(&length.to_be_bytes());
            32
        } else {
            b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            b[24..28].copy_from_slice(&(length as u32).to_be_bytes());
            28
        };
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&command.to_be_bytes());
        b[8..16].copy_from_slice(&cookie.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        self.send(&b[..n]);
    }

    fn reply(&mut self) -> Reply {
        let h = self.bytes(16);
        match be32(&h, 0) {
            SIMPLE_REPLY_MAGIC => Reply::Simple {
                errno: be32(&h, 4),
                cookie: be64(&h, 8),
            },
            STRUCTURED_REPLY_MAGIC => {
                let len = be32(&self.bytes(4), 0) as usize;
                Reply::Chunk {
                    flags: be16(&h, 4),
                    kind: be16(&h, 6),
                    cookie: be64(&h, 8),
                    payload: self.bytes(len),
                }
            }
            EXTENDED_REPLY_MAGIC => {
                let rest = self.bytes(16);
                let len = be64(&rest, 8) as usize;
                Reply::Chunk {
                    flags: be16(&h, 4),
                    kind: be16(&h, 6),
                    cookie: be64(&h, 8),
                    payload: self.bytes(len),
                }
            }
            m => panic!("bad reply magic {m:#x}"),
        }
    }

    /// The error value of a reply that must be an error (a simple reply or an ERROR chunk
    /// with DONE).
    fn error(&mut self, cookie: u64) -> u32 {
        match self.reply() {
            Reply::Simple { errno, cookie: c } => {
                assert_eq!(c, cookie);
                errno
            }
            Reply::Chunk {
                flags,
                kind,
                cookie: c,
                payload,
            } => {
                assert_eq!((c, kind, flags), (cookie, CHUNK_ERROR, REPLY_FLAG_DONE));
                be32(&payload, 0)
            }
        }
    }

    /// A structured read of `length` at `offset` that must succeed: its bytes.
    fn read_ok(&mut self, cookie: u64, offset: u64, length: u64) -> Vec<u8> {
        self.request(Command::Read as u16, 0, cookie, offset, length);
        let mut out = vec![0xffu8; length as usize];
        loop {
            let Reply::Chunk {
                flags,
                kind,
                cookie: c,
                payload,
            } = self.reply()
            else {
                panic!("simple reply to a structured read");
            };
            assert_eq!(c, cookie);
            match kind {
                CHUNK_OFFSET_DATA => {
                    let at = (be64(&payload, 0) - offset) as usize;
                    out[at..at + payload.len() - 8].copy_from_slice(&payload[8..]);
                }
                CHUNK_OFFSET_HOLE => {
                    let at = (be64(&payload, 0) - offset) as usize;
                    out[at..at + be32(&payload, 8) as usize].fill(0);
                }
                CHUNK_NONE => {}
                other => panic!("chunk {other:#x} in a read that should succeed"),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return out;
            }
        }
    }
}

/// A 1 MiB raw disk of 0x33 bytes, served writable with `config`.
fn served(config: ServerConfig) -> (tempfile::TempDir, Served) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, "qemu-img", &["create", "-f", "raw", "disk.raw", "1M"]);
    tools::qemu_io(d, "raw", "disk.raw", &["write -P 0x33 0 1M"]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dev = RawFile::open(&d.join("disk.raw"), true).unwrap();
    let s = serve_device(rt, d, Arc::new(dev), None, false, config);
    (dir, s)
}

/// The server still serves a well-behaved client.
fn still_serving(s: &Served) {
    let mut r = Raw::go(&s.sock, HeaderMode::Structured);
    assert!(r.read_ok(77, 0, 4096) == vec![0x33; 4096], "wrong data");
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let (_dir, s) = served(ServerConfig::default());
    let mut r = Raw::go(&s.sock, HeaderMode::Structured);
    r.send(&[0x12, 0x56, 0x09, 0x53]);
    r.send(&[0u8; 24]);
    assert!(r.eof(), "a request with a bad magic was answered");
    still_serving(&s);
    s.stop();
}

#[test]
fn oversized_requests_get_einval_and_the_connection_lives() {
    let (_dir, s) = served(ServerConfig::default());
    for mode in [HeaderMode::Structured, HeaderMode::Extended] {
        let mut r = Raw::go(&s.sock, mode);
        r.request(Command::Read as u16, 0, 1, 0, (32 << 20) + 1);
        assert_eq!(r.error(1), Errno::EINVAL.0);
        // A write above the maximum: the payload is skipped, not buffered, then refused.
        let big = (33u64 << 20) as usize;
        r.request(Command::Write as u16, 0, 2, 0, big as u64);
        let payload = vec![0xab; big];
        let mut w = r.s.try_clone().unwrap();
        let sender = std::thread::spawn(move || w.write_all(&payload).unwrap());
        assert_eq!(r.error(2), Errno::EINVAL.0);
        sender.join().unwrap();
        assert!(r.read_ok(3, 0, 4096) == vec![0x33; 4096], "wrong data");
    }
    s.stop();
}

#[test]
fn out_of_range_requests_are_refused_and_a_write_payload_consumed() {
    let (_dir, s) = served(ServerConfig::default());
    let mut r = Raw::go(&s.sock, HeaderMode::Structured);
    r.request(Command::Read as u16, 0, 1, (1 << 20) - 100, 200);
    assert_eq!(r.error(1), Errno::EINVAL.0);
    r.request(Command::Read as u16, 0, 2, u64::MAX - 10, 100);
    assert_eq!(r.error(2), Errno::EINVAL.0);
    r.request(Command::Write as u16, 0, 3, (1 << 20) - 100, 200);
    r.send(&[0xcc; 200]);
    assert_eq!(r.error(3), Errno::ENOSPC.0);
    r.request(Command::WriteZeroes as u16, 0, 4, 1 << 20, 1);
    assert_eq!(r.error(4), Errno::ENOSPC.0);
    r.request(Command::BlockStatus as u16, 0, 5, 0, 4096);
    assert_eq!(r.error(5), Errno::EINVAL.0, "no meta context negotiated");
    assert!(
        r.read_ok(6, (1 << 20) - 4096, 4096) == vec![0x33; 4096],
        "wrong data"
    );
    s.stop();
}

#[test]
fn unknown_commands_and_flags_get_einval() {
    let (_dir, s) = served(ServerConfig::default());
    let mut r = Raw::go(&s.sock, HeaderMode::Structured);
    r.request(42, 0, 1, 0, 4096);
    assert_eq!(r.error(1), Errno::EINVAL.0);
    r.request(Command::Read as u16, 1 << 9, 2, 0, 4096);
    assert_eq!(r.error(2), Errno::EINVAL.0);
    r.request(Command::Read as u16, CMD_FLAG_REQ_ONE, 3, 0, 4096);
    assert_eq!(r.error(3), Errno::EINVAL.0, "REQ_ONE on a read");
    r.request(Command::Flush as u16, CMD_FLAG_NO_HOLE, 4, 0, 0);
    assert_eq!(r.error(4), Errno::EINVAL.0);
    // A simple-reply connection gets simple error replies.
    let mut simple = Raw::go(&s.sock, HeaderMode::Simple);
    simple.request(Command::Read as u16, CMD_FLAG_DF, 5, 0, 4096);
    assert_eq!(
        simple.reply(),
        Reply::Simple {
            errno: Errno::EINVAL.0,
            cookie: 5
        },
        "DF without structured replies"
    );
    assert!(r.read_ok(6, 0, 10) == vec![0x33; 10], "wrong data");
    s.stop();
}

#[test]
fn bad_client_flags_close_the_handshake() {
    let (_dir, s) = served(ServerConfig::default());
    for flags in [CLIENT_FIXED_NEWSTYLE | 1 << 7, CLIENT_NO_ZEROES, 0] {
        let mut r = Raw::connect(&s.sock);
        let mut b = flags.to_be_bytes().to_vec();
        b.extend(encode_option(OPT_LIST, &[]));
        // The server may close before the option arrives.
        let _ = r.s.write_all(&b);
        assert!(r.eof(), "client flags {flags:#x} accepted");
    }
    still_serving(&s);
    s.stop();
}

#[test]
fn option_floods_and_long_options_close_the_handshake() {
    let config = ServerConfig {
        max_options: 20,
        ..ServerConfig::default()
    };
    let (_dir, s) = served(config);
    let mut r = Raw::connect(&s.sock);
    r.send(&CLIENT_FIXED_NEWSTYLE.to_be_bytes());
    // One write: the server closes after the 20th, maybe before reading more.
    let flood: Vec<u8> = (0..30).flat_map(|_| encode_option(999, &[])).collect();
    r.send(&flood);
    for _ in 0..20 {
        assert_eq!(r.option_reply().1, REP_ERR_UNSUP);
    }
    assert!(r.eof(), "more options than allowed were served");

    let mut r = Raw::connect(&s.sock);
    r.send(&CLIENT_FIXED_NEWSTYLE.to_be_bytes());
    let mut h = IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&OPT_LIST.to_be_bytes());
    h.extend_from_slice(&(nbd_server::MAX_OPTION_DATA + 1).to_be_bytes());
    r.send(&h);
    // The server may close before taking all of it.
    let _ = r.s.write_all(&vec![0u8; 70_000]);
    assert!(r.eof(), "an option above the size limit was read");
    still_serving(&s);
    s.stop();
}

#[test]
fn options_the_server_does_not_know_or_refuses() {
    let (_dir, s) = served(ServerConfig::default());
    let mut r = Raw::connect(&s.sock);
    r.send(&CLIENT_FIXED_NEWSTYLE.to_be_bytes());
    r.option(OPT_STARTTLS, &[]);
    assert_eq!(r.option_reply().1, REP_ERR_UNSUP);
    r.option(
        OPT_SET_META_CONTEXT,
        &encode_meta_context_data("", &[BASE_ALLOCATION]),
    );
    assert_eq!(
        r.option_reply().1,
        REP_ERR_INVALID,
        "before structured replies"
    );
    r.option(OPT_GO, &encode_go_data("nosuch", &[]));
    assert_eq!(r.option_reply().1, REP_ERR_UNKNOWN);
    r.option(OPT_GO, &[0, 0, 0, 9]);
    assert_eq!(r.option_reply().1, REP_ERR_INVALID, "malformed GO data");
    r.option(OPT_LIST, &[]);
    let (_, t, entry) = r.option_reply();
    assert_eq!((t, be32(&entry, 0)), (REP_SERVER, 0), "the default export");
    assert_eq!(r.option_reply().1, REP_ACK);
    r.option(OPT_ABORT, &[]);
    assert_eq!(r.option_reply().1, REP_ACK);
    assert!(r.closed());
    s.stop();
}

#[test]
fn a_client_vanishing_mid_write_payload_writes_nothing() {
    let (dir, s) = served(ServerConfig::default());
    let mut r = Raw::go(&s.sock, HeaderMode::Structured);
    r.request(Command::Write as u16, 0, 1, 0, 65536);
    r.send(&[0xdd; 1000]);
    drop(r);
    still_serving(&s);
    s.stop();
    let disk = std::fs::read(dir.path().join("disk.raw")).unwrap();
    assert!(
        disk.iter().all(|&b| b == 0x33),
        "part of an unfinished write landed"
    );
}

#[test]
fn a_silent_client_is_closed_after_the_handshake_timeout() {
    let config = ServerConfig {
        handshake_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let (_dir, s) = served(config);
    let mut r = Raw::connect(&s.sock);
    assert!(r.closed(), "the handshake never timed out");
    still_serving(&s);
    s.stop();
}

#[test]
fn connections_past_the_limit_are_refused_politely() {
    let config = ServerConfig {
        max_connections: 1,
        ..ServerConfig::default()
    };
    let (_dir, s) = served(config);
    let mut first = Raw::go(&s.sock, HeaderMode::Structured);
    let mut second = Raw::connect(&s.sock);
    second.send(&CLIENT_FIXED_NEWSTYLE.to_be_bytes());
    second.option(OPT_GO, &encode_go_data("", &[]));
    let (_, t, msg) = second.option_reply();
    assert_eq!(t, REP_ERR_POLICY, "{}", String::from_utf8_lossy(&msg));
    assert!(first.read_ok(1, 0, 100) == vec![0x33; 100], "wrong data");
    // DISC: the read in flight is answered, then the connection closes.
    first.request(Command::Read as u16, 0, 2, 4096, 512);
    first.request(Command::Disconnect as u16, 0, 3, 0, 0);
    let Reply::Chunk { cookie, .. } = first.reply() else {
        panic!("no reply to the read before DISC");
    };
    assert_eq!(cookie, 2);
    assert!(first.closed());
    assert_eq!(s.server.stats().refused_connections, 1);
    s.stop();
}

#[test]
fn structured_reads_send_holes_unless_df() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Made by hand: qemu-img would allocate the first block.
    let f = std::fs::File::create(d.join("sparse.raw")).unwrap();
    f.set_len(1 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x44; 65536], 512 << 10).unwrap();
    drop(f);
    let s = serve_raw(d, "sparse.raw", true);
    for mode in [HeaderMode::Structured, HeaderMode::Extended] {
        let mut r = Raw::go(&s.sock, mode);
        r.request(Command::Read as u16, 0, 1, 0, 1 << 20);
        let mut kinds = Vec::new();
        loop {
            let Reply::Chunk { flags, kind, .. } = r.reply() else {
                panic!("simple")
            };
            kinds.push(kind);
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        assert_eq!(
            kinds,
            [CHUNK_OFFSET_HOLE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE]
        );
        r.request(Command::Read as u16, CMD_FLAG_DF, 2, 0, 1 << 20);
        let Reply::Chunk {
            flags,
            kind,
            payload,
            ..
        } = r.reply()
        else {
            panic!("simple")
        };
        assert_eq!(
            (flags, kind, payload.len()),
            (REPLY_FLAG_DONE, CHUNK_OFFSET_DATA, 8 + (1 << 20))
        );
        let data = r.read_ok(3, 0, 1 << 20);
        assert!(data[512 << 10..576 << 10].iter().all(|&b| b == 0x44));
        assert!(data[..512 << 10].iter().all(|&b| b == 0));
        // Writes to a read-only export: EPERM.
        r.request(Command::Write as u16, 0, 4, 0, 10);
        r.send(&[1; 10]);
        assert_eq!(r.error(4), Errno::EPERM.0);
    }
    let mut simple = Raw::go(&s.sock, HeaderMode::Simple);
    simple.request(Command::Read as u16, 0, 9, 512 << 10, 8);
    assert_eq!(
        simple.reply(),
        Reply::Simple {
            errno: 0,
            cookie: 9
        }
    );
    assert_eq!(simple.bytes(8), vec![0x44; 8]);
    s.stop();
}

#[test]
fn unix_sockets_stale_live_and_removed_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, "qemu-img", &["create", "-f", "raw", "disk.raw", "64k"]);
    tools::qemu_io(d, "raw", "disk.raw", &["write -P 0x33 0 64k"]);
    let sock = d.join("nbd.sock");
    // A stale socket file: bound, never listened on by anyone now.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let s = serve_raw(d, "disk.raw", true);
    let other = Server::new(Vec::new(), ServerConfig::default());
    let addr = ListenAddr::Unix(sock.clone());
    let live = s.runtime.block_on(other.bind(&addr)).unwrap_err();
    assert!(matches!(live, Error::SocketInUse(_)), "{live}");
    let plain = d.join("plain");
    std::fs::write(&plain, b"x").unwrap();
    let refused = s
        .runtime
        .block_on(other.bind(&ListenAddr::Unix(plain.clone())));
    assert!(matches!(refused, Err(Error::NotASocket(_))));
    assert!(plain.exists(), "a plain file was removed");
    still_serving(&s);
    s.stop();
    assert!(!sock.exists(), "the socket outlived the server");
}

#[test]
fn shutdown_ends_idle_connections_and_refuses_new_listeners() {
    let (_dir, s) = served(ServerConfig::default());
    let mut idle = Raw::go(&s.sock, HeaderMode::Extended);
    let mut handshaking = Raw::connect(&s.sock);
    s.runtime.block_on(s.server.shutdown()).expect("shutdown");
    assert!(idle.eof(), "an idle connection outlived the shutdown");
    assert!(handshaking.eof(), "a handshake outlived the shutdown");
    let stats = s.server.stats();
    assert_eq!(
        (stats.connections, stats.active_connections),
        (2, 0),
        "{stats:?}"
    );
    assert!(!s.sock.exists());
    let again = s
        .runtime
        .block_on(s.server.bind(&ListenAddr::Unix(s.sock.clone())));
    assert!(matches!(again, Err(Error::ShutDown)));
    s.stop();
}

#[test]
fn block_status_of_a_huge_range_covers_a_bounded_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let f = std::fs::File::create(d.join("huge.raw")).unwrap();
    f.set_len(5 << 30).unwrap(); // sparse: costs nothing
    drop(f);
    let s = serve_raw(d, "huge.raw", true);
    let mut r = Raw::connect(&s.sock);
    r.send(&CLIENT_FIXED_NEWSTYLE.to_be_bytes());
    r.option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(r.option_reply().1, REP_ACK);
    r.option(
        OPT_SET_META_CONTEXT,
        &encode_meta_context_data("", &[BASE_ALLOCATION]),
    );
    let (_, t, ctx) = r.option_reply();
    assert_eq!(
        (t, &ctx[4..]),
        (REP_META_CONTEXT, BASE_ALLOCATION.as_bytes())
    );
    assert_eq!(r.option_reply().1, REP_ACK);
    r.option(OPT_GO, &encode_go_data("", &[]));
    while r.option_reply().1 != REP_ACK {}
    r.mode = HeaderMode::Extended;
    r.request(Command::BlockStatus as u16, 0, 1, 0, 5 << 30);
    let Reply::Chunk {
        flags,
        kind,
        payload,
        ..
    } = r.reply()
    else {
        panic!("simple reply with extended headers")
    };
    assert_eq!((flags, kind), (REPLY_FLAG_DONE, CHUNK_BLOCK_STATUS_EXT));
    let mut extents = Vec::new();
    decode_block_status_ext(&payload, &mut extents).unwrap();
    let covered: u64 = extents.iter().map(|e| e.length).sum();
    assert!(covered > 0 && covered <= 2 << 30, "covered {covered}");
    assert!(extents
        .iter()
        .all(|e| e.flags == u64::from(STATE_HOLE | STATE_ZERO)));
    s.stop();
}
